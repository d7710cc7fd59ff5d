//! Commit statuses on the forge: the plan of a pull request, or the result of an apply, shown
//! next to the commit (`driftless/plan`, `driftless/apply`).
//!
//! - Gitea/Forgejo: `POST {api}/repos/{owner}/{repo}/statuses/{sha}`, JSON, `Authorization: token T`.
//! - GitHub: `POST {api}/repos/{owner}/{repo}/statuses/{sha}`, JSON, `Authorization: Bearer T`.
//! - GitLab: `POST {api}/projects/{id}/statuses/{sha}`, form fields, `PRIVATE-TOKEN: T`.
//!
//! The token never appears in logs, errors or `Debug` output.

use std::fmt;
use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, USER_AGENT};
use serde::Serialize;

/// GitHub refuses longer descriptions; the others accept them, but the same text everywhere reads
/// better.
pub const DESCRIPTION_LIMIT: usize = 140;

const AGENT: &str = concat!("driftless/", env!("CARGO_PKG_VERSION"));
const TIMEOUT: Duration = Duration::from_secs(30);

/// Which forge API to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ForgeKind {
    /// Gitea or Forgejo (`https://host/api/v1`).
    Gitea,
    /// GitHub (`https://api.github.com`, or `https://host/api/v3` for GitHub Enterprise Server).
    GitHub,
    /// GitLab (`https://host/api/v4`).
    GitLab,
}

/// The state of a commit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommitState {
    Pending,
    Success,
    Failure,
    Error,
}

impl CommitState {
    /// The state as Gitea, Forgejo and GitHub name it.
    pub fn github_name(self) -> &'static str {
        match self {
            CommitState::Pending => "pending",
            CommitState::Success => "success",
            CommitState::Failure => "failure",
            CommitState::Error => "error",
        }
    }

    /// The state as GitLab names it (GitLab has no "error": it is `failed` too).
    pub fn gitlab_name(self) -> &'static str {
        match self {
            CommitState::Pending => "pending",
            CommitState::Success => "success",
            CommitState::Failure | CommitState::Error => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgeError {
    #[error("invalid forge configuration: {0}")]
    Config(String),
    #[error("not a commit id: {0:?}")]
    InvalidSha(String),
    #[error("forge request {url} failed: {message}")]
    Request { url: String, message: String },
    #[error("forge answered {status} for POST {url}: {message}")]
    Status { status: u16, url: String, message: String },
}

/// A client for one repository's commit statuses.
#[derive(Clone)]
pub struct ForgeClient {
    kind: ForgeKind,
    api_base: String,
    repo: String,
    token: String,
    http: reqwest::Client,
}

impl fmt::Debug for ForgeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForgeClient")
            .field("kind", &self.kind)
            .field("api_base", &self.api_base)
            .field("repo", &self.repo)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct GithubStatus<'a> {
    state: &'a str,
    context: &'a str,
    description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_url: Option<&'a str>,
}

#[derive(Serialize)]
struct GitlabStatus<'a> {
    state: &'a str,
    name: &'a str,
    description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_url: Option<&'a str>,
}

