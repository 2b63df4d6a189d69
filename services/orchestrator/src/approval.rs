//! The human approval gate and the bounds on spawned tasks: their configuration, and which
//! tasks need approval before they run.
//!
//! A task needs approval when its role says so (`roster.roles.<role>.requires_approval`) or
//! when its estimated spend is above `approvals.spend_threshold_usd`. The estimate is an upper
//! bound of one attempt, from the capability profile of the role's tier (`roster.models`):
//! `prompt_tokens × input price + max_tokens × output price` (prices per million tokens), where
//! `prompt_tokens` estimates the role's prompt plus the task's instructions at four bytes a
//! token and `max_tokens` is `runs.max_tokens`, the most an answer may take. Dependency outputs
//! are not known when the gate is decided and are not counted.

use serde::{Deserialize, Serialize};

use crate::roster::RosterConfig;
use crate::topology::estimate_tokens;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// A task whose estimated spend (USD, see the module docs) is above this waits for
    /// approval; unset: spend never requires approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spend_threshold_usd: Option<f64>,
}

impl ApprovalsConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if let Some(threshold) = self.spend_threshold_usd
            && !(threshold.is_finite() && threshold >= 0.0)
        {
            problems.push("approvals.spend_threshold_usd: must be a number of at least 0".into());
        }
    }
}

/// Bounds on the tasks a running task spawns into its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpawnConfig {
    /// Children one task may spawn, over all its spawn calls.
    pub max_children_per_task: usize,
    /// How deep spawns may nest: a run's planned tasks are at depth 0, their children at 1, a
    /// child's children at 2…
    pub max_depth: u32,
}

impl Default for SpawnConfig {
    fn default() -> Self {
        Self {
            max_children_per_task: 16,
            max_depth: 2,
        }
    }
}

impl SpawnConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if self.max_children_per_task == 0 {
            problems.push("spawn.max_children_per_task: must be at least 1".into());
        }
    }
}

/// Decides which tasks need approval: the roster's role flags and prices, the spend threshold,
/// the answer bound and the default tier.
#[derive(Debug, Clone, Default)]
pub struct ApprovalPolicy {
    pub spend_threshold_usd: Option<f64>,
    /// `runs.max_tokens`.
    pub max_tokens: u32,
    /// `runs.tier`: the tier of roles without one.
    pub default_tier: String,
}

impl ApprovalPolicy {
    /// Estimated spend of one attempt of a `role` task with `instructions`, in USD; `None`
    /// when the role's tier has no capability profile.
    pub fn estimate_usd(
        &self,
        roster: &RosterConfig,
        role: &str,
        instructions: &str,
    ) -> Option<f64> {
        let role = roster.roles.get(role);
        let tier = role
            .map(|r| r.tier.as_str())
            .filter(|tier| !tier.is_empty())
            .unwrap_or(&self.default_tier);
        let profile = roster.profile(tier)?;
        let prompt = role.map(|r| r.prompt.as_str()).unwrap_or_default();
        let prompt_tokens = estimate_tokens(prompt) + estimate_tokens(instructions);
        Some(
            (prompt_tokens as f64 * profile.input_price_per_mtok
                + f64::from(self.max_tokens) * profile.output_price_per_mtok)
                / 1_000_000.0,
        )
    }

    /// Why a `role` task with `instructions` needs approval, or `None` if it does not.
    pub fn reason(&self, roster: &RosterConfig, role: &str, instructions: &str) -> Option<String> {
        if roster.roles.get(role).is_some_and(|r| r.requires_approval) {
            return Some(format!("role {role} requires approval"));
        }
        let threshold = self.spend_threshold_usd?;
        let estimate = self.estimate_usd(roster, role, instructions)?;
        (estimate > threshold).then(|| {
            format!("estimated spend ${estimate:.4} is above the threshold ${threshold:.4}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_flags_and_spend_above_the_threshold_need_approval() {
        let mut roster = RosterConfig::default();
        let policy = ApprovalPolicy {
            spend_threshold_usd: None,
            max_tokens: 1000,
            default_tier: String::new(),
        };
        assert_eq!(policy.reason(&roster, "writer", "short"), None);
        // Default tier: $1 in, $2 out per million tokens; 1000 answer tokens ≈ $0.002.
        let estimate = policy.estimate_usd(&roster, "writer", "short").unwrap();
        assert!(estimate > 0.002 && estimate < 0.0021, "{estimate}");
        let gated = ApprovalPolicy {
            spend_threshold_usd: Some(0.001),
            ..policy.clone()
        };
        assert!(
            gated
                .reason(&roster, "writer", "short")
                .unwrap()
                .contains("above the threshold")
        );
        let lenient = ApprovalPolicy {
            spend_threshold_usd: Some(1.0),
            ..policy.clone()
        };
        assert_eq!(lenient.reason(&roster, "writer", "short"), None);
        roster.roles.get_mut("writer").unwrap().requires_approval = true;
        assert_eq!(
            policy.reason(&roster, "writer", "short").as_deref(),
            Some("role writer requires approval")
        );
    }
}
