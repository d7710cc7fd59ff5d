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
    // TEST-NET-1 (RFC 5737): documentation addresses, never routed; nothing is sent there.
    let yaml = kubeconfig(state.path()).replace(&api.url, "https://192.0.2.1:6443");
    assert!(yaml.contains("https://192.0.2.1:6443"));

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
    // A group no CRD serves.
    assert_eq!(
        get("/apis/example.com/v1/widgets").await.unwrap().status().as_u16(),
        404
    );

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

// ---- the API a real client uses: discovery, the object store, apply, controllers, kubectl ----

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};

/// A kube-rs client from the sandbox's admin kubeconfig.
async fn kube_client(state: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(cluster_state::admin_kubeconfig_path(state)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn api(client: &kube::Client, ar: &ApiResource, ns: Option<&str>) -> Api<DynamicObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

fn configmaps() -> ApiResource {
    resource("", "v1", "ConfigMap", "configmaps")
}

fn deployments() -> ApiResource {
    resource("apps", "v1", "Deployment", "deployments")
}

fn obj(v: Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

fn value(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap()
}

/// Poll `f` every 100 ms until it gives `Some`, for at most 20 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn get_json(client: &kube::Client, path: &str) -> Result<Value, kube::Error> {
    let req = axum::http::Request::get(path).body(Vec::new()).unwrap();
    client.request::<Value>(req).await
}

fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}}}}}],
        },
    })
}

fn deployment(name: &str, ns: &str, replicas: u32, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": name, "image": image}]}},
        },
    })
}

