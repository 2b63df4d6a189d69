//! Plans: the DAG of role tasks a planner proposes for a goal, and their validation.
//!
//! A plan arrives as JSON from a model, so everything about it is checked: its shape, that
//! every role is in the roster, that ids are unique and dependencies exist, that it is acyclic,
//! and that it stays within size and depth bounds. Each problem is reported in words a planner
//! can act on when it is asked to repair the plan.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// A task as a planner proposes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedTask {
    /// Short name, unique within the plan, that other tasks depend on.
    pub id: String,
    pub role: String,
    pub instructions: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub tasks: Vec<PlannedTask>,
}

/// Bounds a plan must stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanLimits {
    pub max_tasks: usize,
    /// Longest dependency chain, counted in tasks (a single task has depth 1).
    pub max_depth: usize,
    pub max_instructions_bytes: usize,
    pub max_dependencies: usize,
}

impl Default for PlanLimits {
    fn default() -> Self {
        Self {
            max_tasks: 64,
            max_depth: 8,
            max_instructions_bytes: 16 * 1024,
            max_dependencies: 16,
        }
    }
}

/// Why a plan was refused. `code()` is stable for metrics; `Display` is for the planner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the plan is not valid JSON of the form {{\"tasks\": [{{\"id\", \"role\", \"instructions\", \"depends_on\"}}]}}: {0}"
    )]
    Shape(String),
    #[error("the plan has no tasks")]
    Empty,
    #[error("the plan has {count} tasks; at most {limit} are allowed")]
    TooManyTasks { count: usize, limit: usize },
    #[error("task {index} has an empty id")]
    EmptyId { index: usize },
    #[error("task id {0:?} is used more than once")]
    DuplicateId(String),
    #[error("task {id:?} has role {role:?}, which is not in the roster ({known})")]
    UnknownRole {
        id: String,
        role: String,
        known: String,
    },
    #[error("task {0:?} has empty instructions")]
    EmptyInstructions(String),
    #[error("task {id:?} has {bytes} bytes of instructions; at most {limit} are allowed")]
    InstructionsTooLong {
        id: String,
        bytes: usize,
        limit: usize,
    },
    #[error("task {id:?} depends on {count} tasks; at most {limit} are allowed")]
    TooManyDependencies {
        id: String,
        count: usize,
        limit: usize,
    },
    #[error("task {id:?} depends on {missing:?}, which is not a task of this plan")]
    UnknownDependency { id: String, missing: String },
    #[error("task {0:?} depends on itself")]
    SelfDependency(String),
    #[error("the dependencies form a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("the longest dependency chain has {depth} tasks; at most {limit} are allowed")]
    TooDeep { depth: usize, limit: usize },
}

impl PlanError {
    pub fn code(&self) -> &'static str {
        match self {
            PlanError::Shape(_) => "shape",
            PlanError::Empty => "empty",
            PlanError::TooManyTasks { .. } => "too_many_tasks",
            PlanError::EmptyId { .. } => "empty_id",
            PlanError::DuplicateId(_) => "duplicate_id",
            PlanError::UnknownRole { .. } => "unknown_role",
            PlanError::EmptyInstructions(_) => "empty_instructions",
            PlanError::InstructionsTooLong { .. } => "instructions_too_long",
            PlanError::TooManyDependencies { .. } => "too_many_dependencies",
            PlanError::UnknownDependency { .. } => "unknown_dependency",
            PlanError::SelfDependency(_) => "self_dependency",
            PlanError::Cycle(_) => "cycle",
            PlanError::TooDeep { .. } => "too_deep",
        }
    }
}

/// A plan that passed validation, its tasks in an order where every task comes after its
/// dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPlan {
    pub tasks: Vec<PlannedTask>,
    /// Depth of each task (1 for tasks without dependencies), in `tasks` order.
    pub depths: Vec<usize>,
}

impl ValidPlan {
    pub fn depth(&self) -> usize {
        self.depths.iter().copied().max().unwrap_or(0)
    }
}

