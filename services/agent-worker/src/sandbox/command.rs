//! Running one command in a workspace: checks, a scrubbed environment, its own process group,
//! timeout and cancellation with SIGTERM → SIGKILL escalation, and bounded output.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin};
use tokio_util::sync::CancellationToken;

use super::capture::{Captured, OutputCapture};
use super::{Error, SandboxConfig, Workspace};
use crate::metrics;

/// `PATH` of a command when neither the worker's environment (allow-listed) nor `env_set`
/// gives one.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Where `prlimit` is looked for after the sandbox's `PATH`.
const PRLIMIT_DIRS: &str = "/usr/bin:/bin";
/// Longest SIGTERM → SIGKILL wait on cancellation, so a cancelled task's processes are gone
/// within a second even when `kill_grace` is longer.
const CANCEL_GRACE_CAP: Duration = Duration::from_millis(500);
/// How long output is still read after the process group is gone. Only a process that left
/// the group (`setsid`) can hold the pipes open longer; its output is then abandoned.
const DRAIN: Duration = Duration::from_millis(300);
/// Starts retried after ETXTBSY (see [`spawn`]).
const SPAWN_RETRIES: u32 = 5;
/// Read size for stdout and stderr.
const READ_CHUNK: usize = 8192;

/// One command, as the model asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// A bare name looked up on the sandbox's `PATH`, or a path inside the workspace.
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Working directory inside the workspace; unset: the workspace itself.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Written to the command's stdin, which is then closed; unset: stdin is empty.
    #[serde(default)]
    pub stdin: Option<String>,
}

/// How a command ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Set when it exited by itself.
    pub exit_code: Option<i32>,
    /// Set when a signal ended it (the sandbox's own on timeout or cancellation).
    pub signal: Option<i32>,
    /// It ran past `command_timeout` and was stopped.
    pub timed_out: bool,
    /// The task was cancelled and the command stopped.
    pub cancelled: bool,
    pub stdout: Captured,
    pub stderr: Captured,
    pub duration: Duration,
}

impl CommandOutput {
    /// Whether it exited with code 0 by itself.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.cancelled
    }

    /// One line saying how the command ended, for the model.
    pub fn status_line(&self) -> String {
        let seconds = self.duration.as_secs_f64();
        let signal = self.signal.map(signal_name);
        if self.cancelled {
            format!("cancelled after {seconds:.1}s; the command was stopped")
        } else if self.timed_out {
            let how = signal.map_or(String::new(), |name| format!(" ({name})"));
            format!("timed out after {seconds:.1}s; the command was stopped{how}")
        } else if let Some(code) = self.exit_code {
            format!("exit code {code} after {seconds:.1}s")
        } else if let Some(name) = signal {
            format!("killed by {name} after {seconds:.1}s")
        } else {
            format!("ended without an exit status after {seconds:.1}s")
        }
    }

    /// The outcome as compact text for the model: the status line, then each stream that
    /// printed anything, under a header that says when it was truncated.
    pub fn render(&self) -> String {
        let mut text = self.status_line();
        text.push('\n');
        for (name, captured) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if captured.total_bytes == 0 {
                text.push_str(&format!("{name}: (empty)\n"));
                continue;
            }
            if captured.truncated {
                text.push_str(&format!(
                    "--- {name} (truncated; {} bytes in all) ---\n",
                    captured.total_bytes
                ));
            } else {
                text.push_str(&format!("--- {name} ---\n"));
            }
            text.push_str(&captured.text);
            if !captured.text.ends_with('\n') {
                text.push('\n');
            }
        }
        text
    }
}

/// `SIGKILL` for 9, or `signal 99` for numbers that name none.
fn signal_name(number: i32) -> String {
    Signal::try_from(number).map_or_else(|_| format!("signal {number}"), |s| s.as_str().into())
}

/// Runs `request` in `workspace` under `config` and waits for it, or for its timeout, or for
/// `cancel`. Refusals (paths outside, unknown program, missing `prlimit`) are errors before
/// anything starts; a command that fails, times out or is cancelled is an `Ok` output that
/// says so.
pub async fn run(
    workspace: &Workspace,
    request: &CommandRequest,
    config: &SandboxConfig,
    cancel: &CancellationToken,
) -> Result<CommandOutput, Error> {
    let env = build_env(config, workspace.root(), std::env::vars_os());
    run_with_env(workspace, request, config, cancel, env).await
}

