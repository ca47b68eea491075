//! `GET /v1/events`: the caller's workspace's events as Server-Sent Events (persisted ones after
//! `since` first, then live).

use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use forkvm_api::v1::ErrorBody;
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::IntoParams;

use crate::app::Shared;
use crate::auth::Caller;
use crate::db;
use crate::error::ApiResult;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Replay persisted events with a larger id first (default: only new events).
    since: Option<i64>,
    /// Only this sandbox's events.
    sandbox: Option<String>,
}

#[utoipa::path(get, path = "/v1/events", params(EventsQuery), security(("bearer" = [])),
    responses((status = 200, description = "text/event-stream of Event (JSON data, SSE id = event id)",
        content_type = "text/event-stream"), (status = 401, body = ErrorBody)))]
pub async fn stream(
    State(app): State<Shared>,
    Caller(ws): Caller,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let Query(q) = q?;
    // Subscribe before reading the backlog so nothing falls between the two.
    let rx = app.events.subscribe();
    let backlog = match q.since {
        Some(since) => db::events::list(&app.db.lock(), &ws, q.sandbox.as_deref(), since, 100_000)?,
        None => Vec::new(),
    };
    let last = backlog.last().map_or(q.since.unwrap_or(0), |e| e.id);
    let sandbox = q.sandbox.clone();
    let live = BroadcastStream::new(rx).filter_map(move |r| {
        let keep = match r {
            Ok(e) if e.workspace == ws && e.id > last && sandbox.as_ref().is_none_or(|s| *s == e.sandbox) => Some(e),
            _ => None,
        };
        async move { keep }
    });
    let events = stream::iter(backlog).chain(live).map(|e| {
        let data = serde_json::to_string(&e).unwrap_or_default();
        Ok(SseEvent::default().id(e.id.to_string()).event(e.kind.clone()).data(data))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