#[tokio::test]
async fn discovery_lists_the_built_in_groups_and_a_crds_kind_once_it_is_established() {
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));
    let client = kube_client(state.path()).await;

    let core = get_json(&client, "/api/v1").await.unwrap();
    let names: Vec<&str> = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for r in [
        "namespaces",
        "nodes",
        "pods",
        "services",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "events",
    ] {
        assert!(names.contains(&r), "{r} in {names:?}");
    }
    assert_eq!(get_json(&client, "/api").await.unwrap()["versions"], json!(["v1"]));
    let groups = get_json(&client, "/apis").await.unwrap();
    assert_eq!(groups["kind"], "APIGroupList");
    let group_names: Vec<&str> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    for g in [
        "apps",
        "batch",
        "apiextensions.k8s.io",
        "rbac.authorization.k8s.io",
        "coordination.k8s.io",
        "networking.k8s.io",
        "policy",
        "admissionregistration.k8s.io",
        "helm.cattle.io",
    ] {
        assert!(group_names.contains(&g), "{g} in {group_names:?}");
    }
    assert!(!group_names.contains(&"example.com"));
    let apps = client.list_api_group_resources("apps/v1").await.unwrap();
    let deploy = apps.resources.iter().find(|r| r.name == "deployments").unwrap();
    assert_eq!(deploy.kind, "Deployment");
    assert!(deploy.namespaced);
    assert!(apps.resources.iter().any(|r| r.name == "deployments/status"));
    for kind in ["daemonsets", "statefulsets", "replicasets"] {
        assert!(apps.resources.iter().any(|r| r.name == kind), "{kind}");
    }

    let crds = resource(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
    );
    api(&client, &crds, None)
        .create(&PostParams::default(), &obj(widget_crd()))
        .await
        .unwrap();
    let established = eventually("the CRD to be Established", || async {
        let crd = api(&client, &crds, None).get("widgets.example.com").await.ok()?;
        let v = value(&crd);
        let ok = v["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        ok.then_some(v)
    })
    .await;
    assert_eq!(established["status"]["acceptedNames"]["kind"], "Widget");
    let list = client.list_api_group_resources("example.com/v1").await.unwrap();
    let widgets = list.resources.iter().find(|r| r.name == "widgets").unwrap();
    assert_eq!(widgets.kind, "Widget");
    assert_eq!(widgets.short_names, Some(vec!["wd".to_string()]));
    let groups = get_json(&client, "/apis").await.unwrap();
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "example.com")
    );

    // Its custom resources are stored like any object.
    let ar = resource("example.com", "v1", "Widget", "widgets");
    let w = api(&client, &ar, Some("default"))
        .create(
            &PostParams::default(),
            &obj(json!({"apiVersion": "example.com/v1", "kind": "Widget",
                        "metadata": {"name": "blue"}, "spec": {"size": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(w.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(w.metadata.generation, Some(1));
    assert!(w.metadata.uid.is_some() && w.metadata.creation_timestamp.is_some());

    api_server.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_creates_updates_conflicts_and_forces() {
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    let client = kube_client(state.path()).await;
    let cms = api(&client, &configmaps(), Some("default"));
    let cm = |data: Value| {
        obj(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "default"},
                   "data": data}),
        )
    };
    let apply = |m: &str| PatchParams::apply(m);

    let created = cms
        .patch(
            "settings",
            &apply("driftless"),
            &Patch::Apply(&cm(json!({"a": "1", "b": "2"}))),
        )
        .await
        .unwrap();
    let managed = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(managed.len(), 1);
    assert_eq!(managed[0].manager.as_deref(), Some("driftless"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));
    let fields = serde_json::to_value(&managed[0].fields_v1).unwrap();
    assert_eq!(fields, json!({"f:data": {"f:a": {}, "f:b": {}}}));
    let rv1 = created.metadata.resource_version.clone().unwrap();

    // The same configuration again changes nothing, not even the resourceVersion.
    let again = cms
        .patch(
            "settings",
            &apply("driftless"),
            &Patch::Apply(&cm(json!({"a": "1", "b": "2"}))),
        )
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version.as_deref(), Some(rv1.as_str()));

    // An update, and a field no longer applied is removed.
    let updated = cms
        .patch("settings", &apply("driftless"), &Patch::Apply(&cm(json!({"a": "10"}))))
        .await
        .unwrap();
    assert_eq!(value(&updated)["data"], json!({"a": "10"}));
    assert_ne!(updated.metadata.resource_version.as_deref(), Some(rv1.as_str()));

    // Another manager changing a field driftless owns: 409 with the field in the causes.
    let err = cms
        .patch("settings", &apply("helm"), &Patch::Apply(&cm(json!({"a": "20"}))))
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!(status.code, 409);
    assert_eq!(status.reason, "Conflict");
    assert_eq!(
        status.message,
        "Apply failed with 1 conflict: conflict with \"driftless\": .data.a"
    );
    let causes = status.details.unwrap().causes;
    assert_eq!(causes.len(), 1);
    assert_eq!(causes[0].reason, "FieldManagerConflict");
    assert_eq!(causes[0].field, ".data.a");
    assert_eq!(causes[0].message, "conflict with \"driftless\"");
    assert_eq!(value(&cms.get("settings").await.unwrap())["data"]["a"], "10");

    // The same value is shared ownership, not a conflict; a new field is helm's alone.
    cms.patch(
        "settings",
        &apply("helm"),
        &Patch::Apply(&cm(json!({"a": "10", "c": "3"}))),
    )
    .await
    .unwrap();

    // Forced: the value changes hands.
    let forced = cms
        .patch(
            "settings",
            &apply("helm").force(),
            &Patch::Apply(&cm(json!({"a": "20"}))),
        )
        .await
        .unwrap();
    assert_eq!(value(&forced)["data"], json!({"a": "20"}));
    let owners: Vec<(String, Value)> = forced
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .map(|m| (m.manager.unwrap(), serde_json::to_value(m.fields_v1).unwrap()))
        .collect();
    assert!(
        !owners.iter().any(|(m, _)| m == "driftless"),
        "driftless lost its only field: {owners:?}"
    );

    // A merge patch by a manager takes the fields it changes; the next apply conflicts.
    cms.patch(
        "settings",
        &PatchParams {
            field_manager: Some("kubectl-edit".into()),
            ..PatchParams::default()
        },
        &Patch::Merge(json!({"data": {"a": "30"}})),
    )
    .await
    .unwrap();
    let err = cms
        .patch("settings", &apply("helm"), &Patch::Apply(&cm(json!({"a": "40"}))))
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!(status.code, 409);
    assert!(
        status.message.contains("conflict with \"kubectl-edit\" using v1"),
        "{}",
        status.message
    );

    // Apply without a field manager is refused as the API does.
    let req = axum::http::Request::patch("/api/v1/namespaces/default/configmaps/settings")
        .header("content-type", "application/apply-patch+yaml")
        .body(serde_json::to_vec(&value(&cm(json!({"a": "1"})))).unwrap())
        .unwrap();
    let status = api_error(client.request::<Value>(req).await.unwrap_err());
    assert_eq!(status.code, 422);

    // A Deployment's generation moves with its spec, not with its metadata.
    let deploys = api(&client, &deployments(), Some("default"));
    let d = deploys
        .patch(
            "web",
            &apply("driftless"),
            &Patch::Apply(&obj(deployment("web", "default", 1, "nginx:1"))),
        )
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(1));
    let mut labelled = deployment("web", "default", 1, "nginx:1");
    labelled["metadata"]["labels"]["tier"] = json!("front");
    let d = deploys
        .patch("web", &apply("driftless"), &Patch::Apply(&obj(labelled)))
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(1));
    let d = deploys
        .patch(
            "web",
            &apply("driftless"),
            &Patch::Apply(&obj(deployment("web", "default", 1, "nginx:2"))),
        )
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(2));
    assert!(value(&d)["metadata"]["labels"].get("tier").is_none());
    let fields = serde_json::to_value(&d.metadata.managed_fields.unwrap()[0].fields_v1).unwrap();
    assert_eq!(
        fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"],
        json!({".": {}, "f:image": {}, "f:name": {}})
    );

    api_server.shutdown().await;
}

