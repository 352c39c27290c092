use std::process::ExitCode;

use clap::Parser;
use endpoint_stats::cli::{Cli, Command};
use endpoint_stats::config::DatabaseArgs;
use endpoint_stats::startup::Application;
use endpoint_stats::store::Database;
use endpoint_stats::{ops, telemetry};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            // One line, naming the flag (and so the variable): clap's first line does.
            let rendered = error.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("endpoint-stats: {first}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("endpoint-stats: error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("endpoint-stats: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::Migrate(args)) => migrate(args).await,
        Some(Command::Backup(args)) => ops::backup::run(args).await,
        Some(Command::VerifyBackup(args)) => ops::verify::run(args).await,
        Some(Command::Restore(args)) => ops::restore::run(args).await,
        Some(Command::Maintain(args)) => ops::maintain::run(args).await,
        Some(Command::Check(args)) => ops::check::run(args).await,
    }
}

async fn serve(args: endpoint_stats::config::ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = args.settings()?;
    telemetry::init_logging(args.database.log_format, &args.database.log_level)?;
    Application::build(settings).await?.run_until_stopped().await?;
    Ok(ExitCode::SUCCESS)
}

async fn migrate(args: DatabaseArgs) -> anyhow::Result<ExitCode> {
    let settings = args.settings()?;
    telemetry::init_logging(args.log_format, &args.log_level)?;
    let database = Database::connect(&settings)
        .await
        .map_err(|e| anyhow::anyhow!("DATABASE_URL: cannot use {}: {e}", settings.url))?;
    database.migrate().await?;
    tracing::info!(database = %settings.url, "migrations applied");
    database.close().await;
    Ok(ExitCode::SUCCESS)
}
