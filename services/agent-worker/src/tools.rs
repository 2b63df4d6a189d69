//! The tools an agent may call, OpenAI function-calling style: what each is (name,
//! description, JSON Schema of its arguments) and how a call is carried out.
//!
//! A role may use only the tools its roster entry lists (`TaskSpec.tools`); the model is
//! offered those and a call of any other is refused. Every call has a deadline
//! (`agent.tool_timeout`) and a bounded result (`agent.max_tool_result_bytes`), and every
//! failure — unknown tool, bad arguments, a peer that is down, a command that fails — becomes
//! a tool result the model reads and can react to, never a failed task.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::sandbox::{self, CommandRequest, SandboxConfig, Workspace};
use crate::task::{ChildTask, FoundMemory, MemoryScope, Strategy, TaskSpec, ToolCall, ToolSpec};
use crate::worker::Peers;

pub const MEMORY_SEARCH: &str = "memory_search";
pub const MEMORY_WRITE: &str = "memory_write";
pub const SUGGEST_STRATEGY: &str = "suggest_strategy";
pub const SPAWN_TASKS: &str = "spawn_tasks";
pub const RUN_COMMAND: &str = "run_command";
pub const READ_FILE: &str = "read_file";
pub const WRITE_FILE: &str = "write_file";

/// Every tool a roster may name.
pub const ALL: [&str; 7] = [
    MEMORY_SEARCH,
    MEMORY_WRITE,
    SUGGEST_STRATEGY,
    SPAWN_TASKS,
    RUN_COMMAND,
    READ_FILE,
    WRITE_FILE,
];

/// The tools that work in the task's workspace: offering one creates the workspace.
pub const WORKSPACE_TOOLS: [&str; 3] = [RUN_COMMAND, READ_FILE, WRITE_FILE];

/// Most results `memory_search` and `suggest_strategy` return.
const MAX_RESULTS: u32 = 20;

/// The definition of tool `name` as the model is offered it.
pub fn spec(name: &str) -> Option<ToolSpec> {
    let (name, description, parameters) = match name {
        MEMORY_SEARCH => (
            MEMORY_SEARCH,
            "Search long-term memory (facts shared by the tenant, by your role, and by this \
             run) for what is relevant to a query. Returns the best matches, best first.",
            json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for, in plain words."},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_RESULTS, "description": "Most results (default 5)."}
                },
                "required": ["query"],
                "additionalProperties": false
            }),
        ),
        MEMORY_WRITE => (
            MEMORY_WRITE,
            "Store a fact in long-term memory for later tasks. A near-duplicate of a stored \
             fact is merged into it.",
            json!({
                "type": "object",
                "properties": {
                    "text": {"type": "string", "description": "The fact, self-contained."},
                    "scope": {"type": "string", "enum": ["run", "role", "tenant"], "description": "Who may find it: this run (default), your role, or the whole tenant."},
                    "importance": {"type": "number", "minimum": 0, "maximum": 1, "description": "0 to 1 (default 0.5)."}
                },
                "required": ["text"],
                "additionalProperties": false
            }),
        ),
        SUGGEST_STRATEGY => (
            SUGGEST_STRATEGY,
            "Ask strategy memory for approaches that worked (or failed) on similar tasks of \
             your role, ranked by relevance and win rate.",
            json!({
                "type": "object",
                "properties": {
                    "task": {"type": "string", "description": "What you are trying to do."},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_RESULTS, "description": "Most suggestions (default 3)."}
                },
                "required": ["task"],
                "additionalProperties": false
            }),
        ),
        SPAWN_TASKS => (
            SPAWN_TASKS,
            "Split work into child tasks run by other agents. With wait=true this task pauses \
             until every child finished and then continues with their outputs in its context; \
             end your turn after calling it.",
            json!({
                "type": "object",
                "properties": {
                    "children": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                "key": {"type": "string", "description": "Unique name among the children."},
                                "role": {"type": "string", "description": "The roster role that runs it."},
                                "instructions": {"type": "string"},
                                "depends_on": {"type": "array", "items": {"type": "string"}, "description": "Keys of children that must finish first."}
                            },
                            "required": ["key", "role", "instructions"],
                            "additionalProperties": false
                        }
                    },
                    "wait": {"type": "boolean", "description": "Pause this task until the children finish (default true)."}
                },
                "required": ["children"],
                "additionalProperties": false
            }),
        ),
        RUN_COMMAND => (
            RUN_COMMAND,
            "Run a program in this task's workspace directory and get its exit status, stdout \
             and stderr (long output is shortened to its first, last and error lines). No \
             shell unless you run one (program \"sh\", args [\"-c\", \"...\"]); paths in \
             arguments must stay inside the workspace.",
            json!({
                "type": "object",
                "properties": {
                    "program": {"type": "string", "description": "A program name found on PATH (for example \"ls\", \"python3\", \"sh\"), or a path inside the workspace."},
                    "args": {"type": "array", "items": {"type": "string"}},
                    "cwd": {"type": "string", "description": "Working directory, relative to the workspace (default: the workspace)."},
                    "stdin": {"type": "string", "description": "Text written to the program's standard input."}
                },
                "required": ["program"],
                "additionalProperties": false
            }),
        ),
        READ_FILE => (
            READ_FILE,
            "Read a text file from this task's workspace.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Relative to the workspace."}
                },
                "required": ["path"],
                "additionalProperties": false
            }),
        ),
        WRITE_FILE => (
            WRITE_FILE,
            "Create or replace a text file in this task's workspace (parent directories are \
             created).",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Relative to the workspace."},
                    "content": {"type": "string"}
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
        ),
        _ => return None,
    };
    Some(ToolSpec {
        name,
        description,
        parameters,
    })
}

