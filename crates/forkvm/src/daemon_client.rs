//! A thin client of the daemon's HTTP API over its Unix socket (hyper, HTTP/1.1).

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug)]
pub struct Client {
    sock: PathBuf,
    token: Option<String>,
    rt: tokio::runtime::Runtime,
}

/// A response: status, the came-up headers, JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub came_up: Option<String>,
    pub wake_ms: Option<String>,
    pub body: Value,
}

/// The daemon's socket: `$FORKVM_DAEMON_SOCKET`, else `<run dir>/forkvmd.sock`.
pub fn socket_path() -> PathBuf {
    std::env::var_os("FORKVM_DAEMON_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| forkvm_api::vm::run_dir().join("forkvmd.sock"))
}

impl Client {
    /// A client of the local daemon, authenticated by `$FORKVM_TOKEN` (which must be set).
    pub fn from_env() -> Result<Client, String> {
        let token = std::env::var("FORKVM_TOKEN").ok().filter(|t| !t.is_empty()).ok_or(
            "FORKVM_TOKEN is not set: export FORKVM_TOKEN=$(forkvm token create --workspace NAME) (on the daemon's host)",
        )?;
        Client::new(socket_path(), Some(token))
    }

    /// A client of the daemon at `sock`.
    pub fn new(sock: PathBuf, token: Option<String>) -> Result<Client, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        Ok(Client { sock, token, rt })
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, String> {
        self.rt.block_on(self.request_async(method, path, body))
    }

    async fn request_async(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, String> {
        let stream = tokio::net::UnixStream::connect(&self.sock).await.map_err(|e| {
            format!("cannot reach the forkvm daemon at {}: {e} (is `forkvm serve` running?)", self.sock.display())
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", "forkvmd");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(bytes)).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("daemon request failed: {e}"))?;
        let status = resp.status().as_u16();
        let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(String::from);
        let (came_up, wake_ms) = (header(forkvm_api::v1::HEADER_CAME_UP), header(forkvm_api::v1::HEADER_WAKE_MS));
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Ok(Answer { status, came_up, wake_ms, body })
    }

    /// A request that must succeed (2xx); the API's error message otherwise.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, String> {
        let a = self.request(method, path, body)?;
        if !(200..300).contains(&a.status) {
            let msg = a.body["error"]["message"].as_str().unwrap_or("no message");
            return Err(format!("{msg} (HTTP {})", a.status));
        }
        Ok(a)
    }
}
