//! The agent's HTTP face: read-only exports, no control.
//!
//! - `GET /metrics`: Prometheus text format.
//! - `GET /debug/pprof/profile?seconds=N[&pid=P][&container=ID]`: a
//!   gzip-compressed pprof profile of the next N seconds of CPU samples
//!   (the convention of Go's `net/http/pprof`, which Parca and Pyroscope
//!   scrape).
//! - `GET /api/v1/processes`: the processes watched, as JSON.
//!
//! Every handler asks the agent's loop, which owns the jobs, over a
//! channel.

use std::time::Duration;

use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

/// The longest profile one request may ask for.
pub const MAX_PROFILE_SECONDS: u64 = 300;
/// Go's default when `seconds` is not given.
const DEFAULT_PROFILE_SECONDS: u64 = 30;

/// What a handler asks the agent's loop.
pub enum Ask {
    /// The metrics, rendered.
    Metrics(oneshot::Sender<String>),
    /// The processes watched.
    Processes(oneshot::Sender<serde_json::Value>),
    /// A profile of the next `seconds` (gzip'd profile.proto), of `pid`
    /// or `container` only when given.
    Profile {
        /// How long to collect.
        seconds: u64,
        /// Only this process.
        pid: Option<u32>,
        /// Only processes of this container (id or prefix).
        container: Option<String>,
        /// Where the profile goes, or why there is none.
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
}

/// Query of the profile endpoint.
#[derive(Debug, Deserialize)]
struct ProfileQuery {
    seconds: Option<String>,
    pid: Option<String>,
    container: Option<String>,
}

/// The router, asking the loop over `asks`.
pub fn router(asks: mpsc::Sender<Ask>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/debug/pprof/profile", get(profile))
        .route("/api/v1/processes", get(processes))
        .with_state(asks)
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n").into_response()
}

async fn metrics(State(asks): State<mpsc::Sender<Ask>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if asks.send(Ask::Metrics(tx)).await.is_err() {
        return unavailable();
    }
    match rx.await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => unavailable(),
    }
}

async fn processes(State(asks): State<mpsc::Sender<Ask>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if asks.send(Ask::Processes(tx)).await.is_err() {
        return unavailable();
    }
    match rx.await {
        Ok(v) => axum::Json(v).into_response(),
        Err(_) => unavailable(),
    }
}

fn bad(why: String) -> Response {
    (StatusCode::BAD_REQUEST, why + "\n").into_response()
}

async fn profile(State(asks): State<mpsc::Sender<Ask>>, Query(q): Query<ProfileQuery>) -> Response {
    let seconds = match q.seconds.as_deref().map(str::parse::<u64>) {
        None => DEFAULT_PROFILE_SECONDS,
        Some(Ok(s)) if (1..=MAX_PROFILE_SECONDS).contains(&s) => s,
        Some(_) => {
            return bad(format!(
                "seconds must be a whole number from 1 to {MAX_PROFILE_SECONDS}"
            ));
        }
    };
    let pid = match q.pid.as_deref().map(str::parse::<u32>) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(_)) => return bad("pid must be a process id".into()),
    };
    let (tx, rx) = oneshot::channel();
    let ask = Ask::Profile {
        seconds,
        pid,
        container: q.container.filter(|c| !c.is_empty()),
        reply: tx,
    };
    if asks.send(ask).await.is_err() {
        return unavailable();
    }
    match tokio::time::timeout(Duration::from_secs(seconds + 10), rx).await {
        Ok(Ok(Err(why))) => (StatusCode::NOT_FOUND, why + "\n").into_response(),
        Ok(Ok(Ok(bytes))) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile\"",
                ),
            ],
            bytes,
        )
            .into_response(),
        _ => unavailable(),
    }
}
