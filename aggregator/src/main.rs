//! `caduceus-aggregator`: serves one federated study's rounds over gRPC with mutual TLS.
//!
//! Exit codes: 0 study completed, 1 study failed (for example a missed quorum), 2 bad settings,
//! 3 interrupted by a signal (restart to resume from the last checkpoint).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = caduceus_aggregator::AggregatorArgs::parse();
    caduceus_startup::run_main(
        2,
        caduceus_aggregator::exit::CONFIG,
        "caduceus-aggregator",
        caduceus_aggregator::run(args),
    )
}
