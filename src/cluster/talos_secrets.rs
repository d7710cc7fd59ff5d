//! The Talos secrets bundle: what `talosctl gen secrets` writes, and what driftless does with it.
//!
//! * [`TalosSecrets::parse`] reads a bundle (YAML; certificates and keys as base64-encoded PEM,
//!   as Talos's `pkg/machinery/config/generate/secrets` marshals them), [`TalosSecrets::generate`]
//!   makes a new one the way `talosctl gen secrets` does (the OS CA Ed25519, the others ECDSA
//!   P-256, tokens in kubeadm's `[a-z0-9]{6}.[a-z0-9]{16}` form), [`TalosSecrets::to_yaml`]
//!   writes it back in the same layout.
//! * [`fill`] puts the bundle's values in place of the `<secret:NAME/FIELD.PATH>` placeholders a
//!   rendered machine configuration carries; [`redact`] does the opposite to any text (Talos's
//!   dry-run diffs show the configs they compare, secrets included).
//! * [`talosconfig`] writes a client configuration like `talosctl gen config`: a new admin
//!   certificate (Ed25519, `O=os:admin`) signed by the bundle's OS CA.
//!
//! Nothing here prints a value of the bundle: `Debug` lists field names only and every error
//! names the field or the placeholder, never what it holds.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;

use crate::pki;

/// Every field a bundle must have, as `FIELD.PATH` (what placeholders name).
pub const REQUIRED_FIELDS: [&str; 14] = [
    "cluster.id",
    "cluster.secret",
    "secrets.bootstraptoken",
    "secrets.secretboxencryptionsecret",
    "trustdinfo.token",
    "certs.etcd.crt",
    "certs.etcd.key",
    "certs.k8s.crt",
    "certs.k8s.key",
    "certs.k8saggregator.crt",
    "certs.k8saggregator.key",
    "certs.k8sserviceaccount.key",
    "certs.os.crt",
    "certs.os.key",
];

/// Talos's `secrets.CAValidityTime`: 87600 hours.
const CA_VALIDITY: Duration = Duration::from_secs(87_600 * 3600);
/// Talos's `constants.TalosAPIDefaultCertificateValidityDuration`: one year.
const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TalosSecretsError {
    /// The YAML does not parse; the location only (serde's message could quote a value).
    #[error("the Talos secrets bundle is not valid YAML{0}")]
    Yaml(String),
    #[error("the Talos secrets bundle has no `{0}`")]
    Missing(String),
    #[error("the Talos secrets bundle's `{field}` {problem}")]
    Invalid { field: String, problem: String },
    #[error("{placeholder} names no field of the Talos secrets bundle")]
    UnknownPlaceholder { placeholder: String },
    #[error("{0}")]
    Crypto(String),
}

/// The name placeholders give the bundle unless told otherwise (the examples' cluster.yaml
/// calls its secret this).
pub const DEFAULT_SECRET_NAME: &str = "talos-secrets";

/// A Talos secrets bundle: `FIELD.PATH` -> the value as the bundle's YAML holds it (base64 PEM
/// for certificates and keys), and the name of the secret it was read from ([`redact`] writes
/// `<secret:NAME/FIELD.PATH>`). `Debug` shows field names only.
#[derive(Clone, PartialEq, Eq)]
pub struct TalosSecrets {
    name: String,
    fields: BTreeMap<String, String>,
}

