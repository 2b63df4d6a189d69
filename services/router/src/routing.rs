//! Deployments and the choice of the ones to try for a request: the hard rules first (privacy,
//! capabilities, context window), then price, then observed latency and load.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;

use crate::config::{Capability, Config, DeploymentConfig, Privacy, ProviderKind, Tier};
use crate::error::{Error, ProviderError};
use crate::provider::{self, ChatRequest, ChatResponse, ChatStream, Provider, TokenUsage};
use crate::resilience::ResilienceConfig;
use crate::resilience::breaker::Breaker;
use crate::resilience::limits::Limiter;

/// A named model on a provider, with its price, window, capabilities and time bound.
#[derive(Debug)]
pub struct Deployment {
    pub name: String,
    pub provider_kind: ProviderKind,
    pub model: String,
    pub tier: Tier,
    pub timeout: Duration,
    /// How long a stream may take to produce its first event.
    pub first_token_timeout: Duration,
    pub context_window: u32,
    pub max_output_tokens: u32,
    pub capabilities: HashSet<Capability>,
    pub privacy: Privacy,
    pub fallbacks: Vec<String>,
    input_price_per_mtok: f64,
    output_price_per_mtok: f64,
    provider: Arc<dyn Provider>,
    stats: Stats,
    /// The deployment's rate limits and their wait queue.
    pub limiter: Limiter,
    pub breaker: Arc<Breaker>,
}

/// What latency-aware balancing reads: an exponentially weighted mean of successful call
/// times and the calls in flight.
#[derive(Debug, Default)]
struct Stats {
    latency_ewma_micros: AtomicU64,
    in_flight: AtomicUsize,
}

/// Weight of the newest sample in the latency mean: about the last ten calls count.
const EWMA_WEIGHT: f64 = 0.2;

impl Deployment {
    /// A deployment with the default queue and breaker settings.
    pub fn new(config: &DeploymentConfig, provider: Arc<dyn Provider>) -> Self {
        Self::with_resilience(config, provider, &ResilienceConfig::default())
    }

    pub fn with_resilience(
        config: &DeploymentConfig,
        provider: Arc<dyn Provider>,
        resilience: &ResilienceConfig,
    ) -> Self {
        Self {
            limiter: Limiter::new(&config.name, &config.limits, &resilience.queue),
            breaker: Arc::new(Breaker::new(&config.name, &resilience.breaker)),
            name: config.name.clone(),
            provider_kind: config.provider,
            model: config.model.clone(),
            tier: config.tier,
            timeout: config.timeout,
            first_token_timeout: config.first_token_timeout.unwrap_or(config.timeout),
            context_window: config.context_window,
            max_output_tokens: config.max_output_tokens,
            capabilities: config.capabilities.iter().copied().collect(),
            privacy: config.privacy_class(),
            fallbacks: config.fallbacks.clone(),
            input_price_per_mtok: config.input_price_per_mtok,
            output_price_per_mtok: config.output_price_per_mtok,
            provider,
            stats: Stats::default(),
        }
    }