#[tokio::test]
async fn dry_run_answers_with_the_object_and_stores_nothing() {
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    let client = kube_client(state.path()).await;
    let cms = api(&client, &configmaps(), Some("default"));
    let cm = obj(json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "probe", "namespace": "default"}, "data": {"k": "v"}}));

    let would = cms
        .patch("probe", &PatchParams::apply("driftless").dry_run(), &Patch::Apply(&cm))
        .await
        .unwrap();
    assert_eq!(value(&would)["data"]["k"], "v");
    assert!(would.metadata.uid.is_some());
    let created = cms
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &cm,
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.name.as_deref(), Some("probe"));
    assert_eq!(api_error(cms.get("probe").await.unwrap_err()).code, 404);

    // On an existing object: the change is answered, not made.
    cms.patch("probe", &PatchParams::apply("driftless"), &Patch::Apply(&cm))
        .await
        .unwrap();
    let mut changed = value(&cm);
    changed["data"]["k"] = json!("w");
    let would = cms
        .patch(
            "probe",
            &PatchParams::apply("driftless").dry_run(),
            &Patch::Apply(&obj(changed)),
        )
        .await
        .unwrap();
    assert_eq!(value(&would)["data"]["k"], "w");
    assert_eq!(value(&cms.get("probe").await.unwrap())["data"]["k"], "v");
    let dp = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    cms.delete("probe", &dp).await.unwrap();
    assert!(cms.get("probe").await.is_ok());

    api_server.shutdown().await;
}