impl fmt::Debug for TalosSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TalosSecrets")
            .field("name", &self.name)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TalosSecrets {
    /// Reads the YAML `talosctl gen secrets` writes. Every string leaf becomes a field (extra
    /// ones such as `secrets.aescbcencryptionsecret` are kept); the [`REQUIRED_FIELDS`] must be
    /// there and non-empty, certificates and keys base64-encoded PEM.
    pub fn parse(yaml: &str) -> Result<TalosSecrets, TalosSecretsError> {
        let value: yaml_serde::Value = yaml_serde::from_str(yaml).map_err(|e| {
            TalosSecretsError::Yaml(match e.location() {
                Some(l) => format!(" (line {}, column {})", l.line(), l.column()),
                None => String::new(),
            })
        })?;
        let mut fields = BTreeMap::new();
        collect_leaves(&value, String::new(), &mut fields)?;
        for field in REQUIRED_FIELDS {
            match fields.get(field) {
                None => return Err(TalosSecretsError::Missing(field.to_string())),
                Some(v) if v.trim().is_empty() => {
                    return Err(TalosSecretsError::Invalid {
                        field: field.to_string(),
                        problem: "is empty".into(),
                    });
                }
                Some(_) => {}
            }
        }
        let bundle = TalosSecrets {
            name: DEFAULT_SECRET_NAME.to_string(),
            fields,
        };
        for field in bundle.fields.keys().filter(|f| f.starts_with("certs.")) {
            bundle.pem(field)?;
        }
        Ok(bundle)
    }

    /// A new bundle, as `talosctl gen secrets` makes one for a current Talos: CAs valid for ten
    /// years (OS CA Ed25519 `O=talos`; etcd `O=etcd`, Kubernetes `O=kubernetes` and aggregator
    /// `CN=front-proxy` ECDSA P-256), an ECDSA service-account key, random tokens and IDs.
    pub fn generate() -> TalosSecrets {
        Self::try_generate().expect("generating keys and certificates with rcgen does not fail")
    }

    fn try_generate() -> Result<TalosSecrets, TalosSecretsError> {
        let mut fields = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            fields.insert(k.to_string(), v);
        };
        put("cluster.id", URL_SAFE.encode(random_bytes::<32>()));
        put("cluster.secret", STANDARD.encode(random_bytes::<32>()));
        put("secrets.bootstraptoken", kubeadm_token());
        put(
            "secrets.secretboxencryptionsecret",
            STANDARD.encode(random_bytes::<32>()),
        );
        put("trustdinfo.token", kubeadm_token());
        let cas: [(&str, DnType, &str, bool); 4] = [
            ("etcd", DnType::OrganizationName, "etcd", false),
            ("k8s", DnType::OrganizationName, "kubernetes", false),
            ("k8saggregator", DnType::CommonName, "front-proxy", false),
            ("os", DnType::OrganizationName, "talos", true),
        ];
        for (name, dn_type, dn_value, ed25519) in cas {
            let (crt, key) = new_ca(dn_type, dn_value, ed25519)?;
            put(&format!("certs.{name}.crt"), STANDARD.encode(crt));
            put(&format!("certs.{name}.key"), STANDARD.encode(key));
        }
        let (_, sa_key) = new_ecdsa_key()?;
        put("certs.k8sserviceaccount.key", STANDARD.encode(sa_key));
        Ok(TalosSecrets {
            name: DEFAULT_SECRET_NAME.to_string(),
            fields,
        })
    }

    /// The same bundle, known as the secret `name` (for [`redact`]'s placeholders).
    pub fn with_name(mut self, name: &str) -> TalosSecrets {
        self.name = name.to_string();
        self
    }

    /// The secret's name: [`DEFAULT_SECRET_NAME`] unless set with [`TalosSecrets::with_name`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bundle as `talosctl gen secrets` writes it (4-space indentation, its key order).
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        let section = |out: &mut String, header: &str, indent: usize, keys: &[(&str, &str)]| {
            let present: Vec<_> = keys
                .iter()
                .filter_map(|(k, p)| Some((k, self.fields.get(*p)?)))
                .collect();
            if present.is_empty() {
                return;
            }
            out.push_str(&" ".repeat(indent));
            out.push_str(header);
            out.push_str(":\n");
            for (k, v) in present {
                out.push_str(&" ".repeat(indent + 4));
                out.push_str(&format!("{k}: {}\n", yaml_scalar(v)));
            }
        };
        section(
            &mut out,
            "cluster",
            0,
            &[("id", "cluster.id"), ("secret", "cluster.secret")],
        );
        section(
            &mut out,
            "secrets",
            0,
            &[
                ("bootstraptoken", "secrets.bootstraptoken"),
                ("aescbcencryptionsecret", "secrets.aescbcencryptionsecret"),
                ("secretboxencryptionsecret", "secrets.secretboxencryptionsecret"),
            ],
        );
        section(&mut out, "trustdinfo", 0, &[("token", "trustdinfo.token")]);
        out.push_str("certs:\n");
        for ca in ["etcd", "k8s", "k8saggregator", "k8sserviceaccount", "os"] {
            let crt = format!("certs.{ca}.crt");
            let key = format!("certs.{ca}.key");
            section(&mut out, ca, 4, &[("crt", crt.as_str()), ("key", key.as_str())]);
        }
        out
    }

    /// The value at `FIELD.PATH`, as the bundle holds it (base64 PEM for certificates and keys).
    pub fn get(&self, path: &str) -> Option<&str> {
        self.fields.get(path).map(String::as_str)
    }

    /// Every field's path.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// A `certs.*` field decoded: the PEM text.
    pub fn pem(&self, path: &str) -> Result<String, TalosSecretsError> {
        let value = self
            .get(path)
            .ok_or_else(|| TalosSecretsError::Missing(path.to_string()))?;
        decode_pem_field(path, value)
    }

    /// The OS (Talos API) CA, which signs apid's and talosctl's certificates.
    pub fn os_ca(&self) -> Result<TalosCa, TalosSecretsError> {
        TalosCa::from_pem(&self.pem("certs.os.crt")?, &self.pem("certs.os.key")?)
    }
}

