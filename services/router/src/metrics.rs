//! The router's metrics. Labels are deployment names (from config), outcomes and classes, and
//! on the per-call series (requests, tokens, cost, call time, time to first token) the tenant,
//! so spend, load and latency can be followed per tenant: never run, task or other ids.

use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, histogram};

use crate::budget::TenantBudget;
use crate::error::ErrorClass;
use crate::provider::TokenUsage;

pub const REQUESTS: &str = "colony_router_requests_total";
pub const REQUEST_SECONDS: &str = "colony_router_request_duration_seconds";
pub const TOKENS: &str = "colony_router_tokens_total";
pub const COST_MICRO_USD: &str = "colony_router_cost_micro_usd_total";
pub const ERRORS: &str = "colony_router_errors_total";
pub const RETRIES: &str = "colony_router_retries_total";
pub const FALLBACKS: &str = "colony_router_fallbacks_total";
pub const FIRST_TOKEN_SECONDS: &str = "colony_router_time_to_first_token_seconds";
pub const OVERHEAD_SECONDS: &str = "colony_router_overhead_seconds";

/// The `deployment` label of requests refused before a deployment was chosen.
const UNROUTED: &str = "none";

/// Rate limits and circuit breakers (resilience/).
pub const QUEUE_DEPTH: &str = "colony_router_queue_depth";
pub const QUEUE_WAIT_SECONDS: &str = "colony_router_queue_wait_seconds";
pub const QUEUE_REFUSALS: &str = "colony_router_queue_refusals_total";
pub const BREAKER_STATE: &str = "colony_router_breaker_state";
pub const BREAKER_TRANSITIONS: &str = "colony_router_breaker_transitions_total";
pub const BREAKER_REJECTIONS: &str = "colony_router_breaker_rejections_total";
pub const BREAKER_EVENTS_FAILED: &str = "colony_router_breaker_events_failed_total";
pub const RATE_LEASES: &str = "colony_router_rate_lease_total";

/// Tenant budgets (budget.rs), read from `router.budgets` every few seconds.
pub const TENANT_BUDGET: &str = "colony_router_tenant_budget_micro_usd";
pub const TENANT_BUDGET_SPENT: &str = "colony_router_tenant_budget_spent_micro_usd";
pub const TENANT_BUDGET_RESERVED: &str = "colony_router_tenant_budget_reserved_micro_usd";

/// The ledger writer (ledger.rs).
pub const WRITE_FAILURES: &str = "colony_router_ledger_write_failures_total";
pub const LOST: &str = "colony_router_ledger_lost_entries_total";
pub const PENDING: &str = "colony_router_ledger_pending";
pub const BATCH_ENTRIES: &str = "colony_router_ledger_batch_entries";
pub const FLUSH_SECONDS: &str = "colony_router_ledger_flush_duration_seconds";

pub fn describe() {
    describe_counter!(
        REQUESTS,
        "Complete requests, by deployment, tenant and outcome (ok, error, rejected)."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Time of one provider call, by deployment and tenant."
    );
    describe_counter!(
        TOKENS,
        "Tokens used, by deployment, tenant and direction (prompt, completion)."
    );
    describe_counter!(
        COST_MICRO_USD,
        "Cost of provider calls in millionths of a US dollar, by deployment and tenant."
    );
    describe_counter!(
        ERRORS,
        "Failed provider calls, by deployment and error class."
    );
    describe_counter!(
        RETRIES,
        "Provider calls retried on the same deployment after a transient failure or a rate \
         limit, by deployment."
    );
    describe_counter!(
        FALLBACKS,
        "Calls moved on to the next deployment of their plan after this one failed, by \
         deployment."
    );
    describe_histogram!(
        FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from opening a stream to its first event, by deployment and tenant."
    );
    describe_histogram!(
        OVERHEAD_SECONDS,
        Unit::Seconds,
        "The router's own time on a non-streamed call: its whole time in the service minus \
         the time spent waiting on providers (queueing for rate limits and retry backoff \
         included), by deployment."
    );
    // Rate limits and circuit breakers.
    describe_gauge!(
        QUEUE_DEPTH,
        "Requests waiting for a deployment's rate limits, by deployment."
    );
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time an admitted request waited for a deployment's rate limits, by deployment."
    );
    describe_counter!(
        QUEUE_REFUSALS,
        "Requests refused by a deployment's rate limiter, by deployment and reason \
         (queue_full, wait_too_long, too_large)."
    );
    describe_counter!(
        RATE_LEASES,
        "Statements on the rate buckets shared by the router replicas, by deployment, kind \
         (requests, tokens) and outcome: granted (all that was asked), short (the shared bucket \
         had less), failed (the replica limits alone meanwhile), returned and return_failed \
         (unused tokens given back)."
    );
    describe_gauge!(
        BREAKER_STATE,
        "A deployment's circuit breaker: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        BREAKER_TRANSITIONS,
        "Circuit breaker state changes, by deployment and new state (closed, half_open, open)."
    );
    describe_counter!(
        BREAKER_REJECTIONS,
        "Requests refused because a deployment's circuit breaker is open, by deployment."
    );
    describe_counter!(
        BREAKER_EVENTS_FAILED,
        "Circuit breaker changes not published on colony.v1.event.breaker (best effort), by \
         reason: queue_full (the publisher was behind), publish (NATS refused the send)."
    );
    // The ledger writer.
    describe_counter!(
        WRITE_FAILURES,
        "Ledger batch writes that failed (the batch is kept and retried)."
    );
    describe_counter!(
        LOST,
        "Ledger entries given up on at shutdown because the database kept failing."
    );
    describe_gauge!(
        PENDING,
        "Ledger entries handed to the writer (or waiting for room) and not yet committed."
    );
    describe_histogram!(BATCH_ENTRIES, "Entries per committed ledger batch.");
    describe_histogram!(
        FLUSH_SECONDS,
        Unit::Seconds,
        "Time to commit one ledger batch, retries excluded."
    );
    describe_gauge!(
        TENANT_BUDGET,
        "A tenant's budget (its configured limit on total spend) in millionths of a US dollar, by tenant."
    );
    describe_gauge!(
        TENANT_BUDGET_SPENT,
        "What a tenant has spent of its budget in millionths of a US dollar, by tenant \
         (may pass the budget by one call's overrun)."
    );
    describe_gauge!(
        TENANT_BUDGET_RESERVED,
        "Worst-case cost of a tenant's calls in flight, held on its budget until they settle, \
         in millionths of a US dollar, by tenant."
    );
    colony_bus::metrics::describe();
}

