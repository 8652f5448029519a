//! The coordinator's site gateway (issue 18, `docs/sites.md`): a tonic service over TLS that the
//! hospitals' site agents dial. The coordinator never connects to a site.
//!
//! - [`enrol`]: the sites CA, the gateway's certificate, join tokens and enrolment records;
//! - [`server`]: the `SiteGateway` service (`Enrol`, `Session`), identity from the client certificate;
//! - [`mirror`]: the coordinator's copy of each site's `HospitalClient`;
//! - [`keys`]: the sealed TFHE study keys the coordinator relays but cannot open;
//! - this module: the table of connected sites and of assignments, which the round controller uses
//!   in place of trainer Jobs for a participant that is a site.

pub mod enrol;
pub mod keys;
pub mod mirror;
pub mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use caduceus_crds::TrainingRound;
use caduceus_proto::v1::{
    Assignment, AssignmentPhase, AssignmentState, Cancel, CoordinatorMessage, KeyRecipient, KeyRequest,
    Start, coordinator_message::Body,
};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tonic::Status;

/// Where the gateway listens and what it tells sites.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// `host:port` the sites dial (written into join bundles).
    pub address: String,
    /// Names (DNS or IP) on the gateway's server certificate.
    pub server_names: Vec<String>,
    /// The namespace of the mirrors (`HospitalClient` copies of the sites).
    pub sites_namespace: String,
}

pub(crate) type Outbox = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// A site with an open stream.
struct Connected {
    conn: u64,
    /// SHA-256 of the certificate the stream was opened with.
    cert_sha256: String,
    tx: Outbox,
    seal_public_key: Vec<u8>,
    /// study id → fingerprint of the study keys the site holds.
    study_keys: BTreeMap<String, String>,
}

/// One hospital's part in one round, as the coordinator wants it and as the site last reported it.
struct Entry {
    hospital: String,
    round: ObjectRef<TrainingRound>,
    assignment: Option<Assignment>,
    state: Option<AssignmentState>,
    start: Option<Start>,
    cancel: Option<Cancel>,
    /// The connection the assignment was last sent on (resent on a new one).
    sent_on: Option<u64>,
}

#[derive(Default)]
struct State {
    sites: BTreeMap<String, Connected>,
    entries: BTreeMap<String, Entry>,
    /// Study ids with a key request in flight, and since when.
    key_requests: BTreeMap<String, Instant>,
    next_conn: u64,
}

/// The gateway's shared state. Methods never block on the network: messages go to each site's
/// outbox, and a site that is not connected gets them when it reconnects.
pub struct Gateway {
    pub cfg: GatewayConfig,
    state: Mutex<State>,
    wake: mpsc::UnboundedSender<ObjectRef<TrainingRound>>,
}

/// The round an assignment id belongs to (`<ns>/<round>@<uid>|<hospital>`).
fn round_of(id: &str) -> Option<ObjectRef<TrainingRound>> {
    let (ns, rest) = id.split_once('/')?;
    let (round, _) = rest.split_once('@')?;
    Some(ObjectRef::new(round).within(ns))
}

fn send(tx: &Outbox, body: Body) {
    if tx.try_send(Ok(CoordinatorMessage { body: Some(body) })).is_err() {
        tracing::warn!("a site's outbox is full or closed; the message is resent when it reconnects");
    }
}

impl Gateway {
    /// A gateway and the stream of rounds to reconcile when a site reports something.
    pub fn new(cfg: GatewayConfig) -> (Self, mpsc::UnboundedReceiver<ObjectRef<TrainingRound>>) {
        let (wake, rx) = mpsc::unbounded_channel();
        (
            Self {
                cfg,
                state: Mutex::new(State::default()),
                wake,
            },
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The site name of a participant (`<sites namespace>/<name>`), or `None` for a local hospital.
    pub fn site_of<'r>(&self, participant: &'r str) -> Option<&'r str> {
        participant
            .split_once('/')
            .filter(|(ns, _)| *ns == self.cfg.sites_namespace)
            .map(|(_, name)| name)
    }

    /// Whether `hospital` has an open stream.
    pub fn connected(&self, hospital: &str) -> bool {
        self.lock().sites.contains_key(hospital)
    }

    /// Each connected hospital with the SHA-256 of its certificate.
    pub fn connected_fingerprints(&self) -> Vec<(String, String)> {
        self.lock()
            .sites
            .iter()
            .map(|(h, c)| (h.clone(), c.cert_sha256.clone()))
            .collect()
    }

