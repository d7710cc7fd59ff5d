//! The sandbox Proxmox VE API over real HTTP(S): authentication, schema validation, the
//! container lifecycle with exact config files, digests, permissions, pending changes,
//! knobs, TLS, persistence, and `pct`.

use std::time::Duration;

use driftless_sandbox::{self as sandbox, SandboxHandle, SandboxOptions};
use serde_json::Value;
use sha1::Digest as _;

const TEMPLATE: &str = "local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst";
const NET0: &str = "name=eth0,bridge=vmbr0,ip=192.168.2.20/24,gw=192.168.2.1";

async fn start(state: &std::path::Path, tls: bool) -> SandboxHandle {
    let opts = SandboxOptions {
        tls,
        seed: 42,
        token: sandbox::default_token(42),
        ..SandboxOptions::new(state)
    };
    sandbox::start(opts).await.expect("sandbox starts")
}

/// A client that trusts only the sandbox's certificate.
fn client(h: &SandboxHandle) -> reqwest::Client {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if !h.ca_pem.is_empty() {
        let cert = reqwest::Certificate::from_pem(h.ca_pem.as_bytes()).unwrap();
        b = b.tls_certs_only([cert]).tls_info(true);
    }
    b.build().unwrap()
}

struct Answer {
    status: u16,
    reason: String,
    body: Value,
}

impl Answer {
    fn data(&self) -> &Value {
        &self.body["data"]
    }

    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }
}

async fn send(
    c: &reqwest::Client,
    h: &SandboxHandle,
    auth: Option<&str>,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
) -> Answer {
    let mut url = format!("{}{path}", h.api_url());
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = if method == reqwest::Method::GET || method == reqwest::Method::DELETE {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", urlencode(v))).collect();
        if !query.is_empty() {
            url = format!("{url}?{}", query.join("&"));
        }
        c.request(method, url)
    } else {
        c.request(method, url).form(params)
    };
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let reason = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .unwrap_or_else(|| resp.status().canonical_reason().unwrap_or("").to_string());
    let bytes = resp.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    Answer { status, reason, body }
}

async fn api(c: &reqwest::Client, h: &SandboxHandle, method: &str, path: &str, params: &[(&str, &str)]) -> Answer {
    send(c, h, Some(&h.auth_header()), method, path, params).await
}

/// Poll a task until it stops; its status object.
async fn wait_task(c: &reqwest::Client, h: &SandboxHandle, upid: &str) -> Value {
    let node = upid.split(':').nth(1).unwrap();
    let path = format!("/nodes/{node}/tasks/{}/status", urlencode(upid));
    for _ in 0..200 {
        let a = api(c, h, "GET", &path, &[]).await;
        assert_eq!(a.status, 200, "task status: {}", a.body);
        if a.data()["status"] == "stopped" {
            return a.data().clone();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("task {upid} did not finish");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn run_task(c: &reqwest::Client, h: &SandboxHandle, method: &str, path: &str, params: &[(&str, &str)]) -> Value {
    let a = api(c, h, method, path, params).await;
    assert_eq!(a.status, 200, "{method} {path}: {} {}", a.reason, a.body);
    let upid = a.data().as_str().expect("a UPID").to_string();
    wait_task(c, h, &upid).await
}

fn seed_params() -> Vec<(&'static str, &'static str)> {
    vec![
        ("vmid", "100"),
        ("hostname", "k3s-master"),
        ("cores", "2"),
        ("memory", "4096"),
        ("swap", "512"),
        ("rootfs", "local-lvm:32"),
        ("net0", NET0),
        ("features", "nesting=1"),
        ("tags", "driftless"),
        ("ostemplate", TEMPLATE),
    ]
}

fn conf_text(h: &SandboxHandle, vmid: u32) -> String {
    std::fs::read_to_string(h.state_dir.join(format!("nodes/pve/lxc/{vmid}.conf"))).unwrap()
}

fn sha1_hex(text: &str) -> String {
    sha1::Sha1::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hwaddr(text: &str) -> String {
    let start = text.find("hwaddr=").expect("a MAC address") + 7;
    text[start..start + 17].to_string()
}

async fn create_seed(c: &reqwest::Client, h: &SandboxHandle) {
    let task = run_task(c, h, "POST", "/nodes/pve/lxc", &seed_params()).await;
    assert_eq!(task["exitstatus"], "OK", "{task}");
}

#[tokio::test]
async fn authentication_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), true).await;
    let c = client(&h);
    let a = send(&c, &h, None, "GET", "/version", &[]).await;
    assert_eq!((a.status, a.reason.as_str(), &a.body), (401, "No ticket", &Value::Null));
    let wrong = h.auth_header().rsplit_once('=').unwrap().0.to_string() + "=not-the-secret";
    let a = send(&c, &h, Some(&wrong), "GET", "/version", &[]).await;
    assert_eq!((a.status, a.reason.as_str()), (401, "invalid token value!"));
    let a = send(&c, &h, Some("PVEAPIToken=root@pam!other=x"), "GET", "/nodes", &[]).await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (401, "no such token 'other' for user 'root@pam'")
    );
    let a = api(&c, &h, "GET", "/version", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.data()["release"], "9.1");
    h.shutdown().await;
}

