//! The in-process memory service for tests: the real gRPC server on port 0 against a fresh
//! database and stream prefix.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::sync::Arc;

use colony_memory::Config;
use colony_proto::v1;
use colony_proto::v1::memory_client::MemoryClient;
use colony_runtime::Runtime;
use colony_runtime::clock::{Clock, SystemClock};
use colony_testkit::{TestBus, TestDb};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A fresh database and stream prefix, shared by the replicas of one test.
pub struct Backing {
    pub db: TestDb,
    pub bus: TestBus,
}

impl Backing {
    pub async fn new() -> Arc<Self> {
        Arc::new(Self {
            db: TestDb::new().await,
            bus: TestBus::new(),
        })
    }
}

/// One memory replica, in process, with a client.
pub struct Service {
    pub client: MemoryClient<Channel>,
    pub http: String,
    pub runtime: Runtime,
    pub handle: Option<colony_memory::Handle>,
    pub backing: Arc<Backing>,
}

impl Service {
    /// A replica on its own fresh database and streams.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(&Backing::new().await, Arc::new(SystemClock), tweak).await
    }

    /// A replica on `backing`, reading time from `clock`.
    pub async fn start_on(
        backing: &Arc<Backing>,
        clock: Arc<dyn Clock>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config {
            database: backing.db.config(),
            bus: backing.bus.config(),
            ..Config::default()
        };
        config.http.addr = "127.0.0.1:0".into();
        config.grpc.addr = "127.0.0.1:0".into();
        tweak(&mut config);
        let runtime = Runtime::new(CancellationToken::new());
        let handle = colony_memory::spawn_with_clock(config, &runtime, clock)
            .await
            .expect("the service starts");
        let channel = Channel::from_shared(format!("http://{}", handle.grpc_addr))
            .expect("a valid endpoint")
            .connect()
            .await
            .expect("the gRPC server accepts connections");
        let client = MemoryClient::new(channel);
        Self {
            client,
            http: format!("http://{}", handle.http_addr),
            runtime,
            handle: Some(handle),
            backing: backing.clone(),
        }
    }

    pub async fn append(
        &mut self,
        tenant: &str,
        session: &str,
        messages: &[(&str, &str)],
    ) -> Result<v1::AppendMessagesResponse, tonic::Status> {
        self.client
            .append_messages(v1::AppendMessagesRequest {
                tenant: tenant.into(),
                session_id: session.into(),
                run_id: "run-1".into(),
                task_id: "task-1".into(),
                messages: messages
                    .iter()
                    .map(|(role, content)| v1::ChatMessage {
                        role: (*role).into(),
                        content: (*content).into(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn list(
        &mut self,
        tenant: &str,
        session: &str,
        after_seq: u64,
        page_size: u32,
    ) -> Result<v1::ListMessagesResponse, tonic::Status> {
        self.client
            .list_messages(v1::ListMessagesRequest {
                tenant: tenant.into(),
                session_id: session.into(),
                page_size,
                after_seq,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Every message of a session, fetched page by page.
    pub async fn list_all(
        &mut self,
        tenant: &str,
        session: &str,
        page_size: u32,
    ) -> Vec<v1::StoredMessage> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .list(tenant, session, after, page_size)
                .await
                .expect("list succeeds");
            all.extend(page.messages);
            if page.next_after_seq == 0 {
                return all;
            }
            after = page.next_after_seq;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http))
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics has a body")
    }

    pub async fn stop(mut self) {
        self.runtime.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.wait().await.expect("a clean shutdown");
        }
    }
}

/// Points the embedding model at the workspace's fetched models (`make models`).
pub fn with_workspace_models(config: &mut Config) {
    config.embedding.model_dir =
        colony_inference::workspace_models_dir().join(colony_inference::DEFAULT_EMBEDDING_MODEL);
}
