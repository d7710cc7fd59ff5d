//! The Kubernetes adapter (kube-rs) against the sandbox's simulated API server over real
//! HTTPS: readiness, node mapping, label and taint patches written back to the node files,
//! kube-system pods, authentication and certificate failures, and the server override.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use driftless::adapters::kube::KubeClient;
use driftless::ports::{KubeApi, KubeError, KubeNode, NodePatch, Taint};
use driftless_sandbox::cluster_state::{self, SimNode};
use driftless_sandbox::kube_api::{self, KubeApiHandle};

const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

async fn start(state: &Path) -> KubeApiHandle {
    kube_api::serve(state.to_path_buf(), SocketAddr::from(LOOPBACK), 7)
        .await
        .expect("the simulated API server starts")
}

fn kubeconfig(state: &Path) -> String {
    std::fs::read_to_string(cluster_state::admin_kubeconfig_path(state)).expect("admin.kubeconfig is written")
}

fn client(state: &Path) -> KubeClient {
    KubeClient::from_kubeconfig(kubeconfig(state).as_bytes(), None).expect("client from admin.kubeconfig")
}

fn node(name: &str, role: &str, version: &str) -> SimNode {
    SimNode {
        name: name.to_string(),
        vmid: None,
        internal_ip: "192.168.2.20".to_string(),
        kubelet_version: version.to_string(),
        role: role.to_string(),
        kubelet_running: true,
        ..SimNode::default()
    }
}

fn write(state: &Path, n: &SimNode) {
    cluster_state::write_node(state, n).expect("node file written");
}

fn find<'a>(nodes: &'a [KubeNode], name: &str) -> &'a KubeNode {
    nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("node {name} listed"))
}

#[tokio::test]
async fn readyz_fails_without_a_ready_control_plane_and_passes_once_one_is_ready() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    let kube = client(state.path());

    let err = kube.readyz().await.unwrap_err();
    match &err {
        KubeError::Api { status, message } => {
            assert_eq!(*status, 500);
            assert!(message.contains("[-]etcd failed"), "{message}");
            assert!(!message.contains("[+]ping"), "only the failing checks: {message}");
        }
        other => panic!("expected an API error, got {other:?}"),
    }

    // A worker alone does not make the API ready; a stopped control plane neither.
    write(state.path(), &node("k3s-worker-1", "agent", "v1.31.4+k3s1"));
    let mut master = node("k3s-master", "server", "v1.31.4+k3s1");
    master.kubelet_running = false;
    write(state.path(), &master);
    assert!(kube.readyz().await.is_err());

    master.kubelet_running = true;
    write(state.path(), &master);
    kube.readyz().await.expect("ready once the control plane node is Ready");

    api.shutdown().await;
}

#[tokio::test]
async fn nodes_map_readiness_versions_labels_and_taints() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;

    let mut cp = node("talos-cp-1", "controlplane", "v1.34.1");
    cp.labels.insert("topology.kubernetes.io/zone".into(), "rack-a".into());
    cp.taints = vec![Taint::parse("node-role.kubernetes.io/control-plane:NoSchedule").unwrap()];
    cp.annotations
        .insert("driftless.io/node-file".into(), "nodes/talos-cp-1.yaml".into());
    write(state.path(), &cp);
    write(state.path(), &node("talos-worker-1", "worker", "v1.34.1"));
    let mut stopped = node("talos-worker-2", "worker", "v1.34.1");
    stopped.kubelet_running = false;
    write(state.path(), &stopped);
    cluster_state::set_never_ready(state.path(), &["talos-worker-1"]).unwrap();

    let nodes = client(state.path()).nodes().await.expect("nodes listed");
    assert_eq!(nodes.len(), 3);

    let cp = find(&nodes, "talos-cp-1");
    assert!(cp.ready);
    assert_eq!(cp.not_ready_reason, None);
    assert_eq!(cp.kubelet_version, "v1.34.1");
    assert_eq!(cp.labels["topology.kubernetes.io/zone"], "rack-a");
    assert_eq!(cp.labels["kubernetes.io/hostname"], "talos-cp-1");
    assert!(cp.labels.contains_key("node-role.kubernetes.io/control-plane"));
    assert_eq!(cp.annotations["driftless.io/node-file"], "nodes/talos-cp-1.yaml");
    assert_eq!(
        cp.taints,
        vec![Taint {
            key: "node-role.kubernetes.io/control-plane".into(),
            value: None,
            effect: "NoSchedule".into()
        }]
    );

    let never = find(&nodes, "talos-worker-1");
    assert!(!never.ready);
    let reason = never.not_ready_reason.as_deref().unwrap_or_default();
    assert!(reason.contains("cni plugin not initialized"), "{reason}");
    assert!(!never.labels.contains_key("node-role.kubernetes.io/control-plane"));

    let stopped = find(&nodes, "talos-worker-2");
    assert!(!stopped.ready);
    assert_eq!(
        stopped.not_ready_reason.as_deref(),
        Some("Kubelet stopped posting node status.")
    );

    api.shutdown().await;
}