/// [`run`] with the environment given, so tests need not change the process's own.
async fn run_with_env(
    workspace: &Workspace,
    request: &CommandRequest,
    config: &SandboxConfig,
    cancel: &CancellationToken,
    env: BTreeMap<OsString, OsString>,
) -> Result<CommandOutput, Error> {
    let result = execute(workspace, request, config, cancel, env).await;
    let outcome = match &result {
        Ok(output) if output.cancelled => "cancelled",
        Ok(output) if output.timed_out => "timed_out",
        Ok(output) if output.success() => "succeeded",
        Ok(_) => "failed",
        Err(_) => "refused",
    };
    ::metrics::counter!(metrics::SANDBOX_COMMANDS, "outcome" => outcome).increment(1);
    match &result {
        Ok(output) => tracing::debug!(
            program = %request.program,
            outcome,
            exit_code = output.exit_code,
            signal = output.signal,
            duration = ?output.duration,
            "sandbox command ended"
        ),
        Err(error) => tracing::debug!(
            program = %request.program,
            code = error.code(),
            "sandbox command refused"
        ),
    }
    result
}

/// The command's environment: the allow-listed variables of `inherited`, then `env_set`, then
/// `HOME` = the workspace, and a default `PATH` if none came.
fn build_env(
    config: &SandboxConfig,
    home: &Path,
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = inherited
        .into_iter()
        .filter(|(name, _)| {
            name.as_os_str() != OsStr::new("HOME")
                && config
                    .env_allow
                    .iter()
                    .any(|allowed| name.as_os_str() == OsStr::new(allowed))
        })
        .collect();
    for (name, value) in &config.env_set {
        env.insert(name.into(), value.into());
    }
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.insert("HOME".into(), home.as_os_str().to_owned());
    env
}

/// Whether `path` is a file someone may execute.
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The first executable `name` in the absolute directories of `path_list`. Relative entries
/// (`.`, empty) are skipped: they would make lookup depend on the working directory.
fn find_on_path(name: &str, path_list: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path_list)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// The part of `arg` that names a path, if it looks like one: the whole argument when it
/// starts with `/`, `./`, `../` or `~`, or has a `..` component; the value of a
/// `name=value` or `--opt=value` argument whose value looks like a path.
pub(crate) fn path_in_argument(arg: &str) -> Option<&str> {
    let looks_like_path = |text: &str| {
        text.starts_with('/')
            || text.starts_with("./")
            || text.starts_with("../")
            || text.starts_with('~')
            || text.split('/').any(|part| part == "..")
    };
    if looks_like_path(arg) {
        return Some(arg);
    }
    let (name, value) = arg.split_once('=')?;
    let name = name.trim_start_matches('-');
    let is_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    (is_name && looks_like_path(value)).then_some(value)
}

/// What to start: the checked program, arguments and working directory.
#[derive(Debug)]
struct Checked {
    executable: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
}

