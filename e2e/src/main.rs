//! localnode: a test stand-in for kubelet (not a product feature). See the crate docs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use caduceus_e2e::image::ImageMap;
use caduceus_e2e::kubelet::{PodLoop, kill_stale_processes};
use caduceus_e2e::node::{self, Capacity};
use caduceus_e2e::{NodeContext, pv};
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tracing::info;

/// A TEST STAND-IN FOR KUBELET, NOT A PRODUCT FEATURE.
///
/// Registers a Node and runs every Pod scheduled onto it as local processes, without isolation:
/// images map to local binaries (`--image-map NAME=PATH`, or `caduceus[-<x>][:tag]` → `<bin dir>/caduceus[-<x>]`),
/// volumes are written to a per-pod directory and container paths in command, args and env are
/// rewritten to it. It exists so that the control-plane tests can run real Jobs on machines without
/// a container runtime. See docs/local-control-plane.md.
#[derive(Parser, Debug)]
#[command(name = "localnode", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// Kubeconfig with the node's credentials.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Name of the Node object.
    #[arg(long, default_value = "localnode")]
    node_name: String,
    /// Address reported as the node's InternalIP and as every Pod's IP.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// Directory for pod dirs (volumes, logs) and PVC data (`<state>/pvcs/<ns>/<claim>`).
    #[arg(
        long,
        env = "LOCALNODE_STATE_DIR",
        default_value = "/tmp/caduceus-cluster/localnode"
    )]
    state_dir: PathBuf,
    /// Where `caduceus[-<x>]` images are found; default: the directory of this binary.
    #[arg(long, env = "CADUCEUS_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Maps an image (without tag) to a local binary: NAME=PATH. Repeatable.
    #[arg(long = "image-map", value_name = "NAME=PATH")]
    image_map: Vec<String>,
    /// Passes a variable of localnode's own environment to every container. Repeatable.
    #[arg(long = "pass-env", value_name = "NAME")]
    pass_env: Vec<String>,
    /// Extra Node label KEY=VALUE. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Advertised CPU capacity.
    #[arg(long, default_value = "32")]
    cpu: String,
    /// Advertised memory capacity.
    #[arg(long, default_value = "128Gi")]
    memory: String,
    /// Advertised Pod capacity.
    #[arg(long, default_value = "110")]
    max_pods: String,
    /// Do not create hostPath PersistentVolumes for Pending claims.
    #[arg(long)]
    no_provision_pvcs: bool,
    /// Seconds between node status heartbeats.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Test helper: exits 0 if the file at PATH holds exactly EXPECTED, 1 otherwise.
    #[command(hide = true, name = "selftest-read-file")]
    ReadFile { path: PathBuf, expected: String },
    /// Test helper: exits 0 if every NAME=VALUE is set exactly so (`!NAME`: must be unset).
    #[command(hide = true, name = "selftest-env")]
    Env { checks: Vec<String> },
    /// Test helper: writes MESSAGE to the termination log and exits with CODE.
    #[command(hide = true, name = "selftest-fail")]
    Fail {
        #[arg(long)]
        code: i32,
        #[arg(long)]
        message: String,
        #[arg(long)]
        termination_log: PathBuf,
    },
    /// Test helper: fails (exit 1) when MARKER does not exist yet, creating it; succeeds otherwise.
    #[command(hide = true, name = "selftest-flaky")]
    Flaky { marker: PathBuf },
    /// Test helper: writes its pid to --pid-file and sleeps.
    #[command(hide = true, name = "selftest-sleep")]
    Sleep {
        seconds: u64,
        #[arg(long)]
        pid_file: Option<PathBuf>,
        #[arg(long)]
        ignore_sigterm: bool,
    },
}

