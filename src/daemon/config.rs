//! The daemon's settings: a small YAML file, each key also a flag and a `DRIFTLESS_*`
//! variable (flags win over the file).

use crate::daemon::forge::ForgeKind;
use crate::daemon::policy::Policy;
use crate::daemon::verify::{VerifyMode, VerifySettings};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config file. Every key is optional here; defaults are applied in `DaemonSettings`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonFile {
    pub repository: Option<String>,
    pub branch: Option<String>,
    pub poll_interval: Option<String>,
    pub status_branch: Option<String>,
    #[serde(default)]
    pub plan_refs: Vec<String>,
    pub drift_schedule: Option<String>,
    pub auto_correct: Option<bool>,
    pub listen: Option<String>,
    pub webhook_secret_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub ssh_key: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub plan_token_file: Option<PathBuf>,
    pub forge: Option<ForgeFile>,
    pub run_timeout: Option<String>,
    pub plan_timeout: Option<String>,
    pub worker_memory: Option<String>,
    pub verify: Option<VerifyFile>,
    /// What the repository may not set (daemon::policy).
    pub policy: Option<Policy>,
    /// One leader among replicas (daemon::leader); absent: a single replica that always leads.
    pub leader_election: Option<LeaderElectionFile>,
}

/// `leader_election:`: replicas elect one leader through a Kubernetes Lease.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElectionFile {
    /// The cluster holding the Lease; absent: the pod's service account (in-cluster).
    pub kubeconfig_file: Option<PathBuf>,
    /// [default: the kubeconfig context's namespace, in-cluster the pod's]
    pub namespace: Option<String>,
    /// The Lease's name [default: driftless].
    pub name: Option<String>,
    /// This replica's name in the Lease [default: hostname-pid].
    pub identity: Option<String>,
    /// How long a lease not seen renewed stays another replica's [default: 15s].
    pub lease_duration: Option<String>,
    /// How long the leader keeps leading without a successful renewal [default: 10s].
    pub renew_deadline: Option<String>,
    /// How often the lease is read and renewed or tried [default: 2s].
    pub retry_period: Option<String>,
}

/// `verify:`: apply only commits signed by these keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyFile {
    /// head | all [default: head]
    pub mode: Option<String>,
    /// git's allowed-signers format (gpg.ssh.allowedSignersFile).
    pub allowed_signers: Option<PathBuf>,
    /// Armored OpenPGP public keys (`gpg --export --armor`).
    #[serde(default)]
    pub openpgp_keys: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgeFile {
    /// gitea | forgejo | github | gitlab
    pub kind: String,
    /// API root: https://api.github.com, https://git.example/api/v1, https://gitlab.example/api/v4
    pub api: String,
    /// owner/name (GitLab: project id or path)
    pub repo: String,
    pub token_file: PathBuf,
}