fn check(
    workspace: &Workspace,
    request: &CommandRequest,
    config: &SandboxConfig,
    env: &BTreeMap<OsString, OsString>,
) -> Result<Checked, Error> {
    let cwd = match &request.cwd {
        None => workspace.root().to_path_buf(),
        Some(cwd) => {
            let refused = |reason| Error::refused(format!("working directory {cwd:?}"), reason);
            let real = workspace.resolve(cwd).map_err(refused)?;
            match std::fs::metadata(&real) {
                Ok(meta) if meta.is_dir() => real,
                Ok(_) => return Err(refused(Error::NotADirectory { path: cwd.clone() })),
                Err(source) => return Err(refused(Error::io(cwd, source))),
            }
        }
    };

    let program = request.program.as_str();
    let executable = if program.contains('/') || program.starts_with('~') {
        let refused = |reason| Error::refused(format!("program {program:?}"), reason);
        let real = workspace.resolve_from(&cwd, program).map_err(refused)?;
        match std::fs::metadata(&real) {
            Ok(meta) if meta.is_file() => real,
            Ok(meta) if meta.is_dir() => {
                return Err(refused(Error::IsADirectory {
                    path: program.into(),
                }));
            }
            Ok(_) => {
                return Err(refused(Error::NotAFile {
                    path: program.into(),
                }));
            }
            Err(source) => return Err(refused(Error::io(program, source))),
        }
    } else {
        let path_list = env
            .get(OsStr::new("PATH"))
            .map_or(OsStr::new(DEFAULT_PATH), |p| p.as_os_str());
        (!program.is_empty())
            .then(|| find_on_path(program, path_list))
            .flatten()
            .ok_or_else(|| Error::UnknownProgram {
                program: program.into(),
            })?
    };

    for arg in &request.args {
        if let Some(path) = path_in_argument(arg) {
            workspace
                .resolve_from(&cwd, path)
                .map_err(|reason| Error::refused(format!("argument {arg:?}"), reason))?;
        }
    }

    let limits = config.limits.prlimit_args();
    if limits.is_empty() {
        return Ok(Checked {
            executable,
            args: request.args.iter().map(OsString::from).collect(),
            cwd,
        });
    }
    // prlimit sets the limits on itself and then execs the command: same process, same
    // group, and the exit status is the command's.
    let mut search = env.get(OsStr::new("PATH")).cloned().unwrap_or_default();
    search.push(":");
    search.push(PRLIMIT_DIRS);
    let prlimit = find_on_path("prlimit", &search).ok_or(Error::LimitsUnavailable)?;
    let mut args: Vec<OsString> = limits.into_iter().map(OsString::from).collect();
    args.push("--".into());
    args.push(executable.into_os_string());
    args.extend(request.args.iter().map(OsString::from));
    Ok(Checked {
        executable: prlimit,
        args,
        cwd,
    })
}

/// How the wait for a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited,
    TimedOut,
    Cancelled,
}

/// The command's process group. Dropping it (the caller stopped waiting for [`run`]) kills
/// the group, so no command outlives the call that started it.
struct Group {
    pgid: Option<Pid>,
}

impl Group {
    fn signal(&self, signal: Signal) {
        let Some(pgid) = self.pgid else { return };
        match killpg(pgid, signal) {
            // Everyone in it has exited already.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(%error, %signal, pgid = pgid.as_raw(), "signalling a sandbox process group failed")
            }
        }
    }

    /// Kills what is left of the group and forgets it: its id may be reused once it is gone.
    fn kill_rest(&mut self) {
        self.signal(Signal::SIGKILL);
        self.pgid = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill_rest();
    }
}

async fn execute(
    workspace: &Workspace,
    request: &CommandRequest,
    config: &SandboxConfig,
    cancel: &CancellationToken,
    env: BTreeMap<OsString, OsString>,
) -> Result<CommandOutput, Error> {
    let checked = check(workspace, request, config, &env)?;
    let mut command = tokio::process::Command::new(&checked.executable);
    command
        .args(&checked.args)
        .current_dir(&checked.cwd)
        .env_clear()
        .envs(&env)
        // Its own process group (pgid = its pid), so signals reach everything it starts.
        .process_group(0)
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = spawn(&mut command, &request.program).await?;
    let mut group = Group {
        pgid: child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    };

    let stop_reading = CancellationToken::new();
    let (stdout, stderr, stdin) = (child.stdout.take(), child.stderr.take(), child.stdin.take());
    let mut streams = pin!(async {
        tokio::join!(
            read_stream(stdout, config.max_output_bytes, &stop_reading),
            read_stream(stderr, config.max_output_bytes, &stop_reading),
            write_stdin(stdin, request.stdin.as_deref(), &stop_reading),
        )
    });
    // Output is read while the command runs, so a full pipe never stalls it.
    let mut read = None;
    let (status, ending) = {
        let mut supervised = pin!(supervise(
            &mut child,
            &group,
            config.command_timeout,
            config.kill_grace,
            cancel
        ));
        loop {
            tokio::select! {
                result = &mut supervised => break result,
                output = &mut streams, if read.is_none() => read = Some(output),
            }
        }
    };
    // Background processes it left behind would keep the pipes open.
    group.kill_rest();
    let (stdout, stderr, ()) = match read {
        Some(output) => output,
        None => match tokio::time::timeout(DRAIN, streams.as_mut()).await {
            Ok(output) => output,
            Err(_) => {
                stop_reading.cancel();
                streams.await
            }
        },
    };
    let status = status.map_err(|source| Error::Io {
        path: request.program.clone(),
        source,
    })?;
    Ok(CommandOutput {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out: ending == Ending::TimedOut,
        cancelled: ending == Ending::Cancelled,
        stdout,
        stderr,
        duration: started.elapsed(),
    })
}