#[tokio::test]
async fn pruning_by_label_selector_deletes_only_the_inventory() {
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    let client = kube_client(state.path()).await;
    let cms = api(&client, &configmaps(), Some("default"));
    for (name, inventory) in [
        ("one", Some("addons")),
        ("two", Some("addons")),
        ("three", Some("other")),
        ("four", None),
    ] {
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"x": "y"}});
        if let Some(i) = inventory {
            cm["metadata"]["labels"] = json!({"driftless.io/inventory": i});
        }
        cms.patch(name, &PatchParams::apply("driftless"), &Patch::Apply(&obj(cm)))
            .await
            .unwrap();
    }
    let names = |l: Vec<DynamicObject>| {
        let mut n: Vec<String> = l.into_iter().filter_map(|o| o.metadata.name).collect();
        n.sort();
        n
    };
    let selected = cms
        .list(&ListParams::default().labels("driftless.io/inventory=addons"))
        .await
        .unwrap();
    assert_eq!(names(selected.items), ["one", "two"]);
    let inventory = cms
        .list(&ListParams::default().labels("driftless.io/inventory"))
        .await
        .unwrap();
    assert_eq!(names(inventory.items), ["one", "three", "two"]);
    let not_addons = cms
        .list(&ListParams::default().labels("driftless.io/inventory notin (addons),driftless.io/inventory"))
        .await
        .unwrap();
    assert_eq!(names(not_addons.items), ["three"]);
    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=four"))
        .await
        .unwrap();
    assert_eq!(names(by_name.items), ["four"]);

    // One by one: a Status for what is gone.
    let gone = cms.delete("one", &DeleteParams::default()).await.unwrap();
    let status = gone.right().expect("deleted at once: a Status");
    assert_eq!(status.details.unwrap().name, "one");
    assert_eq!(
        api_error(cms.delete("one", &DeleteParams::default()).await.unwrap_err()).code,
        404
    );
    // As a collection.
    let deleted = cms
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("driftless.io/inventory=addons"),
        )
        .await
        .unwrap();
    let list = deleted.left().expect("the deleted items");
    assert_eq!(names(list.items), ["two"]);
    let left = cms.list(&ListParams::default()).await.unwrap();
    let left = names(left.items);
    assert!(
        left.contains(&"three".to_string()) && left.contains(&"four".to_string()),
        "{left:?}"
    );
    assert!(!left.contains(&"two".to_string()), "{left:?}");

    api_server.shutdown().await;
}

#[tokio::test]
async fn a_deployment_rolls_out_after_a_moment_and_its_pods_are_listed() {
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));
    let client = kube_client(state.path()).await;
    let deploys = api(&client, &deployments(), Some("default"));
    let d = deploys
        .patch(
            "web",
            &PatchParams::apply("driftless"),
            &Patch::Apply(&obj(deployment("web", "default", 2, "nginx:1"))),
        )
        .await
        .unwrap();
    // Not at once.
    assert!(value(&d)["status"].get("readyReplicas").is_none(), "{:?}", d.data);

    let rolled = eventually("the Deployment to roll out", || async {
        let v = value(&deploys.get("web").await.ok()?);
        let s = &v["status"];
        (s["observedGeneration"] == v["metadata"]["generation"]
            && s["readyReplicas"] == 2
            && s["updatedReplicas"] == 2
            && s["availableReplicas"] == 2)
            .then_some(v)
    })
    .await;
    let conditions = rolled["status"]["conditions"].as_array().unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Available" && c["status"] == "True")
    );
    let progressing = conditions.iter().find(|c| c["type"] == "Progressing").unwrap();
    assert_eq!(progressing["reason"], "NewReplicaSetAvailable");

    // The product's client sees its pods, Running.
    let pods = client_for(state.path()).pods("default").await.unwrap();
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert!(
        pods.iter()
            .all(|p| p.name.starts_with("web-") && p.phase == "Running" && p.ready)
    );

    // A new spec is a new generation, observed once rolled out again.
    let d = deploys
        .patch(
            "web",
            &PatchParams::apply("driftless"),
            &Patch::Apply(&obj(deployment("web", "default", 3, "nginx:2"))),
        )
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(2));
    eventually("the new generation to roll out", || async {
        let v = value(&deploys.get("web").await.ok()?);
        (v["status"]["observedGeneration"] == 2 && v["status"]["readyReplicas"] == 3).then_some(())
    })
    .await;
    // All namespaces: the workload's pods and kube-system's.
    let all: Vec<String> = Api::<k8s_openapi::api::core::v1::Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| format!("{}/{}", p.metadata.namespace.unwrap(), p.metadata.name.unwrap()))
        .collect();
    assert_eq!(
        all.iter().filter(|p| p.starts_with("default/web-")).count(),
        3,
        "{all:?}"
    );
    assert!(all.iter().any(|p| p.starts_with("kube-system/coredns-")), "{all:?}");

    api_server.shutdown().await;
}

