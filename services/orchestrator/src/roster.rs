//! The agent roster (configuration): roles with their prompt, model tier, tools and
//! concurrency; a capability profile per model tier for the topology dial; the plan bounds; and
//! the template plans a topology starts from (or falls back to when a planner fails).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::{self, PlanLimits, PlannedTask, ValidPlan};
use crate::topology::{DialConfig, ModelProfile, Topology};

/// The role that turns a goal into a plan (swarm runs). It never appears in a plan.
pub const PLANNER: &str = "planner";

/// Placeholder replaced by the run's goal in template instructions.
pub const GOAL_PLACEHOLDER: &str = "{goal}";

/// Key of [`RosterConfig::models`] for the router's default tier (an empty tier).
pub const DEFAULT_TIER: &str = "default";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Role {
    /// System prompt of the role's tasks.
    pub prompt: String,
    /// Model tier asked of the router; empty for `runs.tier`.
    pub tier: String,
    /// Tools the role's agents may call (`memory_search`, `memory_write`, `suggest_strategy`,
    /// `spawn_tasks`, `run_command`, `read_file`, `write_file`); the worker offers the model
    /// these only. Empty: plain completions.
    pub tools: Vec<String>,
    /// The most one task of this role may spend on model calls, in US dollars; the router
    /// refuses a call that would pass it. Unset: no task budget.
    pub task_budget_usd: Option<f64>,
    /// The most tokens (prompt and completion, judges included) one task of the role may use
    /// (an attempt resumed from a checkpoint counts the tokens used before it); the worker
    /// stops before a model call that could pass it. Unset: no token budget.
    pub task_token_budget: Option<u64>,
    /// How the role's answers are checked before they are reported; unset: not checked.
    pub validation: Option<ValidationConfig>,
    /// A tier of `roster.models` with a larger context window: a task whose conversation
    /// would overflow its own tier's window moves there. Empty: older turns are compressed
    /// through memory instead.
    pub escalate_tier: String,
    /// Tasks of this role a worker should run at once (advisory: workers size their slots).
    pub concurrency: u32,
    /// Every task of this role waits for a human's approval before it runs.
    pub requires_approval: bool,
    /// What a worker does with the role's tasks.
    pub kind: RoleKind,
}

/// `roster.roles.<name>.validation`: judges that check the role's answers (LLM as judge with a
/// rubric) and the bounded regeneration when one rejects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// In order: `self` (the role checks its own answer), then reviewer or validator roles of
    /// the roster, each judging with its own prompt and tier.
    pub judges: Vec<String>,
    /// What the judges check the answer against.
    pub rubric: String,
    /// Regenerations with a judge's critique before `on_reject` decides.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u32,
    #[serde(default)]
    pub on_reject: OnReject,
}

fn default_max_rounds() -> u32 {
    2
}

/// What happens to an answer still rejected after `max_rounds` regenerations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnReject {
    /// Reported as succeeded, with the last critique logged and counted as a warning.
    #[default]
    AcceptWithWarning,
    /// The task fails (`user_fixable`) with the last critique.
    Fail,
}

/// The judge name that stands for the task's own role.
pub const SELF_JUDGE: &str = "self";

/// What a worker does with a role's tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleKind {
    /// Prompt, model calls through the router, memory.
    #[default]
    Agent,
    /// No model call and no memory: the task succeeds at once with its instructions as the
    /// output. For steps that only order or join work, and for measuring Colony's overhead.
    Noop,
}

impl Default for Role {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            tier: String::new(),
            tools: Vec::new(),
            task_budget_usd: None,
            task_token_budget: None,
            validation: None,
            escalate_tier: String::new(),
            concurrency: 4,
            requires_approval: false,
            kind: RoleKind::Agent,
        }
    }
}

/// Template plans per topology. Instructions may contain `{goal}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Templates {
    /// One agent, no decomposition.
    pub monolith: Vec<PlannedTask>,
    /// A few broad roles; also what replaces a planner that ran out of repairs.
    pub hybrid: Vec<PlannedTask>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RosterConfig {
    /// Roles by name (`roster.roles.<name>.{prompt, tier, tools, concurrency}`).
    pub roles: BTreeMap<String, Role>,
    /// Capability profile per model tier; `default` stands for the router's default tier.
    pub models: BTreeMap<String, ModelProfile>,
    pub dial: DialConfig,
    pub plan_limits: PlanLimits,
    /// How often an invalid plan is sent back to its planner before the template replaces it.
    pub max_plan_repairs: u32,
    pub templates: Templates,
    /// Dependency outputs up to this many bytes travel inline in a claimed task's context;
    /// larger ones by reference (`GetTaskOutput`).
    pub inline_output_bytes: usize,
}

