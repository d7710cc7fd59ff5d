//! What the daemon decides, as pure functions of what it knows: whether a run applies or
//! only plans, how the run ended, which revisions it leaves behind, when a failed revision is
//! tried again, and when the next poll and drift check are due. No clock is read here: times
//! come in as arguments, so every rule is unit-tested with plain values.

use super::status::{Outcome, RunKind};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The reconcile policy in force for a run: the revision's cluster.yaml `reconcile:` with the
/// daemon's own settings on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// `reconcile.suspend`: plan and report, never apply.
    pub suspend: bool,
    /// Apply drift when the drift check finds it.
    pub auto_correct: bool,
}

/// Whether a run of `kind` applies its plan.
pub fn applies(kind: RunKind, policy: Policy) -> bool {
    match kind {
        RunKind::Reconcile => !policy.suspend,
        RunKind::PullRequest => false,
        RunKind::Drift => policy.auto_correct && !policy.suspend,
    }
}

/// How a run that planned (and, if it applied, succeeded) ends.
pub fn outcome(kind: RunKind, policy: Policy, plan_is_empty: bool) -> Outcome {
    match kind {
        RunKind::PullRequest => Outcome::Planned,
        RunKind::Drift if plan_is_empty => Outcome::NoDrift,
        RunKind::Drift => Outcome::DriftFound,
        RunKind::Reconcile if policy.suspend => Outcome::Suspended,
        RunKind::Reconcile if plan_is_empty => Outcome::NoChanges,
        RunKind::Reconcile => Outcome::Applied,
    }
}

/// The revisions the daemon remembers between runs, as each report shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revisions {
    pub last_attempted: Option<String>,
    pub last_applied: Option<String>,
    /// The last revision of the watched branch that loaded: whose settings pull request
    /// plans use (`daemon::trust`).
    #[serde(default)]
    pub last_valid: Option<String>,
}

impl Revisions {
    /// After a run of `kind` on `commit` that ended with `outcome`: only reconciles move
    /// them, and a commit counts as applied when it was applied or had nothing to apply.
    pub fn after(&self, kind: RunKind, commit: &str, outcome: Outcome) -> Revisions {
        if kind != RunKind::Reconcile {
            return self.clone();
        }
        let applied = matches!(outcome, Outcome::Applied | Outcome::NoChanges);
        // An unsigned revision never becomes the one whose settings pull requests are planned with.
        let valid = !matches!(outcome, Outcome::Invalid | Outcome::Unverified);
        let this_or = |kept: &Option<String>, take: bool| if take { Some(commit.to_string()) } else { kept.clone() };
        Revisions {
            last_attempted: Some(commit.to_string()),
            last_applied: this_or(&self.last_applied, applied),
            last_valid: this_or(&self.last_valid, valid),
        }
    }
}

/// A failed revision waiting to be tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub commit: String,
    /// How many times it failed in a row.
    pub attempts: u32,
    /// How long after the failure it is tried again.
    pub backoff: Duration,
}

/// The wait before the `attempts`-th retry: 10 s doubling up to 5 min 20 s.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1 << attempts.clamp(1, 6)))
}

/// What the daemon keeps of a reconcile's `outcome` for retrying: a failure schedules a retry
/// (counting on from an earlier failure of the same commit); anything else clears it. An
/// invalid or unverified (not signed as `verify:` requires) revision is never retried: it
/// stalls until a new commit.
pub fn retry_after(previous: Option<&Retry>, commit: &str, outcome: Outcome) -> Option<Retry> {
    if outcome != Outcome::Failed {
        return None;
    }
    let attempts = previous.filter(|r| r.commit == commit).map_or(0, |r| r.attempts) + 1;
    Some(Retry {
        commit: commit.to_string(),
        attempts,
        backoff: backoff(attempts),
    })
}

/// Whether the watched branch's `head` is to be reconciled now: a commit not attempted yet,
/// or the failed one whose retry is due.
pub fn reconcile_due(revisions: &Revisions, retry_due: Option<&str>, head: &str) -> bool {
    revisions.last_attempted.as_deref() != Some(head) || retry_due == Some(head)
}