fn client_for(state: &Path) -> KubeClient {
    client(state)
}

#[tokio::test]
async fn a_job_completes_and_a_helm_chart_is_installed_by_k3s_helm_controller() {
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));
    let client = kube_client(state.path()).await;
    let jobs = api(&client, &resource("batch", "v1", "Job", "jobs"), Some("default"));
    jobs.create(
        &PostParams::default(),
        &obj(
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate"},
                    "spec": {"template": {"spec": {"restartPolicy": "Never",
                        "containers": [{"name": "m", "image": "busybox", "command": ["true"]}]}}}}),
        ),
    )
    .await
    .unwrap();
    let done = eventually("the Job to complete", || async {
        let v = value(&jobs.get("migrate").await.ok()?);
        let complete = v["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Complete" && c["status"] == "True");
        complete.then_some(v)
    })
    .await;
    assert_eq!(done["status"]["succeeded"], 1);
    assert!(done["status"]["completionTime"].is_string());

    let charts = api(
        &client,
        &resource("helm.cattle.io", "v1", "HelmChart", "helmcharts"),
        Some("kube-system"),
    );
    charts
        .patch(
            "metallb",
            &PatchParams::apply("driftless"),
            &Patch::Apply(&obj(json!({
                "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart",
                "metadata": {"name": "metallb", "namespace": "kube-system"},
                "spec": {"repo": "https://metallb.github.io/metallb", "chart": "metallb", "version": "0.14.9",
                         "targetNamespace": "metallb-system", "createNamespace": true,
                         "valuesContent": "speaker:\n  frr:\n    enabled: false\n"},
            }))),
        )
        .await
        .unwrap();
    let chart = eventually("the HelmChart's Job", || async {
        let v = value(&charts.get("metallb").await.ok()?);
        (v["status"]["jobName"] == "helm-install-metallb").then_some(v)
    })
    .await;
    let created = chart["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "JobCreated")
        .unwrap()
        .clone();
    assert_eq!(created["status"], "True");
    let kube_system_jobs = api(&client, &resource("batch", "v1", "Job", "jobs"), Some("kube-system"));
    let job = value(&kube_system_jobs.get("helm-install-metallb").await.unwrap());
    assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "HelmChart");
    let env = job["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains("metallb-system") && env.contains("0.14.9"), "{env}");
    let secrets = api(
        &client,
        &resource("", "v1", "Secret", "secrets"),
        Some("metallb-system"),
    );
    let release = eventually("Helm's release record", || async {
        secrets.get("sh.helm.release.v1.metallb.v1").await.ok()
    })
    .await;
    let release = value(&release);
    assert_eq!(release["type"], "helm.sh/release.v1");
    assert_eq!(release["metadata"]["labels"]["status"], "deployed");

    // Deleting the chart takes its Job (garbage collection) and its release away.
    charts.delete("metallb", &DeleteParams::default()).await.unwrap();
    eventually("the install Job to be collected", || async {
        kube_system_jobs
            .get("helm-install-metallb")
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(secrets.get("sh.helm.release.v1.metallb.v1").await.is_err());

    api_server.shutdown().await;
}

/// The cilium-install Job of Talos's "Deploying Cilium CNI" guide (the Cilium CLI in a Job).
fn cilium_install_job() -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "cilium-install", "namespace": "kube-system"},
        "spec": {"backoffLimit": 10, "template": {
            "metadata": {"labels": {"app": "cilium-install"}},
            "spec": {
                "restartPolicy": "OnFailure",
                "tolerations": [{"operator": "Exists"}, {"effect": "NoSchedule", "operator": "Exists"}],
                "serviceAccountName": "cilium-install",
                "hostNetwork": true,
                "containers": [{
                    "name": "cilium-install", "image": "quay.io/cilium/cilium-cli:latest",
                    "command": ["cilium", "install", "--version=1.18.0", "--set", "ipam.mode=kubernetes",
                                "--set", "kubeProxyReplacement=true"],
                }],
            },
        }},
    })
}