impl ForgeClient {
    /// A client with its own HTTPS client (rustls, the system's trust roots, 30 s timeout).
    ///
    /// `api_base` is the API root (`https://api.github.com`, `https://git.example/api/v1`,
    /// `https://gitlab.example/api/v4`); `repo` is `owner/name`, or for GitLab a numeric project
    /// id or the project path (`group/sub/name`, encoded here).
    pub fn new(
        kind: ForgeKind,
        api_base: impl Into<String>,
        repo: impl Into<String>,
        token: impl Into<String>,
    ) -> Result<Self, ForgeError> {
        let http = reqwest::Client::builder()
            .tls_backend_rustls()
            .user_agent(AGENT)
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| ForgeError::Config(format!("cannot build the HTTP client: {e}")))?;
        Self::with_client(kind, api_base, repo, token, http)
    }

    /// A client that sends through `http` (tests, or a client with custom trust).
    pub fn with_client(
        kind: ForgeKind,
        api_base: impl Into<String>,
        repo: impl Into<String>,
        token: impl Into<String>,
        http: reqwest::Client,
    ) -> Result<Self, ForgeError> {
        let api_base = api_base.into().trim_end_matches('/').to_owned();
        if !(api_base.starts_with("https://") || api_base.starts_with("http://")) {
            return Err(ForgeError::Config(format!(
                "API base {api_base:?} is not an http(s) URL"
            )));
        }
        let repo = repo.into().trim_matches('/').to_owned();
        match kind {
            ForgeKind::Gitea | ForgeKind::GitHub => {
                let parts: Vec<&str> = repo.split('/').collect();
                if parts.len() != 2 || parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
                    return Err(ForgeError::Config(format!("repository {repo:?} is not owner/name")));
                }
            }
            ForgeKind::GitLab => {
                if repo.is_empty() || repo.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
                    return Err(ForgeError::Config(format!(
                        "GitLab project {repo:?} is not an id or a path"
                    )));
                }
            }
        }
        let token = token.into();
        if token.is_empty() {
            return Err(ForgeError::Config("the forge token is empty".to_owned()));
        }
        Ok(ForgeClient {
            kind,
            api_base,
            repo,
            token,
            http,
        })
    }

    pub fn kind(&self) -> ForgeKind {
        self.kind
    }

    pub fn api_base(&self) -> &str {
        &self.api_base
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// The URL a status for `sha` is posted to.
    pub fn status_url(&self, sha: &str) -> String {
        match self.kind {
            ForgeKind::Gitea | ForgeKind::GitHub => {
                let (owner, name) = self.repo.split_once('/').unwrap_or((&self.repo, ""));
                format!(
                    "{}/repos/{}/{}/statuses/{sha}",
                    self.api_base,
                    encode_segment(owner),
                    encode_segment(name)
                )
            }
            ForgeKind::GitLab => format!(
                "{}/projects/{}/statuses/{sha}",
                self.api_base,
                encode_segment(&self.repo)
            ),
        }
    }

    /// Sets the status `context` of commit `sha` (`description` is cut to [`DESCRIPTION_LIMIT`]
    /// characters). A non-2xx answer is an error naming the status and the forge's message.
    pub async fn set_status(
        &self,
        sha: &str,
        state: CommitState,
        context: &str,
        description: &str,
        target_url: Option<&str>,
    ) -> Result<(), ForgeError> {
        if !(7..=64).contains(&sha.len()) || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ForgeError::InvalidSha(sha.to_owned()));
        }
        let url = self.status_url(sha);
        let description = truncate_description(description);
        let request = self.http.post(&url).header(USER_AGENT, AGENT);
        let request = match self.kind {
            ForgeKind::Gitea => request
                .header(AUTHORIZATION, format!("token {}", self.token))
                .header(ACCEPT, "application/json")
                .json(&GithubStatus {
                    state: state.github_name(),
                    context,
                    description: &description,
                    target_url,
                }),
            ForgeKind::GitHub => request
                .header(AUTHORIZATION, format!("Bearer {}", self.token))
                .header(ACCEPT, "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28")
                .json(&GithubStatus {
                    state: state.github_name(),
                    context,
                    description: &description,
                    target_url,
                }),
            ForgeKind::GitLab => request.header("PRIVATE-TOKEN", &self.token).form(&GitlabStatus {
                state: state.gitlab_name(),
                name: context,
                description: &description,
                target_url,
            }),
        };
        let response = request.send().await.map_err(|e| ForgeError::Request {
            url: url.clone(),
            message: self.redact(&crate::adapters::tls::error_chain(&e)),
        })?;
        let status = response.status();
        if status.is_success() {
            tracing::debug!(forge = ?self.kind, %sha, context, state = state.github_name(), "commit status set");
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        let mut message = self.redact(body.trim());
        if message.chars().count() > 300 {
            message = message.chars().take(300).chain("…".chars()).collect();
        }
        if message.is_empty() {
            message = status.canonical_reason().unwrap_or("no message").to_owned();
        }
        Err(ForgeError::Status {
            status: status.as_u16(),
            url,
            message,
        })
    }

    /// `text` with the token replaced, in case a forge or proxy echoes it back.
    fn redact(&self, text: &str) -> String {
        text.replace(&self.token, "<redacted>")
    }
}