    /// Calls the provider, bounded by the deployment's timeout.
    pub async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let _in_flight = InFlight::new(&self.stats);
        tokio::time::timeout(self.timeout, self.provider.complete(request))
            .await
            .unwrap_or(Err(ProviderError::Timeout(self.timeout)))
    }

    /// Opens a stream; the caller bounds the wait for its first event.
    pub async fn stream(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        self.provider.stream(request).await
    }

    /// Cost in micro-USD, rounded. A price in USD per million tokens is a price in micro-USD
    /// per token, so the cost is simply tokens × price.
    pub fn cost_micros(&self, usage: TokenUsage) -> u64 {
        let cost = usage.prompt as f64 * self.input_price_per_mtok
            + usage.completion as f64 * self.output_price_per_mtok;
        // `as` saturates; prices are validated finite and non-negative.
        cost.round() as u64
    }

    /// Price of a million prompt plus a million completion tokens, for ordering by price.
    fn price(&self) -> f64 {
        self.input_price_per_mtok + self.output_price_per_mtok
    }

    /// Completion tokens a call may produce here: the request's `max_tokens` or the
    /// deployment's default, never beyond what the window leaves after the prompt.
    pub fn output_budget(&self, prompt_tokens: u64, max_tokens: Option<u32>) -> u32 {
        let left = u64::from(self.context_window).saturating_sub(prompt_tokens);
        let wanted = max_tokens.unwrap_or(self.max_output_tokens);
        u32::try_from(left.min(u64::from(wanted))).unwrap_or(wanted)
    }

    /// Feeds a successful call's time into the latency mean.
    pub fn observe_latency(&self, latency: Duration) {
        let sample = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // A lost update under contention only drops one sample: good enough for a mean.
        let old = self.stats.latency_ewma_micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old as f64 * (1.0 - EWMA_WEIGHT) + sample as f64 * EWMA_WEIGHT) as u64
        };
        self.stats.latency_ewma_micros.store(new, Ordering::Relaxed);
    }

    /// Lower is better: the mean latency scaled by the calls already waiting on it, so equal
    /// deployments share the load and a slow one gets less of it. Unmeasured deployments score
    /// as fast, so each is tried.
    fn load_score(&self) -> f64 {
        let latency = self
            .stats
            .latency_ewma_micros
            .load(Ordering::Relaxed)
            .max(1) as f64;
        latency * (1 + self.stats.in_flight.load(Ordering::Relaxed)) as f64
    }

    /// Why this deployment cannot take `needs`, if it cannot.
    fn unfit(&self, needs: &Needs) -> Option<Unfit> {
        if needs.local_only && self.privacy != Privacy::Local {
            return Some(Unfit::Privacy);
        }
        if let Some(missing) = needs
            .capabilities
            .iter()
            .find(|c| !self.capabilities.contains(c))
        {
            return Some(Unfit::Capability(*missing));
        }
        let needed = needs.prompt_tokens + u64::from(needs.max_tokens.unwrap_or(1));
        if needed > u64::from(self.context_window) {
            return Some(Unfit::Window(self.context_window));
        }
        None
    }
}

/// Counts a call in flight for as long as it lives.
struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn new(stats: &'a Stats) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request needs from a deployment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Needs {
    pub capabilities: Vec<Capability>,
    pub local_only: bool,
    /// The prompt's size, estimated (see [`estimate_prompt_tokens`]).
    pub prompt_tokens: u64,
    pub max_tokens: Option<u32>,
}

impl Needs {
    /// The needs of `request`: tools and JSON mode need those capabilities.
    pub fn of(request: &ChatRequest, local_only: bool) -> Self {
        let mut capabilities = Vec::new();
        if !request.tools.is_empty() {
            capabilities.push(Capability::Tools);
        }
        if request.json_mode {
            capabilities.push(Capability::Json);
        }
        Self {
            capabilities,
            local_only,
            prompt_tokens: estimate_prompt_tokens(request),
            max_tokens: request.max_tokens,
        }
    }
}