#[tokio::test]
async fn a_talos_cluster_without_a_cni_is_not_ready_until_the_cilium_install_job_runs() {
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    write(state.path(), &node("talos-cp-1", "controlplane", "v1.34.1"));
    write(state.path(), &node("talos-worker-1", "worker", "v1.34.1"));
    // What the Talos API records for `cluster.network.cni.name: none`.
    cluster_state::set_builtin_cni(state.path(), cluster_state::BuiltinCni::None).unwrap();
    let kube = client(state.path());

    // Without the rule (the sandbox's default for now) the nodes are Ready as before.
    assert!(kube.nodes().await.unwrap().iter().all(|n| n.ready));
    cluster_state::set_require_cni(state.path(), true).unwrap();
    let nodes = kube.nodes().await.unwrap();
    assert!(nodes.iter().all(|n| !n.ready), "{nodes:?}");
    let reason = nodes[0].not_ready_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("NetworkPluginNotReady") && reason.contains("cni plugin not initialized"),
        "{reason}"
    );
    // The API server itself runs (it needs no pod network).
    kube.readyz().await.unwrap();

    // A workload on the pod network cannot start.
    let client = kube_client(state.path()).await;
    let deploys = api(&client, &deployments(), Some("default"));
    deploys
        .patch(
            "web",
            &PatchParams::apply("driftless"),
            &Patch::Apply(&obj(deployment("web", "default", 1, "nginx:1"))),
        )
        .await
        .unwrap();
    let jobs = api(&client, &resource("batch", "v1", "Job", "jobs"), Some("kube-system"));
    jobs.patch(
        "cilium-install",
        &PatchParams::apply("driftless"),
        &Patch::Apply(&obj(cilium_install_job())),
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        value(&deploys.get("web").await.unwrap())["status"]
            .get("readyReplicas")
            .is_none()
    );

    // The Job (host network) runs, leaves Cilium's DaemonSet, which rolls out: Ready.
    eventually("the nodes to become Ready", || async {
        kube.nodes().await.ok()?.iter().all(|n| n.ready).then_some(())
    })
    .await;
    let daemonsets = api(
        &client,
        &resource("apps", "v1", "DaemonSet", "daemonsets"),
        Some("kube-system"),
    );
    let cilium = eventually("Cilium's DaemonSet to roll out", || async {
        let v = value(&daemonsets.get("cilium").await.ok()?);
        (v["status"]["numberReady"] == 2).then_some(v)
    })
    .await;
    assert_eq!(cilium["metadata"]["labels"]["k8s-app"], "cilium");
    assert!(
        cilium["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .ends_with(":v1.18.0")
    );
    assert_eq!(cilium["status"]["desiredNumberScheduled"], 2);
    let pods = kube.pods("kube-system").await.unwrap();
    assert_eq!(
        pods.iter()
            .filter(|p| p.name.starts_with("cilium-")
                && !p.name.starts_with("cilium-install")
                && !p.name.starts_with("cilium-operator"))
            .count(),
        2,
        "{pods:?}"
    );
    // And the workload on the pod network now starts.
    eventually("the Deployment to roll out", || async {
        (value(&deploys.get("web").await.ok()?)["status"]["readyReplicas"] == 1).then_some(())
    })
    .await;

    api_server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_namespace_removes_what_it_holds() {
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));
    let client = kube_client(state.path()).await;
    let namespaces = api(&client, &resource("", "v1", "Namespace", "namespaces"), None);

    // Objects in a namespace that does not exist: 404 for the namespace, as the API.
    let cms = api(&client, &configmaps(), Some("addons"));
    let cm = obj(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}));
    let status = api_error(cms.create(&PostParams::default(), &cm).await.unwrap_err());
    assert_eq!(status.code, 404);
    assert_eq!(status.message, "namespaces \"addons\" not found");

    namespaces
        .create(
            &PostParams::default(),
            &obj(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "addons"}})),
        )
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    api(&client, &deployments(), Some("addons"))
        .patch(
            "web",
            &PatchParams::apply("driftless"),
            &Patch::Apply(&obj(deployment("web", "addons", 1, "nginx:1"))),
        )
        .await
        .unwrap();
    // The namespace controller gave it its default ServiceAccount.
    let sas = api(
        &client,
        &resource("", "v1", "ServiceAccount", "serviceaccounts"),
        Some("addons"),
    );
    eventually("the default ServiceAccount", || async { sas.get("default").await.ok() }).await;

    let ns = namespaces.delete("addons", &DeleteParams::default()).await.unwrap();
    let ns = ns.left().expect("a namespace is deleted gracefully: the object");
    assert_eq!(value(&ns)["status"]["phase"], "Terminating");
    eventually("the namespace to go", || async {
        namespaces.get("addons").await.is_err().then_some(())
    })
    .await;
    let everything = api(&client, &configmaps(), None)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        everything
            .items
            .iter()
            .all(|c| c.metadata.namespace.as_deref() != Some("addons")),
        "{:?}",
        everything.items
    );
    let deploys = api(&client, &deployments(), None)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(deploys.items.is_empty());
    assert!(kube_client(state.path()).await.apiserver_version().await.is_ok());
    // The built-in namespaces cannot be deleted.
    let status = api_error(
        namespaces
            .delete("kube-system", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 403);

    api_server.shutdown().await;
}

