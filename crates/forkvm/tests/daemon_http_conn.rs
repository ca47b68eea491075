//! The daemon's HTTP connections, byte by byte, on every listener it serves the API on (loopback
//! TCP and the Unix socket): a client that half-closes its write side after its request (`nc`,
//! `printf 'GET ...' | nc host port`) still gets the whole answer; the preview proxy's listener
//! answers such a client too; a client that never sends a request head is disconnected, one that
//! stops sending its request body is answered 408 and disconnected (an event stream is not cut
//! by that timeout); beyond `--api-max-connections` a connection is answered 503 and closed; SIGTERM
//! with kept-alive connections open is still a clean exit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use daemon_common::Daemon;
use serde_json::json;

/// Generous: these reads are bounds that turn a hang into a failure, never a measure of speed.
const READ_BOUND: Duration = Duration::from_secs(60);

/// A TCP or Unix stream to one of the daemon's listeners.
trait Conn: Read + Write {
    fn shut_write(&self);
    fn read_bound(&self);
}

impl Conn for TcpStream {
    fn shut_write(&self) {
        self.shutdown(Shutdown::Write).unwrap();
    }
    fn read_bound(&self) {
        self.set_read_timeout(Some(READ_BOUND)).unwrap();
    }
}

impl Conn for UnixStream {
    fn shut_write(&self) {
        self.shutdown(Shutdown::Write).unwrap();
    }
    fn read_bound(&self) {
        self.set_read_timeout(Some(READ_BOUND)).unwrap();
    }
}

/// One of the daemon's API listeners.
enum Listener {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Listener {
    fn kind(&self) -> &'static str {
        match self {
            Listener::Tcp(_) => "tcp",
            Listener::Unix(_) => "unix",
        }
    }
    fn connect(&self) -> Box<dyn Conn> {
        match self {
            Listener::Tcp(a) => Box::new(TcpStream::connect(a).unwrap()),
            Listener::Unix(p) => Box::new(UnixStream::connect(p).unwrap()),
        }
    }
}

/// The daemon's TCP listener and its Unix socket.
fn listeners(d: &Daemon) -> [Listener; 2] {
    [Listener::Tcp(d.base.strip_prefix("http://").unwrap().to_string()), Listener::Unix(d.run.join("forkvmd.sock"))]
}