#[tokio::test]
async fn parameters_and_paths_are_checked_like_proxmox() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), true).await;
    let c = client(&h);
    let mut params = seed_params();
    params.push(("lxc.apparmor.profile", "unconfined"));
    let a = api(&c, &h, "POST", "/nodes/pve/lxc", &params).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.reason, "Parameter verification failed.");
    assert_eq!(a.body["data"], Value::Null);
    assert_eq!(
        a.body["errors"]["lxc.apparmor.profile"],
        "property is not defined in schema and the schema does not allow additional properties"
    );
    let a = api(&c, &h, "PUT", "/nodes/pve/lxc/100/config", &[("cores", "many")]).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["errors"]["cores"], "type check ('integer') failed - got 'many'");

    let a = api(&c, &h, "GET", "/foo", &[]).await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (501, "Method 'GET /foo' not implemented")
    );
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/123/config", &[]).await;
    assert_eq!(a.status, 500);
    assert_eq!(
        a.message(),
        "Configuration file 'nodes/pve/lxc/123.conf' does not exist\n"
    );
    assert!(nothing_created(&h));
    h.shutdown().await;
}

fn nothing_created(h: &SandboxHandle) -> bool {
    std::fs::read_dir(h.state_dir.join("nodes/pve/lxc"))
        .unwrap()
        .next()
        .is_none()
}

