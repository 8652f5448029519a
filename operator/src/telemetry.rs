//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub reconciliations: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub rounds: IntCounterVec,
    pub epsilon_spent: GaugeVec,
    pub epsilon_remaining: GaugeVec,
    pub fairness_gap: GaugeVec,
    pub participants: GaugeVec,
    pub accuracy: GaugeVec,
    pub worst_group_accuracy: GaugeVec,
    pub fairness_threshold: GaugeVec,
    pub round_started: GaugeVec,
    /// Set once the API server answered (readiness).
    pub ready: AtomicBool,
    /// Whether this replica holds the leader Lease.
    pub leading: AtomicBool,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("caduceus".into()), None).expect("valid prefix");
        let reconciliations = IntCounterVec::new(
            Opts::new("reconciliations_total", "Reconciliations by controller"),
            &["controller"],
        )
        .expect("metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Failed reconciliations by controller and error kind",
            ),
            &["controller", "kind"],
        )
        .expect("metric");
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Duration of reconciliations").buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )
        .expect("metric");
        let rounds = IntCounterVec::new(
            Opts::new(
                "rounds_total",
                "Finished training rounds by outcome (Succeeded, Failed)",
            ),
            &["namespace", "study", "outcome"],
        )
        .expect("metric");
        let epsilon_spent = GaugeVec::new(
            Opts::new(
                "privacy_epsilon_spent",
                "Epsilon spent on a hospital's data (PLD, at its budget delta)",
            ),
            &["namespace", "hospital"],
        )
        .expect("metric");
        let epsilon_remaining = GaugeVec::new(
            Opts::new("privacy_epsilon_remaining", "Epsilon left in a hospital's budget"),
            &["namespace", "hospital"],
        )
        .expect("metric");
        let fairness_gap = GaugeVec::new(
            Opts::new(
                "fairness_gap",
                "Latest fairness gap of a study (largest over sensitive attributes)",
            ),
            &["namespace", "study", "metric"],
        )
        .expect("metric");
        let participants = GaugeVec::new(
            Opts::new(
                "round_participants",
                "Hospitals whose update was aggregated in the latest round",
            ),
            &["namespace", "study"],
        )
        .expect("metric");
        let accuracy = GaugeVec::new(
            Opts::new(
                "study_accuracy",
                "Accuracy of a study's latest global model on the hospitals' validation data",
            ),
            &["namespace", "study"],
        )
        .expect("metric");
        let worst_group_accuracy = GaugeVec::new(
            Opts::new(
                "study_worst_group_accuracy",
                "Lowest accuracy over the groups of a study's sensitive attributes, latest round",
            ),
            &["namespace", "study"],
        )
        .expect("metric");
        let fairness_threshold = GaugeVec::new(
            Opts::new(
                "fairness_threshold",
                "A study's largest acceptable fairness gap (spec.fairness), per metric of fairness_gap",
            ),
            &["namespace", "study", "metric"],
        )
        .expect("metric");
        let round_started = GaugeVec::new(
            Opts::new(
                "round_started_timestamp_seconds",
                "Creation time (Unix seconds) of a study's running round; 0 when none runs",
            ),
            &["namespace", "study"],
        )
        .expect("metric");
        registry
            .register(Box::new(worst_group_accuracy.clone()))
            .expect("register");
        registry
            .register(Box::new(fairness_threshold.clone()))
            .expect("register");
        registry
            .register(Box::new(round_started.clone()))
            .expect("register");
        registry
            .register(Box::new(reconciliations.clone()))
            .expect("register");
        registry
            .register(Box::new(reconcile_errors.clone()))
            .expect("register");
        registry
            .register(Box::new(reconcile_duration.clone()))
            .expect("register");
        registry.register(Box::new(rounds.clone())).expect("register");
        registry
            .register(Box::new(epsilon_spent.clone()))
            .expect("register");
        registry
            .register(Box::new(epsilon_remaining.clone()))
            .expect("register");
        registry
            .register(Box::new(fairness_gap.clone()))
            .expect("register");
        registry
            .register(Box::new(participants.clone()))
            .expect("register");
        registry.register(Box::new(accuracy.clone())).expect("register");
        Self {
            registry,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            rounds,
            epsilon_spent,
            epsilon_remaining,
            fairness_gap,
            participants,
            accuracy,
            worst_group_accuracy,
            fairness_threshold,
            round_started,
            ready: AtomicBool::new(false),
            leading: AtomicBool::new(false),
        }
    }

    /// Makes a study's series visible from its first reconciliation: both outcome counters start at
    /// 0 (so `increase()` sees the first failure) and no round runs yet.
    pub fn init_study(&self, namespace: &str, study: &str) {
        for outcome in ["Succeeded", "Failed"] {
            self.rounds.with_label_values(&[namespace, study, outcome]);
        }
    }

    /// Drops every series of a deleted study.
    pub fn forget_study(&self, namespace: &str, study: &str) {
        for outcome in ["Succeeded", "Failed"] {
            let _ = self.rounds.remove_label_values(&[namespace, study, outcome]);
        }
        for g in [
            &self.participants,
            &self.accuracy,
            &self.worst_group_accuracy,
            &self.round_started,
        ] {
            let _ = g.remove_label_values(&[namespace, study]);
        }
        for metric in ["demographic_parity_difference", "equalized_odds_difference"] {
            let _ = self.fairness_gap.remove_label_values(&[namespace, study, metric]);
            let _ = self
                .fairness_threshold
                .remove_label_values(&[namespace, study, metric]);
        }
    }

    /// Starts timing one reconciliation of `controller`.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciliations.with_label_values(&[controller]).inc();
        ReconcileTimer {
            metrics: self,
            controller,
            start: Instant::now(),
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Observes the duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .with_label_values(&[self.controller])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        m.render(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(m): State<Arc<Metrics>>) -> (StatusCode, String) {
    if m.ready.load(Ordering::Relaxed) {
        let role = if m.leading.load(Ordering::Relaxed) {
            "leader"
        } else {
            "standby"
        };
        (StatusCode::OK, format!("ok ({role})"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the API server has not answered yet".into(),
        )
    }
}

/// Serves the endpoints until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(m);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
