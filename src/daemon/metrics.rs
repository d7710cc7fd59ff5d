//! The daemon's Prometheus metrics, served as OpenMetrics text on `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `driftless_reconciles_total` | counter | `kind` (reconcile, pull_request, drift), `outcome` |
//! | `driftless_reconcile_duration_seconds` | histogram | `kind` |
//! | `driftless_drifted_guests` | gauge | |
//! | `driftless_last_applied_info` | gauge (always 1) | `revision` |
//! | `driftless_api_errors_total` | counter | `system` (proxmox, ssh, kubernetes, talos, git, secrets, repository) |
//! | `driftless_last_reconcile_timestamp_seconds` | gauge | |
//! | `driftless_leader` | gauge (1 leader, 0 follower) | |
//!
//! Every metric is an atomic behind an `Arc` inside prometheus-client, so recording takes `&self`
//! from any thread; the one compound update (switching the applied revision) holds a mutex.

use crate::ports::System;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// What a reconcile run did: the watched branch, a pull-request ref (plan only) or a drift check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReconcileKind {
    Reconcile,
    PullRequest,
    Drift,
}

impl ReconcileKind {
    pub const ALL: [ReconcileKind; 3] = [
        ReconcileKind::Reconcile,
        ReconcileKind::PullRequest,
        ReconcileKind::Drift,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileKind::Reconcile => "reconcile",
            ReconcileKind::PullRequest => "pull_request",
            ReconcileKind::Drift => "drift",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Finished and changed something (applied; for a plan or drift check: found changes).
    Success,
    /// Finished with nothing to do.
    NoChange,
    /// Failed; will be retried.
    Failure,
    /// Cannot succeed by retrying (invalid configuration): waits for a new commit.
    Stalled,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Outcome::Success, Outcome::NoChange, Outcome::Failure, Outcome::Stalled];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::NoChange => "no_change",
            Outcome::Failure => "failure",
            Outcome::Stalled => "stalled",
        }
    }
}

