//! What every reconcile shares, and the operator's error type.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use crate::build::Settings;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("certificates: {0}")]
    Pki(#[from] caduceus_pki::PkiError),
    #[error("secure aggregation key: {0}")]
    Key(String),
    #[error("privacy ledger of {hospital}: {message}")]
    Ledger { hospital: String, message: String },
    /// Deleting a HospitalClient whose ledger is not empty, without the forget annotation.
    #[error("{0}")]
    DeletionRefused(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Pki(_) => "pki",
            Error::Key(_) => "key",
            Error::Ledger { .. } => "ledger",
            Error::DeletionRefused(_) => "deletion_refused",
            Error::Other(_) => "other",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared by the controllers.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// How often a running study or round is looked at even without a watch event.
    pub poll: Duration,
    /// The site gateway (coordinator role): participants in its sites namespace are sites, whose
    /// trainers are run through it instead of the local API.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    signing_key: tokio::sync::OnceCell<Vec<u8>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter::from(crate::FIELD_MANAGER.to_string()));
        Self {
            client,
            settings,
            metrics,
            recorder,
            poll: Duration::from_secs(15),
            gateway: None,
            signing_key: tokio::sync::OnceCell::new(),
        }
    }

    /// The key that signs TrainingRounds (read or created once, then cached).
    pub async fn signing_key(&self) -> Result<&[u8]> {
        self.signing_key
            .get_or_try_init(|| {
                crate::signing::load_or_create_key(&self.client, &self.settings.operator_namespace)
            })
            .await
            .map(Vec::as_slice)
    }

    /// The namespaces to list namespaced objects in: the served ones and the operator's own, or
    /// `None` (cluster-wide) when the operator serves every namespace.
    pub fn namespaces(&self) -> Option<std::collections::BTreeSet<String>> {
        self.settings.watch_namespaces.as_ref().map(|w| {
            let mut all = w.clone();
            all.insert(self.settings.operator_namespace.clone());
            all
        })
    }

    /// Publishes an event on `obj`; failures to publish are logged only.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(reason, "cannot publish an event: {e}");
        }
    }
}
