//! A real daemon (`forkvm serve`) on a temporary run directory, spoken to over loopback TCP
//! with reqwest. Every test gets its own run dir; Drop stops the daemon and every VMM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

pub struct Daemon {
    pub run: PathBuf,
    pub base: String,
    /// The preview proxy's address (`--preview-listen`), if started with one.
    pub preview: Option<String>,
    extra: Vec<String>,
    /// The daemon's stderr goes here (appended across restarts) instead of the test's.
    log: Option<PathBuf>,
    child: Option<Child>,
    http: reqwest::blocking::Client,
}

pub struct Answer {
    pub status: u16,
    pub came_up: Option<String>,
    pub wake_ms: Option<String>,
    pub body: Value,
}

pub fn forkvm(run: &PathBuf) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forkvm"));
    c.env("FORKVM_RUN_DIR", run).env_remove("FORKVM_STATE_DIR").env_remove("FORKVM_STORE");
    c
}

impl Daemon {
    pub fn start(tag: &str) -> Daemon {
        Self::start_with(tag, &[])
    }

    /// A daemon with extra `forkvm serve` arguments.
    pub fn start_with(tag: &str, extra: &[&str]) -> Daemon {
        Self::start_opts(tag, extra, false)
    }

    fn start_opts(tag: &str, extra: &[&str], logged: bool) -> Daemon {
        let run = std::env::temp_dir().join(format!("forkvmd-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        let mut d = Daemon {
            log: logged.then(|| run.join("forkvmd.stderr")),
            run,
            base: String::new(),
            preview: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            http: reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap(),
        };
        d.spawn();
        d
    }

    /// [`Daemon::start_with`] whose stderr (its log) is kept for [`Daemon::log`].
    pub fn start_logged(tag: &str, extra: &[&str]) -> Daemon {
        Self::start_opts(tag, extra, true)
    }

    /// What the daemon wrote to stderr so far ([`Daemon::start_logged`]).
    pub fn log(&self) -> String {
        self.log.as_ref().map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default()
    }

    /// Starts `forkvm serve` and waits for its "listening" line.
    fn spawn(&mut self) {
        let mut cmd = forkvm(&self.run);
        if self.log.is_some() {
            cmd.env_remove("FORKVM_LOG"); // the default log level
        }
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0", "--policy-tick-ms", "50"])
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(match &self.log {
                Some(p) => Stdio::from(std::fs::File::options().create(true).append(true).open(p).unwrap()),
                None => Stdio::inherit(),
            })
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let after = line.trim().split_once("http://").unwrap_or_else(|| panic!("no address in {line:?}")).1;
        let addr = after.split_whitespace().next().unwrap();
        self.base = format!("http://{addr}");
        self.preview = line.split_once("previews on ").map(|(_, p)| p.split_whitespace().next().unwrap().to_string());
        self.child = Some(child);
    }

    /// SIGTERM to the daemon, and its exit (a clean shutdown).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("the daemon runs");
        // SAFETY: kill with a plain pid and signal number.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// kill -9 of the daemon (its VMMs live on).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn token(&self, ws: &str) -> String {
        let out = forkvm(&self.run).args(["token", "create", "--workspace", ws]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A request with a raw body (None: no body).
    pub fn raw(&self, method: &str, path: &str, token: Option<&str>, body: Option<String>) -> Answer {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.http.request(m, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b);
        }
        let resp = r.send().unwrap();
        let status = resp.status().as_u16();
        let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(String::from);
        let (came_up, wake_ms) = (h("x-forkvm-came-up"), h("x-forkvm-wake-ms"));
        let text = resp.text().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let e = &body["error"];
            assert!(e["code"].is_string() && e["message"].is_string(), "error body shape: {body}");
        }
        Answer { status, came_up, wake_ms, body }
    }

    pub fn req(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Answer {
        self.raw(method, path, Some(token), body.map(|b| b.to_string()))
    }

    /// A request that must answer `status`; returns the body.
    pub fn expect(&self, status: u16, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let a = self.req(method, path, token, body);
        assert_eq!(a.status, status, "{method} {path}: {}", a.body);
        a.body
    }

    pub fn create(&self, token: &str, body: Value) -> String {
        let v = self.expect(201, "POST", "/v1/sandboxes", token, Some(body));
        assert_eq!(v["state"], "running", "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    pub fn exec(&self, token: &str, id: &str, line: &str) -> Answer {
        let a = self.req("POST", &format!("/v1/sandboxes/{id}/exec"), token, Some(json!({"line": line})));
        assert_eq!(a.status, 200, "exec {line} on {id}: {}", a.body);
        a
    }

    pub fn line(&self, token: &str, id: &str, line: &str) -> String {
        self.exec(token, id, line).body["lines"][0].as_str().unwrap().to_string()
    }

    pub fn state(&self, token: &str, id: &str) -> String {
        self.expect(200, "GET", &format!("/v1/sandboxes/{id}"), token, None)["state"].as_str().unwrap().to_string()
    }

    /// The id of the newest persisted event of the workspace (0 if none).
    pub fn last_event(&self, token: &str, id: &str) -> i64 {
        let v = self.expect(200, "GET", &format!("/v1/sandboxes/{id}/events"), token, None);
        v["events"].as_array().unwrap().last().map_or(0, |e| e["id"].as_i64().unwrap())
    }

    /// Reads the SSE stream from `since` until an event matches; returns it.
    pub fn wait_event(&self, token: &str, since: i64, pred: impl Fn(&Value) -> bool) -> Value {
        let resp = self
            .http
            .get(format!("{}/v1/events?since={since}", self.base))
            .bearer_auth(token)
            .timeout(Duration::from_secs(60))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        for line in BufReader::new(resp).lines() {
            let line = line.unwrap_or_else(|e| panic!("event stream ended waiting for an event: {e}"));
            if let Some(data) = line.strip_prefix("data: ") {
                let ev: Value = serde_json::from_str(data).unwrap();
                if pred(&ev) {
                    return ev;
                }
            }
        }
        panic!("event stream closed before the event came")
    }

    /// Names of the VM directories in the run dir.
    pub fn vm_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.run)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("sb-"))
            .collect();
        v.sort();
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        for name in self.vm_dirs() {
            let _ = forkvm(&self.run).args(["stop", &name]).output();
        }
        let _ = std::fs::remove_dir_all(&self.run);
    }
}
