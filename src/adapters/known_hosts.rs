//! Host-key verification against an OpenSSH `known_hosts` file, as `ssh` decides it with
//! `StrictHostKeyChecking=yes` (sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT"; OpenSSH's hostfile.c,
//! match.c and sshconnect.c `check_host_key`).
//!
//! * **The name looked up** is `host` for port 22 and `[host]:port` for any other port. Host
//!   names are lowercased (addresses are not), as `ssh` does. When nothing at all is listed
//!   for `[host]:port` (OpenSSH's `HOST_NEW`), the port-less `host` is tried as well: a key
//!   found there accepts, a revoked key refuses, and a different key listed there only leaves
//!   the host unknown (OpenSSH's quiet retry "checking without port identifier").
//! * **Host fields**: a comma-separated list of patterns with `*` and `?`, each possibly
//!   negated with `!`; a matching negated pattern makes the whole line not match, whatever
//!   else matches. Matching is case-insensitive. A field starting with `|` is one hashed name
//!   `|1|base64(salt)|base64(HMAC-SHA1(salt, name))`, with the name as above (`[host]:port`
//!   for non-22 ports); a field that starts with `|` but is not a valid hash makes the line
//!   invalid (skipped).
//! * **Verdict** (OpenSSH's `check_key_in_hostkeys`): among the unmarked lines that match the
//!   name, one with the presented key accepts ([`Verdict::Accepted`]); if none does but some
//!   listed another key (of any type), the key changed ([`Verdict::Changed`], naming the last
//!   such line as `ssh` does); if no line matched, the host is [`Verdict::Unknown`]. Whatever
//!   that said, a matching `@revoked` line with the presented key — or, for a certificate,
//!   with its CA key — refuses ([`Verdict::Revoked`]): a revoked key is never accepted even
//!   when another line lists it, before or after the `@revoked` line.
//! * **`@cert-authority`** lines are used only for host certificates: a certificate is
//!   accepted when a matching `@cert-authority` line holds the key that signed it, the
//!   signature verifies, it is a *host* certificate, it is valid now
//!   (`valid_after <= now < valid_before`), it lists principals and one of them (as a `*`/`?`
//!   pattern) matches the host name (without the port), and it has no critical options. A
//!   certificate that fails any of this is not refused outright: as `ssh` does, its plain key
//!   is then checked against the unmarked lines (unless the certificate or its CA was
//!   revoked). Plain keys are never checked against `@cert-authority` lines.
//! * **Skipped lines**, as OpenSSH skips them: blank lines and `#` comments; an unknown or
//!   repeated marker; a line with nothing after the host field; a missing key; an unknown key
//!   type; a key that does not decode or whose type differs from the one named on the line.
//!   Lines end at `\n` only, and bytes are compared as bytes (the file need not be UTF-8).
//!
//! Known differences from OpenSSH, all of which refuse in both: a line holding a key that
//! OpenSSH rejects on semantic grounds (an RSA key under 1024 bits, a key type the installed
//! OpenSSH no longer supports such as `ssh-dss` in OpenSSH 10) is skipped by OpenSSH but
//! counts here as "a different key listed" (Changed instead of Unknown). `CheckHostIP`,
//! `HostKeyAlias` and `KnownHostsCommand` have no equivalent here.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, Certificate, PublicKey, certificate::CertType};
use sha1::Sha1;

/// What the known_hosts file says about the key a host presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line (1-based) for this host holds the key, or the `@cert-authority` that signed
    /// its valid certificate.
    Accepted { line: usize },
    /// A matching `@revoked` line (1-based) holds the key or the certificate's CA key.
    Revoked { line: usize },
    /// Lines for this host exist but none holds the presented key; `line` is the last of
    /// them (what `ssh` reports as the "offending key").
    Changed { line: usize },
    /// No line for this host.
    Unknown,
}

