//! Certificates and keys as bytes, in one place for the product and its sandbox: PEM, the
//! names inside X.509 certificates, EC key formats, SHA-256 fingerprints.
//!
//! * PEM is read with rustls-pki-types' [`PemObject`] (what rustls-pemfile became). Talos
//!   writes its Ed25519 keys as PKCS#8 under the label `ED25519 PRIVATE KEY`, which nothing
//!   else knows: such a block is read as the `PRIVATE KEY` it is. PEM is written as Go's
//!   `encoding/pem` writes it ([`pem_encode`]).
//! * Certificate subjects are read with yasna, the DER reader rcgen brings along: the
//!   organisations (`O=`, Talos's roles such as `os:admin`) and the whole name with its string
//!   types, so that a certificate rcgen signs names its issuer byte for byte as the CA names
//!   itself ([`subject_for_rcgen`]; chain building compares the bytes).
//! * EC P-256 keys move between PKCS#8 (what rcgen reads) and SEC1 with the curve named (what
//!   Go writes and reads) through aws-lc-rs, rustls's crypto.
//! * Fingerprints are SHA-256 of the DER, `AB:CD:...`, as `pvenode cert info` prints them.
//!
//! Nothing here logs or formats a key: errors say what did not parse, never what it held.

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    /// The PEM text is malformed (rustls-pki-types' words; they never quote the contents).
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("holds no PEM certificate")]
    NoCertificate,
    #[error("holds no PEM private key")]
    NoPrivateKey,
    /// A certificate or key whose DER does not read as one.
    #[error("{0} does not parse")]
    Der(&'static str),
    #[error("{0}")]
    Other(&'static str),
}

/// Talos's label for a PKCS#8 Ed25519 key (`x509.MarshalPKCS8PrivateKey` under its own name).
pub const ED25519_LABEL: &str = "ED25519 PRIVATE KEY";

// ------------------------------------------------------------------------------- PEM

/// The PEM text with Talos's Ed25519 label renamed to the PKCS#8 one it stands for.
fn standard_labels(pem: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let begin = format!("-----BEGIN {ED25519_LABEL}-----");
    if !pem.windows(begin.len()).any(|w| w == begin.as_bytes()) {
        return std::borrow::Cow::Borrowed(pem);
    }
    let text = String::from_utf8_lossy(pem)
        .replace(&begin, "-----BEGIN PRIVATE KEY-----")
        .replace(&format!("-----END {ED25519_LABEL}-----"), "-----END PRIVATE KEY-----");
    std::borrow::Cow::Owned(text.into_bytes())
}

fn pem_error(e: rustls::pki_types::pem::Error) -> PkiError {
    // The variants that quote a line of the input are described without it.
    use rustls::pki_types::pem::Error as E;
    PkiError::Pem(match e {
        E::MissingSectionEnd { .. } => "a section has no END line".into(),
        E::IllegalSectionStart { .. } => "a BEGIN line is malformed".into(),
        E::Base64Decode(_) => "a section is not base64".into(),
        E::NoItemsFound => "no section".into(),
        other => format!("{other:?}"),
    })
}

/// Every PEM section rustls-pki-types knows (certificates, keys, CRLs, ...), in order, Talos's
/// Ed25519 keys as [`SectionKind::PrivateKey`]; sections with other labels are skipped.
pub fn sections(pem: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, PkiError> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(&standard_labels(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)
}

/// Every `CERTIFICATE` of a PEM text, in order; at least one.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate);
    }
    Ok(certs)
}

/// The first private key of a PEM text: PKCS#8 (`PRIVATE KEY`, Talos's `ED25519 PRIVATE KEY`),
/// SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(&standard_labels(pem)).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => PkiError::NoPrivateKey,
        e => pem_error(e),
    })
}

