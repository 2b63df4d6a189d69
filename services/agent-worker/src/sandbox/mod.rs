//! The sandbox where an agent's tools run: a per-task workspace directory, file reads and
//! writes inside it, and commands run in it with a timeout, bounded output and a scrubbed
//! environment. Every refusal or failure is an [`Error`] whose message the model can act on;
//! nothing here panics on the model's input.
//!
//! # Rules
//!
//! - **Paths stay inside the workspace.** Relative paths start at the workspace (a command's
//!   arguments: at its working directory), `~` is the workspace, absolute paths must lead
//!   into it. Symbolic links are followed as the kernel would; a path whose real location is
//!   outside, or that goes through a link that cannot be followed, is refused
//!   ([`Workspace::resolve`]).
//! - **Commands** ([`run`]): the program is a bare name found on the sandbox's `PATH`, or a
//!   path inside the workspace. The working directory and every argument that looks like a
//!   path (starts with `/`, `./`, `../` or `~`, has a `..` component, or is `name=<such a
//!   path>` / `--opt=<such a path>`) must resolve inside the workspace.
//! - **Environment**: cleared, then only the allow-listed variables of the worker's own
//!   environment, then `env_set`, then `HOME` = the workspace. Secrets in the worker's
//!   environment are never inherited unless someone allow-lists them.
//! - **Process group**: each command leads its own process group. On timeout the whole group
//!   gets SIGTERM, then SIGKILL after `kill_grace`; on cancellation the same, with the grace
//!   capped at 500 ms so a cancelled task's processes are gone within a second. When the
//!   command ends by itself, whatever it left running in its group is SIGKILLed.
//! - **Output**: stdout and stderr are read concurrently, each kept to `max_output_bytes`
//!   while it is read: the first lines, the last lines and error-looking lines from the
//!   middle ([`truncate_output`]).
//! - **Resource limits** (optional) are applied by running the command under util-linux's
//!   `prlimit`; with limits configured and no `prlimit`, commands are refused.
//!
//! # What this is not
//!
//! The workspace rule is a guard rail against mistakes, not an operating-system jail. The
//! argument checks only see the command line: `sh -c "cat /etc/passwd"`, `python3 -c …`, or a
//! script in the workspace can read and write whatever the worker's user can, and glued
//! options (`-o/etc/x`) are not recognised as paths. A link swapped in between a check and its
//! use can slip past (file reads and writes at least refuse a link as the last component).
//! Run the worker as an unprivileged user, in a container, to bound what a command can reach;
//! note that the `max_processes` limit counts every process of that user and does not bind
//! root.

mod capture;
mod command;
mod error;
mod workspace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use capture::{Captured, is_error_line, truncate_output};
pub use command::{CommandOutput, CommandRequest, run};
pub use error::Error;
pub use workspace::{FileContent, Workspace};

/// Smallest `max_output_bytes` accepted: less leaves no room for head, tail and error lines.
pub const MIN_OUTPUT_BYTES: usize = 256;

/// `sandbox.*`: where workspaces live and what a command may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Directory holding one workspace directory per task; created if missing.
    pub root: PathBuf,
    /// Longest a command may run before its process group is stopped.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when a command is stopped (capped at 500 ms when the
    /// task is cancelled).
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
    /// Bytes of each of stdout and stderr kept for the model (plus omission markers).
    pub max_output_bytes: usize,
    /// Largest file a write accepts, and default bound of a read.
    pub max_file_bytes: u64,
    /// Variables a command inherits from the worker's environment, if set there. `HOME` is
    /// always the workspace and may not be listed.
    pub env_allow: Vec<String>,
    /// Variables every command gets, over inherited ones. Not for secrets: the model can print
    /// its environment, and the config is logged at start.
    pub env_set: BTreeMap<String, String>,
    /// Optional resource limits, applied with `prlimit`.
    pub limits: ResourceLimits,
}