/// The key a server presented: a plain key, or a host certificate.
#[derive(Debug, Clone, Copy)]
pub enum Presented<'a> {
    Key(&'a PublicKey),
    Certificate(&'a Certificate),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// One usable line of a known_hosts file.
#[derive(Clone)]
struct Entry {
    /// 1-based line number.
    line: usize,
    marker: Marker,
    /// The host field as written (patterns or one hashed name).
    hosts: Vec<u8>,
    /// The public key material (a certificate's own key when the line holds a certificate).
    key: KeyData,
    /// The line holds a certificate rather than a plain key (never equal to a plain key, as
    /// in OpenSSH's `sshkey_equal`, but its key material still counts for `@revoked`).
    is_cert: bool,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("line", &self.line)
            .field("marker", &self.marker)
            .field("hosts", &String::from_utf8_lossy(&self.hosts))
            .field("algorithm", &self.key.algorithm().as_str())
            .finish()
    }
}

/// A parsed known_hosts file: its usable lines.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

/// Why a known_hosts file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the known_hosts file {}: {source}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl KnownHosts {
    /// Read and parse a file. A missing file lists nothing (as for OpenSSH); any other read
    /// error is an error.
    pub fn read(path: &Path) -> Result<KnownHosts, ReadError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(KnownHosts::parse(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(KnownHosts::default()),
            Err(source) => Err(ReadError {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parse a file's contents; lines OpenSSH would skip are skipped.
    pub fn parse(text: &[u8]) -> KnownHosts {
        let entries = text
            .split(|&b| b == b'\n')
            .enumerate()
            .filter_map(|(i, line)| parse_line(i + 1, line))
            .collect();
        KnownHosts { entries }
    }

    /// The number of usable lines.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The lines (1-based, any marker) whose host field matches `name` exactly as given —
    /// `[host]:port` for a non-22 port, no port-less fallback: what `ssh-keygen -l -F name`
    /// lists.
    pub fn matching_lines(&self, name: &str) -> Vec<usize> {
        let lowered = name.to_ascii_lowercase();
        self.entries
            .iter()
            .filter(|e| host_field_matches(&e.hosts, name.as_bytes(), lowered.as_bytes()))
            .map(|e| e.line)
            .collect()
    }

    /// Check the key `host:port` presented, at `now` (seconds since the Unix epoch; used
    /// for certificate validity only). See the module documentation for the rules.
    pub fn verify(&self, host: &str, port: u16, presented: Presented<'_>, now: u64) -> Verdict {
        let host = lookup_host(host);
        match presented {
            Presented::Key(key) => self.check_host_key(&host, port, &Key::Plain(key.key_data()), now).0,
            Presented::Certificate(cert) => {
                let (verdict, may_downgrade) = self.check_host_key(&host, port, &Key::Cert(cert), now);
                if matches!(verdict, Verdict::Accepted { .. }) || !may_downgrade {
                    return verdict;
                }
                // No CA accepted the certificate: check its plain key (sshconnect.c "Retry
                // with plain key").
                self.check_host_key(&host, port, &Key::Plain(cert.public_key()), now).0
            }
        }
    }

    /// One pass of OpenSSH's `check_host_key` for one key: the name with its port, then
    /// (when nothing was listed for it) the port-less name. The flag says whether a
    /// certificate may still be retried as a plain key (not when it was revoked by the
    /// lookup of the name with the port).
    fn check_host_key(&self, host: &str, port: u16, key: &Key<'_>, now: u64) -> (Verdict, bool) {
        let name = host_port(host, port);
        match self.lookup(host, &name, key, now) {
            Status::Ok(line) => (Verdict::Accepted { line }, false),
            Status::Revoked(line) => (Verdict::Revoked { line }, false),
            Status::Changed(line) => (Verdict::Changed { line }, true),
            Status::CertRefused => (Verdict::Unknown, true),
            Status::New if port != 22 && port != 0 => match self.lookup(host, host, key, now) {
                Status::Ok(line) => (Verdict::Accepted { line }, false),
                // OpenSSH refuses, and still retries a certificate as a plain key.
                Status::Revoked(line) => (Verdict::Revoked { line }, true),
                // OpenSSH's quiet retry: a different key under the port-less name leaves the
                // host unknown.
                Status::Changed(_) | Status::New | Status::CertRefused => (Verdict::Unknown, true),
            },
            Status::New => (Verdict::Unknown, true),
        }
    }

    /// OpenSSH's `load_hostkeys` + `check_key_in_hostkeys` for one lookup name, plus the
    /// certificate check `ssh` makes when a CA matched.
    fn lookup(&self, host: &str, name: &str, key: &Key<'_>, now: u64) -> Status {
        let lowered = name.to_ascii_lowercase();
        let matching: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| host_field_matches(&e.hosts, name.as_bytes(), lowered.as_bytes()))
            .collect();
        // A revoked key (or a revoked CA of a certificate) refuses whatever else is listed.
        if let Some(revoked) = matching
            .iter()
            .filter(|e| e.marker == Marker::Revoked)
            .find(|e| key.revoked_by(&e.key))
        {
            return Status::Revoked(revoked.line);
        }
        match key {
            Key::Plain(k) => {
                let mut status = Status::New;
                for e in matching.iter().filter(|e| e.marker == Marker::None) {
                    if !e.is_cert && e.key == **k {
                        return Status::Ok(e.line);
                    }
                    status = Status::Changed(e.line);
                }
                status
            }
            Key::Cert(cert) => {
                let ca = matching
                    .iter()
                    .filter(|e| e.marker == Marker::CertAuthority)
                    .find(|e| e.key == *cert.signature_key());
                match ca {
                    None => Status::New,
                    Some(ca) => match check_host_certificate(cert, &ca.key, host, now) {
                        Ok(()) => Status::Ok(ca.line),
                        Err(reason) => {
                            tracing::debug!(host, line = ca.line, reason, "host certificate not accepted");
                            Status::CertRefused
                        }
                    },
                }
            }
        }
    }
}

enum Key<'a> {
    Plain(&'a KeyData),
    Cert(&'a Certificate),
}

impl Key<'_> {
    /// OpenSSH's `check_key_not_revoked`: the key itself, or a certificate's CA key.
    fn revoked_by(&self, revoked: &KeyData) -> bool {
        match self {
            Key::Plain(k) => *k == revoked,
            Key::Cert(c) => c.public_key() == revoked || c.signature_key() == revoked,
        }
    }
}

enum Status {
    Ok(usize),
    New,
    Changed(usize),
    Revoked(usize),
    /// A CA matched but the certificate is not valid for this host now.
    CertRefused,
}

/// OpenSSH's `sshkey_cert_check_host` (and the CA signature check of parsing a certificate).
fn check_host_certificate(cert: &Certificate, ca: &KeyData, host: &str, now: u64) -> Result<(), &'static str> {
    let fingerprint = ca.fingerprint(russh::keys::HashAlg::Sha256);
    if cert.validate_at(now, [&fingerprint]).is_err() {
        return if cert.verify_signature().is_err() {
            Err("the certificate's signature does not verify")
        } else {
            Err("the certificate is not valid now")
        };
    }
    if cert.cert_type() != CertType::Host {
        return Err("not a host certificate");
    }
    if cert.valid_principals().is_empty() {
        return Err("the certificate lacks a principal list");
    }
    if !cert
        .valid_principals()
        .iter()
        .any(|p| match_pattern(host.as_bytes(), p.as_bytes()))
    {
        return Err("the host name is not a listed principal");
    }
    if !cert.critical_options().is_empty() {
        return Err("the certificate has critical options");
    }
    Ok(())
}

/// The name `ssh` looks up for a host given on its command line: DNS names lowercased,
/// addresses as given.
fn lookup_host(host: &str) -> String {
    if host.parse::<IpAddr>().is_ok() {
        host.to_string()
    } else {
        host.to_ascii_lowercase()
    }
}

/// OpenSSH's `put_host_port`: `host` for port 22 (or 0), `[host]:port` otherwise.
pub fn host_port(host: &str, port: u16) -> String {
    if port == 22 || port == 0 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

const HASH_MAGIC: &[u8] = b"|1|";

/// Does a line's host field match `name`? (`lowered` is `name` in lowercase.) A hashed field
/// is compared with the name as given; patterns with the lowercased name.
fn host_field_matches(field: &[u8], name: &[u8], lowered: &[u8]) -> bool {
    if field.first() == Some(&b'|') {
        // Checked for validity when the line was parsed.
        hashed_name(name, field).as_deref() == Some(field)
    } else {
        match_hostname(lowered, field) == Match::Positive
    }
}

/// OpenSSH's `host_hash` with the salt of `field` (`|1|salt|hash`): the field the name would
/// have, or `None` when `field` has no valid salt (OpenSSH: a bad line).
fn hashed_name(name: &[u8], field: &[u8]) -> Option<Vec<u8>> {
    let salt = hash_salt(field)?;
    let mut mac = Hmac::<Sha1>::new_from_slice(&salt).expect("HMAC takes any key length");
    mac.update(name);
    let digest = mac.finalize().into_bytes();
    let mut out = HASH_MAGIC.to_vec();
    out.extend_from_slice(STANDARD.encode(&salt).as_bytes());
    out.push(b'|');
    out.extend_from_slice(STANDARD.encode(digest).as_bytes());
    Some(out)
}

/// OpenSSH's `extract_salt`: `|1|`, then 1 to 1024 base64 characters up to the next `|`,
/// decoding to exactly 20 bytes (the SHA-1 size).
fn hash_salt(field: &[u8]) -> Option<Vec<u8>> {
    let rest = field.strip_prefix(HASH_MAGIC)?;
    let end = rest.iter().position(|&b| b == b'|')?;
    let encoded = &rest[..end];
    if encoded.is_empty() || encoded.len() > 1024 {
        return None;
    }
    let salt = decode_base64(encoded)?;
    (salt.len() == 20).then_some(salt)
}

/// Base64 as OpenSSH's `b64_pton` reads it: whitespace inside is ignored.
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let compact: Vec<u8> = text.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    STANDARD.decode(compact).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    Negative,
    None,
    Positive,
}

/// OpenSSH's `match_hostname` / `match_pattern_list` (with lowercasing): the name against a
/// comma-separated list of patterns, each possibly negated with `!`. A matching negated
/// pattern wins over everything.
fn match_hostname(lowered_name: &[u8], list: &[u8]) -> Match {
    let mut positive = false;
    for item in list.split(|&b| b == b',') {
        let (negated, pattern) = match item.strip_prefix(b"!") {
            Some(p) => (true, p),
            None => (false, item),
        };
        // OpenSSH copies each pattern into a 1024-byte buffer: a longer one fails the list.
        if pattern.len() >= 1023 {
            return Match::None;
        }
        let pattern = pattern.to_ascii_lowercase();
        if match_pattern(lowered_name, &pattern) {
            if negated {
                return Match::Negative;
            }
            positive = true;
        }
    }
    if positive { Match::Positive } else { Match::None }
}

/// OpenSSH's `match_pattern`: `*` matches any run of bytes (also none), `?` exactly one.
fn match_pattern(s: &[u8], pattern: &[u8]) -> bool {
    let (mut si, mut pi) = (0, 0);
    // Where the last `*` was, and the input position it currently covers up to.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < pattern.len() && pattern[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < pattern.len() && (pattern[pi] == b'?' || pattern[pi] == s[si]) {
            si += 1;
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    pattern[pi..].iter().all(|&b| b == b'*')
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_blanks(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| is_blank(b)).count();
    &s[n..]
}

/// OpenSSH's `check_markers`: `None` for an invalid marker (the line is skipped).
fn parse_markers(mut s: &[u8]) -> Option<(Marker, &[u8])> {
    let mut marker = Marker::None;
    while s.first() == Some(&b'@') {
        if marker != Marker::None {
            return None; // only one marker
        }
        // Terminated by the first space of the line, else by its first tab.
        let end = s
            .iter()
            .position(|&b| b == b' ')
            .or_else(|| s.iter().position(|&b| b == b'\t'))?;
        if end <= 1 || end >= 32 {
            return None;
        }
        marker = match &s[..end] {
            b"@cert-authority" => Marker::CertAuthority,
            b"@revoked" => Marker::Revoked,
            _ => return None,
        };
        s = skip_blanks(&s[end..]);
    }
    Some((marker, s))
}

/// One line as OpenSSH's `hostkeys_foreach_file` reads it with key parsing; `None` for lines
/// it skips.
fn parse_line(line: usize, raw: &[u8]) -> Option<Entry> {
    // A C string ends at its first NUL.
    let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
    let s = skip_blanks(raw);
    if s.is_empty() || s[0] == b'#' {
        return None;
    }
    let (marker, s) = parse_markers(s)?;
    let hosts_end = s.iter().position(|&b| is_blank(b))?; // a line with only a host field
    let hosts = &s[..hosts_end];
    if hosts.first() == Some(&b'|') {
        hash_salt(hosts)?; // OpenSSH: "bad host hash", the line is skipped
    }
    let s = skip_blanks(&s[hosts_end..]);
    if s.is_empty() || s[0] == b'#' {
        return None; // truncated before the key type
    }
    let (key, is_cert) = parse_key(s)?;
    Some(Entry {
        line,
        marker,
        hosts: hosts.to_vec(),
        key,
        is_cert,
    })
}

const CERT_SUFFIX: &str = "-cert-v01@openssh.com";

/// OpenSSH's `sshkey_read`: a known key type name, blanks, a base64 key blob whose type is
/// the one named. The rest of the line is a comment.
fn parse_key(s: &[u8]) -> Option<(KeyData, bool)> {
    let type_end = s.iter().position(|&b| is_blank(b))?;
    let type_name = std::str::from_utf8(&s[..type_end]).ok()?;
    let s = skip_blanks(&s[type_end..]);
    if s.is_empty() {
        return None;
    }
    let blob_end = s.iter().position(|&b| is_blank(b)).unwrap_or(s.len());
    let blob = decode_base64(&s[..blob_end])?;
    if type_name.ends_with(CERT_SUFFIX) {
        let named = Algorithm::new_certificate(type_name).ok().filter(is_known)?;
        let cert = Certificate::from_bytes(&blob).ok()?;
        same_type(&named, &cert.algorithm()).then(|| (cert.public_key().clone(), true))
    } else {
        let named = Algorithm::new(type_name).ok().filter(is_known)?;
        let key = PublicKey::from_bytes(&blob).ok()?;
        same_type(&named, &key.algorithm()).then(|| (key.key_data().clone(), false))
    }
}

fn is_known(algorithm: &Algorithm) -> bool {
    !matches!(algorithm, Algorithm::Other(_))
}

/// The key type named on a line is the blob's (any RSA name for an RSA key, as OpenSSH's
/// `ssh-rsa`, `rsa-sha2-256` and `rsa-sha2-512` are all RSA key types).
fn same_type(named: &Algorithm, actual: &Algorithm) -> bool {
    named == actual || (matches!(named, Algorithm::Rsa { .. }) && matches!(actual, Algorithm::Rsa { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::PrivateKey;
    use russh::keys::ssh_key::private::Ed25519Keypair;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// A distinct ed25519 key each call (fixed seeds: no RNG needed).
    fn new_private_key() -> PrivateKey {
        static NEXT: AtomicU8 = AtomicU8::new(1);
        let seed = [NEXT.fetch_add(1, Ordering::Relaxed); 32];
        PrivateKey::from(Ed25519Keypair::from_seed(&seed))
    }

    fn new_key() -> PublicKey {
        new_private_key().public_key().clone()
    }

    /// An ECDSA P-256 key (`ssh-keygen -t ecdsa`).
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBG4tmikaa8PFQV1a3qbtsRgklIn8Rv/JMvo8bz4+dxeKN3RF7nuF6M27WwdLVKD9YnYUpsCnUGeEBE7GUmMF7FA=";

    fn openssh(key: &PublicKey) -> String {
        key.to_openssh().unwrap()
    }

    fn verify(file: &str, host: &str, port: u16, key: &PublicKey) -> Verdict {
        KnownHosts::parse(file.as_bytes()).verify(host, port, Presented::Key(key), 0)
    }

    /// `|1|salt|hash` for `name` with a fixed salt, computed independently of `hashed_name`.
    fn hashed(name: &str) -> String {
        let salt = [7u8; 20];
        let mut mac = Hmac::<Sha1>::new_from_slice(&salt).unwrap();
        mac.update(name.as_bytes());
        format!(
            "|1|{}|{}",
            STANDARD.encode(salt),
            STANDARD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn patterns_match_like_openssh() {
        let m = |name: &str, pat: &str| match_pattern(name.as_bytes(), pat.as_bytes());
        assert!(m("pve1.lan", "pve1.lan"));
        assert!(m("pve1.lan", "*.lan"));
        assert!(m("pve1.lan", "pve?.lan"));
        assert!(m("pve1.lan", "*"));
        assert!(m("", "*"));
        assert!(m("", ""));
        assert!(!m("a", ""));
        assert!(!m("pve10.lan", "pve?.lan"));
        assert!(m("pve10.lan", "pve*.lan"));
        assert!(m("[10.0.0.1]:2222", "[10.0.0.?]:*"));
        assert!(!m("[10.0.0.1]:2222", "10.0.0.1"));
        assert!(m("abcabcabd", "*abd"));
        assert!(m("abcabcabd", "a*c*d"));
        assert!(!m("abcabcabe", "a*c*d"));
        assert!(m("aaa", "a**a"));
        assert!(!m("pve1.lanx", "*.lan"));

        let l = |name: &str, list: &str| match_hostname(name.as_bytes(), list.as_bytes());
        assert_eq!(l("pve1", "pve2,pve1"), Match::Positive);
        assert_eq!(l("pve1", "pve2,pve3"), Match::None);
        assert_eq!(l("pve1", "pve*,!pve1"), Match::Negative);
        assert_eq!(l("pve1", "!pve1,pve*"), Match::Negative);
        assert_eq!(l("pve2", "pve*,!pve1"), Match::Positive);
        assert_eq!(l("pve2", "!pve1"), Match::None, "a negation alone matches nothing");
        assert_eq!(l("pve1", "PVE1"), Match::Positive, "patterns are lowercased");
        assert_eq!(l("pve1", ",pve1,"), Match::Positive);
        let long = "x".repeat(1023);
        assert_eq!(
            l("pve1", &format!("pve1,{long}")),
            Match::None,
            "over-long pattern fails the list"
        );
    }

    #[test]
    fn a_plain_entry_is_for_port_22_and_a_bracketed_one_for_its_port() {
        let key = new_key();
        let k = openssh(&key);
        let plain = format!("pve1.lan {k}\n");
        assert_eq!(verify(&plain, "pve1.lan", 22, &key), Verdict::Accepted { line: 1 });
        assert_eq!(verify(&plain, "PVE1.lan", 22, &key), Verdict::Accepted { line: 1 });
        assert_eq!(verify(&plain, "pve2.lan", 22, &key), Verdict::Unknown);

        let bracketed = format!("[pve1.lan]:2222 {k}\n");
        assert_eq!(
            verify(&bracketed, "pve1.lan", 2222, &key),
            Verdict::Accepted { line: 1 }
        );
        assert_eq!(verify(&bracketed, "pve1.lan", 22, &key), Verdict::Unknown);
        assert_eq!(verify(&bracketed, "pve1.lan", 2223, &key), Verdict::Unknown);
        let bracketed22 = format!("[pve1.lan]:22 {k}\n");
        assert_eq!(
            verify(&bracketed22, "pve1.lan", 22, &key),
            Verdict::Unknown,
            "port 22 is looked up plain"
        );
    }

    #[test]
    fn a_port_less_entry_is_the_fallback_for_other_ports() {
        let (key, other) = (new_key(), new_key());
        let file = format!("pve1 {}\n", openssh(&key));
        assert_eq!(verify(&file, "pve1", 2222, &key), Verdict::Accepted { line: 1 });
        // A different key under the port-less name only leaves the host unknown.
        assert_eq!(verify(&file, "pve1", 2222, &other), Verdict::Unknown);
        // ...but is a change on port 22.
        assert_eq!(verify(&file, "pve1", 22, &other), Verdict::Changed { line: 1 });
        // Any line for [host]:port stops the fallback.
        let file = format!("[pve1]:2222 {}\npve1 {}\n", openssh(&other), openssh(&key));
        assert_eq!(verify(&file, "pve1", 2222, &key), Verdict::Changed { line: 1 });
        // A port-less revocation refuses.
        let file = format!("@revoked pve1 {}\n", openssh(&key));
        assert_eq!(verify(&file, "pve1", 2222, &key), Verdict::Revoked { line: 1 });
    }

    #[test]
    fn wildcards_and_negation() {
        let key = new_key();
        let k = openssh(&key);
        let file = format!("*.lan,!pve9.lan {k}\n");
        assert_eq!(verify(&file, "pve1.lan", 22, &key), Verdict::Accepted { line: 1 });
        assert_eq!(verify(&file, "pve9.lan", 22, &key), Verdict::Unknown);
        let file = format!("[127.0.0.1]:* {k}\n");
        assert_eq!(verify(&file, "127.0.0.1", 2222, &key), Verdict::Accepted { line: 1 });
        // `*` matches the bracketed name too.
        let file = format!("* {k}\n");
        assert_eq!(verify(&file, "127.0.0.1", 2222, &key), Verdict::Accepted { line: 1 });
        // A negated line does not count as "listed" either.
        let other = new_key();
        let file = format!("*,!pve9 {}\n", openssh(&other));
        assert_eq!(verify(&file, "pve9", 22, &key), Verdict::Unknown);
        assert_eq!(verify(&file, "pve8", 22, &key), Verdict::Changed { line: 1 });
    }

    #[test]
    fn hashed_names() {
        let key = new_key();
        let k = openssh(&key);
        let file = format!("{} {k}\n", hashed("pve1.lan"));
        assert_eq!(verify(&file, "pve1.lan", 22, &key), Verdict::Accepted { line: 1 });
        assert_eq!(verify(&file, "pve2.lan", 22, &key), Verdict::Unknown);
        assert_eq!(
            verify(&file, "pve1.lan", 2222, &key),
            Verdict::Accepted { line: 1 },
            "port-less fallback"
        );
        let file = format!("{} {k}\n", hashed("[pve1.lan]:2222"));
        assert_eq!(verify(&file, "pve1.lan", 2222, &key), Verdict::Accepted { line: 1 });
        assert_eq!(verify(&file, "pve1.lan", 22, &key), Verdict::Unknown);
        // A hashed field is one name, not a pattern list.
        let file = format!("{},pve1.lan {k}\n", hashed("pve1.lan"));
        assert_eq!(verify(&file, "pve1.lan", 22, &key), Verdict::Unknown);
        // A broken hash is a bad line, skipped.
        for bad in ["|1|", "|1|AAAA|x", "|2|AAAA|BBBB", "|1||x", "|"] {
            assert!(KnownHosts::parse(format!("{bad} {k}\n").as_bytes()).is_empty(), "{bad}");
        }
    }

    #[test]
    fn revoked_wins_wherever_it_is() {
        let key = new_key();
        let k = openssh(&key);
        for file in [
            format!("@revoked [h]:2222 {k}\n[h]:2222 {k}\n"),
            format!("[h]:2222 {k}\n@revoked [h]:2222 {k}\n"),
            format!("[h]:2222 {k}\n@revoked * {k}\n"),
        ] {
            let line = if file.starts_with('@') { 1 } else { 2 };
            assert_eq!(verify(&file, "h", 2222, &key), Verdict::Revoked { line }, "{file}");
        }
        // A revocation for another name does not apply.
        let file = format!("@revoked other {k}\n[h]:2222 {k}\n");
        assert_eq!(verify(&file, "h", 2222, &key), Verdict::Accepted { line: 2 });
        // A revoked other key does not refuse this one.
        let file = format!("@revoked [h]:2222 {}\n[h]:2222 {k}\n", openssh(&new_key()));
        assert_eq!(verify(&file, "h", 2222, &key), Verdict::Accepted { line: 2 });
        // Revoked alone: not "unknown".
        let file = format!("@revoked [h]:2222 {k}\n");
        assert_eq!(verify(&file, "h", 2222, &key), Verdict::Revoked { line: 1 });
    }

    #[test]
    fn several_keys_and_rotation() {
        let (old, new, third) = (new_key(), new_key(), new_key());
        let file = format!("[h]:2222 {}\n[h]:2222 {}\n", openssh(&old), openssh(&new));
        assert_eq!(verify(&file, "h", 2222, &new), Verdict::Accepted { line: 2 });
        assert_eq!(verify(&file, "h", 2222, &old), Verdict::Accepted { line: 1 });
        // Neither: changed, naming the last line listed (as ssh's "Offending key").
        assert_eq!(verify(&file, "h", 2222, &third), Verdict::Changed { line: 2 });
        // A key of another type listed for the host makes it a change too.
        let file = format!("h {ECDSA}\n");
        assert_eq!(verify(&file, "h", 22, &new), Verdict::Changed { line: 1 });
        let file = format!("h {ECDSA}\nh {}\n", openssh(&new));
        assert_eq!(verify(&file, "h", 22, &new), Verdict::Accepted { line: 2 });
    }

    #[test]
    fn comments_blank_and_malformed_lines_are_skipped() {
        let key = new_key();
        let k = openssh(&key);
        let body = k.split(' ').nth(1).unwrap();
        let file = format!(
            "# comment\n\n   \n\t# indented comment\nonlyhost\nh\nh ssh-ed25519\nh ssh-ed25519 !!!notbase64\n\
             h ssh-foo {body}\nh ecdsa-sha2-nistp256 {body}\nh # ssh-ed25519 {body}\n@bogus h {k}\n\
             @revoked @revoked h {k}\n@revoked\n@cert-authority\th {k}\nh ssh-ed25519 AAAA\n\
             \u{0}h {k}\n  h  \t {k} trailing comment\n"
        );
        let kh = KnownHosts::parse(file.as_bytes());
        assert_eq!(kh.len(), 1, "{:?}", kh.entries);
        assert_eq!(
            kh.verify("h", 22, Presented::Key(&key), 0),
            Verdict::Accepted { line: 18 }
        );
        // Not UTF-8, CRLF endings (a comment absorbs the \r; a bare key's \r is base64 whitespace).
        let mut bytes = b"\xff\xfe h\n".to_vec();
        bytes.extend_from_slice(format!("h {k} c\r\nh2 {k}\r\n").as_bytes());
        let kh = KnownHosts::parse(&bytes);
        assert_eq!(
            kh.verify("h", 22, Presented::Key(&key), 0),
            Verdict::Accepted { line: 2 }
        );
        assert_eq!(
            kh.verify("h2", 22, Presented::Key(&key), 0),
            Verdict::Accepted { line: 3 }
        );
    }

    #[test]
    fn cert_authority_lines_do_not_vouch_for_plain_keys() {
        let key = new_key();
        let file = format!("@cert-authority h {}\n", openssh(&key));
        assert_eq!(verify(&file, "h", 22, &key), Verdict::Unknown);
    }

    mod certificates {
        use super::*;
        use russh::keys::ssh_key::certificate::Builder;

        const NOW: u64 = 1_800_000_000;

        fn sign(
            host_key: &PublicKey,
            ca: &PrivateKey,
            kind: CertType,
            principals: &[&str],
            valid: (u64, u64),
        ) -> Certificate {
            let mut b = Builder::new([9u8; 32].to_vec(), host_key.key_data().clone(), valid.0, valid.1).unwrap();
            b.cert_type(kind).unwrap();
            for p in principals {
                b.valid_principal(*p).unwrap();
            }
            if principals.is_empty() {
                // The builder insists on an explicit choice; OpenSSH refuses an empty list.
                b.all_principals_valid().unwrap();
            }
            b.sign(ca).unwrap()
        }

        fn ca() -> PrivateKey {
            new_private_key()
        }

        fn check(file: &str, host: &str, port: u16, cert: &Certificate) -> Verdict {
            KnownHosts::parse(file.as_bytes()).verify(host, port, Presented::Certificate(cert), NOW)
        }

        #[test]
        fn a_certificate_from_a_listed_ca_is_checked_like_ssh_does() {
            let (host_key, ca, other_ca) = (new_key(), ca(), ca());
            let ca_line = format!("@cert-authority *.lan {}\n", openssh(ca.public_key()));
            let good = sign(&host_key, &ca, CertType::Host, &["pve1.lan"], (NOW - 10, NOW + 10));
            assert_eq!(check(&ca_line, "pve1.lan", 22, &good), Verdict::Accepted { line: 1 });
            // On another port, the port-less CA line is the fallback.
            assert_eq!(check(&ca_line, "pve1.lan", 2222, &good), Verdict::Accepted { line: 1 });
            // The principal is the host name, never [host]:port.
            let with_port = format!("@cert-authority [pve1.lan]:2222 {}\n", openssh(ca.public_key()));
            assert_eq!(
                check(&with_port, "pve1.lan", 2222, &good),
                Verdict::Accepted { line: 1 }
            );
            let bracketed = sign(
                &host_key,
                &ca,
                CertType::Host,
                &["[pve1.lan]:2222"],
                (NOW - 10, NOW + 10),
            );
            assert_eq!(check(&with_port, "pve1.lan", 2222, &bracketed), Verdict::Unknown);
            let wildcard = sign(&host_key, &ca, CertType::Host, &["*.lan"], (NOW - 10, NOW + 10));
            assert_eq!(
                check(&ca_line, "pve1.lan", 22, &wildcard),
                Verdict::Accepted { line: 1 }
            );

            for (what, cert) in [
                (
                    "other principal",
                    sign(&host_key, &ca, CertType::Host, &["pve2.lan"], (NOW - 10, NOW + 10)),
                ),
                (
                    "no principals",
                    sign(&host_key, &ca, CertType::Host, &[], (NOW - 10, NOW + 10)),
                ),
                (
                    "user certificate",
                    sign(&host_key, &ca, CertType::User, &["pve1.lan"], (NOW - 10, NOW + 10)),
                ),
                (
                    "expired",
                    sign(&host_key, &ca, CertType::Host, &["pve1.lan"], (NOW - 10, NOW)),
                ),
                (
                    "not yet valid",
                    sign(&host_key, &ca, CertType::Host, &["pve1.lan"], (NOW + 1, NOW + 10)),
                ),
                (
                    "other CA",
                    sign(
                        &host_key,
                        &other_ca,
                        CertType::Host,
                        &["pve1.lan"],
                        (NOW - 10, NOW + 10),
                    ),
                ),
            ] {
                assert_eq!(check(&ca_line, "pve1.lan", 22, &cert), Verdict::Unknown, "{what}");
                // ...then its plain key is checked: listed, it is accepted.
                let both = format!("{ca_line}pve1.lan {}\n", openssh(&host_key));
                assert_eq!(
                    check(&both, "pve1.lan", 22, &cert),
                    Verdict::Accepted { line: 2 },
                    "{what}"
                );
            }
        }

        #[test]
        fn a_revoked_ca_or_certified_key_refuses() {
            let (host_key, ca) = (new_key(), ca());
            let cert = sign(&host_key, &ca, CertType::Host, &["pve1.lan"], (NOW - 10, NOW + 10));
            let ca_pub = openssh(ca.public_key());
            let file = format!("@cert-authority pve1.lan {ca_pub}\n@revoked pve1.lan {ca_pub}\n");
            assert_eq!(check(&file, "pve1.lan", 22, &cert), Verdict::Revoked { line: 2 });
            // No fallback to the plain key once revoked.
            let file = format!("@revoked * {}\npve1.lan {}\n", openssh(&host_key), openssh(&host_key));
            assert_eq!(check(&file, "pve1.lan", 22, &cert), Verdict::Revoked { line: 1 });
        }
    }
}