#[tokio::test]
async fn a_node_whose_guest_is_stopped_is_not_ready() {
    let state = tempfile::tempdir().unwrap();
    // The sandbox Proxmox's power file: guest 101 runs, 102 does not.
    std::fs::create_dir_all(state.path().join("nodes/pve/lxc")).unwrap();
    std::fs::create_dir_all(state.path().join(".sandbox")).unwrap();
    std::fs::write(
        state.path().join(".sandbox/status.json"),
        r#"{"guests": {"101": {"status": "running", "since": 0}}}"#,
    )
    .unwrap();
    let api = start(state.path()).await;
    let mut master = node("k3s-master", "server", "v1.31.4+k3s1");
    master.vmid = Some(101);
    write(state.path(), &master);
    let mut worker = node("k3s-worker-1", "agent", "v1.31.4+k3s1");
    worker.vmid = Some(102);
    write(state.path(), &worker);

    let nodes = client(state.path()).nodes().await.unwrap();
    assert!(find(&nodes, "k3s-master").ready);
    assert!(!find(&nodes, "k3s-worker-1").ready);

    api.shutdown().await;
}

#[tokio::test]
async fn patch_node_adds_and_removes_labels_and_replaces_taints_in_the_node_file() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    let mut worker = node("k3s-worker-1", "agent", "v1.31.4+k3s1");
    worker.labels.insert("old".into(), "x".into());
    worker.labels.insert("keep".into(), "y".into());
    worker.annotations.insert("note".into(), "hello".into());
    worker.taints = vec![Taint::parse("gpu=true:NoSchedule").unwrap()];
    write(state.path(), &worker);
    let kube = client(state.path());

    let mut patch = NodePatch::default();
    patch.labels.insert("tier".into(), Some("storage".into()));
    patch.labels.insert("old".into(), None);
    patch
        .annotations
        .insert("driftless.io/applied".into(), Some("abc123".into()));
    patch.taints = Some(vec![
        Taint::parse("dedicated=db:NoSchedule").unwrap(),
        Taint::parse("maintenance:NoExecute").unwrap(),
    ]);
    kube.patch_node("k3s-worker-1", &patch).await.expect("patched");

    let stored = cluster_state::read_node(state.path(), "k3s-worker-1").unwrap();
    assert_eq!(
        stored.labels,
        BTreeMap::from([
            ("keep".to_string(), "y".to_string()),
            ("tier".to_string(), "storage".to_string())
        ])
    );
    assert_eq!(stored.annotations["note"], "hello");
    assert_eq!(stored.annotations["driftless.io/applied"], "abc123");
    assert_eq!(
        stored.taints,
        vec![
            Taint::parse("dedicated=db:NoSchedule").unwrap(),
            Taint::parse("maintenance:NoExecute").unwrap()
        ]
    );
    // What the API serves afterwards is what was written.
    let nodes = kube.nodes().await.unwrap();
    let seen = find(&nodes, "k3s-worker-1");
    assert_eq!(seen.labels.get("tier").map(String::as_str), Some("storage"));
    assert!(!seen.labels.contains_key("old"));
    assert_eq!(seen.taints, stored.taints);

    // An empty taint list clears them; labels untouched.
    let clear = NodePatch {
        taints: Some(vec![]),
        ..NodePatch::default()
    };
    kube.patch_node("k3s-worker-1", &clear).await.unwrap();
    let stored = cluster_state::read_node(state.path(), "k3s-worker-1").unwrap();
    assert!(stored.taints.is_empty());
    assert_eq!(stored.labels["tier"], "storage");

    // An invalid taint effect is refused like kube-apiserver does, and nothing changes.
    let bad = NodePatch {
        taints: Some(vec![Taint::parse("x:Sometimes").unwrap()]),
        ..NodePatch::default()
    };
    match kube.patch_node("k3s-worker-1", &bad).await.unwrap_err() {
        KubeError::Api { status, message } => {
            assert_eq!(status, 422);
            assert!(message.contains("spec.taints[0].effect"), "{message}");
        }
        other => panic!("expected 422, got {other:?}"),
    }
    assert!(
        cluster_state::read_node(state.path(), "k3s-worker-1")
            .unwrap()
            .taints
            .is_empty()
    );

    // A node that does not exist.
    match kube.patch_node("nope", &patch).await.unwrap_err() {
        KubeError::Api { status, message } => {
            assert_eq!(status, 404);
            assert_eq!(message, "nodes \"nope\" not found");
        }
        other => panic!("expected 404, got {other:?}"),
    }

    api.shutdown().await;
}

