//! `caduceus-operator`: runs the study, round and hospital controllers while it holds the leader
//! Lease, and serves `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound};
use caduceus_operator::build::{EndpointMode, Settings};
use caduceus_operator::leader::LeaderElector;
use caduceus_operator::telemetry::{self, Metrics};
use caduceus_operator::{Context, gateway, hospital, names, round, site, study};
use caduceus_startup::otel;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tracing_subscriber::Layer;

/// What this instance is (docs/sites.md).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Coordinator and hospitals in one cluster (the default).
    All,
    /// The study owner's cluster: studies, rounds, aggregators and the site gateway.
    Coordinator,
    /// A hospital's own cluster: its HospitalClient, trainer Jobs and privacy ledger; dials out.
    Site,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Join tokens for sites (coordinator).
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCommand),
    /// Enrolled sites (coordinator).
    #[command(subcommand)]
    Site(SiteCommand),
}

#[derive(clap::Subcommand, Debug)]
enum JoinTokenCommand {
    /// Makes a one-time join token for a hospital and prints the Secret to apply in its cluster.
    Create {
        /// The coordinator's name for the hospital (its mirror's name in --sites-namespace).
        #[arg(long)]
        hospital: String,
        /// How long the token can be used.
        #[arg(long, default_value_t = 86_400)]
        ttl_seconds: i64,
    },
}

#[derive(clap::Subcommand, Debug)]
enum SiteCommand {
    /// Removes a hospital: its certificate is refused from now on, its stream is cut, its mirror deleted.
    Remove {
        #[arg(long)]
        hospital: String,
    },
}

#[derive(Parser, Debug)]
#[command(name = "caduceus-operator", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// `all` (one cluster), `coordinator` or `site`.
    #[arg(long, env = "CADUCEUS_ROLE", value_enum, default_value = "all")]
    role: Role,
    /// Coordinator: where the site gateway listens.
    #[arg(long, env = "CADUCEUS_GATEWAY_LISTEN", default_value = "0.0.0.0:7443")]
    gateway_listen: SocketAddr,
    /// Coordinator: the `host:port` sites dial (written into join bundles).
    #[arg(long, env = "CADUCEUS_GATEWAY_ADDRESS")]
    gateway_address: Option<String>,
    /// Coordinator: extra DNS names or IPs on the gateway's certificate (comma-separated).
    #[arg(long, env = "CADUCEUS_GATEWAY_SERVER_NAME", value_delimiter = ',')]
    gateway_server_name: Vec<String>,
    /// Coordinator: the namespace of the sites' mirror HospitalClients (always served).
    #[arg(long, env = "CADUCEUS_SITES_NAMESPACE", default_value = "caduceus-sites")]
    sites_namespace: String,
    /// Site: the site's own HospitalClient, `<namespace>/<name>`.
    #[arg(long, env = "CADUCEUS_HOSPITAL")]
    hospital: Option<String>,
    /// Site: the join Secret (in --namespace) with `token`, `gateway-address` and `ca.crt`.
    #[arg(long, env = "CADUCEUS_JOIN_SECRET", default_value = "caduceus-join")]
    join_secret: String,
    /// The operator's own namespace (the leader Lease and the studies' TFHE master keys live here).
    #[arg(long, env = "CADUCEUS_NAMESPACE", default_value = "caduceus-system")]
    namespace: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CADUCEUS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Trainer image (a study's spec.images.trainer overrides it).
    #[arg(long, env = "CADUCEUS_TRAINER_IMAGE", default_value = concat!("caduceus-trainer:", env!("CARGO_PKG_VERSION")))]
    trainer_image: String,
    /// Aggregator image (a study's spec.images.aggregator overrides it).
    #[arg(long, env = "CADUCEUS_AGGREGATOR_IMAGE", default_value = concat!("caduceus-aggregator:", env!("CARGO_PKG_VERSION")))]
    aggregator_image: String,
    /// How trainers reach the aggregator: `service` (cluster DNS), `nodeport` (at --public-host, for
    /// sites in other clusters) or `loopback` (the local test cluster).
    #[arg(long, env = "CADUCEUS_ENDPOINT_MODE", value_enum, default_value = "service")]
    endpoint_mode: EndpointMode,
    /// With `--endpoint-mode nodeport`: the address of this cluster's nodes that trainers in other
    /// clusters dial (the aggregator's NodePort is appended).
    #[arg(long, env = "CADUCEUS_PUBLIC_HOST")]
    public_host: Option<String>,
    /// Leader election: the Lease's name (in --namespace); `--leader-elect=false` runs without one.
    #[arg(long, env = "CADUCEUS_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, env = "CADUCEUS_LEASE_NAME", default_value = "caduceus-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: the pod name from HOSTNAME, else a random id).
    #[arg(long, env = "CADUCEUS_IDENTITY")]
    identity: Option<String>,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "CADUCEUS_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// The study and hospital namespaces to serve, comma-separated. Unset: every namespace (which
    /// needs cluster-wide permissions on Jobs and Secrets). Set: Jobs, Secrets, Pods and claims are
    /// read and written only there and in --namespace, so namespaced Roles suffice; studies and
    /// hospitals elsewhere are refused with a condition.
    #[arg(long, env = "CADUCEUS_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Option<Vec<String>>,
    /// Log as JSON lines.
    #[arg(long, env = "CADUCEUS_LOG_JSON", default_value_t = false, action = clap::ArgAction::Set)]
    log_json: bool,
}

