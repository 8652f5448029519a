//! Start-up shared by the Caduceus binaries (`caduceus-trainer`, `caduceus-aggregator`): logging to
//! standard error filtered by `CADUCEUS_LOG`, OpenTelemetry spans over OTLP when the `OTEL_*`
//! variables ask for it ([`otel`], shared with the operator), the tokio runtime that runs the program
//! and its exit code, and reading the PEM files of a mutual-TLS identity (`--tls-cert`, `--tls-key`,
//! `--tls-ca`).
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use tracing_subscriber::Layer;

pub mod otel;

/// The environment variable holding the log filter (`tracing_subscriber::EnvFilter` syntax).
pub const LOG_ENV: &str = "CADUCEUS_LOG";

/// Logs to standard error (with colours on a terminal), filtered by [`LOG_ENV`] (default `info`), and
/// exports spans as `service` when the `OTEL_*` variables turn export on ([`otel::install`]; call it
/// within the program's tokio runtime). Keep the returned value until the program ends.
pub fn init_tracing(service: &'static str) -> otel::Telemetry {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_env(LOG_ENV)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    otel::install(logs, service)
}

/// A binary's `main`: starts a multi-threaded runtime of `worker_threads` workers, initialises logging
/// and span export (as `service`), runs `program` and exits with the code it returns, after flushing
/// the spans still queued (a few seconds at most, also when the collector is unreachable). When the
/// runtime cannot start, says why on standard error and exits with `runtime_error_code`.
pub fn run_main<F>(
    worker_threads: usize,
    runtime_error_code: u8,
    service: &'static str,
    program: F,
) -> ExitCode
where
    F: Future<Output = u8>,
{
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => {
            // The OTLP exporter's gRPC channel lives on this runtime: build it inside, flush before
            // the runtime goes.
            let mut telemetry = {
                let _in_runtime = rt.enter();
                init_tracing(service)
            };
            let code = rt.block_on(program);
            telemetry.shutdown();
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(runtime_error_code)
        }
    }
}

/// The PEM text of a mutual-TLS identity: own certificate and key, and the CA that verifies peers.
#[derive(Clone)]
pub struct MtlsPem {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

impl std::fmt::Debug for MtlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsPem").finish_non_exhaustive()
    }
}

impl MtlsPem {
    /// Reads the files given as `--tls-cert`, `--tls-key` and `--tls-ca`. Their contents are checked
    /// where they are used (the TLS configuration), not here; `caduceus_pki::TlsPaths::read` is the
    /// stricter library counterpart that also wants the PEM blocks.
    ///
    /// # Errors
    /// The first file that cannot be read, named with its flag.
    pub fn read(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<Self> {
        let read = |p: &Path, flag: &str| {
            std::fs::read_to_string(p).with_context(|| format!("{flag} {}", p.display()))
        };
        Ok(Self {
            cert: read(cert, "--tls-cert")?,
            key: read(key, "--tls-key")?,
            ca: read(ca, "--tls-ca")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_files_and_names_the_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca) = (
            dir.path().join("c.pem"),
            dir.path().join("k.pem"),
            dir.path().join("ca.pem"),
        );
        std::fs::write(&cert, "CERT").unwrap();
        std::fs::write(&key, "KEY").unwrap();
        let err = MtlsPem::read(&cert, &key, &ca).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.starts_with("--tls-ca "), "{msg}");
        assert!(msg.contains("ca.pem"), "{msg}");
        std::fs::write(&ca, "CA").unwrap();
        let pem = MtlsPem::read(&cert, &key, &ca).unwrap();
        assert_eq!(
            (pem.cert.as_str(), pem.key.as_str(), pem.ca.as_str()),
            ("CERT", "KEY", "CA")
        );
        assert!(!format!("{pem:?}").contains("KEY"), "the key must not be printed");
    }

    #[test]
    fn runs_the_program_and_returns_its_code() {
        // One test only initialises logging (a second global subscriber would panic).
        assert_eq!(run_main(1, 9, "caduceus-test", async { 3 }), ExitCode::from(3));
    }
}