#[tokio::test]
async fn container_lifecycle_matches_proxmox() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), true).await;
    let c = client(&h);

    // create: a task, then the file exactly as pve-container writes it
    let a = api(&c, &h, "POST", "/nodes/pve/lxc", &seed_params()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let upid = a.data().as_str().unwrap().to_string();
    let fields: Vec<&str> = upid.split(':').collect();
    assert_eq!(fields.len(), 9, "{upid}");
    assert_eq!(
        (fields[0], fields[1], fields[5], fields[6]),
        ("UPID", "pve", "vzcreate", "100")
    );
    assert_eq!((fields[7], fields[8]), ("root@pam!driftless", ""));
    assert!(
        fields[2..5]
            .iter()
            .all(|f| f.len() == 8 && f.bytes().all(|b| b.is_ascii_hexdigit()))
    );
    let task = wait_task(&c, &h, &upid).await;
    assert_eq!(task["exitstatus"], "OK");
    assert_eq!(task["type"], "vzcreate");
    assert_eq!(task["user"], "root@pam");

    let text = conf_text(&h, 100);
    let mac = hwaddr(&text);
    assert!(mac.starts_with("BC:24:11:"), "{mac}");
    let expected = format!(
        "arch: amd64\n\
         cores: 2\n\
         features: nesting=1\n\
         hostname: k3s-master\n\
         memory: 4096\n\
         net0: name=eth0,bridge=vmbr0,gw=192.168.2.1,hwaddr={mac},ip=192.168.2.20/24,type=veth\n\
         ostype: ubuntu\n\
         rootfs: local-lvm:vm-100-disk-0,size=32G\n\
         swap: 512\n\
         tags: driftless\n\
         unprivileged: 1\n"
    );
    assert_eq!(text, expected);

    // GET config: typed values and the digest of the file
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/config", &[]).await;
    assert_eq!(a.status, 200);
    let cfg = a.data();
    assert_eq!(cfg["digest"], sha1_hex(&text));
    assert_eq!(cfg["cores"], 2);
    assert_eq!(cfg["unprivileged"], 1);
    assert_eq!(cfg["hostname"], "k3s-master");
    assert!(cfg.get("lxc").is_none());
    let digest = cfg["digest"].as_str().unwrap().to_string();

    // a second create with the same id is refused at once
    let a = api(&c, &h, "POST", "/nodes/pve/lxc", &seed_params()).await;
    assert_eq!((a.status, a.message()), (500, "CT 100 already exists on node 'pve'\n"));

    // a stale digest is refused with Proxmox's words; the current one works
    let a = api(
        &c,
        &h,
        "PUT",
        "/nodes/pve/lxc/100/config",
        &[("cores", "3"), ("digest", &"0".repeat(40))],
    )
    .await;
    assert_eq!(a.status, 500);
    assert_eq!(
        a.reason,
        "detected modified configuration - file changed by other user? Try again."
    );
    assert_eq!(
        a.message(),
        "detected modified configuration - file changed by other user? Try again.\n"
    );
    let a = api(
        &c,
        &h,
        "PUT",
        "/nodes/pve/lxc/100/config",
        &[("cores", "3"), ("tags", "K3s;driftless,Control"), ("digest", &digest)],
    )
    .await;
    assert_eq!((a.status, &a.body), (200, &serde_json::json!({"data": null})));
    let text = conf_text(&h, 100);
    assert!(
        text.contains("cores: 3\n") && text.contains("tags: control;driftless;k3s\n"),
        "{text}"
    );

    // root-only feature flags through a token: 403
    let a = api(
        &c,
        &h,
        "PUT",
        "/nodes/pve/lxc/100/config",
        &[("features", "nesting=1,keyctl=1")],
    )
    .await;
    assert_eq!(a.status, 403);
    assert_eq!(
        a.message(),
        "Permission check failed (changing feature flags (except nesting) is only allowed for root@pam)\n"
    );
    assert_eq!(
        a.reason,
        "Permission check failed (changing feature flags (except nesting) is only allowed for root@pam)"
    );

    // start; a non-hotpluggable change goes pending, a hotpluggable one applies at once
    let task = run_task(&c, &h, "POST", "/nodes/pve/lxc/100/status/start", &[]).await;
    assert_eq!(task["exitstatus"], "OK");
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/status/current", &[]).await;
    assert_eq!(a.data()["status"], "running");
    let a = api(&c, &h, "POST", "/nodes/pve/lxc/100/status/start", &[]).await;
    assert_eq!((a.status, a.message()), (500, "CT 100 already running\n"));
    let a = api(
        &c,
        &h,
        "PUT",
        "/nodes/pve/lxc/100/config",
        &[("nameserver", "192.168.2.1 8.8.8.8"), ("cores", "4")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let text = conf_text(&h, 100);
    assert!(text.contains("cores: 4\n"), "{text}");
    assert!(
        text.ends_with("\n[pve:pending]\nnameserver: 192.168.2.1 8.8.8.8\n"),
        "{text}"
    );
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/pending", &[]).await;
    let items = a.data().as_array().unwrap();
    let ns = items.iter().find(|i| i["key"] == "nameserver").unwrap();
    assert_eq!(
        ns,
        &serde_json::json!({"key": "nameserver", "pending": "192.168.2.1 8.8.8.8"})
    );
    let cores = items.iter().find(|i| i["key"] == "cores").unwrap();
    assert_eq!(cores, &serde_json::json!({"key": "cores", "value": 4}));
    assert!(
        items
            .iter()
            .any(|i| i["key"] == "digest" && i["value"] == sha1_hex(&text))
    );
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/config", &[]).await;
    assert_eq!(a.data()["nameserver"], "192.168.2.1 8.8.8.8");
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/config", &[("current", "1")]).await;
    assert!(a.data().get("nameserver").is_none());

    // destroying a running container is refused at once
    let a = api(&c, &h, "DELETE", "/nodes/pve/lxc/100", &[]).await;
    assert_eq!(
        (a.status, a.message()),
        (500, "unable to destroy CT 100 - container is running\n")
    );

    // reboot applies the pending change
    let task = run_task(&c, &h, "POST", "/nodes/pve/lxc/100/status/reboot", &[]).await;
    assert_eq!(task["exitstatus"], "OK");
    let text = conf_text(&h, 100);
    assert!(
        !text.contains("[pve:pending]") && text.contains("nameserver: 192.168.2.1 8.8.8.8\n"),
        "{text}"
    );

    // the listing, then stop and destroy
    let a = api(&c, &h, "GET", "/cluster/resources", &[("type", "vm")]).await;
    let vm = &a.data()[0];
    assert_eq!(
        (vm["id"].as_str(), vm["type"].as_str(), vm["vmid"].as_u64()),
        (Some("lxc/100"), Some("lxc"), Some(100))
    );
    assert_eq!(
        (vm["name"].as_str(), vm["status"].as_str()),
        (Some("k3s-master"), Some("running"))
    );
    assert_eq!(vm["tags"], "control;driftless;k3s");
    assert_eq!(vm["maxmem"], 4096u64 << 20);
    let task = run_task(&c, &h, "POST", "/nodes/pve/lxc/100/status/shutdown", &[]).await;
    assert_eq!(task["exitstatus"], "OK");
    let a = api(&c, &h, "POST", "/nodes/pve/lxc/100/status/stop", &[]).await;
    assert_eq!((a.status, a.message()), (500, "CT 100 not running\n"));
    let task = run_task(&c, &h, "DELETE", "/nodes/pve/lxc/100", &[]).await;
    assert_eq!(task["exitstatus"], "OK");
    assert!(nothing_created(&h));

    let counts = h.request_counts();
    assert_eq!(counts["POST /nodes/{node}/lxc"], 2);
    assert!(counts["GET /nodes/{node}/tasks/{upid}/status"] >= 6);
    h.shutdown().await;
}

#[tokio::test]
async fn privileged_containers_cannot_get_features_through_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), true).await;
    let c = client(&h);
    let mut params = seed_params();
    params.push(("unprivileged", "0"));
    let a = api(&c, &h, "POST", "/nodes/pve/lxc", &params).await;
    assert_eq!(a.status, 403);
    assert_eq!(
        a.message(),
        "Permission check failed (changing feature flags for privileged container is only allowed for root@pam)\n"
    );
    assert!(nothing_created(&h));
    // without features it is created (privileged: no `unprivileged` line)
    params.retain(|(k, _)| *k != "features");
    let task = run_task(&c, &h, "POST", "/nodes/pve/lxc", &params).await;
    assert_eq!(task["exitstatus"], "OK");
    assert!(!conf_text(&h, 100).contains("unprivileged"));
    // pct (root on the node) may set them
    let out = sandbox::pct(
        &h.state_dir,
        &["set", "100", "--features", "nesting=1,keyctl=1,fuse=1"].map(String::from),
    )
    .unwrap();
    assert_eq!(out, "");
    assert!(conf_text(&h, 100).contains("features: nesting=1,keyctl=1,fuse=1\n"));
    let out = sandbox::pct(&h.state_dir, &["config", "100"].map(String::from)).unwrap();
    assert!(
        out.contains("features: nesting=1,keyctl=1,fuse=1\nhostname: k3s-master\n"),
        "{out}"
    );
    let err = sandbox::pct(&h.state_dir, &["set", "100", "--cores", "lots"].map(String::from)).unwrap_err();
    assert!(
        err.to_string()
            .contains("cores: type check ('integer') failed - got 'lots'"),
        "{err}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn knobs_inject_errors_and_concurrent_edits() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), true).await;
    let c = client(&h);
    create_seed(&c, &h).await;

    h.knobs().set_error_rate(1.0);
    for _ in 0..3 {
        let a = api(&c, &h, "GET", "/nodes", &[]).await;
        assert_eq!(a.status, 500);
    }
    h.knobs().set_error_rate(0.0);
    assert_eq!(api(&c, &h, "GET", "/nodes", &[]).await.status, 200);

    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/config", &[]).await;
    let digest = a.data()["digest"].as_str().unwrap().to_string();
    h.knobs().set_edit_between_read_and_write(true);
    let a = api(
        &c,
        &h,
        "PUT",
        "/nodes/pve/lxc/100/config",
        &[("cores", "3"), ("digest", &digest)],
    )
    .await;
    assert_eq!(a.status, 500);
    assert_eq!(
        a.message(),
        "detected modified configuration - file changed by other user? Try again.\n"
    );
    assert!(!h.knobs().edit_between_read_and_write(), "one shot");
    let text = conf_text(&h, 100);
    assert!(
        text.starts_with("#edited outside driftless") && text.contains("cores: 2\n"),
        "{text}"
    );
    // observe again, then the write goes through
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/config", &[]).await;
    assert_eq!(a.data()["digest"], sha1_hex(&text));
    let digest = a.data()["digest"].as_str().unwrap().to_string();
    let a = api(
        &c,
        &h,
        "PUT",
        "/nodes/pve/lxc/100/config",
        &[("cores", "3"), ("digest", &digest)],
    )
    .await;
    assert_eq!(a.status, 200);

    // another process editing the file is seen at once
    let path = h.state_dir.join("nodes/pve/lxc/100.conf");
    let edited = std::fs::read_to_string(&path).unwrap().replace("cores: 3", "cores: 7");
    std::fs::write(&path, &edited).unwrap();
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/config", &[]).await;
    assert_eq!(
        (a.data()["cores"].as_u64(), a.data()["digest"].as_str()),
        (Some(7), Some(sha1_hex(&edited).as_str()))
    );

    // raw lxc.* keys written on the host are shown read-only, in order
    let with_raw = format!("{edited}lxc.apparmor.profile: unconfined\nlxc.cap.drop: \n");
    std::fs::write(&path, &with_raw).unwrap();
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/config", &[]).await;
    assert_eq!(
        a.data()["lxc"],
        serde_json::json!([["lxc.apparmor.profile", "unconfined"], ["lxc.cap.drop", ""]])
    );

    // a task that fails reports Proxmox's error as its exit status
    let a = api(&c, &h, "PUT", "/nodes/pve/lxc/100/config", &[("template", "1")]).await;
    assert_eq!(a.status, 200);
    let task = run_task(&c, &h, "POST", "/nodes/pve/lxc/100/status/start", &[]).await;
    assert_eq!(task["exitstatus"], "you can't start a CT if it's a template");
    let a = api(&c, &h, "GET", "/nodes/pve/lxc/100/status/current", &[]).await;
    assert_eq!(a.data()["status"], "stopped");

    // latency is added to every answer
    h.knobs().set_latency(Duration::from_millis(60));
    let t = std::time::Instant::now();
    api(&c, &h, "GET", "/version", &[]).await;
    assert!(t.elapsed() >= Duration::from_millis(60));
    h.shutdown().await;
}