/// Writes `request`, shuts the write side, and reads until the daemon closes; returns it all.
fn half_closed(mut c: Box<dyn Conn>, request: &str) -> String {
    c.read_bound();
    c.write_all(request.as_bytes()).unwrap();
    c.shut_write();
    let mut out = Vec::new();
    if let Err(e) = c.read_to_end(&mut out) {
        panic!("reading the answer after a half-close: {e} (got {:?})", String::from_utf8_lossy(&out));
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until the daemon closes the connection (a reset counts as closed); returns what came.
fn read_to_close(c: &mut dyn Conn, what: &str) -> String {
    c.read_bound();
    let mut out = Vec::new();
    match c.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: still open after {READ_BOUND:?}: {e} (got {:?})", String::from_utf8_lossy(&out)),
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads exactly one answer with a `content-length` (head, then that many bytes), leaving the
/// connection open.
fn read_one_answer(c: &mut dyn Conn, what: &str) -> String {
    c.read_bound();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut byte).unwrap_or_else(|e| panic!("{what}: {e} after {:?}", String::from_utf8_lossy(&got)));
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap_or_else(|| panic!("{what}: {head}"))
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
}

/// A whole error answer with `status`, `connection: close`, and the API's error body with `code`.
fn assert_error(what: &str, answer: &str, status: u16, code: &str) {
    assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{what}: {answer:?}");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{what}: no end of head: {answer:?}"));
    assert!(head.to_ascii_lowercase().contains("\r\nconnection: close"), "{what}: {head}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    assert!(v["error"]["message"].is_string(), "{what}: {v}");
}

/// A whole `200` answer in `version` (hyper answers an HTTP/1.0 request in HTTP/1.0) whose body
/// is a JSON object with `key`.
fn assert_full_200(what: &str, answer: &str, version: &str, key: &str) {
    assert!(answer.starts_with(&format!("{version} 200 ")), "{what}: {answer:?}");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{what}: no end of head: {answer:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-length")))
        .map(|(_, v)| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("{what}: no content-length: {head}"));
    assert_eq!(body.len(), len, "{what}: the whole body: {answer:?}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert!(v.get(key).is_some(), "{what}: no {key:?} in {v}");
}

#[test]
fn a_half_closed_client_gets_the_whole_answer_on_every_listener() {
    let d = Daemon::start("half-close");
    let t = d.token("ws1");
    // /v1/sandboxes answers from the database; /v1/memory after a blocking task (as /metrics
    // after asking live VMMs): the server must not take the client's EOF for a hang-up meanwhile.
    let gets = [("/v1/sandboxes", "sandboxes"), ("/v1/memory", "host_total_bytes")];
    for l in listeners(&d) {
        let kind = l.kind();
        for (path, key) in gets {
            for (version, extra) in [("HTTP/1.0", ""), ("HTTP/1.1", "Connection: close\r\n")] {
                let req = format!("GET {path} {version}\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n{extra}\r\n");
                let answer = half_closed(l.connect(), &req);
                assert_full_200(&format!("{kind} {version} GET {path}"), &answer, version, key);
            }
        }
        // Without `Connection: close` an HTTP/1.1 client's half-close ends the keep-alive too.
        let req = format!("GET /v1/memory HTTP/1.1\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n\r\n");
        assert_full_200(
            &format!("{kind} HTTP/1.1 keep-alive"),
            &half_closed(l.connect(), &req),
            "HTTP/1.1",
            "host_total_bytes",
        );
    }
}

#[test]
fn the_preview_listener_answers_a_half_closed_client() {
    let d = Daemon::start_with("half-close-pv", &["--preview-listen", "127.0.0.1:0"]);
    let c = TcpStream::connect(d.preview.as_ref().expect("a preview address")).unwrap();
    // No such sandbox: the proxy answers itself (no guest needed).
    let answer = half_closed(Box::new(c), "GET / HTTP/1.0\r\nHost: sb-000000000000-80.localhost\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer:?}");
    assert!(answer.contains("no sandbox"), "{answer:?}");
}

#[test]
fn a_client_that_sends_no_request_head_is_disconnected() {
    let d = Daemon::start_with("silent", &["--head-timeout-ms", "200"]);
    for l in listeners(&d) {
        let kind = l.kind();
        for sent in ["", "GET /v1/sandboxes HTTP/1.1\r\nHost: forkvmd\r\n"] {
            let mut c = l.connect();
            c.read_bound();
            c.write_all(sent.as_bytes()).unwrap();
            // The daemon ends the connection (with nothing, or a 408) well before our read bound.
            let mut out = Vec::new();
            match c.read_to_end(&mut out) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                Err(e) => panic!("{kind}, sent {sent:?}: still open after {READ_BOUND:?}: {e}"),
            }
            let answer = String::from_utf8_lossy(&out);
            assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{kind}, sent {sent:?}: {answer:?}");
        }
    }
}

#[test]
fn sigterm_with_kept_alive_connections_open_exits_cleanly() {
    let mut d = Daemon::start("half-close-stop");
    let t = d.token("ws1");
    let mut kept = Vec::new();
    for l in listeners(&d) {
        let kind = l.kind();
        let mut c = l.connect();
        let req = format!("GET /v1/sandboxes HTTP/1.1\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n\r\n");
        c.write_all(req.as_bytes()).unwrap();
        // Read exactly one answer: the connection stays open.
        let answer = read_one_answer(&mut *c, kind);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{kind}: {answer}");
        kept.push((kind, c));
    }
    // The servers stop accepting and close idle connections (a request in flight may finish).
    assert!(d.terminate().success(), "a clean exit with kept-alive connections open");
    drop(kept);
}

/// `POST /v1/sandboxes` whose body stops after 10 of 100 bytes (`Content-Length`), or after 10
/// bytes of a 100-byte chunk.
fn stalled_creates(t: &str) -> [(&'static str, String); 2] {
    let head = format!(
        "POST /v1/sandboxes HTTP/1.1\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\n"
    );
    [
        ("content-length", format!("{head}Content-Length: 100\r\n\r\n{{\"memory_m")),
        ("chunked", format!("{head}Transfer-Encoding: chunked\r\n\r\n64\r\n{{\"memory_m")),
    ]
}

#[test]
fn a_request_body_that_stops_coming_is_answered_408_and_closed() {
    let d = Daemon::start_with("slow-body", &["--body-timeout-ms", "200"]);
    let t = d.token("ws1");
    for l in listeners(&d) {
        for (how, req) in stalled_creates(&t) {
            let what = format!("{} {how}", l.kind());
            let mut c = l.connect();
            c.write_all(req.as_bytes()).unwrap();
            // We send no more and keep our side open: the daemon answers and closes.
            let answer = read_to_close(&mut *c, &what);
            assert_error(&what, &answer, 408, "timeout");
        }
    }
}

/// Whether `c` has something to read (an answer, or its end) within `wait`.
fn readable_within(c: &TcpStream, wait: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: c.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd of an open socket, for the length we pass.
    let n = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    n > 0
}

#[test]
fn a_request_body_trickled_in_is_cut_at_the_body_timeout() {
    let d = Daemon::start_with("trickle", &["--body-timeout-ms", "200"]);
    let t = d.token("ws1");
    let mut c = TcpStream::connect(d.base.strip_prefix("http://").unwrap()).unwrap();
    let head = format!(
        "POST /v1/sandboxes HTTP/1.1\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    c.write_all(head.as_bytes()).unwrap();
    // A byte every 50 ms until the daemon answers: each far within the 200 ms, all 100 far
    // beyond them. The deadline is the whole body's, so no byte renews it.
    let mut sent = 0;
    while sent < 100 && !readable_within(&c, Duration::from_millis(50)) {
        c.write_all(b" ").unwrap();
        sent += 1;
    }
    let answer = read_to_close(&mut c, "trickle");
    assert!(sent < 100, "the whole body went in before an answer: {answer:?}");
    assert_error("trickle", &answer, 408, "timeout");
}

#[test]
fn an_event_stream_outlives_the_body_timeout() {
    let d = Daemon::start_with("slow-body-events", &["--body-timeout-ms", "200"]);
    let t = d.token("ws1");
    let [tcp, _] = listeners(&d);
    let mut events = tcp.connect();
    events.read_bound();
    let req = format!("GET /v1/events HTTP/1.1\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n\r\n");
    events.write_all(req.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = events.read(&mut buf).unwrap();
        assert!(n > 0, "the event stream closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 "), "{:?}", String::from_utf8_lossy(&got));
    // A stalled body on another connection runs into the body timeout: the stream, opened
    // before it, has now been open longer than that.
    let (how, stalled) = &stalled_creates(&t)[0];
    let mut c = tcp.connect();
    c.write_all(stalled.as_bytes()).unwrap();
    assert_error(how, &read_to_close(&mut *c, how), 408, "timeout");
    let id = d.create(&t, json!({"name": "after-the-timeout"}));
    let want = format!("\"sandbox\":\"{id}\"");
    while !String::from_utf8_lossy(&got).contains(&want) {
        let n = events.read(&mut buf).unwrap();
        assert!(n > 0, "the event stream closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// `request` on a new connection, half-closed after it; sent again while the answer is the 503
/// of a full listener (a slot frees once the daemon has seen a close, a moment after the client
/// made it; every try is a whole exchange, no sleep). Returns the first other answer.
fn until_served(l: &Listener, request: &str, what: &str) -> String {
    for _ in 0..1000 {
        let answer = half_closed(l.connect(), request);
        if !answer.starts_with("HTTP/1.1 503 ") {
            return answer;
        }
        assert_error(what, &answer, 503, "unavailable");
    }
    panic!("{what}: no slot freed");
}

/// The value of the metrics line that starts with `name` (with its labels).
fn metric(metrics: &str, name: &str) -> i64 {
    let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn connections_beyond_api_max_connections_are_answered_503_until_one_closes() {
    // Held connections must stay open by themselves: no head timeout during the test.
    let d = Daemon::start_with("conn-limit", &["--api-max-connections", "2", "--head-timeout-ms", "600000"]);
    let t = d.token("ws1");
    let ls = listeners(&d);
    // Each listener has its own slots: two held on each, all four served. Each listener accepts
    // in order: its first two have the slots, its third does not.
    let mut held: Vec<Vec<Box<dyn Conn>>> = ls.iter().map(|l| vec![l.connect(), l.connect()]).collect();
    for l in &ls {
        let kind = l.kind();
        let mut third = l.connect();
        assert_error(&format!("{kind}: a third connection"), &read_to_close(&mut *third, kind), 503, "unavailable");
    }
    for (l, held) in ls.iter().zip(&mut held) {
        let kind = l.kind();
        for c in held.iter_mut() {
            let req = format!("GET /v1/memory HTTP/1.1\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n\r\n");
            c.write_all(req.as_bytes()).unwrap();
            let answer = read_one_answer(&mut **c, kind);
            assert!(answer.starts_with("HTTP/1.1 200 "), "{kind}: a held connection: {answer}");
        }
        // One closes: its slot frees once the daemon has seen that.
        drop(held.pop());
        let req = format!("GET /v1/sandboxes HTTP/1.0\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n\r\n");
        let what = format!("{kind}: after a close");
        assert_full_200(&what, &until_served(l, &req, &what), "HTTP/1.0", "sandboxes");
    }
    // The metrics count the refusals, and the slots held (one still held on each listener, and
    // on TCP this request's; maybe one not yet given back), never more than the limit.
    let m = until_served(&ls[0], "GET /metrics HTTP/1.0\r\nHost: forkvmd\r\n\r\n", "metrics");
    assert!(m.starts_with("HTTP/1.0 200 "), "{m}");
    for (kind, held_least) in [("tcp", 2), ("unix", 1)] {
        let refused = metric(&m, &format!("forkvm_api_connections_refused_total{{listener=\"{kind}\"}}"));
        assert!(refused >= 1, "{kind}: {refused} refused");
        let open = metric(&m, &format!("forkvm_api_connections_open{{listener=\"{kind}\"}}"));
        assert!((held_least..=2).contains(&open), "{kind}: {open} open");
    }
}
