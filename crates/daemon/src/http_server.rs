//! The API's HTTP/1 server: the axum router served on hyper connections, one accept loop per
//! listener (the Unix socket, loopback TCP).
//!
//! Unlike `axum::serve`, connections allow half-closed clients: `nc`, or `printf 'GET ...' | nc`,
//! send their request, shut their write side and wait for the answer; hyper's default took that
//! EOF for a hang-up and dropped the connection unanswered. And a request head (or the next one
//! on a kept-alive connection) must arrive in full within the head timeout, so a client that
//! sends nothing cannot hold a connection forever (`axum::serve` sets no timer, so had none).

use std::future::Future;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// Serves `router` on every connection `listener` accepts until `stop` completes; then accepts
/// no more, lets each open connection finish its request in flight, and returns once all closed.
/// Accept errors are handled by [`Listener::accept`] (a pause after e.g. EMFILE, as axum does).
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    head_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    http.half_close(true).timer(TokioTimer::new()).header_read_timeout(head_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let io = tokio::select! {
            (io, _addr) = listener.accept() => io,
            () = &mut stop => break,
        };
        let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("api connection: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
