//! In-process service tests: the worker against real NATS (a unique prefix per test) and fake
//! orchestrator, router and memory servers on 127.0.0.1:0.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use colony_agent_worker::{Config, ERROR_CLASS_METADATA};
use colony_bus::async_nats::jetstream::consumer::PullConsumer;
use colony_bus::{Bus, StreamKind, subjects};
use colony_proto::prost::Message as _;
use colony_proto::v1;
use colony_proto::v1::memory_server::{Memory, MemoryServer};
use colony_proto::v1::orchestrator_server::{Orchestrator, OrchestratorServer};
use colony_proto::v1::router_server::{Router, RouterServer};
use colony_runtime::Runtime;
use colony_testkit::{TestBus, eventually};
use futures::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

const ROLE: &str = "generalist";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const WAIT: Duration = Duration::from_secs(10);

/// Spans must be recorded for `traceparent` to flow; logs stay quiet (errors only).
fn telemetry() {
    static GUARD: OnceLock<colony_telemetry::Guard> = OnceLock::new();
    GUARD.get_or_init(|| {
        colony_telemetry::init(
            "agent-worker-test",
            &colony_telemetry::TelemetryConfig {
                log_format: colony_telemetry::LogFormat::Pretty,
                log_filter: "error,colony_bus=info".into(),
                ..colony_telemetry::TelemetryConfig::default()
            },
        )
        .unwrap()
    });
}

// ---------------------------------------------------------------------------------------------
// Fake peers

/// Grants attempt `grant_attempt` of each task once and refuses everything else; records
/// claims and heartbeats and answers heartbeats with `keep_going`.
struct FakeOrchestrator {
    grant_attempt: u32,
    lease_ms: u64,
    keep_going: bool,
    granted: Mutex<HashSet<(String, u32)>>,
    claims: Mutex<Vec<v1::ClaimTaskRequest>>,
    heartbeats: Mutex<Vec<v1::HeartbeatTaskRequest>>,
    releases: Mutex<Vec<v1::ReleaseTaskRequest>>,
}

impl FakeOrchestrator {
    fn granting(attempt: u32) -> Self {
        Self {
            grant_attempt: attempt,
            lease_ms: 30_000,
            keep_going: true,
            granted: Mutex::default(),
            claims: Mutex::default(),
            heartbeats: Mutex::default(),
            releases: Mutex::default(),
        }
    }
}