fn selftest(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::ReadFile { path, expected } => {
            let got =
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            if got != expected {
                bail!("{} holds {got:?}, expected {expected:?}", path.display());
            }
            println!("ok: {} holds the expected {} bytes", path.display(), got.len());
        }
        Cmd::Env { checks } => {
            for c in checks {
                if let Some(name) = c.strip_prefix('!') {
                    if let Ok(v) = std::env::var(name) {
                        bail!("{name} is set to {v:?}, expected it unset");
                    }
                } else {
                    let (name, want) = c
                        .split_once('=')
                        .with_context(|| format!("bad check {c:?}: expected NAME=VALUE or !NAME"))?;
                    let got = std::env::var(name).with_context(|| format!("{name} is not set"))?;
                    if got != want {
                        bail!("{name} is {got:?}, expected {want:?}");
                    }
                }
            }
            println!("ok: environment as expected");
        }
        Cmd::Fail {
            code,
            message,
            termination_log,
        } => {
            eprintln!("selftest-fail: exiting with {code}");
            std::fs::write(&termination_log, &message)
                .with_context(|| format!("writing {}", termination_log.display()))?;
            std::process::exit(code);
        }
        Cmd::Flaky { marker } => {
            if !marker.exists() {
                std::fs::write(&marker, b"1").with_context(|| format!("writing {}", marker.display()))?;
                bail!("first run: created {}, failing on purpose", marker.display());
            }
            println!("second run: {} exists", marker.display());
        }
        Cmd::Sleep {
            seconds,
            pid_file,
            ignore_sigterm,
        } => {
            if ignore_sigterm {
                // SAFETY: setting a signal disposition to SIG_IGN has no handler to be unsafe in.
                unsafe {
                    libc::signal(libc::SIGTERM, libc::SIG_IGN);
                }
            }
            if let Some(p) = pid_file {
                std::fs::write(&p, std::process::id().to_string())
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            println!("sleeping {seconds}s");
            std::thread::sleep(Duration::from_secs(seconds));
        }
    }
    Ok(())
}

fn parse_kv(flag: &str, s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("bad {flag} {s:?}: expected KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

async fn run_node(a: NodeArgs) -> anyhow::Result<()> {
    let kubeconfig = a
        .kubeconfig
        .context("no kubeconfig: pass --kubeconfig or set KUBECONFIG")?;
    let kc = Kubeconfig::read_from(&kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", kubeconfig.display()))?;
    let api_url = config.cluster_url.to_string().trim_end_matches('/').to_string();
    let client = kube::Client::try_from(config).context("building the API client")?;

    let bin_dir = match a.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .context("locating the localnode binary")?
            .parent()
            .context("the localnode binary has no parent dir")?
            .to_path_buf(),
    };
    let mut images = ImageMap::new(bin_dir);
    for m in &a.image_map {
        images.add_flag(m)?;
    }
    let mut labels = BTreeMap::new();
    for l in &a.labels {
        let (k, v) = parse_kv("--label", l)?;
        labels.insert(k, v);
    }
    let mut base_env = vec![(
        "PATH".to_string(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    )];
    for name in &a.pass_env {
        if let Ok(v) = std::env::var(name) {
            base_env.push((name.clone(), v));
        }
    }
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating state dir {}", a.state_dir.display()))?;
    let state_dir = a.state_dir.canonicalize()?;
    let killed = kill_stale_processes(&state_dir);
    if killed > 0 {
        info!(killed, "killed processes left by an earlier localnode");
    }

    let ctx = Arc::new(NodeContext::new(
        client,
        a.node_name,
        a.address,
        state_dir,
        images,
        base_env,
        api_url,
        Capacity {
            cpu: a.cpu,
            memory: a.memory,
            pods: a.max_pods,
        },
        labels,
    ));
    node::register(&ctx).await?;
    node::init_lease(&ctx).await;
    info!(node = %ctx.node_name, state_dir = %ctx.state_dir.display(), bin_dir = %ctx.images.bin_dir().display(), "localnode is up (a test stand-in for kubelet)");
    let hb = tokio::spawn(node::heartbeat(
        ctx.clone(),
        Duration::from_secs(a.heartbeat_seconds.max(1)),
    ));
    let prov = (!a.no_provision_pvcs).then(|| tokio::spawn(pv::provision(ctx.clone())));

    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT"),
        }
    };
    PodLoop::new(ctx).run(shutdown).await;
    hb.abort();
    if let Some(p) = prov {
        p.abort();
    }
    info!("localnode stopped");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(cmd) = cli.cmd {
        return selftest(cmd);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_node(cli.node))
}