/// `kubectl` with the sandbox's kubeconfig: what a person would run against it.
#[tokio::test]
async fn kubectl_gets_applies_labels_and_deletes() {
    let probe = tokio::process::Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .await;
    let Some(probe) = probe.ok().filter(|o| o.status.success()) else {
        eprintln!("SKIPPED kubectl_gets_applies_labels_and_deletes: kubectl is not installed (.ci/run installs it)");
        return;
    };
    let version: Value = serde_json::from_slice(&probe.stdout).unwrap();
    let minor: u32 = version["clientVersion"]["minor"]
        .as_str()
        .unwrap_or("0")
        .trim_end_matches('+')
        .parse()
        .unwrap_or(0);
    let state = tempfile::tempdir().unwrap();
    let api_server = start(state.path()).await;
    write(state.path(), &node("k3s-master", "server", "v1.31.4+k3s1"));
    let kubeconfig = cluster_state::admin_kubeconfig_path(state.path());
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(text.contains(&format!("server: {}", api_server.url)) && api_server.url.starts_with("https://127.0.0.1:"));
    let home = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let kubectl = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        let home = home.path().to_path_buf();
        async move {
            let out = tokio::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(&args)
                .env("HOME", &home)
                .env_remove("KUBECONFIG")
                .output()
                .await
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "kubectl {}: {text}", args.join(" "));
            text
        }
    };
    let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    // kubectl before 1.27 validates with /openapi/v2 (protobuf), which the sandbox does not serve.
    let validate = if minor >= 27 { "" } else { " --validate=false" };

    let nodes = kubectl(args("get nodes")).await;
    assert!(nodes.contains("k3s-master") && nodes.contains("Ready"), "{nodes}");

    let app = files.path().join("app.yaml");
    std::fs::write(
        &app,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: default\nspec:\n  replicas: 2\n  \
         selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      \
         containers:\n      - name: web\n        image: nginx:1.27\n---\n"
            .to_string()
            + &serde_yaml_text(&widget_crd()),
    )
    .unwrap();
    let widget = files.path().join("widget.yaml");
    std::fs::write(
        &widget,
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: blue\n  namespace: default\nspec:\n  size: 3\n",
    )
    .unwrap();
    let out = kubectl(args(&format!("apply -f {}{validate}", app.display()))).await;
    assert!(out.contains("deployment.apps/web created"), "{out}");
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/widgets.example.com created"),
        "{out}"
    );
    let established =
        args("get crd widgets.example.com -o jsonpath={.status.conditions[?(@.type==\"Established\")].status}");
    for _ in 0..100 {
        if kubectl(established.clone()).await.trim() == "True" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let out = kubectl(args(&format!("apply -f {}{validate}", widget.display()))).await;
    assert!(out.contains("widget.example.com/blue created"), "{out}");
    let out = kubectl(args(&format!("apply --server-side -f {}{validate}", widget.display()))).await;
    assert!(out.contains("serverside-applied"), "{out}");
    let out = kubectl(args("get widgets")).await;
    assert!(out.contains("blue"), "{out}");

    kubectl(args("label node k3s-master disk=ssd")).await;
    assert_eq!(
        cluster_state::read_node(state.path(), "k3s-master").unwrap().labels["disk"],
        "ssd"
    );

    let mut pods = String::new();
    for _ in 0..100 {
        pods = kubectl(args("get pods -A")).await;
        if pods.matches("Running").count() >= 6 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        pods.contains("NAMESPACE") && pods.contains("kube-system") && pods.contains("coredns-"),
        "{pods}"
    );
    assert_eq!(
        pods.lines()
            .filter(|l| l.starts_with("default") && l.contains("web-") && l.contains("Running"))
            .count(),
        2,
        "{pods}"
    );

    let out = kubectl(args(&format!("delete -f {} -f {}", widget.display(), app.display()))).await;
    assert!(out.contains("deleted"), "{out}");
    let client = kube_client(state.path()).await;
    assert!(api(&client, &deployments(), Some("default")).get("web").await.is_err());
    let out = kubectl(args("get deployments -A")).await;
    assert!(out.contains("No resources found"), "{out}");

    api_server.shutdown().await;
}

