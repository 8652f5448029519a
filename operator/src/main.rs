//! The Caduceus operator.
use clap::Parser;

/// Reconciles FederatedStudy, HospitalClient and TrainingRound resources.
#[derive(Parser, Debug)]
#[command(name = "caduceus-operator", version, about)]
struct Args {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "CADUCEUS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "the operator's controllers are not built yet (metrics address {})",
        args.metrics_addr
    )
}
