//! HTTP answers written by hand on a connection no HTTP server serves (the preview proxy's, and
//! connections turned away for want of a slot), in the API's error shape
//! (`{"error":{"code","message"}}`), and closing such a connection without losing the answer.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A complete HTTP error answer (JSON body like the API's), closing the connection.
pub fn error_response(status: u16, code: &str, message: &str) -> Vec<u8> {
    let reason = axum::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Writes `answer` (within 1 s) and closes gently: what a connection gets when it was accepted
/// beyond a listener's connection limit. At most about 2 s in all.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S, answer: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(answer)).await;
    close_gently(sock).await;
}

/// Ends our side, then reads (and drops) what the client still sends, briefly and boundedly:
/// closing with unread input would reset the connection and could lose our answer.
pub async fn close_gently<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S) {
    let _ = sock.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = 256usize << 10;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while left > 0 {
        match tokio::time::timeout_at(deadline, sock.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}
