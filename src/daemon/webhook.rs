//! Push webhooks: which forge sent a request, and whether it knows the shared secret.
//!
//! Every forge proves the request with the secret configured on both sides:
//!
//! - GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`.
//! - Gitea and Forgejo: `X-Gitea-Signature` / `X-Forgejo-Signature: <hex HMAC-SHA256(secret, body)>`
//!   (they also send GitHub's header; their own is preferred, so the forge is named right).
//! - GitLab: `X-Gitlab-Token: <the secret itself>`.
//!
//! All comparisons are constant-time: HMACs through [`Mac::verify_slice`], GitLab's token by
//! comparing HMACs keyed with the secret (the "double HMAC" comparison, which hides the length too).
//! A verified request only ever triggers a poll of the configured repository: nothing in the body
//! decides what is applied.
//!
//! Replays: every forge names each delivery (GitHub `X-GitHub-Delivery`, Gitea `X-Gitea-Delivery`,
//! Forgejo `X-Forgejo-Delivery`, GitLab `X-Gitlab-Event-UUID`), and [`Deliveries`] remembers the
//! last ones seen, so a captured request sent again as it was triggers nothing. The ID is not
//! covered by the signature (no forge signs its headers): a replay with a made-up ID still gets
//! through, and still only asks for a poll, which the daemon coalesces with any pending one.

use std::collections::{HashSet, VecDeque};
use std::fmt;

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The forge a verified webhook came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Forge {
    GitHub,
    /// Gitea or Forgejo.
    Gitea,
    GitLab,
}

impl Forge {
    /// Lowercase name for logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Forge::GitHub => "github",
            Forge::Gitea => "gitea",
            Forge::GitLab => "gitlab",
        }
    }
}

impl fmt::Display for Forge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a webhook was refused. Never contains the secret or the presented signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "no webhook signature header (expected X-Hub-Signature-256, X-Gitea-Signature, X-Forgejo-Signature \
         or X-Gitlab-Token)"
    )]
    MissingSignature,
    #[error("malformed {header} header: {reason}")]
    MalformedSignature { header: &'static str, reason: &'static str },
    #[error("{header} does not match the configured webhook secret")]
    Mismatch { header: &'static str },
    #[error("the configured webhook secret is empty")]
    EmptySecret,
}

pub const GITHUB_HEADER: &str = "x-hub-signature-256";
pub const GITEA_HEADER: &str = "x-gitea-signature";
pub const FORGEJO_HEADER: &str = "x-forgejo-signature";
pub const GITLAB_HEADER: &str = "x-gitlab-token";

pub const GITHUB_DELIVERY_HEADER: &str = "x-github-delivery";
pub const GITEA_DELIVERY_HEADER: &str = "x-gitea-delivery";
pub const FORGEJO_DELIVERY_HEADER: &str = "x-forgejo-delivery";
pub const GITLAB_DELIVERY_HEADER: &str = "x-gitlab-event-uuid";

/// The ID the forge gave this delivery, when it sent one (an empty or non-text value is none).
/// Forgejo sends its own header and Gitea's with the same value; GitLab's event UUID is the same
/// for a manual "resend" of the same event.
pub fn delivery_id(forge: Forge, headers: &HeaderMap) -> Option<&str> {
    let names: &[&str] = match forge {
        Forge::GitHub => &[GITHUB_DELIVERY_HEADER],
        Forge::Gitea => &[FORGEJO_DELIVERY_HEADER, GITEA_DELIVERY_HEADER],
        Forge::GitLab => &[GITLAB_DELIVERY_HEADER],
    };
    names
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok())
        .map(str::trim)
        .find(|id| !id.is_empty())
}

/// The delivery IDs of the last `capacity` verified webhooks, oldest forgotten first.
///
/// IDs are kept as SHA-256 digests: 32 bytes each whatever a header holds. They are keyed by the
/// ID alone, not by forge: Gitea and Forgejo also send GitHub's signature and delivery headers
/// with the same values, so a replay stripped down to GitHub's headers is still recognised.
#[derive(Debug)]
pub struct Deliveries {
    capacity: usize,
    order: VecDeque<[u8; 32]>,
    seen: HashSet<[u8; 32]>,
}

