//! One leader among daemon replicas, elected through a Kubernetes Lease
//! (`coordination.k8s.io/v1`) the way client-go's leaderelection does it.
//!
//! Every replica reads the Lease each `retry_period`. The leader writes its `renewTime`; a
//! follower takes the Lease over once it has seen the Lease's record unchanged for the lease's
//! duration. "Seen unchanged" is timed on this replica's own monotonic clock from the moment it
//! observed the record change, never from the timestamps written in it, so replicas whose
//! clocks disagree still agree on when a lease expired. Every write is a create (409 when
//! another replica created it first) or a replace carrying the `resourceVersion` read (409 when
//! another replica wrote in between): two replicas can never both win one round.
//!
//! A replica leads from the start of a successful write until `renew_deadline` after it; the
//! others cannot take over before `lease_duration` after they saw that write, which is later.
//! So a leader that cannot renew steps down (starts no run, stops the one under way between two
//! steps) before any other replica may start.
//!
//! [`Elector`] is the pure decision (times come in as arguments); [`run`] is the loop around
//! kube-rs `Api<Lease>`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use super::config::LeaderElection;
use super::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Never the file's text: a kubeconfig holds credentials.
    #[error("cannot read the leader election kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no kubeconfig_file and not running in a Kubernetes pod: {0}")]
    InCluster(String),
    #[error("the Kubernetes client for leader election: {0}")]
    Client(String),
}

/// What this replica is, as the election last decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Leader,
    /// `leader`: the Lease's holder as last read, if any.
    Follower {
        leader: Option<String>,
    },
}

/// The role, shared by the election loop (which sets it), the daemon loop (which starts runs
/// only while leading) and the HTTP server (which reports it).
#[derive(Debug)]
pub struct Leadership {
    pub identity: String,
    role: watch::Sender<Role>,
}

impl Leadership {
    pub fn new(identity: &str) -> Arc<Leadership> {
        Arc::new(Leadership {
            identity: identity.to_string(),
            role: watch::Sender::new(Role::Follower { leader: None }),
        })
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.role.borrow() == Role::Leader
    }

    /// Changes of the role, for the daemon loop to poll at once when it starts leading.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    pub(crate) fn set(&self, role: Role) {
        self.role.send_if_modified(|r| {
            let changed = *r != role;
            *r = role;
            changed
        });
    }

    /// Completes never; sets `run_stop` once this replica stops leading or `stop` is set, so
    /// a run started as leader ends between two steps (see `worker::run_in_worker`).
    pub async fn stop_run_unless_leading(&self, stop: &AtomicBool, run_stop: &AtomicBool) {
        let mut roles = self.subscribe();
        loop {
            let stopping = stop.load(Ordering::SeqCst);
            if stopping || !self.is_leader() {
                let already = run_stop.swap(true, Ordering::SeqCst);
                if !already && !stopping {
                    tracing::warn!("no longer the leader: stopping the run between two steps");
                }
            }
            // A shutdown sets `stop` without a role change: look again now and then.
            let _ = tokio::time::timeout(Duration::from_millis(200), roles.changed()).await;
        }
    }
}

/// What to do with the Lease as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// There is no Lease: create it naming this replica.
    Create(LeaseSpec),
    /// Replace the Lease read with this record (with the `resourceVersion` read): a renewal
    /// when this replica holds it, else a takeover of an expired or released lease.
    Update(LeaseSpec),
    /// Another replica holds the Lease, and it was seen renewed within its duration.
    Follow { holder: String },
}

/// The election's state on one replica: what it last saw of the Lease and when, and when its
/// last successful write began. Pure: every time is an argument.
#[derive(Debug, Clone)]
pub struct Elector {
    identity: String,
    lease_duration: Duration,
    renew_deadline: Duration,
    /// The record last read (`None`: no Lease) and when this replica saw it become that.
    observed: Option<(Option<LeaseSpec>, Instant)>,
    /// When the last successful write of this replica began.
    renewed: Option<Instant>,
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

impl Elector {
    pub fn new(identity: &str, lease_duration: Duration, renew_deadline: Duration) -> Elector {
        Elector {
            identity: identity.to_string(),
            lease_duration,
            renew_deadline,
            observed: None,
            renewed: None,
        }
    }

