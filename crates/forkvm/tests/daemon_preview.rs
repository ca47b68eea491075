//! The daemon's preview proxy (`forkvm serve --preview-listen`) against a real daemon and real
//! sandboxes with `--net`. The test guest has no TCP stack, so (as in cli_net.rs) the "guest's"
//! server listens inside the sandbox's own network namespace, on the gateway address, and the
//! daemon is told that is the guest's address (`--preview-guest-ip 192.168.241.1`): the proxy's
//! path (routing, namespace join, wake, privacy, relay) is the one a real guest gets. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod daemon_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use daemon_common::Daemon;
use serde_json::{json, Value};

const NEVER: &str = r#"{"pause_after": 0, "hibernate_after": 0}"#;

fn start(tag: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--preview-listen", "127.0.0.1:0", "--preview-guest-ip", "192.168.241.1"];
    args.extend_from_slice(extra);
    let d = Daemon::start_with(tag, &args);
    assert!(d.preview.is_some(), "the daemon printed no preview address");
    d
}

fn create_net(d: &Daemon, t: &str, privacy: &str) -> String {
    let policy: Value = serde_json::from_str(NEVER).unwrap();
    d.create(t, json!({"net": true, "privacy": privacy, "policy": policy}))
}

/// An HTTP server inside sandbox `id`'s namespace on 192.168.241.1:`port`: answers `tag` and the
/// request head it got; a WebSocket-style upgrade is answered 101 and then echoed.
fn serve_in_ns(d: &Daemon, id: &str, port: u16, tag: &str) {
    let listener = common::netns::listen_in_vm_ns(&d.run.join(id), port);
    let tag = tag.to_string();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(c) = c else { return };
            let tag = tag.clone();
            std::thread::spawn(move || answer(c, &tag));
        }
    });
}

