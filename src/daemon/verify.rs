//! Signed commits (`verify:`): only revisions whose commits carry a valid signature by an
//! allowed key are applied.
//!
//! A git commit's signature is its `gpgsig` header; what it signs is the commit object
//! without that header ([`split_commit`]). Two kinds are checked, in Rust, with no `ssh-keygen`
//! or `gpg` at run time:
//!
//! - SSH signatures (SSHSIG, namespace `git`, `git -c gpg.format=ssh commit -S`) against an
//!   allowed-signers file, the format git's `gpg.ssh.allowedSignersFile` uses (principals,
//!   `namespaces=`, `valid-after=`, `valid-before=`, key). As git does, a key's validity is
//!   judged at the commit's committer time.
//! - OpenPGP signatures (`gpg`) against armored public keys (`gpg --export --armor`).
//!
//! Pure: reading the files ([`Policy::load`]) is the only I/O; the raw commits come in as bytes
//! and the clock as an argument. Each commit gets a typed verdict: the [`Signer`], or a
//! [`Rejection`] that says which commit and why.

use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use pgp::types::KeyDetails;
use serde::{Deserialize, Serialize};
use ssh_key::{HashAlg, PublicKey, SshSig};
use std::path::{Path, PathBuf};

/// The SSHSIG namespace git signs commits in.
pub const GIT_NAMESPACE: &str = "git";

/// Which commits must be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// The revision the daemon runs (the branch's head), as Flux's `verify` does.
    #[default]
    Head,
    /// Every commit new since the last verified revision, so that nobody's unsigned commit
    /// rides in under someone else's signed merge.
    All,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Head => "head",
            VerifyMode::All => "all",
        }
    }

    pub fn parse(s: &str) -> Option<VerifyMode> {
        match s {
            "head" => Some(VerifyMode::Head),
            "all" => Some(VerifyMode::All),
            _ => None,
        }
    }
}

/// `verify:` as resolved: which commits, and where the allowed keys are. Files are read by
/// each run, so a changed allowed-signers file counts from the next run on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySettings {
    pub mode: VerifyMode,
    /// git's allowed-signers format.
    pub allowed_signers: Option<PathBuf>,
    /// Armored OpenPGP public keys (`gpg --export --armor`), one or more keys a file.
    pub openpgp_keys: Vec<PathBuf>,
}

// ---- the raw commit ----

/// A raw commit object, taken apart as git takes it apart to verify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitParts {
    /// What a signature covers: the commit object without its signature headers.
    pub payload: Vec<u8>,
    /// The `gpgsig` header's value, continuation lines unfolded; `None` when unsigned.
    pub signature: Option<String>,
    /// The committer's timestamp (seconds since the epoch), at which git judges a key's
    /// `valid-after`/`valid-before`.
    pub committer_time: Option<i64>,
}

/// Split a raw commit object into what was signed and the signature, as git's
/// `parse_buffer_signed_by_header` does for a SHA-1 repository: the `gpgsig` header (with its
/// continuation lines, which start with a space) is the signature; it and any other signature
/// header (`gpgsig-sha256`) are left out of the payload; everything else is kept byte for byte,
/// the message included.
pub fn split_commit(raw: &[u8]) -> CommitParts {
    #[derive(PartialEq)]
    enum In {
        Header,
        Ours,
        Other,
    }
    let mut payload = Vec::with_capacity(raw.len());
    let mut signature: Option<Vec<u8>> = None;
    let mut committer_time = None;
    let mut state = In::Header;
    let mut rest = raw;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1);
        let line = &rest[..end];
        rest = &rest[end..];
        if line == b"\n" {
            // The blank line ends the headers: the message is kept whole.
            payload.extend_from_slice(line);
            payload.extend_from_slice(rest);
            break;
        }
        let continuation = line.first() == Some(&b' ');
        if continuation && state == In::Ours {
            signature.get_or_insert_with(Vec::new).extend_from_slice(&line[1..]);
        } else if continuation && state == In::Other {
            // The other hash algorithm's signature: neither ours nor signed.
        } else if let Some(value) = line.strip_prefix(b"gpgsig ") {
            // A repeated header is appended, as git does (and then fails to parse).
            signature.get_or_insert_with(Vec::new).extend_from_slice(value);
            state = In::Ours;
        } else if line.starts_with(b"gpgsig") {
            state = In::Other;
        } else {
            state = In::Header;
            if let Some(value) = line.strip_prefix(b"committer ") {
                committer_time = committer_timestamp(value);
            }
            payload.extend_from_slice(line);
        }
    }
    CommitParts {
        payload,
        signature: signature.map(|s| String::from_utf8_lossy(&s).into_owned()),
        committer_time,
    }
}

/// `Name <email> 1700000000 +0100` -> 1700000000.
fn committer_timestamp(value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?;
    let after_email = &text[text.rfind('>')? + 1..];
    after_email.split_whitespace().next()?.parse().ok()
}

// ---- allowed keys ----

/// One line of an allowed-signers file.
#[derive(Debug, Clone)]
pub struct AllowedSigner {
    /// As written (`alice@example.com,alice@laptop`): shown as who signed.
    pub principals: String,
    /// `namespaces="git,file"`: the namespaces the key may sign in (patterns); `None` = any.
    pub namespaces: Option<String>,
    /// `valid-after=`, seconds since the epoch.
    pub valid_after: Option<i64>,
    /// `valid-before=`, seconds since the epoch.
    pub valid_before: Option<i64>,
    pub key: PublicKey,
    /// `file:line`, for messages.
    pub source: String,
}

/// The allowed keys, read from the files `verify:` names.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub ssh: Vec<AllowedSigner>,
    pub openpgp: Vec<SignedPublicKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path} (verify:): {message}")]
    Read { path: PathBuf, message: String },
    #[error("{source_at} (verify: allowed signers): {message}")]
    AllowedSigners { source_at: String, message: String },
    #[error("{path} (verify: OpenPGP keys): {message}")]
    OpenPgp { path: PathBuf, message: String },
    #[error("verify: the allowed signers and OpenPGP key files hold no key: no commit could ever be applied")]
    NoKeys,
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
        path: path.into(),
        message: e.to_string(),
    })
}