fn spec(request: &v1::ClaimTaskRequest) -> v1::TaskSpec {
    v1::TaskSpec {
        tenant: request.tenant.clone(),
        run_id: format!("run-of-{}", request.task_id),
        task_id: request.task_id.clone(),
        attempt: request.attempt,
        role: ROLE.into(),
        instructions: "Say hello.".into(),
        tier: "budget".into(),
        max_tokens: 128,
        context: vec![v1::ChatMessage {
            role: "system".into(),
            content: "You are terse.".into(),
            ..Default::default()
        }],
        kind: v1::TaskKind::Agent as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Orchestrator for FakeOrchestrator {
    async fn claim_task(
        &self,
        request: Request<v1::ClaimTaskRequest>,
    ) -> Result<Response<v1::ClaimTaskResponse>, Status> {
        let request = request.into_inner();
        self.claims.lock().unwrap().push(request.clone());
        let fresh = self
            .granted
            .lock()
            .unwrap()
            .insert((request.task_id.clone(), request.attempt));
        let response = if request.attempt == self.grant_attempt && fresh {
            v1::ClaimTaskResponse {
                granted: true,
                reason: String::new(),
                task: Some(spec(&request)),
                lease_ms: self.lease_ms,
            }
        } else {
            v1::ClaimTaskResponse {
                granted: false,
                reason: "stale attempt".into(),
                task: None,
                lease_ms: 0,
            }
        };
        Ok(Response::new(response))
    }

    async fn claim_tasks(
        &self,
        request: Request<v1::ClaimTasksRequest>,
    ) -> Result<Response<v1::ClaimTasksResponse>, Status> {
        let mut claims = Vec::new();
        for claim in request.into_inner().claims {
            claims.push(self.claim_task(Request::new(claim)).await?.into_inner());
        }
        Ok(Response::new(v1::ClaimTasksResponse { claims }))
    }

    async fn get_task_output(
        &self,
        request: Request<v1::GetTaskOutputRequest>,
    ) -> Result<Response<v1::GetTaskOutputResponse>, Status> {
        let request = request.into_inner();
        Err(Status::not_found(format!(
            "task {} not found",
            request.task_id
        )))
    }

    async fn spawn_tasks(
        &self,
        _request: Request<v1::SpawnTasksRequest>,
    ) -> Result<Response<v1::SpawnTasksResponse>, Status> {
        Err(Status::unimplemented("these tasks have no tools"))
    }

    async fn save_checkpoint(
        &self,
        _request: Request<v1::SaveCheckpointRequest>,
    ) -> Result<Response<v1::SaveCheckpointResponse>, Status> {
        Err(Status::unimplemented(
            "these tasks have no tools, so no checkpoints",
        ))
    }

    async fn release_task(
        &self,
        request: Request<v1::ReleaseTaskRequest>,
    ) -> Result<Response<v1::ReleaseTaskResponse>, Status> {
        self.releases.lock().unwrap().push(request.into_inner());
        Ok(Response::new(v1::ReleaseTaskResponse { released: true }))
    }

    async fn heartbeat_task(
        &self,
        request: Request<v1::HeartbeatTaskRequest>,
    ) -> Result<Response<v1::HeartbeatTaskResponse>, Status> {
        self.heartbeats.lock().unwrap().push(request.into_inner());
        Ok(Response::new(v1::HeartbeatTaskResponse {
            keep_going: self.keep_going,
            reason: if self.keep_going {
                String::new()
            } else {
                "attempt 2 owns the task".into()
            },
            lease_ms: self.lease_ms,
        }))
    }
}

enum RouterAnswer {
    Reply(v1::CompleteResponse),
    Fail {
        code: Code,
        message: &'static str,
        class: Option<&'static str>,
    },
}

/// Answers every `Complete` after `delay`, and records each request with its metadata.
struct FakeRouter {
    answer: RouterAnswer,
    delay: Duration,
    requests: Mutex<Vec<(v1::CompleteRequest, MetadataMap)>>,
}

impl FakeRouter {
    fn replying() -> Self {
        Self {
            answer: RouterAnswer::Reply(v1::CompleteResponse {
                content: "Hello.".into(),
                usage: Some(usage()),
                deployment: "mock-small".into(),
                provider: "mock".into(),
                model: "small".into(),
                finish_reason: "stop".into(),
                route_reason: "tier budget".into(),
                tool_calls: Vec::new(),
            }),
            delay: Duration::ZERO,
            requests: Mutex::default(),
        }
    }

    fn failing(code: Code, message: &'static str, class: Option<&'static str>) -> Self {
        Self {
            answer: RouterAnswer::Fail {
                code,
                message,
                class,
            },
            ..Self::replying()
        }
    }

    fn slow(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::replying()
        }
    }
}

fn usage() -> v1::Usage {
    v1::Usage {
        prompt_tokens: 12,
        completion_tokens: 5,
        cost_micros_usd: 42,
    }
}

#[tonic::async_trait]
impl Router for FakeRouter {
    type CompleteStreamStream =
        futures::stream::Iter<std::vec::IntoIter<Result<v1::CompleteChunk, Status>>>;

    /// The answer of `complete`, a word per delta, then the whole response.
    async fn complete_stream(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<Self::CompleteStreamStream>, Status> {
        use v1::complete_chunk::Chunk;
        let response = self.complete(request).await?.into_inner();
        let chunks: Vec<_> = response
            .content
            .split_inclusive(' ')
            .map(|word| Chunk::Delta(word.to_owned()))
            .chain([Chunk::Done(response.clone())])
            .map(|chunk| Ok(v1::CompleteChunk { chunk: Some(chunk) }))
            .collect();
        Ok(Response::new(futures::stream::iter(chunks)))
    }

    async fn complete(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        let metadata = request.metadata().clone();
        self.requests
            .lock()
            .unwrap()
            .push((request.into_inner(), metadata));
        tokio::time::sleep(self.delay).await;
        match &self.answer {
            RouterAnswer::Reply(response) => Ok(Response::new(response.clone())),
            RouterAnswer::Fail {
                code,
                message,
                class,
            } => {
                let mut status = Status::new(*code, *message);
                if let Some(class) = class {
                    status
                        .metadata_mut()
                        .insert(ERROR_CLASS_METADATA, MetadataValue::from_static(class));
                }
                Err(status)
            }
        }
    }
}

/// A memory method the worker does not call: UNIMPLEMENTED.
macro_rules! unused {
    ($method:ident, $request:ty, $response:ty) => {
        // The shape `#[tonic::async_trait]` gives trait methods: it does not see into macros.
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            _: Request<$request>,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Response<$response>, Status>>
                    + Send
                    + 'async_trait,
            >,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                Err(Status::unimplemented(concat!(
                    "the worker does not call ",
                    stringify!($method)
                )))
            })
        }
    };
}

