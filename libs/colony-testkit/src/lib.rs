//! Test kit: a fresh PostgreSQL database per test, a unique NATS subject and stream prefix per
//! test, and helpers to run Colony's binaries as real processes. Everything it creates is
//! removed when the owning value is dropped.
#![expect(
    clippy::unwrap_used,
    reason = "test support: a failed setup should stop the test"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use colony_bus::{Bus, BusConfig};
use colony_store::DatabaseConfig;
use secrecy::SecretString;
use sqlx::PgPool;

/// Where tests create their databases from. Override with `COLONY_TEST_DATABASE_URL`.
pub fn admin_database_url() -> String {
    std::env::var("COLONY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// NATS for tests. Override with `COLONY_TEST_NATS_URL`.
pub fn nats_url() -> String {
    std::env::var("COLONY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Runs `future` to completion on a fresh runtime in its own thread, so that `Drop` can clean
/// up asynchronously whatever runtime (or none) the test uses.
fn block_on_side<F>(future: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(future);
    });
    drop(handle.join());
}

/// A database created for one test, with every migration applied; dropped with the value.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = unique("colony_test_");
        let admin = admin_database_url();
        let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        drop(conn);
        let url = match admin.rfind('/') {
            Some(i) => format!("{}/{name}", &admin[..i]),
            None => panic!("admin database url has no database part: {admin}"),
        };
        let pool = colony_store::connect(&DatabaseConfig {
            url: SecretString::from(url.clone()),
            max_connections: 5,
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        Self { name, url, pool }
    }

    pub fn config(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: SecretString::from(self.url.clone()),
            max_connections: 5,
            ..DatabaseConfig::default()
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        block_on_side(async move {
            // FORCE ends connections still open (a task of a failed test may hold some).
            let Ok(mut conn) =
                <sqlx::PgConnection as sqlx::Connection>::connect(&admin_database_url()).await
            else {
                return;
            };
            let drop_db = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            if let Err(error) = sqlx::query(&drop_db).execute(&mut conn).await {
                eprintln!("testkit: could not drop {name}: {error}");
            }
        });
    }
}

/// A unique subject and stream prefix on the shared NATS server; its streams are deleted with
/// the value.
pub struct TestBus {
    pub prefix: String,
    pub url: String,
}

impl TestBus {
    pub fn new() -> Self {
        Self {
            prefix: unique("t"),
            url: nats_url(),
        }
    }

    pub fn config(&self) -> BusConfig {
        BusConfig {
            url: self.url.clone(),
            prefix: self.prefix.clone(),
            ..BusConfig::default()
        }
    }

    /// A connected bus with every stream created.
    pub async fn connect(&self) -> Bus {
        let bus = Bus::connect(&self.config(), "colony-test").await.unwrap();
        bus.ensure_streams().await.unwrap();
        bus
    }
}

impl Default for TestBus {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let url = self.url.clone();
        let stream_prefix = format!("{}_", self.prefix);
        block_on_side(async move {
            use futures::StreamExt;
            let Ok(client) = async_nats::connect(url).await else {
                return;
            };
            let jetstream = async_nats::jetstream::new(client);
            let names: Vec<String> = jetstream
                .stream_names()
                .filter_map(|n| async move { n.ok() })
                .collect()
                .await;
            for name in names.iter().filter(|n| n.starts_with(&stream_prefix)) {
                drop(jetstream.delete_stream(name).await);
            }
        });
    }
}

/// A port that was free a moment ago, for a process the test starts.
///
/// Chosen at random below Linux's ephemeral range (32768 and up), not with `bind(0)`: a port
/// from the ephemeral range can be taken by some process's outgoing connection (to PostgreSQL or
/// NATS, say) between this call and the service binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()) << 32 ^ uuid::Uuid::new_v4().as_u128() as u64;
    let _ = STATE.compare_exchange(0, seed | 1, Ordering::Relaxed, Ordering::Relaxed);
    loop {
        // xorshift: cheap, and distinct per process thanks to the seed.
        let mut x = STATE.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        STATE.store(x, Ordering::Relaxed);
        let port = 10_000 + (x % 22_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The workspace's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .join("target")
}

/// Path of a workspace binary built in the same profile as the tests. `make test` builds them
/// first (`cargo build --workspace --bins`).
pub fn binary(name: &str) -> PathBuf {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let path = target_dir().join(profile).join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// A child process that is killed when dropped. Its output goes to a log file that is printed
/// when the test asks for it.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `binary` with exactly `env` on top of a minimal inherited environment.
    pub fn spawn(name: &str, binary: &Path, args: &[&str], env: &[(String, String)]) -> Self {
        let dir = target_dir().join("test-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{}.log", unique(&format!("{name}-"))));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL. Returns the exit code if it exited.
    pub fn terminate(&mut self, grace: Duration) -> Option<i32> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.child.id() as i32);
        kill(pid, Signal::SIGTERM).ok();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }

    /// Whether the process has exited, and with which code.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 60)
            );
        } else {
            drop(std::fs::remove_file(&self.log));
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `url` answers 200.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    let client = reqwest::Client::new();
    eventually(timeout, url, || {
        let request = client.get(url).timeout(Duration::from_secs(1)).send();
        async move {
            match request.await {
                Ok(response) if response.status().is_success() => Some(()),
                _ => None,
            }
        }
    })
    .await;
}
