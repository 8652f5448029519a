//! Set-up shared by the aggregator's integration tests: a study's PKI in a temporary directory, the real
//! aggregator binary started on a free loopback port, and mutual-TLS clients that play the hospitals.
#![allow(dead_code)] // each test crate uses its own part of it

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caduceus_pki::{StudyPkiFiles, TlsPaths};
use caduceus_proto::{ClientError, ClientTls, Code, EvaluationCounts, FederationClient};

pub const H0: &str = "hospital-0";
pub const H1: &str = "hospital-1";

/// Kills a child process (by its own pid) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A temporary directory holding the PKI (under `pki/`) of a study of [`H0`] and [`H1`]: its CA, the
/// aggregator's certificate for `localhost` and 127.0.0.1, and one certificate per hospital.
pub struct StudyDir {
    pub study: &'static str,
    pub dir: tempfile::TempDir,
    pub pki: StudyPkiFiles,
}

impl StudyDir {
    pub fn new(study: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = caduceus_pki::write_study_pki(
            &dir.path().join("pki"),
            study,
            &[H0.to_string(), H1.to_string()],
            &["localhost".to_string()],
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        StudyDir { study, dir, pki }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The aggregator's command for a 2-round study of both hospitals, listening on a free loopback port
    /// (written to `port-{tag}`) with the study's server certificate, over the model store `store` (a
    /// directory name under the temporary directory). Callers add the rest.
    pub fn aggregator(&self, tag: &str, store: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_caduceus-aggregator"));
        c.args(["--study-id", self.study, "--rounds", "2"])
            .args(["--hospitals", &format!("{H0},{H1}")])
            .args(["--listen", "127.0.0.1:0"])
            .arg("--port-file")
            .arg(self.path(&format!("port-{tag}")))
            .arg("--tls-cert")
            .arg(&self.pki.server.cert)
            .arg("--tls-key")
            .arg(&self.pki.server.key)
            .arg("--tls-ca")
            .arg(&self.pki.ca_cert)
            .arg("--model-store")
            .arg(self.path(store));
        c
    }

    /// Starts an aggregator command from [`StudyDir::aggregator`] with `tag`, its output in
    /// `aggregator-{tag}.log`; returns it and its port once it listens.
    pub fn start(&self, mut cmd: Command, tag: &str) -> (Proc, u16) {
        let port_file = self.path(&format!("port-{tag}"));
        let log_path = self.path(&format!("aggregator-{tag}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = cmd
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting the aggregator");
        let mut p = Proc(child);
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&port_file)
                && let Ok(port) = s.trim().parse()
            {
                return (p, port);
            }
            if let Ok(Some(st)) = p.0.try_wait() {
                panic!(
                    "aggregator exited with {st}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            assert!(t.elapsed() < Duration::from_secs(60), "aggregator did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client of the aggregator at `port`, as hospital `i` of the study.
    pub async fn client(&self, i: usize, port: u16) -> FederationClient {
        FederationClient::connect(
            &format!("127.0.0.1:{port}"),
            &client_tls(&self.pki.hospitals[i].1),
            self.study,
        )
        .await
        .unwrap()
    }
}

/// The client side of mutual TLS from the PEM files at `paths`, for the server name `localhost`.
pub fn client_tls(paths: &TlsPaths) -> ClientTls {
    let pem = paths.read().unwrap();
    ClientTls {
        ca_pem: pem.ca_cert,
        cert_pem: pem.cert,
        key_pem: pem.key,
        server_name: "localhost".into(),
    }
}

/// Evaluation counts of a hospital's 10 validation examples (6 right, mean loss 0.6).
pub fn sample_counts() -> EvaluationCounts {
    EvaluationCounts {
        examples: 10,
        correct: 6,
        loss_sum: 6.0,
        ..Default::default()
    }
}

/// Asserts that a call was refused with gRPC status `code` and a message that contains `needle`.
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, ClientError>, code: Code, needle: &str) {
    match r {
        Err(ClientError::Status(s)) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} lacks {needle:?}",
                s.message()
            );
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}