    /// Decide on the Lease's record as read at `now` (monotonic); `wall` is only written into
    /// the record, for people reading the Lease.
    pub fn decide(&mut self, read: Option<&LeaseSpec>, now: Instant, wall: Timestamp) -> Action {
        let unchanged = self.observed.as_ref().is_some_and(|(seen, _)| seen.as_ref() == read);
        if !unchanged {
            self.observed = Some((read.cloned(), now));
        }
        let seen_at = self.observed.as_ref().map_or(now, |(_, at)| *at);
        let stamp = Some(MicroTime(wall));
        let mine = |acquire_time, transitions| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds(self.lease_duration)),
            acquire_time,
            renew_time: stamp.clone(),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let Some(record) = read else {
            return Action::Create(mine(stamp.clone(), 0));
        };
        let transitions = record.lease_transitions.unwrap_or(0);
        match record.holder_identity.as_deref().filter(|h| !h.is_empty()) {
            Some(holder) if holder == self.identity => Action::Update(mine(record.acquire_time.clone(), transitions)),
            Some(holder) => {
                // The holder's own promise, else ours; never less than a second.
                let duration = record
                    .lease_duration_seconds
                    .filter(|s| *s > 0)
                    .map_or(self.lease_duration, |s| Duration::from_secs(s.unsigned_abs().into()));
                if now < seen_at + duration {
                    Action::Follow {
                        holder: holder.to_string(),
                    }
                } else {
                    Action::Update(mine(stamp.clone(), transitions.saturating_add(1)))
                }
            }
            // Released by a leader that shut down: free at once.
            None => Action::Update(mine(stamp.clone(), transitions.saturating_add(1))),
        }
    }

    /// The write decided at `started` (before the Lease was read) succeeded: the record is
    /// ours, as written.
    pub fn wrote(&mut self, written: &LeaseSpec, started: Instant) {
        self.renewed = Some(started);
        self.observed = Some((Some(written.clone()), started));
    }

    /// Leading: a write of ours began less than `renew_deadline` ago.
    pub fn is_leader(&self, now: Instant) -> bool {
        self.leading_until().is_some_and(|until| now < until)
    }

    /// When the lead given by the last successful write lapses.
    pub fn leading_until(&self) -> Option<Instant> {
        self.renewed.map(|at| at + self.renew_deadline)
    }

    /// Leading no more (a write of ours lost a race, or the daemon is stopping).
    pub fn step_down(&mut self) {
        self.renewed = None;
    }
}

/// A Kubernetes object name (RFC 1123 subdomain), for the Lease's name and namespace.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// `HOSTNAME-PID`: unique among replicas (a pod's hostname is its name; two daemons on one
/// host differ by pid).
pub fn default_identity() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "driftless".to_string()
    };
    format!("{host}-{}", std::process::id())
}