/// Records every append.
#[derive(Default)]
struct FakeMemory {
    appends: Mutex<Vec<v1::AppendMessagesRequest>>,
}

#[tonic::async_trait]
impl Memory for FakeMemory {
    async fn append_messages(
        &self,
        request: Request<v1::AppendMessagesRequest>,
    ) -> Result<Response<v1::AppendMessagesResponse>, Status> {
        let request = request.into_inner();
        let count = request.messages.len() as u64;
        self.appends.lock().unwrap().push(request);
        Ok(Response::new(v1::AppendMessagesResponse {
            message_count: count,
            token_count: count,
        }))
    }

    async fn list_messages(
        &self,
        _: Request<v1::ListMessagesRequest>,
    ) -> Result<Response<v1::ListMessagesResponse>, Status> {
        Ok(Response::new(v1::ListMessagesResponse::default()))
    }

    async fn embed(
        &self,
        _: Request<v1::EmbedRequest>,
    ) -> Result<Response<v1::EmbedResponse>, Status> {
        Err(Status::unimplemented("the worker does not embed"))
    }

    unused!(
        compress_session,
        v1::CompressSessionRequest,
        v1::CompressSessionResponse
    );
    unused!(get_context, v1::GetContextRequest, v1::GetContextResponse);
    unused!(
        write_memories,
        v1::WriteMemoriesRequest,
        v1::WriteMemoriesResponse
    );
    unused!(
        search_memories,
        v1::SearchMemoriesRequest,
        v1::SearchMemoriesResponse
    );
    unused!(get_memory, v1::GetMemoryRequest, v1::MemoryRecord);
    unused!(update_memory, v1::UpdateMemoryRequest, v1::MemoryRecord);
    unused!(
        delete_memory,
        v1::DeleteMemoryRequest,
        v1::DeleteMemoryResponse
    );
    unused!(add_strategy, v1::AddStrategyRequest, v1::StrategyRecord);
    unused!(
        suggest_strategies,
        v1::SuggestStrategiesRequest,
        v1::SuggestStrategiesResponse
    );
    unused!(
        record_strategy_outcome,
        v1::RecordStrategyOutcomeRequest,
        v1::RecordStrategyOutcomeResponse
    );
    unused!(
        list_strategies,
        v1::ListStrategiesRequest,
        v1::ListStrategiesResponse
    );

    type ExportTrajectoriesStream = futures::stream::Empty<Result<v1::TrajectoryChunk, Status>>;