    /// The hospitals with an open stream.
    pub fn connected_sites(&self) -> Vec<String> {
        self.lock().sites.keys().cloned().collect()
    }

    /// Registers a new stream for `hospital` (replacing an older one, which then ends) and resends
    /// what the site has not answered. Returns the connection number.
    pub(crate) fn register(
        &self,
        hospital: &str,
        cert_sha256: &str,
        tx: Outbox,
        seal_public_key: Vec<u8>,
        study_keys: BTreeMap<String, String>,
    ) -> u64 {
        let mut st = self.lock();
        st.next_conn += 1;
        let conn = st.next_conn;
        st.sites.insert(
            hospital.to_string(),
            Connected {
                conn,
                cert_sha256: cert_sha256.to_string(),
                tx: tx.clone(),
                seal_public_key,
                study_keys,
            },
        );
        for e in st.entries.values_mut().filter(|e| e.hospital == hospital) {
            resend(e, conn, &tx);
        }
        conn
    }

    /// Updates what a connected site holds (a later `SiteHello`).
    pub(crate) fn update_hello(
        &self,
        hospital: &str,
        seal_public_key: Vec<u8>,
        study_keys: BTreeMap<String, String>,
    ) {
        if let Some(c) = self.lock().sites.get_mut(hospital) {
            c.seal_public_key = seal_public_key;
            c.study_keys = study_keys;
        }
    }

    /// Forgets a stream that ended (if it is still the current one for `hospital`).
    pub(crate) fn unregister(&self, hospital: &str, conn: u64) -> bool {
        let mut st = self.lock();
        if st.sites.get(hospital).is_some_and(|c| c.conn == conn) {
            st.sites.remove(hospital);
            return true;
        }
        false
    }

    /// Ends the stream of `hospital` with `why` (revocation); returns whether one was open.
    pub fn disconnect(&self, hospital: &str, why: &str) -> bool {
        let Some(c) = self.lock().sites.remove(hospital) else {
            return false;
        };
        send(&c.tx, Body::Error(why.to_string()));
        true
    }

    /// Records a site's report about one of its assignments (only its own: `hospital` is the
    /// stream's certified identity) and wakes the round.
    pub(crate) fn record(&self, hospital: &str, state: AssignmentState) -> Result<(), String> {
        let Some(round) = round_of(&state.assignment_id) else {
            return Err(format!("malformed assignment id {:?}", state.assignment_id));
        };
        if !state
            .assignment_id
            .ends_with(&format!("|{}/{hospital}", self.cfg.sites_namespace))
        {
            return Err(format!(
                "assignment {} is not this site's ({hospital})",
                state.assignment_id
            ));
        }
        {
            let mut st = self.lock();
            let e = st
                .entries
                .entry(state.assignment_id.clone())
                .or_insert_with(|| Entry {
                    hospital: hospital.to_string(),
                    round: round.clone(),
                    assignment: None,
                    state: None,
                    start: None,
                    cancel: None,
                    sent_on: None,
                });
            e.state = Some(state);
        }
        let _ = self.wake.send(round);
        Ok(())
    }

    /// The site's last report about assignment `id`.
    pub fn state(&self, id: &str) -> Option<AssignmentState> {
        self.lock().entries.get(id).and_then(|e| e.state.clone())
    }

    /// Sends an assignment (once per connection; a repeat is a no-op). A site that is not
    /// connected gets it when it reconnects.
    pub fn assign(&self, hospital: &str, a: Assignment) {
        let Some(round) = round_of(&a.id) else { return };
        let mut st = self.lock();
        let site = st.sites.get(hospital).map(|c| (c.conn, c.tx.clone()));
        let e = st.entries.entry(a.id.clone()).or_insert_with(|| Entry {
            hospital: hospital.to_string(),
            round,
            assignment: None,
            state: None,
            start: None,
            cancel: None,
            sent_on: None,
        });
        if e.assignment.is_none() {
            e.assignment = Some(a);
        }
        if let Some((conn, tx)) = site
            && e.sent_on != Some(conn)
            && e.cancel.is_none()
            && e.state.is_none()
        {
            e.sent_on = Some(conn);
            if let Some(a) = &e.assignment {
                send(&tx, Body::Assign(a.clone()));
            }
        }
    }

