//! `caduceus data …`: import a UTKFace-style directory into a manifest, split it into a global
//! test set and hospital shards, and show per-part group counts.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use caduceus_dataset::{
    AgeGroup, Attribute, Gender, ImportReport, Manifest, Race, Record, SchemeKind, SplitConfig, SplitDir,
    SplitScheme, class_counts,
};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Read a directory of AGE_GENDER_RACE_DATETIME.jpg.chip.jpg files into a manifest
    /// (manifest.json + labels.csv), reporting unparseable names and duplicate images.
    Import(ImportArgs),
    /// Cut a manifest into a global test set and K hospital shards (train + val each).
    Split(SplitArgs),
    /// Print per-part counts by gender, race and age group for a manifest or a split directory.
    Stats(StatsArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Image directory. Default: $CADUCEUS_DATA_DIR/utkface-64, else ../shared/data/utkface-64.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output directory for manifest.json, labels.csv and import-report.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct SplitArgs {
    /// A manifest directory (or its manifest.json), as written by `caduceus data import`.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Number of hospital shards.
    #[arg(long, default_value_t = 4)]
    pub hospitals: usize,
    /// iid or dirichlet.
    #[arg(long, default_value = "iid")]
    pub scheme: SchemeKind,
    /// Dirichlet concentration: small (0.1–0.5) is strongly skewed, large (100) nearly IID.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Attribute the Dirichlet split skews over: race, gender or age-group.
    #[arg(long, default_value = "race")]
    pub attribute: Attribute,
    /// Fraction of all records held out as the global test set.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Fraction of each hospital's records kept for its validation part.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use at most this many records (a seeded random subset), for quick studies.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Each hospital gets at least this many records (Dirichlet redraws until it does).
    #[arg(long, default_value_t = 10)]
    pub min_per_hospital: usize,
    /// Output directory: split.json, test/, hospital-0/{train,val}/, …
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// A manifest directory or manifest.json.
    #[arg(long, conflicts_with = "split", required_unless_present = "split")]
    pub manifest: Option<PathBuf>,
    /// A split directory written by `caduceus data split`.
    #[arg(long)]
    pub split: Option<PathBuf>,
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Import(a) => import(a),
        DataCommand::Split(a) => split(a),
        DataCommand::Stats(a) => stats(a),
    }
}

fn default_image_dir() -> PathBuf {
    caduceus_dataset::data_dir()
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
        .join("utkface-64")
}

fn import(a: ImportArgs) -> anyhow::Result<()> {
    let dir = a.data_dir.unwrap_or_else(default_image_dir);
    let root = dir
        .canonicalize()
        .with_context(|| format!("image directory {}", dir.display()))?;
    let report = caduceus_dataset::import(&root)?;
    if report.records.is_empty() {
        bail!(
            "{}: no file name parsed as AGE_GENDER_RACE_DATETIME.jpg.chip.jpg",
            root.display()
        );
    }
    Manifest::new(&root, report.records.clone())
        .write(&a.out)
        .with_context(|| format!("writing the manifest to {}", a.out.display()))?;
    write_import_report(&a.out.join("import-report.json"), &report)?;
    println!("imported {} images from {}", report.records.len(), root.display());
    println!("skipped {} files:", report.skipped.len());
    for s in &report.skipped {
        println!("  {:?}: {}", s.file, s.reason);
    }
    let disagree = report.duplicates.iter().filter(|g| !g.labels_agree).count();
    println!(
        "duplicates: {} groups of byte-identical images, {} redundant copies, {} groups with disagreeing labels \
         (kept; the splitter keeps each group in one part)",
        report.duplicates.len(),
        report.redundant_copies(),
        disagree
    );
    println!("wrote {}", a.out.display());
    Ok(())
}