/// The operator's service name in exported spans (unless OTEL_SERVICE_NAME says otherwise).
const SERVICE: &str = "caduceus-operator";

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// How long one reconcile may take before it is abandoned and retried. The state machines are built
/// to be interrupted anywhere (as by a crash), so a request that never returns costs a retry, not a
/// stalled study.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);

fn bounded<K, F, Fut>(
    f: F,
) -> impl FnMut(
    Arc<K>,
    Arc<Context>,
) -> futures::future::BoxFuture<
    'static,
    Result<kube::runtime::controller::Action, caduceus_operator::Error>,
>
where
    K: Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Result<kube::runtime::controller::Action, caduceus_operator::Error>>
        + Send
        + 'static,
{
    move |obj, ctx| {
        Box::pin(async move {
            tokio::time::timeout(RECONCILE_TIMEOUT, f(obj, ctx))
                .await
                .unwrap_or_else(|_| {
                    Err(caduceus_operator::Error::Other(format!(
                        "reconcile did not finish within {} s; abandoned and retried",
                        RECONCILE_TIMEOUT.as_secs()
                    )))
                })
        })
    }
}

fn job_to_round(job: Job) -> Option<ObjectRef<TrainingRound>> {
    let l = job.metadata.labels?;
    let study = l.get(names::LABEL_STUDY)?;
    let ns = l.get(names::LABEL_STUDY_NAMESPACE)?;
    let round: u32 = l.get(names::LABEL_ROUND)?.parse().ok()?;
    let attempt: u32 = l.get(names::LABEL_ATTEMPT)?.parse().ok()?;
    Some(ObjectRef::new(&names::round_name(study, round, attempt)).within(ns))
}