/// PEM with 64-character lines and `\n` endings, as Go's `encoding/pem` writes it.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Base64 of PEM text, as talosconfigs, Talos secrets bundles and machine configs carry
/// certificates and keys: the PEM text, when it decodes and holds at least one section.
pub fn decode_base64_pem(value: &str) -> Option<String> {
    let bytes = STANDARD.decode(value.trim()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    sections(text.as_bytes()).ok().filter(|s| !s.is_empty()).map(|_| text)
}

// ------------------------------------------------------------------------------- fingerprints

/// The SHA-256 fingerprint of DER bytes, as `pvenode cert info` prints it: `AB:CD:...`.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ------------------------------------------------------------------------------- names

/// One attribute of a distinguished name: its OID's arcs, the DER tag of its string type
/// (`0x13` PrintableString, `0x0c` UTF8String, ...) and the string's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAttribute {
    pub oid: Vec<u64>,
    pub tag: u8,
    pub value: Vec<u8>,
}

/// `id-at-organizationName`.
const OID_ORGANIZATION: [u64; 4] = [2, 5, 4, 10];

/// The subject Name of a certificate (its whole DER, tag and length included).
fn subject_der(cert: &[u8]) -> yasna::ASN1Result<Vec<u8>> {
    yasna::parse_der(cert, |r| {
        r.read_sequence(|cert| {
            let subject = cert.next().read_sequence(|tbs| {
                if tbs.next().lookahead_tag()? == yasna::Tag::context(0) {
                    tbs.next().read_der()?; // version
                }
                for _ in ["serialNumber", "signature", "issuer", "validity"] {
                    tbs.next().read_der()?;
                }
                let subject = tbs.next().read_der()?;
                // subjectPublicKeyInfo, unique IDs, extensions.
                while tbs.read_optional(|r| r.read_der())?.is_some() {}
                Ok(subject)
            })?;
            cert.next().read_der()?; // signatureAlgorithm
            cert.next().read_der()?; // signatureValue
            Ok(subject)
        })
    })
}

/// The attributes of a DER Name, in order.
fn name_attributes(name: &[u8]) -> yasna::ASN1Result<Vec<NameAttribute>> {
    let rdns = yasna::parse_der(name, |r| {
        r.collect_sequence_of(|rdn| {
            rdn.collect_set_of(|atv| {
                atv.read_sequence(|atv| {
                    let oid = atv.next().read_oid()?;
                    let value = atv.next().read_tagged_der()?;
                    Ok(NameAttribute {
                        oid: oid.components().clone(),
                        tag: u8::try_from(value.tag().tag_number).unwrap_or(0),
                        value: value.value().to_vec(),
                    })
                })
            })
        })
    })?;
    Ok(rdns.into_iter().flatten().collect())
}

/// A certificate's subject, attribute by attribute.
pub fn subject(cert_der: &[u8]) -> Result<Vec<NameAttribute>, PkiError> {
    let name = subject_der(cert_der).map_err(|_| PkiError::Der("the certificate"))?;
    name_attributes(&name).map_err(|_| PkiError::Der("the certificate's subject"))
}

/// The organisations (`O=`) of a certificate's subject: Talos's roles (`os:admin`). Empty when
/// the certificate does not parse.
pub fn organizations(cert_der: &[u8]) -> Vec<String> {
    subject(cert_der)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.oid == OID_ORGANIZATION)
        .filter_map(|a| String::from_utf8(a.value).ok())
        .collect()
}

/// A certificate's subject for rcgen, every attribute's string type kept, so that what rcgen
/// signs as this CA names its issuer exactly as the CA's certificate names its subject.
pub fn subject_for_rcgen(cert_der: &[u8]) -> Result<rcgen::DistinguishedName, PkiError> {
    use rcgen::DnValue;
    use rcgen::string::{BmpString, Ia5String, PrintableString, TeletexString};
    let unsupported = PkiError::Other("the certificate's subject uses a string type rcgen cannot write");
    let mut dn = rcgen::DistinguishedName::new();
    for a in subject(cert_der)? {
        let text = || String::from_utf8(a.value.clone()).ok();
        let value = match a.tag {
            0x13 => text()
                .and_then(|t| PrintableString::try_from(t).ok())
                .map(DnValue::PrintableString),
            0x16 => text().and_then(|t| Ia5String::try_from(t).ok()).map(DnValue::Ia5String),
            0x14 => text()
                .and_then(|t| TeletexString::try_from(t).ok())
                .map(DnValue::TeletexString),
            0x1e => BmpString::from_utf16be(a.value.clone()).ok().map(DnValue::BmpString),
            0x0c => text().map(DnValue::Utf8String),
            _ => None,
        };
        dn.push(rcgen::DnType::from_oid(&a.oid), value.ok_or(unsupported.clone())?);
    }
    Ok(dn)
}

