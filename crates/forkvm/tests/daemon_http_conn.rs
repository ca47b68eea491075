//! The daemon's HTTP connections, byte by byte, on every listener it serves the API on (loopback
//! TCP and the Unix socket): a client that half-closes its write side after its request (`nc`,
//! `printf 'GET ...' | nc host port`) still gets the whole answer; the preview proxy's listener
//! answers such a client too; a client that never sends a request head is disconnected; SIGTERM
//! with kept-alive connections open is still a clean exit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use daemon_common::Daemon;

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
        c.read_bound();
        let req = format!("GET /v1/sandboxes HTTP/1.1\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n\r\n");
        c.write_all(req.as_bytes()).unwrap();
        // Read exactly one answer (head, then content-length bytes): the connection stays open.
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut byte).unwrap();
            got.push(byte[0]);
        }
        let head = String::from_utf8(got).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{kind}: {head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap_or_else(|| panic!("{kind}: {head}"))
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).unwrap();
        kept.push((kind, c));
    }
    // The servers stop accepting and close idle connections (a request in flight may finish).
    assert!(d.terminate().success(), "a clean exit with kept-alive connections open");
    drop(kept);
}
