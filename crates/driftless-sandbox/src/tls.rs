//! The sandbox's self-signed certificate and the rustls server configuration.

use std::path::{Path, PathBuf};
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

    /// The certificate an earlier start on this state kept under `name` in `dir`, or the one
    /// `make` makes, kept there for the next start: a sandbox restarted on its state keeps
    /// its fingerprint (and a client that pinned it still connects).
    pub fn kept(
        dir: &Path,
        name: &str,
        make: impl FnOnce() -> Result<SelfSigned, SandboxError>,
    ) -> Result<SelfSigned, SandboxError> {
        let (cert_path, key_path) = Self::paths(dir, name);
        if let (Ok(cert), Ok(key)) = (std::fs::read(&cert_path), std::fs::read(&key_path))
            && let (Ok(certs), Ok(key)) = (driftless::pki::certificates(&cert), driftless::pki::private_key(&key))
            && let (Some(der), rustls::pki_types::PrivateKeyDer::Pkcs8(key)) = (certs.first(), key)
        {
            let der = der.to_vec();
            return Ok(SelfSigned {
                fingerprint: fingerprint(&der),
                pem: String::from_utf8_lossy(&cert).into_owned(),
                key_der: key.secret_pkcs8_der().to_vec(),
                der,
            });
        }
        let made = make()?;
        std::fs::create_dir_all(dir).map_err(|e| SandboxError::io(dir, e))?;
        let key_pem = driftless::pki::pem_encode("PRIVATE KEY", &made.key_der);
        crate::store::atomic_write(&key_path, key_pem.as_bytes()).map_err(|e| SandboxError::io(&key_path, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| SandboxError::io(&key_path, e))?;
        }
        crate::store::atomic_write(&cert_path, made.pem.as_bytes()).map_err(|e| SandboxError::io(&cert_path, e))?;
        Ok(made)
    }

    fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")))
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

/// Where a sandbox keeps its certificates and CAs across restarts on one state.
pub(crate) fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(".sandbox").join("tls")
}