fn collect_leaves(
    value: &yaml_serde::Value,
    path: String,
    out: &mut BTreeMap<String, String>,
) -> Result<(), TalosSecretsError> {
    match value {
        yaml_serde::Value::Mapping(map) => {
            for (k, v) in map {
                let Some(k) = k.as_str() else {
                    return Err(TalosSecretsError::Invalid {
                        field: path,
                        problem: "has a key that is not a string".into(),
                    });
                };
                let child = if path.is_empty() {
                    k.to_string()
                } else {
                    format!("{path}.{k}")
                };
                collect_leaves(v, child, out)?;
            }
            Ok(())
        }
        yaml_serde::Value::String(s) => {
            out.insert(path, s.clone());
            Ok(())
        }
        yaml_serde::Value::Null => Ok(()),
        yaml_serde::Value::Tagged(t) => collect_leaves(&t.value, path, out),
        _ if path.is_empty() => Err(TalosSecretsError::Invalid {
            field: "(document)".into(),
            problem: "is not a mapping".into(),
        }),
        _ => Err(TalosSecretsError::Invalid {
            field: path,
            problem: "is not a string".into(),
        }),
    }
}

fn decode_pem_field(path: &str, value: &str) -> Result<String, TalosSecretsError> {
    pki::decode_base64_pem(value).ok_or_else(|| TalosSecretsError::Invalid {
        field: path.to_string(),
        problem: "is not base64-encoded PEM".into(),
    })
}

/// A YAML plain scalar when that reads back as the same string, a double-quoted one otherwise.
fn yaml_scalar(v: &str) -> String {
    let plain_ok = !v.is_empty()
        && yaml_serde::from_str::<yaml_serde::Value>(&format!("k: {v}"))
            .ok()
            .and_then(|doc| doc.get("k").and_then(|x| x.as_str().map(|s| s == v)))
            .unwrap_or(false);
    if plain_ok {
        v.to_string()
    } else {
        serde_json::to_string(v).expect("a string serializes")
    }
}

// ------------------------------------------------------------------------------- placeholders

