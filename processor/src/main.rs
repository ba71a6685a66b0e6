//! The `cmdproc` binary: parses the command line, sets up logging, and runs the command.

use clap::Parser;
use processor::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

/// Workers allocate for every message (decoded JSON, rows, outbox payloads); mimalloc does
/// that with less CPU than the system allocator (measured with `cmdproc bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("CMDPROC_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.common.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match processor::cli::dispatch(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
