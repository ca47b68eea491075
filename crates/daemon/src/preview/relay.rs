//! Byte relay between a preview client and the guest: both directions at once, each half shut
//! down when its source ends, the whole connection closed after `idle` without a byte either way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUF: usize = 32 << 10;

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub to_guest: u64,
    pub to_client: u64,
    /// The relay ended because nothing moved for `idle`.
    pub idled_out: bool,
}

async fn pump<R, W>(mut r: R, mut w: W, last: Arc<AtomicU64>, t0: Instant) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut n_total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        last.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        n_total += n as u64;
    }
    let _ = w.shutdown().await;
    n_total
}

/// Relays between `client` and `guest` until both directions end or the connection idles out.
pub async fn relay<C, G>(client: C, guest: G, idle: Duration) -> Moved
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (cr, cw) = tokio::io::split(client);
    let (gr, gw) = tokio::io::split(guest);
    let t0 = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let up = tokio::spawn(pump(cr, gw, last.clone(), t0));
    let down = tokio::spawn(pump(gr, cw, last.clone(), t0));
    let (up_abort, down_abort) = (up.abort_handle(), down.abort_handle());
    let watchdog = async {
        loop {
            let quiet = t0.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    let both = async { (up.await.unwrap_or(0), down.await.unwrap_or(0)) };
    tokio::select! {
        (to_guest, to_client) = both => Moved { to_guest, to_client, idled_out: false },
        () = watchdog => {
            up_abort.abort();
            down_abort.abort();
            Moved { idled_out: true, ..Moved::default() }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn relays_both_ways_and_half_closes() {
        let (client, mut client_far) = tokio::io::duplex(64);
        let (guest, mut guest_far) = tokio::io::duplex(64);
        let r = tokio::spawn(relay(client, guest, Duration::from_secs(60)));
        client_far.write_all(b"hello guest").await.unwrap();
        client_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        guest_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello guest");
        let writer = tokio::spawn(async move { guest_far.write_all(&vec![7u8; 100_000]).await.unwrap() });
        let mut back = Vec::new();
        client_far.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), 100_000);
        writer.await.unwrap();
        assert_eq!(r.await.unwrap(), Moved { to_guest: 11, to_client: 100_000, idled_out: false });
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_closed_after_the_idle_timeout() {
        let (client, mut client_far) = tokio::io::duplex(64);
        let (guest, _guest_far) = tokio::io::duplex(64);
        let r = tokio::spawn(relay(client, guest, Duration::from_secs(30)));
        let m = r.await.unwrap();
        assert!(m.idled_out);
        let mut rest = Vec::new();
        assert_eq!(client_far.read_to_end(&mut rest).await.unwrap(), 0, "the client sees the close");
    }
}