#[tokio::test]
async fn kube_system_pods_follow_the_control_plane() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    let kube = client(state.path());
    let mut master = node("k3s-master", "server", "v1.31.4+k3s1");
    master.kubelet_running = false;
    write(state.path(), &master);

    let pods = kube.pods("kube-system").await.unwrap();
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    for app in ["coredns-", "local-path-provisioner-", "metrics-server-", "traefik-"] {
        assert!(names.iter().any(|n| n.starts_with(app)), "{app} in {names:?}");
    }
    assert!(pods.iter().all(|p| p.phase == "Pending" && !p.ready), "{pods:?}");

    master.kubelet_running = true;
    write(state.path(), &master);
    let pods = kube.pods("kube-system").await.unwrap();
    assert_eq!(pods.len(), 4);
    assert!(pods.iter().all(|p| p.phase == "Running" && p.ready), "{pods:?}");
    assert!(kube.pods("default").await.unwrap().is_empty());

    api.shutdown().await;
}

#[tokio::test]
async fn talos_kube_system_has_coredns_and_the_api_server_static_pod() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    write(state.path(), &node("talos-cp-1", "controlplane", "v1.34.1"));
    write(state.path(), &node("talos-worker-1", "worker", "v1.34.1"));

    let pods = client(state.path()).pods("kube-system").await.unwrap();
    assert!(pods.iter().any(|p| p.name.starts_with("coredns-")), "{pods:?}");
    let apiserver = pods
        .iter()
        .find(|p| p.name == "kube-apiserver-talos-cp-1")
        .expect("static pod");
    assert!(apiserver.ready && apiserver.phase == "Running");
    assert!(
        !pods.iter().any(|p| p.name.starts_with("traefik")),
        "no K3s components on Talos"
    );

    api.shutdown().await;
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized_and_the_token_is_not_in_the_error() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));
    let wrong = "wrong-token-0123456789abcdef";
    let yaml = kubeconfig(state.path()).replace(&api.token, wrong);
    assert!(yaml.contains(wrong));
    let kube = KubeClient::from_kubeconfig(yaml.as_bytes(), None).unwrap();

    let err = kube.nodes().await.unwrap_err();
    assert!(matches!(err, KubeError::Api { status: 401, .. }), "{err:?}");
    let text = format!("{err} {err:?} {kube:?}");
    assert!(!text.contains(wrong), "{text}");
    assert!(!text.contains(&api.token), "{text}");
    let err = kube.readyz().await.unwrap_err();
    assert!(matches!(err, KubeError::Api { status: 401, .. }), "{err:?}");

    // The right client's Debug and the handle's Debug do not show the token either.
    let right = client(state.path());
    assert!(!format!("{right:?} {api:?}").contains(&api.token));
    right.readyz().await.unwrap();

    api.shutdown().await;
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_a_transport_error() {
    let state = tempfile::tempdir().unwrap();
    let other_state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    let other = start(other_state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));

    // The other server's kubeconfig (its CA) pointed at the first server.
    let kube = KubeClient::from_kubeconfig(kubeconfig(other_state.path()).as_bytes(), Some(&api.url)).unwrap();
    match kube.nodes().await.unwrap_err() {
        KubeError::Transport { server, message } => {
            assert_eq!(server, api.url);
            assert!(message.to_lowercase().contains("certificate"), "{message}");
        }
        other => panic!("expected a transport error, got {other:?}"),
    }

    api.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn server_override_reaches_the_api_when_the_kubeconfig_names_an_unreachable_address() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));
    let yaml = kubeconfig(state.path()).replace(&api.url, "https://10.255.255.1:6443");
    assert!(yaml.contains("https://10.255.255.1:6443"));

    let kube = KubeClient::from_kubeconfig(yaml.as_bytes(), Some(&api.url)).unwrap();
    assert_eq!(kube.server(), api.url);
    kube.readyz().await.unwrap();
    let nodes = kube.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].kubelet_version, "v1.31.4+k3s1");

    api.shutdown().await;
}

