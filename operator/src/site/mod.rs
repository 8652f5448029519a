//! The site agent (`caduceus-operator --role site`, docs/sites.md): runs in a hospital's own
//! cluster, dials out to the coordinator's gateway, and carries out the hospital's part of each
//! round itself. The hospital keeps its data, its study key, its trainer keys and its privacy
//! ledger; it accepts no inbound connection.
//!
//! - [`identity`]: enrolment with a join Secret, and the identity Secret it leaves;
//! - [`agent`]: the stream (mTLS, `SiteHello`, reconnection with backoff);
//! - [`check`] (pure): what the site refuses, and why;
//! - [`assign`]: the [`assign::Site`] handler: assignments, `Start`, `Cancel`, key requests, and
//!   the settlement of trainers that end;
//! - [`state`]: the durable record of assignments and the newest round seen per study;
//! - [`keys`]: the study keys the site holds, and sealing them.
//!
//! The agent needs only the `HospitalClient` CRD (its own; the hospital controller keeps its
//! `Ready` condition and ledger mirror), Jobs, Secrets, ConfigMaps and ServiceAccounts.

pub mod agent;
pub mod assign;
pub mod check;
pub mod identity;
pub mod keys;
pub mod state;

use std::sync::Arc;

pub use assign::Site;

use crate::build::Settings;
use crate::telemetry::Metrics;

/// How a site agent is configured (`--role site`).
#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub operator_namespace: String,
    /// The site's own HospitalClient: `hospital_namespace/hospital`.
    pub hospital_namespace: String,
    pub hospital: String,
    /// The join Secret (operator namespace) used once, to enrol.
    pub join_secret: String,
    pub settings: Settings,
}

/// Enrols (once) and runs the stream until `stop`.
///
/// # Errors
/// Only when the agent cannot run at all; enrolment and stream errors are retried with backoff.
pub async fn run(
    client: kube::Client,
    cfg: SiteConfig,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut backoff = agent::Backoff::default();
    let id = loop {
        match identity::ensure(&client, &cfg.operator_namespace, &cfg.join_secret, &cfg.hospital).await {
            Ok(id) => break id,
            Err(e) => {
                let d = backoff.next_delay();
                tracing::warn!("enrolment: {e:#}; retrying in {:.1} s", d.as_secs_f64());
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
                }
            }
        }
    };
    tracing::info!(
        hospital = format!("{}/{}", cfg.hospital_namespace, cfg.hospital),
        coordinator_name = id.hospital,
        "site agent running"
    );
    let site = Site {
        client,
        operator_ns: cfg.operator_namespace,
        hospital_ns: cfg.hospital_namespace,
        hospital: cfg.hospital,
        settings: cfg.settings,
        me: id.hospital.clone(),
        seal: id.seal.clone(),
        metrics,
    };
    agent::serve(site, id, stop).await
}
