//! Study PKI for mutual TLS between hospital trainers and the aggregator (rcgen).
//!
//! - [`StudyCa`]: one certificate authority per study, created fresh or loaded from PEM.
//! - [`StudyCa::issue_server`]: the aggregator's server certificate (DNS SANs such as `localhost` or a
//!   Service DNS name, and IP SANs such as `127.0.0.1`).
//! - [`StudyCa::issue_hospital`]: a hospital's client certificate. The hospital is named twice: in the URI
//!   SAN `caduceus://hospital/<name>` (authoritative) and in the subject common name.
//! - [`hospital_from_cert_der`]: what the aggregator calls on the verified peer certificate to learn which
//!   hospital is speaking.
//! - [`write_study_pki`] / [`TlsPaths`]: PEM files on disk, private keys written with mode 0600.
//! - [`join`]: enrolling a site — [`JoinToken`]s, [`site_key_and_csr`], and [`StudyCa::sign_csr`],
//!   which signs a site's request as a hospital client certificate. The gateway's server certificate
//!   comes from [`StudyCa::issue_server`] of the same (sites) CA.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub mod join;

pub use join::{JoinToken, secret_hash, site_key_and_csr, verify_secret};

/// Prefix of the URI SAN that names a hospital in its client certificate.
pub const HOSPITAL_URI_PREFIX: &str = "caduceus://hospital/";

/// Default certificate lifetime for generated certificates.
pub const DEFAULT_VALIDITY: Duration = Duration::days(30);

/// Errors of certificate generation, parsing and file handling.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid hospital name {name:?}: {reason}")]
    InvalidHospitalName { name: String, reason: &'static str },
    #[error("invalid study id {id:?}: {reason}")]
    InvalidStudyId { id: String, reason: &'static str },
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    #[error("certificate names no hospital (no {HOSPITAL_URI_PREFIX}<name> URI SAN and no common name)")]
    NoHospital,
    #[error("not a client certificate (its extended key usage lacks clientAuth)")]
    NotClientCertificate,
    #[error("certificate names two different hospitals: URI SAN {uri:?} and common name {cn:?}")]
    ConflictingHospital { uri: String, cn: String },
    #[error(
        "invalid join token: {reason} (a join token is <id>.<secret>: an id of 6 and a secret of \
         16 to 64 lower-case letters or digits)"
    )]
    InvalidJoinToken { reason: String },
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    #[error("operating-system randomness unavailable: {0}")]
    Randomness(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a hospital name: 1–63 characters of `a-z`, `0-9` and `-`, starting and ending alphanumeric (a
/// Kubernetes DNS label, so it can also name namespaces and objects).
pub fn validate_hospital_name(name: &str) -> Result<(), PkiError> {
    validate_label(name).map_err(|reason| PkiError::InvalidHospitalName {
        name: name.to_string(),
        reason,
    })
}

/// Checks a study id with the same rule as hospital names.
pub fn validate_study_id(id: &str) -> Result<(), PkiError> {
    validate_label(id).map_err(|reason| PkiError::InvalidStudyId {
        id: id.to_string(),
        reason,
    })
}

fn validate_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > 63 {
        return Err("it is longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

/// A certificate and its private key, PEM encoded. `Debug` leaves the private key out.
#[derive(Clone)]
pub struct CertifiedPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A study's certificate authority: signs the aggregator's server certificate and hospital client
/// certificates.
pub struct StudyCa {
    study_id: String,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for StudyCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StudyCa")
            .field("study_id", &self.study_id)
            .finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    // Back-date by an hour to tolerate small clock skew between machines.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + validity;
}

impl StudyCa {
    /// Generates a new self-signed CA for `study_id` (ECDSA P-256).
    pub fn generate(study_id: &str, lifetime: Duration) -> Result<Self, PkiError> {
        validate_study_id(study_id)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("caduceus study CA {study_id}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "caduceus");
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, study_id);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        validity(&mut params, lifetime);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            study_id: study_id.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and private key (for example from a Kubernetes Secret).
    pub fn from_pem(study_id: &str, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            study_id: study_id.to_string(),
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem_of(&issuer),
            issuer,
        })
    }

    /// The study this CA belongs to.
    pub fn study_id(&self) -> &str {
        &self.study_id
    }

    /// The CA certificate (what both sides trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key. Keep it where only the certificate issuer can read it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues the aggregator's server certificate for the given DNS names and IP addresses.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<CertifiedPem, PkiError> {
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cn = dns_names
            .first()
            .cloned()
            .unwrap_or_else(|| "caduceus-aggregator".into());
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, self.study_id.as_str());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, lifetime);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a hospital's client certificate: URI SAN `caduceus://hospital/<name>` and CN `<name>`.
    pub fn issue_hospital(&self, hospital: &str, lifetime: Duration) -> Result<CertifiedPem, PkiError> {
        let params = self.hospital_params(hospital, lifetime)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a site's certificate signing request (PEM, e.g. from [`site_key_and_csr`]) as the client
    /// certificate of `hospital`, returning the certificate PEM.
    ///
    /// Only the request's public key is used, after its self-signature verifies: the certificate is
    /// exactly what [`issue_hospital`](Self::issue_hospital) makes for `hospital` (so
    /// [`hospital_from_cert_der`] returns `hospital`), whatever names, usages or CA rights the request
    /// asks for. Errors: [`PkiError::InvalidHospitalName`], [`PkiError::Csr`] for a request that is
    /// not PEM, not PKCS#10, badly signed or of an unsupported key type.
    pub fn sign_csr(&self, csr_pem: &str, hospital: &str, lifetime: Duration) -> Result<String, PkiError> {
        let params = self.hospital_params(hospital, lifetime)?;
        let public_key = join::csr_public_key(csr_pem)?;
        Ok(params.signed_by(&public_key, &self.issuer)?.pem())
    }

    /// The parameters of a hospital's client certificate.
    fn hospital_params(&self, hospital: &str, lifetime: Duration) -> Result<CertificateParams, PkiError> {
        validate_hospital_name(hospital)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(
            format!("{HOSPITAL_URI_PREFIX}{hospital}").try_into()?,
        )];
        params.distinguished_name.push(DnType::CommonName, hospital);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, self.study_id.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, lifetime);
        Ok(params)
    }
}