fn answer(mut c: TcpStream, tag: &str) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    if head.to_ascii_lowercase().contains("upgrade: websocket") {
        c.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => c.write_all(&buf[..n]).unwrap(),
            }
        }
    }
    if head.starts_with("GET /redirect ") {
        let a = "HTTP/1.1 302 Found\r\nlocation: /login\r\nset-cookie: s=1; Path=/; HttpOnly\r\n\
                 service-worker-allowed: /\r\ncontent-length: 0\r\n\r\n";
        let _ = c.write_all(a.as_bytes());
        return;
    }
    let len = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()));
    let mut req_body = vec![0u8; len.unwrap_or(0)];
    r.read_exact(&mut req_body).unwrap();
    let body = format!("{tag}\n{head}");
    let _ = c.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes());
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Sends raw bytes to the preview listener and reads the whole answer.
fn raw(d: &Daemon, bytes: &[u8]) -> Reply {
    let mut s = TcpStream::connect(d.preview.as_ref().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply { status, head: head.to_string(), body: body.to_string() }
}

fn get(d: &Daemon, id: &str, port: u16, path: &str, extra_headers: &str) -> Reply {
    raw(d, format!("GET {path} HTTP/1.1\r\nHost: {id}-{port}.localhost\r\n{extra_headers}\r\n").as_bytes())
}

/// Opens a WebSocket-style upgrade through the proxy (`host` header, `path`), reads the 101 and
/// its headers; returns the connection and its reader.
fn upgrade(d: &Daemon, host: &str, path: &str) -> (TcpStream, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(d.preview.as_ref().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 101"), "{line}");
    while line != "\r\n" {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    (s, r)
}

fn kinds(d: &Daemon, t: &str, id: &str) -> Vec<String> {
    let v = d.expect(200, "GET", &format!("/v1/sandboxes/{id}/events"), t, None);
    v["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect()
}

#[test]
fn preview_routes_by_host_and_relays_requests_and_upgrades() {
    let d = start("pv-relay", &[]);
    let t = d.token("ws1");
    let a = create_net(&d, &t, "public");
    let b = create_net(&d, &t, "public");
    serve_in_ns(&d, &a, 8080, "sandbox a");
    serve_in_ns(&d, &b, 8080, "sandbox b");
    serve_in_ns(&d, &a, 3000, "a:3000");
    let r = get(&d, &a, 8080, "/hello?x=1", "");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.body.starts_with("sandbox a\nGET /hello?x=1 HTTP/1.1\r\n"), "{}", r.body);
    assert!(r.body.contains("connection: close") && r.body.contains("x-forwarded-for: 127.0.0.1"), "{}", r.body);
    assert!(get(&d, &b, 8080, "/", "").body.starts_with("sandbox b\n"));
    assert!(get(&d, &a, 3000, "/", "").body.starts_with("a:3000\n"));
    // A request with a body: the bytes after the head reach the guest's socket too.
    let r = raw(&d, format!("POST /p HTTP/1.1\r\nHost: {a}-8080.localhost\r\ncontent-length: 2\r\n\r\nhi").as_bytes());
    assert_eq!(r.status, 200);

    // An upgrade: after 101 the connection is a byte pipe both ways.
    let (mut s, mut r) = upgrade(&d, &format!("{a}-8080.localhost"), "/ws");
    for msg in ["ping 1\n", "ping 2\n"] {
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = String::new();
        r.read_line(&mut back).unwrap();
        assert_eq!(back, msg);
    }
    let m = d.raw("GET", "/metrics", None, None).body.as_str().unwrap().to_string();
    assert!(m.contains("forkvm_preview_connections_total{result=\"relayed\"}"), "{m}");
}

#[test]
fn preview_wakes_a_paused_and_a_hibernated_sandbox_once() {
    let d = start("pv-wake", &[]);
    let t = d.token("ws1");
    let id = create_net(&d, &t, "public");
    serve_in_ns(&d, &id, 8080, "woke");
    d.expect(200, "POST", &format!("/v1/sandboxes/{id}/pause"), &t, None);
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| get(&d, &id, 8080, "/", ""))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(replies.iter().all(|r| r.status == 200 && r.body.starts_with("woke\n")));
    assert_eq!(d.state(&t, &id), "running");
    assert_eq!(kinds(&d, &t, &id).iter().filter(|k| *k == "resumed").count(), 1, "{:?}", kinds(&d, &t, &id));

    // Hibernated: the woken VMM has a new namespace; its "guest" server is started there once the
    // wake is announced, and the proxy's connect (refused until then) is retried.
    d.expect(200, "POST", &format!("/v1/sandboxes/{id}/hibernate"), &t, None);
    let since = d.last_event(&t, &id);
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2).map(|_| s.spawn(|| get(&d, &id, 8080, "/", ""))).collect();
        d.wait_event(&t, since, |e| e["sandbox"] == id.as_str() && e["kind"] == "woken");
        serve_in_ns(&d, &id, 8080, "woke again");
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &replies {
        assert_eq!(r.status, 200, "{} {}", r.head, r.body);
        assert!(r.body.starts_with("woke again\n"), "{}", r.body);
    }
    assert_eq!(kinds(&d, &t, &id).iter().filter(|k| *k == "woken").count(), 1);
    let m = d.raw("GET", "/metrics", None, None).body.as_str().unwrap().to_string();
    assert!(m.contains("forkvm_wake_ms_count{kind=\"woken\"} 1"), "{m}");
}

#[test]
fn private_previews_need_a_token_and_credentials_never_reach_the_guest() {
    let d = start("pv-priv", &[]);
    let t = d.token("ws1");
    let other = d.token("ws2");
    let id = create_net(&d, &t, "private");
    serve_in_ns(&d, &id, 8080, "secret app");
    let link = d.expect(200, "POST", &format!("/v1/sandboxes/{id}/ports/8080/preview"), &t, None);
    let token = link["token"].as_str().unwrap().to_string();
    let url = link["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("http://{id}-8080.localhost:")) && url.contains(&token), "{url}");
    // Another workspace cannot see it, so cannot get a link either.
    d.expect(404, "POST", &format!("/v1/sandboxes/{id}/ports/8080/preview"), &other, None);

    for creds in
        ["".to_string(), "x-forkvm-preview-token: fkp_00\r\n".into(), format!("authorization: Bearer {other}\r\n")]
    {
        let r = get(&d, &id, 8080, "/", &creds);
        assert_eq!(r.status, 404, "{creds:?}: {}", r.head);
        assert!(!r.body.contains("secret app"));
    }
    let r = get(&d, &id, 8080, "/", &format!("authorization: Bearer {t}\r\n"));
    assert!(r.status == 200 && r.body.starts_with("secret app\n") && !r.body.contains(&t), "{}", r.body);
    let r = get(&d, &id, 8080, "/x", &format!("x-forkvm-preview-token: {token}\r\ncookie: app=1\r\n"));
    assert!(r.status == 200 && !r.body.contains(&token) && r.body.contains("cookie: app=1"), "{}", r.body);
    // The link's query token becomes a cookie for this preview host, and leaves the address bar.
    let r = get(&d, &id, 8080, &format!("/page?a=1&forkvm_preview_token={token}"), "");
    assert_eq!(r.status, 302, "{}", r.head);
    let head = r.head.to_ascii_lowercase();
    assert!(head.contains("location: /page?a=1\r\n"), "{head}");
    assert!(head.contains(&format!("set-cookie: forkvm_preview_token={token}; path=/; httponly")), "{head}");
    let r = get(&d, &id, 8080, "/page?a=1", &format!("cookie: forkvm_preview_token={token}\r\n"));
    assert!(r.status == 200 && !r.body.contains(&token), "{}", r.body);
    // A preview token opens only its own sandbox.
    let id2 = create_net(&d, &t, "private");
    serve_in_ns(&d, &id2, 8080, "other app");
    assert_eq!(get(&d, &id2, 8080, "/", &format!("x-forkvm-preview-token: {token}\r\n")).status, 404);
    // A public sandbox's link has no token.
    let public = create_net(&d, &t, "public");
    let link = d.expect(200, "POST", &format!("/v1/sandboxes/{public}/ports/80/preview"), &other, None);
    assert!(link["token"].is_null());
}

#[test]
fn preview_bad_input_and_bounds() {
    let d = start(
        "pv-bad",
        &["--preview-max-connections", "3", "--preview-idle-timeout-ms", "500", "--preview-connect-timeout-ms", "300"],
    );
    let t = d.token("ws1");
    let id = create_net(&d, &t, "public");
    let plain = d.create(&t, serde_json::from_str(&format!(r#"{{"privacy": "public", "policy": {NEVER}}}"#)).unwrap());
    serve_in_ns(&d, &id, 8080, "app");
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400, "no Host"),
        (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(), 400, "is not <sandbox id>-<port>"),
        (format!("GET / HTTP/1.1\r\nHost: {id}-99999.localhost\r\n\r\n").into_bytes(), 400, "bad port"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(), 400, "malformed"),
        (
            format!("GET / HTTP/1.1\r\nHost: {id}-8080.localhost\r\nx: {}\r\n\r\n", "a".repeat(20 << 10)).into_bytes(),
            431,
            "larger than",
        ),
        (b"GET / HTTP/1.1\r\nHost: sb-000000000000-80.localhost\r\n\r\n".to_vec(), 404, "no sandbox"),
        (format!("GET / HTTP/1.1\r\nHost: {plain}-80.localhost\r\n\r\n").into_bytes(), 502, "has no network"),
        (format!("GET / HTTP/1.1\r\nHost: {id}-9.localhost\r\n\r\n").into_bytes(), 502, "cannot reach port 9"),
    ];
    for (bytes, status, says) in cases {
        let r = raw(&d, &bytes);
        assert_eq!(r.status, status, "{says}: {}", r.head);
        let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|_| panic!("not JSON: {}", r.body));
        assert!(v["error"]["message"].as_str().unwrap().contains(says), "{says}: {v}");
    }
    // The head is read only up to its bound, and a client that sends half of one holds a slot.
    // The connections above give their slots back as the proxy finishes closing them (after our
    // side has read the answer): wait for that, or a hold could find no slot and the request after
    // the holds find one (seen in a full run).
    wait_open_previews(&d, 0);
    let hold: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(d.preview.as_ref().unwrap()).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    wait_open_previews(&d, 3);
    let r = get(&d, &id, 8080, "/", "");
    assert_eq!(r.status, 503, "{}", r.head);
    assert!(r.body.contains("connections open"), "{}", r.body);
    drop(hold);
    // Their slots come back as the proxy notices each close.
    let mut again = get(&d, &id, 8080, "/", "");
    for _ in 0..1000 {
        if again.status != 503 {
            break;
        }
        std::thread::yield_now();
        again = get(&d, &id, 8080, "/", "");
    }
    assert_eq!(again.status, 200, "{}", again.head);
    // A quiet upgraded connection is closed after the idle timeout.
    let mut s = TcpStream::connect(d.preview.as_ref().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req =
        format!("GET /ws HTTP/1.1\r\nHost: {id}-8080.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 101"), "closed after the 101 when idle");
}

/// The daemon's `forkvm_preview_connections_open` gauge.
fn open_previews(d: &Daemon) -> i64 {
    let m = d.raw("GET", "/metrics", None, None).body.as_str().unwrap().to_string();
    let line = m.lines().find(|l| l.starts_with("forkvm_preview_connections_open ")).unwrap_or_else(|| panic!("{m}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits (a bounded number of looks) until the proxy holds exactly `n` connection slots.
fn wait_open_previews(d: &Daemon, n: i64) {
    let mut open = open_previews(d);
    for _ in 0..2000 {
        if open == n {
            return;
        }
        std::thread::yield_now();
        open = open_previews(d);
    }
    panic!("the preview proxy holds {open} connection slots, not {n}");
}

/// A request in path form (`/preview/<id>/<port>/...`) with the listener's address as Host.
fn get_path(d: &Daemon, path: &str, extra_headers: &str) -> Reply {
    let host = d.preview.as_ref().unwrap();
    raw(d, format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra_headers}\r\n").as_bytes())
}

#[test]
fn path_form_previews_strip_the_prefix_rewrite_answers_wake_and_keep_privacy() {
    let d = start("pv-path", &[]);
    let t = d.token("ws1");
    let a = create_net(&d, &t, "public");
    serve_in_ns(&d, &a, 8080, "app a");
    let host = d.preview.clone().unwrap();
    let r = get_path(&d, &format!("/preview/{a}/8080/hello?x=1"), "x-forwarded-prefix: /spoofed\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.body.starts_with("app a\nGET /hello?x=1 HTTP/1.1\r\n"), "{}", r.body);
    assert!(r.body.contains(&format!("x-forwarded-prefix: /preview/{a}/8080\r\n")), "{}", r.body);
    assert!(!r.body.contains("/spoofed"), "{}", r.body);
    // No trailing slash: redirected to the directory so relative links resolve.
    let r = get_path(&d, &format!("/preview/{a}/8080"), "");
    assert_eq!(r.status, 308, "{}", r.head);
    assert!(r.head.contains(&format!("location: /preview/{a}/8080/\r\n")), "{}", r.head);
    // The guest's redirect and cookie stay under the prefix; it cannot widen a service worker.
    let r = get_path(&d, &format!("/preview/{a}/8080/redirect"), "");
    assert_eq!(r.status, 302, "{}", r.head);
    let head = r.head.to_ascii_lowercase();
    assert!(head.contains(&format!("location: /preview/{a}/8080/login\r\n")), "{head}");
    assert!(head.contains(&format!("set-cookie: s=1; path=/preview/{a}/8080/; httponly\r\n")), "{head}");
    assert!(!head.contains("service-worker-allowed"), "{head}");
    // An absolute path requested from a path-form page is sent into that page's prefix.
    let r = get_path(&d, "/app.js", &format!("referer: http://{host}/preview/{a}/8080/index.html\r\n"));
    assert_eq!(r.status, 307, "{}", r.head);
    assert!(r.head.contains(&format!("location: /preview/{a}/8080/app.js\r\n")), "{}", r.head);
    // An upgrade in path form: the 101 goes through the rewriter, then bytes flow both ways.
    let (mut s, mut rd) = upgrade(&d, &host, &format!("/preview/{a}/8080/ws"));
    let mut line = String::new();
    s.write_all(b"ping\n").unwrap();
    line.clear();
    rd.read_line(&mut line).unwrap();
    assert_eq!(line, "ping\n");
    drop((s, rd));

    // Wake: a paused sandbox is resumed by a path-form request, once.
    d.expect(200, "POST", &format!("/v1/sandboxes/{a}/pause"), &t, None);
    let r = get_path(&d, &format!("/preview/{a}/8080/"), "");
    assert!(r.status == 200 && r.body.starts_with("app a\n"), "{} {}", r.head, r.body);
    assert_eq!(d.state(&t, &a), "running");

    // Privacy: the same rules as the host form, the cookie scoped to the sandbox's prefix, and
    // not honoured on a same-origin request made from another sandbox's page.
    let p = create_net(&d, &t, "private");
    serve_in_ns(&d, &p, 8080, "secret app");
    let link = d.expect(200, "POST", &format!("/v1/sandboxes/{p}/ports/8080/preview"), &t, None);
    let token = link["token"].as_str().unwrap().to_string();
    let path_url = link["path_url"].as_str().unwrap();
    assert!(path_url.starts_with(&format!("http://localhost:{}/preview/{p}/8080/?", host.rsplit(':').next().unwrap())));
    assert!(path_url.ends_with(&token), "{path_url}");
    assert_eq!(get_path(&d, &format!("/preview/{p}/8080/"), "").status, 404);
    let r = get_path(&d, &format!("/preview/{p}/8080/page?a=1&forkvm_preview_token={token}"), "");
    assert_eq!(r.status, 302, "{}", r.head);
    let head = r.head.to_ascii_lowercase();
    assert!(head.contains(&format!("location: /preview/{p}/8080/page?a=1\r\n")), "{head}");
    assert!(
        head.contains(&format!("set-cookie: forkvm_preview_token={token}; path=/preview/{p}/; httponly")),
        "{head}"
    );
    let cookie = format!("cookie: forkvm_preview_token={token}\r\n");
    let r = get_path(&d, &format!("/preview/{p}/8080/page"), &cookie);
    assert!(r.status == 200 && r.body.starts_with("secret app\n") && !r.body.contains(&token), "{}", r.body);
    let from = |page: &str| format!("{cookie}sec-fetch-site: same-origin\r\nreferer: http://{host}{page}\r\n");
    let r = get_path(&d, &format!("/preview/{p}/8080/page"), &from(&format!("/preview/{a}/8080/")));
    assert_eq!(r.status, 404, "another sandbox's page cannot use the cookie: {}", r.head);
    let r = get_path(&d, &format!("/preview/{p}/8080/page"), &from(&format!("/preview/{p}/8080/index")));
    assert_eq!(r.status, 200, "its own page can: {}", r.head);
    let r = get_path(&d, &format!("/preview/{p}/8080/"), &format!("x-forkvm-preview-token: {token}\r\n"));
    assert_eq!(r.status, 200, "{}", r.head);

    // Bad input and bounds: the same answers as the host form.
    for (path, status, says) in [
        ("/preview/sb_1/80/".to_string(), 400, "bad sandbox id"),
        (format!("/preview/{a}/0/"), 400, "bad port"),
        ("/preview/sb-000000000000/80/".to_string(), 404, "no sandbox"),
        (format!("/preview/{a}/9/"), 502, "cannot reach port 9"),
        ("/elsewhere".to_string(), 400, "path form"),
    ] {
        let r = get_path(&d, &path, "");
        assert_eq!(r.status, status, "{path}: {}", r.head);
        assert!(r.body.contains(says), "{path}: {}", r.body);
    }
}