/// Replaces every `<secret:{secret_name}/{FIELD.PATH}>` by the bundle's value. In the
/// `v1alpha1` document values are written as the bundle holds them (base64 PEM, as Talos's
/// `machine.ca.crt` wants); in the typed documents (`kind: ...`, Talos v1.14+) a `certs.*`
/// value is the PEM text itself (as `KubeAPIServerCAConfig` and friends want). A placeholder
/// inside a double-quoted scalar gets the value JSON-escaped (what the renderer writes), a bare
/// one a plain scalar, or a quoted one when the value needs it. A placeholder for an unknown
/// field is an error naming the placeholder; placeholders of other secrets are left alone.
pub fn fill(config: &str, secret_name: &str, bundle: &TalosSecrets) -> Result<String, TalosSecretsError> {
    let prefix = format!("<secret:{secret_name}/");
    let mut out = String::with_capacity(config.len() + 4096);
    for doc in split_documents(config) {
        let typed = doc.lines().any(|l| l.starts_with("kind:"));
        let mut rest = doc;
        while let Some(start) = rest.find(&prefix) {
            let after = &rest[start + prefix.len()..];
            let Some(end) = after.find(['>', '\n']) else {
                break;
            };
            if !after[end..].starts_with('>') {
                // Not a placeholder (no `>` on the line): copy through the newline.
                out.push_str(&rest[..start + prefix.len() + end]);
                rest = &after[end..];
                continue;
            }
            let path = &after[..end];
            let placeholder = &rest[start..start + prefix.len() + end + 1];
            let unknown = || TalosSecretsError::UnknownPlaceholder {
                placeholder: placeholder.to_string(),
            };
            let raw = bundle.get(path).ok_or_else(unknown)?;
            let value = if typed && path.starts_with("certs.") {
                decode_pem_field(path, raw)?
            } else {
                raw.to_string()
            };
            let before = &rest[..start];
            let tail = &after[end + 1..];
            out.push_str(before);
            if before.ends_with('"') && tail.starts_with('"') {
                out.push_str(&json_inner(&value));
            } else if value.contains('\n') || yaml_scalar(&value) != value {
                out.push_str(&serde_json::to_string(&value).expect("a string serializes"));
            } else {
                out.push_str(&value);
            }
            rest = tail;
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// Every value of the bundle that occurs in `text` replaced by its placeholder
/// `<secret:NAME/FIELD.PATH>`, NAME being [`TalosSecrets::name`]: the bundle's own form, and
/// for certificates and keys the PEM text too (whole, JSON-escaped, and line by line, as a diff
/// of YAML block scalars shows it).
pub fn redact(text: &str, bundle: &TalosSecrets) -> String {
    redact_as(text, &bundle.name, bundle)
}

/// [`redact`] with placeholders naming the secret `secret_name`.
pub fn redact_as(text: &str, secret_name: &str, bundle: &TalosSecrets) -> String {
    let mut needles: Vec<(String, String)> = Vec::new();
    for (path, value) in &bundle.fields {
        let placeholder = format!("<secret:{secret_name}/{path}>");
        needles.push((value.clone(), placeholder.clone()));
        if let Ok(pem) = decode_pem_field(path, value) {
            needles.push((json_inner(&pem), placeholder.clone()));
            needles.push((pem.trim_end().to_string(), placeholder.clone()));
            for line in pem.lines() {
                if !line.starts_with("-----") {
                    needles.push((line.to_string(), placeholder.clone()));
                }
            }
        }
    }
    // Longest first, so a whole PEM goes before its lines; nothing short enough to be a word.
    needles.retain(|(n, _)| n.trim().len() >= 12);
    needles.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    needles.dedup_by(|a, b| a.0 == b.0);
    let mut out = text.to_string();
    for (needle, placeholder) in needles {
        if out.contains(&needle) {
            out = out.replace(&needle, &placeholder);
        }
    }
    out
}

/// The YAML documents of a file, each with its `---` separator line (if any) in front.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if (trimmed == "---" || trimmed.starts_with("--- ")) && offset > start {
            docs.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// `value` as the inside of a JSON string (no quotes).
fn json_inner(value: &str) -> String {
    let quoted = serde_json::to_string(value).expect("a string serializes");
    quoted[1..quoted.len() - 1].to_string()
}

// ------------------------------------------------------------------------------- talosconfig

#[derive(Serialize)]
struct TalosconfigFile<'a> {
    context: &'a str,
    contexts: BTreeMap<&'a str, TalosconfigContext<'a>>,
}

#[derive(Serialize)]
struct TalosconfigContext<'a> {
    endpoints: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    nodes: &'a [String],
    ca: String,
    crt: String,
    key: String,
}

/// A talosconfig like `talosctl gen config` writes: one context named `context` with the
/// endpoints, default nodes, the OS CA, and a new admin client certificate (Ed25519,
/// `O=os:admin`, client auth, valid one year) signed by the bundle's OS CA.
pub fn talosconfig(
    bundle: &TalosSecrets,
    context: &str,
    endpoints: &[String],
    nodes: &[String],
) -> Result<String, TalosSecretsError> {
    let ca = bundle.os_ca()?;
    let (key, key_der) = new_ed25519_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, printable("os:admin")?);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, Duration::ZERO, CLIENT_CERT_VALIDITY);
    let crt = ca.sign(&params, &key)?;
    let file = TalosconfigFile {
        context,
        contexts: BTreeMap::from([(
            context,
            TalosconfigContext {
                endpoints,
                nodes,
                ca: STANDARD.encode(ca.cert_pem()),
                crt: STANDARD.encode(crt.pem()),
                key: STANDARD.encode(pki::pem_encode(pki::ED25519_LABEL, &key_der)),
            },
        )]),
    };
    yaml_serde::to_string(&file).map_err(|e| TalosSecretsError::Crypto(format!("cannot write the talosconfig: {e}")))
}

// ------------------------------------------------------------------------------- the OS CA

/// A CA certificate and its key, able to sign (Talos's OS CA: apid's server certificates and
/// talosctl's client certificates). `Debug` shows no key.
pub struct TalosCa {
    cert_der: Vec<u8>,
    dn: DistinguishedName,
    key: KeyPair,
}

impl fmt::Debug for TalosCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TalosCa")
            .field("subject", &self.dn)
            .finish_non_exhaustive()
    }
}

