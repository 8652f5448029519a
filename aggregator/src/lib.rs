//! The Caduceus aggregator: serves a federated study's rounds over gRPC with mutual TLS.
//!
//! - [`config`]: settings from flags and environment ([`AggregatorArgs`]), validated into [`StudyConfig`].
//! - [`service`]: the study state machine ([`Study`]), the tonic service ([`FederationService`]), plaintext
//!   and secure aggregation behind one trait, and checkpoints (one module each).
//! - [`run`]: the whole program: resume or initialise the model store, listen, run rounds until the study
//!   completes or fails, write the summary.
//!
//! Standard output carries one JSON line per closed round (`{"event":"round_closed","result":…}`);
//! logs go to standard error.

pub mod config;
pub mod result;
pub mod service;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use caduceus_proto::MAX_MESSAGE_BYTES;
use caduceus_proto::v1::federation_server::FederationServer;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::Instrument;

pub use config::{AggregatorArgs, StudyConfig};
pub use service::{FederationService, Phase, Study, Summary};

/// Exit codes of the binary.
pub mod exit {
    /// The study completed.
    pub const SUCCESS: u8 = 0;
    /// The study failed (missed quorum, aggregation error).
    pub const STUDY_FAILED: u8 = 1;
    /// Bad settings or unreadable files; nothing ran.
    pub const CONFIG: u8 = 2;
    /// Stopped by a signal before the study ended; restart to resume.
    pub const INTERRUPTED: u8 = 3;
}

fn write_summary(path: Option<&Path>, summary: &Summary) {
    let line = serde_json::to_string(summary).unwrap_or_else(|_| "{}".into());
    if let Some(p) = path {
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Err(e) = std::fs::write(p, format!("{line}\n")) {
            tracing::error!("cannot write summary {}: {e}", p.display());
        }
    }
    eprintln!("summary: {line}");
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the aggregator to the end of the study; returns the process exit code.
pub async fn run(args: AggregatorArgs) -> u8 {
    let cfg = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::CONFIG;
        }
    };
    // The process's span, in the round's trace when the operator passed one (TRACEPARENT).
    let span = tracing::info_span!("aggregator", caduceus.study = %cfg.study_id);
    caduceus_startup::otel::continue_trace(&span, caduceus_startup::otel::env_traceparent().as_deref());
    match run_validated(&args, cfg).instrument(span).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::CONFIG
        }
    }
}

async fn run_validated(args: &AggregatorArgs, cfg: StudyConfig) -> anyhow::Result<u8> {
    let pem = caduceus_startup::MtlsPem::read(&args.tls_cert, &args.tls_key, &args.tls_ca)?;
    let study = tokio::task::spawn_blocking(move || Study::open(cfg))
        .await
        .context("opening the study")??;
    let (round, phase) = study.progress();
    if phase == Phase::Completed {
        tracing::info!("the model store holds a completed study; nothing to do");
        write_summary(args.summary_path.as_deref(), &study.summary(&Ok(())));
        result::write(args.result_file.as_deref(), &study, &Ok(()), args.min_group_size);
        return Ok(exit::SUCCESS);
    }
    tracing::info!(
        study = %study.config().study_id,
        round,
        rounds = study.config().rounds,
        strategy = study.config().strategy.name(),
        hospitals = ?study.config().hospitals,
        "starting"
    );

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let local = listener.local_addr()?;
    if let Some(pf) = &args.port_file {
        caduceus_aggregation::checkpoint::write_atomic(pf, local.port().to_string().as_bytes())
            .with_context(|| format!("--port-file {}", pf.display()))?;
    }
    tracing::info!(addr = %local, "listening (mTLS, client certificates required)");

    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(pem.cert, pem.key))
        .client_ca_root(Certificate::from_pem(pem.ca))
        .client_auth_optional(false);
    let svc = FederationServer::new(FederationService::new(study.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .context("TLS configuration")?
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_rx.await;
            }),
    );

    let rounds_study: Arc<Study> = study.clone();
    let outcome = tokio::select! {
        r = rounds_study.run_rounds() => Some(r),
        () = shutdown_signal() => None,
    };
    let code = match &outcome {
        Some(Ok(())) => exit::SUCCESS,
        Some(Err(_)) => exit::STUDY_FAILED,
        None => exit::INTERRUPTED,
    };
    let result = outcome
        .unwrap_or_else(|| Err("interrupted by a signal; restart to resume from the last checkpoint".into()));
    match &result {
        Ok(()) => tracing::info!("study completed"),
        Err(e) => tracing::error!("{e}"),
    }
    write_summary(args.summary_path.as_deref(), &study.summary(&result));
    result::write(args.result_file.as_deref(), &study, &result, args.min_group_size);
    if code != exit::INTERRUPTED {
        tokio::time::sleep(Duration::from_secs(args.linger_secs)).await;
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(code)
}