/// What the daemon's flags said (`None` where not given); the config file fills the rest.
#[derive(Debug, Clone, Default)]
pub struct DaemonFlags {
    /// Daemon config file (YAML; keys as the flags below, with `_` for `-`).
    pub config: Option<PathBuf>,
    /// The infrastructure repository: https://, ssh://, file:// URL or a local path.
    pub repository: Option<String>,
    /// The branch to apply [default: main].
    pub branch: Option<String>,
    /// How often to fetch, e.g. 30s, 5m [default: cluster.yaml reconcile.interval, else 1m]; up to
    /// 10% random jitter is added.
    pub poll_interval: Option<String>,
    /// Where status reports are committed [default: driftless/status]; never a watched branch.
    pub status_branch: Option<String>,
    /// Refs to plan but never apply (repeatable): refs/heads/pr/*, refs/pull/*/head,
    /// refs/merge-requests/*/head.
    pub plan_refs: Vec<String>,
    /// Drift check schedule, crontab syntax [default: cluster.yaml reconcile.drift_schedule].
    pub drift_schedule: Option<String>,
    /// Run the drift check at this interval instead of a cron schedule (for tests and demos).
    pub drift_interval: Option<String>,
    /// Apply drift when found [default: cluster.yaml reconcile.auto_correct].
    pub auto_correct: Option<bool>,
    /// Address for /healthz, /readyz, /metrics and /webhook [default: 127.0.0.1:9090].
    pub listen: Option<String>,
    /// File holding the webhook secret (GitHub, Gitea/Forgejo HMAC or GitLab token); webhooks
    /// are off without it.
    pub webhook_secret_file: Option<PathBuf>,
    /// Where the daemon keeps its mirror of the repository [default: ./driftless-state].
    pub state_dir: Option<PathBuf>,
    /// SSH key for ssh:// repositories.
    pub ssh_key: Option<PathBuf>,
    /// known_hosts for ssh:// repositories (host keys are always checked).
    pub known_hosts: Option<PathBuf>,
    /// File holding a token for https:// repositories.
    pub token_file: Option<PathBuf>,
    /// A read-only Proxmox token for pull request plans.
    pub plan_token_file: Option<PathBuf>,
    /// How long one reconcile or drift check may take [default: 1h].
    pub run_timeout: Option<String>,
    /// How long one pull request plan may take [default: 10m].
    pub plan_timeout: Option<String>,
    /// The most memory one run's worker process may use [default: 2GiB].
    pub worker_memory: Option<String>,
    /// Which commits must be signed: head (the revision applied) or all (every new commit).
    pub verify_mode: Option<String>,
    /// Apply only commits signed by a key in this allowed-signers file (git's format).
    pub verify_allowed_signers: Option<PathBuf>,
    /// Apply only commits signed by one of these armored OpenPGP public keys (repeatable).
    pub verify_openpgp_keys: Vec<PathBuf>,
}

/// The resolved settings; serialisable because each run's worker process gets them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DaemonSettings {
    pub repository: String,
    pub branch: String,
    pub poll_interval: Option<Duration>,
    pub status_branch: String,
    pub plan_refs: Vec<String>,
    pub drift_schedule: Option<String>,
    pub drift_interval: Option<Duration>,
    pub auto_correct: Option<bool>,
    pub listen: String,
    pub webhook_secret_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub ssh_key: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// A read-only Proxmox token for pull request plans.
    #[serde(default)]
    pub plan_token_file: Option<PathBuf>,
    pub forge: Option<(ForgeKind, String, String, PathBuf)>,
    /// The bounds of one run: a reconcile or drift check, a pull request plan (untrusted
    /// input: shorter), and the worker's address space.
    #[serde(default = "RunLimits::default")]
    pub limits: RunLimits,
    /// Signed commits: off when `None`.
    #[serde(default)]
    pub verify: Option<VerifySettings>,
    /// What the repository may not set, whoever pushes it.
    #[serde(default)]
    pub policy: Policy,
    /// How each run's worker process logs (the daemon's `--log-format`); `None` keeps runs
    /// silent (the quickstart prints the status reports instead).
    #[serde(default)]
    pub log_format: Option<crate::settings::LogFormat>,
    /// One leader among replicas: `None` runs alone, always leading.
    #[serde(default)]
    pub leader_election: Option<LeaderElection>,
}

/// The resolved `leader_election:`; the timing follows client-go's leaderelection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderElection {
    pub kubeconfig_file: Option<PathBuf>,
    /// `None`: the client's default namespace.
    pub namespace: Option<String>,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// What one run may take before it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunLimits {
    /// A reconcile or drift check of the watched branch (an apply with its gates).
    pub run_timeout: Duration,
    /// A pull request plan: it only reads, and its content is untrusted.
    pub plan_timeout: Duration,
    /// After SIGTERM, how long a worker has to stop between two steps before it is killed.
    pub stop_grace: Duration,
    /// The worker's address-space limit, in bytes (RLIMIT_AS).
    pub worker_memory: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            run_timeout: Duration::from_secs(3600),
            plan_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(60),
            worker_memory: 2 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the daemon config {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no repository: give --repository, DRIFTLESS_REPOSITORY or `repository:` in the config file")]
    NoRepository,
    #[error("`{value}` is not a duration (write it like 30s, 5m or 1h)")]
    Duration { value: String },
    #[error("the status branch `{0}` is the watched branch: reports would trigger reconciles")]
    StatusIsWatched(String),
    #[error("unknown forge kind `{0}` (gitea, forgejo, github, gitlab)")]
    ForgeKind(String),
    #[error("`{value}` is not a size (write it like 512MiB or 2GiB)")]
    Size { value: String },
    #[error("{0}")]
    Policy(String),
    #[error("unknown verify mode `{0}` (head, all)")]
    VerifyMode(String),
    #[error(
        "verify: names no key: give `allowed_signers:` or `openpgp_keys:` (--verify-allowed-signers, --verify-openpgp-keys)"
    )]
    VerifyWithoutKeys,
    #[error("leader_election: {0}")]
    LeaderElection(String),
}

