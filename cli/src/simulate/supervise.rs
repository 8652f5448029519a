//! Spawning and supervising the aggregator and trainer processes of a federated run, and reading
//! its round events.
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use caduceus_dataset::hospital_dir_name;
use caduceus_fairness::RoundResult;
use caduceus_fairness::results::{CONFIG_FILE, write_rounds};
use caduceus_models::{Arch, Model};
use caduceus_pki::{StudyPkiFiles, TlsPaths};

use super::args::{SecureAggregationArg, SimulateArgs};
use super::dp::DpPlan;
use super::plan::{Prepared, config_json, dp_plan_for, sensitive};
use super::results::{finish, print_round};
use super::secure::{self, Secure};

const HOSPITAL_PREFIX: &str = "hospital-";

/// The directory holding `caduceus-aggregator` and `caduceus-trainer`: `$CADUCEUS_BIN_DIR`, else the
/// directory of this executable.
pub(super) fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("CADUCEUS_BIN_DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locating the caduceus executable")?;
    Ok(exe.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf))
}

pub(super) fn find_bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !p.is_file() {
        bail!(
            "{} not found; build it (cargo build --release -p {name}) or set CADUCEUS_BIN_DIR to the directory holding it",
            p.display()
        );
    }
    Ok(p)
}

/// Child processes that are killed (by their own pid) when the simulation ends early.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spawn_logged(name: &str, mut cmd: Command, log: &Path, stdout_piped: bool) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stderr(Stdio::from(f.try_clone()?));
    if stdout_piped {
        cmd.stdout(Stdio::piped());
    } else {
        cmd.stdout(Stdio::from(f));
    }
    cmd.stdin(Stdio::null());
    cmd.spawn().with_context(|| format!("starting {name}"))
}

/// Where a federated run keeps its files, under `<results>/work`.
struct WorkDirs {
    work: PathBuf,
    logs: PathBuf,
    store: PathBuf,
    port_file: PathBuf,
}

