//! `GET /v1/runs/{id}/stream`: a run as it happens, as server-sent events. The text its
//! tasks' models write arrives as `tokens` events (the workers publish it on
//! `colony.v1.event.tokens`), and one `end` event closes the stream when the run finishes.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use colony_bus::{Bus, subjects};
use colony_proto::v1;
use futures::stream::{self, StreamExt as _};
use prost::Message as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Error;
use crate::config::RunsConfig;
use crate::store::Store;

pub struct WatchState {
    pub store: Store,
    pub runs: RunsConfig,
    pub bus: Bus,
    /// Open streams end when the service shuts down.
    pub shutdown: CancellationToken,
}

pub fn routes(state: WatchState) -> Router {
    Router::new()
        .route("/v1/runs/{id}/stream", get(stream_run))
        .with_state(Arc::new(state))
}

/// A message heard on the bus while watching.
enum Heard {
    Tokens(colony_bus::async_nats::Message),
    Run(colony_bus::async_nats::Message),
}

/// The run's status once it is over.
fn finished(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

fn end_event(status: &str) -> Event {
    Event::default()
        .event("end")
        .data(json!({ "status": status }).to_string())
}

/// What a bus message says about the watched run as an event, and whether it ends the stream;
/// `None` for another run's (or tenant's) message, or one that does not decode.
fn event_for(heard: &Heard, tenant: &str, run_id: &str) -> Option<(Event, bool)> {
    match heard {
        Heard::Tokens(message) => {
            let chunk = v1::TaskTokens::decode(message.payload.as_ref()).ok()?;
            if chunk.tenant != tenant || chunk.run_id != run_id {
                return None;
            }
            let data = json!({
                "task_id": chunk.task_id,
                "attempt": chunk.attempt,
                "model_call": chunk.model_call,
                "seq": chunk.seq,
                "text": chunk.text,
                "done": chunk.done,
            });
            Some((
                Event::default().event("tokens").data(data.to_string()),
                false,
            ))
        }
        Heard::Run(message) => {
            let event = v1::RunEvent::decode(message.payload.as_ref()).ok()?;
            if event.tenant != tenant || event.run_id != run_id {
                return None;
            }
            let status = match v1::RunEventKind::try_from(event.kind).ok()? {
                v1::RunEventKind::Succeeded => "succeeded",
                v1::RunEventKind::Failed => "failed",
                v1::RunEventKind::Cancelled => "cancelled",
                _ => return None,
            };
            Some((end_event(status), true))
        }
    }
}

async fn stream_run(
    State(state): State<Arc<WatchState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let tenant = crate::http::tenant(&headers, &state.runs)?;
    let run_id = Uuid::parse_str(&id).map_err(|_| Error::RunNotFound(id.clone()))?;
    // Subscribed before the run is read, so that its end cannot fall between the two.
    let bus = &state.bus;
    let subscribe = |subject: String| async move {
        bus.client().subscribe(subject).await.map_err(|error| {
            Error::Bus(colony_bus::Error::Consumer {
                consumer: "run stream".into(),
                message: error.to_string(),
            })
        })
    };
    let tokens = subscribe(state.bus.subject(subjects::TASK_TOKENS)).await?;
    let runs = subscribe(state.bus.subject(&format!("{}.>", subjects::EVENT_RUN))).await?;
    // Another tenant's run is not found, as everywhere in the API.
    let run = state.store.get_run(&tenant, run_id).await?;
    if finished(&run.status) {
        let end = stream::once(async move { Ok::<_, Infallible>(end_event(&run.status)) });
        return Ok(Sse::new(end).into_response());
    }
    let heard = stream::select(tokens.map(Heard::Tokens), runs.map(Heard::Run)).boxed();
    let run_id = run_id.to_string();
    let events = stream::unfold(Some(heard), move |heard| {
        let (tenant, run_id) = (tenant.clone(), run_id.clone());
        async move {
            let mut heard = heard?;
            loop {
                let message = heard.next().await?;
                if let Some((event, last)) = event_for(&message, &tenant, &run_id) {
                    return Some((Ok::<_, Infallible>(event), (!last).then_some(heard)));
                }
            }
        }
    })
    .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
