//! `caduceus-trainer`: trains on one hospital's data and sends only model updates and aggregate
//! evaluation counts to the study's aggregator. Exit code 0 on success, 1 on failure (the message is
//! on standard error and in the summary file).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = caduceus_trainer::TrainerArgs::parse();
    caduceus_trainer::tune_allocator();
    caduceus_startup::run_main(1, 1, "caduceus-trainer", caduceus_trainer::run(args))
}