impl WorkDirs {
    fn new(results: &Path) -> Self {
        let work = results.join("work");
        WorkDirs {
            logs: work.join("logs"),
            store: work.join("model-store"),
            port_file: work.join("aggregator.port"),
            work,
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

/// The aggregator's command line (without the DP and secure-aggregation options).
fn aggregator_command(
    bin: &Path,
    args: &SimulateArgs,
    arch: Arch,
    names: &[String],
    pki: &StudyPkiFiles,
    dirs: &WorkDirs,
) -> Command {
    let mut agg = Command::new(bin);
    agg.arg("--study-id")
        .arg(&args.study_id)
        .arg("--rounds")
        .arg(args.rounds.to_string())
        .arg("--strategy")
        .arg(args.strategy.name())
        .arg("--fedprox-mu")
        .arg(args.fedprox_mu.to_string())
        .arg("--scaffold-server-lr")
        .arg(args.scaffold_server_lr.to_string())
        .arg("--fairfed-beta")
        .arg(args.fairfed_beta.to_string())
        .arg("--hospitals")
        .arg(names.join(","))
        .arg("--round-deadline-secs")
        .arg(args.round_deadline_secs.to_string())
        .arg("--tls-cert")
        .arg(&pki.server.cert)
        .arg("--tls-key")
        .arg(&pki.server.key)
        .arg("--tls-ca")
        .arg(&pki.ca_cert)
        .arg("--model-store")
        .arg(&dirs.store)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--port-file")
        .arg(&dirs.port_file)
        .arg("--arch")
        .arg(arch.name())
        .arg("--num-classes")
        .arg(args.task.num_classes().to_string())
        .arg("--init-seed")
        .arg(args.seed.to_string())
        .arg("--summary-path")
        .arg(dirs.work.join("aggregator-summary.json"))
        .arg("--linger-secs")
        .arg("3");
    if let Some(q) = args.quorum_min {
        agg.arg("--quorum-min").arg(q.to_string());
    }
    agg
}

/// Waits until the aggregator has written its port file, and fails if it exits first.
fn wait_for_port(dirs: &WorkDirs, aggregator: &mut Child) -> anyhow::Result<u16> {
    let t = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(&dirs.port_file)
            && let Ok(p) = s.trim().parse::<u16>()
        {
            return Ok(p);
        }
        if let Ok(Some(status)) = aggregator.try_wait() {
            bail!(
                "the aggregator exited ({status}) before listening:\n{}",
                tail(&dirs.log("aggregator"), 20)
            );
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the aggregator did not start listening within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What every trainer's command line shares.
struct Trainers<'a> {
    bin: PathBuf,
    args: &'a SimulateArgs,
    split_dir: &'a Path,
    dirs: &'a WorkDirs,
    port: u16,
    threads: usize,
    sensitive: String,
}

impl Trainers<'_> {
    /// Hospital `i`'s trainer command line (without the DP and secure-aggregation options).
    fn command(&self, i: usize, name: &str, tls: &TlsPaths) -> Command {
        let args = self.args;
        let mut t = Command::new(&self.bin);
        t.arg("--hospital")
            .arg(name)
            .arg("--study-id")
            .arg(&args.study_id)
            .arg("--shard")
            .arg(self.split_dir.join(hospital_dir_name(i)))
            .arg("--aggregator")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--server-name")
            .arg("localhost")
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-ca")
            .arg(&tls.ca_cert)
            .arg("--task")
            .arg(args.task.name())
            .arg("--sensitive")
            .arg(&self.sensitive)
            .arg("--epochs")
            .arg(args.local_epochs.to_string())
            .arg("--batch-size")
            .arg(args.batch_size.to_string())
            .arg("--lr")
            .arg(args.lr.to_string())
            .arg("--optimizer")
            .arg(args.optimizer.name())
            .arg("--momentum")
            .arg(args.momentum.to_string())
            .arg("--seed")
            .arg((args.seed + i as u64).to_string())
            .arg("--state-dir")
            .arg(self.dirs.work.join("state").join(name))
            .arg("--summary-path")
            .arg(self.dirs.work.join(format!("{name}-summary.json")))
            .arg("--loader-threads")
            .arg(self.threads.to_string())
            .env("RAYON_NUM_THREADS", self.threads.to_string());
        if let Some(s) = args.steps_cap() {
            t.arg("--local-steps").arg(s.to_string());
        }
        t
    }
}

/// A `round_closed` event of the aggregator: the round's result and how long it took.
fn closed_round(v: &serde_json::Value) -> Option<(RoundResult, Option<f64>)> {
    if v["event"] != "round_closed" {
        return None;
    }
    let r = serde_json::from_value::<RoundResult>(v["result"].clone()).ok()?;
    Some((r, v["round_seconds"].as_f64()))
}

/// Prints a closed round, records its privacy spending, and keeps it.
fn take_round(
    mut r: RoundResult,
    seconds: Option<f64>,
    total: u32,
    dp_plan: &mut Option<DpPlan>,
    rounds: &mut Vec<RoundResult>,
) -> anyhow::Result<()> {
    print_round(&r, total, seconds);
    if let Some(plan) = dp_plan {
        println!("{}", plan.record_round(&mut r)?);
    }
    rounds.push(r);
    Ok(())
}

/// Notes the trainers that failed since the last check, and fails when too few are left for the
/// quorum.
fn check_trainers(
    args: &SimulateArgs,
    children: &mut Children,
    failed: &mut Vec<String>,
    dirs: &WorkDirs,
) -> anyhow::Result<()> {
    for (name, c) in children.0.iter_mut().skip(1) {
        if failed.contains(name) {
            continue;
        }
        if let Ok(Some(st)) = c.try_wait()
            && !st.success()
        {
            let log = dirs.log(name);
            eprintln!(
                "{name} failed ({st}); last lines of {}:\n{}",
                log.display(),
                tail(&log, 15)
            );
            failed.push(name.clone());
        }
    }
    let quorum = args.quorum_min.map_or(args.hospitals, |q| q as usize);
    if args.hospitals - failed.len() < quorum {
        bail!(
            "{} of {} trainers failed ({}); the study cannot reach its quorum of {quorum}",
            failed.len(),
            args.hospitals,
            failed.join(", ")
        );
    }
    Ok(())
}

/// Gives the trainers up to 60 s to exit on their own once the final evaluation is in.
fn wait_for_trainers(children: &mut Children, failed: &[String], dirs: &WorkDirs) {
    let t = Instant::now();
    for (name, c) in children.0.iter_mut().skip(1) {
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() && !failed.contains(name) {
                        eprintln!(
                            "warning: {name} exited with {st}; see {}",
                            dirs.log(name).display()
                        );
                    }
                    break;
                }
                Ok(None) if t.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => break,
            }
        }
    }
}

/// The final model's parameters: decrypted on the hospital side, or the plaintext checkpoint.
fn final_params(secure: Option<&Secure>, store: &Path, rounds: u32) -> anyhow::Result<Vec<f32>> {
    Ok(match secure {
        Some(sec) => sec.final_model(store, rounds)?,
        None => {
            caduceus_aggregation::ModelStore::open(store)?
                .load_round(rounds)
                .context("reading the final checkpoint")?
                .params
        }
    })
}

