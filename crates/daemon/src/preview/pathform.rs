//! Path-form previews, for hosts without wildcard DNS: `http://<preview host>/preview/<id>/<port>/...`
//! reaches `/...` on that sandbox's port (the prefix is stripped, as code-server's `/proxy/<port>/`
//! does, and announced to the guest in `X-Forwarded-Prefix`). Host-form names
//! (`<id>-<port>.<domain>`, as CodeSandbox's `<id>-<port>.csb.app` or E2B's `<port>-<id>.e2b.app`)
//! give each preview its own origin; the path form shares one origin between all sandboxes, so:
//! - answers are rewritten: a `Location` that is an absolute path (or an absolute URL on the
//!   preview host) gets the prefix, a `Set-Cookie` path is put under the prefix, and
//!   `Service-Worker-Allowed` is removed (a worker cannot claim another sandbox's paths);
//! - a preview-token cookie (scoped to `/preview/<id>/`) is not accepted on a same-origin request
//!   made from another sandbox's page (`Sec-Fetch-Site: same-origin` with a `Referer` outside
//!   `/preview/<id>/`, or none): one preview's scripts cannot read a private one;
//! - a request for an absolute path outside `/preview/` whose `Referer` is a path-form page (e.g.
//!   `<script src="/app.js">`) is redirected (307) into that page's prefix.
//!
//! Limits: URLs inside bodies (HTML, JS, CSS) are not rewritten; an app that builds absolute URLs
//! in scripts needs a base path (`X-Forwarded-Prefix`, Vite `base`, Next `basePath`, ...).

use super::head::Head;

/// Paths under this prefix are path-form previews.
pub const PREFIX: &str = "/preview/";
/// Largest response head from a guest that the proxy rewrites.
pub const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// A path-form request: sandbox, port, the stripped prefix and the path the guest gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRoute {
    pub id: String,
    pub port: u16,
    /// `/preview/<id>/<port>` (no trailing slash).
    pub prefix: String,
    /// What follows the prefix (starts with `/`, may carry a query).
    pub rest: String,
}

/// What a request that is not host-routed asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    Path(PathRoute),
    /// Answer 307/308 to this location (missing trailing slash, or the Referer fallback).
    Redirect(String),
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Splits a request target `/preview/<id>/<port>[/rest][?query]`.
pub fn route(target: &str) -> Result<Routed, String> {
    let Some(after) = target.strip_prefix(PREFIX) else {
        return Err(format!("path {target:?} is not {PREFIX}<sandbox id>/<port>/..."));
    };
    let (path, query) = match after.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (after, None),
    };
    let mut parts = path.splitn(3, '/');
    let id = parts.next().unwrap_or("").to_ascii_lowercase();
    let port_s = parts.next().unwrap_or("");
    let rest = parts.next();
    if !valid_id(&id) {
        return Err(format!("bad sandbox id in path {target:?}"));
    }
    let port: u16 = port_s.parse().ok().filter(|p| *p > 0).ok_or_else(|| format!("bad port in path {target:?}"))?;
    let prefix = format!("{PREFIX}{id}/{port}");
    let q = query.map(|q| format!("?{q}")).unwrap_or_default();
    match rest {
        None => Ok(Routed::Redirect(format!("{prefix}/{q}"))),
        Some(r) => Ok(Routed::Path(PathRoute { id, port, prefix, rest: format!("/{r}{q}") })),
    }
}

/// The path of a `Referer` (absolute URL or path), if it is on `host`.
fn referer_path<'a>(referer: &'a str, host: Option<&str>) -> Option<&'a str> {
    if referer.starts_with('/') {
        return Some(referer);
    }
    let rest = referer.strip_prefix("http://").or_else(|| referer.strip_prefix("https://"))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/"), |(a, _)| (a, &rest[a.len()..]));
    host.filter(|h| h.eq_ignore_ascii_case(authority)).map(|_| path)
}

/// The Referer fallback: a request for an absolute path outside `/preview/` made from a
/// path-form page of this host is redirected into that page's prefix.
pub fn referer_fallback(h: &Head) -> Option<String> {
    if h.path.starts_with(PREFIX) || !h.path.starts_with('/') {
        return None;
    }
    let path = referer_path(h.header("referer")?, h.header("host"))?;
    match route(path).ok()? {
        Routed::Path(r) => Some(format!("{}{}", r.prefix, h.path)),
        Routed::Redirect(_) => None,
    }
}

/// Whether a preview-token *cookie* may open sandbox `id` on this path-form request: not when the
/// browser says the request comes from a page of this origin outside `/preview/<id>/`.
pub fn cookie_allowed(h: &Head, id: &str) -> bool {
    if h.header("sec-fetch-site").is_none_or(|s| !s.trim().eq_ignore_ascii_case("same-origin")) {
        return true;
    }
    let own = format!("{PREFIX}{id}/");
    h.header("referer").and_then(|r| referer_path(r, h.header("host"))).is_some_and(|p| p.starts_with(&own))
}

