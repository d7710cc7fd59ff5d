//! The sandbox's self-signed certificate and the rustls server configuration.

use std::sync::Arc;

use crate::SandboxError;

/// A certificate for 127.0.0.1 / localhost / the first node name, made at start.
pub(crate) struct SelfSigned {
    pub der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub pem: String,
    pub fingerprint: String,
}

impl SelfSigned {
    pub fn generate(node: &str) -> Result<SelfSigned, SandboxError> {
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string(), node.to_string()];
        let mut params = rcgen::CertificateParams::new(names).map_err(|e| SandboxError::Tls(e.to_string()))?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, node);
        dn.push(rcgen::DnType::OrganizationName, "PVE Cluster Node (driftless sandbox)");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().map_err(|e| SandboxError::Tls(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(|e| SandboxError::Tls(e.to_string()))?;
        let der = cert.der().to_vec();
        Ok(SelfSigned {
            fingerprint: fingerprint(&der),
            pem: cert.pem(),
            key_der: key.serialize_der(),
            der,
        })
    }

    /// rustls configuration with the aws-lc-rs provider given explicitly; HTTP/1.1 only,
    /// like pveproxy.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, SandboxError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cert = rustls::pki_types::CertificateDer::from(self.der.clone());
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SandboxError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| SandboxError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// SHA-256 of DER bytes as `AB:CD:...` (what `pvenode cert info` shows): the product's.
pub use driftless::pki::fingerprint_of_der as fingerprint;