/// The client for the Lease's cluster, and the namespace to use.
pub async fn client(settings: &LeaderElection) -> Result<(kube::Client, String), LeaderError> {
    let mut config = match &settings.kubeconfig_file {
        Some(path) => {
            let failed = |message: String| LeaderError::Kubeconfig {
                path: path.clone(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| failed(e.kind().to_string()))?;
            // A YAML error may quote the file, which holds credentials: not passed on.
            let kubeconfig =
                kube::config::Kubeconfig::from_yaml(&text).map_err(|_| failed("not valid kubeconfig YAML".into()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| failed(format!("unusable context: {}", redacted_kubeconfig_error(&e))))?
        }
        None => kube::Config::incluster().map_err(|e| LeaderError::InCluster(e.to_string()))?,
    };
    // A request that hangs must not outlive the renew deadline.
    config.connect_timeout = Some(settings.retry_period);
    config.read_timeout = Some(settings.renew_deadline);
    config.write_timeout = Some(settings.renew_deadline);
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).map_err(|e| LeaderError::Client(e.to_string()))?;
    Ok((client, namespace))
}

fn redacted_kubeconfig_error(e: &kube::config::KubeconfigError) -> String {
    use kube::config::KubeconfigError as E;
    match e {
        E::Parse(_) | E::LoadClientKey(_) => "its credentials cannot be read".into(),
        other => other.to_string(),
    }
}

/// One round: read the Lease, decide, write. The holder as now known, if any.
async fn attempt(
    api: &Api<Lease>,
    name: &str,
    elector: &mut Elector,
    started: Instant,
) -> Result<Option<String>, kube::Error> {
    let lease = api.get_opt(name).await?;
    let read = lease.as_ref().map(|l| l.spec.clone().unwrap_or_default());
    let action = elector.decide(read.as_ref(), Instant::now(), Timestamp::now());
    let written = match action {
        Action::Follow { holder } => return Ok(Some(holder)),
        Action::Create(spec) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec.clone()),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| spec)
        }
        Action::Update(spec) => {
            let mut lease = lease.expect("an update follows a read lease");
            lease.spec = Some(spec.clone());
            // The resourceVersion read stays in the metadata: a write in between is a 409.
            api.replace(name, &PostParams::default(), &lease).await.map(|_| spec)
        }
    };
    match written {
        Ok(spec) => {
            elector.wrote(&spec, started);
            Ok(spec.holder_identity)
        }
        // Another replica created or wrote the Lease first: it won this round.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            elector.step_down();
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Run the election until `done` (the daemon loop ended: its last run is over), publishing the
/// role in `leadership` and the `driftless_leader` gauge; then release the Lease if this replica
/// holds it, so the next leader starts at once and never beside a run of ours.
pub async fn run(
    settings: LeaderElection,
    client: kube::Client,
    namespace: String,
    leadership: Arc<Leadership>,
    metrics: Arc<Metrics>,
    mut done: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = settings.name.as_str();
    let mut elector = Elector::new(&settings.identity, settings.lease_duration, settings.renew_deadline);
    tracing::info!(lease = %format!("{namespace}/{name}"), identity = %settings.identity, "leader election started");
    let mut leader = None::<String>;
    let mut errors_in_a_row = 0u32;
    while !*done.borrow() {
        let started = Instant::now();
        // A leader's attempt may not outlast its lead: the role must lapse on time.
        let limit = elector
            .leading_until()
            .filter(|until| *until > started)
            .map_or(settings.renew_deadline, |until| until - started);
        match tokio::time::timeout(limit, attempt(&api, name, &mut elector, started)).await {
            Ok(Ok(holder)) => {
                errors_in_a_row = 0;
                if holder.is_some() {
                    leader = holder;
                }
            }
            Ok(Err(e)) => {
                errors_in_a_row += 1;
                // Once per outage at warn; the rest at debug.
                if errors_in_a_row == 1 {
                    tracing::warn!(error = %e, "cannot read or write the leader election Lease");
                } else {
                    tracing::debug!(error = %e, "cannot read or write the leader election Lease");
                }
                metrics.record_api_error(crate::ports::System::Kubernetes);
            }
            Err(_) => tracing::warn!("the leader election Lease did not answer in time"),
        }
        publish(&elector, &leadership, &metrics, leader.clone());
        // The next round, or the moment the role lapses, whichever is first.
        let mut next = started + settings.retry_period;
        if let Some(until) = elector.leading_until().filter(|u| *u > Instant::now()) {
            next = next.min(until);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            changed = done.changed() => {
                // The daemon is gone without saying so: nothing left to lead.
                if changed.is_err() {
                    break;
                }
            }
        }
        publish(&elector, &leadership, &metrics, leader.clone());
    }
    if elector.leading_until().is_some() {
        elector.step_down();
        publish(&elector, &leadership, &metrics, None);
        release(&settings, &api).await;
    }
}

fn publish(elector: &Elector, leadership: &Leadership, metrics: &Metrics, leader: Option<String>) {
    let leading = elector.is_leader(Instant::now());
    let role = if leading {
        Role::Leader
    } else {
        Role::Follower {
            leader: leader.filter(|l| *l != leadership.identity),
        }
    };
    let before = leadership.role();
    if before != role {
        match (&before, &role) {
            (_, Role::Leader) => tracing::info!(identity = %leadership.identity, "leading: this replica applies"),
            (Role::Leader, Role::Follower { .. }) => {
                tracing::warn!(identity = %leadership.identity, "stepped down: the Lease could not be renewed in time")
            }
            (_, Role::Follower { leader }) => {
                tracing::info!(
                    leader = leader.as_deref().unwrap_or("-"),
                    "following: another replica applies"
                )
            }
        }
    }
    metrics.set_leader(leading);
    leadership.set(role);
}

/// Give the Lease up (holder empty, as client-go's ReleaseOnCancel), if this replica holds it.
async fn release(settings: &LeaderElection, api: &Api<Lease>) {
    let release = async {
        let Some(mut lease) = api.get_opt(&settings.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        api.replace(&settings.name, &PostParams::default(), &lease).await?;
        Ok::<_, kube::Error>(true)
    };
    match tokio::time::timeout(settings.renew_deadline, release).await {
        Ok(Ok(true)) => tracing::info!("leader election Lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the leader election Lease; it expires by itself"),
        Err(_) => tracing::warn!("releasing the leader election Lease timed out; it expires by itself"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);
    const RENEW: Duration = Duration::from_secs(10);

    fn wall(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn held_by(holder: &str, renewed: i64, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(wall(0))),
            renew_time: Some(MicroTime(wall(renewed))),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn without_a_lease_a_replica_creates_one_naming_itself() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", LEASE, RENEW);
        let Action::Create(spec) = e.decide(None, t0, wall(0)) else {
            panic!("create");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
        assert!(!e.is_leader(t0), "not before the write succeeded");
        e.wrote(&spec, t0);
        assert!(e.is_leader(t0 + s(9)));
        assert!(!e.is_leader(t0 + s(10)), "the renew deadline passed without a renewal");
    }

    #[test]
    fn the_holder_renews_keeping_its_acquire_time_and_transitions() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", LEASE, RENEW);
        let Action::Update(spec) = e.decide(Some(&held_by("a", 0, 3)), t0, wall(2)) else {
            panic!("renew");
        };
        assert_eq!(spec.acquire_time, Some(MicroTime(wall(0))));
        assert_eq!(spec.renew_time, Some(MicroTime(wall(2))));
        assert_eq!(spec.lease_transitions, Some(3));
    }

    #[test]
    fn a_lease_renewed_by_another_is_followed_and_taken_over_a_lease_duration_after_its_last_seen_change() {
        let t0 = Instant::now();
        let mut e = Elector::new("b", LEASE, RENEW);
        // The record changes at 0 and 4 s (renewals); then it stops changing.
        assert_eq!(
            e.decide(Some(&held_by("a", 100, 1)), t0, wall(0)),
            Action::Follow { holder: "a".into() }
        );
        assert!(matches!(
            e.decide(Some(&held_by("a", 104, 1)), t0 + s(4), wall(4)),
            Action::Follow { .. }
        ));
        assert!(matches!(
            e.decide(Some(&held_by("a", 104, 1)), t0 + s(18), wall(18)),
            Action::Follow { .. }
        ));
        let Action::Update(spec) = e.decide(Some(&held_by("a", 104, 1)), t0 + s(19), wall(19)) else {
            panic!("takeover 15 s after the change seen at 4 s");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.acquire_time, Some(MicroTime(wall(19))));
        assert_eq!(spec.lease_transitions, Some(2));
    }

    #[test]
    fn the_holders_clock_does_not_matter_only_when_the_record_was_seen_to_change() {
        let t0 = Instant::now();
        let mut e = Elector::new("b", LEASE, RENEW);
        // A holder whose clock is an hour behind still holds while it keeps renewing.
        let mut at = 0;
        while at < 60 {
            let record = held_by("a", -3600 + at as i64, 1);
            assert!(
                matches!(
                    e.decide(Some(&record), t0 + s(at), wall(at as i64)),
                    Action::Follow { .. }
                ),
                "{at}"
            );
            at += 2;
        }
        // A replica that starts late sees a renewTime long past, yet waits a whole lease.
        let mut late = Elector::new("c", LEASE, RENEW);
        let stale = held_by("a", -3600, 1);
        assert!(matches!(late.decide(Some(&stale), t0, wall(0)), Action::Follow { .. }));
        assert!(matches!(
            late.decide(Some(&stale), t0 + s(14), wall(14)),
            Action::Follow { .. }
        ));
        assert!(matches!(
            late.decide(Some(&stale), t0 + s(15), wall(15)),
            Action::Update(_)
        ));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut e = Elector::new("b", LEASE, RENEW);
        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("a", 0, 4)
        };
        let Action::Update(spec) = e.decide(Some(&released), t0, wall(0)) else {
            panic!("takeover");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(5));
    }

    #[test]
    fn a_leader_that_cannot_renew_steps_down_before_another_may_take_over() {
        let t0 = Instant::now();
        let mut a = Elector::new("a", LEASE, RENEW);
        let mut b = Elector::new("b", LEASE, RENEW);
        let Action::Create(spec) = a.decide(None, t0, wall(0)) else {
            panic!("create");
        };
        a.wrote(&spec, t0);
        // b sees the write a moment later; then a's renewals all fail.
        assert!(matches!(
            b.decide(Some(&spec), t0 + s(1), wall(1)),
            Action::Follow { .. }
        ));
        let mut t = 1;
        let mut a_led_until = 0;
        let mut b_took_at = None;
        while t < 30 && b_took_at.is_none() {
            if a.is_leader(t0 + s(t)) {
                a_led_until = t;
            }
            if let Action::Update(_) = b.decide(Some(&spec), t0 + s(t), wall(t as i64)) {
                b_took_at = Some(t);
            }
            t += 1;
        }
        let b_took_at = b_took_at.expect("b takes over");
        assert!(
            a_led_until < b_took_at,
            "a led until {a_led_until}s, b took over at {b_took_at}s"
        );
        assert!(!a.is_leader(t0 + s(b_took_at)));
    }

    #[test]
    fn a_lost_race_is_not_leading() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", LEASE, RENEW);
        let Action::Create(spec) = e.decide(None, t0, wall(0)) else {
            panic!("create");
        };
        e.wrote(&spec, t0);
        e.step_down();
        assert!(!e.is_leader(t0 + s(1)));
    }

    #[test]
    fn names_and_identities() {
        assert!(valid_name("driftless") && valid_name("kube-system") && valid_name("a.b-1"));
        assert!(!valid_name("") && !valid_name("Driftless") && !valid_name("-a") && !valid_name("a_b"));
        let id = default_identity();
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_is_stopped_once_its_replica_stops_leading() {
        let l = Leadership::new("a");
        l.set(Role::Leader);
        let (stop, run_stop) = (AtomicBool::new(false), AtomicBool::new(false));
        let watch = l.stop_run_unless_leading(&stop, &run_stop);
        tokio::pin!(watch);
        let _ = tokio::time::timeout(s(5), &mut watch).await;
        assert!(!run_stop.load(Ordering::SeqCst), "left alone while leading");
        l.set(Role::Follower { leader: None });
        let _ = tokio::time::timeout(s(1), &mut watch).await;
        assert!(run_stop.load(Ordering::SeqCst), "stopped on stepping down");
    }

    #[tokio::test]
    async fn a_kubeconfig_that_cannot_be_used_is_named_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.kubeconfig");
        std::fs::write(&path, "users:\n- name: x\n  user: {token: s3cr3t-t0ken-value\n").unwrap();
        let settings = LeaderElection {
            kubeconfig_file: Some(path.clone()),
            namespace: None,
            name: "driftless".into(),
            identity: "a".into(),
            lease_duration: s(15),
            renew_deadline: s(10),
            retry_period: s(2),
        };
        let err = client(&settings).await.err().expect("refused").to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        let missing = LeaderElection {
            kubeconfig_file: Some(dir.path().join("nope")),
            ..settings
        };
        let err = client(&missing).await.err().expect("refused").to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