/// The poll interval: the daemon's `--poll-interval`, else the revision's
/// `reconcile.interval`, else one minute.
pub fn poll_interval(flag: Option<Duration>, repository: Option<Duration>) -> Duration {
    flag.or(repository).unwrap_or(Duration::from_secs(60))
}

/// Up to 10% of `interval`, spread by `seed` (any number that differs between daemons).
pub fn jitter(interval: Duration, seed: u32) -> Duration {
    interval.mul_f64(f64::from(seed % 1000) / 10_000.0)
}

/// How long until a 5-field crontab `schedule` fires next after `now`; `None` for a schedule
/// that does not parse or never fires.
pub fn until_next_cron(schedule: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let cron: croner::Cron = schedule.parse().ok()?;
    let next = cron.find_next_occurrence(&now, false).ok()?;
    Some((next - now).to_std().unwrap_or(Duration::ZERO))
}

/// How long until the next drift check: a fixed interval when one is set (tests, demos), else
/// the daemon's schedule, else the revision's `reconcile.drift_schedule`.
pub fn until_next_drift(
    interval: Option<Duration>,
    daemon_schedule: Option<&str>,
    repository_schedule: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Duration> {
    if let Some(d) = interval {
        return Some(d);
    }
    until_next_cron(daemon_schedule.or(repository_schedule)?, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const ALL_KINDS: [RunKind; 3] = [RunKind::Reconcile, RunKind::PullRequest, RunKind::Drift];

    #[test]
    fn only_the_watched_branch_applies_and_drift_only_with_auto_correct() {
        let plain = Policy::default();
        assert!(applies(RunKind::Reconcile, plain));
        assert!(!applies(RunKind::PullRequest, plain));
        assert!(!applies(RunKind::Drift, plain));
        let correcting = Policy {
            auto_correct: true,
            ..plain
        };
        assert!(applies(RunKind::Drift, correcting));
        assert!(!applies(RunKind::PullRequest, correcting));
        let suspended = Policy {
            suspend: true,
            auto_correct: true,
        };
        for kind in ALL_KINDS {
            assert!(!applies(kind, suspended), "{kind:?} applies while suspended");
        }
    }

    #[test]
    fn outcomes_say_what_the_plan_meant_for_each_kind() {
        let p = Policy::default();
        assert_eq!(outcome(RunKind::Reconcile, p, false), Outcome::Applied);
        assert_eq!(outcome(RunKind::Reconcile, p, true), Outcome::NoChanges);
        assert_eq!(outcome(RunKind::PullRequest, p, false), Outcome::Planned);
        assert_eq!(outcome(RunKind::PullRequest, p, true), Outcome::Planned);
        assert_eq!(outcome(RunKind::Drift, p, false), Outcome::DriftFound);
        assert_eq!(outcome(RunKind::Drift, p, true), Outcome::NoDrift);
        let suspended = Policy { suspend: true, ..p };
        assert_eq!(outcome(RunKind::Reconcile, suspended, false), Outcome::Suspended);
        assert_eq!(outcome(RunKind::Drift, suspended, false), Outcome::DriftFound);
    }

    #[test]
    fn only_a_reconcile_moves_the_revisions_and_only_success_counts_as_applied() {
        let before = Revisions {
            last_attempted: Some("a".into()),
            last_applied: Some("a".into()),
            last_valid: Some("a".into()),
        };
        let applied = before.after(RunKind::Reconcile, "b", Outcome::Applied);
        assert_eq!(applied.last_attempted.as_deref(), Some("b"));
        assert_eq!(applied.last_applied.as_deref(), Some("b"));
        let unchanged = before.after(RunKind::Reconcile, "b", Outcome::NoChanges);
        assert_eq!(unchanged.last_applied.as_deref(), Some("b"));
        for outcome in [
            Outcome::Failed,
            Outcome::Invalid,
            Outcome::Suspended,
            Outcome::Unverified,
        ] {
            let r = before.after(RunKind::Reconcile, "b", outcome);
            assert_eq!(r.last_attempted.as_deref(), Some("b"), "{outcome:?}");
            assert_eq!(r.last_applied.as_deref(), Some("a"), "{outcome:?}");
        }
        // A revision that loaded is the one pull requests are planned with, applied or not.
        assert_eq!(
            before
                .after(RunKind::Reconcile, "b", Outcome::Failed)
                .last_valid
                .as_deref(),
            Some("b")
        );
        for outcome in [Outcome::Invalid, Outcome::Unverified] {
            let r = before.after(RunKind::Reconcile, "b", outcome);
            assert_eq!(r.last_valid.as_deref(), Some("a"), "{outcome:?}");
        }
        assert_eq!(before.after(RunKind::PullRequest, "pr", Outcome::Planned), before);
        assert_eq!(before.after(RunKind::Drift, "a", Outcome::DriftFound), before);
    }

    #[test]
    fn a_failure_backs_off_doubling_and_a_new_commit_starts_over() {
        let first = retry_after(None, "c1", Outcome::Failed).unwrap();
        assert_eq!((first.attempts, first.backoff), (1, Duration::from_secs(10)));
        let second = retry_after(Some(&first), "c1", Outcome::Failed).unwrap();
        assert_eq!((second.attempts, second.backoff), (2, Duration::from_secs(20)));
        let mut r = second;
        for _ in 0..10 {
            r = retry_after(Some(&r), "c1", Outcome::Failed).unwrap();
        }
        assert_eq!(r.backoff, Duration::from_secs(320), "capped");
        let other = retry_after(Some(&r), "c2", Outcome::Failed).unwrap();
        assert_eq!(other.attempts, 1, "a new commit starts over");
        assert_eq!(retry_after(Some(&r), "c1", Outcome::Applied), None);
        assert_eq!(
            retry_after(Some(&r), "c1", Outcome::Invalid),
            None,
            "an invalid revision stalls"
        );
        assert_eq!(
            retry_after(Some(&r), "c1", Outcome::Unverified),
            None,
            "an unsigned revision stalls too"
        );
    }

    #[test]
    fn a_head_is_reconciled_once_unless_its_retry_is_due() {
        let seen = Revisions {
            last_attempted: Some("c1".into()),
            ..Revisions::default()
        };
        assert!(!reconcile_due(&seen, None, "c1"));
        assert!(reconcile_due(&seen, Some("c1"), "c1"));
        assert!(reconcile_due(&seen, None, "c2"));
        assert!(reconcile_due(&Revisions::default(), None, "c1"));
    }

    #[test]
    fn intervals_and_schedules() {
        let m = Duration::from_secs(60);
        assert_eq!(poll_interval(None, None), m);
        assert_eq!(poll_interval(None, Some(5 * m)), 5 * m);
        assert_eq!(poll_interval(Some(m / 2), Some(5 * m)), m / 2);
        assert_eq!(jitter(m, 0), Duration::ZERO);
        assert!(jitter(m, 999) < m / 10);
        assert_eq!(jitter(m, 500), Duration::from_secs(3));

        let now = chrono::Utc.with_ymd_and_hms(2026, 12, 5, 10, 30, 0).unwrap();
        assert_eq!(until_next_cron("0 */6 * * *", now), Some(Duration::from_secs(90 * 60)));
        assert_eq!(until_next_cron("not cron", now), None);
        assert_eq!(
            until_next_drift(Some(Duration::from_secs(5)), Some("0 * * * *"), None, now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            until_next_drift(None, Some("0 * * * *"), Some("0 */6 * * *"), now),
            Some(Duration::from_secs(30 * 60)),
            "the daemon's schedule wins over the repository's"
        );
        assert_eq!(
            until_next_drift(None, None, Some("0 */6 * * *"), now),
            Some(Duration::from_secs(90 * 60))
        );
        assert_eq!(until_next_drift(None, None, None, now), None);
    }
}
