//! `caduceus fairness`: audit any predictions file for group fairness.
use std::path::PathBuf;

use anyhow::Context;
use caduceus_fairness::DEFAULT_MIN_GROUP_SIZE;
use caduceus_fairness::audit::{AuditSpec, audit_csv};
use clap::Args;

/// Audit a CSV of predictions: per-group accuracy, TPR, FPR and selection rate, demographic parity and
/// equalized odds (fairlearn definitions), for each sensitive column and their intersection.
#[derive(Args, Debug)]
pub struct FairnessArgs {
    /// CSV file with a header row.
    #[arg(long, value_name = "FILE.csv")]
    pub predictions: PathBuf,
    /// Column holding the true label (0 or 1).
    #[arg(long, value_name = "COL")]
    pub label: String,
    /// Column holding the model's prediction (0 or 1).
    #[arg(long, value_name = "COL")]
    pub prediction: String,
    /// Sensitive column(s), comma-separated; with several, their intersection is audited too.
    #[arg(long, value_name = "COL[,COL...]", value_delimiter = ',', required = true)]
    pub sensitive: Vec<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Groups with fewer rows are reported as having too little data and left out of the gaps.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MIN_GROUP_SIZE)]
    pub min_group_size: u64,
}

pub fn run(args: FairnessArgs) -> anyhow::Result<()> {
    let path = &args.predictions;
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open predictions file {}", path.display()))?;
    let spec = AuditSpec {
        label: args.label.trim().to_string(),
        prediction: args.prediction.trim().to_string(),
        sensitive: args
            .sensitive
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        min_group_size: args.min_group_size,
    };
    let audit = audit_csv(std::io::BufReader::new(file), &spec)
        .with_context(|| format!("cannot audit {}", path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&audit.to_json())?);
    } else {
        print!("{}", audit.to_table(&path.display().to_string()));
    }
    Ok(())
}