/// The site role: the agent's stream to the coordinator and the hospital controller for the
/// site's own HospitalClient; no study or round controller, no listening port but metrics.
async fn run_site(
    args: &Args,
    client: Client,
    mut settings: Settings,
    metrics: Arc<Metrics>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    mut lost_rx: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some((hns, hname)) = args.hospital.as_deref().and_then(|h| h.split_once('/')) else {
        anyhow::bail!("--role site needs --hospital <namespace>/<name> (the site's own HospitalClient)");
    };
    let served = settings.watch_namespaces.get_or_insert_with(Default::default);
    served.insert(hns.to_string());
    let cfg = site::SiteConfig {
        operator_namespace: args.namespace.clone(),
        hospital_namespace: hns.to_string(),
        hospital: hname.to_string(),
        join_secret: args.join_secret.clone(),
        settings: settings.clone(),
    };
    let ctx = Arc::new(Context::new(client.clone(), settings, metrics.clone()));
    let hospitals: Api<HospitalClient> = Api::namespaced(client.clone(), hns);
    let mut rx = stop_rx.clone();
    let hospital_ctl = Controller::new(hospitals, watcher::Config::default())
        .graceful_shutdown_on(async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .run(hospital::reconcile, hospital::error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let agent = site::run(client, cfg, metrics, stop_rx.clone());
    tokio::pin!(agent);
    tracing::info!(hospital = ?args.hospital, "site agent started");
    let lost = tokio::select! {
        _ = shutdown_signal() => false,
        _ = lost_rx.wait_for(|l| *l) => true,
        r = &mut agent => { r?; false }
        _ = hospital_ctl => false,
    };
    let _ = stop_tx.send(true);
    if lost {
        std::process::exit(1);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    // Logs, and spans over OTLP when the OTEL_* variables ask for it (startup/src/otel.rs); dropping
    // `telemetry` at the end flushes the spans still queued.
    let telemetry = if args.log_json {
        otel::install(
            tracing_subscriber::fmt::layer().json().with_filter(filter),
            SERVICE,
        )
    } else {
        otel::install(tracing_subscriber::fmt::layer().with_filter(filter), SERVICE)
    };
    if telemetry.exporting() {
        tracing::info!("exporting spans over OTLP; trainer and aggregator Jobs get the same OTEL_* settings");
    }
    if args.endpoint_mode == EndpointMode::NodePort && args.public_host.is_none() {
        anyhow::bail!(
            "--endpoint-mode nodeport needs --public-host (the address trainers in other clusters dial)"
        );
    }
    let client = Client::try_default().await?;
    let gateway_address = args.gateway_address.clone().unwrap_or_else(|| {
        format!(
            "caduceus-gateway.{}.svc:{}",
            args.namespace,
            args.gateway_listen.port()
        )
    });
    match &args.command {
        Some(Command::JoinToken(JoinTokenCommand::Create {
            hospital,
            ttl_seconds,
        })) => {
            let (token, manifest) = gateway::enrol::create_join_token(
                &client,
                &args.namespace,
                hospital,
                *ttl_seconds,
                &gateway_address,
            )
            .await?;
            eprintln!(
                "join token {} for hospital {hospital} (valid {ttl_seconds} s); apply this Secret in the site's operator namespace:",
                token.id
            );
            print!("{manifest}");
            return Ok(());
        }
        Some(Command::Site(SiteCommand::Remove { hospital })) => {
            gateway::enrol::remove_site(&client, &args.namespace, &args.sites_namespace, hospital).await?;
            eprintln!("removed site {hospital}: its certificate is refused from now on");
            return Ok(());
        }
        None => {}
    }
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let m = metrics.clone();
        let mut rx = stop_rx.clone();
        let addr = args.metrics_addr;
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = telemetry::serve(addr, m, stop).await {
                tracing::error!("metrics server: {e}");
            }
        });
    }
    client.apiserver_version().await?;
    metrics.ready.store(true, Ordering::Relaxed);

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("caduceus-operator-{}", std::process::id()));
    let ttl = Duration::from_secs(args.lease_seconds.max(3));
    let elector = Arc::new(LeaderElector::new(
        client.clone(),
        &args.namespace,
        &args.lease_name,
        &identity,
        ttl,
    ));
    if args.leader_elect {
        tracing::info!(identity, lease = %args.lease_name, "waiting for leadership");
        let acquire = async {
            loop {
                match elector.try_acquire_or_renew().await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => tracing::warn!("leader election: {e}"),
                }
                tokio::time::sleep(ttl / 5).await;
            }
        };
        tokio::select! {
            _ = acquire => {}
            _ = shutdown_signal() => return Ok(()),
        }
        tracing::info!(identity, "acquired leadership");
    }
    metrics.leading.store(true, Ordering::Relaxed);

    // Renew the Lease; stop acting (exit) as soon as it cannot be renewed in time, before another
    // replica may take it over.
    let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
    if args.leader_elect {
        let elector = elector.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            loop {
                tokio::time::sleep(ttl / 3).await;
                match elector.try_acquire_or_renew().await {
                    Ok(true) => last = Instant::now(),
                    Ok(false) => {
                        tracing::error!("lost the leader Lease to another replica");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!("renewing the leader Lease: {e}"),
                }
                if last.elapsed() > ttl * 2 / 3 {
                    tracing::error!("could not renew the leader Lease in time");
                    let _ = lost_tx.send(true);
                    return;
                }
            }
        });
    }

    let mut settings = Settings {
        operator_namespace: args.namespace.clone(),
        trainer_image: args.trainer_image.clone(),
        aggregator_image: args.aggregator_image.clone(),
        endpoint_mode: args.endpoint_mode,
        public_host: args.public_host.clone(),
        watch_namespaces: args.watch_namespaces.clone().map(|v| {
            v.into_iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect()
        }),
        telemetry_env: otel::forwarded_env(std::env::vars()),
    };
    if args.role == Role::Coordinator
        && let Some(w) = settings.watch_namespaces.as_mut()
    {
        w.insert(args.sites_namespace.clone());
    }
    if args.role == Role::Site {
        return run_site(&args, client, settings, metrics, stop_tx, stop_rx, lost_rx).await;
    }
    if let Some(w) = &settings.watch_namespaces {
        tracing::info!(namespaces = ?w, "serving only these namespaces");
    }
    let mut ctx = Context::new(client.clone(), settings, metrics.clone());
    if args.role == Role::Coordinator {
        let mut names = vec!["127.0.0.1".to_string()];
        names.extend(
            args.gateway_server_name
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty()),
        );
        if let Some(host) = gateway_address.rsplit_once(':').map(|(h, _)| h.to_string()) {
            names.push(host);
        }
        names.push(format!("caduceus-gateway.{}.svc", args.namespace));
        names.sort();
        names.dedup();
        let (gw, rx) = gateway::Gateway::new(gateway::GatewayConfig {
            listen: args.gateway_listen,
            address: gateway_address.clone(),
            server_names: names,
            sites_namespace: args.sites_namespace.clone(),
        });
        ctx.gateway = Some(Arc::new(gw));
        // Sites report over the stream, not through watch events: look at running rounds often.
        // (kube's `reconcile_on` is still an unstable feature.)
        ctx.poll = Duration::from_secs(3);
        drop(rx);
    }
    let ctx = Arc::new(ctx);
    if let Some(gw) = ctx.gateway.clone() {
        let (c, rx) = (ctx.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = gateway::server::serve(gw, c, rx).await {
                tracing::error!("site gateway: {e:#}");
                std::process::exit(1);
            }
        });
    }
    let managed =
        watcher::Config::default().labels(&format!("{}={}", names::LABEL_MANAGED_BY, names::MANAGED_BY));

    let studies: Api<FederatedStudy> = Api::all(client.clone());
    let rounds: Api<TrainingRound> = Api::all(client.clone());
    let hospitals: Api<HospitalClient> = Api::all(client.clone());

    let stop_on = |rx: tokio::sync::watch::Receiver<bool>| async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    };
    let study_ctl = Controller::new(studies, watcher::Config::default())
        .owns(rounds.clone(), watcher::Config::default())
        .watches(hospitals.clone(), watcher::Config::default(), |h| {
            study::studies_consented_by(&h)
        })
        .graceful_shutdown_on(stop_on(stop_rx.clone()))
        .run(bounded(study::reconcile), study::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let mut round_ctl = Controller::new(rounds, watcher::Config::default());
    // Jobs exist only in the served study and hospital namespaces (never in the operator's own).
    match ctx.settings.watch_namespaces.clone() {
        None => {
            round_ctl = round_ctl.watches(Api::<Job>::all(client.clone()), managed.clone(), job_to_round);
        }
        Some(all) => {
            for ns in all {
                round_ctl = round_ctl.watches(
                    Api::<Job>::namespaced(client.clone(), &ns),
                    managed.clone(),
                    job_to_round,
                );
            }
        }
    }
    let round_ctl = round_ctl
        .graceful_shutdown_on(stop_on(stop_rx.clone()))
        .run(bounded(round::reconcile), round::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let hospital_ctl = Controller::new(hospitals, watcher::Config::default())
        .graceful_shutdown_on(stop_on(stop_rx.clone()))
        .run(hospital::reconcile, hospital::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let controllers = async {
        tokio::join!(study_ctl, round_ctl, hospital_ctl);
    };
    tokio::pin!(controllers);
    tracing::info!("controllers started");
    let lost = tokio::select! {
        _ = shutdown_signal() => false,
        _ = lost_rx.wait_for(|l| *l) => true,
        _ = &mut controllers => false,
    };
    let _ = stop_tx.send(true);
    if lost {
        // Another replica may act now: stop at once.
        std::process::exit(1);
    }
    tracing::info!("shutting down: finishing in-flight reconciliations");
    let _ = tokio::time::timeout(Duration::from_secs(20), controllers).await;
    if args.leader_elect {
        let _ = elector.step_down().await;
    }
    tracing::info!("stopped");
    Ok(())
}
