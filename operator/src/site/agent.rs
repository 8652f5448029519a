//! The site's one outbound stream: mTLS to the gateway with the identity's certificate, `SiteHello`
//! first (and again whenever the HospitalClient, the ledger or the held keys change), then the
//! [`Site`] handler's answers to the coordinator's messages and the states of trainers as they end.
//! Any error ends the stream; the agent reconnects with backoff (1 s doubling to 30 s, with
//! jitter). Trainers that end while the stream is down are settled all the same, and their states
//! go in the next `SiteHello`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use caduceus_crds::HospitalClient;
use caduceus_crds::conditions::{ConditionExt, types};
use caduceus_proto::v1::site_gateway_client::SiteGatewayClient;
use caduceus_proto::v1::{SiteHello, SiteMessage, site_message};
use futures::stream::BoxStream;
use futures::{FutureExt, SinkExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::assign::Site;
use super::identity::{self, Identity};
use super::keys;
use crate::ledger;
use crate::names;

/// Reconnection delays: 1 s doubling to 30 s; each delay drawn from [d/2, d].
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The next delay, given a uniform draw `u` in [0, 1) (the jitter).
    pub fn next_with(&mut self, u: f64) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d.mul_f64(0.5 + 0.5 * u.clamp(0.0, 1.0))
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// What of a `SiteHello` makes it worth sending again (the assignments travel as states).
#[derive(Debug, Clone, PartialEq)]
pub struct HelloView {
    pub spec_json: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub ledger_json: String,
    pub study_keys: BTreeMap<String, String>,
}

/// The view of a site's own HospitalClient and ledger (pure).
pub fn hello_view(
    h: Option<&HospitalClient>,
    ledger: &ledger::DurableLedger,
    study_keys: BTreeMap<String, String>,
) -> HelloView {
    HelloView {
        spec_json: h
            .map(|h| serde_json::to_string(&h.spec).expect("a spec serialises"))
            .unwrap_or_default(),
        labels: h.map(|h| h.labels().clone()).unwrap_or_default(),
        ready: h.is_some_and(|h| {
            h.metadata.deletion_timestamp.is_none()
                && h.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.is_true(types::READY))
        }),
        ledger_json: serde_json::to_string(ledger).expect("a ledger serialises"),
        study_keys,
    }
}

async fn hello(site: &Site) -> anyhow::Result<(SiteHello, HelloView)> {
    let h = Api::<HospitalClient>::namespaced(site.client.clone(), &site.hospital_ns)
        .get_opt(&site.hospital)
        .await?;
    let dl = ledger::load(&site.client, &site.operator_ns, &site.hospital_ns, &site.hospital)
        .await?
        .unwrap_or_else(|| ledger::DurableLedger {
            hospital: names::hospital_ref(&site.hospital_ns, &site.hospital),
            ..Default::default()
        });
    let view = hello_view(
        h.as_ref(),
        &dl,
        keys::fingerprints(&site.client, &site.operator_ns).await?,
    );
    let msg = SiteHello {
        hospital_spec_json: view.spec_json.clone(),
        labels: view.labels.clone().into_iter().collect(),
        ready: view.ready,
        ledger_json: view.ledger_json.clone(),
        seal_public_key: site.seal.public_key().to_vec(),
        study_keys: view.study_keys.clone().into_iter().collect(),
        assignments: site.states().await?,
    };
    Ok((msg, view))
}

fn hello_msg(h: SiteHello) -> SiteMessage {
    SiteMessage {
        body: Some(site_message::Body::Hello(h)),
    }
}

/// Wakes the agent when a trainer Job, the HospitalClient or the ledger changes.
fn pokes(site: &Site) -> BoxStream<'static, ()> {
    let jobs = watcher(
        Api::<Job>::namespaced(site.client.clone(), &site.hospital_ns),
        watcher::Config::default().labels(&format!(
            "{}=trainer,{}={}",
            names::LABEL_COMPONENT,
            names::LABEL_HOSPITAL,
            site.hospital
        )),
    )
    .default_backoff()
    .map(|_| ());
    let hospital = watcher(
        Api::<HospitalClient>::namespaced(site.client.clone(), &site.hospital_ns),
        watcher::Config::default().fields(&format!("metadata.name={}", site.hospital)),
    )
    .default_backoff()
    .map(|_| ());
    let ledger = watcher(
        Api::<ConfigMap>::namespaced(site.client.clone(), &site.operator_ns),
        watcher::Config::default().fields(&format!(
            "metadata.name={}",
            ledger::configmap_name(&site.hospital_ns, &site.hospital)
        )),
    )
    .default_backoff()
    .map(|_| ());
    futures::stream::select_all([jobs.boxed(), hospital.boxed(), ledger.boxed()]).boxed()
}

/// Waits for the next poke (drained: one wake-up for a burst) or the tick.
async fn woken(pokes: &mut BoxStream<'static, ()>, tick: &mut tokio::time::Interval) {
    tokio::select! {
        _ = tick.tick() => {}
        Some(()) = pokes.next() => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            while let Some(Some(())) = pokes.next().now_or_never() {}
        }
    }
}