/// `sandbox.limits.*`: per-process resource limits (soft and hard), unset by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceLimits {
    /// CPU time per process (`RLIMIT_CPU`): SIGXCPU, then SIGKILL.
    pub cpu_seconds: Option<u64>,
    /// Virtual memory per process (`RLIMIT_AS`): allocations beyond it fail.
    pub address_space_bytes: Option<u64>,
    /// Processes of the worker's user (`RLIMIT_NPROC`), all of them, not only the command's:
    /// forks beyond it fail. Not enforced for root.
    pub max_processes: Option<u64>,
    /// Largest file a process may write (`RLIMIT_FSIZE`): SIGXFSZ, or EFBIG if that is ignored.
    pub file_size_bytes: Option<u64>,
}

impl ResourceLimits {
    /// Whether no limit is set (commands then run without `prlimit`).
    pub fn is_empty(&self) -> bool {
        self.prlimit_args().is_empty()
    }

    /// The `prlimit` options that set these limits.
    fn prlimit_args(&self) -> Vec<String> {
        [
            ("--cpu", self.cpu_seconds),
            ("--as", self.address_space_bytes),
            ("--nproc", self.max_processes),
            ("--fsize", self.file_size_bytes),
        ]
        .into_iter()
        .filter_map(|(option, value)| value.map(|value| format!("{option}={value}")))
        .collect()
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            root: std::env::temp_dir().join("colony-workspaces"),
            command_timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(2),
            max_output_bytes: 16 * 1024,
            max_file_bytes: 1024 * 1024,
            env_allow: ["PATH", "LANG", "LC_ALL", "TZ", "TERM"]
                .map(String::from)
                .to_vec(),
            env_set: BTreeMap::new(),
            limits: ResourceLimits::default(),
        }
    }
}

/// Whether `name` can be an environment variable's name.
fn is_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