/// Follows the aggregator's round events until it exits, printing and recording each closed round
/// and watching the trainers; returns the rounds, the trainers that failed and the aggregator's
/// exit status.
fn follow_rounds(
    args: &SimulateArgs,
    agg_out: ChildStdout,
    children: &mut Children,
    dirs: &WorkDirs,
    dp_plan: &mut Option<DpPlan>,
) -> anyhow::Result<(Vec<RoundResult>, Vec<String>, ExitStatus)> {
    // Round events from the aggregator's stdout.
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(agg_out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut rounds: Vec<RoundResult> = Vec::new();
    let mut failed_trainers: Vec<String> = Vec::new();
    let agg_status: ExitStatus = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some((mut r, secs)) = closed_round(&v) {
                    if let Some(s) = secs {
                        r.extra.insert("round_seconds".into(), serde_json::json!(s));
                    }
                    take_round(r, secs, args.rounds, dp_plan, &mut rounds)?;
                    write_rounds(&args.results, &rounds)?;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(100)),
        }
        check_trainers(args, children, &mut failed_trainers, dirs)?;
        if let Ok(Some(st)) = children.0[0].1.try_wait() {
            // Drain what is left of stdout.
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some((r, secs)) = closed_round(&v)
                {
                    take_round(r, secs, args.rounds, dp_plan, &mut rounds)?;
                }
            }
            break st;
        }
    };
    Ok((rounds, failed_trainers, agg_status))
}

/// Runs a federated study: the PKI, the DP plan and `config.json`, the aggregator and one trainer
/// per hospital, the round events until the aggregator exits, and the final evaluation.
pub(super) fn run_federated(
    args: &SimulateArgs,
    arch: Arch,
    prepared: &Prepared,
    started: Instant,
) -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let aggregator_bin = find_bin(&bins, "caduceus-aggregator")?;
    let trainer_bin = find_bin(&bins, "caduceus-trainer")?;
    let dirs = WorkDirs::new(&args.results);
    std::fs::create_dir_all(&dirs.logs)?;
    let names: Vec<String> = (0..args.hospitals)
        .map(|i| format!("{HOSPITAL_PREFIX}{i}"))
        .collect();
    let pki = caduceus_pki::write_study_pki(
        &dirs.work.join("pki"),
        &args.study_id,
        &names,
        &["localhost".to_string()],
        &["127.0.0.1".parse().expect("loopback address")],
    )?;
    let mut config = config_json(args, prepared, "federated");
    let mut dp_plan = dp_plan_for(args, prepared.split_dir.as_path(), &mut config)?;
    std::fs::write(
        args.results.join(CONFIG_FILE),
        serde_json::to_vec_pretty(&config)?,
    )?;

    let mut agg = aggregator_command(&aggregator_bin, args, arch, &names, &pki, &dirs);
    if let Some(plan) = &dp_plan {
        agg.args(plan.aggregator_args());
    }
    let secure = match args.secure_aggregation {
        SecureAggregationArg::Tfhe => Some(secure::setup(args, &dirs.work, &names, &mut agg)?),
        SecureAggregationArg::None => None,
    };
    let mut children = Children(Vec::new());
    let mut agg_child = spawn_logged("the aggregator", agg, &dirs.log("aggregator"), true)?;
    let agg_out = agg_child.stdout.take().context("aggregator stdout")?;
    children.0.push(("aggregator".into(), agg_child));

    let port = wait_for_port(&dirs, &mut children.0[0].1)?;
    println!(
        "aggregator listening on 127.0.0.1:{port} (mTLS); starting {} trainers ({} strategy, {} model, {} rounds x {} local epochs)",
        args.hospitals,
        args.strategy.name(),
        arch,
        args.rounds,
        args.local_epochs
    );

    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let trainers = Trainers {
        bin: trainer_bin,
        args,
        split_dir: &prepared.split_dir,
        dirs: &dirs,
        port,
        threads: args
            .trainer_threads
            .unwrap_or_else(|| (cores / args.hospitals).max(1)),
        sensitive: sensitive(args.task)
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(","),
    };
    for (i, (name, tls)) in pki.hospitals.iter().enumerate() {
        let mut t = trainers.command(i, name, tls);
        if let Some(plan) = &dp_plan {
            t.args(plan.trainer_args(i));
        }
        if let Some(sec) = &secure {
            sec.trainer_args(&mut t, name);
        }
        let child = spawn_logged(name, t, &dirs.log(name), false)?;
        children.0.push((name.clone(), child));
    }

    let (mut rounds, failed_trainers, agg_status) =
        follow_rounds(args, agg_out, &mut children, &dirs, &mut dp_plan)?;
    write_rounds(&args.results, &rounds)?;
    if !agg_status.success() {
        bail!(
            "the aggregator failed ({agg_status}); last lines of {}:\n{}",
            dirs.log("aggregator").display(),
            tail(&dirs.log("aggregator"), 20)
        );
    }
    wait_for_trainers(&mut children, &failed_trainers, &dirs);
    let params = final_params(secure.as_ref(), &dirs.store, args.rounds)?;
    let model = Model::from_flat(arch, args.task.num_classes(), &params)?;
    finish(args, prepared, &model, &mut rounds, started)
}