fn template(id: &str, role: &str, instructions: &str, depends_on: &[&str]) -> PlannedTask {
    PlannedTask {
        id: id.into(),
        role: role.into(),
        instructions: instructions.into(),
        depends_on: depends_on.iter().map(|d| (*d).to_owned()).collect(),
    }
}

fn role(prompt: &str) -> Role {
    Role {
        prompt: prompt.into(),
        ..Role::default()
    }
}

fn profile(
    context_window: u64,
    tokens_per_s: f64,
    input: f64,
    output: f64,
    quality: f64,
) -> ModelProfile {
    ModelProfile {
        context_window,
        tokens_per_s,
        input_price_per_mtok: input,
        output_price_per_mtok: output,
        quality,
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            monolith: vec![template("answer", "generalist", GOAL_PLACEHOLDER, &[])],
            hybrid: vec![
                template(
                    "research",
                    "researcher",
                    "Research what this goal needs: {goal}",
                    &[],
                ),
                template(
                    "write",
                    "writer",
                    "Using the research, achieve this goal: {goal}",
                    &["research"],
                ),
                template(
                    "review",
                    "reviewer",
                    "Review the draft against this goal and answer with the final result: \
                 {goal}",
                    &["write"],
                ),
            ],
        }
    }
}

impl Default for RosterConfig {
    fn default() -> Self {
        let roles = [
            (
                PLANNER,
                role(
                    "You are the planner of Colony. Break the user's goal into a small DAG of \
                     tasks for the roles listed below. Answer with JSON only, exactly of the form \
                     {\"tasks\": [{\"id\": \"short-name\", \"role\": \"<role>\", \"instructions\": \
                     \"what to do\", \"depends_on\": [\"ids of tasks whose output it needs\"]}]}. \
                     Each task's instructions must stand alone: a task sees only its \
                     instructions and the outputs of the tasks it depends on.",
                ),
            ),
            (
                "noop",
                Role {
                    prompt: "Passes its instructions through as its output, with no model \
                             call. Use it only to join or order other tasks."
                        .into(),
                    kind: RoleKind::Noop,
                    ..Role::default()
                },
            ),
            (
                "generalist",
                role(
                    "You are a capable assistant working inside Colony. Complete the user's goal \
                     and answer with the result.",
                ),
            ),
            (
                "researcher",
                role(
                    "You are a researcher working inside Colony. Gather the facts, sources and \
                     considerations the task needs, and answer with concise notes.",
                ),
            ),
            (
                "writer",
                role(
                    "You are a writer working inside Colony. Using the material you are given, \
                     write the result the task asks for.",
                ),
            ),
            (
                "reviewer",
                role(
                    "You are a reviewer working inside Colony. Check the draft you are given \
                     against the task, fix what is wrong, and answer with the final text only.",
                ),
            ),
        ]
        .into_iter()
        .map(|(name, role)| (name.to_owned(), role))
        .collect();
        let models = [
            (DEFAULT_TIER, profile(8192, 50.0, 1.0, 2.0, 0.7)),
            ("budget", profile(8192, 80.0, 0.2, 0.6, 0.5)),
            ("mid", profile(32_768, 50.0, 1.0, 3.0, 0.7)),
            ("frontier", profile(200_000, 30.0, 5.0, 15.0, 0.9)),
        ]
        .into_iter()
        .map(|(name, profile)| (name.to_owned(), profile))
        .collect();
        Self {
            roles,
            models,
            dial: DialConfig::default(),
            plan_limits: PlanLimits::default(),
            max_plan_repairs: 2,
            templates: Templates::default(),
            inline_output_bytes: 16 * 1024,
        }
    }
}

impl RosterConfig {
    /// Roles a plan may use: every role but the planner, sorted.
    pub fn plan_roles(&self) -> Vec<&str> {
        self.roles
            .keys()
            .map(String::as_str)
            .filter(|name| *name != PLANNER)
            .collect()
    }

    /// The capability profile the dial uses for `tier` (empty: the router's default tier).
    pub fn profile(&self, tier: &str) -> Option<&ModelProfile> {
        let key = if tier.is_empty() { DEFAULT_TIER } else { tier };
        self.models.get(key)
    }

    /// Validates a plan a caller gave with its run, like a planner's.
    pub fn check_given_plan(&self, tasks: Vec<PlannedTask>) -> Result<ValidPlan, plan::PlanError> {
        plan::validate(plan::Plan { tasks }, &self.plan_roles(), &self.plan_limits)
    }

