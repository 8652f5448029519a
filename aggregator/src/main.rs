//! `caduceus-aggregator`: serves one federated study's rounds over gRPC with mutual TLS.
//!
//! Exit codes: 0 study completed, 1 study failed (for example a missed quorum), 2 bad settings,
//! 3 interrupted by a signal (restart to resume from the last checkpoint).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = caduceus_aggregator::AggregatorArgs::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CADUCEUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(caduceus_aggregator::exit::CONFIG);
        }
    };
    std::process::ExitCode::from(rt.block_on(caduceus_aggregator::run(args)))
}