enum Ended {
    Stop,
    Closed,
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

/// Runs the stream until `stop`, reconnecting with backoff.
pub async fn serve(site: Site, id: Identity, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut pokes = pokes(&site);
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut backoff = Backoff::default();
    loop {
        if stopped(&stop) {
            return Ok(());
        }
        let began = Instant::now();
        match serve_once(&site, &id, &mut stop, &mut pokes, &mut tick).await {
            Ok(Ended::Stop) => return Ok(()),
            Ok(Ended::Closed) => {
                tracing::warn!(gateway = id.gateway_address, "the gateway closed the stream")
            }
            Err(e) => tracing::warn!(gateway = id.gateway_address, "the stream ended: {e:#}"),
        }
        if began.elapsed() > BACKOFF_MAX * 2 {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::info!("reconnecting in {:.1} s", delay.as_secs_f64());
        let until = tokio::time::sleep(delay);
        tokio::pin!(until);
        // Trainers that end meanwhile are settled all the same.
        loop {
            tokio::select! {
                _ = &mut until => break,
                r = stop.changed() => if r.is_err() || stopped(&stop) { return Ok(()) },
                _ = woken(&mut pokes, &mut tick) => {
                    if let Err(e) = site.poll_trainers().await {
                        tracing::warn!("settling trainers: {e}");
                    }
                }
            }
        }
    }
}

async fn serve_once(
    site: &Site,
    id: &Identity,
    stop: &mut watch::Receiver<bool>,
    pokes: &mut BoxStream<'static, ()>,
    tick: &mut tokio::time::Interval,
) -> anyhow::Result<Ended> {
    // Settle what ended while the stream was down, so that the Hello says so.
    site.poll_trainers().await?;
    let ch = identity::channel(&id.gateway_address, &id.ca_pem, Some((&id.cert_pem, &id.key_pem))).await?;
    let mut gw = SiteGatewayClient::new(ch).max_decoding_message_size(caduceus_proto::MAX_MESSAGE_BYTES);
    let (mut tx, rx) = futures::channel::mpsc::channel::<SiteMessage>(64);
    let (first, mut view) = hello(site).await?;
    let n = first.assignments.len();
    tx.send(hello_msg(first)).await?;
    let mut inbound = gw
        .session(rx)
        .await
        .map_err(|s| anyhow::anyhow!("the gateway refused the stream: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    tracing::info!(
        gateway = id.gateway_address,
        hospital = id.hospital,
        ready = view.ready,
        assignments = n,
        "connected to the coordinator; SiteHello sent"
    );
    loop {
        tokio::select! {
            r = stop.changed() => if r.is_err() || stopped(stop) { return Ok(Ended::Stop) },
            m = inbound.message() => match m {
                Ok(Some(msg)) => {
                    for reply in site.handle(msg).await? {
                        tx.send(reply).await?;
                    }
                }
                Ok(None) => return Ok(Ended::Closed),
                Err(s) => anyhow::bail!("{:?}: {}", s.code(), s.message()),
            },
            _ = woken(pokes, tick) => {
                for s in site.poll_trainers().await? {
                    tx.send(SiteMessage { body: Some(site_message::Body::State(s)) }).await?;
                }
                let (h, v) = hello(site).await?;
                if v != view {
                    tracing::info!(ready = v.ready, "the HospitalClient, ledger or study keys changed: SiteHello sent again");
                    tx.send(hello_msg(h)).await?;
                    view = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter() {
        let mut b = Backoff::default();
        let full: Vec<u64> = (0..7).map(|_| b.next_with(0.999_999).as_secs()).collect();
        assert_eq!(full, vec![0, 1, 3, 7, 15, 29, 29]);
        let mut b = Backoff::default();
        assert_eq!(b.next_with(0.0), Duration::from_millis(500));
        assert_eq!(b.next_with(1.0), Duration::from_secs(2));
        b.reset();
        assert_eq!(b.next_with(1.0), BACKOFF_MIN);
    }

    #[test]
    fn the_hello_reports_readiness_from_the_ready_condition() {
        let mut h: HospitalClient = serde_yaml::from_str(
            r#"
apiVersion: fl.caduceus.dev/v1alpha1
kind: HospitalClient
metadata: {name: st-mary, namespace: north, labels: {region: north}}
spec:
  data: {claimName: faces}
  privacyBudget: {epsilon: 8}
"#,
        )
        .unwrap();
        let dl = ledger::DurableLedger::default();
        let v = hello_view(Some(&h), &dl, BTreeMap::new());
        assert!(!v.ready);
        assert_eq!(v.labels["region"], "north");
        h.status = Some(
            serde_json::from_value(serde_json::json!({"conditions": [{"type": "Ready", "status": "True", "reason": "DataClaimBound", "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}))
                .unwrap(),
        );
        let w = hello_view(Some(&h), &dl, BTreeMap::new());
        assert!(w.ready);
        assert_ne!(v, w, "a change of readiness resends the hello");
        assert!(!hello_view(None, &dl, BTreeMap::new()).ready);
    }
}
