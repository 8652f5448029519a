//! The caduceus CLI.
use clap::Parser;

/// Caduceus: federated learning across hospitals.
#[derive(Parser, Debug)]
#[command(name = "caduceus", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    Ok(())
}