/// Parses a planner's answer. Models like to wrap JSON in a Markdown fence; that is tolerated.
pub fn parse(text: &str) -> Result<Plan, PlanError> {
    let trimmed = text.trim();
    let body = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str(body).map_err(|e| PlanError::Shape(e.to_string()))
}

/// Checks `plan` against the roster's `roles` and `limits`. Returns the first problem found,
/// in a fixed order (shape, size, ids, roles, instructions, dependencies, cycles, depth), so the
/// same plan always gets the same answer.
pub fn validate(plan: Plan, roles: &[&str], limits: &PlanLimits) -> Result<ValidPlan, PlanError> {
    if plan.tasks.is_empty() {
        return Err(PlanError::Empty);
    }
    if plan.tasks.len() > limits.max_tasks {
        return Err(PlanError::TooManyTasks {
            count: plan.tasks.len(),
            limit: limits.max_tasks,
        });
    }
    let mut index_of: HashMap<&str, usize> = HashMap::with_capacity(plan.tasks.len());
    for (index, task) in plan.tasks.iter().enumerate() {
        if task.id.trim().is_empty() {
            return Err(PlanError::EmptyId { index });
        }
        if index_of.insert(task.id.as_str(), index).is_some() {
            return Err(PlanError::DuplicateId(task.id.clone()));
        }
    }
    for task in &plan.tasks {
        if !roles.contains(&task.role.as_str()) {
            return Err(PlanError::UnknownRole {
                id: task.id.clone(),
                role: task.role.clone(),
                known: roles.join(", "),
            });
        }
        if task.instructions.trim().is_empty() {
            return Err(PlanError::EmptyInstructions(task.id.clone()));
        }
        if task.instructions.len() > limits.max_instructions_bytes {
            return Err(PlanError::InstructionsTooLong {
                id: task.id.clone(),
                bytes: task.instructions.len(),
                limit: limits.max_instructions_bytes,
            });
        }
        if task.depends_on.len() > limits.max_dependencies {
            return Err(PlanError::TooManyDependencies {
                id: task.id.clone(),
                count: task.depends_on.len(),
                limit: limits.max_dependencies,
            });
        }
        for dependency in &task.depends_on {
            if dependency == &task.id {
                return Err(PlanError::SelfDependency(task.id.clone()));
            }
            if !index_of.contains_key(dependency.as_str()) {
                return Err(PlanError::UnknownDependency {
                    id: task.id.clone(),
                    missing: dependency.clone(),
                });
            }
        }
    }
    let order = topological_order(&plan, &index_of)?;
    let mut depth = vec![0usize; plan.tasks.len()];
    for &index in &order {
        let task = &plan.tasks[index];
        depth[index] = 1 + task
            .depends_on
            .iter()
            .map(|d| depth[index_of[d.as_str()]])
            .max()
            .unwrap_or(0);
    }
    let deepest = depth.iter().copied().max().unwrap_or(0);
    if deepest > limits.max_depth {
        return Err(PlanError::TooDeep {
            depth: deepest,
            limit: limits.max_depth,
        });
    }
    let depths = order.iter().map(|&i| depth[i]).collect();
    let mut tasks: Vec<Option<PlannedTask>> = plan.tasks.into_iter().map(Some).collect();
    let tasks = order.iter().filter_map(|&i| tasks[i].take()).collect();
    Ok(ValidPlan { tasks, depths })
}