impl Policy {
    /// Read and check the files `settings` names.
    pub fn load(settings: &VerifySettings) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        if let Some(path) = &settings.allowed_signers {
            policy.ssh = parse_allowed_signers(&read(path)?, &path.display().to_string())?;
        }
        for path in &settings.openpgp_keys {
            policy.openpgp.extend(parse_openpgp_keys(&read(path)?, path)?);
        }
        if policy.ssh.is_empty() && policy.openpgp.is_empty() {
            return Err(PolicyError::NoKeys);
        }
        Ok(policy)
    }
}

/// Parse an allowed-signers file (ssh-keygen(1), ALLOWED SIGNERS): per line
/// `principals [options] keytype base64-key [comment]`; `#` comments and blank lines skipped.
/// `cert-authority` lines are refused (certificates are not supported): silently skipping one
/// would leave its users wondering why nothing of theirs applies.
pub fn parse_allowed_signers(text: &str, file: &str) -> Result<Vec<AllowedSigner>, PolicyError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let source = format!("{file}:{}", i + 1);
        let err = |message: String| PolicyError::AllowedSigners {
            source_at: source.clone(),
            message,
        };
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (principals, rest) = split_token(line).ok_or_else(|| err("a line is `principals [options] key`".into()))?;
        let rest = rest.trim_start();
        if rest.is_empty() {
            return Err(err(format!("no key after the principals `{principals}`")));
        }
        // The key comes right after the principals, or after the options.
        let (options, key_text) = match PublicKey::from_openssh(rest) {
            Ok(_) => (None, rest),
            Err(_) => {
                let (options, key) =
                    split_options(rest).ok_or_else(|| err("unterminated quote in the options".into()))?;
                (Some(options), key.trim_start())
            }
        };
        let key = PublicKey::from_openssh(key_text)
            .map_err(|e| err(format!("not a public key (`keytype base64-key [comment]`): {e}")))?;
        let mut signer = AllowedSigner {
            principals: principals.to_string(),
            namespaces: None,
            valid_after: None,
            valid_before: None,
            key,
            source: source.clone(),
        };
        for option in options.map(split_option_list).unwrap_or_default() {
            let (name, value) = match option.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (option.as_str(), None),
            };
            let quoted = || -> Result<&str, PolicyError> {
                value
                    .and_then(|v| v.strip_prefix('"'))
                    .and_then(|v| v.strip_suffix('"'))
                    .ok_or_else(|| err(format!("`{name}` takes a quoted value: {name}=\"...\"")))
            };
            match name.to_ascii_lowercase().as_str() {
                "namespaces" => signer.namespaces = Some(quoted()?.to_string()),
                "valid-after" => {
                    signer.valid_after =
                        Some(parse_ssh_time(quoted()?).ok_or_else(|| err(format!("bad time in `{option}`")))?)
                }
                "valid-before" => {
                    signer.valid_before =
                        Some(parse_ssh_time(quoted()?).ok_or_else(|| err(format!("bad time in `{option}`")))?)
                }
                "cert-authority" => {
                    return Err(err(
                        "cert-authority (SSH certificates) is not supported: list the signers' keys".into(),
                    ));
                }
                _ => return Err(err(format!("unknown option `{option}`"))),
            }
        }
        out.push(signer);
    }
    Ok(out)
}

/// The first whitespace-delimited token (a `"quoted"` one may hold spaces), and the rest.
fn split_token(s: &str) -> Option<(&str, &str)> {
    if let Some(quoted) = s.strip_prefix('"') {
        let end = quoted.find('"')?;
        return Some((&quoted[..end], &quoted[end + 1..]));
    }
    let end = s.find([' ', '\t']).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// The options field (up to the first whitespace outside quotes), and the rest.
fn split_options(s: &str) -> Option<(&str, &str)> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Some((&s[..i], &s[i..])),
            _ => {}
        }
    }
    (!quoted).then_some((s, ""))
}

/// `a,b="x,y",c` -> `a`, `b="x,y"`, `c`.
fn split_option_list(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    out.push(current);
    out.retain(|o| !o.is_empty());
    out
}

/// OpenSSH's absolute times: `YYYYMMDD`, `YYYYMMDDHHMM` or `YYYYMMDDHHMMSS`, UTC with a
/// trailing `Z`, else local time (as ssh-keygen reads them).
pub fn parse_ssh_time(s: &str) -> Option<i64> {
    use chrono::{NaiveDate, NaiveDateTime, TimeZone};
    let (digits, utc) = match s.strip_suffix(['Z', 'z']) {
        Some(d) => (d, true),
        None => (s, false),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let naive: NaiveDateTime = match digits.len() {
        8 => NaiveDate::parse_from_str(digits, "%Y%m%d").ok()?.and_hms_opt(0, 0, 0)?,
        12 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M").ok()?,
        14 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M%S").ok()?,
        _ => return None,
    };
    if utc {
        Some(naive.and_utc().timestamp())
    } else {
        chrono::Local
            .from_local_datetime(&naive)
            .earliest()
            .map(|t| t.timestamp())
    }
}

/// OpenSSH's `match_pattern`: `*` any run of characters, `?` one.
fn pattern_match(pattern: &[u8], s: &[u8]) -> bool {
    match (pattern.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => pattern_match(&pattern[1..], s) || (!s.is_empty() && pattern_match(pattern, &s[1..])),
        (Some(b'?'), Some(_)) => pattern_match(&pattern[1..], &s[1..]),
        (Some(p), Some(c)) if p == c => pattern_match(&pattern[1..], &s[1..]),
        _ => false,
    }
}

/// OpenSSH's `match_pattern_list`: comma-separated patterns, `!pattern` refuses; true when a
/// pattern matches and no negated one does.
pub fn pattern_list_matches(list: &str, s: &str) -> bool {
    let mut matched = false;
    for pattern in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pattern.strip_prefix('!') {
            Some(negated) if pattern_match(negated.as_bytes(), s.as_bytes()) => return false,
            Some(_) => {}
            None => matched |= pattern_match(pattern.as_bytes(), s.as_bytes()),
        }
    }
    matched
}

