//! `caduceus fairness`
use clap::Args;

#[derive(Args, Debug)]
pub struct FairnessArgs {}

pub fn run(_args: FairnessArgs) -> anyhow::Result<()> {
    anyhow::bail!("`caduceus fairness` is not built yet")
}
