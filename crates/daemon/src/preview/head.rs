//! The first request head on a preview connection: parsed (bounded), routed by its Host header,
//! its forkvm credentials taken out, and rewritten for the guest. Pure functions (unit-tested).

use std::net::SocketAddr;

use forkvm_api::v1::PREVIEW_TOKEN;

/// Largest request head (request line + headers) the proxy reads before routing.
pub const MAX_HEAD: usize = 16 << 10;
/// Most header lines in a request head.
pub const MAX_HEADERS: usize = 64;
/// The header carrying a preview token (the cookie and query parameter use [`PREVIEW_TOKEN`]).
pub const TOKEN_HEADER: &str = "x-forkvm-preview-token";

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub minor_version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head in the buffer (the body, if any, follows).
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not all of the head has arrived yet.
    Partial,
    Done(Head),
    /// Not HTTP/1.x, or malformed.
    Bad(String),
}

/// Parses the request head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Ok(httparse::Status::Complete(len)) => Parsed::Done(Head {
            method: req.method.unwrap_or("").to_string(),
            path: req.path.unwrap_or("").to_string(),
            minor_version: req.version.unwrap_or(1),
            headers: req.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect(),
            len,
        }),
        Err(httparse::Error::TooManyHeaders) => Parsed::Bad(format!("more than {MAX_HEADERS} header lines")),
        Err(e) => Parsed::Bad(format!("malformed request: {e}")),
    }
}

impl Head {
    /// The first value of header `name` (lower case) as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Whether the client asks to switch protocols (e.g. a WebSocket).
    pub fn is_upgrade(&self) -> bool {
        self.header("upgrade").is_some()
            && self.header("connection").is_some_and(|c| c.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
    }
}

/// Sandbox id and guest port from a Host header `<id>-<port>.<domain>[:port]`.
pub fn route(host: &str, domain: &str) -> Result<(String, u16), String> {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((n, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host.as_str(),
    };
    let label = name
        .strip_suffix(&format!(".{}", domain.to_ascii_lowercase()))
        .filter(|l| !l.is_empty() && !l.contains('.'))
        .ok_or_else(|| format!("host {host:?} is not <sandbox id>-<port>.{domain}"))?;
    let (id, port) = label.rsplit_once('-').ok_or_else(|| format!("host {host:?} names no port"))?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| format!("bad port in host {host:?}"))?;
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-';
    if id.is_empty() || id.len() > 64 || !id.chars().all(ok) {
        return Err(format!("bad sandbox id in host {host:?}"));
    }
    Ok((id.to_string(), port))
}

/// The forkvm credentials a request carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// `Authorization: Bearer fkv_...` (a workspace token).
    pub bearer: Option<String>,
    /// A preview token from the header, the cookie or the query.
    pub preview: Option<String>,
    /// The preview token came in the query (the proxy answers with a cookie and a redirect).
    pub from_query: bool,
}

/// Splits `path` into itself without the preview-token query parameter, and that parameter.
pub fn take_query_token(path: &str) -> (String, Option<String>) {
    let Some((base, query)) = path.split_once('?') else { return (path.to_string(), None) };
    let mut token = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == PREVIEW_TOKEN => {
                token = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    if rest.is_empty() || rest.iter().all(|s| s.is_empty()) {
        (base.to_string(), token)
    } else {
        (format!("{base}?{}", rest.join("&")), token)
    }
}

fn cookie_pairs(v: &str) -> impl Iterator<Item = (&str, &str)> {
    v.split(';').filter_map(|p| p.trim().split_once('=')).map(|(k, v)| (k.trim(), v.trim()))
}

pub fn creds(h: &Head) -> Creds {
    let bearer = h
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| t.starts_with("fkv_"))
        .map(String::from);
    let (_, query) = take_query_token(&h.path);
    let from_query = query.is_some();
    let preview = query.or_else(|| h.header(TOKEN_HEADER).map(|t| t.trim().to_string())).or_else(|| {
        h.headers
            .iter()
            .filter(|(n, _)| n == "cookie")
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(cookie_pairs)
            .find(|(k, _)| *k == PREVIEW_TOKEN)
            .map(|(_, v)| v.to_string())
    });
    Creds { bearer, preview, from_query }
}

/// The head as the guest gets it: without forkvm's credentials (workspace token, preview token
/// header/cookie/query), with `X-Forwarded-For`, and `Connection: close` unless it upgrades, so
/// every proxied connection carries one request (each one routed and checked here).
pub fn rewrite(h: &Head, client: SocketAddr) -> Vec<u8> {
    rewrite_to(h, client, &h.path, None)
}

