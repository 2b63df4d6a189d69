//! Deployments and the choice of one for a request.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Config, DeploymentConfig, ProviderKind, Tier};
use crate::error::{Error, ProviderError};
use crate::provider::{self, ChatRequest, ChatResponse, Provider, TokenUsage};

/// A named model on a provider, with its price and time bound.
#[derive(Debug)]
pub struct Deployment {
    pub name: String,
    pub provider_kind: ProviderKind,
    pub model: String,
    pub tier: Tier,
    pub timeout: Duration,
    input_price_per_mtok: f64,
    output_price_per_mtok: f64,
    provider: Arc<dyn Provider>,
}

impl Deployment {
    pub fn new(config: &DeploymentConfig, provider: Arc<dyn Provider>) -> Self {
        Self {
            name: config.name.clone(),
            provider_kind: config.provider,
            model: config.model.clone(),
            tier: config.tier,
            timeout: config.timeout,
            input_price_per_mtok: config.input_price_per_mtok,
            output_price_per_mtok: config.output_price_per_mtok,
            provider,
        }
    }

    /// Calls the provider, bounded by the deployment's timeout.
    pub async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        tokio::time::timeout(self.timeout, self.provider.complete(request))
            .await
            .unwrap_or(Err(ProviderError::Timeout(self.timeout)))
    }

    /// Cost in micro-USD, rounded. A price in USD per million tokens is a price in micro-USD
    /// per token, so the cost is simply tokens × price.
    pub fn cost_micros(&self, usage: TokenUsage) -> u64 {
        let cost = usage.prompt as f64 * self.input_price_per_mtok
            + usage.completion as f64 * self.output_price_per_mtok;
        // `as` saturates; prices are validated finite and non-negative.
        cost.round() as u64
    }
}

/// The deployment chosen for a request and why.
#[derive(Debug)]
pub struct Route<'a> {
    pub deployment: &'a Deployment,
    pub reason: String,
}

/// Every configured deployment, in config order.
#[derive(Debug)]
pub struct Deployments {
    all: Vec<Deployment>,
    default: usize,
}

impl Deployments {
    pub fn new(all: Vec<Deployment>, default: &str) -> anyhow::Result<Self> {
        let default = all
            .iter()
            .position(|d| d.name == default)
            .with_context(|| format!("default_deployment {default:?} is not configured"))?;
        Ok(Self { all, default })
    }

    /// Builds every deployment's provider.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let all = config
            .deployments
            .iter()
            .map(|d| Ok(Deployment::new(d, provider::build(d)?)))
            .collect::<anyhow::Result<_>>()?;
        Self::new(all, &config.default_deployment)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Deployment> {
        self.all.iter()
    }

    /// The named deployment if `name` is set; else the first deployment (in config order) of
    /// `tier`; else the default.
    pub fn route(&self, name: &str, tier: Option<Tier>) -> Result<Route<'_>, Error> {
        let default = &self.all[self.default];
        if !name.is_empty() {
            return match self.all.iter().find(|d| d.name == name) {
                Some(deployment) => Ok(Route {
                    deployment,
                    reason: "requested by name".into(),
                }),
                None => Err(Error::InvalidRequest(format!(
                    "unknown deployment {name:?} (configured: {})",
                    self.all
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            };
        }
        let Some(tier) = tier else {
            return Ok(Route {
                deployment: default,
                reason: "default deployment".into(),
            });
        };
        Ok(match self.all.iter().find(|d| d.tier == tier) {
            Some(deployment) => Route {
                deployment,
                reason: format!("first deployment of tier {}", tier.as_str()),
            },
            None => Route {
                deployment: default,
                reason: format!(
                    "default deployment (none of tier {} configured)",
                    tier.as_str()
                ),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ScriptRule;

    fn config(name: &str, tier: Tier) -> DeploymentConfig {
        DeploymentConfig {
            tier,
            input_price_per_mtok: 0.15,
            output_price_per_mtok: 0.6,
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

    fn deployments() -> Deployments {
        let all = [
            ("cheap", Tier::Budget),
            ("mid-a", Tier::Mid),
            ("mid-b", Tier::Mid),
        ]
        .iter()
        .map(|(name, tier)| {
            let config = config(name, *tier);
            Deployment::new(&config, provider::build(&config).unwrap())
        })
        .collect();
        Deployments::new(all, "mid-b").unwrap()
    }

    fn pick(name: &str, tier: Option<Tier>) -> (String, String) {
        let deployments = deployments();
        let route = deployments.route(name, tier).unwrap();
        (route.deployment.name.clone(), route.reason)
    }

    #[test]
    fn name_then_tier_then_default() {
        assert_eq!(
            pick("cheap", Some(Tier::Mid)),
            ("cheap".into(), "requested by name".into())
        );
        assert_eq!(
            pick("", Some(Tier::Mid)),
            ("mid-a".into(), "first deployment of tier mid".into())
        );
        assert_eq!(
            pick("", None),
            ("mid-b".into(), "default deployment".into())
        );
        assert_eq!(
            pick("", Some(Tier::Frontier)),
            (
                "mid-b".into(),
                "default deployment (none of tier frontier configured)".into()
            )
        );
    }

    #[test]
    fn unknown_name_is_an_invalid_request() {
        let error = deployments().route("gpt-9", None).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(
            error
                .to_string()
                .contains("unknown deployment \"gpt-9\" (configured: cheap, mid-a, mid-b)"),
            "{error}"
        );
    }

    #[test]
    fn cost_is_tokens_times_price_per_million_in_micro_usd() {
        let deployment = &deployments().all[0];
        let usage = TokenUsage {
            prompt: 1_000_000,
            completion: 10,
        };
        // $0.15 for a million prompt tokens + 10 × $0.6 / 1e6.
        assert_eq!(deployment.cost_micros(usage), 150_000 + 6);
        assert_eq!(deployment.cost_micros(TokenUsage::default()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_providers_time_out() {
        let mut config = config("slow", Tier::Mid);
        config.timeout = Duration::from_secs(1);
        config.script[0].delay = Duration::from_secs(5);
        let deployment = Deployment::new(&config, provider::build(&config).unwrap());
        let request = ChatRequest::default();
        let error = deployment.complete(&request).await.unwrap_err();
        assert_eq!(error, ProviderError::Timeout(Duration::from_secs(1)));
    }
}