macro_rules! label_value_as_str {
    ($($ty:ty),*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}
label_value_as_str!(ReconcileKind, Outcome, System);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReconcileLabels {
    kind: ReconcileKind,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: ReconcileKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RevisionLabels {
    revision: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SystemLabels {
    system: System,
}

/// Reconcile durations span a no-op poll (well under a second) to a cluster bootstrap (tens of
/// minutes).
const DURATION_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The daemon's metrics and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    drifted_guests: Gauge,
    last_applied: Family<RevisionLabels, Gauge>,
    /// The revision whose `last_applied_info` series exists; held while switching.
    last_applied_revision: Mutex<Option<String>>,
    api_errors: Family<SystemLabels, Counter>,
    last_reconcile: Gauge<f64, AtomicU64>,
    leader: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "driftless_reconciles",
            "Reconcile runs by kind (reconcile, pull_request, drift) and outcome",
            reconciles.clone(),
        );
        let duration = Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "driftless_reconcile_duration",
            "How long reconcile runs took, by kind",
            Unit::Seconds,
            duration.clone(),
        );
        let drifted_guests = Gauge::default();
        registry.register(
            "driftless_drifted_guests",
            "Guests whose observed state differs from the desired state at the last drift check",
            drifted_guests.clone(),
        );
        let last_applied = Family::<RevisionLabels, Gauge>::default();
        registry.register(
            "driftless_last_applied_info",
            "The last successfully applied revision (value 1, the revision is the label)",
            last_applied.clone(),
        );
        let api_errors = Family::<SystemLabels, Counter>::default();
        registry.register(
            "driftless_api_errors",
            "Failed calls to external systems (proxmox, git, ssh)",
            api_errors.clone(),
        );
        let last_reconcile = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "driftless_last_reconcile_timestamp",
            "Unix time at which the last reconcile run of any kind finished",
            Unit::Seconds,
            last_reconcile.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "driftless_leader",
            "1 while this replica is the leader (the one that applies), 0 while it follows",
            leader.clone(),
        );

        // Known label combinations start at zero, so rates and alerts work before the first event.
        for kind in ReconcileKind::ALL {
            for outcome in Outcome::ALL {
                drop(reconciles.get_or_create(&ReconcileLabels { kind, outcome }));
            }
        }
        for system in System::ALL {
            drop(api_errors.get_or_create(&SystemLabels { system }));
        }

        Metrics {
            registry,
            reconciles,
            duration,
            drifted_guests,
            last_applied,
            last_applied_revision: Mutex::new(None),
            api_errors,
            last_reconcile,
            leader,
        }
    }

    /// Records a finished run: counts it, observes its duration, and stamps
    /// `driftless_last_reconcile_timestamp_seconds` with the current time.
    pub fn record_reconcile(&self, kind: ReconcileKind, outcome: Outcome, duration: Duration) {
        self.record_reconcile_at(kind, outcome, duration, SystemTime::now());
    }

    /// [`Metrics::record_reconcile`] with the finishing time given.
    pub fn record_reconcile_at(&self, kind: ReconcileKind, outcome: Outcome, duration: Duration, finished: SystemTime) {
        self.reconciles.get_or_create(&ReconcileLabels { kind, outcome }).inc();
        self.duration
            .get_or_create(&KindLabels { kind })
            .observe(duration.as_secs_f64());
        let unix = finished
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_reconcile.set(unix);
    }

    /// The number of drifted guests found by the last drift check.
    pub fn set_drifted_guests(&self, count: usize) {
        self.drifted_guests.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The revision just applied: its `driftless_last_applied_info` series becomes the only one.
    pub fn set_last_applied(&self, revision: &str) {
        let mut current = self.last_applied_revision.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = current.take()
            && old != revision
        {
            self.last_applied.remove(&RevisionLabels { revision: old });
        }
        self.last_applied
            .get_or_create(&RevisionLabels {
                revision: revision.to_owned(),
            })
            .set(1);
        *current = Some(revision.to_owned());
    }

    /// The revision whose `driftless_last_applied_info` series is set, if any.
    pub fn last_applied(&self) -> Option<String> {
        self.last_applied_revision
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether this replica leads (a daemon without leader election always does).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Counts a failed call to `system`.
    pub fn record_api_error(&self, system: System) {
        self.api_errors.get_or_create(&SystemLabels { system }).inc();
    }

    /// All metrics in the OpenMetrics text format (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn fresh_metrics_list_every_family_with_zeroed_counters() {
        let text = Metrics::new().encode();
        for name in [
            "# TYPE driftless_reconciles counter",
            "# TYPE driftless_reconcile_duration_seconds histogram",
            "# UNIT driftless_reconcile_duration_seconds seconds",
            "# TYPE driftless_drifted_guests gauge",
            "# TYPE driftless_last_applied_info gauge",
            "# TYPE driftless_api_errors counter",
            "# TYPE driftless_last_reconcile_timestamp_seconds gauge",
            "# TYPE driftless_leader gauge",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert!(
            text.contains("driftless_reconciles_total{kind=\"pull_request\",outcome=\"stalled\"} 0"),
            "{text}"
        );
        assert!(text.contains("driftless_api_errors_total{system=\"ssh\"} 0"), "{text}");
        assert!(!text.contains("driftless_last_applied_info{"), "{text}");
        assert!(
            text.contains("\ndriftless_leader 0\n"),
            "not leading until told: {text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn recording_updates_the_text() {
        let m = Metrics::new();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        m.record_reconcile_at(ReconcileKind::Drift, Outcome::Success, Duration::from_millis(1500), t);
        m.record_reconcile_at(ReconcileKind::Drift, Outcome::Success, Duration::from_millis(200), t);
        m.record_api_error(System::Proxmox);
        m.set_drifted_guests(3);
        let text = m.encode();
        assert_eq!(
            line(&text, "driftless_reconciles_total{kind=\"drift\",outcome=\"success\"}"),
            Some("driftless_reconciles_total{kind=\"drift\",outcome=\"success\"} 2")
        );
        assert!(
            text.contains("driftless_reconcile_duration_seconds_count{kind=\"drift\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("driftless_reconcile_duration_seconds_bucket{le=\"0.25\",kind=\"drift\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("driftless_api_errors_total{system=\"proxmox\"} 1"),
            "{text}"
        );
        assert!(text.contains("driftless_drifted_guests 3"), "{text}");
        assert!(
            text.contains("driftless_last_reconcile_timestamp_seconds 1700000000"),
            "{text}"
        );
    }

    #[test]
    fn last_applied_keeps_one_series() {
        let m = Metrics::new();
        m.set_last_applied("aaa111");
        assert!(
            m.encode()
                .contains("driftless_last_applied_info{revision=\"aaa111\"} 1")
        );
        m.set_last_applied("aaa111");
        m.set_last_applied("bbb222");
        let text = m.encode();
        assert!(
            text.contains("driftless_last_applied_info{revision=\"bbb222\"} 1"),
            "{text}"
        );
        assert!(!text.contains("aaa111"), "{text}");
        assert_eq!(m.last_applied().as_deref(), Some("bbb222"));
    }
}
