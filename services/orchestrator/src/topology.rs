//! The topology dial: from the model's capability profile and the goal's size, choose how much
//! to decompose a goal — one agent (monolith), a few broad roles (hybrid) or fine
//! decomposition (swarm). The choice and every input it used are recorded on the run.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// One agent does the whole goal; no planning.
    Monolith,
    /// A few broad roles (for example research → write → review).
    Hybrid,
    /// A planner decomposes the goal finely.
    Swarm,
}

impl Topology {
    pub fn as_str(self) -> &'static str {
        match self {
            Topology::Monolith => "monolith",
            Topology::Hybrid => "hybrid",
            Topology::Swarm => "swarm",
        }
    }
}

/// What Colony knows about a model: from configuration, and (quality) from validation outcomes
/// as later versions measure them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelProfile {
    pub context_window: u64,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
    pub input_price_per_mtok: f64,
    pub output_price_per_mtok: f64,
    /// 0..=1: how often its answers are accepted.
    pub quality: f64,
}

/// The dial's thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DialConfig {
    /// Tokens a task's working set grows to per token of goal (context, notes, drafts).
    pub expansion: f64,
    /// A monolith is chosen while the working set fills at most this share of the window…
    pub monolith_max_fill: f64,
    /// …and the model's quality is at least this.
    pub monolith_min_quality: f64,
    /// Beyond this share of the window, decompose finely (swarm); in between, hybrid.
    pub hybrid_max_fill: f64,
}

impl Default for DialConfig {
    fn default() -> Self {
        Self {
            expansion: 20.0,
            monolith_max_fill: 0.25,
            monolith_min_quality: 0.6,
            hybrid_max_fill: 1.0,
        }
    }
}

impl DialConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if !(self.expansion.is_finite() && self.expansion >= 1.0) {
            problems.push("dial.expansion: must be at least 1".into());
        }
        if !(0.0 < self.monolith_max_fill && self.monolith_max_fill <= self.hybrid_max_fill) {
            problems.push(
                "dial.monolith_max_fill: must be above 0 and at most dial.hybrid_max_fill".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.monolith_min_quality) {
            problems.push("dial.monolith_min_quality: must be between 0 and 1".into());
        }
    }
}

/// Everything the dial looked at, kept with the run so the choice can be explained later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DialInputs {
    pub goal_tokens: u64,
    pub working_set_tokens: u64,
    pub context_window: u64,
    pub fill: f64,
    pub quality: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub topology: Topology,
    /// Whether a caller chose it (`override`) or the dial did.
    pub overridden: bool,
    pub reason: String,
    pub inputs: DialInputs,
}

/// Approximate token count: one token per four bytes, at least one. Good enough to size a
/// goal against a context window; not a tokenizer.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

/// Chooses a topology for `goal` on a model with `profile`; `requested` overrides the dial.
pub fn choose(
    goal: &str,
    profile: &ModelProfile,
    dial: &DialConfig,
    requested: Option<Topology>,
) -> Decision {
    let goal_tokens = estimate_tokens(goal);
    let working_set_tokens = (goal_tokens as f64 * dial.expansion).ceil() as u64;
    let fill = working_set_tokens as f64 / profile.context_window.max(1) as f64;
    let inputs = DialInputs {
        goal_tokens,
        working_set_tokens,
        context_window: profile.context_window,
        fill,
        quality: profile.quality,
    };
    if let Some(topology) = requested {
        return Decision {
            topology,
            overridden: true,
            reason: "requested by the run".into(),
            inputs,
        };
    }
    let (topology, reason) = if fill > dial.hybrid_max_fill {
        (
            Topology::Swarm,
            format!(
                "the working set (~{working_set_tokens} tokens) exceeds the context window \
                 ({} tokens): decompose finely",
                profile.context_window
            ),
        )
    } else if fill > dial.monolith_max_fill {
        (
            Topology::Hybrid,
            format!(
                "the working set fills {:.0}% of the context window, more than the {:.0}% one \
                 agent should carry",
                fill * 100.0,
                dial.monolith_max_fill * 100.0
            ),
        )
    } else if profile.quality < dial.monolith_min_quality {
        (
            Topology::Hybrid,
            format!(
                "the goal fits one agent, but the model's quality {:.2} is under {:.2}: \
                 add review roles",
                profile.quality, dial.monolith_min_quality
            ),
        )
    } else {
        (
            Topology::Monolith,
            format!(
                "the working set fills {:.0}% of the context window and the model's quality is \
                 {:.2}: one agent suffices",
                fill * 100.0,
                profile.quality
            ),
        )
    };
    Decision {
        topology,
        overridden: false,
        reason,
        inputs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn profile(context_window: u64, quality: f64) -> ModelProfile {
        ModelProfile {
            context_window,
            tokens_per_s: 50.0,
            input_price_per_mtok: 1.0,
            output_price_per_mtok: 2.0,
            quality,
        }
    }

    #[test]
    fn goal_size_and_quality_turn_the_dial() {
        let dial = DialConfig::default();
        let small = "summarise this paragraph";
        assert_eq!(
            choose(small, &profile(8192, 0.9), &dial, None).topology,
            Topology::Monolith
        );
        assert_eq!(
            choose(small, &profile(8192, 0.3), &dial, None).topology,
            Topology::Hybrid
        );
        let medium = "x".repeat(4 * 200); // 200 tokens → 4,000-token working set
        assert_eq!(
            choose(&medium, &profile(8192, 0.9), &dial, None).topology,
            Topology::Hybrid
        );
        let large = "x".repeat(4 * 2000); // 40,000-token working set
        let decision = choose(&large, &profile(8192, 0.9), &dial, None);
        assert_eq!(decision.topology, Topology::Swarm);
        assert!(
            decision.reason.contains("exceeds the context window"),
            "{}",
            decision.reason
        );
        assert_eq!(decision.inputs.goal_tokens, 2000);
        assert_eq!(decision.inputs.working_set_tokens, 40_000);
    }

    #[test]
    fn a_run_can_override_the_dial() {
        let decision = choose(
            "tiny",
            &profile(8192, 0.9),
            &DialConfig::default(),
            Some(Topology::Swarm),
        );
        assert_eq!(decision.topology, Topology::Swarm);
        assert!(decision.overridden);
    }

    proptest! {
        /// A larger goal never calls for less decomposition.
        #[test]
        fn the_dial_is_monotonic_in_goal_size(a in 1usize..100_000, b in 1usize..100_000, window in 512u64..200_000) {
            let (small, large) = (a.min(b), a.max(b));
            let rank = |t: Topology| match t { Topology::Monolith => 0, Topology::Hybrid => 1, Topology::Swarm => 2 };
            let dial = DialConfig::default();
            let p = profile(window, 0.9);
            let small = choose(&"x".repeat(small), &p, &dial, None).topology;
            let large = choose(&"x".repeat(large), &p, &dial, None).topology;
            prop_assert!(rank(small) <= rank(large));
        }
    }
}