/// [`rewrite`] for request target `target` (a path-form preview's path without its prefix),
/// announcing `prefix` in `X-Forwarded-Prefix` when given.
pub fn rewrite_to(h: &Head, client: SocketAddr, target: &str, prefix: Option<&str>) -> Vec<u8> {
    let (path, _) = take_query_token(target);
    let mut out = format!("{} {} HTTP/1.{}\r\n", h.method, path, h.minor_version).into_bytes();
    let upgrade = h.is_upgrade();
    for (name, value) in &h.headers {
        let drop = match name.as_str() {
            TOKEN_HEADER | "x-forwarded-for" | "x-forwarded-prefix" => true,
            "authorization" => creds(h).bearer.is_some(),
            "connection" | "keep-alive" => !upgrade,
            _ => false,
        };
        if drop {
            continue;
        }
        if name == "cookie" {
            let kept: Vec<String> = std::str::from_utf8(value)
                .map(|v| {
                    cookie_pairs(v).filter(|(k, _)| *k != PREVIEW_TOKEN).map(|(k, v)| format!("{k}={v}")).collect()
                })
                .unwrap_or_default();
            if !kept.is_empty() {
                out.extend_from_slice(format!("cookie: {}\r\n", kept.join("; ")).as_bytes());
            }
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("x-forwarded-for: {}\r\n", client.ip()).as_bytes());
    if let Some(p) = prefix {
        out.extend_from_slice(format!("x-forwarded-prefix: {p}\r\n").as_bytes());
    }
    if !upgrade {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    /// A complete request head (test input).
    pub(crate) fn head(s: &str) -> Head {
        match parse(s.as_bytes()) {
            Parsed::Done(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routes_by_host() {
        assert_eq!(
            route("sb-0a1b2c3d4e5f-8080.localhost:9000", "localhost").unwrap(),
            ("sb-0a1b2c3d4e5f".into(), 8080)
        );
        assert_eq!(route("SB-AB-80.Preview.Example", "preview.example").unwrap(), ("sb-ab".into(), 80));
        for bad in [
            "localhost",
            "sb.localhost",
            "sb-1-0.localhost",
            "sb-1-99999.localhost",
            "a.sb-1-80.localhost",
            "sb-1-80.other",
            "-80.localhost",
            "sb_1-80.localhost",
        ] {
            assert!(route(bad, "localhost").is_err(), "{bad}");
        }
    }

    #[test]
    fn partial_bad_and_too_many_headers() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Parsed::Partial);
        assert!(matches!(parse(b"\x16\x03\x01 garbage\r\n\r\n"), Parsed::Bad(_)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: y\r\n")).collect();
        assert!(
            matches!(parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), Parsed::Bad(m) if m.contains("header"))
        );
    }

    #[test]
    fn credentials_are_found_and_stripped() {
        let h = head(
            "GET /a?x=1&forkvm_preview_token=T1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer fkv_abc\r\n\
            Cookie: a=b; forkvm_preview_token=T2\r\nX-Forkvm-Preview-Token: T3\r\nConnection: keep-alive\r\n\r\n",
        );
        assert_eq!(creds(&h), Creds { bearer: Some("fkv_abc".into()), preview: Some("T1".into()), from_query: true });
        let out = String::from_utf8(rewrite(&h, "10.0.0.1:5".parse().unwrap())).unwrap();
        assert!(out.starts_with("GET /a?x=1 HTTP/1.1\r\n"), "{out}");
        for gone in ["fkv_abc", "T1", "T2", "T3", "keep-alive"] {
            assert!(!out.contains(gone), "{gone} left in {out}");
        }
        assert!(out.contains("cookie: a=b\r\n") && out.contains("x-forwarded-for: 10.0.0.1\r\n"), "{out}");
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
        let h = head("GET / HTTP/1.1\r\nCookie: forkvm_preview_token=T2\r\n\r\n");
        assert_eq!(creds(&h).preview.as_deref(), Some("T2"));
        // An app's own Authorization (not a forkvm token) goes through.
        let h = head("GET / HTTP/1.1\r\nAuthorization: Bearer app\r\n\r\n");
        assert!(String::from_utf8(rewrite(&h, "10.0.0.1:5".parse().unwrap())).unwrap().contains("Bearer app"));
    }

    #[test]
    fn upgrades_keep_their_connection_header() {
        let h = head("GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
        assert!(h.is_upgrade());
        let out = String::from_utf8(rewrite(&h, "10.0.0.1:5".parse().unwrap())).unwrap();
        assert!(out.contains("connection: Upgrade\r\n") && !out.contains("close"), "{out}");
    }

    #[test]
    fn query_token_removal_keeps_other_parameters() {
        assert_eq!(take_query_token("/p?forkvm_preview_token=t"), ("/p".into(), Some("t".into())));
        assert_eq!(take_query_token("/p?a=1&forkvm_preview_token=t&b"), ("/p?a=1&b".into(), Some("t".into())));
        assert_eq!(take_query_token("/p?a=1"), ("/p?a=1".into(), None));
    }
}
