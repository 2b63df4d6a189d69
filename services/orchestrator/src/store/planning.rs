//! A new run's shape: the topology dial turned for its goal, and its first tasks (the
//! topology's template, a swarm's planner, or the plan the caller gave). One path for runs
//! from the API and from schedules, so both get the dial, the approval gate and the same
//! record of the decision.

use crate::config::FailurePolicy;
use crate::plan::PlannedTask;
use crate::roster::PLANNER;
use crate::topology::{self, Topology};
use crate::{Error, metrics};

use super::{NewDagRun, Store};

/// What a run gets when its request does not say; the default is `runs.*`'s default.
#[derive(Debug, Clone, Default)]
pub struct RunDefaults {
    /// The model tier whose capability profile the dial reads (`runs.tier`; empty: the
    /// roster's default tier).
    pub tier: String,
    /// `runs.failure_policy`.
    pub failure_policy: FailurePolicy,
}

/// The profile the dial reads when the roster has none for the default tier. Validation
/// guarantees one; this keeps a bad deploy serving.
const FALLBACK_PROFILE: topology::ModelProfile = topology::ModelProfile {
    context_window: 8192,
    tokens_per_s: 50.0,
    input_price_per_mtok: 1.0,
    output_price_per_mtok: 2.0,
    quality: 0.7,
};

impl Store {
    /// What runs get when their request does not say.
    pub fn with_run_defaults(mut self, defaults: RunDefaults) -> Self {
        self.run_defaults = std::sync::Arc::new(defaults);
        self
    }

    /// Turns the dial for `goal` (or takes `requested`) and picks the run's first tasks. A
    /// `given` plan is validated against the roster (`Error::InvalidRequest` naming the
    /// problem) and used as it is; the dial's inputs are still recorded.
    pub fn plan_run(
        &self,
        tenant: String,
        goal: String,
        requested: Option<Topology>,
        failure_policy: Option<FailurePolicy>,
        given: Option<Vec<PlannedTask>>,
    ) -> Result<NewDagRun, Error> {
        let roster = self.roster();
        let configured = roster
            .profile(&self.run_defaults.tier)
            .unwrap_or(&FALLBACK_PROFILE);
        // The configured quality, moved toward what the judges have measured.
        let profile = topology::ModelProfile {
            quality: self.quality.of(&self.run_defaults.tier, configured.quality),
            ..configured.clone()
        };
        let mut decision = topology::choose(&goal, &profile, &roster.dial, requested);
        let failure_policy = failure_policy.unwrap_or(self.run_defaults.failure_policy);
        let tasks = match given {
            Some(given) => {
                let count = given.len();
                let plan = roster
                    .check_given_plan(given)
                    .map_err(|error| Error::InvalidRequest(format!("invalid plan: {error}")))?;
                decision.topology = requested.unwrap_or(if count == 1 {
                    Topology::Monolith
                } else {
                    Topology::Hybrid
                });
                decision.overridden = true;
                decision.reason = format!("the request gave its plan ({count} tasks)");
                plan.tasks
            }
            None => match roster.template(decision.topology, &goal) {
                Some(plan) => plan.tasks,
                None => vec![PlannedTask {
                    id: "plan".into(),
                    role: PLANNER.into(),
                    instructions: goal.clone(),
                    depends_on: Vec::new(),
                }],
            },
        };
        Ok(NewDagRun {
            tenant,
            goal,
            decision,
            failure_policy,
            tasks,
            priority: 0,
            budget_micros_usd: None,
        })
    }
}

/// Counts a created run: the run, its topology, and its tasks queued at once.
pub(crate) fn count_created(new: &NewDagRun) {
    ::metrics::counter!(metrics::RUNS, "tenant" => new.tenant.clone(), "status" => "created")
        .increment(1);
    ::metrics::counter!(
        metrics::TOPOLOGIES,
        "topology" => new.decision.topology.as_str(),
        "overridden" => if new.decision.overridden { "true" } else { "false" }
    )
    .increment(1);
    let queued = new.tasks.iter().filter(|t| t.depends_on.is_empty()).count();
    ::metrics::counter!(metrics::TASKS, "tenant" => new.tenant.clone(), "state" => "queued")
        .increment(queued as u64);
}