/// Parse armored OpenPGP public keys and check each one's self-signatures (a key whose user ids
/// or subkeys are not bound by its own signatures is refused here, not at the first commit).
pub fn parse_openpgp_keys(text: &str, path: &Path) -> Result<Vec<SignedPublicKey>, PolicyError> {
    let err = |message: String| PolicyError::OpenPgp {
        path: path.into(),
        message,
    };
    if !text.trim_start().starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----") {
        return Err(err(
            "not an armored OpenPGP public key (write it with `gpg --export --armor KEYID`)".into(),
        ));
    }
    let (keys, _) = SignedPublicKey::from_string_many(text).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for key in keys {
        let key = key.map_err(|e| err(e.to_string()))?;
        key.verify_bindings().map_err(|e| {
            err(format!(
                "key {:X}: its self-signatures do not verify: {e}",
                key.fingerprint()
            ))
        })?;
        out.push(key);
    }
    if out.is_empty() {
        return Err(err("no public key in the file".into()));
    }
    Ok(out)
}

// ---- verdicts ----

/// Who signed a commit, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signer {
    /// `ssh` or `openpgp`.
    pub kind: String,
    /// The allowed-signers principals, or the OpenPGP key's primary user id.
    pub identity: String,
    /// `SHA256:...` for SSH keys, the fingerprint (hex) of the signing OpenPGP key.
    pub key: String,
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind.as_str() {
            "ssh" => write!(f, "{} (SSH key {})", self.identity, self.key),
            _ => write!(f, "{} (OpenPGP key {})", self.identity, self.key),
        }
    }
}

/// Why a commit's signature is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("commit {commit} is not signed")]
    Unsigned { commit: String },
    #[error("commit {commit} is signed by {key}, which is not an allowed key")]
    UnknownKey { commit: String, key: String },
    #[error("commit {commit} has a bad signature: {reason}")]
    BadSignature { commit: String, reason: String },
    #[error("commit {commit} is signed by {signer}, which is not allowed to sign commits: {reason}")]
    KeyNotAllowed {
        commit: String,
        signer: String,
        reason: String,
    },
    #[error("commit {commit} is signed by {signer}, which is expired: {reason}")]
    Expired {
        commit: String,
        signer: String,
        reason: String,
    },
}

impl Rejection {
    /// The reason as a stable word for machines (the JSON report).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Unsigned { .. } => "unsigned",
            Rejection::UnknownKey { .. } => "unknown_key",
            Rejection::BadSignature { .. } => "bad_signature",
            Rejection::KeyNotAllowed { .. } => "key_not_allowed",
            Rejection::Expired { .. } => "expired",
        }
    }
}

/// Check one commit's signature against `policy`. `now` (seconds since the epoch) is only for
/// an OpenPGP signature's own expiry; SSH keys are judged at the committer time, as git does.
pub fn verify_commit(commit: &str, raw: &[u8], policy: &Policy, now: i64) -> Result<Signer, Rejection> {
    let parts = split_commit(raw);
    let Some(signature) = parts.signature.as_deref() else {
        return Err(Rejection::Unsigned { commit: commit.into() });
    };
    let bad = |reason: String| Rejection::BadSignature {
        commit: commit.into(),
        reason,
    };
    let trimmed = signature.trim_start();
    if trimmed.starts_with("-----BEGIN SSH SIGNATURE-----") {
        verify_ssh(commit, signature, &parts, policy)
    } else if trimmed.starts_with("-----BEGIN PGP SIGNATURE-----") {
        verify_openpgp(commit, signature, &parts.payload, policy, now)
    } else {
        let first = trimmed.lines().next().unwrap_or("");
        Err(bad(format!(
            "neither an SSH nor an OpenPGP signature (`{}`; X.509 signatures are not supported)",
            first.chars().take(40).collect::<String>()
        )))
    }
}

fn verify_ssh(commit: &str, signature: &str, parts: &CommitParts, policy: &Policy) -> Result<Signer, Rejection> {
    let bad = |reason: String| Rejection::BadSignature {
        commit: commit.into(),
        reason,
    };
    let sig = SshSig::from_pem(signature).map_err(|e| bad(format!("unreadable SSH signature: {e}")))?;
    let signing_key = PublicKey::from(sig.public_key().clone());
    let fingerprint = signing_key.fingerprint(HashAlg::Sha256).to_string();
    let shown = |s: &AllowedSigner| Signer {
        kind: "ssh".into(),
        identity: s.principals.clone(),
        key: fingerprint.clone(),
    };
    let entries: Vec<&AllowedSigner> = policy
        .ssh
        .iter()
        .filter(|s| s.key.key_data() == sig.public_key())
        .collect();
    let Some(first) = entries.first() else {
        return Err(Rejection::UnknownKey {
            commit: commit.into(),
            key: format!("the SSH key {} {fingerprint}", signing_key.algorithm().as_str()),
        });
    };
    if sig.namespace() != GIT_NAMESPACE {
        return Err(bad(format!(
            "made for the namespace `{}`, not `{GIT_NAMESPACE}`",
            sig.namespace()
        )));
    }
    signing_key
        .verify(GIT_NAMESPACE, &parts.payload, &sig)
        .map_err(|e| bad(format!("the SSH signature does not match the commit's content ({e})")))?;
    // The key may be listed more than once, with other options: one line that allows it is enough.
    let mut refusal = None;
    for entry in &entries {
        match entry_allows(entry, parts.committer_time) {
            Ok(()) => return Ok(shown(entry)),
            Err(r) => {
                refusal.get_or_insert(r);
            }
        }
    }
    Err(match refusal.expect("at least one entry refused") {
        EntryRefusal::Namespace(namespaces) => Rejection::KeyNotAllowed {
            commit: commit.into(),
            signer: shown(first).to_string(),
            reason: format!(
                "{} limits it to namespaces=\"{namespaces}\", which does not include `{GIT_NAMESPACE}`",
                first.source
            ),
        },
        EntryRefusal::Time(reason) => Rejection::Expired {
            commit: commit.into(),
            signer: shown(first).to_string(),
            reason,
        },
    })
}