fn key_pem_of(issuer: &Issuer<'static, KeyPair>) -> String {
    issuer.key().serialize_pem()
}

/// The hospital a (verified) client certificate names.
///
/// The URI SAN `caduceus://hospital/<name>` is authoritative; without one, the subject common name is
/// used. When both are present they must agree. The name must pass [`validate_hospital_name`].
/// This function does not verify the certificate chain: call it only on a peer certificate that TLS has
/// already verified against the study CA.
pub fn hospital_from_cert_der(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    if let Some(eku) = cert
        .extended_key_usage()
        .map_err(|e| PkiError::Parse(e.to_string()))?
        && !(eku.value.client_auth || eku.value.any)
    {
        return Err(PkiError::NotClientCertificate);
    }
    let mut uri_name = None;
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?
    {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(h) = uri.strip_prefix(HOSPITAL_URI_PREFIX)
            {
                uri_name = Some(h.to_string());
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let name = match (uri_name, cn) {
        (Some(uri), Some(cn)) if uri != cn => {
            return Err(PkiError::ConflictingHospital { uri, cn });
        }
        (Some(uri), _) => uri,
        (None, Some(cn)) => cn,
        (None, None) => return Err(PkiError::NoHospital),
    };
    validate_hospital_name(&name)?;
    Ok(name)
}

/// The validity window of the first certificate in a PEM string, as Unix seconds
/// `(not_before, not_after)`: the operator renews certificates well before `not_after`.
pub fn validity_window(pem: &str) -> Result<(i64, i64), PkiError> {
    let der = first_cert_der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Extracts the DER bytes of the first certificate in a PEM string.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let (_, p) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(p.contents)
}

/// Paths of one party's TLS material: the study CA certificate, its own certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS material read from disk, PEM encoded. `Debug` leaves the private key out.
#[derive(Clone)]
pub struct TlsPem {
    pub ca_cert: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("ca_cert", &self.ca_cert)
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TlsPaths {
    /// Reads the three PEM files, naming the one that cannot be read.
    pub fn read(&self) -> Result<TlsPem, PkiError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(io_err(p));
        let pem = TlsPem {
            ca_cert: read(&self.ca_cert)?,
            cert: read(&self.cert)?,
            key: read(&self.key)?,
        };
        for (path, text, what) in [
            (&self.ca_cert, &pem.ca_cert, "CERTIFICATE"),
            (&self.cert, &pem.cert, "CERTIFICATE"),
            (&self.key, &pem.key, "PRIVATE KEY"),
        ] {
            if !text.contains(&format!("-----BEGIN {what}-----")) {
                return Err(PkiError::Parse(format!(
                    "{}: no PEM block \"{what}\" found",
                    path.display()
                )));
            }
        }
        Ok(pem)
    }
}

/// Writes a PEM file; private keys get mode 0600 (on Unix).
pub fn write_pem(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if private {
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(io_err(path))?;
        f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    {
        let _ = private;
        std::fs::write(path, contents).map_err(io_err(path))?;
    }
    Ok(())
}

/// Where [`write_study_pki`] put everything.
#[derive(Debug, Clone)]
pub struct StudyPkiFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server: TlsPaths,
    /// One entry per hospital, in the order given.
    pub hospitals: Vec<(String, TlsPaths)>,
}

/// Generates a study CA, the aggregator's server certificate and one client certificate per hospital,
/// and writes them under `dir`:
/// `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, `hospitals/<name>.pem`,
/// `hospitals/<name>-key.pem`.
pub fn write_study_pki(
    dir: &Path,
    study_id: &str,
    hospitals: &[String],
    server_dns: &[String],
    server_ips: &[IpAddr],
) -> Result<StudyPkiFiles, PkiError> {
    let ca = StudyCa::generate(study_id, DEFAULT_VALIDITY)?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");
    write_pem(&ca_cert, ca.cert_pem(), false)?;
    write_pem(&ca_key, ca.key_pem(), true)?;
    let server = ca.issue_server(server_dns, server_ips, DEFAULT_VALIDITY)?;
    let server_paths = TlsPaths {
        ca_cert: ca_cert.clone(),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    write_pem(&server_paths.cert, &server.cert_pem, false)?;
    write_pem(&server_paths.key, &server.key_pem, true)?;
    let mut out = Vec::with_capacity(hospitals.len());
    for h in hospitals {
        let c = ca.issue_hospital(h, DEFAULT_VALIDITY)?;
        let paths = TlsPaths {
            ca_cert: ca_cert.clone(),
            cert: dir.join("hospitals").join(format!("{h}.pem")),
            key: dir.join("hospitals").join(format!("{h}-key.pem")),
        };
        write_pem(&paths.cert, &c.cert_pem, false)?;
        write_pem(&paths.key, &c.key_pem, true)?;
        out.push((h.clone(), paths));
    }
    Ok(StudyPkiFiles {
        ca_cert,
        ca_key,
        server: server_paths,
        hospitals: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_leaves_private_keys_out() {
        let ca = StudyCa::generate("study-1", DEFAULT_VALIDITY).unwrap();
        let c = ca.issue_hospital("st-marys", DEFAULT_VALIDITY).unwrap();
        let secret_line = c.key_pem.lines().nth(1).unwrap().to_string();
        assert!(!format!("{c:?}").contains(&secret_line));
        let t = TlsPem {
            ca_cert: ca.cert_pem().into(),
            cert: c.cert_pem.clone(),
            key: c.key_pem.clone(),
        };
        assert!(!format!("{t:?}").contains(&secret_line));
        assert!(format!("{t:?}").contains("<redacted>"));
    }

    #[test]
    fn hospital_identity_comes_from_uri_san() {
        let ca = StudyCa::generate("study-1", DEFAULT_VALIDITY).unwrap();
        let c = ca.issue_hospital("st-marys", DEFAULT_VALIDITY).unwrap();
        let der = first_cert_der(&c.cert_pem).unwrap();
        assert_eq!(hospital_from_cert_der(&der).unwrap(), "st-marys");
    }

    #[test]
    fn server_cert_has_dns_and_ip_sans() {
        let ca = StudyCa::generate("study-1", DEFAULT_VALIDITY).unwrap();
        let s = ca
            .issue_server(
                &["localhost".into(), "agg.study-1.svc".into()],
                &["127.0.0.1".parse().unwrap()],
                DEFAULT_VALIDITY,
            )
            .unwrap();
        let der = first_cert_der(&s.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san.value.general_names.iter().map(|g| format!("{g}")).collect();
        assert!(names.iter().any(|n| n.contains("localhost")), "{names:?}");
        assert!(names.iter().any(|n| n.contains("agg.study-1.svc")), "{names:?}");
        assert!(
            san.value.general_names.iter().any(|g| matches!(
                g,
                x509_parser::extensions::GeneralName::IPAddress(ip) if *ip == [127, 0, 0, 1]
            )),
            "{names:?}"
        );
        // A server certificate is not a client certificate, whatever its common name.
        assert!(matches!(
            hospital_from_cert_der(&der),
            Err(PkiError::NotClientCertificate)
        ));
    }

    #[test]
    fn certificates_chain_to_the_ca() {
        let ca = StudyCa::generate("study-1", DEFAULT_VALIDITY).unwrap();
        let c = ca.issue_hospital("h1", DEFAULT_VALIDITY).unwrap();
        let ca_der = first_cert_der(ca.cert_pem()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let der = first_cert_der(&c.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        // Another CA's certificate has a different key: its signature does not verify under ours.
        let other = StudyCa::generate("study-1", DEFAULT_VALIDITY).unwrap();
        let o = other.issue_hospital("h1", DEFAULT_VALIDITY).unwrap();
        let oder = first_cert_der(&o.cert_pem).unwrap();
        let (_, ocert) = x509_parser::parse_x509_certificate(&oder).unwrap();
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
        assert!(ocert.verify_signature(Some(ca_cert.public_key())).is_err());
    }

    #[test]
    fn ca_reloads_from_pem_and_keeps_issuing() {
        let ca = StudyCa::generate("study-2", DEFAULT_VALIDITY).unwrap();
        let again = StudyCa::from_pem("study-2", ca.cert_pem(), ca.key_pem()).unwrap();
        let c = again.issue_hospital("h2", DEFAULT_VALIDITY).unwrap();
        let ca_der = first_cert_der(ca.cert_pem()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let der = first_cert_der(&c.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
        assert_eq!(hospital_from_cert_der(&der).unwrap(), "h2");
    }

    #[test]
    fn bad_names_are_refused() {
        let ca = StudyCa::generate("s", DEFAULT_VALIDITY).unwrap();
        for bad in ["", "Upper", "a/b", "-x", "x-", &"a".repeat(64)] {
            let err = ca.issue_hospital(bad, DEFAULT_VALIDITY).unwrap_err();
            assert!(
                matches!(err, PkiError::InvalidHospitalName { .. }),
                "{bad}: {err}"
            );
        }
        assert!(StudyCa::generate("Bad Study", DEFAULT_VALIDITY).is_err());
    }

    #[test]
    fn files_are_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_study_pki(
            dir.path(),
            "study-3",
            &["h1".into(), "h2".into()],
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        let pem = files.hospitals[1].1.read().unwrap();
        let der = first_cert_der(&pem.cert).unwrap();
        assert_eq!(hospital_from_cert_der(&der).unwrap(), "h2");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.server.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let missing = TlsPaths {
            ca_cert: dir.path().join("nope.pem"),
            ..files.server.clone()
        };
        let err = missing.read().unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }
}