/// Starts the command. A program written to the workspace just before can fail to start with
/// ETXTBSY while a process forked elsewhere in the worker still holds the writing descriptor
/// (until its exec closes it); that passes within milliseconds, so it is retried.
async fn spawn(command: &mut tokio::process::Command, program: &str) -> Result<Child, Error> {
    let mut attempts = 0;
    loop {
        match command.spawn() {
            Ok(child) => return Ok(child),
            Err(error)
                if error.raw_os_error() == Some(nix::libc::ETXTBSY) && attempts < SPAWN_RETRIES =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(source) => {
                return Err(Error::Spawn {
                    program: program.into(),
                    source,
                });
            }
        }
    }
}

/// Waits for the command to exit, or stops its group on timeout or cancellation: SIGTERM,
/// then SIGKILL if it has not exited after the grace.
async fn supervise(
    child: &mut Child,
    group: &Group,
    timeout: Duration,
    grace: Duration,
    cancel: &CancellationToken,
) -> (std::io::Result<std::process::ExitStatus>, Ending) {
    let ending = tokio::select! {
        status = child.wait() => return (status, Ending::Exited),
        () = tokio::time::sleep(timeout) => Ending::TimedOut,
        () = cancel.cancelled() => Ending::Cancelled,
    };
    let grace = match ending {
        Ending::Cancelled => grace.min(CANCEL_GRACE_CAP),
        Ending::TimedOut | Ending::Exited => grace,
    };
    group.signal(Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            group.signal(Signal::SIGKILL);
            child.wait().await
        }
    };
    (status, ending)
}

async fn read_stream(
    stream: Option<impl AsyncRead + Unpin>,
    max_bytes: usize,
    stop: &CancellationToken,
) -> Captured {
    let mut capture = OutputCapture::new(max_bytes);
    if let Some(mut stream) = stream {
        let mut buffer = vec![0; READ_CHUNK];
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                read = stream.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => capture.push(&buffer[..n]),
                },
            }
        }
    }
    capture.finish()
}

async fn write_stdin(stdin: Option<ChildStdin>, input: Option<&str>, stop: &CancellationToken) {
    let (Some(mut stdin), Some(input)) = (stdin, input) else {
        return;
    };
    tokio::select! {
        () = stop.cancelled() => {}
        // A command that exits without reading all of it closes the pipe: not an error.
        _ = stdin.write_all(input.as_bytes()) => {}
    }
    // Dropping the pipe closes it: the command sees the end of its input.
}

#[cfg(test)]
mod tests {
    use super::super::workspace::tests::TempRoot;
    use super::*;

