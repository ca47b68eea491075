//! The preview proxy (`forkvm serve --preview-listen ADDR`): `http://<sandbox id>-<port>.<domain>/`
//! reaches TCP port `<port>` of that sandbox's guest; so does the path form
//! `http://<preview host>/preview/<sandbox id>/<port>/` where wildcard DNS is not available
//! (see [`pathform`]: same privacy, wake and bounds; answers rewritten into the prefix). The proxy reads one request head (bounded),
//! routes it by its Host header, checks privacy, wakes a paused or hibernated sandbox (once, under
//! the sandbox's lock, like exec), opens a connection inside the sandbox's network namespace (the
//! one its VMM names in `<vm dir>/netns`, joined as `forkvm port-forward` does) and then relays
//! bytes both ways (so upgrades such as WebSockets work). Every proxied connection carries one
//! request (`Connection: close` towards the guest, unless it upgrades), so every request is
//! routed and checked here.
//!
//! Privacy: public and unlisted sandboxes are open to anyone who can reach the listener (an
//! unlisted sandbox's preview is "anyone with the link"). A private one needs the owning
//! workspace's token (`Authorization: Bearer fkv_...`) or its preview token (`fkp_...`, minted
//! by `POST /v1/sandboxes/{id}/ports/{port}/preview`) in the `x-forkvm-preview-token` header, the
//! `forkvm_preview_token` cookie, or the `?forkvm_preview_token=` query parameter (answered with
//! a redirect that sets the cookie for that preview host). Without them it is 404, like a sandbox
//! that does not exist. forkvm's credentials are removed from what the guest sees.

pub mod guest;
pub mod head;
pub mod pathform;
pub mod relay;
pub mod token;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkvm_api::v1::{Privacy, PREVIEW_TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::app::Shared;
use crate::error::ApiError;
use crate::raw_answer::{close_gently, error_response, Refuser, REFUSING_AT_ONCE};
use head::{Head, Parsed};

/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PreviewConfig {
    pub listen: SocketAddr,
    /// Previews are `<id>-<port>.<domain>` (default `localhost`: browsers resolve it to loopback).
    pub domain: String,
    /// The guest's address inside its namespace.
    pub guest_ip: Ipv4Addr,
    /// Most proxied connections open at once (more are answered 503).
    pub max_connections: usize,
    pub connect_timeout: Duration,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
}

/// The running proxy's address and token minter (for links).
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub domain: String,
    pub minter: token::Minter,
}

/// Open proxied connections per sandbox: the idle policy leaves those sandboxes running.
#[derive(Debug, Default)]
pub struct Active(Mutex<HashMap<String, usize>>);

impl Active {
    pub fn busy(&self, id: &str) -> bool {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(id).is_some_and(|n| *n > 0)
    }

    fn enter(self: &Arc<Self>, id: &str) -> ActiveGuard {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(id.to_string()).or_default() += 1;
        ActiveGuard { active: self.clone(), id: id.to_string() }
    }
}

struct ActiveGuard {
    active: Arc<Active>,
    id: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut m = self.active.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.id);
            }
        }
    }
}

fn api_error_response(e: &ApiError) -> Vec<u8> {
    error_response(e.status.as_u16(), e.code(), &e.message)
}

/// Binds the preview listener; returns it with what links need.
pub async fn bind(app: &Shared, cfg: &PreviewConfig) -> Result<TcpListener, String> {
    let l = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen for previews on {}: {e}", cfg.listen))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let minter = token::Minter::load_or_create(&app.cfg.state_dir.join("preview.key"))?;
    let _ = app.preview.set(Running { addr, domain: cfg.domain.clone(), minter });
    Ok(l)
}

