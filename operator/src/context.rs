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
        }
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