#[tokio::test]
async fn tls_certificate_is_pinned_by_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), true).await;
    assert!(h.url.starts_with("https://127.0.0.1:"), "{}", h.url);
    let c = client(&h);
    let resp = c
        .get(format!("{}/version", h.api_url()))
        .header("Authorization", h.auth_header())
        .send()
        .await
        .unwrap();
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .expect("peer certificate")
        .to_vec();
    let fp: Vec<String> = sha2::Sha256::digest(&der).iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(h.fingerprint, fp.join(":"));
    assert_eq!(h.fingerprint.len(), 95);
    // a client that does not trust the sandbox's certificate is refused
    let untrusting = reqwest::Client::builder()
        .tls_certs_only(Vec::<reqwest::Certificate>::new())
        .build()
        .unwrap();
    assert!(untrusting.get(format!("{}/version", h.api_url())).send().await.is_err());
    h.shutdown().await;
}

#[tokio::test]
async fn state_survives_a_restart_and_plain_http_works() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), false).await;
    assert!(h.url.starts_with("http://") && h.fingerprint.is_empty());
    let c = client(&h);
    create_seed(&c, &h).await;
    let task = run_task(&c, &h, "POST", "/nodes/pve/lxc/100/status/start", &[]).await;
    assert_eq!(task["exitstatus"], "OK");
    let before = conf_text(&h, 100);
    h.shutdown().await;

    let h = start(dir.path(), true).await;
    let c = client(&h);
    assert_eq!(conf_text(&h, 100), before);
    let a = api(&c, &h, "GET", "/nodes/pve/lxc", &[]).await;
    let list = a.data().as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0]["vmid"].as_u64(), list[0]["status"].as_str()),
        (Some(100), Some("running"))
    );
    h.shutdown().await;
}

