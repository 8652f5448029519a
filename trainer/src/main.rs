//! `caduceus-trainer`: trains on one hospital's data and sends only model updates and aggregate
//! evaluation counts to the study's aggregator. Exit code 0 on success, 1 on failure (the message is
//! on standard error and in the summary file).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = caduceus_trainer::TrainerArgs::parse();
    caduceus_trainer::tune_allocator();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CADUCEUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    std::process::ExitCode::from(rt.block_on(caduceus_trainer::run(args)))
}
