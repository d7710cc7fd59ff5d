//! TLS for the Proxmox API client: how the server's certificate is trusted.
//!
//! Proxmox nodes serve a certificate signed by the cluster's own CA (`/etc/pve/pve-root-ca.pem`)
//! or a self-signed one, so driftless trusts either a CA file (the only trust root), a pinned
//! SHA-256 certificate fingerprint (as `pvenode cert info` prints it), the system roots, or,
//! explicitly and loudly, nothing at all.
//!
//! Every rustls configuration is built with an explicit aws-lc-rs provider, never the process
//! default: installing a second default provider would panic.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// How the Proxmox server's certificate is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// A PEM file of CA certificates: the only trust roots (hostname checked).
    CaFile(PathBuf),
    /// The SHA-256 fingerprint of the server's own certificate (`AB:CD:...`, case-insensitive,
    /// colons optional). Hostname and validity dates are not checked: the pin is the identity.
    Fingerprint(String),
    /// The platform's trust store (reqwest's default verifier).
    System,
    /// No verification at all. Logs a warning every time a client is built.
    Insecure,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("invalid certificate fingerprint: {0}")]
    BadFingerprint(String),
    #[error("CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Normalizes a SHA-256 fingerprint to the `AB:CD:...` form (uppercase, colon-separated).
/// Accepts upper or lower case, with or without colons (spaces are ignored too).
pub fn normalize_fingerprint(fingerprint: &str) -> Result<String, TlsError> {
    let hex: String = fingerprint
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if let Some(bad) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(TlsError::BadFingerprint(format!(
            "{fingerprint:?} contains {bad:?}; expected 64 hexadecimal digits (SHA-256), colons optional"
        )));
    }
    if hex.len() != 64 {
        return Err(TlsError::BadFingerprint(format!(
            "{fingerprint:?} has {} hexadecimal digits; a SHA-256 fingerprint has 64",
            hex.len()
        )));
    }
    let upper = hex.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..32).map(|i| &upper[2 * i..2 * i + 2]).collect();
    Ok(pairs.join(":"))
}

/// The SHA-256 fingerprint of a DER certificate, as `pvenode cert info` prints it.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The crypto provider every configuration uses (explicit, never the process default).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// The server presented a certificate other than the pinned one.
#[derive(Clone, PartialEq, Eq)]
pub struct FingerprintMismatch {
    pub expected: String,
    pub presented: String,
}

impl fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate fingerprint mismatch: expected SHA-256 {}, server presented {}",
            self.expected, self.presented
        )
    }
}

// rustls prints `CertificateError::Other` with Debug: make that the readable message too.
impl fmt::Debug for FingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl StdError for FingerprintMismatch {}

/// Accepts the end-entity certificate iff its SHA-256 equals the pin; the handshake signatures
/// are still verified, so the server must hold the pinned certificate's private key.
#[derive(Debug)]
pub struct PinnedCertVerifier {
    fingerprint: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedCertVerifier {
    pub fn new(fingerprint: &str, provider: &CryptoProvider) -> Result<Self, TlsError> {
        Ok(PinnedCertVerifier {
            fingerprint: normalize_fingerprint(fingerprint)?,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint_of_der(end_entity.as_ref());
        if presented == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            let mismatch = FingerprintMismatch {
                expected: self.fingerprint.clone(),
                presented,
            };
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(mismatch),
            ))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts any certificate: `TlsTrust::Insecure` only.
#[derive(Debug)]
struct AcceptAnything {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Reads a PEM file of CA certificates into a root store (at least one certificate).
pub fn load_ca_file(path: &std::path::Path) -> Result<RootCertStore, TlsError> {
    let ca_err = |message: String| TlsError::CaFile {
        path: path.display().to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| ca_err(format!("cannot read: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| ca_err(format!("invalid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ca_err(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ca_err("holds no PEM certificate".to_string()));
    }
    Ok(roots)
}

/// The rustls client configuration for `trust`; `None` for `System` (reqwest's own default,
/// the platform verifier).
pub fn rustls_config(trust: &TlsTrust) -> Result<Option<ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match trust {
        TlsTrust::System => return Ok(None),
        TlsTrust::CaFile(path) => builder.with_root_certificates(load_ca_file(path)?),
        TlsTrust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertVerifier::new(pin, &provider)?)),
        TlsTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything {
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    let mut config = builder.with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(config))
}

/// A reqwest client builder whose TLS verifies the server as `trust` says. Callers add their
/// timeouts and headers.
pub fn client_builder(trust: &TlsTrust) -> Result<reqwest::ClientBuilder, TlsError> {
    if *trust == TlsTrust::Insecure {
        tracing::warn!(
            "TLS verification DISABLED for the Proxmox API: any certificate is accepted, so anyone on the \
             network path can read the API token and impersonate the server. Configure a CA file or a \
             certificate fingerprint instead."
        );
    }
    let builder = reqwest::Client::builder();
    Ok(match rustls_config(trust)? {
        Some(config) => builder.tls_backend_preconfigured(config),
        None => builder.tls_backend_rustls(),
    })
}

/// A reqwest client with `trust` and no other settings.
pub fn build_client(trust: &TlsTrust) -> Result<reqwest::Client, TlsError> {
    client_builder(trust)?
        .build()
        .map_err(|e| TlsError::Client(error_chain(&e)))
}

/// An error and its sources as one line, without repeating a message its source repeats.
/// A certificate fingerprint mismatch is described by itself.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(mismatch) = find_fingerprint_mismatch(e) {
            return mismatch.to_string();
        }
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = next_source(e);
    }
    parts.join(": ")
}

/// The next error in a chain, looking inside `io::Error`s (whose `source` skips the wrapped error).
fn next_source<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    if let Some(io) = e.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
    {
        return Some(inner);
    }
    e.source()
}

fn find_fingerprint_mismatch<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a FingerprintMismatch> {
    if let Some(m) = e.downcast_ref::<FingerprintMismatch>() {
        return Some(m);
    }
    match e.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<FingerprintMismatch>()
        }
        _ => None,
    }
}

/// Whether the chain holds a TLS error (a certificate refused, a failed handshake): retrying
/// the same endpoint cannot help.
pub fn is_tls_error(err: &(dyn StdError + 'static)) -> bool {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if e.is::<rustls::Error>() || e.is::<FingerprintMismatch>() {
            return true;
        }
        current = next_source(e);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalize() {
        let lower = "ab".repeat(32);
        let want = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&lower).unwrap(), want);
        assert_eq!(normalize_fingerprint(&want.to_lowercase()).unwrap(), want);
        assert!(normalize_fingerprint("AB:CD").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn fingerprint_of_der_is_sha256_colon_hex() {
        let fp = fingerprint_of_der(b"");
        assert!(fp.starts_with("E3:B0:C4:42"), "{fp}");
        assert_eq!(fp.len(), 32 * 3 - 1);
    }
}
