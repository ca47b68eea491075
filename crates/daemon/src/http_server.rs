//! The API's HTTP/1 server: the axum router served on hyper connections, one accept loop per
//! listener (the Unix socket, loopback TCP).
//!
//! Unlike `axum::serve`, connections allow half-closed clients: `nc`, or `printf 'GET ...' | nc`,
//! send their request, shut their write side and wait for the answer; hyper's default took that
//! EOF for a hang-up and dropped the connection unanswered. Every wait and count a client controls
//! is bounded ([`Limits`]): a request head (or the next one on a kept-alive connection) must
//! arrive in full within the head timeout, a request body within the body timeout after its head
//! ([`crate::body_deadline`]), and each listener serves at most `max_connections` at once: one
//! more is answered 503 and closed, never queued. Slots are per listener so that a flood on the
//! TCP port cannot lock the owner's CLI out of the Unix socket.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::Semaphore;

use crate::app::Shared;
use crate::body_deadline;
use crate::raw_answer::{error_response, Refuser, REFUSING_AT_ONCE};

/// The bounds of one API listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive in full within this (and a kept-alive connection may idle
    /// this long): else the connection is closed.
    pub head_timeout: Duration,
    /// A request body must arrive in full within this after its head: else 408, closed.
    pub body_timeout: Duration,
    /// Connections open at once on this listener; one more is answered 503 and closed.
    pub max_connections: usize,
}

/// Serves `router` on every connection `listener` accepts until `stop` completes; then accepts
/// no more, lets each open connection finish its request in flight, and returns once all closed.
/// Accept errors are handled by [`Listener::accept`] (a pause after e.g. EMFILE, as axum does).
/// `name` labels the listener's metrics (`unix`, `tcp`).
pub async fn serve<L: Listener>(
    app: Shared,
    name: &'static str,
    mut listener: L,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    http.half_close(true).timer(TokioTimer::new()).header_read_timeout(limits.head_timeout);
    let service = body_deadline::Service::new(router, limits.body_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let msg = format!("the API has {} connections open on this listener; try again", limits.max_connections);
    let refuser = Refuser::new(error_response(503, "unavailable", &msg), REFUSING_AT_ONCE);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let io = tokio::select! {
            (io, _addr) = listener.accept() => io,
            () = &mut stop => break,
        };
        // Taken here, in accept order, and held by the connection's task until it ends.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("api connection refused: {msg}");
            app.metrics.api_refused(name);
            refuser.refuse(io);
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(io), service.clone());
        let conn = graceful.watch(conn);
        app.metrics.api_slot(name, true);
        let app = app.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("api connection: {e}");
            }
            drop(slot);
            app.metrics.api_slot(name, false);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