/// Sets the tenant budget gauges from one reading of `router.budgets`.
#[expect(
    clippy::cast_precision_loss,
    reason = "micro-USD amounts far below 2^53"
)]
pub fn tenant_budgets(gauges: &mut colony_telemetry::GaugeSet, budgets: &[TenantBudget]) {
    let mut values = std::collections::HashMap::new();
    for budget in budgets {
        let tenant = vec![("tenant", budget.tenant.clone())];
        for (name, value) in [
            (TENANT_BUDGET, budget.limit),
            (TENANT_BUDGET_SPENT, budget.spent),
            (TENANT_BUDGET_RESERVED, budget.reserved),
        ] {
            values.insert((name, tenant.clone()), value as f64);
        }
    }
    gauges.record(values);
}

pub fn retried(deployment: &str) {
    counter!(RETRIES, "deployment" => deployment.to_owned()).increment(1);
}

pub fn fell_back(deployment: &str) {
    counter!(FALLBACKS, "deployment" => deployment.to_owned()).increment(1);
}

pub fn first_token(deployment: &str, tenant: &str, elapsed: Duration) {
    histogram!(FIRST_TOKEN_SECONDS, "deployment" => deployment.to_owned(), "tenant" => tenant_label(tenant))
        .record(elapsed.as_secs_f64());
}

pub fn overhead(deployment: &str, elapsed: Duration) {
    histogram!(OVERHEAD_SECONDS, "deployment" => deployment.to_owned())
        .record(elapsed.as_secs_f64());
}

/// The `tenant` label of a call (`-` when the caller named none, or it is not known yet).
fn tenant_label(tenant: &str) -> String {
    if tenant.is_empty() {
        "-".to_owned()
    } else {
        tenant.to_owned()
    }
}

/// Records one provider call made for `tenant`.
pub fn call(
    deployment: &str,
    tenant: &str,
    elapsed: Duration,
    usage: TokenUsage,
    cost_micros: u64,
    error: Option<ErrorClass>,
) {
    let deployment = deployment.to_owned();
    let tenant = tenant_label(tenant);
    let outcome = if error.is_some() { "error" } else { "ok" };
    counter!(REQUESTS, "deployment" => deployment.clone(), "tenant" => tenant.clone(), "outcome" => outcome)
        .increment(1);
    histogram!(REQUEST_SECONDS, "deployment" => deployment.clone(), "tenant" => tenant.clone())
        .record(elapsed.as_secs_f64());
    for (direction, tokens) in [("prompt", usage.prompt), ("completion", usage.completion)] {
        counter!(TOKENS, "deployment" => deployment.clone(), "tenant" => tenant.clone(), "direction" => direction)
            .increment(tokens);
    }
    counter!(COST_MICRO_USD, "deployment" => deployment.clone(), "tenant" => tenant)
        .increment(cost_micros);
    if let Some(class) = error {
        counter!(ERRORS, "deployment" => deployment, "class" => class.as_str()).increment(1);
    }
}

/// Counts a request refused before any deployment was chosen (its tenant is not known then:
/// the label is `-`, so every series of the counter has the same labels).
pub fn rejected() {
    counter!(REQUESTS, "deployment" => UNROUTED, "tenant" => tenant_label(""), "outcome" => "rejected")
        .increment(1);
}