    async fn export_trajectories(
        &self,
        _: Request<v1::ExportTrajectoriesRequest>,
    ) -> Result<Response<Self::ExportTrajectoriesStream>, Status> {
        Err(Status::unimplemented("the worker does not export"))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Harness {
    /// The test's own connection (same prefix as the worker).
    bus: Bus,
    reports: PullConsumer,
    orchestrator: Arc<FakeOrchestrator>,
    router: Arc<FakeRouter>,
    memory: Arc<FakeMemory>,
    runtime: Runtime,
    handle: Option<colony_agent_worker::Handle>,
    http: String,
    fakes: CancellationToken,
    fake_tasks: TaskTracker,
    /// Last: deletes the test's streams when dropped.
    _test_bus: TestBus,
}

impl Harness {
    async fn start(orchestrator: FakeOrchestrator, router: FakeRouter) -> Self {
        Self::start_with(orchestrator, router, |_| {}).await
    }

    async fn start_with(
        orchestrator: FakeOrchestrator,
        router: FakeRouter,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        telemetry();
        let orchestrator = Arc::new(orchestrator);
        let router = Arc::new(router);
        let memory = Arc::new(FakeMemory::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peers: SocketAddr = listener.local_addr().unwrap();
        let fakes = CancellationToken::new();
        let fake_tasks = TaskTracker::new();
        let server = tonic::transport::Server::builder()
            .add_service(OrchestratorServer::from_arc(orchestrator.clone()))
            .add_service(RouterServer::from_arc(router.clone()))
            .add_service(MemoryServer::from_arc(memory.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                fakes.clone().cancelled_owned(),
            );
        fake_tasks.spawn(server);

        let test_bus = TestBus::new();
        let bus = test_bus.connect().await;
        let reports = bus
            .durable_consumer(
                StreamKind::Reports,
                "test-reports",
                "colony.v1.task.report.>",
            )
            .await
            .unwrap();

        let url = format!("http://{peers}");
        let mut config = Config {
            bus: test_bus.config(),
            orchestrator_url: url.clone(),
            router_url: url.clone(),
            memory_url: url,
            slots: 2,
            rpc_timeout: Duration::from_secs(2),
            completion_timeout: Duration::from_secs(20),
            heartbeat_interval: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(5),
            ..Config::default()
        };
        config.http.addr = "127.0.0.1:0".into();
        tweak(&mut config);
        let runtime = Runtime::new(CancellationToken::new());
        let handle = colony_agent_worker::spawn(config, &runtime)
            .await
            .expect("the worker starts");
        Self {
            bus,
            reports,
            orchestrator,
            router,
            memory,
            runtime,
            http: format!("http://{}", handle.http_addr),
            handle: Some(handle),
            fakes,
            fake_tasks,
            _test_bus: test_bus,
        }
    }

    fn worker_id(&self) -> String {
        self.handle.as_ref().unwrap().worker_id.clone()
    }

    /// Publishes a dispatch for `task_id`/`attempt` carrying the test's trace context.
    async fn dispatch(&self, task_id: &str, attempt: u32) {
        let dispatch = v1::TaskDispatch {
            tenant: "acme".into(),
            run_id: format!("run-of-{task_id}"),
            task_id: task_id.into(),
            attempt,
            role: ROLE.into(),
            dispatched_at: Some(colony_proto::now()),
        };
        self.bus
            .publish_bytes(
                &subjects::dispatch(ROLE),
                &format!("dispatch-{task_id}-{attempt}"),
                Some(TRACEPARENT),
                Bytes::from(dispatch.encode_to_vec()),
            )
            .await
            .unwrap();
    }

    /// The next report on the REPORTS stream (acknowledged), with its logical subject.
    async fn next_report(&self, wait: Duration) -> Option<(String, v1::TaskReport)> {
        let mut batch = self
            .reports
            .batch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .unwrap();
        let message = batch.next().await?.unwrap();
        message.ack().await.unwrap();
        let subject = self.bus.logical(message.subject.as_str()).to_owned();
        Some((
            subject,
            v1::TaskReport::decode(message.payload.as_ref()).unwrap(),
        ))
    }

    /// Every message on the EVENTS stream's logical `subject` so far, decoded.
    async fn events<M: colony_proto::prost::Message + Default>(&self, subject: &str) -> Vec<M> {
        let stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.stream_name(StreamKind::Events))
            .await
            .unwrap();
        let consumer = stream
            .create_consumer(colony_bus::async_nats::jetstream::consumer::pull::Config {
                filter_subject: self.bus.subject(subject),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut batch = consumer
            .batch()
            .max_messages(1000)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        let mut events = Vec::new();
        while let Some(message) = batch.next().await {
            events.push(M::decode(message.unwrap().payload.as_ref()).unwrap());
        }
        events
    }

    async fn stream_len(&self, kind: StreamKind) -> u64 {
        let mut stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.stream_name(kind))
            .await
            .unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// Waits until the dispatch stream is empty: every dispatch was acknowledged.
    async fn wait_dispatches_acked(&self) {
        eventually(WAIT, "the dispatch to be acknowledged", || async {
            (self.stream_len(StreamKind::Dispatch).await == 0).then_some(())
        })
        .await;
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Cancels the worker and waits for its shutdown, then stops the fake peers.
    async fn stop(&mut self) {
        self.runtime.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.wait().await.expect("a clean shutdown");
        }
        self.fakes.cancel();
        self.fake_tasks.close();
        self.fake_tasks.wait().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_dispatch_is_claimed_run_and_reported() {
    let mut h = Harness::start(FakeOrchestrator::granting(1), FakeRouter::replying()).await;
    h.dispatch("t1", 1).await;

    let (subject, report) = h.next_report(WAIT).await.expect("a report");
    assert_eq!(subject, "colony.v1.task.report.succeeded");
    assert_eq!(report.tenant, "acme");
    assert_eq!(report.run_id, "run-of-t1");
    assert_eq!(report.task_id, "t1");
    assert_eq!(report.attempt, 1);
    assert_eq!(report.worker_id, h.worker_id());
    assert!(report.finished_at.is_some());
    let Some(v1::task_report::Outcome::Succeeded(succeeded)) = report.outcome else {
        panic!("a succeeded report: {report:?}");
    };
    assert_eq!(succeeded.output, "Hello.");
    assert_eq!(succeeded.usage, Some(usage()));
    assert_eq!(succeeded.deployment, "mock-small");
    h.wait_dispatches_acked().await;

    let claims = h.orchestrator.claims.lock().unwrap().clone();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].worker_id, h.worker_id());
    assert_eq!((claims[0].tenant.as_str(), claims[0].attempt), ("acme", 1));

    let appends = h.memory.appends.lock().unwrap().clone();
    assert_eq!(appends.len(), 2, "prompt, then reply");
    assert_eq!(appends[0].session_id, "run-of-t1");
    assert_eq!(appends[0].run_id, "run-of-t1");
    assert_eq!(appends[0].task_id, "t1");
    let roles: Vec<_> = appends[0]
        .messages
        .iter()
        .map(|m| m.role.as_str())
        .collect();
    assert_eq!(roles, ["system", "user"]);
    assert_eq!(appends[0].messages[1].content, "Say hello.");
    assert_eq!(appends[1].messages.len(), 1);
    assert_eq!(appends[1].messages[0].role, "assistant");
    assert_eq!(appends[1].messages[0].content, "Hello.");

    let requests = h.router.requests.lock().unwrap().clone();
    let (request, metadata) = &requests[0];
    assert_eq!(request.attempt, 1);
    assert_eq!(request.tier, "budget");
    assert_eq!(request.max_tokens, 128);
    assert_eq!(request.messages, appends[0].messages);
    assert!(metadata.get("grpc-timeout").is_some(), "a deadline");
    let traceparent = metadata
        .get("traceparent")
        .expect("trace context")
        .to_str()
        .unwrap();
    assert!(traceparent.contains(TRACE_ID), "{traceparent}");

    // The answer was streamed onto the bus as the model wrote it, then its end.
    let tokens: Vec<v1::TaskTokens> = h.events(subjects::TASK_TOKENS).await;
    let text: String = tokens.iter().map(|chunk| chunk.text.as_str()).collect();
    assert_eq!(text, "Hello.");
    let last = tokens.last().expect("streamed tokens");
    assert!(last.done && last.text.is_empty(), "{last:?}");
    assert!(tokens.iter().enumerate().all(|(i, chunk)| {
        chunk.seq as usize == i
            && chunk.model_call == 1
            && (
                chunk.tenant.as_str(),
                chunk.run_id.as_str(),
                chunk.task_id.as_str(),
            ) == ("acme", "run-of-t1", "t1")
    }));

    let metrics = h.metrics().await;
    assert!(
        metrics.contains("colony_agent_worker_claims_total"),
        "{metrics}"
    );
    assert!(metrics.contains("colony_agent_worker_slots"));
    h.stop().await;
}

#[tokio::test]
async fn a_refused_claim_is_acknowledged_without_a_report() {
    let mut h = Harness::start(FakeOrchestrator::granting(1), FakeRouter::replying()).await;
    h.dispatch("t1", 2).await;
    h.wait_dispatches_acked().await;
    assert_eq!(h.orchestrator.claims.lock().unwrap().len(), 1);
    assert!(h.router.requests.lock().unwrap().is_empty());
    assert!(h.memory.appends.lock().unwrap().is_empty());
    assert_eq!(h.stream_len(StreamKind::Reports).await, 0);
    h.stop().await;
}

#[tokio::test]
async fn a_classified_router_error_is_a_failed_report_with_that_class() {
    let router = FakeRouter::failing(
        Code::ResourceExhausted,
        "deployment mock-small: the provider is rate limiting",
        Some("external_rate_limit"),
    );
    let mut h = Harness::start(FakeOrchestrator::granting(1), router).await;
    h.dispatch("t1", 1).await;
    let (subject, report) = h.next_report(WAIT).await.expect("a report");
    assert_eq!(subject, "colony.v1.task.report.failed");
    let Some(v1::task_report::Outcome::Failed(failed)) = report.outcome else {
        panic!("a failed report: {report:?}");
    };
    assert_eq!(failed.error_class(), v1::ErrorClass::ExternalRateLimit);
    assert_eq!(
        failed.message,
        "router: deployment mock-small: the provider is rate limiting"
    );
    h.wait_dispatches_acked().await;
    // The prompt was remembered; there is no reply to remember.
    assert_eq!(h.memory.appends.lock().unwrap().len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn an_unclassified_router_error_is_classified_by_its_code() {
    let router = FakeRouter::failing(Code::InvalidArgument, "prompt too large", None);
    let mut h = Harness::start(FakeOrchestrator::granting(1), router).await;
    h.dispatch("t1", 1).await;
    let (_, report) = h.next_report(WAIT).await.expect("a report");
    let Some(v1::task_report::Outcome::Failed(failed)) = report.outcome else {
        panic!("a failed report: {report:?}");
    };
    assert_eq!(failed.error_class(), v1::ErrorClass::UserFixable);
    assert_eq!(failed.message, "router: prompt too large");
    h.stop().await;
}

#[tokio::test]
async fn a_lost_lease_stops_the_task_without_a_report() {
    let orchestrator = FakeOrchestrator {
        lease_ms: 600,
        keep_going: false,
        ..FakeOrchestrator::granting(1)
    };
    let mut h = Harness::start(orchestrator, FakeRouter::slow(Duration::from_secs(3))).await;
    let started = tokio::time::Instant::now();
    h.dispatch("t1", 1).await;
    h.wait_dispatches_acked().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stopped before the router answered"
    );
    let heartbeats = h.orchestrator.heartbeats.lock().unwrap().clone();
    assert_eq!(heartbeats.len(), 1, "the first heartbeat lost the lease");
    assert_eq!(heartbeats[0].worker_id, h.worker_id());
    assert_eq!(
        (heartbeats[0].task_id.as_str(), heartbeats[0].attempt),
        ("t1", 1)
    );
    assert_eq!(
        h.router.requests.lock().unwrap().len(),
        1,
        "work had started"
    );
    // Well past the router's answer: still nothing reported.
    tokio::time::sleep_until(started + Duration::from_secs(4)).await;
    assert_eq!(h.stream_len(StreamKind::Reports).await, 0);
    assert_eq!(
        h.memory.appends.lock().unwrap().len(),
        1,
        "no reply remembered"
    );
    h.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_tasks_finish_and_report() {
    let mut h = Harness::start(
        FakeOrchestrator::granting(1),
        FakeRouter::slow(Duration::from_secs(1)),
    )
    .await;
    h.dispatch("t1", 1).await;
    eventually(WAIT, "the router call", || async {
        (!h.router.requests.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    h.stop().await;
    let (subject, report) = h.next_report(WAIT).await.expect("a report");
    assert_eq!(subject, "colony.v1.task.report.succeeded");
    assert_eq!(report.attempt, 1);
    assert_eq!(h.stream_len(StreamKind::Dispatch).await, 0);
}

#[tokio::test]
async fn tasks_still_running_after_the_grace_are_abandoned() {
    let mut h = Harness::start_with(
        FakeOrchestrator::granting(1),
        FakeRouter::slow(Duration::from_secs(30)),
        |config| config.shutdown_grace = Duration::from_millis(300),
    )
    .await;
    h.dispatch("t1", 1).await;
    eventually(WAIT, "the router call", || async {
        (!h.router.requests.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let worker_id = h.worker_id();
    let stopping = tokio::time::Instant::now();
    h.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(h.stream_len(StreamKind::Reports).await, 0);
    assert_eq!(h.stream_len(StreamKind::Dispatch).await, 0, "acknowledged");
    // Its lease was given back, for another replica to take the task without waiting for it
    // to expire.
    let releases = h.orchestrator.releases.lock().unwrap().clone();
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert_eq!(
        (releases[0].task_id.as_str(), releases[0].attempt),
        ("t1", 1)
    );
    assert_eq!(releases[0].worker_id, worker_id);
}

#[tokio::test]
async fn the_worker_heartbeat_describes_the_worker() {
    let mut h = Harness::start_with(
        FakeOrchestrator::granting(1),
        FakeRouter::replying(),
        |config| config.roles = vec![ROLE.into(), "coder".into()],
    )
    .await;
    let consumer = h
        .bus
        .durable_consumer(
            StreamKind::Events,
            "test-heartbeats",
            subjects::WORKER_HEARTBEAT,
        )
        .await
        .unwrap();
    let mut batch = consumer
        .batch()
        .max_messages(2)
        .expires(WAIT)
        .messages()
        .await
        .unwrap();
    let first = batch.next().await.expect("a heartbeat").unwrap();
    let second = batch.next().await.expect("another heartbeat").unwrap();
    let beat = v1::WorkerHeartbeat::decode(first.payload.as_ref()).unwrap();
    assert_eq!(beat.worker_id, h.worker_id());
    assert_eq!(beat.roles, [ROLE, "coder"]);
    assert_eq!(beat.slots_total, 4, "2 slots per role, 2 roles");
    assert_eq!(beat.slots_busy, 0);
    assert_eq!(beat.version, env!("CARGO_PKG_VERSION"));
    assert!(beat.started_at.is_some() && beat.sent_at.is_some());
    let msg_id = |m: &colony_bus::async_nats::jetstream::Message| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(colony_bus::MSG_ID))
            .map(|v| v.as_str().to_owned())
    };
    let id = h.worker_id();
    let (first, second) = (msg_id(&first).unwrap(), msg_id(&second).unwrap());
    // hb-<worker>-<start ms>-<sequence>: unique across restarts of a worker with a fixed id.
    let started = first
        .strip_prefix(&format!("hb-{id}-"))
        .and_then(|rest| rest.strip_suffix("-1"))
        .unwrap();
    assert!(started.parse::<u128>().is_ok(), "{first}");
    assert_eq!(second, format!("hb-{id}-{started}-2"));
    h.stop().await;
}
