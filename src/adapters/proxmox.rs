//! The Proxmox VE REST API over HTTPS: [`ProxmoxClient`] implements [`ProxmoxApi`].
//!
//! * Authentication with an API token (`Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET`);
//!   the secret never appears in Debug, Display, errors or logs.
//! * TLS verified as [`TlsTrust`] says (CA file, pinned fingerprint, system roots, or insecure).
//! * Idempotent calls (GET, task polls) are retried with exponential backoff and jitter on
//!   transport errors, 5xx and 429, and fail over to the next endpoint on transport errors,
//!   for up to `retry_for` (90 s: a restart of the API is ridden out), a warning logged.
//!   POST/PUT/DELETE are sent once: a retried create could create twice. They only move to
//!   the next endpoint, or wait for the API to come back, when the connection could not be
//!   made at all (nothing was sent).
//! * A semaphore bounds concurrent requests; every request has a timeout.

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::adapters::tls::{self, TlsTrust};
use crate::ports::{
    GuestSummary, LiveConfig, NetworkInterface, Permissions, PowerAction, ProxmoxApi, ProxmoxError, PveKind, PveNode,
    PveVersion, StorageStatus, StorageVolume, Upid,
};

/// A Proxmox API token: `USER@REALM!TOKENID` and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    user: String,
    token_name: String,
    secret: String,
}

/// Why an API token could not be read. Never contains the token or any part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(String);

const TOKEN_SHAPE: &str = "an API token looks like USER@REALM!TOKENID=SECRET (optionally prefixed by PVEAPIToken=)";

impl ApiToken {
    /// Builds a token from its parts, checked like [`ApiToken::parse`].
    pub fn new(user: &str, token_name: &str, secret: &str) -> Result<Self, TokenError> {
        let (name, realm) = user
            .split_once('@')
            .ok_or_else(|| TokenError(format!("the user part has no @REALM: {TOKEN_SHAPE}")))?;
        if name.is_empty()
            || name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || ":/!=".contains(c))
        {
            return Err(TokenError(format!(
                "the user name is empty or has invalid characters: {TOKEN_SHAPE}"
            )));
        }
        if !is_identifier(realm) {
            return Err(TokenError(format!(
                "the realm is empty or has invalid characters: {TOKEN_SHAPE}"
            )));
        }
        if !is_identifier(token_name) {
            return Err(TokenError(format!(
                "the token id must start with a letter and hold only letters, digits, '.', '-', '_': {TOKEN_SHAPE}"
            )));
        }
        if secret.is_empty() || !secret.chars().all(|c| c.is_ascii_graphic()) {
            return Err(TokenError(format!(
                "the secret is empty or has invalid characters: {TOKEN_SHAPE}"
            )));
        }
        Ok(ApiToken {
            user: user.to_string(),
            token_name: token_name.to_string(),
            secret: secret.to_string(),
        })
    }

    /// Parses `PVEAPIToken=USER@REALM!TOKENID=SECRET` or `USER@REALM!TOKENID=SECRET`
    /// (surrounding whitespace ignored). `USER@REALM!TOKENID:SECRET` is accepted too; `=` is the
    /// official separator. Errors never echo the input.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let rest = match text.get(..12) {
            Some(prefix) if prefix.eq_ignore_ascii_case("PVEAPIToken=") => &text[12..],
            _ => text,
        };
        let (user, after) = rest
            .split_once('!')
            .ok_or_else(|| TokenError(format!("no '!' before the token id: {TOKEN_SHAPE}")))?;
        let split = after
            .find(['=', ':'])
            .ok_or_else(|| TokenError(format!("no '=' between the token id and the secret: {TOKEN_SHAPE}")))?;
        ApiToken::new(user, &after[..split], &after[split + 1..])
    }

    /// Reads a token from a file (one line; surrounding whitespace and the newline ignored).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| TokenError(format!("cannot read the API token file {}: {e}", path.display())))?;
        ApiToken::parse(&text).map_err(|e| TokenError(format!("API token file {}: {e}", path.display())))
    }

    /// Reads a token from an environment variable.
    pub fn from_env(var: &str) -> Result<Self, TokenError> {
        let text = match std::env::var(var) {
            Ok(text) => text,
            Err(std::env::VarError::NotPresent) => {
                return Err(TokenError(format!(
                    "the environment variable {var} (API token) is not set"
                )));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(TokenError(format!(
                    "the environment variable {var} (API token) is not valid UTF-8"
                )));
            }
        };
        ApiToken::parse(&text).map_err(|e| TokenError(format!("environment variable {var}: {e}")))
    }

    /// `USER@REALM`.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `TOKENID`.
    pub fn token_name(&self) -> &str {
        &self.token_name
    }

    /// `USER@REALM!TOKENID`: the token's public identity.
    pub fn id(&self) -> String {
        format!("{}!{}", self.user, self.token_name)
    }

    /// The secret itself. Never log or print it.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    fn authorization(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&format!(
            "PVEAPIToken={}!{}={}",
            self.user, self.token_name, self.secret
        ))
        .expect("token characters are checked at construction");
        value.set_sensitive(true);
        value
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
}