impl colony_config::Validate for SandboxConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.root.as_os_str().is_empty() {
            problems.push("sandbox.root: must not be empty".into());
        }
        if self.command_timeout.is_zero() {
            problems.push("sandbox.command_timeout: must be more than 0s".into());
        }
        if self.max_output_bytes < MIN_OUTPUT_BYTES {
            problems.push(format!(
                "sandbox.max_output_bytes: must be at least {MIN_OUTPUT_BYTES}"
            ));
        }
        if self.max_file_bytes == 0 {
            problems.push("sandbox.max_file_bytes: must be at least 1".into());
        }
        for name in &self.env_allow {
            if !is_env_name(name) {
                problems.push(format!(
                    "sandbox.env_allow: {name:?} is not a variable name"
                ));
            }
        }
        for (name, value) in &self.env_set {
            if !is_env_name(name) {
                problems.push(format!("sandbox.env_set: {name:?} is not a variable name"));
            }
            if value.contains('\0') {
                problems.push(format!(
                    "sandbox.env_set: the value of {name} holds a NUL byte"
                ));
            }
        }
        if self.env_allow.iter().any(|name| name == "HOME") || self.env_set.contains_key("HOME") {
            problems.push(
                "sandbox: HOME is always the workspace; remove it from env_allow and env_set"
                    .into(),
            );
        }
        for (key, value) in [
            ("cpu_seconds", self.limits.cpu_seconds),
            ("address_space_bytes", self.limits.address_space_bytes),
            ("max_processes", self.limits.max_processes),
            ("file_size_bytes", self.limits.file_size_bytes),
        ] {
            if value == Some(0) {
                problems.push(format!("sandbox.limits.{key}: must be at least 1 when set"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_config::Validate as _;

    #[test]
    fn defaults_are_valid_and_set_no_limits() {
        let config = SandboxConfig::default();
        let mut problems = Vec::new();
        config.validate(&mut problems);
        assert_eq!(problems, Vec::<String>::new());
        assert_eq!(config.command_timeout, Duration::from_secs(60));
        assert_eq!(config.kill_grace, Duration::from_secs(2));
        assert_eq!(config.max_output_bytes, 16 * 1024);
        assert_eq!(config.max_file_bytes, 1024 * 1024);
        assert!(config.limits.is_empty());
        assert!(config.root.ends_with("colony-workspaces"));
    }

    /// The config as a `sandbox` section, loaded the way the service loads its own.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        sandbox: SandboxConfig,
    }

    impl colony_config::Validate for Outer {
        fn validate(&self, problems: &mut Vec<String>) {
            self.sandbox.validate(problems);
        }
    }

    fn load(
        file: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<SandboxConfig, colony_config::Error> {
        let mut sources = colony_config::Sources::from_env_pairs(env);
        let path = std::env::temp_dir().join(format!(
            "colony-sandbox-config-{}-{}.toml",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
            sources.file = Some(path.clone());
        }
        let loaded = colony_config::load::<Outer>("SANDBOX_TEST", &sources);
        let _ = std::fs::remove_file(&path);
        loaded.map(|outer| outer.sandbox)
    }

    #[test]
    fn a_file_section_loads_with_durations_maps_and_limits() {
        let config = load(
            Some(
                r#"
                [sandbox]
                root = "workspaces"
                command_timeout = "90s"
                kill_grace = "250ms"
                env_allow = ["PATH"]
                env_set = { CARGO_TERM_COLOR = "never" }
                limits = { cpu_seconds = 30, file_size_bytes = 1048576 }
                "#,
            ),
            &[],
        )
        .unwrap();
        assert_eq!(config.root, PathBuf::from("workspaces"));
        assert_eq!(config.command_timeout, Duration::from_secs(90));
        assert_eq!(config.kill_grace, Duration::from_millis(250));
        assert_eq!(config.max_output_bytes, 16 * 1024);
        assert_eq!(config.env_allow, ["PATH"]);
        assert_eq!(config.env_set["CARGO_TERM_COLOR"], "never");
        assert_eq!(
            config.limits.prlimit_args(),
            ["--cpu=30", "--fsize=1048576"]
        );
    }

    #[test]
    fn scalars_come_from_the_environment() {
        let config = load(
            None,
            &[
                ("SANDBOX_TEST__SANDBOX__COMMAND_TIMEOUT", "5m"),
                ("SANDBOX_TEST__SANDBOX__MAX_OUTPUT_BYTES", "4096"),
                (
                    "SANDBOX_TEST__SANDBOX__LIMITS__ADDRESS_SPACE_BYTES",
                    "1000000000",
                ),
            ],
        )
        .unwrap();
        assert_eq!(config.command_timeout, Duration::from_secs(300));
        assert_eq!(config.max_output_bytes, 4096);
        assert_eq!(config.limits.address_space_bytes, Some(1_000_000_000));
        assert_eq!(config.limits.prlimit_args(), ["--as=1000000000"]);
    }

    #[test]
    fn bad_values_are_all_reported() {
        let config = SandboxConfig {
            root: PathBuf::new(),
            command_timeout: Duration::ZERO,
            max_output_bytes: 10,
            max_file_bytes: 0,
            env_allow: vec!["HOME".into(), "A=B".into()],
            env_set: BTreeMap::from([("X".into(), "a\0b".into())]),
            limits: ResourceLimits {
                cpu_seconds: Some(0),
                ..ResourceLimits::default()
            },
            ..SandboxConfig::default()
        };
        let mut problems = Vec::new();
        config.validate(&mut problems);
        let text = problems.join("\n");
        for key in [
            "sandbox.root",
            "sandbox.command_timeout",
            "sandbox.max_output_bytes",
            "sandbox.max_file_bytes",
            "sandbox.env_allow: \"A=B\"",
            "the value of X holds a NUL byte",
            "HOME is always the workspace",
            "sandbox.limits.cpu_seconds",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = load(None, &[("SANDBOX_TEST__SANDBOX__TIMEOUT", "1s")]).unwrap_err();
        assert!(error.to_string().contains("timeout"), "{error}");
        let error = load(None, &[("SANDBOX_TEST__SANDBOX__LIMITS__CPU", "1")]).unwrap_err();
        assert!(error.to_string().contains("cpu"), "{error}");
    }
}