impl TalosCa {
    /// From PEM text: the certificate, and its key as Talos writes it (`ED25519 PRIVATE KEY`,
    /// or PKCS#8 `PRIVATE KEY`, Ed25519 or ECDSA P-256).
    pub fn from_pem(crt_pem: &str, key_pem: &str) -> Result<TalosCa, TalosSecretsError> {
        let bad = |what: &str| TalosSecretsError::Crypto(format!("the CA {what}"));
        let cert_der = pki::certificates(crt_pem.as_bytes())
            .map_err(|_| bad("certificate is not a PEM certificate"))?
            .remove(0)
            .to_vec();
        let dn = pki::subject_for_rcgen(&cert_der).map_err(|e| bad(&format!("certificate: {e}")))?;
        let pkcs8_as = |der: &[u8], algs: &[&'static rcgen::SignatureAlgorithm]| {
            algs.iter()
                .find_map(|alg| KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), alg).ok())
        };
        let key = match pki::private_key(key_pem.as_bytes()).map_err(|_| bad("key is not a PEM private key"))? {
            PrivateKeyDer::Pkcs8(der) => pkcs8_as(
                der.secret_pkcs8_der(),
                &[&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P256_SHA256],
            )
            .ok_or_else(|| bad("key is neither Ed25519 nor ECDSA P-256"))?,
            PrivateKeyDer::Sec1(der) => {
                let pkcs8 =
                    pki::ec_p256_sec1_to_pkcs8(der.secret_sec1_der()).map_err(|_| bad("key is not ECDSA P-256"))?;
                pkcs8_as(&pkcs8, &[&rcgen::PKCS_ECDSA_P256_SHA256]).ok_or_else(|| bad("key is not ECDSA P-256"))?
            }
            _ => return Err(bad("key has an unsupported PEM type")),
        };
        Ok(TalosCa { cert_der, dn, key })
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> String {
        pki::pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// Signs a certificate for `key` with these parameters (the issuer is this CA's subject).
    pub fn sign(&self, params: &CertificateParams, key: &KeyPair) -> Result<rcgen::Certificate, TalosSecretsError> {
        let mut issuer_params = CertificateParams::default();
        issuer_params.distinguished_name = self.dn.clone();
        let issuer = Issuer::new(issuer_params, &self.key);
        params
            .signed_by(key, &issuer)
            .map_err(|e| TalosSecretsError::Crypto(format!("cannot sign a certificate: {e}")))
    }

    /// A server certificate as apid's (Ed25519 key, server auth, valid one year) for these
    /// names (IP addresses become IP SANs): (certificate DER, PKCS#8 key DER).
    pub fn issue_server_cert(&self, names: &[String]) -> Result<(Vec<u8>, Vec<u8>), TalosSecretsError> {
        let (key, key_der) = new_ed25519_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => rcgen::string::Ia5String::try_from(n.as_str())
                    .map(SanType::DnsName)
                    .map_err(|e| TalosSecretsError::Crypto(format!("invalid name {n:?}: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        set_validity(&mut params, Duration::from_secs(3600), CLIENT_CERT_VALIDITY);
        let cert = self.sign(&params, &key)?;
        Ok((cert.der().to_vec(), key_der))
    }
}

// ------------------------------------------------------------------------------- keys and certificates

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut buf)
        .expect("the system's random number generator works");
    buf
}

/// `[a-z0-9]{6}.[a-z0-9]{16}`: Talos's `genToken(6, 16)` (kubeadm's bootstrap token format).
fn kubeadm_token() -> String {
    const CHARS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let pick = |n: usize| -> String {
        let mut s = String::with_capacity(n);
        while s.len() < n {
            for b in random_bytes::<32>() {
                // 252 = 7 * 36: rejection sampling keeps the choice uniform.
                if b < 252 && s.len() < n {
                    s.push(CHARS[(b % 36) as usize] as char);
                }
            }
        }
        s
    };
    format!("{}.{}", pick(6), pick(16))
}

fn random_serial() -> SerialNumber {
    let mut bytes = random_bytes::<16>();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn set_validity(params: &mut CertificateParams, backdate: Duration, validity: Duration) {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(backdate);
    params.not_after = epoch + since_epoch + validity;
}

fn printable(s: &str) -> Result<DnValue, TalosSecretsError> {
    rcgen::string::PrintableString::try_from(s)
        .map(DnValue::PrintableString)
        .map_err(|e| TalosSecretsError::Crypto(format!("{s:?} is not a printable string: {e}")))
}

/// A new Ed25519 key: the rcgen key pair and its PKCS#8 v1 DER (what Go's
/// `x509.MarshalPKCS8PrivateKey` writes, under Talos's `ED25519 PRIVATE KEY` label).
fn new_ed25519_key() -> Result<(KeyPair, Vec<u8>), TalosSecretsError> {
    let der = pki::new_ed25519_pkcs8().map_err(|e| TalosSecretsError::Crypto(e.to_string()))?;
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der.as_slice()), &rcgen::PKCS_ED25519)
        .map_err(|e| TalosSecretsError::Crypto(format!("cannot make an Ed25519 key: {e}")))?;
    Ok((key, der))
}