impl fmt::Display for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}!{}=<redacted>", self.user, self.token_name)
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How to reach and talk to Proxmox.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Base URLs, e.g. `https://192.168.2.10:8006`; tried in order when one is unreachable.
    pub endpoints: Vec<String>,
    pub token: ApiToken,
    pub trust: TlsTrust,
    /// Whole-request timeout (default 30 s).
    pub timeout: Duration,
    /// TCP + TLS connect timeout (default 10 s).
    pub connect_timeout: Duration,
    /// Retries of a call after the first attempt, at most (default 64; `retry_for` ends
    /// them first). Only idempotent calls (GET) are retried after an answer of 5xx or 429, or
    /// a connection that failed during the exchange; any call when its connection could not
    /// be made (nothing was sent).
    pub retries: u32,
    /// Base of the exponential backoff between retries (default 200 ms; ×2 each retry up to
    /// 10 s, +0–25 % jitter).
    pub backoff: Duration,
    /// How long after a call's first attempt a retry may still start (default 90 s): long
    /// enough to ride out a restart of the Proxmox API (pveproxy) or of its host's services.
    pub retry_for: Duration,
    /// Requests in flight at once (default 8).
    pub max_concurrent: usize,
    /// The shortest pause between two task status polls (default 50 ms). The first poll is
    /// sent at once; each pause is a quarter of the time waited so far, between this and
    /// `task_poll_interval` ([`task_poll_delay`]).
    pub task_poll_first: Duration,
    /// The longest pause between two task status polls (default 1 s).
    pub task_poll_interval: Duration,
    /// How long [`ProxmoxApi::wait_task`] waits for a task to stop (default 10 min).
    pub task_timeout: Duration,
}

impl ClientOptions {
    /// Options with the defaults.
    pub fn new(endpoints: Vec<String>, token: ApiToken, trust: TlsTrust) -> Self {
        ClientOptions {
            endpoints,
            token,
            trust,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            retries: 64,
            backoff: Duration::from_millis(200),
            retry_for: Duration::from_secs(90),
            max_concurrent: 8,
            task_poll_first: Duration::from_millis(50),
            task_poll_interval: Duration::from_secs(1),
            task_timeout: Duration::from_secs(600),
        }
    }
}

/// The longest pause between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The Proxmox VE API over HTTPS.
pub struct ProxmoxClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
    token: ApiToken,
    authorization: HeaderValue,
    retries: u32,
    backoff: Duration,
    retry_for: Duration,
    /// Retries made so far (what a report says of an API that did not answer).
    retried: AtomicU64,
    task_poll_first: Duration,
    task_poll_interval: Duration,
    task_timeout: Duration,
    in_flight: Semaphore,
    requests: AtomicU64,
    /// The endpoint that answered last: idempotent calls start there.
    preferred: AtomicUsize,
}

impl fmt::Debug for ProxmoxClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxmoxClient")
            .field("endpoints", &self.endpoints)
            .field("token", &self.token)
            .field("requests", &self.request_count())
            .finish_non_exhaustive()
    }
}

/// What one HTTP exchange produced.
struct Answer {
    status: StatusCode,
    reason: Option<String>,
    body: Vec<u8>,
}