/// A deliberately high estimate of a prompt's tokens, for the context-window rule and budget
/// reservations before the provider has counted: one token per three bytes of text (English
/// runs about four per token, code and other scripts fewer) plus four per message for the
/// role markup. Overestimating only sends a borderline prompt to a larger window; the real
/// count is settled after the call.
pub fn estimate_prompt_tokens(request: &ChatRequest) -> u64 {
    let bytes = |text: &str| text.len() as u64;
    let messages: u64 = request
        .messages
        .iter()
        .map(|m| {
            bytes(&m.content)
                + m.tool_calls
                    .iter()
                    .map(|c| bytes(&c.name) + bytes(&c.arguments))
                    .sum::<u64>()
        })
        .sum();
    let tools: u64 = request
        .tools
        .iter()
        .map(|t| bytes(&t.name) + bytes(&t.description) + bytes(&t.parameters.to_string()))
        .sum();
    (messages + tools).div_ceil(3) + 4 * request.messages.len() as u64
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Unfit {
    Privacy,
    Capability(Capability),
    Window(u32),
}

impl Unfit {
    fn describe(self, name: &str, needs: &Needs) -> String {
        match self {
            Unfit::Privacy => format!("{name} is external and the request is local-only"),
            Unfit::Capability(capability) => format!(
                "{name} lacks the {} capability",
                serde_json::to_value(capability)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
            Unfit::Window(window) => format!(
                "{name}'s window of {window} tokens is smaller than the prompt (about {} tokens) \
                 plus {} for the answer",
                needs.prompt_tokens,
                needs.max_tokens.unwrap_or(1)
            ),
        }
    }
}

/// A deployment to try and why it is in the plan.
#[derive(Debug)]
pub struct Candidate {
    pub deployment: Arc<Deployment>,
    pub reason: String,
}

/// Every configured deployment, in config order.
#[derive(Debug)]
pub struct Deployments {
    all: Vec<Arc<Deployment>>,
    default: usize,
}

impl Deployments {
    pub fn new(all: Vec<Deployment>, default: &str) -> anyhow::Result<Self> {
        let default = all
            .iter()
            .position(|d| d.name == default)
            .with_context(|| format!("default_deployment {default:?} is not configured"))?;
        Ok(Self {
            all: all.into_iter().map(Arc::new).collect(),
            default,
        })
    }

    /// Builds every deployment's provider. With `pool`, the rate limits are shared with every
    /// replica using the same database (see [`Limiter::shared`]); without, they are this
    /// process's alone.
    pub fn from_config(config: &Config, pool: Option<&PgPool>) -> anyhow::Result<Self> {
        let all = config
            .deployments
            .iter()
            .map(|d| {
                let mut deployment =
                    Deployment::with_resilience(d, provider::build(d)?, &config.resilience);
                if let Some(pool) = pool {
                    deployment.limiter = Limiter::shared(
                        &d.name,
                        &d.limits,
                        &config.resilience.queue,
                        &config.resilience.shared_limits,
                        pool.clone(),
                    );
                }
                Ok(deployment)
            })
            .collect::<anyhow::Result<_>>()?;
        Self::new(all, &config.default_deployment)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.all.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Deployment>> {
        self.all.iter().find(|d| d.name == name)
    }

    fn names(&self) -> String {
        self.all
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The deployments to try, in order, each with the reason it is there:
    ///
    /// 1. `name` set: that deployment, then its configured fallbacks.
    /// 2. `tier` set: that tier's deployments, cheapest first, equal prices ordered by
    ///    observed latency × calls in flight (so deployments of one model share the load);
    ///    then the first one's configured fallbacks. When no deployment of the tier can take
    ///    the request (window, capability, privacy), the cheapest deployments of other tiers
    ///    that can.
    /// 3. Neither: the default deployment and its fallbacks, then as for its tier.
    ///
    /// Deployments that cannot take the request are left out; when none is left, the error
    /// says why each was refused (user-fixable: a smaller prompt, other capabilities).
    pub fn plan(
        &self,
        name: &str,
        tier: Option<Tier>,
        needs: &Needs,
    ) -> Result<Vec<Candidate>, Error> {
        let mut plan: Vec<Candidate> = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        let mut add = |plan: &mut Vec<Candidate>, deployment: &Arc<Deployment>, reason: String| {
            if plan.iter().any(|c| c.deployment.name == deployment.name) {
                return;
            }
            match deployment.unfit(needs) {
                Some(unfit) => {
                    let why = unfit.describe(&deployment.name, needs);
                    if !refused.contains(&why) {
                        refused.push(why);
                    }
                }
                None => plan.push(Candidate {
                    deployment: deployment.clone(),
                    reason,
                }),
            }
        };
        let primary = if !name.is_empty() {
            let Some(deployment) = self.get(name) else {
                return Err(Error::InvalidRequest(format!(
                    "unknown deployment {name:?} (configured: {})",
                    self.names()
                )));
            };
            add(&mut plan, deployment, "requested by name".into());
            Some(deployment)
        } else if tier.is_none() {
            let deployment = &self.all[self.default];
            add(&mut plan, deployment, "default deployment".into());
            Some(deployment)
        } else {
            None
        };
        let tier = tier.or(primary.map(|d| d.tier));
        if let Some(primary) = primary {
            for fallback in primary.fallbacks.iter().filter_map(|f| self.get(f)) {
                add(
                    &mut plan,
                    fallback,
                    format!("fallback configured for {}", primary.name),
                );
            }
        }
        // By name, only the deployment and its chain: the caller chose.
        if name.is_empty()
            && let Some(tier) = tier
        {
            let before = plan.len();
            for deployment in self.by_price(|d| d.tier == tier) {
                let reason = if plan.is_empty() {
                    format!("cheapest capable deployment of tier {}", tier.as_str())
                } else {
                    format!("another deployment of tier {}", tier.as_str())
                };
                add(&mut plan, deployment, reason);
                if plan.len() == before + 1
                    && let Some(first) = plan.last().map(|c| c.deployment.clone())
                {
                    for fallback in first.fallbacks.iter().filter_map(|f| self.get(f)) {
                        add(
                            &mut plan,
                            fallback,
                            format!("fallback configured for {}", first.name),
                        );
                    }
                }
            }
            if plan.is_empty() {
                for deployment in self.by_price(|d| d.tier != tier) {
                    let reason = format!(
                        "no deployment of tier {} can take the request; cheapest capable of \
                         tier {}",
                        tier.as_str(),
                        deployment.tier.as_str()
                    );
                    add(&mut plan, deployment, reason);
                }
            }
        }
        if plan.is_empty() {
            return Err(no_deployment(needs, &refused));
        }
        Ok(plan)
    }

    /// Deployments matching `filter`, cheapest first, then by load score.
    fn by_price(&self, filter: impl Fn(&Deployment) -> bool) -> Vec<&Arc<Deployment>> {
        let mut chosen: Vec<&Arc<Deployment>> = self.all.iter().filter(|d| filter(d)).collect();
        chosen.sort_by(|a, b| {
            a.price()
                .total_cmp(&b.price())
                .then(a.load_score().total_cmp(&b.load_score()))
        });
        chosen
    }
}

/// The error for a request no deployment can take: a context problem is the user's to fix
/// like the others, and says so in the provider's terms so OpenAI clients recognise it.
fn no_deployment(needs: &Needs, refused: &[String]) -> Error {
    let reasons = refused.join("; ");
    let window_only = refused.iter().all(|r| r.contains("window of"));
    if window_only && !refused.is_empty() {
        return Error::Provider {
            deployment: "none".into(),
            source: ProviderError::ContextTooLong(format!(
                "no deployment's context window fits about {} prompt tokens plus {} for the \
                 answer: shorten the prompt or lower max_tokens ({reasons})",
                needs.prompt_tokens,
                needs.max_tokens.unwrap_or(1)
            )),
        };
    }
    Error::Unroutable(format!("no deployment can take this request: {reasons}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ScriptRule;
    use crate::provider::{ChatMessage, Role, ToolSpec};

    fn config(name: &str, tier: Tier, price: f64) -> DeploymentConfig {
        DeploymentConfig {
            tier,
            input_price_per_mtok: price,
            output_price_per_mtok: price * 4.0,
            script: vec![ScriptRule {
                contains: None,
                reply: "ok".into(),
                delay: Duration::ZERO,
                fail: None,
                ..ScriptRule::default()
            }],
            ..DeploymentConfig::new(name, ProviderKind::Scripted, "m")
        }
    }

    fn build(configs: Vec<DeploymentConfig>, default: &str) -> Deployments {
        let all = configs
            .iter()
            .map(|config| Deployment::new(config, provider::build(config).unwrap()))
            .collect();
        Deployments::new(all, default).unwrap()
    }

    fn deployments() -> Deployments {
        build(
            vec![
                config("cheap", Tier::Budget, 0.1),
                config("mid-a", Tier::Mid, 0.5),
                config("mid-b", Tier::Mid, 0.3),
            ],
            "mid-a",
        )
    }

    fn plan(
        deployments: &Deployments,
        name: &str,
        tier: Option<Tier>,
        needs: &Needs,
    ) -> Vec<(String, String)> {
        deployments
            .plan(name, tier, needs)
            .unwrap()
            .into_iter()
            .map(|c| (c.deployment.name.clone(), c.reason))
            .collect()
    }

    fn first(name: &str, tier: Option<Tier>) -> (String, String) {
        plan(&deployments(), name, tier, &Needs::default())
            .into_iter()
            .next()
            .unwrap()
    }

    #[test]
    fn name_then_cheapest_of_tier_then_default() {
        assert_eq!(
            first("cheap", Some(Tier::Mid)),
            ("cheap".into(), "requested by name".into())
        );
        assert_eq!(
            first("", Some(Tier::Mid)),
            (
                "mid-b".into(),
                "cheapest capable deployment of tier mid".into()
            )
        );
        assert_eq!(
            first("", None),
            ("mid-a".into(), "default deployment".into())
        );
        // A tier with no deployment escalates to the cheapest that can take it.
        let (name, reason) = first("", Some(Tier::Frontier));
        assert_eq!(name, "cheap");
        assert!(
            reason.contains("no deployment of tier frontier"),
            "{reason}"
        );
    }

    #[test]
    fn tier_plans_list_the_other_deployments_of_the_tier_as_fallbacks() {
        let names: Vec<String> = plan(&deployments(), "", Some(Tier::Mid), &Needs::default())
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["mid-b", "mid-a"]);
        // The default brings its tier's others after it.
        let names: Vec<String> = plan(&deployments(), "", None, &Needs::default())
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["mid-a", "mid-b"]);
    }

    #[test]
    fn configured_fallbacks_follow_their_deployment() {
        let mut primary = config("primary", Tier::Frontier, 5.0);
        primary.fallbacks = vec!["cheap".into()];
        let deployments = build(vec![primary, config("cheap", Tier::Budget, 0.1)], "primary");
        assert_eq!(
            plan(&deployments, "primary", None, &Needs::default()),
            [
                ("primary".to_owned(), "requested by name".to_owned()),
                (
                    "cheap".to_owned(),
                    "fallback configured for primary".to_owned()
                )
            ]
        );
    }

    #[test]
    fn equal_deployments_share_the_load_by_latency_and_calls_in_flight() {
        let deployments = build(
            vec![
                config("east", Tier::Mid, 1.0),
                config("west", Tier::Mid, 1.0),
            ],
            "east",
        );
        let first = |d: &Deployments| plan(d, "", Some(Tier::Mid), &Needs::default())[0].0.clone();
        deployments
            .get("east")
            .unwrap()
            .observe_latency(Duration::from_millis(200));
        deployments
            .get("west")
            .unwrap()
            .observe_latency(Duration::from_millis(100));
        assert_eq!(first(&deployments), "west");
        // Two calls waiting on west make it the slower choice.
        let west = deployments.get("west").unwrap();
        let _a = InFlight::new(&west.stats);
        let _b = InFlight::new(&west.stats);
        assert_eq!(first(&deployments), "east");
    }

    #[test]
    fn local_only_requests_never_reach_an_external_deployment() {
        let mut external = config("cloud", Tier::Mid, 0.01);
        external.privacy = Some(Privacy::External);
        let deployments = build(vec![external, config("local", Tier::Mid, 1.0)], "cloud");
        let needs = Needs {
            local_only: true,
            ..Needs::default()
        };
        let names: Vec<String> = plan(&deployments, "", None, &needs)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["local"]);
        let error = deployments.plan("cloud", None, &needs).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cloud is external and the request is local-only"),
            "{error}"
        );
        assert_eq!(error.class(), crate::error::ErrorClass::UserFixable);
    }

    #[test]
    fn capabilities_are_required() {
        let mut tools = config("tools", Tier::Mid, 1.0);
        tools.capabilities = vec![Capability::Tools];
        let deployments = build(vec![config("plain", Tier::Mid, 0.1), tools], "plain");
        let request = ChatRequest {
            messages: vec![ChatMessage::new(Role::User, "hi")],
            tools: vec![ToolSpec {
                name: "search".into(),
                description: String::new(),
                parameters: serde_json::json!({"type": "object"}),
            }],
            ..ChatRequest::default()
        };
        let needs = Needs::of(&request, false);
        assert_eq!(plan(&deployments, "", None, &needs)[0].0, "tools");
        let error = deployments.plan("plain", None, &needs).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("plain lacks the tools capability"),
            "{error}"
        );
    }

    #[test]
    fn a_prompt_too_long_for_the_window_goes_to_a_larger_one_or_fails_clearly() {
        let mut small = config("small", Tier::Budget, 0.1);
        small.context_window = 1000;
        small.max_output_tokens = 100;
        let mut large = config("large", Tier::Frontier, 3.0);
        large.context_window = 100_000;
        let deployments = build(vec![small, large], "small");
        let request = ChatRequest {
            messages: vec![ChatMessage::new(Role::User, "x".repeat(6000))],
            ..ChatRequest::default()
        };
        let needs = Needs::of(&request, false);
        assert_eq!(needs.prompt_tokens, 2000 + 4);
        let chosen = plan(&deployments, "", Some(Tier::Budget), &needs);
        assert_eq!(chosen[0].0, "large");
        assert!(
            chosen[0].1.contains("no deployment of tier budget"),
            "{}",
            chosen[0].1
        );

        let request = ChatRequest {
            messages: vec![ChatMessage::new(Role::User, "x".repeat(600_000))],
            ..ChatRequest::default()
        };
        let error = deployments
            .plan("", None, &Needs::of(&request, false))
            .unwrap_err();
        assert_eq!(error.class(), crate::error::ErrorClass::UserFixable);
        assert!(
            error
                .to_string()
                .contains("no deployment's context window fits about 200004 prompt tokens"),
            "{error}"
        );
    }

    #[test]
    fn unknown_name_is_an_invalid_request() {
        let error = deployments()
            .plan("gpt-9", None, &Needs::default())
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(
            error
                .to_string()
                .contains("unknown deployment \"gpt-9\" (configured: cheap, mid-a, mid-b)"),
            "{error}"
        );
    }

    #[test]
    fn output_budget_is_clipped_to_the_window() {
        let mut small = config("small", Tier::Budget, 0.1);
        small.context_window = 1000;
        small.max_output_tokens = 300;
        let deployments = build(vec![small], "small");
        let d = deployments.get("small").unwrap();
        assert_eq!(d.output_budget(100, None), 300);
        assert_eq!(d.output_budget(100, Some(50)), 50);
        assert_eq!(d.output_budget(900, None), 100);
    }

    #[test]
    fn cost_is_tokens_times_price_per_million_in_micro_usd() {
        let deployment = &deployments().all[0];
        let usage = TokenUsage {
            prompt: 1_000_000,
            completion: 10,
        };
        // $0.1 for a million prompt tokens + 10 × $0.4 / 1e6.
        assert_eq!(deployment.cost_micros(usage), 100_000 + 4);
        assert_eq!(deployment.cost_micros(TokenUsage::default()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_providers_time_out() {
        let mut config = config("slow", Tier::Mid, 1.0);
        config.timeout = Duration::from_secs(1);
        config.script[0].delay = Duration::from_secs(5);
        let deployment = Deployment::new(&config, provider::build(&config).unwrap());
        let request = ChatRequest::default();
        let error = deployment.complete(&request).await.unwrap_err();
        assert_eq!(error, ProviderError::Timeout(Duration::from_secs(1)));
    }
}