enum EntryRefusal {
    Namespace(String),
    Time(String),
}

fn entry_allows(entry: &AllowedSigner, committer_time: Option<i64>) -> Result<(), EntryRefusal> {
    if let Some(namespaces) = &entry.namespaces
        && !pattern_list_matches(namespaces, GIT_NAMESPACE)
    {
        return Err(EntryRefusal::Namespace(namespaces.clone()));
    }
    if entry.valid_after.is_some() || entry.valid_before.is_some() {
        let Some(at) = committer_time else {
            return Err(EntryRefusal::Time(format!(
                "{} has a validity period and the commit has no committer time to judge it by",
                entry.source
            )));
        };
        if let Some(after) = entry.valid_after.filter(|after| at < *after) {
            return Err(EntryRefusal::Time(format!(
                "not yet valid when committed ({} says valid-after {}, committed {})",
                entry.source,
                rfc3339(after),
                rfc3339(at)
            )));
        }
        if let Some(before) = entry.valid_before.filter(|before| at > *before) {
            return Err(EntryRefusal::Time(format!(
                "no longer valid when committed ({} says valid-before {}, committed {})",
                entry.source,
                rfc3339(before),
                rfc3339(at)
            )));
        }
    }
    Ok(())
}

fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map_or_else(|| t.to_string(), |d| d.to_rfc3339())
}

/// The newest of `sigs` by creation time.
fn newest<'a>(sigs: impl Iterator<Item = &'a pgp::packet::Signature>) -> Option<&'a pgp::packet::Signature> {
    sigs.max_by_key(|s| s.created().map_or(0, |t| t.as_secs()))
}

/// When a key made at `created` expires by its self-signature `sig` (`None`: never).
fn expiry(created: pgp::types::Timestamp, sig: Option<&pgp::packet::Signature>) -> Option<i64> {
    let secs = sig?.key_expiration_time()?.as_secs();
    (secs != 0).then(|| i64::from(created.as_secs()) + i64::from(secs))
}

/// An OpenPGP key that may have made a signature: a primary key or one of its subkeys.
struct Candidate<'a> {
    key: CandidateKey<'a>,
    signer: Signer,
    /// When the key expires (a subkey: with its primary key, or earlier).
    until: Option<i64>,
    can_sign: bool,
    revoked: bool,
}

enum CandidateKey<'a> {
    Primary(&'a pgp::packet::PublicKey),
    Sub(&'a pgp::packet::PublicSubkey),
}

/// The keys of `policy` that `sig` names as its issuer (all of them when it names none).
fn candidates<'a>(sig: &pgp::packet::Signature, policy: &'a Policy) -> Vec<Candidate<'a>> {
    let (fps, ids) = (sig.issuer_fingerprint(), sig.issuer_key_id());
    let anonymous = fps.is_empty() && ids.is_empty();
    let issued_by = |fp: pgp::types::Fingerprint, id: pgp::types::KeyId| {
        anonymous || fps.iter().any(|f| **f == fp) || ids.iter().any(|i| **i == id)
    };
    let mut out = Vec::new();
    for key in &policy.openpgp {
        let users = &key.details.users;
        let identity = users
            .iter()
            .find(|u| u.signatures.iter().any(|s| s.is_primary()))
            .or(users.first())
            .map_or_else(
                || format!("{:X}", key.fingerprint()),
                |u| String::from_utf8_lossy(u.id.id()).into_owned(),
            );
        let signer = |fp: pgp::types::Fingerprint| Signer {
            kind: "openpgp".into(),
            identity: identity.clone(),
            key: format!("{fp:X}"),
        };
        // The primary key's expiry, by its newest self-signature.
        let self_sig = newest(
            users
                .iter()
                .flat_map(|u| u.signatures.iter())
                .chain(key.details.direct_signatures.iter()),
        );
        let primary_until = expiry(key.primary_key.created_at(), self_sig);
        let revoked = !key.details.revocation_signatures.is_empty();
        let primary = &key.primary_key;
        if issued_by(primary.fingerprint(), primary.legacy_key_id()) {
            out.push(Candidate {
                key: CandidateKey::Primary(primary),
                signer: signer(primary.fingerprint()),
                until: primary_until,
                // A primary key certifies, and signs unless its flags say otherwise.
                can_sign: self_sig.is_none_or(|s| {
                    let flags = s.key_flags();
                    flags.sign()
                        || !(flags.certify()
                            || flags.encrypt_comms()
                            || flags.encrypt_storage()
                            || flags.authentication())
                }),
                revoked,
            });
        }
        for sub in &key.public_subkeys {
            if !issued_by(sub.key.fingerprint(), sub.key.legacy_key_id()) {
                continue;
            }
            let of_type = |t| sub.signatures.iter().filter(move |s| s.typ() == Some(t));
            let binding = newest(of_type(pgp::packet::SignatureType::SubkeyBinding));
            let until = match (expiry(sub.key.created_at(), binding), primary_until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            out.push(Candidate {
                key: CandidateKey::Sub(&sub.key),
                signer: signer(sub.key.fingerprint()),
                until,
                can_sign: binding.is_some_and(|b| b.key_flags().sign()),
                revoked: revoked || of_type(pgp::packet::SignatureType::SubkeyRevocation).next().is_some(),
            });
        }
    }
    out
}

