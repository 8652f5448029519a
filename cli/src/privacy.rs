//! `caduceus privacy …`
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum PrivacyCommand {}

pub fn run(cmd: PrivacyCommand) -> anyhow::Result<()> {
    match cmd {}
}
