//! The daemon's HTTP connections, byte by byte, on every listener it serves the API on (loopback
//! TCP and the Unix socket): a client that half-closes its write side after its request (`nc`,
//! `printf 'GET ...' | nc host port`) still gets the whole answer; the preview proxy's listener
//! answers such a client too; a client that never sends a request head is disconnected.
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

/// The daemon's TCP listener and its Unix socket, named for messages.
fn listeners(d: &Daemon) -> Vec<(&'static str, Box<dyn Fn() -> Box<dyn Conn> + '_>)> {
    let addr = d.base.strip_prefix("http://").unwrap().to_string();
    let sock = d.run.join("forkvmd.sock");
    vec![
        ("tcp", Box::new(move || Box::new(TcpStream::connect(&addr).unwrap()) as Box<dyn Conn>)),
        ("unix", Box::new(move || Box::new(UnixStream::connect(&sock).unwrap()) as Box<dyn Conn>)),
    ]
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

/// A whole `HTTP/1.1 200` answer whose body is the JSON object `key` names.
fn assert_full_200(what: &str, answer: &str, key: &str) {
    assert!(answer.starts_with("HTTP/1.1 200 "), "{what}: {answer:?}");
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
    for (kind, connect) in listeners(&d) {
        for (path, key) in gets {
            for (version, extra) in [("HTTP/1.0", ""), ("HTTP/1.1", "Connection: close\r\n")] {
                let req = format!("GET {path} {version}\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n{extra}\r\n");
                let answer = half_closed(connect(), &req);
                assert_full_200(&format!("{kind} {version} GET {path}"), &answer, key);
            }
        }
        // Without `Connection: close` an HTTP/1.1 client's half-close ends the keep-alive too.
        let req = format!("GET /v1/memory HTTP/1.1\r\nHost: forkvmd\r\nAuthorization: Bearer {t}\r\n\r\n");
        assert_full_200(&format!("{kind} HTTP/1.1 keep-alive"), &half_closed(connect(), &req), "host_total_bytes");
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
    for (kind, connect) in listeners(&d) {
        for sent in ["", "GET /v1/sandboxes HTTP/1.1\r\nHost: forkvmd\r\n"] {
            let mut c = connect();
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