fn duration(s: &str) -> Result<Duration, ConfigError> {
    crate::model::parse_duration(s)
        .map(Duration::from_secs)
        .ok_or_else(|| ConfigError::Duration { value: s.into() })
}

fn read_file(path: &Path) -> Result<DaemonFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.into(),
        message: e.to_string(),
    })?;
    yaml_serde::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

impl DaemonFlags {
    fn limits(&self, file: &DaemonFile) -> Result<RunLimits, ConfigError> {
        let defaults = RunLimits::default();
        let time = |flag: &Option<String>, key: &Option<String>, default| {
            flag.as_ref()
                .or(key.as_ref())
                .map(|s| duration(s))
                .transpose()
                .map(|d| d.unwrap_or(default))
        };
        let worker_memory = match self.worker_memory.as_ref().or(file.worker_memory.as_ref()) {
            None => defaults.worker_memory,
            Some(s) => crate::model::schema::Size::parse(s)
                .map(|size| size.mib << 20)
                .map_err(|_| ConfigError::Size { value: s.clone() })?,
        };
        Ok(RunLimits {
            run_timeout: time(&self.run_timeout, &file.run_timeout, defaults.run_timeout)?,
            plan_timeout: time(&self.plan_timeout, &file.plan_timeout, defaults.plan_timeout)?,
            stop_grace: defaults.stop_grace,
            worker_memory,
        })
    }

    pub fn resolve(&self) -> Result<DaemonSettings, ConfigError> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => DaemonFile::default(),
        };
        let limits = self.limits(&file)?;
        let repository = self
            .repository
            .clone()
            .or(file.repository)
            .ok_or(ConfigError::NoRepository)?;
        let branch = self.branch.clone().or(file.branch).unwrap_or_else(|| "main".into());
        let status_branch = self
            .status_branch
            .clone()
            .or(file.status_branch)
            .unwrap_or_else(|| "driftless/status".into());
        if status_branch == branch {
            return Err(ConfigError::StatusIsWatched(status_branch));
        }
        let poll_interval = self
            .poll_interval
            .clone()
            .or(file.poll_interval)
            .map(|s| duration(&s))
            .transpose()?;
        let forge = match file.forge {
            None => None,
            Some(f) => {
                let kind = match f.kind.as_str() {
                    "gitea" | "forgejo" => ForgeKind::Gitea,
                    "github" => ForgeKind::GitHub,
                    "gitlab" => ForgeKind::GitLab,
                    other => return Err(ConfigError::ForgeKind(other.into())),
                };
                Some((kind, f.api, f.repo, f.token_file))
            }
        };
        let verify = self.verify_settings(file.verify)?;
        let policy = file.policy.unwrap_or_default();
        policy.check().map_err(ConfigError::Policy)?;
        let leader_election = file.leader_election.map(leader_election).transpose()?;
        Ok(DaemonSettings {
            repository,
            branch,
            poll_interval,
            status_branch,
            plan_refs: if self.plan_refs.is_empty() {
                file.plan_refs
            } else {
                self.plan_refs.clone()
            },
            drift_schedule: self.drift_schedule.clone().or(file.drift_schedule),
            drift_interval: self.drift_interval.as_deref().map(duration).transpose()?,
            auto_correct: self.auto_correct.or(file.auto_correct),
            listen: self
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:9090".into()),
            webhook_secret_file: self.webhook_secret_file.clone().or(file.webhook_secret_file),
            state_dir: self
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from("driftless-state")),
            ssh_key: self.ssh_key.clone().or(file.ssh_key),
            known_hosts: self.known_hosts.clone().or(file.known_hosts),
            token_file: self.token_file.clone().or(file.token_file),
            plan_token_file: self.plan_token_file.clone().or(file.plan_token_file),
            forge,
            limits,
            verify,
            policy,
            log_format: None,
            leader_election,
        })
    }

    /// `verify:` with the flags on top, key by key; off when neither says anything.
    fn verify_settings(&self, file: Option<VerifyFile>) -> Result<Option<VerifySettings>, ConfigError> {
        let said = file.is_some()
            || self.verify_mode.is_some()
            || self.verify_allowed_signers.is_some()
            || !self.verify_openpgp_keys.is_empty();
        if !said {
            return Ok(None);
        }
        let file = file.unwrap_or_default();
        let mode = match self.verify_mode.clone().or(file.mode) {
            None => VerifyMode::default(),
            Some(m) => VerifyMode::parse(&m).ok_or(ConfigError::VerifyMode(m))?,
        };
        let settings = VerifySettings {
            mode,
            allowed_signers: self.verify_allowed_signers.clone().or(file.allowed_signers),
            openpgp_keys: if self.verify_openpgp_keys.is_empty() {
                file.openpgp_keys
            } else {
                self.verify_openpgp_keys.clone()
            },
        };
        // A `verify:` that names no key would stall every revision: refused at start instead.
        if settings.allowed_signers.is_none() && settings.openpgp_keys.is_empty() {
            return Err(ConfigError::VerifyWithoutKeys);
        }
        Ok(Some(settings))
    }
}