/// The cookie path a query-token redirect sets for a sandbox (all its ports).
pub fn cookie_path(id: &str) -> String {
    format!("{PREFIX}{id}/")
}

fn rewrite_location(v: &str, prefix: &str, host: Option<&str>) -> String {
    if v.starts_with('/') && !v.starts_with("//") {
        return format!("{prefix}{v}");
    }
    for scheme in ["http://", "https://"] {
        if let Some(rest) = v.strip_prefix(scheme) {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, _)| (a, &rest[a.len()..]));
            if host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) {
                let path = if path.is_empty() { "/" } else { path };
                return format!("{scheme}{authority}{prefix}{path}");
            }
        }
    }
    v.to_string()
}

fn rewrite_cookie(v: &str, prefix: &str) -> String {
    v.split(';')
        .map(|attr| {
            let t = attr.trim_start();
            match t.split_once('=') {
                Some((k, p)) if k.trim().eq_ignore_ascii_case("path") && p.trim().starts_with('/') => {
                    format!(" Path={prefix}{}", p.trim())
                }
                _ => attr.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// Outcome of reading a guest's response head.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    Partial,
    /// The rewritten head, the bytes of the buffer it took, and whether it was informational
    /// (1xx other than 101: another head follows).
    Done {
        head: Vec<u8>,
        len: usize,
        interim: bool,
    },
    Bad(String),
}

/// Parses and rewrites the response head at the start of `buf` for prefix `prefix`
/// (`host`: the request's Host header).
pub fn rewrite_response(buf: &[u8], prefix: &str, host: Option<&str>) -> Response {
    let mut hs = [httparse::EMPTY_HEADER; super::head::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hs);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Partial) => return Response::Partial,
        Ok(httparse::Status::Complete(n)) => n,
        Err(e) => return Response::Bad(format!("malformed response head: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    let mut out = format!("HTTP/1.{} {code} {}\r\n", resp.version.unwrap_or(1), resp.reason.unwrap_or("")).into_bytes();
    for h in resp.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(h.value);
        let value = match name.as_str() {
            "service-worker-allowed" => continue,
            "location" | "content-location" => rewrite_location(&value, prefix, host),
            "set-cookie" => rewrite_cookie(&value, prefix),
            _ => {
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
                continue;
            }
        };
        out.extend_from_slice(format!("{}: {value}\r\n", h.name).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Response::Done { head: out, len, interim: (100..200).contains(&code) && code != 101 }
}

/// Reads the guest's response head(s) (bounded: [`MAX_RESPONSE_HEAD`] bytes each, `idle` without
/// a byte), writes them rewritten for `prefix` to the client, then the bytes that followed.
pub async fn forward_response_head<G, C>(
    guest: &mut G,
    client: &mut C,
    prefix: &str,
    host: Option<&str>,
    idle: std::time::Duration,
) -> Result<(), String>
where
    G: tokio::io::AsyncRead + Unpin,
    C: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // 1xx heads (100 Continue, 103 Early Hints) come before the final one; a few at most.
    for _ in 0..8 {
        loop {
            match rewrite_response(&buf, prefix, host) {
                Response::Bad(m) => return Err(m),
                Response::Done { head, len, interim } => {
                    client.write_all(&head).await.map_err(|e| e.to_string())?;
                    buf.drain(..len);
                    if !interim {
                        return client.write_all(&buf).await.map_err(|e| e.to_string());
                    }
                    break;
                }
                Response::Partial if buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(format!("response head larger than {MAX_RESPONSE_HEAD} bytes"))
                }
                Response::Partial => {}
            }
            let mut chunk = [0u8; 4096];
            let room = (MAX_RESPONSE_HEAD - buf.len()).min(chunk.len());
            match tokio::time::timeout(idle, guest.read(&mut chunk[..room])).await {
                Err(_) => return Err(format!("no response head within {idle:?}")),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Ok(Ok(0)) => return Err("the guest closed the connection before answering".into()),
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
    Err("more than 8 informational (1xx) answers".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::preview::head::tests::head;

    #[test]
    fn routes_paths() {
        let r = route("/preview/SB-ab12/8080/a/b?x=1").unwrap();
        let want = PathRoute {
            id: "sb-ab12".into(),
            port: 8080,
            prefix: "/preview/sb-ab12/8080".into(),
            rest: "/a/b?x=1".into(),
        };
        assert_eq!(r, Routed::Path(want));
        assert_eq!(
            route("/preview/sb-1/80/").unwrap(),
            Routed::Path(PathRoute {
                id: "sb-1".into(),
                port: 80,
                prefix: "/preview/sb-1/80".into(),
                rest: "/".into()
            })
        );
        assert_eq!(route("/preview/sb-1/80?q").unwrap(), Routed::Redirect("/preview/sb-1/80/?q".into()));
        for bad in [
            "/",
            "/preview/",
            "/preview/sb-1",
            "/preview/sb-1/0/",
            "/preview/sb-1/99999/",
            "/preview/sb_1/80/",
            "/preview//80/",
            "/preview/sb-1/x/",
        ] {
            assert!(route(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn referer_fallback_and_cookie_rule() {
        let h = head("GET /app.js HTTP/1.1\r\nHost: p:9\r\nReferer: http://p:9/preview/sb-1/80/index.html\r\n\r\n");
        assert_eq!(referer_fallback(&h).as_deref(), Some("/preview/sb-1/80/app.js"));
        let other_host = head("GET /app.js HTTP/1.1\r\nHost: p:9\r\nReferer: http://evil/preview/sb-1/80/\r\n\r\n");
        assert_eq!(referer_fallback(&other_host), None);
        assert_eq!(referer_fallback(&head("GET /app.js HTTP/1.1\r\nHost: p:9\r\n\r\n")), None);

        let same = |referer: &str| {
            head(&format!(
                "GET /preview/sb-1/80/ HTTP/1.1\r\nHost: p:9\r\nSec-Fetch-Site: same-origin\r\n{referer}\r\n"
            ))
        };
        assert!(cookie_allowed(&same("Referer: http://p:9/preview/sb-1/3000/x\r\n"), "sb-1"));
        assert!(!cookie_allowed(&same("Referer: http://p:9/preview/sb-2/80/\r\n"), "sb-1"));
        assert!(!cookie_allowed(&same("Referer: http://p:9/preview/sb-10/80/\r\n"), "sb-1"));
        assert!(!cookie_allowed(&same(""), "sb-1"), "no Referer on a same-origin request: refused");
        assert!(cookie_allowed(&head("GET / HTTP/1.1\r\nSec-Fetch-Site: none\r\n\r\n"), "sb-1"));
        assert!(cookie_allowed(&head("GET / HTTP/1.1\r\n\r\n"), "sb-1"));
    }

    #[test]
    fn response_heads_are_rewritten_into_the_prefix() {
        let p = "/preview/sb-1/80";
        let resp = "HTTP/1.1 302 Found\r\nLocation: /login?next=/\r\nSet-Cookie: s=1; Path=/; HttpOnly\r\n\
            Set-Cookie: t=2\r\nService-Worker-Allowed: /\r\nContent-Length: 0\r\n\r\nBODY";
        let Response::Done { head, len, interim } = rewrite_response(resp.as_bytes(), p, Some("p:9")) else { panic!() };
        let out = String::from_utf8(head).unwrap();
        assert_eq!((len, interim), (resp.len() - 4, false));
        assert!(out.starts_with("HTTP/1.1 302 Found\r\n"), "{out}");
        assert!(out.contains("Location: /preview/sb-1/80/login?next=/\r\n"), "{out}");
        assert!(out.contains("Set-Cookie: s=1; Path=/preview/sb-1/80/; HttpOnly\r\n"), "{out}");
        assert!(out.contains("Set-Cookie: t=2\r\n") && out.contains("Content-Length: 0\r\n"), "{out}");
        assert!(!out.to_ascii_lowercase().contains("service-worker-allowed"), "{out}");
        assert_eq!(rewrite_location("http://p:9/x", p, Some("p:9")), "http://p:9/preview/sb-1/80/x");
        assert_eq!(rewrite_location("http://p:9", p, Some("p:9")), "http://p:9/preview/sb-1/80/");
        assert_eq!(rewrite_location("https://elsewhere/x", p, Some("p:9")), "https://elsewhere/x");
        assert_eq!(rewrite_location("//cdn/x", p, Some("p:9")), "//cdn/x");
        assert_eq!(rewrite_location("rel/x", p, Some("p:9")), "rel/x");
        assert!(matches!(
            rewrite_response(b"HTTP/1.1 100 Continue\r\n\r\n", p, None),
            Response::Done { interim: true, .. }
        ));
        assert!(matches!(
            rewrite_response(b"HTTP/1.1 101 Switching\r\n\r\n", p, None),
            Response::Done { interim: false, .. }
        ));
        assert_eq!(rewrite_response(b"HTTP/1.1 200 OK\r\nA: b\r\n", p, None), Response::Partial);
        assert!(matches!(rewrite_response(b"garbage\r\n\r\n", p, None), Response::Bad(_)));
    }
}
