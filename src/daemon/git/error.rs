//! [`GitError`], and keeping secrets out of it: every message of the git layer goes through
//! [`scrub`] (the token, the header, any password in a URL) before it can reach a log.

use std::path::PathBuf;

/// What can go wrong in the git layer. No variant holds a secret: URLs are shown through
/// [`display_url`], git's output through [`scrub`].
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot read the git token file {path}: {message}")]
    TokenFile { path: PathBuf, message: String },
    #[error("refusing to send the git token to {url}: tokens are only sent over https (or http to localhost)")]
    InsecureToken { url: String },
    #[error("git mirror {path}: {message}")]
    Mirror { path: PathBuf, message: String },
    #[error("cannot fetch {refspecs} from {url}: {message}")]
    Fetch {
        url: String,
        refspecs: String,
        message: String,
    },
    #[error("fetching {refspecs} from {url} timed out after {secs}s")]
    FetchTimeout { url: String, refspecs: String, secs: u64 },
    #[error("cannot read {what} from the mirror of {url}: {message}")]
    Read { url: String, what: String, message: String },
    #[error("cannot run `{command}`: {message}")]
    Spawn { command: String, message: String },
    #[error("`{command}` ({url}) failed with {status}: {stderr}")]
    Command {
        url: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` ({url}) timed out after {secs}s")]
    Timeout { url: String, command: String, secs: u64 },
    #[error("pushing {branch} to {url} was rejected {attempts} times (others keep pushing to it); last: {message}")]
    PushRejected {
        url: String,
        branch: String,
        attempts: u32,
        message: String,
    },
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
}

/// `scheme://user:password@host/...` with the password replaced, for messages.
pub fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:<redacted>@{host}{path}")
        }
        _ => url.to_string(),
    }
}

/// Redact the given secrets, and any password in a URL, from a message.
pub(super) fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = crate::daemon::status::redact(text, secrets);
    // Passwords in URLs (`https://user:pw@host`), wherever they appear in a message.
    let mut i = 0;
    while let Some(pos) = out[i..].find("://") {
        let start = i + pos + 3;
        let end = out[start..]
            .find(|c: char| c.is_whitespace() || c == '/' || c == '\'' || c == '"')
            .map_or(out.len(), |e| start + e);
        let authority = &out[start..end];
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            let replaced = format!("{user}:<redacted>");
            out.replace_range(start..start + userinfo.len(), &replaced);
            i = start + replaced.len();
        } else {
            i = end.max(start);
        }
        if i >= out.len() {
            break;
        }
    }
    out
}

pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_lose_secrets_and_url_passwords() {
        assert_eq!(
            display_url("https://bob:hunter2@git.example/r.git"),
            "https://bob:<redacted>@git.example/r.git"
        );
        assert_eq!(
            display_url("ssh://git@git.example/r.git"),
            "ssh://git@git.example/r.git"
        );
        let msg = "fatal: unable to access 'https://bob:hunter2@git.example/r.git/': tok3n";
        let clean = scrub(msg, &["tok3n".into()]);
        assert!(!clean.contains("hunter2") && !clean.contains("tok3n"), "{clean}");
        assert!(clean.contains("https://bob:<redacted>@git.example/r.git/"), "{clean}");
    }
}