/// Accepts preview connections until the listener fails.
pub async fn serve(app: Shared, cfg: PreviewConfig, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let msg = format!("the preview proxy has {} connections open; try again", cfg.max_connections);
    let refuser = Refuser::new(error_response(503, "unavailable", &msg), REFUSING_AT_ONCE);
    let cfg = Arc::new(cfg);
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("preview: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (app, cfg) = (app.clone(), cfg.clone());
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                app.metrics.preview_slot(true);
                tokio::spawn(async move {
                    handle(&app, &cfg, sock, peer).await;
                    drop(permit);
                    app.metrics.preview_slot(false);
                });
            }
            Err(_) => {
                app.metrics.observe_preview("too_many");
                refuser.refuse(sock);
            }
        }
    }
}

async fn reply(mut sock: TcpStream, app: &Shared, result: &str, answer: &[u8]) {
    app.metrics.observe_preview(result);
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.write_all(answer)).await;
    close_gently(sock).await;
}

/// Reads the first request head (at most [`head::MAX_HEAD`] bytes within [`HEAD_TIMEOUT`]).
async fn read_head(sock: &mut TcpStream) -> Result<(Head, Vec<u8>), (u16, &'static str, String)> {
    let mut buf = Vec::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        match head::parse(&buf) {
            Parsed::Done(h) => return Ok((h, buf)),
            Parsed::Bad(m) => return Err((400, "bad_request", m)),
            Parsed::Partial if buf.len() >= head::MAX_HEAD => {
                return Err((431, "too_large", format!("request head larger than {} bytes", head::MAX_HEAD)))
            }
            Parsed::Partial => {}
        }
        let mut chunk = [0u8; 4096];
        let room = (head::MAX_HEAD - buf.len()).min(chunk.len());
        let n = match tokio::time::timeout_at(deadline, sock.read(&mut chunk[..room])).await {
            Err(_) => return Err((408, "timeout", format!("no complete request head within {HEAD_TIMEOUT:?}"))),
            Ok(Err(e)) => return Err((400, "bad_request", format!("read: {e}"))),
            Ok(Ok(0)) => return Err((400, "bad_request", "the connection closed before a request head".into())),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the request may reach sandbox `rec` (see the module docs).
fn allowed(app: &Shared, rec: &crate::db::sandboxes::Rec, creds: &head::Creds) -> bool {
    if rec.sb.privacy != Privacy::Private {
        return true;
    }
    if let (Some(t), Some(run)) = (&creds.preview, app.preview.get()) {
        if run.minter.verify(&rec.sb.id, t) {
            return true;
        }
    }
    creds.bearer.as_deref().is_some_and(|t| {
        crate::db::tokens::workspace_of(&app.db.lock(), t).ok().flatten().as_deref() == Some(rec.sb.workspace.as_str())
    })
}

/// Where a request goes: host form (`<id>-<port>.<domain>`) or path form (`/preview/<id>/<port>/`).
enum Target {
    Host(String, u16),
    Path(pathform::PathRoute),
}

/// Routes a request head, or gives the answer to send instead (redirect or error).
fn target(h: &Head, domain: &str) -> Result<Target, (&'static str, Vec<u8>)> {
    let by_host = h.header("host").map(|host| head::route(host, domain));
    if let Some(Ok((id, port))) = by_host {
        return Ok(Target::Host(id, port));
    }
    let redirect = |code: u16, loc: &str| {
        let reason = if code == 307 { "Temporary Redirect" } else { "Permanent Redirect" };
        let a =
            format!("HTTP/1.1 {code} {reason}\r\nlocation: {loc}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        ("redirect", a.into_bytes())
    };
    if h.path.starts_with(pathform::PREFIX) {
        return match pathform::route(&h.path) {
            Ok(pathform::Routed::Path(r)) => Ok(Target::Path(r)),
            Ok(pathform::Routed::Redirect(loc)) => Err(redirect(308, &loc)),
            Err(m) => Err(("bad_request", error_response(400, "bad_request", &m))),
        };
    }
    if let Some(loc) = pathform::referer_fallback(h) {
        return Err(redirect(307, &loc));
    }
    let m = match by_host {
        None => "no Host header".to_string(),
        Some(Err(m)) => format!("{m} (or use the path form /preview/<sandbox id>/<port>/)"),
        Some(Ok(_)) => String::new(),
    };
    Err(("bad_request", error_response(400, "bad_request", &m)))
}

async fn handle(app: &Shared, cfg: &PreviewConfig, mut sock: TcpStream, peer: SocketAddr) {
    let (h, buf) = match read_head(&mut sock).await {
        Ok(v) => v,
        Err((status, code, m)) => return reply(sock, app, "bad_request", &error_response(status, code, &m)).await,
    };
    let route = match target(&h, &cfg.domain) {
        Ok(t) => t,
        Err((result, answer)) => return reply(sock, app, result, &answer).await,
    };
    let (id, port, path) = match route {
        Target::Host(id, port) => (id, port, None),
        Target::Path(r) => (r.id.clone(), r.port, Some(r)),
    };
    let mut creds = head::creds(&h);
    let from_cookie = !creds.from_query && h.header(head::TOKEN_HEADER).is_none();
    if path.is_some() && from_cookie && !pathform::cookie_allowed(&h, &id) {
        // Another sandbox's page on this shared origin: its requests do not carry this one's cookie.
        creds.preview = None;
    }
    let rec = crate::db::sandboxes::get(&app.db.lock(), &id).ok().flatten();
    if !rec.is_some_and(|r| allowed(app, &r, &creds)) {
        let m = format!("no sandbox {id:?} (a private sandbox needs its preview token or its workspace's token)");
        return reply(sock, app, "not_found", &error_response(404, "not_found", &m)).await;
    };
    if creds.from_query {
        // Trade the query token for a cookie on this preview host (path form: under the
        // sandbox's prefix), and drop it from the address bar.
        let (location, cookie_path) = match &path {
            None => (head::take_query_token(&h.path).0, "/".to_string()),
            Some(r) => (format!("{}{}", r.prefix, head::take_query_token(&r.rest).0), pathform::cookie_path(&id)),
        };
        let t = creds.preview.unwrap_or_default();
        let answer = format!(
            "HTTP/1.1 302 Found\r\nlocation: {location}\r\nset-cookie: {PREVIEW_TOKEN}={t}; Path={cookie_path}; HttpOnly; SameSite=Lax\r\n\
             content-length: 0\r\nconnection: close\r\n\r\n"
        );
        return reply(sock, app, "redirect", answer.as_bytes()).await;
    }
    let _busy = app.preview_active.enter(&id);
    if let Err(e) = crate::ops::lifecycle::up(app, &id).await {
        return reply(sock, app, "not_up", &api_error_response(&e)).await;
    }
    let target = SocketAddr::from((cfg.guest_ip, port));
    let dir = app.vmms.vm_dir(&id);
    let guest_sock = match guest::connect(&dir, target, cfg.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            let m = format!("sandbox {id}: cannot reach port {port} of its guest: {e}");
            return reply(sock, app, "unreachable", &error_response(502, "bad_gateway", &m)).await;
        }
    };
    let mut guest_sock = guest_sock;
    let mut first = match &path {
        None => head::rewrite(&h, peer),
        Some(r) => head::rewrite_to(&h, peer, &r.rest, Some(&r.prefix)),
    };
    first.extend_from_slice(&buf[h.len..]);
    if guest_sock.write_all(&first).await.is_err() {
        let m = format!("sandbox {id}: port {port} closed the connection");
        return reply(sock, app, "unreachable", &error_response(502, "bad_gateway", &m)).await;
    }
    if let Some(r) = &path {
        let host = h.header("host");
        if let Err(e) =
            pathform::forward_response_head(&mut guest_sock, &mut sock, &r.prefix, host, cfg.idle_timeout).await
        {
            let m = format!("sandbox {id}: port {port}: {e}");
            return reply(sock, app, "unreachable", &error_response(502, "bad_gateway", &m)).await;
        }
    }
    app.metrics.observe_preview("relayed");
    let moved = relay::relay(sock, guest_sock, cfg.idle_timeout).await;
    tracing::debug!(sandbox = id, port, ?moved, "preview connection done");
    let _ = crate::db::sandboxes::touch(&app.db.lock(), &id);
}
