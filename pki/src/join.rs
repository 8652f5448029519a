//! Enrolling a site (docs/sites.md, "Enrolment"): join tokens and certificate signing requests.
//!
//! - [`JoinToken`]: a kubeadm-style bootstrap token `<id>.<secret>`. The coordinator keeps only the
//!   id and [`secret_hash`] of the secret; the gateway checks a presented secret with
//!   [`verify_secret`] (constant time).
//! - [`site_key_and_csr`]: the site's key pair (ECDSA P-256) and a PKCS#10 request for it. The
//!   private key never leaves the site; the CA signs the request with
//!   [`StudyCa::sign_csr`](crate::StudyCa::sign_csr), which takes only the request's public key and
//!   forces the identity.

use rcgen::{CertificateParams, DnType, KeyPair, SubjectPublicKeyInfo};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::PkiError;

/// The characters of token ids and secrets.
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A site's one-use join token, written `<id>.<secret>` (see [`JoinToken::parse`]).
///
/// The id names the token (the coordinator's Secret `caduceus-join-<id>`) and is not secret; the
/// secret is. `Debug` does not print the secret; `Display` does (it is the token).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl std::str::FromStr for JoinToken {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// `len` characters drawn uniformly from [`ALPHABET`] with the operating system's CSPRNG
/// (rejection sampling: bytes of 252 and above are dropped, so every character has probability
/// exactly 1/36).
fn random_string(len: usize) -> Result<String, PkiError> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).map_err(|e| PkiError::Randomness(e.to_string()))?;
        for &b in &buf {
            if out.len() == len {
                break;
            }
            if b < 252 {
                out.push(ALPHABET[usize::from(b % 36)] as char);
            }
        }
    }
    Ok(out)
}

fn check_part(part: &str, what: &str, min: usize, max: usize) -> Result<(), PkiError> {
    let bad = |reason: String| PkiError::InvalidJoinToken { reason };
    if !part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err(bad(format!(
            "the {what} may only hold lower-case letters a-z and digits 0-9"
        )));
    }
    if part.len() < min || part.len() > max {
        let want = if min == max {
            format!("{min}")
        } else {
            format!("{min} to {max}")
        };
        return Err(bad(format!(
            "the {what} has {} characters, expected {want}",
            part.len()
        )));
    }
    Ok(())
}

impl JoinToken {
    /// Length of a token id.
    pub const ID_LEN: usize = 6;
    /// Length of the secret that [`generate`](Self::generate) makes (about 124 bits).
    pub const SECRET_LEN: usize = 24;
    /// Shortest secret [`parse`](Self::parse) accepts (kubeadm's length, about 83 bits).
    pub const MIN_SECRET_LEN: usize = 16;
    /// Longest secret [`parse`](Self::parse) accepts.
    pub const MAX_SECRET_LEN: usize = 64;

    /// A fresh token: a 6-character id and a 24-character secret of `a-z0-9`, from the operating
    /// system's CSPRNG.
    pub fn generate() -> Result<Self, PkiError> {
        Ok(Self {
            id: random_string(Self::ID_LEN)?,
            secret: random_string(Self::SECRET_LEN)?,
        })
    }

