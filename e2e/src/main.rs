//! localnode: a test stand-in for kubelet (not a product feature).
use clap::Parser;

/// Registers a Node and runs the Pods scheduled onto it as local processes. For tests only.
#[derive(Parser, Debug)]
#[command(name = "localnode", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    Ok(())
}
