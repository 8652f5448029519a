//! Hospital-side trainer.
use clap::Parser;

/// Trains on a hospital's own data and sends only an update to the aggregator.
#[derive(Parser, Debug)]
#[command(name = "caduceus-trainer", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!("the trainer is not built yet")
}
