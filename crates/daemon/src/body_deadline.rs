//! The request-body deadline of the API's connections: a request's body must arrive in full
//! within the body timeout after its head did, or the request is answered `408` (the API's error
//! shape, `connection: close`) and the connection closed. Only the wait for the body is bounded:
//! the handler's work (a fork, a wake) and its answer (the `/v1/events` stream) take what they
//! take.
//!
//! One deadline for the whole body, not a timeout per read as tower-http's `TimeoutBody` has: a
//! client trickling a byte now and then would renew that one for as long as it liked.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::service::TowerToHyperService;
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;

/// The body arrived too slowly.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in full within {0:?} of its head")]
pub struct TooSlow(pub Duration);

/// The router as a hyper service whose requests' bodies have a deadline.
#[derive(Debug, Clone)]
pub struct Service {
    router: TowerToHyperService<Router>,
    limit: Duration,
}

impl Service {
    pub fn new(router: Router, limit: Duration) -> Self {
        Service { router: TowerToHyperService::new(router), limit }
    }
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let limit = self.limit;
        let timed_out = Arc::new(AtomicBool::new(false));
        let body = |inner| DeadlineBody {
            inner,
            deadline: Instant::now() + limit,
            sleep: None,
            limit,
            timed_out: timed_out.clone(),
        };
        let answer = self.router.call(req.map(body));
        Box::pin(async move {
            let answer = answer.await?;
            if !timed_out.load(Ordering::Relaxed) {
                return Ok(answer);
            }
            // Whatever the handler made of its failed read: say what happened.
            let e = TooSlow(limit);
            tracing::debug!("api request: {e}");
            Ok(ApiError::new(StatusCode::REQUEST_TIMEOUT, e.to_string()).into_response())
        })
    }
}

/// A request body that fails with [`TooSlow`] once its deadline passes before its end.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    /// Made when the body is first waited for.
    sleep: Option<Pin<Box<Sleep>>>,
    limit: Duration,
    timed_out: Arc<AtomicBool>,
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // What has arrived is handed on even past the deadline: only waiting is cut short.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.timed_out.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(TooSlow(this.limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
