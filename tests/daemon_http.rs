//! The daemon's HTTP side end to end: the server on a real socket, and forge commit statuses
//! against local fake forges.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::any;
use driftless::daemon::forge::{CommitState, ForgeClient, ForgeError, ForgeKind};
use driftless::daemon::metrics::{Metrics, Outcome, ReconcileKind};
use driftless::daemon::server::{self, ServerLimits, ServerState, Trigger};
use driftless::daemon::webhook::{Forge, sign_hex};
use driftless::ports::System;
use testkit::daemon_env::Setup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

const SECRET: &[u8] = b"webhook-secret";
const PUSH: &str = r#"{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567"}"#;

struct TestServer {
    addr: SocketAddr,
    base: String,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    triggers: mpsc::Receiver<Trigger>,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
}

impl TestServer {
    async fn start(secret: Option<&[u8]>) -> TestServer {
        Self::start_with(secret, ServerLimits::default()).await
    }

    async fn start_with(secret: Option<&[u8]>, limits: ServerLimits) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, triggers) = mpsc::channel(1);
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let state = ServerState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            webhook_secret: secret.map(<[u8]>::to_vec),
            trigger: tx,
            leadership: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(server::serve_with_limits(listener, state, limits, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            base: format!("http://{addr}"),
            ready,
            metrics,
            triggers,
            stop: Some(stop),
            handle,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, HeaderMap, String) {
        let resp = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap())
    }

    async fn webhook(&self, headers: &[(&str, String)], body: &str) -> StatusCode {
        self.webhook_answer(headers, body).await.0
    }

    async fn webhook_answer(&self, headers: &[(&str, String)], body: &str) -> (StatusCode, String) {
        let mut req = self.http.post(format!("{}/webhook", self.base)).body(body.to_owned());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    /// The one trigger a request sent (waits briefly), or a failure.
    async fn expect_trigger(&mut self) -> Trigger {
        tokio::time::timeout(Duration::from_secs(2), self.triggers.recv())
            .await
            .expect("a trigger within 2 s")
            .expect("channel open")
    }

    /// Fails if any trigger arrives within a short wait.
    async fn expect_no_trigger(&mut self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(self.triggers.try_recv().is_err(), "no trigger expected");
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.handle)
            .await
            .expect("server stops after shutdown")
            .unwrap()
            .unwrap();
    }
}

fn github_sig(secret: &[u8], body: &str) -> String {
    format!("sha256={}", sign_hex(secret, body.as_bytes()))
}

