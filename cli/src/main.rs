//! The caduceus CLI: one tool for data preparation, privacy accounting, fairness audits, reports and
//! local federated studies. Each subcommand lives in its own module.
use clap::{Parser, Subcommand};

mod data;
mod fairness;
mod privacy;
mod report;
mod simulate;

/// Caduceus: federated learning across hospitals, without moving patient images.
#[derive(Parser, Debug)]
#[command(name = "caduceus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Import, split and inspect face datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Differential-privacy accounting.
    #[command(subcommand)]
    Privacy(privacy::PrivacyCommand),
    /// Audit a predictions file for group fairness.
    Fairness(fairness::FairnessArgs),
    /// Render a study's results as one self-contained HTML bias report.
    Report(report::ReportArgs),
    /// Run a whole federated study on this machine: one aggregator and N trainer processes over mTLS.
    Simulate(Box<simulate::SimulateArgs>),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(c) => data::run(c),
        Command::Privacy(c) => privacy::run(c),
        Command::Fairness(a) => fairness::run(a),
        Command::Report(a) => report::run(a),
        Command::Simulate(a) => simulate::run(*a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