    /// Parses `<id>.<secret>`: an id of exactly 6 and a secret of 16 to 64 lower-case letters or
    /// digits. Surrounding whitespace (a trailing newline from a file) is ignored. The error
    /// says what is wrong without repeating the token.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let s = s.trim();
        let Some((id, secret)) = s.split_once('.') else {
            return Err(PkiError::InvalidJoinToken {
                reason: if s.is_empty() {
                    "it is empty".into()
                } else {
                    "it has no '.' between the id and the secret".into()
                },
            });
        };
        if secret.contains('.') {
            return Err(PkiError::InvalidJoinToken {
                reason: "it has more than one '.'".into(),
            });
        }
        check_part(id, "id", Self::ID_LEN, Self::ID_LEN)?;
        check_part(secret, "secret", Self::MIN_SECRET_LEN, Self::MAX_SECRET_LEN)?;
        Ok(Self {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

/// The hex SHA-256 of a token secret: what the coordinator stores instead of the secret.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` hashes to `hash_hex` (as [`secret_hash`] writes it; upper-case hex is accepted
/// too). The digests are compared in constant time; a `hash_hex` that is not 64 hex digits never
/// matches.
pub fn verify_secret(secret: &str, hash_hex: &str) -> bool {
    let mut expected = [0u8; 32];
    if hex::decode_to_slice(hash_hex.trim(), &mut expected).is_err() {
        return false;
    }
    let actual = Sha256::digest(secret.as_bytes());
    bool::from(actual.as_slice().ct_eq(&expected))
}

/// A site's new key pair (ECDSA P-256) and a certificate signing request for it whose subject
/// common name is `common_name`: `(key PEM, CSR PEM)`. Keep the key; send the request. The CA
/// ignores the requested names (see [`StudyCa::sign_csr`](crate::StudyCa::sign_csr)).
pub fn site_key_and_csr(common_name: &str) -> Result<(String, String), PkiError> {
    if common_name.is_empty() {
        return Err(PkiError::Csr("the requested common name is empty".into()));
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The public key of a PEM certificate signing request whose self-signature verifies. Nothing
/// else of the request is used.
pub(crate) fn csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, PkiError> {
    let bad = PkiError::Csr;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|e| bad(format!("not PEM: {e}")))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(bad(format!(
            "the PEM block is {:?}, expected \"CERTIFICATE REQUEST\"",
            pem.label
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| bad(format!("not a PKCS#10 certificate request: {e}")))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} unexpected bytes after the request", rest.len())));
    }
    csr.verify_signature().map_err(|e| {
        bad(format!(
            "its signature does not verify under its own public key ({e})"
        ))
    })?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| bad(format!("unsupported public key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_VALIDITY, StudyCa, first_cert_der, hospital_from_cert_der};
    use rcgen::{PublicKeyData, SanType};

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let t = JoinToken::generate().unwrap();
        assert_eq!(t.id.len(), JoinToken::ID_LEN);
        assert_eq!(t.secret.len(), JoinToken::SECRET_LEN);
        let s = t.to_string();
        assert_eq!(s, format!("{}.{}", t.id, t.secret));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert_eq!(JoinToken::parse(&format!("  {s}\n")).unwrap(), t);
        assert_ne!(JoinToken::generate().unwrap(), t);
        let debug = format!("{t:?}");
        assert!(debug.contains(&t.id) && !debug.contains(&t.secret), "{debug}");
        // Every character of the alphabet turns up, and only those.
        let many = random_string(4000).unwrap();
        assert!(ALPHABET.iter().all(|&c| many.as_bytes().contains(&c)));
        assert!(many.bytes().all(|c| ALPHABET.contains(&c)));
    }

    #[test]
    fn malformed_tokens_are_refused_clearly() {
        for (bad, why) in [
            ("", "empty"),
            ("abcdef0123456789abcdef", "no '.'"),
            ("abcdef.0123456789abcdef.x", "more than one '.'"),
            ("abcde.0123456789abcdef", "id has 5 characters, expected 6"),
            ("abcdefg.0123456789abcdef", "id has 7"),
            ("ABCDEF.0123456789abcdef", "id may only hold"),
            ("abc-ef.0123456789abcdef", "id may only hold"),
            (
                "abcdef.0123456789abcde",
                "secret has 15 characters, expected 16 to 64",
            ),
            ("abcdef.", "secret has 0"),
            ("abcdef.0123456789abcdeF", "secret may only hold"),
            ("abcdef.0123456789abcdé", "secret may only hold"),
        ] {
            let err = JoinToken::parse(bad).unwrap_err();
            assert!(matches!(err, PkiError::InvalidJoinToken { .. }), "{bad}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(why), "{bad:?}: {msg}");
            if let Some((_, secret)) = bad.split_once('.')
                && secret.len() > 3
            {
                assert!(!msg.contains(secret), "the error repeats the secret: {msg}");
            }
        }
        let long = format!("abcdef.{}", "a".repeat(65));
        assert!(JoinToken::parse(&long).is_err());
        assert!(JoinToken::parse(&format!("abcdef.{}", "a".repeat(64))).is_ok());
    }

    #[test]
    fn secrets_verify_against_their_hash_only() {
        let t = JoinToken::generate().unwrap();
        let h = secret_hash(&t.secret);
        assert_eq!(h.len(), 64);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // The known SHA-256 of "abc".
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(verify_secret(&t.secret, &h));
        assert!(verify_secret(&t.secret, &h.to_ascii_uppercase()));
        assert!(!verify_secret(&JoinToken::generate().unwrap().secret, &h));
        assert!(!verify_secret("", &h));
        assert!(!verify_secret(&t.secret, &h[..62]));
        assert!(!verify_secret(&t.secret, &format!("{h}00")));
        assert!(!verify_secret(&t.secret, ""));
        assert!(!verify_secret(&t.secret, &"z".repeat(64)));
        assert!(!verify_secret(&t.secret, &t.secret));
    }

    fn verifies_under(cert_pem: &str, ca: &StudyCa) -> bool {
        let ca_der = first_cert_der(ca.cert_pem()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let der = first_cert_der(cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.issuer() == ca_cert.subject() && cert.verify_signature(Some(ca_cert.public_key())).is_ok()
    }

    #[test]
    fn signed_csr_chains_to_the_ca_and_carries_the_forced_identity() {
        let ca = StudyCa::generate("caduceus-sites", DEFAULT_VALIDITY).unwrap();
        let (key_pem, csr_pem) = site_key_and_csr("st-marys").unwrap();
        assert!(csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----"));
        let cert_pem = ca.sign_csr(&csr_pem, "st-marys", DEFAULT_VALIDITY).unwrap();
        assert!(verifies_under(&cert_pem, &ca));
        let other = StudyCa::generate("caduceus-sites", DEFAULT_VALIDITY).unwrap();
        assert!(!verifies_under(&cert_pem, &other));
        let der = first_cert_der(&cert_pem).unwrap();
        assert_eq!(hospital_from_cert_der(&der).unwrap(), "st-marys");
        // The certificate holds the site's key, which never went to the CA.
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(cert.public_key().raw, key.subject_public_key_info().as_slice());
        // Client only, for the requested lifetime.
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let v = cert.validity();
        let days = (v.not_after.timestamp() - v.not_before.timestamp()) / 86_400;
        assert_eq!(days, DEFAULT_VALIDITY.whole_days());
    }

    #[test]
    fn the_ca_ignores_the_names_a_csr_asks_for() {
        let ca = StudyCa::generate("caduceus-sites", DEFAULT_VALIDITY).unwrap();
        // A CSR asking for another hospital's name in both places, a server name and CA rights.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["caduceus-gateway.x.svc".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI("caduceus://hospital/evil".try_into().unwrap()));
        params.distinguished_name.push(DnType::CommonName, "evil");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let cert_pem = ca.sign_csr(&csr_pem, "h1", DEFAULT_VALIDITY).unwrap();
        let der = first_cert_der(&cert_pem).unwrap();
        assert_eq!(hospital_from_cert_der(&der).unwrap(), "h1");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1, "{:?}", san.value.general_names);
        assert!(!cert.is_ca());
        assert!(!cert.extended_key_usage().unwrap().unwrap().value.server_auth);
        assert_eq!(cert.public_key().raw, key.subject_public_key_info().as_slice());
        // The forced name must itself be a valid hospital name.
        assert!(matches!(
            ca.sign_csr(&csr_pem, "Evil/Name", DEFAULT_VALIDITY),
            Err(PkiError::InvalidHospitalName { .. })
        ));
    }

    #[test]
    fn malformed_csrs_are_refused_clearly() {
        let ca = StudyCa::generate("caduceus-sites", DEFAULT_VALIDITY).unwrap();
        let sign = |pem: &str| ca.sign_csr(pem, "h1", DEFAULT_VALIDITY).unwrap_err();
        for (bad, why) in [
            ("", "not PEM"),
            ("garbage", "not PEM"),
            (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "not a PKCS#10",
            ),
            (ca.cert_pem(), "expected \"CERTIFICATE REQUEST\""),
        ] {
            let err = sign(bad);
            assert!(matches!(err, PkiError::Csr(_)), "{bad:?}: {err}");
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        // A request whose signature was altered (a base64 character inside the signature).
        let (_, csr_pem) = site_key_and_csr("h1").unwrap();
        let lines: Vec<&str> = csr_pem.lines().collect();
        let mut tampered = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            // The last full line before the closing one: its end lies inside the signature.
            if i == lines.len() - 3 {
                let mut b = line.as_bytes().to_vec();
                let at = b.len() * 3 / 4;
                b[at] = if b[at] == b'A' { b'B' } else { b'A' };
                tampered.push(String::from_utf8(b).unwrap());
            } else {
                tampered.push(line.to_string());
            }
        }
        let err = sign(&tampered.join("\n"));
        assert!(matches!(err, PkiError::Csr(_)), "{err}");
        assert!(err.to_string().contains("signature"), "{err}");
        assert!(matches!(site_key_and_csr(""), Err(PkiError::Csr(_))));
    }

    #[test]
    fn the_gateway_certificate_comes_from_issue_server() {
        let ca = StudyCa::generate("caduceus-sites", DEFAULT_VALIDITY).unwrap();
        let s = ca
            .issue_server(
                &["caduceus-gateway.caduceus-system.svc".into()],
                &["127.0.0.1".parse().unwrap()],
                DEFAULT_VALIDITY,
            )
            .unwrap();
        assert!(verifies_under(&s.cert_pem, &ca));
        let der = first_cert_der(&s.cert_pem).unwrap();
        // A site's client certificate and the gateway's are not interchangeable.
        assert!(matches!(
            hospital_from_cert_der(&der),
            Err(PkiError::NotClientCertificate)
        ));
    }
}