fn verify_openpgp(
    commit: &str,
    signature: &str,
    payload: &[u8],
    policy: &Policy,
    now: i64,
) -> Result<Signer, Rejection> {
    let bad = |reason: String| Rejection::BadSignature {
        commit: commit.into(),
        reason,
    };
    let (sig, _) =
        DetachedSignature::from_string(signature).map_err(|e| bad(format!("unreadable OpenPGP signature: {e}")))?;
    let sig = sig.signature;
    let candidates = candidates(&sig, policy);
    if candidates.is_empty() {
        let issuer = sig
            .issuer_fingerprint()
            .first()
            .map(|fp| format!("{fp:X}"))
            .or_else(|| sig.issuer_key_id().first().map(|id| id.to_string().to_uppercase()))
            .unwrap_or_else(|| "an unnamed key".into());
        return Err(Rejection::UnknownKey {
            commit: commit.into(),
            key: format!("the OpenPGP key {issuer}"),
        });
    }
    let mut failure = String::new();
    for c in candidates {
        let verified = match c.key {
            CandidateKey::Primary(k) => sig.verify(k, payload),
            CandidateKey::Sub(k) => sig.verify(k, payload),
        };
        if let Err(e) = verified {
            failure = e.to_string();
            continue;
        }
        let refuse = |reason: &str| Rejection::KeyNotAllowed {
            commit: commit.into(),
            signer: c.signer.to_string(),
            reason: reason.into(),
        };
        if c.revoked {
            return Err(refuse("the key is revoked"));
        }
        if !c.can_sign {
            return Err(refuse("the key is not a signing key"));
        }
        let expired = |reason: String| Rejection::Expired {
            commit: commit.into(),
            signer: c.signer.to_string(),
            reason,
        };
        let made = sig.created().map(|t| i64::from(t.as_secs()));
        if let (Some(until), Some(made)) = (c.until, made)
            && made > until
        {
            return Err(expired(format!(
                "the key expired {} and the signature was made {}",
                rfc3339(until),
                rfc3339(made)
            )));
        }
        if let (Some(made), Some(valid_for)) = (made, sig.signature_expiration_time())
            && valid_for.as_secs() != 0
            && now > made + i64::from(valid_for.as_secs())
        {
            return Err(expired(format!(
                "the signature itself expired {}",
                rfc3339(made + i64::from(valid_for.as_secs()))
            )));
        }
        return Ok(c.signer);
    }
    Err(bad(format!(
        "the OpenPGP signature does not match the commit's content ({failure})"
    )))
}

// ---- a revision's verdict, for the report ----

/// One commit's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitVerdict {
    pub commit: String,
    /// Who signed it, when accepted.
    pub signer: Option<Signer>,
    /// Why not, when rejected: `unsigned`, `unknown_key`, `bad_signature`, `key_not_allowed`,
    /// `expired`.
    pub rejected: Option<String>,
    /// The rejection in words.
    pub error: Option<String>,
}

/// What the signature check said of a run's revision: the report's `verification`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub mode: VerifyMode,
    /// Every checked commit is signed by an allowed key.
    pub verified: bool,
    /// The commits checked, newest first (the head alone in `head` mode).
    pub commits: Vec<CommitVerdict>,
}

impl Verification {
    /// Check each `(commit id, raw commit object)` of `commits` (newest first).
    pub fn check(mode: VerifyMode, commits: &[(String, Vec<u8>)], policy: &Policy, now: i64) -> Verification {
        let commits: Vec<CommitVerdict> = commits
            .iter()
            .map(|(id, raw)| match verify_commit(id, raw, policy, now) {
                Ok(signer) => CommitVerdict {
                    commit: id.clone(),
                    signer: Some(signer),
                    rejected: None,
                    error: None,
                },
                Err(r) => CommitVerdict {
                    commit: id.clone(),
                    signer: None,
                    rejected: Some(r.code().into()),
                    error: Some(r.to_string()),
                },
            })
            .collect();
        Verification {
            mode,
            verified: !commits.is_empty() && commits.iter().all(|c| c.rejected.is_none()),
            commits,
        }
    }