    /// Sends `Start` for an accepted assignment (kept and resent on reconnect until the site
    /// reports it started).
    pub fn start(&self, hospital: &str, id: &str, cert_pem: String) {
        let mut st = self.lock();
        let tx = st.sites.get(hospital).map(|c| c.tx.clone());
        let Some(e) = st.entries.get_mut(id) else { return };
        let start = Start {
            assignment_id: id.to_string(),
            cert_pem,
        };
        let first = e.start.is_none();
        e.start = Some(start.clone());
        if first && let Some(tx) = tx {
            send(&tx, Body::Start(start));
        }
    }

    /// Cancels an assignment that has not started (a started one keeps its spending at the site).
    pub fn cancel(&self, hospital: &str, id: &str, reason: &str) {
        let mut st = self.lock();
        let tx = st.sites.get(hospital).map(|c| c.tx.clone());
        let Some(e) = st.entries.get_mut(id) else { return };
        if e.cancel.is_some() {
            return;
        }
        let c = Cancel {
            assignment_id: id.to_string(),
            reason: reason.to_string(),
        };
        e.cancel = Some(c.clone());
        if let Some(tx) = tx {
            send(&tx, Body::Cancel(c));
        }
    }

    /// Forgets every entry of a round that ended (after its cancellations were sent).
    pub fn forget_round(&self, round: &ObjectRef<TrainingRound>) {
        self.lock()
            .entries
            .retain(|_, e| &e.round != round || e.cancel.is_some());
    }

    /// The X25519 key a connected site seals to, and whether it holds the study key `fingerprint`
    /// of `study_id` (any fingerprint when `None`).
    pub fn key_facts(&self, hospital: &str, study_id: &str) -> Option<(Vec<u8>, Option<String>)> {
        let st = self.lock();
        let c = st.sites.get(hospital)?;
        Some((c.seal_public_key.clone(), c.study_keys.get(study_id).cloned()))
    }

    /// Asks `holder` to make (or reuse) the study key and seal it to `recipients`; at most one
    /// request per study every 30 s.
    pub fn request_keys(&self, holder: &str, study_id: &str, recipients: Vec<KeyRecipient>) -> bool {
        let mut st = self.lock();
        if st
            .key_requests
            .get(study_id)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
        {
            return false;
        }
        let Some(tx) = st.sites.get(holder).map(|c| c.tx.clone()) else {
            return false;
        };
        st.key_requests.insert(study_id.to_string(), Instant::now());
        tracing::info!(
            holder,
            study_id,
            recipients = recipients.len(),
            "asking a site for the sealed study key"
        );
        send(
            &tx,
            Body::KeyRequest(KeyRequest {
                study_id: study_id.to_string(),
                recipients,
            }),
        );
        true
    }

    /// A key request was answered (or failed): the next one may go at once.
    pub(crate) fn key_answered(&self, study_id: &str) {
        self.lock().key_requests.remove(study_id);
    }

    /// Wakes every round that has an entry for `hospital` (its stream opened or closed).
    pub(crate) fn wake_rounds_of(&self, hospital: &str) {
        let rounds: Vec<_> = self
            .lock()
            .entries
            .values()
            .filter(|e| e.hospital == hospital)
            .map(|e| e.round.clone())
            .collect();
        for r in rounds {
            let _ = self.wake.send(r);
        }
    }

    /// Wakes one round.
    pub fn wake(&self, round: ObjectRef<TrainingRound>) {
        let _ = self.wake.send(round);
    }
}

/// What the round machine sees of a site's trainer: the site's last report stands for its Job.
/// A refusal reads as a failed trainer that never started (the site spent nothing).
pub fn job_view(state: Option<&AssignmentState>) -> crate::round::machine::JobView {
    use crate::round::machine::JobView;
    let Some(s) = state else { return JobView::Absent };
    match s.phase() {
        AssignmentPhase::Unspecified | AssignmentPhase::Cancelled => JobView::Absent,
        AssignmentPhase::Accepted => JobView::Suspended,
        AssignmentPhase::Started => JobView::Active,
        AssignmentPhase::Succeeded => JobView::Complete,
        AssignmentPhase::Failed => JobView::Failed(format!("site: {}", s.message)),
        AssignmentPhase::Refused => JobView::Failed(format!("RefusedBySite: {}", s.message)),
    }
}