/// A new ECDSA P-256 key: the rcgen key pair and its SEC1 `EC PRIVATE KEY` DER with the curve
/// named (Go's `x509.MarshalECPrivateKey`).
fn new_ecdsa_key() -> Result<(KeyPair, String), TalosSecretsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TalosSecretsError::Crypto(format!("cannot make an ECDSA key: {e}")))?;
    let sec1 =
        pki::ec_p256_pkcs8_to_sec1(key.serialized_der()).map_err(|e| TalosSecretsError::Crypto(e.to_string()))?;
    Ok((key, pki::pem_encode("EC PRIVATE KEY", &sec1)))
}

/// A self-signed CA like Talos's `x509.NewSelfSignedCertificateAuthority`: (cert PEM, key PEM).
fn new_ca(dn_type: DnType, dn_value: &str, ed25519: bool) -> Result<(String, String), TalosSecretsError> {
    let (key, key_pem) = if ed25519 {
        let (key, der) = new_ed25519_key()?;
        (key, pki::pem_encode(pki::ED25519_LABEL, &der))
    } else {
        new_ecdsa_key()?
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(dn_type, printable(dn_value)?);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, Duration::ZERO, CA_VALIDITY);
    let cert = params
        .self_signed(&key)
        .map_err(|e| TalosSecretsError::Crypto(format!("cannot make a CA: {e}")))?;
    Ok((cert.pem(), key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier as _;

    fn sample() -> TalosSecrets {
        TalosSecrets::generate()
    }

    #[test]
    fn generated_bundles_round_trip_and_have_talos_shapes() {
        let bundle = sample();
        let yaml = bundle.to_yaml();
        let parsed = TalosSecrets::parse(&yaml).expect("the generated YAML parses");
        assert_eq!(parsed, bundle);
        for field in REQUIRED_FIELDS {
            assert!(bundle.get(field).is_some_and(|v| !v.is_empty()), "{field}");
        }
        let token = regex::Regex::new(r"^[a-z0-9]{6}\.[a-z0-9]{16}$").unwrap();
        assert!(token.is_match(bundle.get("trustdinfo.token").unwrap()));
        assert!(token.is_match(bundle.get("secrets.bootstraptoken").unwrap()));
        assert_eq!(URL_SAFE.decode(bundle.get("cluster.id").unwrap()).unwrap().len(), 32);
        assert_eq!(
            STANDARD.decode(bundle.get("cluster.secret").unwrap()).unwrap().len(),
            32
        );
        // The PEM labels Talos writes: each field one block.
        let labels = |field: &str| -> Vec<String> {
            let pem = bundle.pem(field).unwrap();
            pem.lines()
                .filter_map(|l| l.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")))
                .map(String::from)
                .collect()
        };
        assert_eq!(labels("certs.os.key"), ["ED25519 PRIVATE KEY"]);
        for ec in [
            "certs.etcd.key",
            "certs.k8s.key",
            "certs.k8saggregator.key",
            "certs.k8sserviceaccount.key",
        ] {
            assert_eq!(labels(ec), ["EC PRIVATE KEY"], "{ec}");
        }
        assert_eq!(labels("certs.os.crt"), ["CERTIFICATE"]);
        // Layout as talosctl writes it.
        assert!(yaml.starts_with("cluster:\n    id: "), "{yaml}");
        assert!(yaml.contains("\ncerts:\n    etcd:\n        crt: "), "{yaml}");
        // The CAs name themselves as Talos does.
        let os = bundle.os_ca().unwrap();
        assert_eq!(pki::organizations(os.cert_der()), ["talos"]);
        let etcd = pki::certificates(bundle.pem("certs.etcd.crt").unwrap().as_bytes()).unwrap();
        assert_eq!(pki::organizations(&etcd[0]), ["etcd"]);
        // Two bundles share nothing.
        let other = TalosSecrets::generate();
        for field in REQUIRED_FIELDS {
            assert_ne!(bundle.get(field), other.get(field), "{field}");
        }
    }

    #[test]
    fn the_ec_keys_are_sec1_with_the_curve_named_and_the_ca_keys_load_back() {
        let bundle = sample();
        let PrivateKeyDer::Sec1(sec1) = pki::private_key(bundle.pem("certs.k8s.key").unwrap().as_bytes()).unwrap()
        else {
            panic!("not SEC1")
        };
        // SEQUENCE { INTEGER 1, OCTET STRING (32), [0] { OID prime256v1 }, [1] { BIT STRING } }
        let curve = yasna::parse_der(sec1.secret_sec1_der(), |r| {
            r.read_sequence(|s| {
                assert_eq!(s.next().read_u8()?, 1);
                assert_eq!(s.next().read_bytes()?.len(), 32);
                let curve = s.next().read_tagged(yasna::Tag::context(0), |r| r.read_oid())?;
                s.next()
                    .read_tagged(yasna::Tag::context(1), |r| r.read_bitvec_bytes())?;
                Ok(curve)
            })
        })
        .unwrap();
        assert_eq!(curve.components(), &[1, 2, 840, 10045, 3, 1, 7]);
        // Every CA of the bundle reads back as a CA rcgen can sign with (EC keys in SEC1, the
        // OS CA's Ed25519 key under Talos's own label).
        for ca in ["etcd", "k8s", "k8saggregator", "os"] {
            let crt = bundle.pem(&format!("certs.{ca}.crt")).unwrap();
            let key = bundle.pem(&format!("certs.{ca}.key")).unwrap();
            let ca = TalosCa::from_pem(&crt, &key).unwrap_or_else(|e| panic!("{ca}: {e}"));
            ca.issue_server_cert(&["127.0.0.1".into()]).unwrap();
        }
    }

    #[test]
    fn parse_names_the_missing_or_broken_field_never_a_value() {
        let bundle = sample();
        let yaml = bundle.to_yaml();
        let without = yaml
            .lines()
            .filter(|l| !l.trim_start().starts_with("token:"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            TalosSecrets::parse(&without).unwrap_err(),
            TalosSecretsError::Missing("trustdinfo.token".into())
        );
        let os_crt = bundle.get("certs.os.crt").unwrap();
        let broken = yaml.replace(os_crt, "bm90IHBlbQ==");
        let err = TalosSecrets::parse(&broken).unwrap_err();
        assert_eq!(
            err,
            TalosSecretsError::Invalid {
                field: "certs.os.crt".into(),
                problem: "is not base64-encoded PEM".into()
            }
        );
        let token = bundle.get("secrets.bootstraptoken").unwrap();
        let bad_yaml = format!("cluster: [\nsecrets: {token}\n");
        let err = TalosSecrets::parse(&bad_yaml).unwrap_err().to_string();
        assert!(!err.contains(token), "{err}");
        let debug = format!("{bundle:?}");
        for field in REQUIRED_FIELDS {
            assert!(!debug.contains(bundle.get(field).unwrap()), "Debug shows {field}");
        }
        assert!(debug.contains("trustdinfo.token"));
    }

    #[test]
    fn parse_reads_talosctl_output() {
        // The layout of talosctl's own output (Talos's testdata), values from a generated bundle.
        let b = sample();
        let g = |f: &str| b.get(f).unwrap().to_string();
        let yaml = format!(
            "cluster:\n    id: {}\n    secret: {}\nsecrets:\n    bootstraptoken: {}\n    secretboxencryptionsecret: {}\n\
             trustdinfo:\n    token: {}\ncerts:\n    etcd:\n        crt: {}\n        key: {}\n    k8s:\n        crt: {}\n        key: {}\n\
             \x20   k8saggregator:\n        crt: {}\n        key: {}\n    k8sserviceaccount:\n        key: {}\n    os:\n        crt: {}\n        key: {}\n",
            g("cluster.id"),
            g("cluster.secret"),
            g("secrets.bootstraptoken"),
            g("secrets.secretboxencryptionsecret"),
            g("trustdinfo.token"),
            g("certs.etcd.crt"),
            g("certs.etcd.key"),
            g("certs.k8s.crt"),
            g("certs.k8s.key"),
            g("certs.k8saggregator.crt"),
            g("certs.k8saggregator.key"),
            g("certs.k8sserviceaccount.key"),
            g("certs.os.crt"),
            g("certs.os.key"),
        );
        assert_eq!(TalosSecrets::parse(&yaml).unwrap(), b);
        assert_eq!(b.to_yaml(), yaml);
    }

    const CONFIG: &str = "version: v1alpha1\nmachine:\n  token: \"<secret:talos-secrets/trustdinfo.token>\"\n  ca:\n    crt: \"<secret:talos-secrets/certs.os.crt>\"\n    key: <secret:talos-secrets/certs.os.key>\n  other: \"<secret:other/x.y>\"\n---\napiVersion: v1alpha1\nkind: KubeAPIServerCAConfig\nissuingCA:\n  cert: \"<secret:talos-secrets/certs.k8s.crt>\"\n  key: \"<secret:talos-secrets/certs.k8s.key>\"\n---\napiVersion: v1alpha1\nkind: DiscoveryIdentityConfig\nclusterID: \"<secret:talos-secrets/cluster.id>\"\n";

    #[test]
    fn fill_puts_base64_in_v1alpha1_and_pem_in_typed_documents() {
        let bundle = sample();
        let filled = fill(CONFIG, "talos-secrets", &bundle).unwrap();
        assert!(!filled.contains("<secret:talos-secrets/"), "{filled}");
        assert!(filled.contains("<secret:other/x.y>"), "other secrets are left alone");
        let docs: Vec<yaml_serde::Value> = yaml_serde::Deserializer::from_str(&filled)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs[0]["machine"]["token"].as_str(), bundle.get("trustdinfo.token"));
        assert_eq!(docs[0]["machine"]["ca"]["crt"].as_str(), bundle.get("certs.os.crt"));
        assert_eq!(docs[0]["machine"]["ca"]["key"].as_str(), bundle.get("certs.os.key"));
        assert_eq!(
            docs[1]["issuingCA"]["cert"].as_str().unwrap(),
            bundle.pem("certs.k8s.crt").unwrap()
        );
        assert_eq!(
            docs[1]["issuingCA"]["key"].as_str().unwrap(),
            bundle.pem("certs.k8s.key").unwrap()
        );
        assert_eq!(docs[2]["clusterID"].as_str(), bundle.get("cluster.id"));
    }

    #[test]
    fn fill_refuses_an_unknown_field_naming_the_placeholder() {
        let bundle = sample();
        let err = fill(
            "a: \"<secret:talos-secrets/certs.os.crt>\"\nb: \"<secret:talos-secrets/certs.nope.crt>\"\n",
            "talos-secrets",
            &bundle,
        )
        .unwrap_err();
        assert_eq!(
            err,
            TalosSecretsError::UnknownPlaceholder {
                placeholder: "<secret:talos-secrets/certs.nope.crt>".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "<secret:talos-secrets/certs.nope.crt> names no field of the Talos secrets bundle"
        );
    }

    #[test]
    fn redact_undoes_fill_and_catches_pem_lines() {
        let bundle = sample();
        let filled = fill(CONFIG, "talos-secrets", &bundle).unwrap();
        assert_eq!(redact(&filled, &bundle), CONFIG);
        // A diff of the YAML Talos re-encodes shows a PEM as a block scalar, line by line.
        let pem = bundle.pem("certs.k8s.key").unwrap();
        let diff: String = pem.lines().map(|l| format!("+        {l}\n")).collect();
        let redacted = redact(&diff, &bundle);
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!redacted.contains(line), "{redacted}");
        }
        assert!(redacted.contains("<secret:talos-secrets/certs.k8s.key>"));
        assert_eq!(redact("nothing secret here", &bundle), "nothing secret here");
    }

    #[test]
    fn talosconfig_carries_an_admin_certificate_signed_by_the_os_ca() {
        let bundle = sample();
        let text = talosconfig(
            &bundle,
            "homelab",
            &["10.0.0.10".to_string()],
            &["10.0.0.10".to_string(), "10.0.0.11".to_string()],
        )
        .unwrap();
        let v: yaml_serde::Value = yaml_serde::from_str(&text).unwrap();
        assert_eq!(v["context"].as_str(), Some("homelab"));
        let ctx = &v["contexts"]["homelab"];
        assert_eq!(ctx["endpoints"][0].as_str(), Some("10.0.0.10"));
        assert_eq!(ctx["nodes"][1].as_str(), Some("10.0.0.11"));
        let decode = |k: &str| String::from_utf8(STANDARD.decode(ctx[k].as_str().unwrap()).unwrap()).unwrap();
        assert_eq!(decode("ca"), bundle.pem("certs.os.crt").unwrap());
        let key = decode("key");
        assert!(key.starts_with("-----BEGIN ED25519 PRIVATE KEY-----\n"), "{key}");
        assert!(matches!(pki::private_key(key.as_bytes()), Ok(PrivateKeyDer::Pkcs8(_))));
        let crt = pki::certificates(decode("crt").as_bytes()).unwrap().remove(0).to_vec();
        assert_eq!(pki::organizations(&crt), ["os:admin"]);

        // The chain verifies with rustls's verifier, the OS CA as the only root.
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                bundle.os_ca().unwrap().cert_der().to_vec(),
            ))
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
        verifier
            .verify_client_cert(
                &rustls::pki_types::CertificateDer::from(crt),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("the admin certificate chains to the OS CA");
        // The secrets bundle's own keys never show up in it.
        assert!(!text.contains(bundle.get("certs.os.key").unwrap()));
    }

    #[test]
    fn server_certificates_chain_to_the_os_ca() {
        let bundle = sample();
        let ca = bundle.os_ca().unwrap();
        let (crt, _key) = ca
            .issue_server_cert(&["127.0.0.1".into(), "localhost".into(), "10.0.0.10".into()])
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(ca.cert_der().to_vec()))
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        for name in ["127.0.0.1", "10.0.0.10", "localhost"] {
            verifier
                .verify_server_cert(
                    &rustls::pki_types::CertificateDer::from(crt.clone()),
                    &[],
                    &rustls::pki_types::ServerName::try_from(name).unwrap(),
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