#[tokio::test]
async fn kubeconfigs_that_would_skip_verification_or_run_commands_are_refused() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    let yaml = kubeconfig(state.path());

    // No CA: refused rather than trusting anything.
    let no_ca: String = yaml
        .lines()
        .filter(|l| !l.contains("certificate-authority-data"))
        .map(|l| format!("{l}\n"))
        .collect();
    let err = KubeClient::from_kubeconfig(no_ca.as_bytes(), None).unwrap_err();
    assert!(err.to_string().contains("certificate-authority"), "{err}");

    // A token file would send a local file to whoever serves the API.
    let token_file = yaml.replace(&format!("token: {}", api.token), "tokenFile: /etc/shadow");
    let err = KubeClient::from_kubeconfig(token_file.as_bytes(), None).unwrap_err();
    assert!(err.to_string().contains("tokenFile"), "{err}");

    // Plain HTTP would send the token in clear.
    let err = KubeClient::from_kubeconfig(yaml.as_bytes(), Some("http://127.0.0.1:6443")).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");

    api.shutdown().await;
}

#[tokio::test]
async fn raw_http_answers_like_kube_apiserver() {
    let state = tempfile::tempdir().unwrap();
    let api = start(state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));
    let ca = reqwest::Certificate::from_pem(api.ca_pem.as_bytes()).unwrap();
    let http = reqwest::Client::builder().tls_certs_only([ca]).build().unwrap();
    let url = |p: &str| format!("{}{p}", api.url);
    let bearer = format!("Bearer {}", api.token);

    // No token: the Status object kube-apiserver sends.
    let r = http.get(url("/api/v1/nodes")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    );

    let get = |p: &str| http.get(url(p)).header("authorization", &bearer).send();
    let r = get("/readyz?verbose").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with("[+]ping ok\n") && text.ends_with("readyz check passed\n"),
        "{text}"
    );
    assert_eq!(get("/readyz").await.unwrap().text().await.unwrap(), "ok");

    let version: serde_json::Value = get("/version").await.unwrap().json().await.unwrap();
    assert_eq!(version["gitVersion"], "v1.31.4+k3s1");
    assert_eq!(version["minor"], "31");

    let r = get("/api/v1/nodes/ghost").await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "NotFound");
    assert_eq!(body["details"]["name"], "ghost");
    assert_eq!(get("/apis/apps/v1/deployments").await.unwrap().status().as_u16(), 404);

    // kubectl label sends a strategic merge patch; a JSON patch is not understood.
    let patch = |ct: &'static str, body: &'static str| {
        http.patch(url("/api/v1/nodes/k3s-master"))
            .header("authorization", &bearer)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let r = patch(
        "application/strategic-merge-patch+json",
        r#"{"metadata":{"labels":{"disk":"ssd"}}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let node: serde_json::Value = r.json().await.unwrap();
    assert_eq!(node["metadata"]["labels"]["disk"], "ssd");
    assert_eq!(
        cluster_state::read_node(state.path(), "k3s-master").unwrap().labels["disk"],
        "ssd"
    );
    let r = patch(
        "application/json-patch+json",
        r#"[{"op":"remove","path":"/metadata/labels/disk"}]"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 415);

    // A stale resourceVersion is a conflict, as with optimistic concurrency.
    let r = patch(
        "application/merge-patch+json",
        r#"{"metadata":{"resourceVersion":"1","labels":{"disk":"hdd"}}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    assert_eq!(
        cluster_state::read_node(state.path(), "k3s-master").unwrap().labels["disk"],
        "ssd"
    );

    api.shutdown().await;
}