/// The tools `task`'s role may use and that exist, in the roster's order. A name the worker
/// does not know is skipped with a warning (the roster may be newer than the worker).
pub fn offered(task: &TaskSpec) -> Vec<ToolSpec> {
    task.tools
        .iter()
        .filter_map(|name| {
            let spec = spec(name);
            if spec.is_none() {
                tracing::warn!(tool = %name, role = %task.role, "the roster names a tool this worker does not have");
            }
            spec
        })
        .collect()
}

/// What a tool call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolOutcome {
    /// Text for the model: the result, or what went wrong (`failed`).
    Answer { content: String, failed: bool },
    /// `spawn_tasks` with `wait` parked the task: the attempt ends here without a report.
    Parked { children: usize },
}

impl ToolOutcome {
    fn ok(content: impl Into<String>) -> Self {
        Self::Answer {
            content: content.into(),
            failed: false,
        }
    }

    fn error(content: impl Into<String>) -> Self {
        Self::Answer {
            content: format!("error: {}", content.into()),
            failed: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchArgs {
    query: String,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    text: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    importance: Option<f32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuggestArgs {
    task: String,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteFileArgs {
    path: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnArgs {
    children: Vec<ChildTask>,
    #[serde(default)]
    wait: Option<bool>,
}

/// Found memories as the model reads them, best first.
pub fn list_memories(found: &[FoundMemory]) -> String {
    found
        .iter()
        .enumerate()
        .map(|(n, memory)| {
            format!(
                "{}. [id {}, score {:.2}] {}",
                n + 1,
                memory.id,
                memory.score,
                memory.text
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Strategies as the model reads them.
pub fn list_strategies(found: &[Strategy]) -> String {
    found
        .iter()
        .map(|strategy| {
            format!(
                "- {} (id {}, {} wins, {} losses)\n  when: {}\n  how: {}",
                strategy.title,
                strategy.id,
                strategy.wins,
                strategy.losses,
                strategy.when_to_use,
                strategy.strategy
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Adds the strategies given to the agent to `suggested`, once each: the verdict on its answer
/// scores them.
pub fn note_suggested(suggested: &std::sync::Mutex<Vec<i64>>, found: &[Strategy]) {
    let mut suggested = suggested
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for strategy in found {
        if !suggested.contains(&strategy.id) {
            suggested.push(strategy.id);
        }
    }
}

/// Carries out the tool calls of one attempt.
pub struct Toolbox<'a, P> {
    pub peers: &'a P,
    pub task: &'a TaskSpec,
    pub worker_id: &'a str,
    pub config: &'a AgentConfig,
    pub sandbox: &'a SandboxConfig,
    /// The task's workspace, when the role may use a workspace tool; or why it could not be
    /// made (every workspace tool then answers with that).
    pub workspace: Option<&'a Result<Workspace, sandbox::Error>>,
    /// Ids of the strategies `suggest_strategy` gave the agent: their outcome is recorded once
    /// the answer is judged.
    pub suggested: &'a std::sync::Mutex<Vec<i64>>,
    /// Cancelled when the attempt must stop: running commands are killed.
    pub cancel: &'a CancellationToken,
}

impl<P: Peers> Toolbox<'_, P> {
    /// Runs `call` within the tool deadline; its result is bounded to
    /// `max_tool_result_bytes`.
    pub async fn call(&self, call: &ToolCall) -> ToolOutcome {
        let started = std::time::Instant::now();
        let outcome = if !self.task.tools.contains(&call.name) {
            let mut allowed = self.task.tools.clone();
            allowed.sort();
            ToolOutcome::error(format!(
                "tool {:?} is not available to role {:?}; available: {}",
                call.name,
                self.task.role,
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            ))
        } else {
            match tokio::time::timeout(self.config.tool_timeout, self.dispatch(call)).await {
                Ok(outcome) => outcome,
                Err(_) => ToolOutcome::error(format!(
                    "{} did not finish within {:?} and was stopped",
                    call.name, self.config.tool_timeout
                )),
            }
        };
        let result = match &outcome {
            ToolOutcome::Answer { failed: true, .. } => "error",
            _ => "ok",
        };
        // Only names the worker knows become labels; anything else the model made up is "other".
        let tool = ALL
            .iter()
            .find(|name| **name == call.name)
            .copied()
            .unwrap_or("other");
        ::metrics::counter!(crate::metrics::TOOL_CALLS, "tool" => tool, "result" => result)
            .increment(1);
        ::metrics::histogram!(crate::metrics::TOOL_SECONDS, "tool" => tool)
            .record(started.elapsed().as_secs_f64());
        match outcome {
            ToolOutcome::Answer { content, failed } => ToolOutcome::Answer {
                content: bounded(content, self.config.max_tool_result_bytes),
                failed,
            },
            parked => parked,
        }
    }

    async fn dispatch(&self, call: &ToolCall) -> ToolOutcome {
        match call.name.as_str() {
            MEMORY_SEARCH => match arguments::<SearchArgs>(call) {
                Ok(args) => self.memory_search(args).await,
                Err(error) => error,
            },
            MEMORY_WRITE => match arguments::<WriteArgs>(call) {
                Ok(args) => self.memory_write(args).await,
                Err(error) => error,
            },
            SUGGEST_STRATEGY => match arguments::<SuggestArgs>(call) {
                Ok(args) => self.suggest_strategy(args).await,
                Err(error) => error,
            },
            SPAWN_TASKS => match arguments::<SpawnArgs>(call) {
                Ok(args) => self.spawn_tasks(args).await,
                Err(error) => error,
            },
            RUN_COMMAND => match (arguments::<CommandRequest>(call), self.workspace()) {
                (Ok(request), Ok(workspace)) => {
                    match sandbox::run(workspace, &request, self.sandbox, self.cancel).await {
                        Ok(output) => ToolOutcome::Answer {
                            content: output.render(),
                            failed: !output.success(),
                        },
                        Err(error) => ToolOutcome::error(error.to_string()),
                    }
                }
                (Err(error), _) | (_, Err(error)) => error,
            },
            READ_FILE => match (arguments::<ReadArgs>(call), self.workspace()) {
                (Ok(args), Ok(workspace)) => {
                    match workspace.read_file(&args.path, self.sandbox.max_file_bytes) {
                        Ok(file) if file.truncated => ToolOutcome::ok(format!(
                            "{}\n… [the file has {} bytes; only the first {} were read]",
                            file.text, file.total_bytes, self.sandbox.max_file_bytes
                        )),
                        Ok(file) => ToolOutcome::ok(file.text),
                        Err(error) => ToolOutcome::error(error.to_string()),
                    }
                }
                (Err(error), _) | (_, Err(error)) => error,
            },
            WRITE_FILE => match (arguments::<WriteFileArgs>(call), self.workspace()) {
                (Ok(args), Ok(workspace)) => {
                    let bytes = args.content.len();
                    match workspace.write_file(
                        &args.path,
                        args.content.as_bytes(),
                        self.sandbox.max_file_bytes,
                    ) {
                        Ok(()) => ToolOutcome::ok(format!("wrote {bytes} bytes to {}", args.path)),
                        Err(error) => ToolOutcome::error(error.to_string()),
                    }
                }
                (Err(error), _) | (_, Err(error)) => error,
            },
            other => ToolOutcome::error(format!("this worker has no tool {other:?}")),
        }
    }

    /// The workspace, or the error result saying why there is none.
    fn workspace(&self) -> Result<&Workspace, ToolOutcome> {
        match self.workspace {
            Some(Ok(workspace)) => Ok(workspace),
            Some(Err(error)) => Err(ToolOutcome::error(format!(
                "the task's workspace could not be made: {error}"
            ))),
            None => Err(ToolOutcome::error("this task has no workspace")),
        }
    }

    async fn memory_search(&self, args: SearchArgs) -> ToolOutcome {
        if args.query.trim().is_empty() {
            return ToolOutcome::error("query is empty");
        }
        let limit = args.limit.unwrap_or(5).clamp(1, MAX_RESULTS);
        match self
            .peers
            .search_memories(self.task, &args.query, limit)
            .await
        {
            Ok(found) if found.is_empty() => ToolOutcome::ok("no memories match"),
            Ok(found) => ToolOutcome::ok(list_memories(&found)),
            Err(error) => ToolOutcome::error(error.to_string()),
        }
    }

    async fn memory_write(&self, args: WriteArgs) -> ToolOutcome {
        let scope_name = args.scope.as_deref().unwrap_or("run");
        let Some(scope) = MemoryScope::parse(scope_name) else {
            return ToolOutcome::error(format!(
                "scope {scope_name:?} is not one of run, role, tenant"
            ));
        };
        match self
            .peers
            .write_memory(self.task, scope, &args.text, args.importance)
            .await
        {
            Ok(written) if written.merged => ToolOutcome::ok(format!(
                "merged into memory {} (a near-duplicate in scope {})",
                written.id,
                scope.as_str()
            )),
            Ok(written) => ToolOutcome::ok(format!(
                "stored as memory {} in scope {}",
                written.id,
                scope.as_str()
            )),
            Err(error) => ToolOutcome::error(error.to_string()),
        }
    }

    async fn suggest_strategy(&self, args: SuggestArgs) -> ToolOutcome {
        let limit = args.limit.unwrap_or(3).clamp(1, MAX_RESULTS);
        match self
            .peers
            .suggest_strategies(self.task, &args.task, limit)
            .await
        {
            Ok(found) if found.is_empty() => {
                ToolOutcome::ok("no strategies are known for tasks like this yet")
            }
            Ok(found) => {
                note_suggested(self.suggested, &found);
                ToolOutcome::ok(list_strategies(&found))
            }
            Err(error) => ToolOutcome::error(error.to_string()),
        }
    }

    async fn spawn_tasks(&self, args: SpawnArgs) -> ToolOutcome {
        if args.children.is_empty() {
            return ToolOutcome::error("children is empty: name at least one child task");
        }
        let wait = args.wait.unwrap_or(true);
        match self
            .peers
            .spawn(self.task, self.worker_id, &args.children, wait)
            .await
        {
            Ok(spawned) if spawned.parked => ToolOutcome::Parked {
                children: spawned.children.len(),
            },
            Ok(spawned) => ToolOutcome::ok(format!(
                "started {} child task(s): {}",
                spawned.children.len(),
                spawned
                    .children
                    .iter()
                    .map(|(key, id)| format!("{key} = {id}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Err(error) => ToolOutcome::error(error.to_string()),
        }
    }
}

/// The call's arguments as `T`, or the error result that tells the model what is wrong.
fn arguments<T: DeserializeOwned>(call: &ToolCall) -> Result<T, ToolOutcome> {
    let text = if call.arguments.trim().is_empty() {
        "{}"
    } else {
        &call.arguments
    };
    serde_json::from_str(text).map_err(|error| {
        ToolOutcome::error(format!(
            "the arguments of {} do not match its schema: {error}",
            call.name
        ))
    })
}

/// `text` cut to at most `max_bytes` (on a character boundary), saying how much was left out.
pub fn bounded(text: String, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n… [{} more bytes cut]", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_an_object_schema() {
        for name in ALL {
            let spec = spec(name).unwrap();
            assert_eq!(spec.name, name);
            assert_eq!(spec.parameters["type"], "object", "{name}");
            assert!(spec.parameters["required"].is_array(), "{name}");
        }
        assert!(spec("rm_rf").is_none());
    }

    #[test]
    fn results_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("short".into(), 10), "short");
        let cut = bounded("ééééé".into(), 3);
        assert_eq!(cut, "é\n… [8 more bytes cut]");
    }
}
