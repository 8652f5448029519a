//! `caduceus simulate`: a whole federated study on one machine.
//!
//! It imports the face data, makes a (by default non-IID Dirichlet race) split into a held-out test set
//! and N hospital shards, generates a study CA with a server certificate and one client certificate per
//! hospital, and starts the real `caduceus-aggregator` and N `caduceus-trainer` processes on loopback
//! with mutual TLS. It prints a line per round (accuracy, loss, per-race accuracy, from the hospitals'
//! evaluation counts), then evaluates the final model on the held-out test set and writes a results
//! directory: `config.json` and `rounds.json` (the fairness crate's format, read by `caduceus report`),
//! `final-model.safetensors`, and `work/` (split, certificates, model store, logs, summaries).
//!
//! `--centralised` trains the same model on the pooled hospital shards in this process, for the same
//! total number of epochs (rounds × local epochs), and writes the same kind of results directory.
//!
//! The modules depend in one direction: `args` (the options) ← `dp` (DP plans) ← `plan` (data, config,
//! DP plan of a run) ← `results` (progress lines, final evaluation) ← `supervise` (the processes of a
//! federated run, with `secure`) and `centralised`; this entry point wires them.
use std::time::Instant;

mod args;
mod centralised;
mod dp;
mod plan;
mod results;
mod secure;
mod supervise;

pub use args::SimulateArgs;

use args::validate;
use centralised::run_centralised;
use plan::{prepare_data, prepare_results_dir};
use supervise::{bin_dir, find_bin, run_federated};

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // Training (centralised mode) and the final test evaluation run in this process.
    caduceus_trainer::tune_allocator();
    let arch = validate(&args)?;
    if !args.centralised {
        // Fail before any work when the binaries are missing.
        let bins = bin_dir()?;
        find_bin(&bins, "caduceus-aggregator")?;
        find_bin(&bins, "caduceus-trainer")?;
    }
    prepare_results_dir(&args)?;
    let work = args.results.join("work");
    std::fs::create_dir_all(&work)?;
    let prepared = prepare_data(&args, &work)?;
    if args.centralised {
        return run_centralised(&args, arch, &prepared, started);
    }
    run_federated(&args, arch, &prepared, started)
}