/// Kahn's algorithm; stable (ties keep the plan's order). On a cycle, names one.
fn topological_order(
    plan: &Plan,
    index_of: &HashMap<&str, usize>,
) -> Result<Vec<usize>, PlanError> {
    let n = plan.tasks.len();
    let mut waiting_on = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (index, task) in plan.tasks.iter().enumerate() {
        // Repeated dependencies count once.
        let mut unique: Vec<usize> = task
            .depends_on
            .iter()
            .map(|d| index_of[d.as_str()])
            .collect();
        unique.sort_unstable();
        unique.dedup();
        waiting_on[index] = unique.len();
        for dependency in unique {
            dependents[dependency].push(index);
        }
    }
    let mut ready: BTreeMap<usize, ()> = (0..n)
        .filter(|&i| waiting_on[i] == 0)
        .map(|i| (i, ()))
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some((index, ())) = ready.pop_first() {
        order.push(index);
        for &dependent in &dependents[index] {
            waiting_on[dependent] -= 1;
            if waiting_on[dependent] == 0 {
                ready.insert(dependent, ());
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    Err(PlanError::Cycle(find_cycle(plan, index_of, &waiting_on)))
}

/// Follows dependencies among the tasks left waiting until one repeats.
fn find_cycle(plan: &Plan, index_of: &HashMap<&str, usize>, waiting_on: &[usize]) -> Vec<String> {
    let Some(start) = (0..plan.tasks.len()).find(|&i| waiting_on[i] > 0) else {
        return Vec::new();
    };
    let mut path = vec![start];
    let mut current = start;
    while let Some(next) = plan.tasks[current]
        .depends_on
        .iter()
        .map(|d| index_of[d.as_str()])
        .find(|&d| waiting_on[d] > 0)
    {
        if let Some(position) = path.iter().position(|&p| p == next) {
            let mut cycle: Vec<String> = path[position..]
                .iter()
                .map(|&i| plan.tasks[i].id.clone())
                .collect();
            cycle.push(plan.tasks[next].id.clone());
            return cycle;
        }
        path.push(next);
        current = next;
    }
    path.iter().map(|&i| plan.tasks[i].id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ROLES: &[&str] = &["planner", "researcher", "writer", "reviewer"];

    fn task(id: &str, role: &str, deps: &[&str]) -> PlannedTask {
        PlannedTask {
            id: id.into(),
            role: role.into(),
            instructions: format!("do {id}"),
            depends_on: deps.iter().map(|d| (*d).into()).collect(),
        }
    }

    fn check(tasks: Vec<PlannedTask>) -> Result<ValidPlan, PlanError> {
        validate(Plan { tasks }, ROLES, &PlanLimits::default())
    }

    #[test]
    fn a_diamond_is_ordered_and_measured() {
        let plan = check(vec![
            task("write", "writer", &["a", "b"]),
            task("a", "researcher", &["start"]),
            task("b", "researcher", &["start"]),
            task("start", "researcher", &[]),
        ])
        .unwrap();
        let ids: Vec<&str> = plan.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["start", "a", "b", "write"]);
        assert_eq!(plan.depths, [1, 2, 2, 3]);
        assert_eq!(plan.depth(), 3);
    }

    #[test]
    fn each_kind_of_bad_plan_is_named() {
        let cases: Vec<(Vec<PlannedTask>, &str)> = vec![
            (vec![], "empty"),
            (vec![task("", "writer", &[])], "empty_id"),
            (
                vec![task("a", "writer", &[]), task("a", "writer", &[])],
                "duplicate_id",
            ),
            (vec![task("a", "poet", &[])], "unknown_role"),
            (vec![task("a", "writer", &["ghost"])], "unknown_dependency"),
            (vec![task("a", "writer", &["a"])], "self_dependency"),
            (
                vec![
                    task("a", "writer", &["c"]),
                    task("b", "writer", &["a"]),
                    task("c", "writer", &["b"]),
                ],
                "cycle",
            ),
        ];
        for (tasks, code) in cases {
            assert_eq!(check(tasks).unwrap_err().code(), code);
        }
        let mut blank = task("a", "writer", &[]);
        blank.instructions = "  ".into();
        assert_eq!(check(vec![blank]).unwrap_err().code(), "empty_instructions");
    }

    #[test]
    fn a_cycle_is_spelled_out_for_the_planner() {
        let error = check(vec![
            task("start", "researcher", &[]),
            task("a", "writer", &["start", "c"]),
            task("b", "writer", &["a"]),
            task("c", "writer", &["b"]),
        ])
        .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("cycle"), "{text}");
        for id in ["a", "b", "c"] {
            assert!(
                text.contains(&format!("{id:?}")) || text.contains(id),
                "{text}"
            );
        }
        assert!(!text.contains("start ->"), "{text}");
    }

    #[test]
    fn size_and_depth_are_bounded() {
        let limits = PlanLimits {
            max_tasks: 3,
            max_depth: 2,
            ..PlanLimits::default()
        };
        let many = (0..4)
            .map(|i| task(&format!("t{i}"), "writer", &[]))
            .collect();
        assert_eq!(
            validate(Plan { tasks: many }, ROLES, &limits).unwrap_err(),
            PlanError::TooManyTasks { count: 4, limit: 3 }
        );
        let chain = vec![
            task("a", "writer", &[]),
            task("b", "writer", &["a"]),
            task("c", "writer", &["b"]),
        ];
        assert_eq!(
            validate(Plan { tasks: chain }, ROLES, &limits).unwrap_err(),
            PlanError::TooDeep { depth: 3, limit: 2 }
        );
    }

    #[test]
    fn planner_text_is_parsed_with_or_without_a_fence() {
        let json = r#"{"tasks":[{"id":"a","role":"writer","instructions":"x"}]}"#;
        assert_eq!(parse(json).unwrap().tasks.len(), 1);
        assert_eq!(
            parse(&format!("```json\n{json}\n```")).unwrap().tasks.len(),
            1
        );
        assert_eq!(parse("here is my plan").unwrap_err().code(), "shape");
        assert_eq!(
            parse(r#"{"tasks":[{"id":"a","role":"writer","instructions":"x","extra":1}]}"#)
                .unwrap_err()
                .code(),
            "shape"
        );
    }

    /// Random plans whose dependencies point only backwards are acyclic by construction.
    fn acyclic_plan() -> impl Strategy<Value = Vec<PlannedTask>> {
        (1usize..24).prop_flat_map(|n| {
            proptest::collection::vec(
                proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
                n,
            )
            .prop_map(move |deps| {
                deps.iter()
                    .enumerate()
                    .map(|(i, picks)| PlannedTask {
                        id: format!("t{i}"),
                        role: "writer".into(),
                        instructions: "x".into(),
                        depends_on: if i == 0 {
                            Vec::new()
                        } else {
                            picks.iter().map(|p| format!("t{}", p.index(i))).collect()
                        },
                    })
                    .rev()
                    .collect()
            })
        })
    }

    proptest! {
        #[test]
        fn valid_plans_come_out_in_dependency_order(tasks in acyclic_plan()) {
            let limits = PlanLimits { max_depth: 64, ..PlanLimits::default() };
            let plan = validate(Plan { tasks: tasks.clone() }, ROLES, &limits).unwrap();
            prop_assert_eq!(plan.tasks.len(), tasks.len());
            let position: HashMap<&str, usize> =
                plan.tasks.iter().enumerate().map(|(i, t)| (t.id.as_str(), i)).collect();
            for (i, task) in plan.tasks.iter().enumerate() {
                for dependency in &task.depends_on {
                    prop_assert!(position[dependency.as_str()] < i);
                    prop_assert!(plan.depths[position[dependency.as_str()]] < plan.depths[i]);
                }
            }
        }

        #[test]
        fn closing_a_loop_is_always_caught(tasks in acyclic_plan()) {
            prop_assume!(tasks.len() >= 2);
            // The list runs newest first; making the oldest and the newest depend on each other
            // closes a loop whatever else the plan holds.
            let mut tasks = tasks;
            let newest = tasks[0].id.clone();
            let oldest = tasks.len() - 1;
            tasks[oldest].depends_on.push(newest);
            let oldest_id = tasks[oldest].id.clone();
            tasks[0].depends_on.push(oldest_id);
            let limits = PlanLimits { max_depth: 64, ..PlanLimits::default() };
            let error = validate(Plan { tasks }, ROLES, &limits).unwrap_err();
            prop_assert_eq!(error.code(), "cycle");
        }
    }
}