impl ProxmoxClient {
    pub fn new(options: ClientOptions) -> Result<Self, ProxmoxError> {
        if options.endpoints.is_empty() {
            return Err(ProxmoxError::Other("no Proxmox endpoint configured".to_string()));
        }
        let mut endpoints = Vec::new();
        for endpoint in &options.endpoints {
            endpoints.push(normalize_endpoint(endpoint)?);
        }
        let http = tls::client_builder(&options.trust)
            .map_err(|e| ProxmoxError::Other(e.to_string()))?
            .timeout(options.timeout)
            .connect_timeout(options.connect_timeout)
            .user_agent(concat!("driftless/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProxmoxError::Other(format!("cannot build the HTTP client: {}", tls::error_chain(&e))))?;
        Ok(ProxmoxClient {
            http,
            endpoints,
            authorization: options.token.authorization(),
            token: options.token,
            retries: options.retries,
            backoff: options.backoff,
            retry_for: options.retry_for,
            retried: AtomicU64::new(0),
            task_poll_first: options.task_poll_first,
            task_poll_interval: options.task_poll_interval,
            task_timeout: options.task_timeout,
            in_flight: Semaphore::new(options.max_concurrent.max(1)),
            requests: AtomicU64::new(0),
            preferred: AtomicUsize::new(0),
        })
    }

    /// HTTP requests sent so far, retries included.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The pause before retry number `retry` of a call first sent at `started`, when one may
    /// still start within `retry_for`; logs the first retry of the call, as a warning.
    fn next_retry(&self, what: &str, why: &str, started: tokio::time::Instant, retry: u32) -> Option<Duration> {
        let delay = backoff_delay(self.backoff, retry);
        if retry > self.retries || started.elapsed() + delay > self.retry_for {
            return None;
        }
        self.retried.fetch_add(1, Ordering::Relaxed);
        if retry == 1 {
            tracing::warn!(
                %what,
                %why,
                retry_for_secs = self.retry_for.as_secs(),
                "the Proxmox API did not answer as it should; retrying with backoff"
            );
        } else {
            tracing::debug!(%what, %why, retry, "retrying");
        }
        Some(delay)
    }

    /// The base URLs, normalized (no trailing `/`).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// `GET /version`: the Proxmox VE version (a cheap check of address, TLS and token).
    pub async fn version(&self) -> Result<String, ProxmoxError> {
        let data = self.call(Method::GET, "/version", "", None).await?;
        Ok(data.get("version").map(value_text).unwrap_or_default())
    }

    fn redact(&self, text: &str) -> String {
        text.replace(self.token.expose_secret(), "<redacted>")
    }

    /// One API call: `path` below `/api2/json` (segments already encoded), `query` without `?`.
    /// Returns the response's `data`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &str,
        form: Option<&[(String, String)]>,
    ) -> Result<Value, ProxmoxError> {
        let what = format!("{method} {path}");
        let idempotent = method == Method::GET;
        let count = self.endpoints.len();
        let mut endpoint = self.preferred.load(Ordering::Relaxed) % count;
        let started = tokio::time::Instant::now();
        let mut retry = 0u32;
        let mut tried_this_round = 1usize;
        loop {
            let base = &self.endpoints[endpoint];
            match self.send(&method, base, path, query, form).await {
                Ok(answer) if answer.status.is_success() => {
                    self.preferred.store(endpoint, Ordering::Relaxed);
                    return parse_data(&answer.body).map_err(|e| ProxmoxError::Other(format!("{what}: {e}")));
                }
                Ok(answer) => {
                    let status = answer.status;
                    let retryable = idempotent
                        && ((status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
                            || status == StatusCode::TOO_MANY_REQUESTS);
                    let error = self.api_error(&what, answer);
                    if retryable
                        && error != ProxmoxError::DigestMismatch
                        && let Some(delay) =
                            self.next_retry(&what, &format!("HTTP {}", status.as_u16()), started, retry + 1)
                    {
                        retry += 1;
                        tokio::time::sleep(delay).await;
                        tried_this_round = 1;
                        continue;
                    }
                    return Err(error);
                }
                Err(err) => {
                    let tls_failure = tls::is_tls_error(&err);
                    let mut message = self.redact(&tls::error_chain(&err));
                    if tls_failure {
                        message.push_str(
                            " (the server's certificate is not trusted: check the CA file or the pinned fingerprint; \
                             `pvenode cert info` on the node prints the fingerprint)",
                        );
                    }
                    // Nothing was sent when the connection could not be made: any call may
                    // move on, or wait for the API to come back (a restart of pveproxy).
                    let may_fail_over = idempotent || err.is_connect();
                    tracing::debug!(%what, endpoint = %base, %message, "Proxmox request failed");
                    if may_fail_over && tried_this_round < count {
                        tried_this_round += 1;
                        endpoint = (endpoint + 1) % count;
                        continue;
                    }
                    if may_fail_over
                        && !tls_failure
                        && let Some(delay) = self.next_retry(&what, "unreachable", started, retry + 1)
                    {
                        retry += 1;
                        tokio::time::sleep(delay).await;
                        tried_this_round = 1;
                        endpoint = (endpoint + 1) % count;
                        continue;
                    }
                    if retry > 0 {
                        message.push_str(&format!(
                            " (retried {retry} times over {} s)",
                            started.elapsed().as_secs()
                        ));
                    }
                    return Err(ProxmoxError::Transport {
                        endpoint: base.clone(),
                        message,
                    });
                }
            }
        }
    }

    /// One HTTP exchange, holding a permit of the concurrency bound.
    async fn send(
        &self,
        method: &Method,
        base: &str,
        path: &str,
        query: &str,
        form: Option<&[(String, String)]>,
    ) -> Result<Answer, reqwest::Error> {
        let _permit = self.in_flight.acquire().await.expect("the semaphore is never closed");
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut url = format!("{base}/api2/json{path}");
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        let mut request = self
            .http
            .request(method.clone(), url)
            .header(AUTHORIZATION, self.authorization.clone());
        if let Some(form) = form {
            request = request.form(form);
        }
        let response = request.send().await?;
        let status = response.status();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        let body = response.bytes().await?.to_vec();
        Ok(Answer { status, reason, body })
    }

    /// The error for a non-2xx answer: Proxmox's reason phrase, plus the body's `message` and
    /// per-parameter `errors` when present.
    fn api_error(&self, what: &str, answer: Answer) -> ProxmoxError {
        let status = answer.status;
        let reason = answer
            .reason
            .or_else(|| status.canonical_reason().map(str::to_string))
            .unwrap_or_default()
            .trim()
            .to_string();
        let mut message = reason.clone();
        match serde_json::from_slice::<Value>(&answer.body) {
            Ok(body) => {
                if let Some(text) = body.get("message").and_then(Value::as_str) {
                    let text = text.trim();
                    if !text.is_empty() && text != reason {
                        push_part(&mut message, text, ": ");
                    }
                }
                if let Some(errors) = body.get("errors").and_then(Value::as_object) {
                    let list: Vec<String> = errors
                        .iter()
                        .map(|(param, msg)| format!("{param}: {}", value_text(msg).trim()))
                        .collect();
                    if !list.is_empty() {
                        push_part(&mut message, &list.join("; "), " - ");
                    }
                }
            }
            Err(_) => {
                let text = String::from_utf8_lossy(&answer.body);
                let text = text.trim();
                if !text.is_empty() && text != reason {
                    push_part(&mut message, &text.chars().take(300).collect::<String>(), ": ");
                }
            }
        }
        let message = self.redact(&message);
        let lower = message.to_lowercase();
        if status == StatusCode::INTERNAL_SERVER_ERROR
            && (lower.contains("detected modified configuration") || lower.contains("digest"))
        {
            return ProxmoxError::DigestMismatch;
        }
        ProxmoxError::Api {
            status: status.as_u16(),
            what: what.to_string(),
            message,
        }
    }

    fn guest_path(node: &str, kind: PveKind, vmid: u32) -> String {
        format!("/nodes/{}/{}/{vmid}", encode(node), kind.path())
    }

    async fn task_call(&self, method: Method, path: &str, form: &[(String, String)]) -> Result<Upid, ProxmoxError> {
        let data = self.call(method.clone(), path, "", Some(form)).await?;
        match data {
            Value::String(upid) => Ok(Upid(upid)),
            other => Err(ProxmoxError::Other(format!(
                "{method} {path}: expected a task id (UPID), got {other}"
            ))),
        }
    }
}

fn push_part(message: &mut String, part: &str, separator: &str) {
    if !message.is_empty() {
        message.push_str(separator);
    }
    message.push_str(part);
}

fn normalize_endpoint(endpoint: &str) -> Result<String, ProxmoxError> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let trimmed = trimmed
        .strip_suffix("/api2/json")
        .unwrap_or(trimmed)
        .trim_end_matches('/');
    let url = reqwest::Url::parse(trimmed)
        .map_err(|e| ProxmoxError::Other(format!("invalid Proxmox endpoint {endpoint:?}: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" => tracing::warn!(
            endpoint = trimmed,
            "Proxmox endpoint uses plain HTTP: the API token travels unencrypted"
        ),
        other => {
            return Err(ProxmoxError::Other(format!(
                "invalid Proxmox endpoint {endpoint:?}: scheme {other:?}, expected https"
            )));
        }
    }
    if url.host_str().is_none() {
        return Err(ProxmoxError::Other(format!(
            "invalid Proxmox endpoint {endpoint:?}: no host"
        )));
    }
    Ok(trimmed.to_string())
}

/// `base × 2^(retry-1)`, capped, plus up to 25 % jitter.
fn backoff_delay(base: Duration, retry: u32) -> Duration {
    let exponential = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let random = RandomState::new().build_hasher().finish();
    let jitter = exponential.mul_f64((random % 1000) as f64 / 4000.0);
    exponential + jitter
}

/// The pause before the next status poll of a task waited for `waited` so far: a quarter of
/// that, at least `first` and at most `max`.
///
/// Proxmox tasks take from tens of milliseconds (a config change, the start of a small
/// container) to minutes (a container create unpacking its template). A fixed interval makes
/// every short task cost that interval. Pausing a fraction of the time already waited sees a
/// task's end at most a quarter of its duration late (at most `first` for a short task, `max`
/// for a long one), at a number of polls that grows with the logarithm of the duration: a task
/// of 100 ms is seen at the third poll, one of 3 s at about the 17th, and after 4 s there is
/// one poll a second. Pauses that double each time (50, 100, 200 ms ...) poll about half as
/// often but see a task up to its own duration late (a 0.8 s start at 1.55 s), and made a
/// converge of new guests take 1.4 times its tasks' time (docs/benchmarks.md). A `first`
/// above `max` is lowered to `max`; pauses are at least 1 ms, so a zero setting cannot spin.
pub fn task_poll_delay(waited: Duration, first: Duration, max: Duration) -> Duration {
    let max = max.max(Duration::from_millis(1));
    let first = first.clamp(Duration::from_millis(1), max);
    (waited / 4).clamp(first, max)
}

/// Percent-encodes one path segment or query component (everything but RFC 3986 unreserved).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The `data` of a `{"data": ...}` body (`null` when absent or the body is empty).
fn parse_data(body: &[u8]) -> Result<Value, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    let mut value: Value = serde_json::from_slice(body).map_err(|e| format!("the response is not JSON: {e}"))?;
    Ok(value.get_mut("data").map(Value::take).unwrap_or(Value::Null))
}

/// A JSON value as Proxmox config text: strings as they are, numbers in decimal, booleans 1/0.
fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn split_tags(tags: &str) -> Vec<String> {
    tags.split([';', ',', ' '])
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn guest_summary(item: &Value) -> Result<Option<GuestSummary>, String> {
    let kind = match item.get("type").and_then(Value::as_str) {
        Some("lxc") => PveKind::Lxc,
        Some("qemu") => PveKind::Qemu,
        _ => return Ok(None),
    };
    let vmid = match item.get("vmid") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .and_then(|v| u32::try_from(v).ok())
    .ok_or_else(|| format!("a guest without a valid vmid: {item}"))?;
    let node = item
        .get("node")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("guest {vmid} has no node"))?
        .to_string();
    Ok(Some(GuestSummary {
        vmid,
        node,
        kind,
        name: item.get("name").and_then(Value::as_str).map(str::to_string),
        status: item
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        tags: item
            .get("tags")
            .and_then(Value::as_str)
            .map(split_tags)
            .unwrap_or_default(),
    }))
}

fn live_config(data: Value) -> Result<LiveConfig, String> {
    let Value::Object(map) = data else {
        return Err(format!("expected an object, got {data}"));
    };
    let mut config = LiveConfig::default();
    for (key, value) in map {
        match (key.as_str(), value) {
            ("digest", value) => config.digest = value_text(&value),
            ("lxc", Value::Array(pairs)) => {
                for pair in pairs {
                    match pair.as_array().map(Vec::as_slice) {
                        Some([k, v]) => config.raw_lxc.push((value_text(k), value_text(v))),
                        _ => return Err(format!("unexpected raw lxc entry {pair}")),
                    }
                }
            }
            (_, Value::Null) => {}
            (_, value) => {
                config.options.insert(key, value_text(&value));
            }
        }
    }
    Ok(config)
}

/// A JSON number (or a numeric string: Proxmox's Perl sometimes sends those) as `u64`.
fn json_u64(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A Proxmox boolean: `1`/`0` from Perl, JSON `true`/`false`, or a string of either.
fn json_bool(value: Option<&Value>) -> Option<bool> {
    match value? {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
        Value::String(s) => match s.trim() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn json_text(value: Option<&Value>) -> Option<String> {
    value.filter(|v| !v.is_null()).map(value_text)
}

fn expect_list(what: &str, data: Value) -> Result<Vec<Value>, ProxmoxError> {
    match data {
        Value::Array(items) => Ok(items),
        other => Err(ProxmoxError::Other(format!("{what}: expected a list, got {other}"))),
    }
}

/// A storage's status as `GET /nodes/{node}/storage` lists it (or `.../status` answers,
/// without the id: `storage` fills it in).
fn storage_status(item: &Value, storage: Option<&str>) -> Result<StorageStatus, String> {
    let storage = match storage {
        Some(s) => s.to_string(),
        None => item
            .get("storage")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("a storage without an id: {item}"))?
            .to_string(),
    };
    Ok(StorageStatus {
        kind: json_text(item.get("type")).unwrap_or_default(),
        content: json_text(item.get("content"))
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect(),
        // Proxmox leaves `active`/`enabled` out rather than saying 0 in some versions: absent
        // means the storage answered the status call, which only an active one does.
        active: json_bool(item.get("active")).unwrap_or(true),
        enabled: json_bool(item.get("enabled")).unwrap_or(true),
        shared: json_bool(item.get("shared")).unwrap_or(false),
        total: json_u64(item.get("total")),
        used: json_u64(item.get("used")),
        avail: json_u64(item.get("avail")),
        storage,
    })
}

fn storage_volume(item: &Value) -> Result<StorageVolume, String> {
    Ok(StorageVolume {
        volid: item
            .get("volid")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("a volume without a volid: {item}"))?
            .to_string(),
        content: json_text(item.get("content")).unwrap_or_default(),
        format: json_text(item.get("format")).unwrap_or_default(),
        size: json_u64(item.get("size")).unwrap_or(0),
        vmid: json_u64(item.get("vmid")).and_then(|v| u32::try_from(v).ok()),
    })
}

/// `{"/vms": {"VM.Audit": 1}}` as paths to privileges to their propagate flag.
fn permissions(data: Value) -> Result<Permissions, String> {
    let Value::Object(paths) = data else {
        return Err(format!("expected an object, got {data}"));
    };
    let mut out = Permissions::new();
    for (path, privs) in paths {
        let Value::Object(privs) = privs else {
            return Err(format!("{path}: expected an object of privileges, got {privs}"));
        };
        let privs = privs
            .iter()
            .map(|(p, propagate)| (p.clone(), json_bool(Some(propagate)).unwrap_or(true)))
            .collect();
        out.insert(path, privs);
    }
    Ok(out)
}

impl ProxmoxApi for ProxmoxClient {
    fn retries(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    async fn list_guests(&self) -> Result<Vec<GuestSummary>, ProxmoxError> {
        let data = self.call(Method::GET, "/cluster/resources", "type=vm", None).await?;
        let Value::Array(items) = data else {
            return Err(ProxmoxError::Other(format!(
                "GET /cluster/resources: expected a list, got {data}"
            )));
        };
        let mut guests = Vec::new();
        for item in &items {
            if let Some(guest) =
                guest_summary(item).map_err(|e| ProxmoxError::Other(format!("GET /cluster/resources: {e}")))?
            {
                guests.push(guest);
            }
        }
        Ok(guests)
    }

    async fn read_config(&self, node: &str, kind: PveKind, vmid: u32) -> Result<LiveConfig, ProxmoxError> {
        let path = format!("{}/config", Self::guest_path(node, kind, vmid));
        let data = self.call(Method::GET, &path, "", None).await?;
        live_config(data).map_err(|e| ProxmoxError::Other(format!("GET {path}: {e}")))
    }

    async fn create(&self, node: &str, kind: PveKind, params: &BTreeMap<String, String>) -> Result<Upid, ProxmoxError> {
        let path = format!("/nodes/{}/{}", encode(node), kind.path());
        let form: Vec<(String, String)> = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        self.task_call(Method::POST, &path, &form).await
    }

    async fn update_config(
        &self,
        node: &str,
        kind: PveKind,
        vmid: u32,
        set: &BTreeMap<String, String>,
        delete: &[String],
        digest: &str,
    ) -> Result<(), ProxmoxError> {
        let path = format!("{}/config", Self::guest_path(node, kind, vmid));
        let mut form: Vec<(String, String)> = set.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !delete.is_empty() {
            form.push(("delete".to_string(), delete.join(",")));
        }
        if !digest.is_empty() {
            form.push(("digest".to_string(), digest.to_string()));
        }
        self.call(Method::PUT, &path, "", Some(&form)).await?;
        Ok(())
    }

    async fn power(&self, node: &str, kind: PveKind, vmid: u32, action: PowerAction) -> Result<Upid, ProxmoxError> {
        let path = format!("{}/status/{}", Self::guest_path(node, kind, vmid), action.as_str());
        self.task_call(Method::POST, &path, &[]).await
    }

    async fn delete_guest(&self, node: &str, kind: PveKind, vmid: u32) -> Result<Upid, ProxmoxError> {
        let path = Self::guest_path(node, kind, vmid);
        let data = self.call(Method::DELETE, &path, "", None).await?;
        match data {
            Value::String(upid) => Ok(Upid(upid)),
            other => Err(ProxmoxError::Other(format!(
                "DELETE {path}: expected a task id (UPID), got {other}"
            ))),
        }
    }

    async fn wait_task(&self, upid: &Upid) -> Result<(), ProxmoxError> {
        let node = match upid.node() {
            Some(node) if upid.0.starts_with("UPID:") && !node.is_empty() => node,
            _ => return Err(ProxmoxError::Other(format!("not a Proxmox task id: {:?}", upid.0))),
        };
        let path = format!("/nodes/{}/tasks/{}/status", encode(node), encode(&upid.0));
        let started = tokio::time::Instant::now();
        let deadline = started + self.task_timeout;
        // The first poll goes out at once: a task may already be done when its UPID comes back.
        loop {
            let data = self.call(Method::GET, &path, "", None).await?;
            let status = data.get("status").and_then(Value::as_str).unwrap_or("");
            if status == "stopped" {
                let exit = data.get("exitstatus").map(value_text).unwrap_or_default();
                if exit == "OK" {
                    return Ok(());
                }
                let exit_status = if exit.is_empty() {
                    "no exit status".to_string()
                } else {
                    exit
                };
                return Err(ProxmoxError::TaskFailed {
                    upid: upid.0.clone(),
                    exit_status,
                });
            }
            let delay = task_poll_delay(started.elapsed(), self.task_poll_first, self.task_poll_interval);
            if tokio::time::Instant::now() + delay > deadline {
                return Err(ProxmoxError::Other(format!(
                    "task {} still {} after {:?}",
                    upid.0,
                    if status.is_empty() { "running" } else { status },
                    self.task_timeout
                )));
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn api_version(&self) -> Result<PveVersion, ProxmoxError> {
        let data = self.call(Method::GET, "/version", "", None).await?;
        Ok(PveVersion {
            version: json_text(data.get("version")).unwrap_or_default(),
            release: json_text(data.get("release")).unwrap_or_default(),
        })
    }

    async fn permissions(&self, path: Option<&str>) -> Result<Permissions, ProxmoxError> {
        let query = path.map(|p| format!("path={}", encode(p))).unwrap_or_default();
        let data = self.call(Method::GET, "/access/permissions", &query, None).await?;
        permissions(data).map_err(|e| ProxmoxError::Other(format!("GET /access/permissions: {e}")))
    }

    async fn nodes(&self) -> Result<Vec<PveNode>, ProxmoxError> {
        let items = expect_list("GET /nodes", self.call(Method::GET, "/nodes", "", None).await?)?;
        items
            .iter()
            .map(|item| {
                let node = item
                    .get("node")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ProxmoxError::Other(format!("GET /nodes: a node without a name: {item}")))?;
                Ok(PveNode {
                    node: node.to_string(),
                    status: json_text(item.get("status")).unwrap_or_else(|| "unknown".into()),
                    ssl_fingerprint: json_text(item.get("ssl_fingerprint")).filter(|f| !f.is_empty()),
                })
            })
            .collect()
    }

    async fn node_network(&self, node: &str) -> Result<Vec<NetworkInterface>, ProxmoxError> {
        let path = format!("/nodes/{}/network", encode(node));
        let items = expect_list(&format!("GET {path}"), self.call(Method::GET, &path, "", None).await?)?;
        Ok(items
            .iter()
            .filter_map(|item| {
                Some(NetworkInterface {
                    iface: item.get("iface")?.as_str()?.to_string(),
                    kind: json_text(item.get("type")).unwrap_or_default(),
                    active: json_bool(item.get("active")).unwrap_or(false),
                })
            })
            .collect())
    }

    async fn storages(&self, node: &str) -> Result<Vec<StorageStatus>, ProxmoxError> {
        let path = format!("/nodes/{}/storage", encode(node));
        let items = expect_list(&format!("GET {path}"), self.call(Method::GET, &path, "", None).await?)?;
        items
            .iter()
            .map(|item| storage_status(item, None).map_err(|e| ProxmoxError::Other(format!("GET {path}: {e}"))))
            .collect()
    }

    async fn storage_status(&self, node: &str, storage: &str) -> Result<StorageStatus, ProxmoxError> {
        let path = format!("/nodes/{}/storage/{}/status", encode(node), encode(storage));
        let data = self.call(Method::GET, &path, "", None).await?;
        storage_status(&data, Some(storage)).map_err(|e| ProxmoxError::Other(format!("GET {path}: {e}")))
    }

    async fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: Option<&str>,
    ) -> Result<Vec<StorageVolume>, ProxmoxError> {
        let path = format!("/nodes/{}/storage/{}/content", encode(node), encode(storage));
        let query = content.map(|c| format!("content={}", encode(c))).unwrap_or_default();
        let items = expect_list(
            &format!("GET {path}"),
            self.call(Method::GET, &path, &query, None).await?,
        )?;
        items
            .iter()
            .map(|item| storage_volume(item).map_err(|e| ProxmoxError::Other(format!("GET {path}: {e}"))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_redact() {
        for text in [
            "PVEAPIToken=root@pam!ci=s3cr3t-uuid",
            "root@pam!ci=s3cr3t-uuid\n",
            "root@pam!ci:s3cr3t-uuid",
        ] {
            let token = ApiToken::parse(text).unwrap();
            assert_eq!(token.id(), "root@pam!ci");
            assert_eq!(token.expose_secret(), "s3cr3t-uuid");
            assert_eq!(format!("{token:?}"), "root@pam!ci=<redacted>");
            assert_eq!(token.to_string(), "root@pam!ci=<redacted>");
        }
        for bad in [
            "s3cr3t-uuid",
            "root!ci=s3cr3t-uuid",
            "root@pam!ci=",
            "root@pam!=s3cr3t-uuid",
            "root@pam!ci s3cr3t",
        ] {
            let err = ApiToken::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("s3cr3t"), "{err}");
        }
    }

    #[test]
    fn config_values_become_text() {
        let data = serde_json::json!({
            "cores": 2, "cpulimit": 1.5, "hostname": "k3s-1", "onboot": 1, "digest": "abc",
            "lxc": [["lxc.apparmor.profile", "unconfined"], ["lxc.cap.drop", ""]],
        });
        let config = live_config(data).unwrap();
        assert_eq!(config.options["cores"], "2");
        assert_eq!(config.options["cpulimit"], "1.5");
        assert_eq!(config.options["hostname"], "k3s-1");
        assert!(!config.options.contains_key("digest") && !config.options.contains_key("lxc"));
        assert_eq!(config.digest, "abc");
        assert_eq!(
            config.raw_lxc[0],
            ("lxc.apparmor.profile".to_string(), "unconfined".to_string())
        );
    }

    /// When the polls of a task go out with the default schedule and instant requests.
    fn default_poll_times(until: Duration) -> Vec<Duration> {
        let defaults = ClientOptions::new(
            vec!["https://pve:8006".into()],
            ApiToken::parse("root@pam!ci=s3cr3t").unwrap(),
            TlsTrust::System,
        );
        let mut polls = vec![Duration::ZERO];
        while *polls.last().unwrap() < until {
            let waited = *polls.last().unwrap();
            polls.push(waited + task_poll_delay(waited, defaults.task_poll_first, defaults.task_poll_interval));
        }
        polls
    }

    #[test]
    fn task_polls_start_at_once_and_are_never_late_by_more_than_a_quarter() {
        let polls = default_poll_times(Duration::from_secs(700));
        let ms: Vec<u128> = polls.iter().take(10).map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 50, 100, 150, 200, 250, 312, 390, 488, 610]);
        // When a task that ends after `d` is seen, and at which poll.
        let seen = |d: Duration| {
            let i = polls.iter().position(|&t| t >= d).unwrap();
            (polls[i], i + 1)
        };
        assert_eq!(seen(Duration::from_millis(100)), (Duration::from_millis(100), 3));
        let (at, n) = seen(Duration::from_secs(3));
        assert!(
            at <= Duration::from_millis(3750) && n <= 20,
            "3 s task seen at {at:?}, poll {n}"
        );
        // Never later than a quarter of the task's duration (50 ms for short tasks, 1 s for
        // long ones), for durations from 1 ms to 10 minutes.
        let mut d = Duration::from_millis(1);
        while d < Duration::from_secs(600) {
            let late = seen(d).0 - d;
            let bound = (d / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
            assert!(late <= bound, "a task of {d:?} seen {late:?} late");
            d = d * 9 / 8 + Duration::from_micros(137);
        }
        // A long task is polled once a second.
        let gaps: Vec<Duration> = polls.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[gaps.len() - 10..].iter().all(|&g| g == Duration::from_secs(1)));
        assert!(polls.len() < 700 + 30, "{} polls in 700 s", polls.len());
    }

    #[test]
    fn task_poll_settings_out_of_range_are_clamped() {
        let ms = |d: Duration| d.as_millis();
        let at = |waited_ms: u64, first_ms: u64, max_ms: u64| {
            ms(task_poll_delay(
                Duration::from_millis(waited_ms),
                Duration::from_millis(first_ms),
                Duration::from_millis(max_ms),
            ))
        };
        // A first pause above the cap is the cap (a test that sets only the interval polls
        // at that interval); zero cannot spin.
        assert_eq!([at(0, 50, 5), at(10_000, 50, 5)], [5, 5]);
        assert_eq!([at(0, 0, 0), at(1000, 0, 0)], [1, 1]);
        assert_eq!([at(0, 0, 1000), at(400, 0, 1000)], [1, 100]);
    }

    #[test]
    fn helpers() {
        assert_eq!(
            encode("UPID:pve:0000:1:2:vzcreate:100:root@pam!ci:"),
            "UPID%3Apve%3A0000%3A1%3A2%3Avzcreate%3A100%3Aroot%40pam%21ci%3A"
        );
        assert_eq!(
            split_tags("driftless;k3s, web  x"),
            vec!["driftless", "k3s", "web", "x"]
        );
        assert_eq!(
            normalize_endpoint("https://pve:8006/api2/json/").unwrap(),
            "https://pve:8006"
        );
        assert!(normalize_endpoint("ftp://pve").is_err());
        let d = backoff_delay(Duration::from_millis(200), 3);
        assert!(
            d >= Duration::from_millis(800) && d <= Duration::from_millis(1000),
            "{d:?}"
        );
    }
}