    /// Validates a planner's answer against the roster.
    pub fn check_plan(&self, answer: &str) -> Result<ValidPlan, plan::PlanError> {
        plan::validate(plan::parse(answer)?, &self.plan_roles(), &self.plan_limits)
    }

    /// The template of `topology` for `goal`, validated; `None` for swarm (its planner plans).
    pub fn template(&self, topology: Topology, goal: &str) -> Option<ValidPlan> {
        let tasks = match topology {
            Topology::Monolith => &self.templates.monolith,
            Topology::Hybrid => &self.templates.hybrid,
            Topology::Swarm => return None,
        };
        let tasks = tasks
            .iter()
            .map(|task| PlannedTask {
                instructions: task.instructions.replace(GOAL_PLACEHOLDER, goal),
                ..task.clone()
            })
            .collect();
        // Goal-sized instructions may exceed the plan bound; the template is trusted.
        let limits = PlanLimits {
            max_instructions_bytes: usize::MAX,
            ..self.plan_limits
        };
        plan::validate(plan::Plan { tasks }, &self.plan_roles(), &limits).ok()
    }

    /// What the planner is told besides its prompt: the roles it may use and the bounds.
    pub fn planner_brief(&self) -> String {
        let roles: Vec<String> = self
            .roles
            .iter()
            .filter(|(name, _)| name.as_str() != PLANNER)
            .map(|(name, role)| {
                let first = role.prompt.split('.').next().unwrap_or_default().trim();
                format!("- {name}: {first}")
            })
            .collect();
        format!(
            "Roles you may use:\n{}\nAt most {} tasks, a dependency chain of at most {} tasks, \
             at most {} dependencies per task.",
            roles.join("\n"),
            self.plan_limits.max_tasks,
            self.plan_limits.max_depth,
            self.plan_limits.max_dependencies
        )
    }

    pub fn validate(&self, problems: &mut Vec<String>) {
        for (name, role) in &self.roles {
            if !crate::config::is_name(name) {
                problems.push(format!(
                    "roster.roles: {name:?} must be 1-64 letters, digits, '_' or '-'"
                ));
            }
            if role.prompt.trim().is_empty() {
                problems.push(format!("roster.roles.{name}.prompt: must not be empty"));
            }
            if role.task_token_budget == Some(0) {
                problems.push(format!(
                    "roster.roles.{name}.task_token_budget: must be at least 1 (leave it out for \
                     no budget)"
                ));
            }
            if let Some(budget) = role.task_budget_usd
                && !(budget.is_finite() && budget >= 0.0)
            {
                problems.push(format!(
                    "roster.roles.{name}.task_budget_usd: must be a number >= 0, not {budget}"
                ));
            }
            if let Some(validation) = &role.validation {
                if validation.judges.is_empty() {
                    problems.push(format!(
                        "roster.roles.{name}.validation.judges: name at least one judge \
                         (\"{SELF_JUDGE}\" or a role)"
                    ));
                }
                for judge in &validation.judges {
                    if judge != SELF_JUDGE && !self.roles.contains_key(judge) {
                        problems.push(format!(
                            "roster.roles.{name}.validation.judges: {judge:?} is neither \
                             \"{SELF_JUDGE}\" nor a role of the roster"
                        ));
                    }
                }
                if validation.rubric.trim().is_empty() {
                    problems.push(format!(
                        "roster.roles.{name}.validation.rubric: must not be empty"
                    ));
                }
            }
            if !role.escalate_tier.is_empty() {
                match self.models.get(&role.escalate_tier) {
                    None => problems.push(format!(
                        "roster.roles.{name}.escalate_tier: {:?} is not a tier of roster.models",
                        role.escalate_tier
                    )),
                    Some(larger) => {
                        if let Some(own) = self.profile(&role.tier)
                            && larger.context_window <= own.context_window
                        {
                            problems.push(format!(
                                "roster.roles.{name}.escalate_tier: {:?} has a context window of \
                                 {} tokens, not larger than the role's own tier's {}",
                                role.escalate_tier, larger.context_window, own.context_window
                            ));
                        }
                    }
                }
            }
            if role.concurrency == 0 {
                problems.push(format!(
                    "roster.roles.{name}.concurrency: must be at least 1"
                ));
            }
        }
        if !self.roles.contains_key(PLANNER) {
            problems.push(format!("roster.roles: the {PLANNER:?} role is required"));
        }
        for (tier, model) in &self.models {
            if model.context_window == 0 {
                problems.push(format!(
                    "roster.models.{tier}.context_window: must be above 0"
                ));
            }
            if !(0.0..=1.0).contains(&model.quality) {
                problems.push(format!(
                    "roster.models.{tier}.quality: must be between 0 and 1"
                ));
            }
        }
        self.dial.validate(problems);
        if self.plan_limits.max_tasks == 0 || self.plan_limits.max_depth == 0 {
            problems.push("roster.plan_limits: max_tasks and max_depth must be above 0".into());
        }
        for (name, topology) in [
            ("monolith", Topology::Monolith),
            ("hybrid", Topology::Hybrid),
        ] {
            if self.template(topology, "goal").is_none() {
                let detail = plan::validate(
                    plan::Plan {
                        tasks: self.templates_of(topology).to_vec(),
                    },
                    &self.plan_roles(),
                    &PlanLimits {
                        max_instructions_bytes: usize::MAX,
                        ..self.plan_limits
                    },
                )
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
                problems.push(format!(
                    "roster.templates.{name}: not a valid plan for the roster: {detail}"
                ));
            }
        }
        if self.inline_output_bytes == 0 {
            problems.push("roster.inline_output_bytes: must be above 0".into());
        }
    }