    /// The rejections in words, at most `limit` of them and a count of the rest.
    pub fn errors(&self, limit: usize) -> Vec<String> {
        let rejected: Vec<&String> = self.commits.iter().filter_map(|c| c.error.as_ref()).collect();
        let mut out: Vec<String> = rejected.iter().take(limit).map(|e| e.to_string()).collect();
        if rejected.len() > limit {
            out.push(format!(
                "... and {} more commits not signed as `verify:` requires",
                rejected.len() - limit
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with the real tools: `ssh-keygen -t ed25519`, gpg's batch key generation (an
    // ed25519 primary key with a signing subkey), and `git commit -S` with each; the raw commits
    // are `git cat-file commit`. Committed 2023-11-14 (1700000000).
    const SSH_COMMIT: &str = concat!(
        "tree df55a7dce59d040dc7819c1e241082965a80ebd9\n",
        "author a <a@x> 1700000000 +0000\n",
        "committer c <c@x> 1700000000 +0000\n",
        "gpgsig -----BEGIN SSH SIGNATURE-----\n",
        " U1NIU0lHAAAAAQAAADMAAAALc3NoLWVkMjU1MTkAAAAg5aVkIDtuGGdClrdeGFrkLqrGbF\n",
        " mFKsz+L447LMZF6m4AAAADZ2l0AAAAAAAAAAZzaGE1MTIAAABTAAAAC3NzaC1lZDI1NTE5\n",
        " AAAAQCEp4tznUem4qGsAhJoWfqwDwkOLBWekcJdRyFNhucHzw8RJnwJVsjr9qeEJz2v5cv\n",
        " nUs4j/W8MdPmhoyQ+QLwQ=\n",
        " -----END SSH SIGNATURE-----\n",
        "\n",
        "signed by alice\n",
    );
    const PGP_COMMIT: &str = concat!(
        "tree 6ec4582517540f2c6a5a3b6cd5cb25cedcdc7a76\n",
        "parent 69950f0cd76d87fe35a51ec43417759c83287bc2\n",
        "author a <a@x> 1700000000 +0000\n",
        "committer c <c@x> 1700000000 +0000\n",
        "gpgsig -----BEGIN PGP SIGNATURE-----\n",
        " \n",
        " iIYEABYIAC4WIQTadMN7MwjIIUNkwWnIDGtwe07v1QUCaxQL7hAcYm9iQGV4YW1w\n",
        " bGUuY29tAAoJEMgMa3B7Tu/Vh3ABAInBJ8QkbQol2OapP66+S1w/5zRL+K6x6e+V\n",
        " BUPVq1HZAQCqKdgk1U05IhEK28LzxoFrApj7H8iofeqX5ss25+hnBg==\n",
        " =zn2F\n",
        " -----END PGP SIGNATURE-----\n",
        "\n",
        "signed by bob\n",
    );
    const BOB_KEY: &str = concat!(
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\n",
        "\n",
        "mDMEaxQL7RYJKwYBBAHaRw8BAQdAI1UHrL6iUrO0tGdCgEXNv9zkxLoRUala3SbY\n",
        "wCRfVKu0HUJvYiBCdWlsZGVyIDxib2JAZXhhbXBsZS5jb20+iJAEExYIADgWIQTW\n",
        "2UjpPmX1WflQc3ppJgsedDaCQAUCaxQL7QIbAwULCQgHAgYVCgkICwIEFgIDAQIe\n",
        "AQIXgAAKCRBpJgsedDaCQNQAAQDaCtV/4ey5Uc1JrV2e0o7zHRl7ylwwObmVgTCI\n",
        "8tCW0AD9Hpn8jMX2gqkS+5jZeP63V/FQz6n1g727/1owkRF+ww+4MwRrFAvtFgkr\n",
        "BgEEAdpHDwEBB0CpvIh3JzcGwffDNUN1EcEcH9dUPykT8VzMAkgowRgaLojvBBgW\n",
        "CAAgFiEE1tlI6T5l9Vn5UHN6aSYLHnQ2gkAFAmsUC+0CGwIAgQkQaSYLHnQ2gkB2\n",
        "IAQZFggAHRYhBNp0w3szCMghQ2TBacgMa3B7Tu/VBQJrFAvtAAoJEMgMa3B7Tu/V\n",
        "NEoA/0ks0j5CKOYnlqioIV4O0nAOANnjeFovG/bFKzvS3TnZAQCqBGWF0Ub8vZ17\n",
        "y8Wbgo+DJT2HDt7z17T/HQDzxW6FC91iAQCrg7a76buzSw4MZMdOYlAaBzEoXKWM\n",
        "CnCEUjji/bv8KwD/VpCdV7e+ai6AFSOmdSmjtjf49QEt0mhPtwOERD5B0Q8=\n",
        "=7pu5\n",
        "-----END PGP PUBLIC KEY BLOCK-----\n",
    );
    const ALICE: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOWlZCA7bhhnQpa3Xhha5C6qxmxZhSrM/i+OOyzGRepu alice@example.com";
    const MALLORY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr2Vgm1uhPh6dyFnoGNurw2s5UMFSS1n5bBc83gZJdf mallory";
    const ED25519: &str = ALICE;

    fn ssh_policy(allowed_signers: &str) -> Policy {
        Policy {
            ssh: parse_allowed_signers(allowed_signers, "allowed_signers").unwrap(),
            openpgp: Vec::new(),
        }
    }

    fn pgp_policy() -> Policy {
        Policy {
            ssh: Vec::new(),
            openpgp: parse_openpgp_keys(BOB_KEY, Path::new("bob.asc")).unwrap(),
        }
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_commit_signed_by_an_allowed_ssh_key_verifies_and_names_its_signer() {
        let policy = ssh_policy(&format!("# team\nmallory {MALLORY}\nalice@example.com {ALICE}\n"));
        let signer = verify_commit("c1", SSH_COMMIT.as_bytes(), &policy, NOW).unwrap();
        assert_eq!(signer.kind, "ssh");
        assert_eq!(signer.identity, "alice@example.com");
        assert!(signer.key.starts_with("SHA256:"), "{signer:?}");
        assert!(
            signer.to_string().starts_with("alice@example.com (SSH key SHA256:"),
            "{signer}"
        );
    }

    #[test]
    fn an_ssh_signature_by_a_key_not_listed_is_an_unknown_key() {
        let r = verify_commit(
            "c1",
            SSH_COMMIT.as_bytes(),
            &ssh_policy(&format!("mallory {MALLORY}")),
            NOW,
        )
        .unwrap_err();
        assert_eq!(r.code(), "unknown_key", "{r}");
        assert!(r.to_string().contains("the SSH key ssh-ed25519 SHA256:"), "{r}");
        // An OpenPGP keyring does not make an SSH signature known either.
        let r = verify_commit("c1", SSH_COMMIT.as_bytes(), &pgp_policy(), NOW).unwrap_err();
        assert_eq!(r.code(), "unknown_key", "{r}");
    }

    #[test]
    fn a_signature_copied_onto_other_content_is_a_bad_signature() {
        let policy = ssh_policy(&format!("alice {ALICE}"));
        let tampered = SSH_COMMIT.replace("signed by alice", "signed by alice, and more");
        let r = verify_commit("c1", tampered.as_bytes(), &policy, NOW).unwrap_err();
        assert_eq!(r.code(), "bad_signature", "{r}");
        let tampered = SSH_COMMIT.replace("tree df55", "tree 0000");
        assert_eq!(
            verify_commit("c1", tampered.as_bytes(), &policy, NOW)
                .unwrap_err()
                .code(),
            "bad_signature"
        );
        let tampered = PGP_COMMIT.replace("signed by bob", "signed by mallory");
        let r = verify_commit("c2", tampered.as_bytes(), &pgp_policy(), NOW).unwrap_err();
        assert_eq!(r.code(), "bad_signature", "{r}");
    }

    #[test]
    fn allowed_signers_options_limit_a_key() {
        let r = verify_commit(
            "c1",
            SSH_COMMIT.as_bytes(),
            &ssh_policy(&format!("alice namespaces=\"file\" {ALICE}")),
            NOW,
        )
        .unwrap_err();
        assert_eq!(r.code(), "key_not_allowed", "{r}");
        assert!(r.to_string().contains("namespaces=\"file\""), "{r}");
        let ok = ssh_policy(&format!("alice namespaces=\"file,g*\" {ALICE}"));
        assert!(verify_commit("c1", SSH_COMMIT.as_bytes(), &ok, NOW).is_ok());

        // Validity is judged at the committer time (2023-11-14), as git does.
        let r = verify_commit(
            "c1",
            SSH_COMMIT.as_bytes(),
            &ssh_policy(&format!("alice valid-before=\"20230101Z\" {ALICE}")),
            NOW,
        )
        .unwrap_err();
        assert_eq!(r.code(), "expired", "{r}");
        assert!(r.to_string().contains("valid-before 2023-01-01"), "{r}");
        let r = verify_commit(
            "c1",
            SSH_COMMIT.as_bytes(),
            &ssh_policy(&format!("alice valid-after=\"20240101Z\" {ALICE}")),
            NOW,
        )
        .unwrap_err();
        assert_eq!(r.code(), "expired", "{r}");
        let window = ssh_policy(&format!(
            "alice valid-after=\"20230101Z\",valid-before=\"20240101Z\" {ALICE}"
        ));
        assert!(verify_commit("c1", SSH_COMMIT.as_bytes(), &window, NOW).is_ok());
        // The key listed twice: one line that allows it is enough.
        let twice = ssh_policy(&format!("alice valid-before=\"20230101Z\" {ALICE}\nalice {ALICE}"));
        assert!(verify_commit("c1", SSH_COMMIT.as_bytes(), &twice, NOW).is_ok());
    }

    #[test]
    fn a_commit_signed_by_an_allowed_openpgp_subkey_verifies() {
        let signer = verify_commit("c2", PGP_COMMIT.as_bytes(), &pgp_policy(), NOW).unwrap();
        assert_eq!(signer.kind, "openpgp");
        assert_eq!(signer.identity, "Bob Builder <bob@example.com>");
        assert_eq!(
            signer.key, "DA74C37B3308C8214364C169C80C6B707B4EEFD5",
            "the signing subkey"
        );
        let r = verify_commit("c2", PGP_COMMIT.as_bytes(), &ssh_policy(&format!("alice {ALICE}")), NOW).unwrap_err();
        assert_eq!(r.code(), "unknown_key", "{r}");
        assert!(
            r.to_string().contains("DA74C37B3308C8214364C169C80C6B707B4EEFD5"),
            "{r}"
        );
    }

    #[test]
    fn a_signed_commit_splits_into_payload_and_signature_like_git() {
        let raw = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\
parent 0123456789012345678901234567890123456789\n\
author A <a@x> 1700000000 +0000\n\
committer C <c@x> 1700000100 +0100\n\
gpgsig -----BEGIN SSH SIGNATURE-----\n U1NIU0lH\n \n -----END SSH SIGNATURE-----\n\
\n\
subject\n\ngpgsig in the message is kept\n";
        let parts = split_commit(raw);
        assert_eq!(
            parts.signature.as_deref(),
            Some("-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n\n-----END SSH SIGNATURE-----\n")
        );
        let payload = String::from_utf8(parts.payload).unwrap();
        assert_eq!(
            payload,
            "tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\
parent 0123456789012345678901234567890123456789\n\
author A <a@x> 1700000000 +0000\n\
committer C <c@x> 1700000100 +0100\n\
\n\
subject\n\ngpgsig in the message is kept\n"
        );
        assert_eq!(parts.committer_time, Some(1_700_000_100));
    }

    #[test]
    fn other_signature_headers_are_dropped_and_other_continuations_kept() {
        let raw = b"tree t\nmergetag object o\n type commit\ngpgsig-sha256 -----BEGIN PGP SIGNATURE-----\n abc\n -----END PGP SIGNATURE-----\ncommitter C <c@x> 5 +0000\n\nm\n";
        let parts = split_commit(raw);
        assert_eq!(parts.signature, None, "the sha256 signature is not this repository's");
        assert_eq!(
            String::from_utf8(parts.payload).unwrap(),
            "tree t\nmergetag object o\n type commit\ncommitter C <c@x> 5 +0000\n\nm\n"
        );
        let unsigned = b"tree t\ncommitter C <c@x> 7 +0000\n\nm\n";
        let parts = split_commit(unsigned);
        assert_eq!((parts.signature, parts.payload.as_slice()), (None, &unsigned[..]));
    }

    #[test]
    fn allowed_signers_lines_parse_as_ssh_keygen_reads_them() {
        let text = format!(
            "# the team\n\n\
alice@example.com {ED25519} alice's laptop\n\
  bob@example.com,bob@laptop namespaces=\"git,file\",valid-after=\"20240101Z\",valid-before=\"20250101000000Z\" {ED25519}\n\
\"carol lee\" namespaces=\"file\" {ED25519}\n"
        );
        let signers = parse_allowed_signers(&text, "allowed_signers").unwrap();
        assert_eq!(signers.len(), 3);
        assert_eq!(signers[0].principals, "alice@example.com");
        assert_eq!(signers[0].namespaces, None);
        assert_eq!(signers[0].source, "allowed_signers:3");
        assert_eq!(
            signers[0].key.key_data(),
            PublicKey::from_openssh(ALICE).unwrap().key_data()
        );
        let bob = &signers[1];
        assert_eq!(bob.principals, "bob@example.com,bob@laptop");
        assert_eq!(bob.namespaces.as_deref(), Some("git,file"));
        assert_eq!(bob.valid_after, Some(1_704_067_200));
        assert_eq!(bob.valid_before, Some(1_735_689_600));
        assert_eq!(signers[2].principals, "carol lee");
        assert_eq!(signers[2].namespaces.as_deref(), Some("file"));

        for (bad, says) in [
            ("alice", "no key"),
            ("alice ssh-ed25519 AAAA-not-base64", "not a public key"),
            (&format!("alice cert-authority {ED25519}"), "cert-authority"),
            (&format!("alice no-touch-required {ED25519}"), "unknown option"),
            (&format!("alice valid-after=20240101 {ED25519}"), "quoted value"),
            (&format!("alice valid-after=\"2024\" {ED25519}"), "bad time"),
        ] {
            let e = parse_allowed_signers(&format!("# c\n{bad}\n"), "signers")
                .unwrap_err()
                .to_string();
            assert!(e.contains("signers:2") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn ssh_times_and_patterns() {
        assert_eq!(parse_ssh_time("19700102Z"), Some(86_400));
        assert_eq!(parse_ssh_time("197001020001Z"), Some(86_460));
        assert_eq!(parse_ssh_time("19700102000102Z"), Some(86_462));
        assert_eq!(parse_ssh_time("1970010"), None);
        assert_eq!(parse_ssh_time("19701302Z"), None);
        assert!(parse_ssh_time("20240101").is_some(), "local time");
        assert!(pattern_list_matches("git", "git"));
        assert!(pattern_list_matches("file,git", "git"));
        assert!(pattern_list_matches("g*", "git"));
        assert!(pattern_list_matches("g?t", "git"));
        assert!(!pattern_list_matches("file", "git"));
        assert!(!pattern_list_matches("*,!git", "git"));
        assert!(!pattern_list_matches("", "git"));
    }

    #[test]
    fn an_unsigned_or_oddly_signed_commit_is_rejected_with_its_reason() {
        let policy = Policy {
            ssh: parse_allowed_signers(&format!("alice {ED25519}"), "f").unwrap(),
            openpgp: Vec::new(),
        };
        let unsigned = b"tree t\ncommitter C <c@x> 7 +0000\n\nm\n";
        let r = verify_commit("c0ffee", unsigned, &policy, 0).unwrap_err();
        assert_eq!(
            r,
            Rejection::Unsigned {
                commit: "c0ffee".into()
            }
        );
        assert_eq!(r.code(), "unsigned");
        assert_eq!(r.to_string(), "commit c0ffee is not signed");

        let x509 = b"tree t\ngpgsig -----BEGIN SIGNED MESSAGE-----\n x\n -----END SIGNED MESSAGE-----\n\nm\n";
        let r = verify_commit("c1", x509, &policy, 0).unwrap_err();
        assert_eq!(r.code(), "bad_signature", "{r}");
        assert!(r.to_string().contains("X.509"), "{r}");

        let garbage =
            b"tree t\ngpgsig -----BEGIN SSH SIGNATURE-----\n bm90IGEgc2ln\n -----END SSH SIGNATURE-----\n\nm\n";
        let r = verify_commit("c2", garbage, &policy, 0).unwrap_err();
        assert_eq!(r.code(), "bad_signature", "{r}");
        let garbage =
            b"tree t\ngpgsig -----BEGIN PGP SIGNATURE-----\n bm90IGEgc2ln\n -----END PGP SIGNATURE-----\n\nm\n";
        let r = verify_commit("c3", garbage, &policy, 0).unwrap_err();
        assert_eq!(r.code(), "bad_signature", "{r}");
    }

    #[test]
    fn a_revision_is_verified_only_when_every_commit_is() {
        let policy = Policy::default();
        let unsigned = b"tree t\ncommitter C <c@x> 7 +0000\n\nm\n".to_vec();
        let v = Verification::check(VerifyMode::All, &[("a".into(), unsigned.clone())], &policy, 0);
        assert!(!v.verified);
        assert_eq!(v.commits[0].rejected.as_deref(), Some("unsigned"));
        assert_eq!(v.errors(5), ["commit a is not signed"]);
        let many: Vec<(String, Vec<u8>)> = (0..4).map(|i| (format!("c{i}"), unsigned.clone())).collect();
        let v = Verification::check(VerifyMode::All, &many, &policy, 0);
        assert_eq!(v.errors(2).len(), 3);
        assert!(v.errors(2)[2].contains("2 more commits"), "{:?}", v.errors(2));
        assert!(
            !Verification::check(VerifyMode::Head, &[], &policy, 0).verified,
            "nothing checked is not verified"
        );
    }

    #[test]
    fn a_policy_needs_a_key_and_refuses_what_is_not_a_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("allowed_signers");
        std::fs::write(&empty, "# nobody yet\n").unwrap();
        let settings = VerifySettings {
            mode: VerifyMode::Head,
            allowed_signers: Some(empty),
            openpgp_keys: Vec::new(),
        };
        assert!(matches!(Policy::load(&settings), Err(PolicyError::NoKeys)));
        let missing = VerifySettings {
            allowed_signers: Some(dir.path().join("nope")),
            ..settings.clone()
        };
        assert!(matches!(Policy::load(&missing), Err(PolicyError::Read { .. })));
        let secret = dir.path().join("secret.asc");
        std::fs::write(
            &secret,
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n-----END PGP PRIVATE KEY BLOCK-----\n",
        )
        .unwrap();
        let e = Policy::load(&VerifySettings {
            allowed_signers: None,
            openpgp_keys: vec![secret],
            ..settings
        })
        .unwrap_err();
        assert!(e.to_string().contains("gpg --export --armor"), "{e}");
    }
}
