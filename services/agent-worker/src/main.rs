//! colony-agent-worker: runs dispatched tasks (claim → model call → report).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use colony_agent_worker::Config;
use colony_agent_worker::config::ENV_PREFIX;
use colony_config::Sources;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Colony agent-worker: claims dispatched tasks and runs them"
)]
struct Args {
    /// TOML config file; `AGENT_WORKER__<KEY>` / `AGENT_WORKER__<SECTION>__<KEY>` environment
    /// variables override it.
    #[arg(long, env = "COLONY_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config (secrets redacted) and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Invalid config exits before any port is bound or connection made.
    let config: Config = match colony_config::load(ENV_PREFIX, &Sources::from_process(args.config))
    {
        Ok(config) => config,
        Err(error) => {
            eprintln!("colony-agent-worker: {error}");
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
            eprintln!("colony-agent-worker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = match colony_telemetry::init("colony-agent-worker", &config.telemetry) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("colony-agent-worker: {error}");
                return ExitCode::from(2);
            }
        };
        tracing::info!(config = %colony_config::redacted_json(&config), "starting");
        let shutdown = CancellationToken::new();
        if let Err(error) = colony_runtime::cancel_on_signals(shutdown.clone()) {
            tracing::error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        let code = match colony_agent_worker::run(config, shutdown).await {
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