#[tokio::test]
async fn health_and_readiness() {
    let srv = TestServer::start(None).await;
    let (status, _, body) = srv.get("/healthz").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    let (status, _, _) = srv.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    srv.ready.store(true, Ordering::Release);
    let (status, _, _) = srv.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = srv.get("/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    srv.shutdown().await;
}

#[tokio::test]
async fn metrics_are_served_as_openmetrics() {
    let srv = TestServer::start(None).await;
    let counter = r#"driftless_reconciles_total{kind="reconcile",outcome="success"}"#;

    let (status, headers, text) = srv.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    for name in [
        "driftless_reconciles_total",
        "driftless_reconcile_duration_seconds",
        "driftless_drifted_guests",
        "driftless_last_applied_info",
        "driftless_api_errors_total",
        "driftless_last_reconcile_timestamp_seconds",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(text.contains(&format!("{counter} 0")), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));

    srv.metrics
        .record_reconcile(ReconcileKind::Reconcile, Outcome::Success, Duration::from_secs(3));
    srv.metrics
        .record_reconcile(ReconcileKind::PullRequest, Outcome::Failure, Duration::from_millis(40));
    srv.metrics.record_api_error(System::Git);
    srv.metrics.set_drifted_guests(2);
    srv.metrics.set_last_applied("1111111111111111111111111111111111111111");
    let (_, _, text) = srv.get("/metrics").await;
    assert!(text.contains(&format!("{counter} 1")), "{text}");
    assert!(
        text.contains(r#"driftless_reconciles_total{kind="pull_request",outcome="failure"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"driftless_reconcile_duration_seconds_count{kind="reconcile"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"driftless_api_errors_total{system="git"} 1"#), "{text}");
    assert!(text.contains("driftless_drifted_guests 2"), "{text}");
    assert!(text.contains(r#"driftless_last_applied_info{revision="1111111111111111111111111111111111111111"} 1"#));
    let stamp = text
        .lines()
        .find_map(|l| l.strip_prefix("driftless_last_reconcile_timestamp_seconds "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("timestamp sample");
    assert!(stamp > 1.7e9, "{stamp}");

    srv.metrics
        .record_reconcile(ReconcileKind::Reconcile, Outcome::Success, Duration::from_secs(1));
    srv.metrics.set_last_applied("2222222222222222222222222222222222222222");
    let (_, _, text) = srv.get("/metrics").await;
    assert!(text.contains(&format!("{counter} 2")), "{text}");
    assert!(text.contains(r#"driftless_last_applied_info{revision="2222222222222222222222222222222222222222"} 1"#));
    assert!(
        !text.contains("1111111111111111111111111111111111111111"),
        "old revision still there:\n{text}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn signed_webhooks_trigger_once() {
    let mut srv = TestServer::start(Some(SECRET)).await;

    let status = srv
        .webhook(
            &[
                ("X-GitHub-Event", "push".into()),
                ("X-Hub-Signature-256", github_sig(SECRET, PUSH)),
            ],
            PUSH,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        srv.expect_trigger().await,
        Trigger::Webhook {
            forge: Forge::GitHub,
            git_ref: Some("refs/heads/main".into())
        }
    );
    srv.expect_no_trigger().await;

    let status = srv
        .webhook(&[("X-Gitea-Signature", sign_hex(SECRET, PUSH.as_bytes()))], PUSH)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(matches!(
        srv.expect_trigger().await,
        Trigger::Webhook {
            forge: Forge::Gitea,
            ..
        }
    ));

    let status = srv
        .webhook(&[("X-Forgejo-Signature", sign_hex(SECRET, PUSH.as_bytes()))], PUSH)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(matches!(
        srv.expect_trigger().await,
        Trigger::Webhook {
            forge: Forge::Gitea,
            ..
        }
    ));

    let token = String::from_utf8(SECRET.to_vec()).unwrap();
    let status = srv.webhook(&[("X-Gitlab-Token", token)], PUSH).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        srv.expect_trigger().await,
        Trigger::Webhook {
            forge: Forge::GitLab,
            git_ref: Some("refs/heads/main".into())
        }
    );

    // A ping without a ref still triggers (a poll is harmless), with no ref.
    let ping = r#"{"zen":"Keep it logically awesome."}"#;
    let status = srv
        .webhook(&[("X-Hub-Signature-256", github_sig(SECRET, ping))], ping)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        srv.expect_trigger().await,
        Trigger::Webhook {
            forge: Forge::GitHub,
            git_ref: None
        }
    );
    srv.expect_no_trigger().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_full_channel_still_accepts() {
    let mut srv = TestServer::start(Some(SECRET)).await;
    for _ in 0..3 {
        let status = srv
            .webhook(&[("X-Hub-Signature-256", github_sig(SECRET, PUSH))], PUSH)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    srv.expect_trigger().await;
    srv.expect_no_trigger().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn bad_webhooks_are_refused_and_trigger_nothing() {
    let mut srv = TestServer::start(Some(SECRET)).await;
    let other = b"someone-elses-secret";
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("missing header", vec![("X-GitHub-Event", "push".into())]),
        (
            "wrong signature",
            vec![("X-Hub-Signature-256", format!("sha256={}", "ab".repeat(32)))],
        ),
        (
            "malformed signature",
            vec![("X-Hub-Signature-256", "sha256=not-hex".into())],
        ),
        (
            "other secret, github",
            vec![("X-Hub-Signature-256", github_sig(other, PUSH))],
        ),
        (
            "other secret, gitea",
            vec![("X-Gitea-Signature", sign_hex(other, PUSH.as_bytes()))],
        ),
        (
            "signature of another body",
            vec![("X-Hub-Signature-256", github_sig(SECRET, "{}"))],
        ),
        ("wrong gitlab token", vec![("X-Gitlab-Token", "webhook-secre".into())]),
    ];
    for (what, headers) in cases {
        let status = srv.webhook(&headers, PUSH).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        srv.expect_no_trigger().await;
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn webhooks_are_off_without_a_secret() {
    let mut srv = TestServer::start(None).await;
    let status = srv
        .webhook(&[("X-Hub-Signature-256", github_sig(SECRET, PUSH))], PUSH)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    srv.expect_no_trigger().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn oversized_webhook_bodies_are_refused() {
    let mut srv = TestServer::start(Some(SECRET)).await;
    let body = format!(
        r#"{{"ref":"refs/heads/main","pad":"{}"}}"#,
        "x".repeat(server::WEBHOOK_BODY_LIMIT)
    );
    let status = srv
        .webhook(&[("X-Hub-Signature-256", github_sig(SECRET, &body))], &body)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    srv.expect_no_trigger().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_replayed_webhook_triggers_once() {
    let mut srv = TestServer::start(Some(SECRET)).await;
    let id = "72d3162e-cc78-11e3-81ab-4c9367dc0958";
    let github = |id: &str| {
        vec![
            ("X-GitHub-Event", "push".to_string()),
            ("X-GitHub-Delivery", id.to_string()),
            ("X-Hub-Signature-256", github_sig(SECRET, PUSH)),
        ]
    };
    assert_eq!(srv.webhook_answer(&github(id), PUSH).await.0, StatusCode::ACCEPTED);
    srv.expect_trigger().await;
    // The same request again, byte for byte: answered, so the forge does not retry, and ignored.
    let (status, text) = srv.webhook_answer(&github(id), PUSH).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "duplicate delivery, ignored"));
    srv.expect_no_trigger().await;
    // Another delivery of the same payload is a new event.
    assert_eq!(
        srv.webhook(&github("another-delivery"), PUSH).await,
        StatusCode::ACCEPTED
    );
    srv.expect_trigger().await;

    // A forged request cannot use up the ID of a delivery still to come.
    let mut forged = github("next-delivery");
    forged[2].1 = github_sig(b"not-the-secret", PUSH);
    assert_eq!(srv.webhook(&forged, PUSH).await, StatusCode::UNAUTHORIZED);
    assert_eq!(srv.webhook(&github("next-delivery"), PUSH).await, StatusCode::ACCEPTED);
    srv.expect_trigger().await;

    // Gitea and Forgejo send GitHub's headers too: a replay stripped down to those is caught.
    let hex = sign_hex(SECRET, PUSH.as_bytes());
    let gitea = vec![
        ("X-Gitea-Delivery", "f6266f16-1bf3-46a5-9ea4-602e06ead473".to_string()),
        ("X-Gitea-Signature", hex.clone()),
        ("X-GitHub-Delivery", "f6266f16-1bf3-46a5-9ea4-602e06ead473".to_string()),
        ("X-Hub-Signature-256", format!("sha256={hex}")),
    ];
    assert_eq!(srv.webhook(&gitea, PUSH).await, StatusCode::ACCEPTED);
    srv.expect_trigger().await;
    assert_eq!(srv.webhook(&gitea, PUSH).await, StatusCode::OK);
    assert_eq!(srv.webhook(&gitea[2..], PUSH).await, StatusCode::OK);
    srv.expect_no_trigger().await;
    let forgejo = [
        ("X-Forgejo-Delivery", "fj-1".to_string()),
        ("X-Forgejo-Signature", hex.clone()),
    ];
    assert_eq!(srv.webhook(&forgejo, PUSH).await, StatusCode::ACCEPTED);
    srv.expect_trigger().await;
    assert_eq!(srv.webhook(&forgejo, PUSH).await, StatusCode::OK);
    srv.expect_no_trigger().await;

    let token = String::from_utf8(SECRET.to_vec()).unwrap();
    let gitlab = [
        ("X-Gitlab-Token", token.clone()),
        ("X-Gitlab-Event-UUID", "gl-7f2a".to_string()),
    ];
    assert_eq!(srv.webhook(&gitlab, PUSH).await, StatusCode::ACCEPTED);
    srv.expect_trigger().await;
    assert_eq!(srv.webhook(&gitlab, PUSH).await, StatusCode::OK);
    srv.expect_no_trigger().await;

    // Without a delivery ID there is nothing to recognise: each signed request triggers.
    for _ in 0..2 {
        let status = srv.webhook(&[("X-Gitlab-Token", token.clone())], PUSH).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        srv.expect_trigger().await;
    }
    srv.shutdown().await;
}

/// Slowloris clients: how many the server closed, how long each lived, their tasks.
struct SlowClients {
    closed: Arc<std::sync::atomic::AtomicUsize>,
    /// From connecting to being closed by the server, one entry per closed client.
    lifetimes: Arc<Mutex<Vec<Duration>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The client side of a slowloris connection: an unfinished request head, one more byte every
/// 100 ms, never the blank line that ends it. Counts itself in `closed` once the server closes it.
fn slow_client(
    mut stream: TcpStream,
    opened: std::time::Instant,
    clients: &SlowClients,
) -> tokio::task::JoinHandle<()> {
    let (closed, lifetimes) = (clients.closed.clone(), clients.lifetimes.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                // EOF, a reset, or an error answer that hyper closes the connection after.
                _ = stream.read(&mut buf) => break,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stream.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            }
        }
        lifetimes.lock().unwrap().push(opened.elapsed());
        closed.fetch_add(1, Ordering::SeqCst);
    })
}

async fn open_slow_clients(addr: SocketAddr, n: usize) -> SlowClients {
    let mut clients = SlowClients {
        closed: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        lifetimes: Arc::default(),
        tasks: Vec::new(),
    };
    for _ in 0..n {
        let opened = std::time::Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // Written at once, or the test measures its own slowness: the server may already have
        // closed it (evicted), which is what the test is about.
        let _ = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: driftless\r\nX-Slow: ")
            .await;
        let task = slow_client(stream, opened, &clients);
        clients.tasks.push(task);
    }
    clients
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A health check on a connection of its own, as a kubelet or systemd makes it.
async fn fresh_healthz(srv: &TestServer) -> Result<(StatusCode, String), String> {
    healthz_at(&srv.base).await
}

async fn healthz_at(base: &str) -> Result<(StatusCode, String), String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let resp = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok((resp.status(), resp.text().await.map_err(|e| format!("{e:?}"))?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_beyond_the_cap_do_not_take_healthz_down() {
    const CAP: usize = 32;
    const SLOW: usize = 300;
    // Both ends of every connection live in this process: do as the daemon does.
    let limit = server::raise_open_files_limit().expect("getrlimit");
    assert!(limit >= 2 * SLOW as u64, "open files limit {limit}");
    // Timeouts far longer than the test: only the cap can close a slow connection here.
    let srv = TestServer::start_with(
        None,
        ServerLimits {
            max_connections: CAP,
            header_read_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(120),
        },
    )
    .await;
    let SlowClients {
        closed, tasks: clients, ..
    } = open_slow_clients(srv.addr, SLOW).await;
    // The server holds at most CAP of them: each one past the cap evicted the one idle longest.
    let held = || SLOW - closed.load(Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(10), || held() <= CAP).await,
        "{} slow connections still open, the cap is {CAP}",
        held()
    );
    for round in 0..3 {
        let answer = fresh_healthz(&srv).await;
        assert_eq!(
            answer,
            Ok((StatusCode::OK, "ok".to_string())),
            "round {round}: /healthz behind {SLOW} slow connections"
        );
    }
    assert!(held() <= CAP, "{} open", held());
    // They are still trickling: nothing but the cap closed the others.
    assert!(held() > CAP / 2, "{} open", held());
    srv.shutdown().await;
    for c in clients {
        c.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_closed_by_the_header_or_idle_timeout() {
    const SLOW: usize = 50;
    let long = Duration::from_secs(120);
    let short = Duration::from_secs(1);
    for (what, header_read_timeout, idle_timeout) in
        [("header read timeout", short, long), ("idle timeout", long, short)]
    {
        let srv = TestServer::start_with(
            None,
            ServerLimits {
                max_connections: 256,
                header_read_timeout,
                idle_timeout,
                request_timeout: long,
            },
        )
        .await;
        let SlowClients {
            closed, tasks: clients, ..
        } = open_slow_clients(srv.addr, SLOW).await;
        // Each keeps sending for as long as it is open; only a timeout of the whole head ends it.
        assert!(
            eventually(Duration::from_secs(20), || closed.load(Ordering::SeqCst) == SLOW).await,
            "{what}: {} of {SLOW} slow connections closed",
            closed.load(Ordering::SeqCst)
        );
        assert_eq!(
            fresh_healthz(&srv).await,
            Ok((StatusCode::OK, "ok".to_string())),
            "{what}"
        );
        srv.shutdown().await;
        for c in clients {
            c.await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_request_that_outlasts_its_time_gets_408() {
    let mut srv = TestServer::start_with(
        Some(SECRET),
        ServerLimits {
            request_timeout: Duration::from_secs(1),
            ..ServerLimits::default()
        },
    )
    .await;
    let mut stream = TcpStream::connect(srv.addr).await.unwrap();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: driftless\r\nX-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n",
        github_sig(SECRET, PUSH),
        PUSH.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The body, a byte a second: the handler waits for it in vain.
    let answer = tokio::time::timeout(Duration::from_secs(15), async {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        for byte in PUSH.bytes() {
            tokio::select! {
                n = stream.read(&mut buf) => {
                    match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    let _ = stream.write_all(&[byte]).await;
                }
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    })
    .await
    .expect("an answer before the body is complete");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    srv.expect_no_trigger().await;
    srv.shutdown().await;
}

/// The issue's attack against the daemon itself, as it runs with its production limits: 300
/// slow clients (more than the connection cap) neither take /healthz down nor keep the daemon
/// from reconciling; each is closed once its header-read timeout passes; an oversized webhook
/// body is refused with 413.
#[test]
fn the_daemon_outlasts_300_slow_clients_and_refuses_oversized_bodies() {
    const SLOW: usize = 300;
    let limits = ServerLimits::default();
    assert!(SLOW > limits.max_connections);
    // The client ends of the slow connections live in this process.
    let limit = server::raise_open_files_limit().expect("getrlimit");
    assert!(limit >= 2 * SLOW as u64, "open files limit {limit}");
    let mut s = Setup::new("homelab-k3s");
    let secret_file = s.dir.path().join("webhook");
    std::fs::write(&secret_file, SECRET).unwrap();
    let url = s.file_url();
    s.start_daemon(
        &url,
        &[
            "--poll-interval",
            "1h",
            "--webhook-secret-file",
            secret_file.to_str().unwrap(),
        ],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], s.listen));
    let base = format!("http://{addr}");

    // At once, while the daemon makes its first run of main.
    let slow = s.rt.block_on(open_slow_clients(addr, SLOW));
    let closed = slow.closed.clone();
    let held = || SLOW - closed.load(Ordering::SeqCst);
    s.rt.block_on(async {
        for round in 0..3 {
            assert_eq!(
                healthz_at(&base).await,
                Ok((StatusCode::OK, "ok".to_string())),
                "round {round}: /healthz behind {SLOW} slow connections"
            );
        }
    });
    let first = testkit::git(&s.work, &["rev-parse", "HEAD"]);
    let report = s.wait_report("heads/main", Duration::from_secs(120), |r| {
        r["revision"] == first.as_str()
    });
    assert_eq!(report["outcome"], "applied", "{report}");

    s.rt.block_on(async {
        // Each one still trickles a byte every 100 ms: only the header-read timeout (10 s)
        // closes it.
        assert!(
            eventually(Duration::from_secs(90), || closed.load(Ordering::SeqCst) == SLOW).await,
            "{} of {SLOW} slow connections still open",
            held()
        );
        for c in slow.tasks {
            c.await.unwrap();
        }
        // The header-read timeout cannot close a connection sooner than that after it was
        // opened: those closed sooner were evicted by the cap, at most the cap stayed.
        let evicted = slow
            .lifetimes
            .lock()
            .unwrap()
            .iter()
            .filter(|lived| **lived < limits.header_read_timeout)
            .count();
        assert!(
            evicted >= SLOW - limits.max_connections,
            "only {evicted} of {SLOW} slow connections were closed before the header-read timeout; \
             the cap is {}",
            limits.max_connections
        );

        let body = format!(
            r#"{{"ref":"refs/heads/main","pad":"{}"}}"#,
            "x".repeat(server::WEBHOOK_BODY_LIMIT)
        );
        let status = reqwest::Client::new()
            .post(format!("{base}/webhook"))
            .header("X-Hub-Signature-256", github_sig(SECRET, &body))
            .body(body)
            .send()
            .await
            .expect("an answer")
            .status();
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(healthz_at(&base).await, Ok((StatusCode::OK, "ok".to_string())));
    });
}

// --- Forge commit statuses against local fakes ---

#[derive(Debug, Clone)]
struct Recorded {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn form(&self) -> HashMap<String, String> {
        let text = std::str::from_utf8(&self.body).unwrap();
        text.split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode_form(k), decode_form(v))
            })
            .collect()
    }
}

fn decode_form(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

#[derive(Clone)]
struct Fake {
    requests: Arc<Mutex<Vec<Recorded>>>,
    answer: (StatusCode, &'static str),
}

/// A fake forge answering every request with `answer`; returns its base URL and its request log.
async fn fake_forge(answer: (StatusCode, &'static str)) -> (String, Arc<Mutex<Vec<Recorded>>>) {
    async fn record(
        State(fake): State<Fake>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, &'static str) {
        fake.requests.lock().unwrap().push(Recorded {
            method,
            path: uri.path().to_owned(),
            headers,
            body,
        });
        fake.answer
    }
    let requests = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new().fallback(any(record)).with_state(Fake {
        requests: requests.clone(),
        answer,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), requests)
}

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "tok-3f9a-very-secret";

fn only(requests: &Arc<Mutex<Vec<Recorded>>>) -> Recorded {
    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    requests[0].clone()
}

#[tokio::test]
async fn gitea_status() {
    let (base, requests) = fake_forge((StatusCode::CREATED, "{}")).await;
    let client = ForgeClient::with_client(
        ForgeKind::Gitea,
        format!("{base}/api/v1/"),
        "me/homelab",
        TOKEN,
        reqwest::Client::new(),
    )
    .unwrap();
    client
        .set_status(
            SHA,
            CommitState::Success,
            "driftless/apply",
            "applied 3 changes",
            Some("https://ci.example/r/1"),
        )
        .await
        .unwrap();
    let req = only(&requests);
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, format!("/api/v1/repos/me/homelab/statuses/{SHA}"));
    assert_eq!(req.header("authorization"), Some(format!("token {TOKEN}").as_str()));
    assert_eq!(
        req.json(),
        serde_json::json!({
            "state": "success",
            "context": "driftless/apply",
            "description": "applied 3 changes",
            "target_url": "https://ci.example/r/1",
        })
    );
}

#[tokio::test]
async fn github_status() {
    let (base, requests) = fake_forge((StatusCode::CREATED, "{}")).await;
    let client =
        ForgeClient::with_client(ForgeKind::GitHub, &base, "me/homelab", TOKEN, reqwest::Client::new()).unwrap();
    let long = "x".repeat(200);
    client
        .set_status(SHA, CommitState::Error, "driftless/plan", &long, None)
        .await
        .unwrap();
    let req = only(&requests);
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, format!("/repos/me/homelab/statuses/{SHA}"));
    assert_eq!(req.header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
    assert_eq!(req.header("accept"), Some("application/vnd.github+json"));
    assert!(req.header("user-agent").is_some_and(|ua| ua.starts_with("driftless/")));
    let json = req.json();
    assert_eq!(json["state"], "error");
    assert_eq!(json["context"], "driftless/plan");
    assert_eq!(json["description"].as_str().unwrap().chars().count(), 140);
    assert!(json.get("target_url").is_none(), "{json}");
}

#[tokio::test]
async fn gitlab_status() {
    let (base, requests) = fake_forge((StatusCode::CREATED, "{}")).await;
    let client = ForgeClient::with_client(
        ForgeKind::GitLab,
        format!("{base}/api/v4"),
        "homelab/infra",
        TOKEN,
        reqwest::Client::new(),
    )
    .unwrap();
    client
        .set_status(
            SHA,
            CommitState::Error,
            "driftless/plan",
            "plan failed: a & b",
            Some("https://x.example/p?a=1"),
        )
        .await
        .unwrap();
    let req = only(&requests);
    assert_eq!(req.method, Method::POST);
    // The fake sees the raw path: the project path stays encoded as GitLab wants.
    assert_eq!(req.path, format!("/api/v4/projects/homelab%2Finfra/statuses/{SHA}"));
    assert_eq!(req.header("private-token"), Some(TOKEN));
    assert_eq!(req.header("authorization"), None);
    let form = req.form();
    assert_eq!(form.get("state").map(String::as_str), Some("failed"));
    assert_eq!(form.get("name").map(String::as_str), Some("driftless/plan"));
    assert_eq!(form.get("description").map(String::as_str), Some("plan failed: a & b"));
    assert_eq!(
        form.get("target_url").map(String::as_str),
        Some("https://x.example/p?a=1")
    );

    for (state, name) in [
        (CommitState::Pending, "pending"),
        (CommitState::Success, "success"),
        (CommitState::Failure, "failed"),
    ] {
        requests.lock().unwrap().clear();
        client
            .set_status(SHA, state, "driftless/apply", "d", None)
            .await
            .unwrap();
        assert_eq!(only(&requests).form().get("state").map(String::as_str), Some(name));
    }
}

#[tokio::test]
async fn forge_errors_name_the_status_not_the_token() {
    for kind in [ForgeKind::Gitea, ForgeKind::GitHub, ForgeKind::GitLab] {
        let (base, _) = fake_forge((StatusCode::UNAUTHORIZED, r#"{"message":"bad credentials"}"#)).await;
        let client = ForgeClient::with_client(kind, &base, "me/homelab", TOKEN, reqwest::Client::new()).unwrap();
        let err = client
            .set_status(SHA, CommitState::Pending, "driftless/plan", "planning", None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ForgeError::Status { status: 401, .. }),
            "{kind:?}: {err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("401"), "{text}");
        assert!(text.contains("bad credentials"), "{text}");
        assert!(!text.contains(TOKEN), "{text}");
        assert!(!format!("{err:?}").contains(TOKEN));
        assert!(!format!("{client:?}").contains(TOKEN));
    }

    // A forge that echoes the token back does not get it into the error either.
    let (base, _) = fake_forge((StatusCode::FORBIDDEN, "token tok-3f9a-very-secret is not allowed")).await;
    let client =
        ForgeClient::with_client(ForgeKind::Gitea, &base, "me/homelab", TOKEN, reqwest::Client::new()).unwrap();
    let err = client
        .set_status(SHA, CommitState::Success, "driftless/apply", "ok", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    assert!(!err.to_string().contains(TOKEN), "{err}");

    // No forge listening: a request error, without the token.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client =
        ForgeClient::with_client(ForgeKind::GitHub, &dead, "me/homelab", TOKEN, reqwest::Client::new()).unwrap();
    let err = client
        .set_status(SHA, CommitState::Success, "driftless/apply", "ok", None)
        .await
        .unwrap_err();
    assert!(matches!(err, ForgeError::Request { .. }), "{err:?}");
    assert!(!err.to_string().contains(TOKEN), "{err}");
}
