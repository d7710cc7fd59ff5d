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
use driftless::daemon::server::{self, ServerState, Trigger};
use driftless::daemon::webhook::{Forge, sign_hex};
use driftless::ports::System;
use tokio::sync::{mpsc, oneshot};

const SECRET: &[u8] = b"webhook-secret";
const PUSH: &str = r#"{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567"}"#;

struct TestServer {
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
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(server::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        TestServer {
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
        let mut req = self.http.post(format!("{}/webhook", self.base)).body(body.to_owned());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        req.send().await.unwrap().status()
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