    fn templates_of(&self, topology: Topology) -> &[PlannedTask] {
        match topology {
            Topology::Monolith => &self.templates.monolith,
            Topology::Hybrid | Topology::Swarm => &self.templates.hybrid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_roster_is_valid_and_its_templates_are_plans() {
        let roster = RosterConfig::default();
        let mut problems = Vec::new();
        roster.validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let hybrid = roster.template(Topology::Hybrid, "a poem").unwrap();
        let roles: Vec<&str> = hybrid.tasks.iter().map(|t| t.role.as_str()).collect();
        assert_eq!(roles, ["researcher", "writer", "reviewer"]);
        assert!(hybrid.tasks[0].instructions.ends_with("a poem"));
        let monolith = roster.template(Topology::Monolith, "a poem").unwrap();
        assert_eq!(monolith.tasks[0].instructions, "a poem");
        assert!(roster.template(Topology::Swarm, "a poem").is_none());
        assert!(!roster.plan_roles().contains(&PLANNER));
        let brief = roster.planner_brief();
        for role in ["generalist", "researcher", "writer", "reviewer"] {
            assert!(brief.contains(role), "{brief}");
        }
    }

    #[test]
    fn a_template_with_an_unknown_role_or_a_planner_is_refused() {
        let mut roster = RosterConfig::default();
        roster.templates.hybrid[1].role = "poet".into();
        roster.templates.monolith[0].role = PLANNER.into();
        let mut problems = Vec::new();
        roster.validate(&mut problems);
        let text = problems.join("\n");
        assert!(text.contains("roster.templates.hybrid"), "{text}");
        assert!(text.contains("roster.templates.monolith"), "{text}");
    }

    #[test]
    fn validation_names_known_judges_and_a_rubric() {
        let mut roster = RosterConfig::default();
        let writer = roster.roles.get_mut("writer").unwrap();
        writer.validation = Some(ValidationConfig {
            judges: vec![SELF_JUDGE.into(), "reviewer".into()],
            rubric: "Cites its sources.".into(),
            max_rounds: default_max_rounds(),
            on_reject: OnReject::Fail,
        });
        writer.task_budget_usd = Some(0.5);
        let mut problems = Vec::new();
        roster.validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");

        let writer = roster.roles.get_mut("writer").unwrap();
        writer.validation = Some(ValidationConfig {
            judges: vec!["critic".into()],
            rubric: " ".into(),
            max_rounds: 2,
            on_reject: OnReject::AcceptWithWarning,
        });
        writer.task_budget_usd = Some(f64::NAN);
        writer.task_token_budget = Some(0);
        writer.escalate_tier = "huge".into();
        let reviewer = roster.roles.get_mut("reviewer").unwrap();
        reviewer.tier = "frontier".into();
        reviewer.escalate_tier = "mid".into();
        roster.validate(&mut problems);
        let text = problems.join("\n");
        assert!(
            text.contains(r#"roster.roles.writer.validation.judges: "critic" is neither"#),
            "{text}"
        );
        assert!(
            text.contains("roster.roles.writer.validation.rubric: must not be empty"),
            "{text}"
        );
        assert!(
            text.contains("roster.roles.writer.task_budget_usd: must be a number >= 0"),
            "{text}"
        );
        assert!(
            text.contains("roster.roles.writer.task_token_budget: must be at least 1"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"roster.roles.writer.escalate_tier: "huge" is not a tier of roster.models"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"roster.roles.reviewer.escalate_tier: "mid" has a context window of 32768 tokens, not larger than the role's own tier's 200000"#
            ),
            "{text}"
        );
    }
}