/// YAML for kubectl (JSON is YAML).
fn serde_yaml_text(v: &Value) -> String {
    format!("{v}\n")
}

/// Leader election rests on this: one write wins a race, the others get 409, as from
/// kube-apiserver.
#[tokio::test]
async fn leases_are_written_with_optimistic_concurrency() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    let state = tempfile::tempdir().unwrap();
    let _api = start(state.path()).await;
    let client = kube_client(state.path()).await;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let lease = |holder: &str| Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("driftless".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    };

    let created = leases.create(&PostParams::default(), &lease("a")).await.unwrap();
    let status = api_error(leases.create(&PostParams::default(), &lease("b")).await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (409, "AlreadyExists"));

    // Two replicas replace the lease they both read: one wins, the other is refused.
    let read = leases.get("driftless").await.unwrap();
    assert_eq!(read.metadata.resource_version, created.metadata.resource_version);
    let mut by_b = read.clone();
    by_b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let mut by_c = read.clone();
    by_c.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let pp = PostParams::default();
    let (b, c) = tokio::join!(
        leases.replace("driftless", &pp, &by_b),
        leases.replace("driftless", &pp, &by_c)
    );
    let (won, lost) = match (b, c) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        (b, c) => panic!("exactly one write wins: {b:?} {c:?}"),
    };
    let status = api_error(lost);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_ne!(won.metadata.resource_version, read.metadata.resource_version);
    let now = leases.get("driftless").await.unwrap();
    assert_eq!(now.spec.unwrap().holder_identity, won.spec.unwrap().holder_identity);

    // A stale resourceVersion stays stale; the current one writes.
    let status = api_error(leases.replace("driftless", &pp, &by_b).await.unwrap_err());
    assert_eq!(status.code, 409);
    let mut fresh = leases.get("driftless").await.unwrap();
    fresh.spec.as_mut().unwrap().holder_identity = Some("d".into());
    let written = leases.replace("driftless", &pp, &fresh).await.unwrap();
    assert_eq!(written.spec.unwrap().holder_identity.as_deref(), Some("d"));
}