/// `description` cut to [`DESCRIPTION_LIMIT`] characters, ending in `…` when cut.
pub fn truncate_description(description: &str) -> String {
    if description.chars().count() <= DESCRIPTION_LIMIT {
        return description.to_owned();
    }
    let mut out: String = description.chars().take(DESCRIPTION_LIMIT - 1).collect();
    out.push('…');
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters (so `/` becomes `%2F`, as
/// GitLab wants for project paths).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(kind: ForgeKind, repo: &str) -> ForgeClient {
        ForgeClient::with_client(
            kind,
            "https://forge.example/api/",
            repo,
            "s3cr3t",
            reqwest::Client::new(),
        )
        .unwrap()
    }

    #[test]
    fn status_urls() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            client(ForgeKind::GitHub, "me/lab").status_url(sha),
            format!("https://forge.example/api/repos/me/lab/statuses/{sha}")
        );
        assert_eq!(
            client(ForgeKind::Gitea, "me/lab.git-ops").status_url(sha),
            format!("https://forge.example/api/repos/me/lab.git-ops/statuses/{sha}")
        );
        assert_eq!(
            client(ForgeKind::GitLab, "group/sub/lab").status_url(sha),
            format!("https://forge.example/api/projects/group%2Fsub%2Flab/statuses/{sha}")
        );
        assert_eq!(
            client(ForgeKind::GitLab, "42").status_url(sha),
            format!("https://forge.example/api/projects/42/statuses/{sha}")
        );
    }

    #[test]
    fn bad_configuration_is_refused() {
        let http = reqwest::Client::new;
        for (kind, base, repo, token) in [
            (ForgeKind::GitHub, "https://x", "justname", "t"),
            (ForgeKind::GitHub, "https://x", "a/b/c", "t"),
            (ForgeKind::Gitea, "https://x", "a/..", "t"),
            (ForgeKind::GitLab, "https://x", "", "t"),
            (ForgeKind::GitLab, "ftp://x", "1", "t"),
            (ForgeKind::GitLab, "https://x", "1", ""),
        ] {
            let err = ForgeClient::with_client(kind, base, repo, token, http()).unwrap_err();
            assert!(matches!(err, ForgeError::Config(_)), "{kind:?} {repo:?}: {err}");
        }
    }

    #[test]
    fn debug_redacts_the_token() {
        let text = format!("{:?}", client(ForgeKind::GitHub, "me/lab"));
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn descriptions_are_cut_at_140_characters() {
        assert_eq!(truncate_description("short"), "short");
        let exact = "é".repeat(140);
        assert_eq!(truncate_description(&exact), exact);
        let long = "é".repeat(141);
        let cut = truncate_description(&long);
        assert_eq!(cut.chars().count(), 140);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn gitlab_has_no_error_state() {
        assert_eq!(CommitState::Error.gitlab_name(), "failed");
        assert_eq!(CommitState::Failure.gitlab_name(), "failed");
        assert_eq!(CommitState::Error.github_name(), "error");
    }

    #[tokio::test]
    async fn invalid_sha_is_refused_before_any_request() {
        let c = client(ForgeKind::GitHub, "me/lab");
        for sha in ["", "abc", "../../x", "0123456789abcdefg"] {
            let err = c
                .set_status(sha, CommitState::Success, "driftless/plan", "d", None)
                .await
                .unwrap_err();
            assert!(matches!(err, ForgeError::InvalidSha(_)), "{sha}: {err}");
        }
    }
}
