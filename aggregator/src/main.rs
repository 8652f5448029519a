//! Aggregator.
use clap::Parser;

/// Combines hospital updates for each round.
#[derive(Parser, Debug)]
#[command(name = "caduceus-aggregator", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!("the aggregator is not built yet")
}