/// `leader_election:` with its defaults, checked as client-go checks its timing: a leader must
/// give up before another replica may take over (renew_deadline < lease_duration), and must be
/// able to try more than once before that (retry_period < renew_deadline).
fn leader_election(file: LeaderElectionFile) -> Result<LeaderElection, ConfigError> {
    let time = |key: &Option<String>, default: u64| {
        key.as_deref()
            .map(duration)
            .transpose()
            .map(|d| d.unwrap_or(Duration::from_secs(default)))
    };
    let lease_duration = time(&file.lease_duration, 15)?;
    let renew_deadline = time(&file.renew_deadline, 10)?;
    let retry_period = time(&file.retry_period, 2)?;
    let problem = |m: &str| Err(ConfigError::LeaderElection(m.into()));
    if retry_period.is_zero() {
        return problem("retry_period must be at least 1s");
    }
    if renew_deadline <= retry_period {
        return problem("renew_deadline must be longer than retry_period");
    }
    if lease_duration <= renew_deadline {
        return problem("lease_duration must be longer than renew_deadline");
    }
    let name = file.name.unwrap_or_else(|| "driftless".into());
    if !crate::daemon::leader::valid_name(&name) {
        return problem("name must be a Kubernetes object name (lower-case letters, digits, '-' and '.')");
    }
    if let Some(ns) = &file.namespace
        && !crate::daemon::leader::valid_name(ns)
    {
        return problem("namespace must be a Kubernetes namespace name");
    }
    let identity = match file.identity {
        Some(i) if i.trim().is_empty() => return problem("identity must not be empty"),
        Some(i) => i,
        None => crate::daemon::leader::default_identity(),
    };
    Ok(LeaderElection {
        kubeconfig_file: file.kubeconfig_file,
        namespace: file.namespace,
        name,
        identity,
        lease_duration,
        renew_deadline,
        retry_period,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_config(yaml: &str, flags: DaemonFlags) -> Result<DaemonSettings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.yaml");
        std::fs::write(&path, yaml).unwrap();
        DaemonFlags {
            config: Some(path),
            repository: Some("file:///srv/homelab.git".into()),
            ..flags
        }
        .resolve()
    }

    #[test]
    fn verify_comes_from_the_file_with_flags_on_top_and_is_off_unless_asked() {
        let s = with_config("branch: main\n", DaemonFlags::default()).unwrap();
        assert_eq!(s.verify, None);
        let yaml = "verify:\n  mode: all\n  allowed_signers: /etc/driftless/allowed_signers\n  openpgp_keys: [/etc/driftless/bob.asc]\n";
        let v = with_config(yaml, DaemonFlags::default()).unwrap().verify.unwrap();
        assert_eq!(v.mode, VerifyMode::All);
        assert_eq!(v.allowed_signers, Some(PathBuf::from("/etc/driftless/allowed_signers")));
        assert_eq!(v.openpgp_keys, vec![PathBuf::from("/etc/driftless/bob.asc")]);
        let flags = DaemonFlags {
            verify_mode: Some("head".into()),
            verify_openpgp_keys: vec!["/keys/carol.asc".into()],
            ..DaemonFlags::default()
        };
        let v = with_config(yaml, flags).unwrap().verify.unwrap();
        assert_eq!(v.mode, VerifyMode::Head);
        assert_eq!(v.openpgp_keys, vec![PathBuf::from("/keys/carol.asc")]);
        assert_eq!(v.allowed_signers, Some(PathBuf::from("/etc/driftless/allowed_signers")));
        let only_flag = DaemonFlags {
            verify_allowed_signers: Some("/keys/allowed".into()),
            ..DaemonFlags::default()
        };
        let v = with_config("{}\n", only_flag).unwrap().verify.unwrap();
        assert_eq!(v.mode, VerifyMode::Head, "head by default");
        // The worker gets them through JSON.
        let s = with_config(yaml, DaemonFlags::default()).unwrap();
        let back: DaemonSettings = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.verify, s.verify);
    }

    #[test]
    fn a_verify_that_names_no_key_or_an_unknown_mode_is_refused() {
        assert!(matches!(
            with_config("verify:\n  mode: all\n", DaemonFlags::default()),
            Err(ConfigError::VerifyWithoutKeys)
        ));
        assert!(matches!(
            with_config("verify:\n  mode: every\n  allowed_signers: /a\n", DaemonFlags::default()),
            Err(ConfigError::VerifyMode(m)) if m == "every"
        ));
        assert!(matches!(
            with_config("verify:\n  allowed_signer: /a\n", DaemonFlags::default()),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn leader_election_is_off_unless_asked_and_its_timing_must_let_a_leader_step_down_first() {
        assert_eq!(
            with_config("branch: main\n", DaemonFlags::default())
                .unwrap()
                .leader_election,
            None
        );
        let yaml = "leader_election:\n  kubeconfig_file: /etc/driftless/lease.kubeconfig\n  namespace: infra\n  identity: pve1\n";
        let l = with_config(yaml, DaemonFlags::default())
            .unwrap()
            .leader_election
            .unwrap();
        assert_eq!(
            l.kubeconfig_file,
            Some(PathBuf::from("/etc/driftless/lease.kubeconfig"))
        );
        assert_eq!(
            (l.namespace.as_deref(), l.name.as_str(), l.identity.as_str()),
            (Some("infra"), "driftless", "pve1")
        );
        assert_eq!(
            (l.lease_duration, l.renew_deadline, l.retry_period),
            (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2))
        );
        let l = with_config("leader_election: {}\n", DaemonFlags::default())
            .unwrap()
            .leader_election
            .unwrap();
        assert!(!l.identity.is_empty(), "an identity by default");
        for (bad, says) in [
            (
                "leader_election: {lease_duration: 10s, renew_deadline: 10s}\n",
                "lease_duration",
            ),
            ("leader_election: {renew_deadline: 2s}\n", "renew_deadline"),
            ("leader_election: {name: Not_A_Name}\n", "name"),
            ("leader_election: {identity: ' '}\n", "identity"),
        ] {
            let err = with_config(bad, DaemonFlags::default()).unwrap_err();
            assert!(
                matches!(&err, ConfigError::LeaderElection(m) if m.contains(says)),
                "{bad}: {err}"
            );
        }
        assert!(matches!(
            with_config("leader_election: {kubeconfig: /x}\n", DaemonFlags::default()),
            Err(ConfigError::Parse { .. })
        ));
    }
}