#[tokio::test]
async fn virtual_machines_are_created_like_qemu_server() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), true).await;
    let c = client(&h);
    let params = [
        ("vmid", "200"),
        ("name", "talos-cp-1"),
        ("cores", "4"),
        ("sockets", "1"),
        ("memory", "4096"),
        ("cpu", "x86-64-v2-AES"),
        ("scsihw", "virtio-scsi-single"),
        ("agent", "1"),
        ("net0", "virtio,bridge=vmbr0,firewall=1"),
        ("scsi0", "local-lvm:32,iothread=1,discard=on"),
        ("ide2", "local:iso/talos-amd64.iso,media=cdrom"),
        ("onboot", "1"),
        ("tags", "talos,driftless"),
    ];
    let task = run_task(&c, &h, "POST", "/nodes/pve/qemu", &params).await;
    assert_eq!(task["exitstatus"], "OK", "{task}");
    assert_eq!(task["type"], "qmcreate");
    let text = std::fs::read_to_string(h.state_dir.join("nodes/pve/qemu-server/200.conf")).unwrap();
    for line in [
        "boot: order=scsi0;ide2;net0\n",
        "ide2: local:iso/talos-amd64.iso,media=cdrom\n",
        "scsi0: local-lvm:vm-200-disk-0,discard=on,iothread=1,size=32G\n",
        "tags: driftless;talos\n",
        "name: talos-cp-1\n",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(
        text.contains("net0: virtio=BC:24:11:") && text.contains(",bridge=vmbr0,firewall=1\n"),
        "{text}"
    );
    assert!(text.contains("meta: creation-qemu=") && text.contains("vmgenid: ") && text.contains("smbios1: uuid="));

    // a running VM keeps memory changes pending; POST config is a task
    run_task(&c, &h, "POST", "/nodes/pve/qemu/200/status/start", &[]).await;
    let task = run_task(
        &c,
        &h,
        "POST",
        "/nodes/pve/qemu/200/config",
        &[("memory", "8192"), ("name", "talos-cp-a")],
    )
    .await;
    assert_eq!(task["exitstatus"], "OK");
    let text = std::fs::read_to_string(h.state_dir.join("nodes/pve/qemu-server/200.conf")).unwrap();
    assert!(
        text.contains("name: talos-cp-a\n") && text.ends_with("\n[PENDING]\nmemory: 8192\n"),
        "{text}"
    );
    let a = api(&c, &h, "DELETE", "/nodes/pve/qemu/200", &[]).await;
    assert_eq!((a.status, a.message()), (500, "VM 200 is running - destroy failed\n"));
    let a = api(
        &c,
        &h,
        "PUT",
        "/nodes/pve/qemu/200/config",
        &[("cores", "2"), ("digest", &"a".repeat(40))],
    )
    .await;
    assert_eq!(
        (a.status, a.message()),
        (500, "checksum missmatch (file change by other user?)\n")
    );
    h.shutdown().await;
}

/// `driftless-sandbox serve` with fault flags, and `driftless plan` pointed at it through the
/// env file it writes.
#[test]
fn serve_takes_the_fault_knobs_as_flags() {
    let bad = std::process::Command::new(testkit::sandbox_bin())
        .args(["serve", "--state", "/nonexistent", "--error-rate", "2"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--error-rate 2 is not a fraction"));

    let state = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new(testkit::sandbox_bin())
        .args(["serve", "--state"])
        .arg(state.path())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--error-rate", "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let env_file = state.path().join(".sandbox/connection.env");
    let env = testkit::wait_until(std::time::Duration::from_secs(30), || {
        std::fs::read_to_string(&env_file).ok()
    })
    .expect("serve writes its connection settings");
    let mut plan = std::process::Command::new(testkit::driftless_bin());
    plan.args(["--repo"])
        .arg(testkit::example("homelab-k3s"))
        .args(["plan", "--guests-only"]);
    for line in env.lines() {
        if let Some((k, v)) = line.split_once('=') {
            plan.env(k, v.trim_matches('"'));
        }
    }
    let out = plan.output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "every request fails with --error-rate 1");
    assert!(stderr.contains("500"), "{stderr}");
}
