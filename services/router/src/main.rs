//! colony-router: routes model calls to deployments and accounts for their usage and cost.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use colony_config::Sources;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file; environment variables `ROUTER__…` override it.
    #[arg(long, env = "COLONY_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config (secrets redacted) and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Invalid config exits before any port is bound or connection made.
    let config = match colony_router::config::load(&Sources::from_process(args.config)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("colony-router: {error}");
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
            eprintln!("colony-router: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let _telemetry = match colony_telemetry::init("colony-router", &config.telemetry) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("colony-router: {error}");
                return ExitCode::from(2);
            }
        };
        let shutdown = CancellationToken::new();
        if let Err(error) = colony_runtime::cancel_on_signals(shutdown.clone()) {
            tracing::error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        match colony_router::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "router failed");
                ExitCode::FAILURE
            }
        }
        // Dropping the telemetry guard here flushes buffered spans.
    })
}
