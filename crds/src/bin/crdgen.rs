//! Writes the CRD YAML generated from the Rust types.
//!
//! `crdgen` writes every CRD to `crds/` and to the Helm chart's copy in `charts/caduceus/files/crds/` (or
//! the directories given); `crdgen --check` exits non-zero when a committed file in either differs from
//! what the types generate; `crdgen --stdout` prints all of them.
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;

/// Generates the CustomResourceDefinitions of Caduceus from its Rust API types.
#[derive(Parser, Debug)]
#[command(name = "crdgen", version, about)]
struct Args {
    /// Directories that hold the committed YAML (repeat the flag for several).
    #[arg(long, default_values = [env!("CARGO_MANIFEST_DIR"), concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/caduceus/files/crds")])]
    dir: Vec<PathBuf>,
    /// Compare instead of writing; fail when the committed YAML is out of date.
    #[arg(long)]
    check: bool,
    /// Print every CRD to standard output as one multi-document YAML stream.
    #[arg(long, conflicts_with = "check")]
    stdout: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut stale = Vec::new();
    for (file, crd) in caduceus_crds::all_crds() {
        let yaml = caduceus_crds::render_yaml(&crd)?;
        if args.stdout {
            println!("---\n{yaml}");
            continue;
        }
        for dir in &args.dir {
            let path = dir.join(file);
            if args.check {
                let committed = std::fs::read_to_string(&path).unwrap_or_default();
                if committed != yaml {
                    stale.push(path.display().to_string());
                }
            } else {
                std::fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    if !stale.is_empty() {
        bail!(
            "CRD YAML out of date with crds/src: {}. Run `make crds` (cargo run -p caduceus-crds --bin crdgen) and commit the result.",
            stale.join(", ")
        );
    }
    Ok(())
}
