//! TLS for the Proxmox API client, and the certificate verifiers every TLS client of driftless
//! shares: [`PinnedCertVerifier`] (a SHA-256 pin), [`AnyServerCert`] (no verification of the
//! chain, for `--proxmox-insecure` and Talos's maintenance mode), both checking the handshake
//! signatures with [`HandshakeSignatures`], as the sandbox's client-certificate verifier does.
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
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use crate::pki::{self, fingerprint_of_der};

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

/// The handshake signature check every verifier here makes, whatever it decides about the
/// certificate: the peer signed this handshake with the private key of the certificate it
/// presented (TLS 1.2 and 1.3), with the crypto provider's algorithms. Without it, anyone who
/// copied a certificate (public by nature) could present it.
#[derive(Debug, Clone)]
pub struct HandshakeSignatures {
    algorithms: WebPkiSupportedAlgorithms,
}

impl HandshakeSignatures {
    pub fn new(provider: &CryptoProvider) -> Self {
        HandshakeSignatures {
            algorithms: provider.signature_verification_algorithms,
        }
    }

    pub fn verify_tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    pub fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    pub fn schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts the end-entity certificate iff its SHA-256 equals the pin; the handshake signatures
/// are still verified, so the server must hold the pinned certificate's private key.
#[derive(Debug)]
pub struct PinnedCertVerifier {
    fingerprint: String,
    signatures: HandshakeSignatures,
}

impl PinnedCertVerifier {
    pub fn new(fingerprint: &str, provider: &CryptoProvider) -> Result<Self, TlsError> {
        Ok(PinnedCertVerifier {
            fingerprint: normalize_fingerprint(fingerprint)?,
            signatures: HandshakeSignatures::new(provider),
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
        self.signatures.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// No verification of the certificate chain: any server certificate is accepted, whoever
/// issued it and whatever it names (`--proxmox-insecure`; a Talos node in maintenance mode,
/// which has nothing to trust yet, as `talosctl --insecure`). The handshake signatures are
/// still checked ([`HandshakeSignatures`]): the server holds the key of the certificate it
/// shows, even though nothing says whose certificate that is.
#[derive(Debug)]
pub struct AnyServerCert {
    signatures: HandshakeSignatures,
}

impl AnyServerCert {
    pub fn new(provider: &CryptoProvider) -> Self {
        AnyServerCert {
            signatures: HandshakeSignatures::new(provider),
        }
    }
}

impl ServerCertVerifier for AnyServerCert {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
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
    for cert in pki::certificates(&pem).map_err(|e| ca_err(e.to_string()))? {
        roots
            .add(cert)
            .map_err(|e| ca_err(format!("unusable CA certificate: {e}")))?;
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
            .with_custom_certificate_verifier(Arc::new(AnyServerCert::new(&provider))),
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

    /// A key and its self-signed certificate, and a handshake signature made with the key.
    struct Peer {
        cert: CertificateDer<'static>,
        signer: Box<dyn rustls::sign::Signer>,
    }

    fn peer(alg: &'static rcgen::SignatureAlgorithm, scheme: SignatureScheme) -> Peer {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["peer".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let signing = crypto_provider()
            .key_provider
            .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .unwrap();
        Peer {
            cert: cert.der().clone(),
            signer: signing.choose_scheme(&[scheme]).unwrap(),
        }
    }

    /// `DigitallySignedStruct` as it travels (its constructor is rustls's own).
    fn dss(scheme: SignatureScheme, signature: &[u8]) -> DigitallySignedStruct {
        use rustls::internal::msgs::codec::{Codec, Reader};
        let mut wire = u16::from(scheme).to_be_bytes().to_vec();
        wire.extend((signature.len() as u16).to_be_bytes());
        wire.extend(signature);
        DigitallySignedStruct::read(&mut Reader::init(&wire)).unwrap()
    }

    /// Both verifiers that accept a certificate without a chain still refuse a handshake whose
    /// signature is not the certificate key's over this handshake.
    #[test]
    fn handshake_signatures_are_checked_without_chain_verification() {
        let provider = crypto_provider();
        let any = AnyServerCert::new(&provider);
        let peer_cert = peer(&rcgen::PKCS_ECDSA_P256_SHA256, SignatureScheme::ECDSA_NISTP256_SHA256);
        let pin = PinnedCertVerifier::new(&fingerprint_of_der(&peer_cert.cert), &provider).unwrap();
        let verifiers: [&dyn ServerCertVerifier; 2] = [&any, &pin];
        for (alg, scheme) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, SignatureScheme::ECDSA_NISTP256_SHA256),
            (&rcgen::PKCS_ED25519, SignatureScheme::ED25519),
        ] {
            let p = peer(alg, scheme);
            let other = peer(alg, scheme);
            let transcript = b"the handshake this server is in";
            let good = dss(scheme, &p.signer.sign(transcript).unwrap());
            let other_message = dss(scheme, &p.signer.sign(b"a handshake recorded elsewhere").unwrap());
            let other_key = dss(scheme, &other.signer.sign(transcript).unwrap());
            for v in verifiers {
                assert!(v.supported_verify_schemes().contains(&scheme), "{v:?}");
                v.verify_tls13_signature(transcript, &p.cert, &good).unwrap();
                v.verify_tls12_signature(transcript, &p.cert, &good).unwrap();
                for bad in [&other_message, &other_key] {
                    let err = v.verify_tls13_signature(transcript, &p.cert, bad).unwrap_err();
                    assert_eq!(
                        err,
                        rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                        "{v:?}"
                    );
                    assert!(v.verify_tls12_signature(transcript, &p.cert, bad).is_err(), "{v:?}");
                }
            }
        }
        // The chain itself: anything for one, the pin only for the other.
        let name = ServerName::try_from("anything").unwrap();
        let stranger = peer(&rcgen::PKCS_ED25519, SignatureScheme::ED25519);
        any.verify_server_cert(&stranger.cert, &[], &name, &[], UnixTime::now())
            .unwrap();
        pin.verify_server_cert(&peer_cert.cert, &[], &name, &[], UnixTime::now())
            .unwrap();
        let err = pin
            .verify_server_cert(&stranger.cert, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(error_chain(&err).contains("fingerprint mismatch"), "{err}");
    }
}