fn write_import_report(path: &Path, r: &ImportReport) -> anyhow::Result<()> {
    let json = serde_json::json!({
        "image_root": r.image_root,
        "records": r.records.len(),
        "skipped": r.skipped.iter().map(|s| serde_json::json!({"file": s.file, "reason": s.reason})).collect::<Vec<_>>(),
        "duplicate_groups": r.duplicates.iter().map(|g| serde_json::json!({
            "sha256": g.sha256, "files": g.files, "labels_agree": g.labels_agree
        })).collect::<Vec<_>>(),
        "redundant_copies": r.redundant_copies(),
    });
    std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn split(a: SplitArgs) -> anyhow::Result<()> {
    let manifest = Manifest::read(&a.manifest)?;
    let scheme = match a.scheme {
        SchemeKind::Iid => SplitScheme::Iid,
        SchemeKind::Dirichlet => SplitScheme::Dirichlet {
            alpha: a.alpha,
            attribute: a.attribute,
        },
    };
    let config = SplitConfig {
        hospitals: a.hospitals,
        test_fraction: a.test_fraction,
        val_fraction: a.val_fraction,
        scheme,
        seed: a.seed,
        limit: a.limit,
        min_per_hospital: a.min_per_hospital,
    };
    let split = caduceus_dataset::split(&manifest.records, &config)?;
    split
        .write(&a.out, &manifest.image_root, &config)
        .with_context(|| format!("writing the split to {}", a.out.display()))?;
    println!(
        "split {} records ({scheme}, seed {}) into {}",
        manifest.records.len(),
        a.seed,
        a.out.display()
    );
    let mut parts: Vec<(String, &[Record])> = vec![("test".into(), split.test.as_slice())];
    for (i, h) in split.hospitals.iter().enumerate() {
        parts.push((format!("hospital-{i}/train"), h.train.as_slice()));
        parts.push((format!("hospital-{i}/val"), h.val.as_slice()));
    }
    print_table(&parts);
    Ok(())
}

fn stats(a: StatsArgs) -> anyhow::Result<()> {
    if let Some(m) = a.manifest {
        let manifest = Manifest::read(&m)?;
        print_table(&[(m.display().to_string(), manifest.records.as_slice())]);
    } else if let Some(dir) = a.split {
        let split = SplitDir::read(&dir)?;
        println!(
            "{}: {}, seed {}",
            dir.display(),
            split.config.scheme,
            split.config.seed
        );
        let mut parts: Vec<(String, &[Record])> = vec![("test".into(), split.test.records.as_slice())];
        for h in &split.hospitals {
            let name = h
                .dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            parts.push((format!("{name}/train"), h.train.records.as_slice()));
            parts.push((format!("{name}/val"), h.val.records.as_slice()));
        }
        print_table(&parts);
    }
    Ok(())
}

/// One row per part: size, then counts by gender, race (with percentages, to show the skew) and
/// age group.
fn print_table(parts: &[(String, &[Record])]) {
    let width = parts.iter().map(|(n, _)| n.len()).max().unwrap_or(4).max(4);
    let mut header = format!("{:width$} {:>6} |", "part", "n");
    for g in Gender::ALL {
        header += &format!(" {:>6}", g.name());
    }
    header += " |";
    for r in Race::ALL {
        header += &format!(" {:>12}", r.name());
    }
    header += " |";
    for label in AgeGroup::LABELS {
        header += &format!(" {label:>5}");
    }
    println!("{header}");
    for (name, records) in parts {
        let mut line = format!("{name:width$} {:>6} |", records.len());
        for c in class_counts(records, Attribute::Gender) {
            line += &format!(" {c:>6}");
        }
        line += " |";
        for c in class_counts(records, Attribute::Race) {
            let pct = 100.0 * c as f64 / records.len().max(1) as f64;
            line += &format!(" {c:>5} ({pct:>3.0}%)");
        }
        line += " |";
        for c in class_counts(records, Attribute::AgeGroup) {
            line += &format!(" {c:>5}");
        }
        println!("{line}");
    }
}