impl Deliveries {
    pub fn new(capacity: usize) -> Self {
        Deliveries {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    /// Records `id`; `false` when it was already recorded (a replay).
    pub fn first_time(&mut self, id: &str) -> bool {
        let key = Self::key(id);
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        true
    }

    /// Forgets `id`: the delivery was not taken after all, its retry must get through.
    pub fn forget(&mut self, id: &str) {
        let key = Self::key(id);
        if self.seen.remove(&key) {
            self.order.retain(|k| *k != key);
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn key(id: &str) -> [u8; 32] {
        Sha256::digest(id.as_bytes()).into()
    }
}

/// Verifies a webhook request against `secret` and names the forge that sent it.
///
/// The first signature header present decides, in this order: Forgejo, Gitea, GitHub, GitLab. A
/// missing header, a malformed signature and a mismatch are all errors; an empty secret verifies
/// nothing.
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<Forge, WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::EmptySecret);
    }
    for (header, forge) in [(FORGEJO_HEADER, Forge::Gitea), (GITEA_HEADER, Forge::Gitea)] {
        if let Some(value) = headers.get(header) {
            verify_hmac(header, value.as_bytes(), body, secret)?;
            return Ok(forge);
        }
    }
    if let Some(value) = headers.get(GITHUB_HEADER) {
        let hex = value
            .as_bytes()
            .strip_prefix(b"sha256=")
            .ok_or(WebhookError::MalformedSignature {
                header: GITHUB_HEADER,
                reason: "expected sha256=<hex>",
            })?;
        verify_hmac(GITHUB_HEADER, hex, body, secret)?;
        return Ok(Forge::GitHub);
    }
    if let Some(value) = headers.get(GITLAB_HEADER) {
        if tokens_equal(value.as_bytes(), secret) {
            return Ok(Forge::GitLab);
        }
        return Err(WebhookError::Mismatch { header: GITLAB_HEADER });
    }
    Err(WebhookError::MissingSignature)
}

/// The `ref` a push payload names (`refs/heads/main`, `refs/tags/v1`), when the body is a JSON
/// object with a string `ref` (GitHub, Gitea/Forgejo and GitLab push events all have one; ping
/// and other events do not).
pub fn pushed_ref(forge: Forge, body: &[u8]) -> Option<String> {
    let field = match forge {
        Forge::GitHub | Forge::Gitea | Forge::GitLab => "ref",
    };
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get(field)?.as_str().map(str::to_owned)
}

fn verify_hmac(header: &'static str, hex: &[u8], body: &[u8], secret: &[u8]) -> Result<(), WebhookError> {
    let expected = decode_hex(hex.trim_ascii()).ok_or(WebhookError::MalformedSignature {
        header,
        reason: "not a hex string",
    })?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    // verify_slice compares in constant time (and rejects a wrong length up front: the length of
    // an HMAC-SHA256 is public).
    mac.verify_slice(&expected)
        .map_err(|_| WebhookError::Mismatch { header })
}

/// Constant-time equality of two byte strings of any lengths: compares their HMACs keyed with the
/// secret, so neither the content nor the length of the secret leaks through timing.
fn tokens_equal(presented: &[u8], secret: &[u8]) -> bool {
    let tag = |data: &[u8]| {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        mac.update(data);
        mac
    };
    let expected = tag(secret).finalize().into_bytes();
    tag(presented).verify_slice(&expected).is_ok()
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// Hex HMAC-SHA256 of `body` keyed with `secret`: what Gitea/Forgejo send, and GitHub after
/// `sha256=`. For tests and tools that send webhooks.
pub fn sign_hex(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn github_documented_example_verifies() {
        // The example from GitHub's "Validating webhook deliveries" documentation.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign_hex(SECRET, BODY), sig.trim_start_matches("sha256="));
        assert_eq!(
            verify(&headers(&[("X-Hub-Signature-256", sig)]), BODY, SECRET),
            Ok(Forge::GitHub)
        );
        let upper = sig.to_uppercase().replace("SHA256=", "sha256=");
        assert_eq!(
            verify(&headers(&[("X-Hub-Signature-256", &upper)]), BODY, SECRET),
            Ok(Forge::GitHub)
        );
    }

    #[test]
    fn github_rejects_missing_prefix_bad_hex_and_mismatch() {
        let hex = sign_hex(SECRET, BODY);
        let err = verify(&headers(&[("X-Hub-Signature-256", &hex)]), BODY, SECRET).unwrap_err();
        assert!(matches!(err, WebhookError::MalformedSignature { .. }), "{err}");
        let err = verify(&headers(&[("X-Hub-Signature-256", "sha256=zz")]), BODY, SECRET).unwrap_err();
        assert!(matches!(err, WebhookError::MalformedSignature { .. }), "{err}");
        let err = verify(&headers(&[("X-Hub-Signature-256", "sha256=abc")]), BODY, SECRET).unwrap_err();
        assert!(matches!(err, WebhookError::MalformedSignature { .. }), "{err}");
        let other = format!("sha256={}", sign_hex(b"other", BODY));
        let err = verify(&headers(&[("X-Hub-Signature-256", &other)]), BODY, SECRET).unwrap_err();
        assert_eq!(err, WebhookError::Mismatch { header: GITHUB_HEADER });
        let err = verify(&headers(&[("X-Hub-Signature-256", "sha256=abcd")]), BODY, SECRET).unwrap_err();
        assert_eq!(err, WebhookError::Mismatch { header: GITHUB_HEADER });
        let sig = format!("sha256={}", sign_hex(SECRET, BODY));
        let err = verify(&headers(&[("X-Hub-Signature-256", &sig)]), b"Hello, World?", SECRET).unwrap_err();
        assert_eq!(err, WebhookError::Mismatch { header: GITHUB_HEADER });
    }

    #[test]
    fn gitea_and_forgejo_take_precedence_over_the_github_header() {
        let hex = sign_hex(SECRET, BODY);
        let github = format!("sha256={hex}");
        assert_eq!(
            verify(&headers(&[("X-Gitea-Signature", &hex)]), BODY, SECRET),
            Ok(Forge::Gitea)
        );
        assert_eq!(
            verify(&headers(&[("X-Forgejo-Signature", &hex)]), BODY, SECRET),
            Ok(Forge::Gitea)
        );
        let both = headers(&[("X-Gitea-Signature", &hex), ("X-Hub-Signature-256", &github)]);
        assert_eq!(verify(&both, BODY, SECRET), Ok(Forge::Gitea));
        let err = verify(&headers(&[("X-Gitea-Signature", &github)]), BODY, SECRET).unwrap_err();
        assert!(matches!(err, WebhookError::MalformedSignature { .. }), "{err}");
        let bad = sign_hex(b"nope", BODY);
        let err = verify(&headers(&[("X-Forgejo-Signature", &bad)]), BODY, SECRET).unwrap_err();
        assert_eq!(err, WebhookError::Mismatch { header: FORGEJO_HEADER });
    }

    #[test]
    fn gitlab_token_is_compared_whole() {
        let secret = std::str::from_utf8(SECRET).unwrap();
        assert_eq!(
            verify(&headers(&[("X-Gitlab-Token", secret)]), BODY, SECRET),
            Ok(Forge::GitLab)
        );
        for wrong in [
            "",
            "It's a Secret",
            "It's a Secret to Everybody!",
            "it's a secret to everybody",
        ] {
            let err = verify(&headers(&[("X-Gitlab-Token", wrong)]), BODY, SECRET).unwrap_err();
            assert_eq!(err, WebhookError::Mismatch { header: GITLAB_HEADER }, "{wrong:?}");
        }
    }

    #[test]
    fn no_header_or_empty_secret_is_refused() {
        assert_eq!(
            verify(&HeaderMap::new(), BODY, SECRET),
            Err(WebhookError::MissingSignature)
        );
        let only_event = headers(&[("X-GitHub-Event", "push")]);
        assert_eq!(verify(&only_event, BODY, SECRET), Err(WebhookError::MissingSignature));
        let gitlab_empty = headers(&[("X-Gitlab-Token", "")]);
        assert_eq!(verify(&gitlab_empty, BODY, b""), Err(WebhookError::EmptySecret));
    }

    #[test]
    fn errors_do_not_echo_the_secret() {
        let err = verify(&headers(&[("X-Gitlab-Token", "guess")]), BODY, SECRET).unwrap_err();
        assert!(!err.to_string().contains("Secret"), "{err}");
        assert!(!err.to_string().contains("guess"), "{err}");
    }

    #[test]
    fn delivery_ids_are_read_from_each_forges_header() {
        let all = headers(&[
            ("X-GitHub-Delivery", "gh-1"),
            ("X-Gitea-Delivery", "gt-1"),
            ("X-Gitlab-Event-UUID", "gl-1"),
        ]);
        assert_eq!(delivery_id(Forge::GitHub, &all), Some("gh-1"));
        assert_eq!(delivery_id(Forge::Gitea, &all), Some("gt-1"));
        assert_eq!(delivery_id(Forge::GitLab, &all), Some("gl-1"));
        let forgejo = headers(&[("X-Forgejo-Delivery", "fj-1"), ("X-Gitea-Delivery", "fj-1")]);
        assert_eq!(delivery_id(Forge::Gitea, &forgejo), Some("fj-1"));
        assert_eq!(delivery_id(Forge::GitHub, &forgejo), None);
        assert_eq!(
            delivery_id(Forge::GitHub, &headers(&[("X-GitHub-Delivery", " ")])),
            None
        );
    }

    #[test]
    fn deliveries_remember_the_last_ids_only() {
        let mut seen = Deliveries::new(3);
        assert!(seen.first_time("a"));
        assert!(!seen.first_time("a"), "a replay");
        assert!(seen.first_time("b"));
        assert!(seen.first_time("c"));
        assert!(seen.first_time("d"), "evicts a");
        assert_eq!(seen.len(), 3);
        assert!(seen.first_time("a"), "a was forgotten");
        assert!(!seen.first_time("d"));
        seen.forget("d");
        assert!(seen.first_time("d"), "forgotten on request");
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn pushed_ref_reads_the_ref_field() {
        let body = br#"{"ref":"refs/heads/main","before":"0","after":"1"}"#;
        assert_eq!(pushed_ref(Forge::GitHub, body).as_deref(), Some("refs/heads/main"));
        assert_eq!(pushed_ref(Forge::GitLab, body).as_deref(), Some("refs/heads/main"));
        assert_eq!(pushed_ref(Forge::Gitea, br#"{"zen":"hi"}"#), None);
        assert_eq!(pushed_ref(Forge::Gitea, br#"{"ref":1}"#), None);
        assert_eq!(pushed_ref(Forge::Gitea, b"not json"), None);
    }
}
