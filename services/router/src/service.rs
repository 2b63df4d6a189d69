//! One `Complete` call: route, call the provider within its timeout, account for it.

use std::time::Instant;

use sqlx::PgPool;

use crate::config::{ProviderKind, Tier};
use crate::error::{Error, ProviderError};
use crate::ledger::{self, Caller, Entry};
use crate::metrics;
use crate::provider::{ChatRequest, ChatResponse};
use crate::routing::Deployments;

/// A validated request.
#[derive(Debug, Clone)]
pub struct Call {
    pub caller: Caller,
    /// A deployment by name; empty to pick by tier.
    pub deployment: String,
    pub tier: Option<Tier>,
    pub request: ChatRequest,
}

/// A successful call.
#[derive(Debug, Clone)]
pub struct Completion {
    pub response: ChatResponse,
    pub cost_micros: u64,
    pub deployment: String,
    pub provider: ProviderKind,
    pub model: String,
    pub route_reason: String,
}

#[derive(Debug)]
pub struct Service {
    deployments: Deployments,
    pool: PgPool,
}

impl Service {
    pub fn new(deployments: Deployments, pool: PgPool) -> Self {
        Self { deployments, pool }
    }

    /// Every provider call, successful or not, is written to the ledger before the answer
    /// goes back; if that write fails the call fails, so no completion goes unaccounted.
    pub async fn complete(&self, call: Call) -> Result<Completion, Error> {
        let route = self.deployments.route(&call.deployment, call.tier)?;
        let deployment = route.deployment;
        tracing::Span::current().record("deployment", deployment.name.as_str());
        let started = Instant::now();
        let result = deployment.complete(&call.request).await;
        let latency = started.elapsed();
        let usage = result.as_ref().map(|r| r.usage).unwrap_or_default();
        let cost_micros = deployment.cost_micros(usage);
        let error = result.as_ref().err().map(ProviderError::class);
        metrics::call(&deployment.name, latency, usage, cost_micros, error);
        ledger::record(
            &self.pool,
            &Entry {
                caller: &call.caller,
                deployment,
                error,
                usage,
                cost_micros,
                latency,
            },
        )
        .await?;
        match result {
            Ok(response) => Ok(Completion {
                response,
                cost_micros,
                deployment: deployment.name.clone(),
                provider: deployment.provider_kind,
                model: deployment.model.clone(),
                route_reason: route.reason,
            }),
            Err(source) => Err(Error::Provider {
                deployment: deployment.name.clone(),
                source,
            }),
        }
    }
}
