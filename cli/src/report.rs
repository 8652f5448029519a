//! `caduceus report`: render a study's results directory as one self-contained HTML bias report.
use std::path::PathBuf;

use anyhow::Context;
use caduceus_fairness::StudyResults;
use caduceus_fairness::report::{ReportOptions, render_html};
use clap::Args;

/// Render a study's results (DIR/config.json and DIR/rounds.json) as one HTML file with inline SVG
/// charts: no scripts, no network fetches.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Results directory written by `caduceus simulate` (or the operator).
    #[arg(long, value_name = "DIR")]
    pub results: PathBuf,
    /// Output HTML file.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        default_value = "report.html"
    )]
    pub output: PathBuf,
    /// Groups with fewer examples are reported as having too little data (default: the study
    /// configuration's `min_group_size`, else 30).
    #[arg(long, value_name = "N")]
    pub min_group_size: Option<u64>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let results = StudyResults::load(&args.results)
        .with_context(|| format!("cannot read study results from {}", args.results.display()))?;
    let html = render_html(
        &results,
        &ReportOptions {
            min_group_size: args.min_group_size,
        },
    )
    .with_context(|| format!("cannot render a report for {}", args.results.display()))?;
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = args.output.with_extension("html.tmp");
    std::fs::write(&tmp, html).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.output).with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("{}", args.output.display());
    Ok(())
}
