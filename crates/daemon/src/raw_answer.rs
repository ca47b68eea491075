//! HTTP answers written by hand on a connection no HTTP server serves (the preview proxy's, and
//! connections turned away for want of a slot), in the API's error shape
//! (`{"error":{"code","message"}}`), and closing such a connection without losing the answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Connections a [`Refuser`] answers at once.
pub const REFUSING_AT_ONCE: usize = 64;

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

/// Turns away the connections a listener accepted beyond its limit with one answer: written
/// (within 1 s), then closed gently (within 1 s more), each in a task of its own, at most
/// `at_once` at a time. Beyond that a connection is closed at once, unanswered, so a flood of
/// connections cannot pile up tasks and descriptors while the answers go out.
#[derive(Debug, Clone)]
pub struct Refuser {
    answer: Arc<[u8]>,
    slots: Arc<Semaphore>,
}

impl Refuser {
    pub fn new(answer: Vec<u8>, at_once: usize) -> Self {
        Refuser { answer: answer.into(), slots: Arc::new(Semaphore::new(at_once)) }
    }

    /// Answers `sock` and closes it (the task doing that, if a slot was free), or drops it.
    pub fn refuse<S>(&self, sock: S) -> Option<JoinHandle<()>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        let answer = self.answer.clone();
        Some(tokio::spawn(async move {
            let mut sock = sock;
            let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(&answer)).await;
            close_gently(sock).await;
            drop(slot);
        }))
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{duplex, AsyncReadExt};

    use super::Refuser;

    #[tokio::test]
    async fn a_refuser_answers_as_many_at_once_as_it_has_slots_and_drops_the_rest() {
        let r = Refuser::new(b"busy".to_vec(), 1);
        let (mut a, a_end) = duplex(64);
        let (mut b, b_end) = duplex(64);
        // a's answer holds the only slot until a's client closes (or 2 s): b is dropped.
        let answering = r.refuse(a_end).unwrap();
        assert!(r.refuse(b_end).is_none());
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "{got:?}");
        a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"busy");
        drop(a);
        answering.await.unwrap();
        // The slot is back.
        let (mut c, c_end) = duplex(64);
        let _answering = r.refuse(c_end).unwrap();
        got.clear();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"busy");
    }
}