// ------------------------------------------------------------------------------- keys

/// A new Ed25519 key as PKCS#8 v1 DER (seed only), what Go's `x509.MarshalPKCS8PrivateKey`
/// writes.
pub fn new_ed25519_pkcs8() -> Result<Vec<u8>, PkiError> {
    Ed25519KeyPair::generate()
        .and_then(|k| k.to_pkcs8v1())
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|_| PkiError::Other("cannot make an Ed25519 key"))
}

/// An ECDSA P-256 key in PKCS#8 as SEC1 `ECPrivateKey` with the curve named in `[0]` (Go's
/// `x509.MarshalECPrivateKey`; Go cannot read a SEC1 key without the curve).
pub fn ec_p256_pkcs8_to_sec1(pkcs8: &[u8]) -> Result<Vec<u8>, PkiError> {
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
        .map_err(|_| PkiError::Der("the PKCS#8 ECDSA P-256 key"))?;
    key.private_key()
        .as_der()
        .map(|der| der.as_ref().to_vec())
        .map_err(|_| PkiError::Other("cannot write the ECDSA key as SEC1"))
}

/// A SEC1 `ECPrivateKey` on P-256 as PKCS#8 (what rcgen reads).
pub fn ec_p256_sec1_to_pkcs8(sec1: &[u8]) -> Result<Vec<u8>, PkiError> {
    let key = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, sec1)
        .map_err(|_| PkiError::Der("the SEC1 ECDSA P-256 key"))?;
    key.to_pkcs8v1()
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|_| PkiError::Other("cannot write the ECDSA key as PKCS#8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dn: rcgen::DistinguishedName) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn pem_round_trips_for_every_label_driftless_writes() {
        let (cert, key) = ca(rcgen::DistinguishedName::new());
        let der = cert.der().to_vec();
        let pem = pem_encode("CERTIFICATE", &der);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
        assert!(pem.ends_with("-----END CERTIFICATE-----\n"));
        assert_eq!(
            certificates(pem.as_bytes()).unwrap(),
            [CertificateDer::from(der.clone())]
        );
        // rcgen's own PEM (the same base64 inside) reads the same.
        assert_eq!(certificates(cert.pem().as_bytes()).unwrap()[0].as_ref(), der.as_slice());

        // Talos's Ed25519 label reads as the PKCS#8 key it is.
        let ed = new_ed25519_pkcs8().unwrap();
        assert_eq!(ed.len(), 48, "PKCS#8 v1, seed only");
        let ed_pem = pem_encode(ED25519_LABEL, &ed);
        assert_eq!(
            private_key(ed_pem.as_bytes()).unwrap(),
            PrivateKeyDer::Pkcs8(ed.clone().into())
        );
        let sec1 = ec_p256_pkcs8_to_sec1(&key.serialize_der()).unwrap();
        let ec_pem = pem_encode("EC PRIVATE KEY", &sec1);
        assert_eq!(
            private_key(ec_pem.as_bytes()).unwrap(),
            PrivateKeyDer::Sec1(sec1.clone().into())
        );

        // Several sections in one text, in order; labels nobody knows are skipped.
        let text = format!("{ec_pem}-----BEGIN SOMETHING ELSE-----\nAAAA\n-----END SOMETHING ELSE-----\n{pem}{ed_pem}");
        let kinds: Vec<SectionKind> = sections(text.as_bytes()).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            kinds,
            [
                SectionKind::EcPrivateKey,
                SectionKind::Certificate,
                SectionKind::PrivateKey
            ]
        );
        // Base64 of PEM, as talosconfigs carry it.
        assert_eq!(decode_base64_pem(&STANDARD.encode(&pem)).as_deref(), Some(pem.as_str()));
        assert_eq!(decode_base64_pem(&STANDARD.encode("no PEM here")), None);
        assert_eq!(decode_base64_pem("%%%"), None);
    }

    #[test]
    fn broken_pem_is_an_error_that_quotes_nothing() {
        let (cert, _) = ca(rcgen::DistinguishedName::new());
        let pem = cert.pem();
        let cut = &pem[..pem.len() - 30];
        let err = certificates(cut.as_bytes()).unwrap_err();
        assert_eq!(err, PkiError::Pem("a section has no END line".into()));
        assert_eq!(certificates(b"nothing").unwrap_err(), PkiError::NoCertificate);
        assert_eq!(private_key(pem.as_bytes()).unwrap_err(), PkiError::NoPrivateKey);
        let body_line = pem.lines().nth(1).unwrap();
        assert!(!err.to_string().contains(body_line));
    }

    #[test]
    fn fingerprints_are_sha256_colon_hex() {
        let fp = fingerprint_of_der(b"");
        assert!(fp.starts_with("E3:B0:C4:42"), "{fp}");
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert_eq!(fp, fp.to_uppercase());
    }

    #[test]
    fn subjects_keep_their_string_types() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::OrganizationName,
            rcgen::DnValue::PrintableString("os:admin".try_into().unwrap()),
        );
        dn.push(
            rcgen::DnType::OrganizationalUnitName,
            rcgen::DnValue::Utf8String("talos".into()),
        );
        dn.push(rcgen::DnType::CommonName, "front-proxy");
        let (cert, key) = ca(dn);
        assert_eq!(organizations(cert.der()), ["os:admin"]);
        let attributes = subject(cert.der()).unwrap();
        assert_eq!(attributes.iter().map(|a| a.tag).collect::<Vec<_>>(), [0x13, 0x0c, 0x0c]);
        assert_eq!(attributes[2].oid, [2, 5, 4, 3]);
        // rcgen writes the name back byte for byte: a certificate it signs chains to this CA.
        let read = subject_for_rcgen(cert.der()).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = read;
        let issuer = rcgen::Issuer::new(params, &key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["leaf".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(
                leaf.der(),
                &[],
                &rustls::pki_types::ServerName::try_from("leaf").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("the leaf chains to the CA");
        assert_eq!(subject(b"\x30\x03\x02\x01\x01"), Err(PkiError::Der("the certificate")));
        assert!(organizations(b"garbage").is_empty());
    }

    #[test]
    fn ec_keys_convert_both_ways_and_sec1_names_its_curve() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let sec1 = ec_p256_pkcs8_to_sec1(&key.serialize_der()).unwrap();
        // SEQUENCE { INTEGER 1, OCTET STRING (32), [0] { OID prime256v1 }, [1] { BIT STRING } }
        let (version, d, curve, public) = yasna::parse_der(&sec1, |r| {
            r.read_sequence(|s| {
                let version = s.next().read_u8()?;
                let d = s.next().read_bytes()?;
                let curve = s.next().read_tagged(yasna::Tag::context(0), |r| r.read_oid())?;
                let public = s
                    .next()
                    .read_tagged(yasna::Tag::context(1), |r| r.read_bitvec_bytes())?;
                Ok((version, d, curve, public))
            })
        })
        .unwrap();
        assert_eq!((version, d.len()), (1, 32));
        assert_eq!(curve.components(), &[1, 2, 840, 10045, 3, 1, 7]);
        assert_eq!(public.1, 65 * 8);
        let pkcs8 = ec_p256_sec1_to_pkcs8(&sec1).unwrap();
        let back =
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8.as_slice().into(), &rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap();
        assert_eq!(back.public_key_raw(), key.public_key_raw());
        assert!(ec_p256_sec1_to_pkcs8(b"\x30\x00").is_err());
        assert!(ec_p256_pkcs8_to_sec1(&new_ed25519_pkcs8().unwrap()).is_err());
    }
}