    fn request(program: &str, args: &[&str]) -> CommandRequest {
        CommandRequest {
            program: program.into(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            ..CommandRequest::default()
        }
    }

    fn sh(script: &str) -> CommandRequest {
        request("sh", &["-c", script])
    }

    fn setup(label: &str) -> (TempRoot, Workspace, SandboxConfig) {
        let temp = TempRoot::new(label);
        let config = SandboxConfig {
            root: temp.0.join("workspaces"),
            command_timeout: Duration::from_secs(20),
            kill_grace: Duration::from_millis(300),
            ..SandboxConfig::default()
        };
        let workspace = Workspace::create(&config.root, "task").unwrap();
        (temp, workspace, config)
    }

    async fn run_ok(
        workspace: &Workspace,
        request: &CommandRequest,
        config: &SandboxConfig,
    ) -> CommandOutput {
        run(workspace, request, config, &CancellationToken::new())
            .await
            .unwrap()
    }

    /// Whether a process runs (a zombie waiting for its parent to reap it does not).
    fn is_running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X') | None)
        })
    }

    /// Waits up to 5 s for `pid` to stop running.
    async fn gone(pid: u32) -> bool {
        for _ in 0..50 {
            if !is_running(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    #[tokio::test]
    async fn output_and_exit_codes_are_reported() {
        let (_temp, workspace, config) = setup("exit");
        let output = run_ok(&workspace, &sh("echo out; echo err >&2; exit 3"), &config).await;
        assert_eq!(output.exit_code, Some(3));
        assert_eq!(output.signal, None);
        assert!(!output.success());
        assert_eq!(output.stdout.text, "out\n");
        assert_eq!(output.stderr.text, "err\n");
        let rendered = output.render();
        assert!(rendered.starts_with("exit code 3 after "), "{rendered}");
        assert!(
            rendered.contains("--- stdout ---\nout\n--- stderr ---\nerr\n"),
            "{rendered}"
        );

        let output = run_ok(&workspace, &request("true", &[]), &config).await;
        assert!(output.success());
        assert!(
            output
                .render()
                .contains("stdout: (empty)\nstderr: (empty)\n")
        );
    }

    #[tokio::test]
    async fn stdin_is_passed_and_closed() {
        let (_temp, workspace, config) = setup("stdin");
        let request = CommandRequest {
            stdin: Some("line one\nline two\n".into()),
            ..request("wc", &["-l"])
        };
        let output = run_ok(&workspace, &request, &config).await;
        assert_eq!(output.stdout.text.trim(), "2");
        // Without stdin, a reader sees its end at once instead of waiting.
        let output = run_ok(&workspace, &request_cat(), &config).await;
        assert!(output.success());
    }

    fn request_cat() -> CommandRequest {
        request("cat", &[])
    }

    #[tokio::test]
    async fn commands_run_in_the_workspace_with_home_there() {
        let (_temp, workspace, config) = setup("cwd");
        workspace
            .write_file("sub/file.txt", b"inside\n", 100)
            .unwrap();
        let output = run_ok(
            &workspace,
            &sh("pwd; echo $HOME; cat sub/file.txt ~/sub/file.txt"),
            &config,
        )
        .await;
        let root = workspace.root().display().to_string();
        assert_eq!(
            output.stdout.text,
            format!("{root}\n{root}\ninside\ninside\n")
        );

        let request = CommandRequest {
            cwd: Some("sub".into()),
            ..request("cat", &["file.txt", "../sub/file.txt"])
        };
        let output = run_ok(&workspace, &request, &config).await;
        assert_eq!(output.stdout.text, "inside\ninside\n");
    }

    #[tokio::test]
    async fn working_directories_outside_or_missing_are_refused() {
        let (_temp, workspace, config) = setup("cwd-out");
        workspace.write_file("file.txt", b"x", 10).unwrap();
        for (cwd, code) in [
            ("..", "outside_workspace"),
            ("/etc", "outside_workspace"),
            ("missing", "not_found"),
            ("file.txt", "not_a_directory"),
        ] {
            let request = CommandRequest {
                cwd: Some(cwd.into()),
                ..request("true", &[])
            };
            let error = run(&workspace, &request, &config, &CancellationToken::new())
                .await
                .unwrap_err();
            assert_eq!(error.code(), code, "{cwd}: {error}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("working directory {cwd:?} refused: ")),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn path_arguments_outside_are_refused_naming_the_argument() {
        let (_temp, workspace, config) = setup("args");
        workspace.write_file("notes.txt", b"notes\n", 100).unwrap();
        for arg in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "~/../x",
            "--file=/etc/passwd",
            "of=/etc/x",
            "~root",
        ] {
            let error = run(
                &workspace,
                &request("cat", &[arg]),
                &config,
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("argument {arg:?} refused: ")),
                "{arg}: {error}"
            );
        }
        let root = workspace.root().display().to_string();
        let inside = format!("{root}/notes.txt");
        let output = run_ok(
            &workspace,
            &request("cat", &["notes.txt", "./notes.txt", &inside, "~/notes.txt"]),
            &config,
        )
        .await;
        // `~` is not expanded without a shell; the check only let it through.
        assert_eq!(output.stdout.text, "notes\nnotes\nnotes\n");
        assert!(
            output.stderr.text.contains("~/notes.txt"),
            "{}",
            output.stderr.text
        );
    }

    #[test]
    fn arguments_that_look_like_paths() {
        for (arg, path) in [
            ("/etc", Some("/etc")),
            ("./a", Some("./a")),
            ("../a", Some("../a")),
            ("~", Some("~")),
            ("a/../b", Some("a/../b")),
            ("..", Some("..")),
            ("--out=/tmp/x", Some("/tmp/x")),
            ("-o=../x", Some("../x")),
            ("if=~/x", Some("~/x")),
            ("a.txt", None),
            ("src/main.rs", None),
            ("-la", None),
            ("--name=value", None),
            ("x=y/z", None),
            ("https://example.com/a", None),
            ("key with space=/x", None),
        ] {
            assert_eq!(path_in_argument(arg), path, "{arg}");
        }
    }

    #[tokio::test]
    async fn programs_are_found_on_path_or_in_the_workspace_only() {
        let (_temp, workspace, config) = setup("program");
        let error = run(
            &workspace,
            &request("no-such-program-xyz", &[]),
            &config,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "program \"no-such-program-xyz\" was not found on the sandbox's PATH"
        );
        let error = run(
            &workspace,
            &request("/bin/sh", &["-c", "true"]),
            &config,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(error.code(), "outside_workspace", "{error}");
        assert!(
            error
                .to_string()
                .starts_with("program \"/bin/sh\" refused: "),
            "{error}"
        );
        let error = run(
            &workspace,
            &request("./missing.sh", &[]),
            &config,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(error.code(), "not_found", "{error}");

        workspace
            .write_file("bin/hello.sh", b"#!/bin/sh\necho hello \"$1\"\n", 100)
            .unwrap();
        std::fs::set_permissions(
            workspace.root().join("bin/hello.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let output = run_ok(&workspace, &request("./bin/hello.sh", &["you"]), &config).await;
        assert_eq!(output.stdout.text, "hello you\n");
    }

    #[tokio::test]
    async fn only_allow_listed_variables_are_inherited() {
        let (_temp, workspace, mut config) = setup("env");
        config.env_set.insert("COLONY_FIXED".into(), "fixed".into());
        let inherited = [
            ("COLONY_TEST_SECRET", "hunter2"),
            ("LANG", "C.UTF-8"),
            ("HOME", "/root"),
            ("PATH", "/usr/bin:/bin"),
        ]
        .map(|(name, value)| (OsString::from(name), OsString::from(value)));
        let env = build_env(&config, workspace.root(), inherited);
        let output = run_with_env(
            &workspace,
            &request("env", &[]),
            &config,
            &CancellationToken::new(),
            env,
        )
        .await
        .unwrap();
        let mut lines: Vec<&str> = output.stdout.text.lines().collect();
        lines.sort_unstable();
        let home = format!("HOME={}", workspace.root().display());
        assert_eq!(
            lines,
            [
                "COLONY_FIXED=fixed",
                &home,
                "LANG=C.UTF-8",
                "PATH=/usr/bin:/bin"
            ]
        );
    }

    #[tokio::test]
    async fn nothing_outside_the_allow_list_leaks_from_the_real_environment() {
        let (_temp, workspace, config) = setup("env-real");
        let output = run_ok(&workspace, &request("env", &[]), &config).await;
        for line in output.stdout.text.lines() {
            let name = line.split_once('=').map_or(line, |(name, _)| name);
            assert!(
                name == "HOME" || config.env_allow.iter().any(|allowed| allowed == name),
                "{name} leaked into the sandbox"
            );
        }
        assert!(output.stdout.text.contains("PATH="));
    }

    #[tokio::test]
    async fn a_timeout_stops_the_command() {
        let (_temp, workspace, mut config) = setup("timeout");
        config.command_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let output = run_ok(&workspace, &request("sleep", &["30"]), &config).await;
        assert!(output.timed_out);
        assert_eq!(output.signal, Some(Signal::SIGTERM as i32));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(
            output.render().starts_with("timed out after "),
            "{}",
            output.render()
        );
    }

    #[tokio::test]
    async fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
        let (_temp, workspace, mut config) = setup("sigkill");
        // Long enough for the shell to set its trap before the SIGTERM comes.
        config.command_timeout = Duration::from_secs(1);
        config.kill_grace = Duration::from_millis(500);
        let started = Instant::now();
        let output = run_ok(
            &workspace,
            &sh("trap '' TERM; echo trapped; sleep 30"),
            &config,
        )
        .await;
        let elapsed = started.elapsed();
        assert!(output.timed_out);
        assert_eq!(
            output.signal,
            Some(Signal::SIGKILL as i32),
            "{}",
            output.render()
        );
        assert_eq!(output.stdout.text, "trapped\n");
        assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    }

    #[tokio::test]
    async fn grandchildren_die_with_the_command() {
        let (_temp, workspace, mut config) = setup("group");
        config.command_timeout = Duration::from_millis(500);
        let output = run_ok(&workspace, &sh("sleep 300 & echo $!; wait"), &config).await;
        assert!(output.timed_out);
        let pid: u32 = output.stdout.text.trim().parse().unwrap();
        assert!(gone(pid).await, "grandchild {pid} still runs");

        // The command exits at once but leaves a background process holding its stdout: the
        // process is killed and the run does not wait for it.
        config.command_timeout = Duration::from_secs(20);
        let started = Instant::now();
        let output = run_ok(&workspace, &sh("sleep 300 & echo $!"), &config).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(output.exit_code, Some(0));
        let pid: u32 = output.stdout.text.trim().parse().unwrap();
        assert!(gone(pid).await, "background process {pid} still runs");
    }

    #[tokio::test]
    async fn cancellation_stops_a_command_within_a_second() {
        let (_temp, workspace, mut config) = setup("cancel");
        // Cancellation caps the grace; a long one must not delay it.
        config.kill_grace = Duration::from_secs(10);
        let cancel = CancellationToken::new();
        let request = sh("trap '' TERM; sleep 30");
        let (output, cancelled_at) =
            tokio::join!(run(&workspace, &request, &config, &cancel), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                cancel.cancel();
                Instant::now()
            });
        let stopped_in = cancelled_at.elapsed();
        let output = output.unwrap();
        assert!(output.cancelled);
        assert!(!output.timed_out);
        assert!(stopped_in < Duration::from_secs(1), "{stopped_in:?}");
        assert!(
            output.render().starts_with("cancelled after "),
            "{}",
            output.render()
        );
    }

    #[tokio::test]
    async fn big_output_is_read_while_running_and_truncated() {
        let (_temp, workspace, mut config) = setup("big");
        config.max_output_bytes = 1024;
        let output = run_ok(
            &workspace,
            &sh("seq 1 100000; echo 'error: on stderr' >&2; seq 1 100000 >&2"),
            &config,
        )
        .await;
        assert!(output.success(), "{}", output.render());
        assert_eq!(output.stdout.total_bytes, 588_895);
        assert!(output.stdout.truncated);
        assert!(output.stdout.text.starts_with("1\n2\n3\n"));
        assert!(output.stdout.text.ends_with("99999\n100000\n"));
        assert!(
            output.stdout.text.len() < 1200,
            "{}",
            output.stdout.text.len()
        );
        assert!(output.stderr.text.starts_with("error: on stderr\n1\n"));
        assert!(
            output
                .render()
                .contains("--- stdout (truncated; 588895 bytes in all) ---\n")
        );
    }

    #[tokio::test]
    async fn resource_limits_apply() {
        let (_temp, workspace, mut config) = setup("limits");
        config.limits.file_size_bytes = Some(4096);
        let output = run_ok(
            &workspace,
            &sh("head -c 100000 /dev/zero > big.bin"),
            &config,
        )
        .await;
        assert!(!output.success(), "{}", output.render());
        let size = std::fs::metadata(workspace.root().join("big.bin"))
            .unwrap()
            .len();
        assert!(size <= 4096, "{size}");
        let output = run_ok(
            &workspace,
            &sh("head -c 1000 /dev/zero > small.bin"),
            &config,
        )
        .await;
        assert!(output.success(), "{}", output.render());
    }
}
