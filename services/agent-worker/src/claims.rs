//! Claims batched per call ([`colony_runtime::batch`]): every claim that arrives while the
//! previous `ClaimTasks` call is in flight goes out in the next one. An idle worker's claim
//! leaves at once; a busy worker's claims share one round trip and one orchestrator
//! transaction.

use std::time::Duration;

use colony_proto::v1;
use colony_proto::v1::orchestrator_client::OrchestratorClient;
use colony_runtime::batch::{BatchLoop, BatchQueue, batch_queue};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::error::{Error, Peer};
use crate::task::ErrorClass;

/// Claims one call carries at most (the orchestrator accepts 256).
const MAX_BATCH: usize = 64;
/// Claims waiting for a call at most; more wait for room (the consumers' slots bound them).
const QUEUE: usize = 1024;

type Answer = Result<v1::ClaimTaskResponse, Error>;

/// The handle claimants use; cheap to clone.
#[derive(Clone)]
pub struct ClaimQueue(BatchQueue<v1::ClaimTaskRequest, Answer>);

/// Sends the queued claims; run it on the service's runtime.
pub struct ClaimLoop {
    batches: BatchLoop<v1::ClaimTaskRequest, Answer>,
    client: OrchestratorClient<Channel>,
    worker_id: String,
    rpc_timeout: Duration,
}

pub fn queue(
    client: OrchestratorClient<Channel>,
    worker_id: String,
    rpc_timeout: Duration,
) -> (ClaimQueue, ClaimLoop) {
    let (queue, batches) = batch_queue(QUEUE, MAX_BATCH);
    (
        ClaimQueue(queue),
        ClaimLoop {
            batches,
            client,
            worker_id,
            rpc_timeout,
        },
    )
}

impl ClaimQueue {
    /// Claims one attempt; answered when the call carrying it returns.
    pub async fn claim(&self, claim: v1::ClaimTaskRequest) -> Answer {
        self.0.call(claim).await.unwrap_or_else(|_| {
            Err(Error::Call {
                peer: Peer::Orchestrator,
                class: ErrorClass::Transient,
                message: "the worker is shutting down".into(),
            })
        })
    }
}

impl ClaimLoop {
    /// Sends batches until `shutdown` or until every [`ClaimQueue`] is gone.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self {
            batches,
            client,
            worker_id,
            rpc_timeout,
        } = self;
        batches
            .run(shutdown, |claims| {
                send(client.clone(), worker_id.clone(), rpc_timeout, claims)
            })
            .await;
    }
}

/// One `ClaimTasks` call; every claim gets the call's failure if it fails.
async fn send(
    mut client: OrchestratorClient<Channel>,
    worker_id: String,
    rpc_timeout: Duration,
    claims: Vec<v1::ClaimTaskRequest>,
) -> Vec<Answer> {
    let count = claims.len();
    ::metrics::histogram!(crate::metrics::CLAIM_BATCH).record(count as f64);
    let message = v1::ClaimTasksRequest { worker_id, claims };
    let result = crate::grpc::call(
        Peer::Orchestrator,
        rpc_timeout,
        client.claim_tasks(crate::grpc::request(message, rpc_timeout)),
    )
    .await;
    let (class, message) = match result {
        Ok(response) if response.claims.len() == count => {
            return response.claims.into_iter().map(Ok).collect();
        }
        Ok(response) => (
            ErrorClass::Permanent,
            format!(
                "unusable answer: {count} claims answered with {} responses",
                response.claims.len()
            ),
        ),
        Err(Error::Call { class, message, .. }) => (class, message),
        Err(error) => (error.class(), error.to_string()),
    };
    (0..count)
        .map(|_| {
            Err(Error::Call {
                peer: Peer::Orchestrator,
                class,
                message: message.clone(),
            })
        })
        .collect()
}
