//! The one `main` every service binary shares: parse arguments, load and validate the config
//! (exiting 2 before any port is bound), `--check-config`, telemetry, signals, run, flush.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use colony_config::Sources;
use colony_telemetry::TelemetryConfig;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// A service's configuration as the shared `main` needs it.
pub trait ServiceConfig: DeserializeOwned + Serialize + colony_config::Validate {
    /// Environment prefix: `ROUTER` reads `ROUTER__DATABASE__URL` as `database.url`.
    const ENV_PREFIX: &'static str;
    fn telemetry(&self) -> &TelemetryConfig;

    /// Loads and validates the config. Override to add steps (the router reads API keys from
    /// the variables its deployments name).
    fn load(sources: &Sources) -> Result<Self, colony_config::Error> {
        colony_config::load(Self::ENV_PREFIX, sources)
    }
}

#[derive(Parser)]
struct Args {
    /// TOML config file; `<PREFIX>__<SECTION>__<KEY>` environment variables override it.
    #[arg(long, env = "COLONY_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config (secrets redacted) and exit.
    #[arg(long)]
    check_config: bool,
}

/// Runs `service` with `run` as its body and returns the process exit code: 0 after a clean
/// shutdown, 1 when `run` failed, 2 for invalid configuration or arguments.
pub fn main<C, F, Fut>(service: &'static str, about: &'static str, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let command = Args::command()
        .name(service)
        .about(about)
        .version(env!("CARGO_PKG_VERSION"));
    let args = match Args::from_arg_matches(&command.get_matches()) {
        Ok(args) => args,
        Err(error) => error.exit(),
    };
    // Invalid config exits before any port is bound or connection made.
    let config: C = match colony_config::load(C::ENV_PREFIX, &Sources::from_process(args.config)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{service}: {error}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{}", colony_config::redacted_json(&config));
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{service}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = match colony_telemetry::init(service, config.telemetry()) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("{service}: {error}");
                return ExitCode::from(2);
            }
        };
        tracing::info!(config = %colony_config::redacted_json(&config), "starting");
        let shutdown = CancellationToken::new();
        if let Err(error) = crate::cancel_on_signals(shutdown.clone()) {
            tracing::error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        let code = match run(config, shutdown).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "failed");
                ExitCode::FAILURE
            }
        };
        // Last step of shutdown: flush telemetry.
        drop(telemetry);
        code
    })
}