/// Resends on a new connection what the site has not acted on.
fn resend(e: &mut Entry, conn: u64, tx: &Outbox) {
    let phase = e.state.as_ref().map(|s| s.phase());
    if let Some(c) = &e.cancel {
        if matches!(phase, None | Some(AssignmentPhase::Accepted)) {
            send(tx, Body::Cancel(c.clone()));
        }
        return;
    }
    match phase {
        None => {
            if let Some(a) = &e.assignment {
                e.sent_on = Some(conn);
                send(tx, Body::Assign(a.clone()));
            }
        }
        Some(AssignmentPhase::Accepted) => {
            if let Some(s) = &e.start {
                send(tx, Body::Start(s.clone()));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> (Gateway, mpsc::UnboundedReceiver<ObjectRef<TrainingRound>>) {
        Gateway::new(GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            address: "127.0.0.1:7443".into(),
            server_names: vec!["127.0.0.1".into()],
            sites_namespace: "caduceus-sites".into(),
        })
    }

    fn assignment(id: &str) -> Assignment {
        Assignment {
            id: id.into(),
            hospital: "caduceus-sites/a".into(),
            ..Default::default()
        }
    }

    const ID: &str = "studies/s-r0-a0@uid|caduceus-sites/a";

    fn bodies(rx: &mut mpsc::Receiver<Result<CoordinatorMessage, Status>>) -> Vec<Body> {
        let mut out = Vec::new();
        while let Ok(Ok(m)) = rx.try_recv() {
            out.push(m.body.unwrap());
        }
        out
    }

    #[test]
    fn participants_in_the_sites_namespace_are_sites() {
        let (g, _) = gw();
        assert_eq!(g.site_of("caduceus-sites/a"), Some("a"));
        assert_eq!(g.site_of("hospitals/a"), None);
        assert_eq!(g.site_of("a"), None);
    }

    #[test]
    fn an_assignment_goes_once_per_connection_and_again_after_a_reconnect() {
        let (g, _) = gw();
        // Not connected: kept.
        g.assign("a", assignment(ID));
        let (tx, mut rx) = mpsc::channel(16);
        let c1 = g.register("a", "fp", tx, vec![], BTreeMap::new());
        assert!(matches!(bodies(&mut rx).as_slice(), [Body::Assign(_)]));
        g.assign("a", assignment(ID));
        assert!(
            bodies(&mut rx).is_empty(),
            "a repeat on the same stream is not resent"
        );
        assert!(g.unregister("a", c1));
        let (tx, mut rx) = mpsc::channel(16);
        g.register("a", "fp", tx, vec![], BTreeMap::new());
        assert!(matches!(bodies(&mut rx).as_slice(), [Body::Assign(_)]));
        // Once the site answered, a reconnect resends nothing but the pending start.
        g.record(
            "a",
            AssignmentState {
                assignment_id: ID.into(),
                phase: AssignmentPhase::Accepted as i32,
                ..Default::default()
            },
        )
        .unwrap();
        g.start("a", ID, "CERT".into());
        assert!(matches!(bodies(&mut rx).as_slice(), [Body::Start(_)]));
        let (tx, mut rx) = mpsc::channel(16);
        g.register("a", "fp", tx, vec![], BTreeMap::new());
        assert!(matches!(bodies(&mut rx).as_slice(), [Body::Start(_)]));
    }

    #[test]
    fn a_site_reports_only_its_own_assignments() {
        let (g, mut wake) = gw();
        let err = g
            .record(
                "b",
                AssignmentState {
                    assignment_id: ID.into(),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(err.contains("not this site's"), "{err}");
        assert!(g.state(ID).is_none());
        assert!(
            g.record(
                "a",
                AssignmentState {
                    assignment_id: "garbage".into(),
                    ..Default::default()
                }
            )
            .is_err()
        );
        g.record(
            "a",
            AssignmentState {
                assignment_id: ID.into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            wake.try_recv().unwrap(),
            ObjectRef::new("s-r0-a0").within("studies")
        );
    }

    #[test]
    fn a_cancelled_assignment_is_not_resent_and_its_cancel_is() {
        let (g, _) = gw();
        g.assign("a", assignment(ID));
        g.cancel("a", ID, "round ended");
        let (tx, mut rx) = mpsc::channel(16);
        g.register("a", "fp", tx, vec![], BTreeMap::new());
        assert!(matches!(bodies(&mut rx).as_slice(), [Body::Cancel(_)]));
        g.assign("a", assignment(ID));
        assert!(bodies(&mut rx).is_empty());
    }

    #[test]
    fn disconnect_sends_the_reason_and_forgets_the_stream() {
        let (g, _) = gw();
        let (tx, mut rx) = mpsc::channel(16);
        g.register("a", "fp", tx, vec![], BTreeMap::new());
        assert!(g.disconnect("a", "revoked"));
        assert!(matches!(bodies(&mut rx).as_slice(), [Body::Error(m)] if m == "revoked"));
        assert!(!g.connected("a"));
    }
}
