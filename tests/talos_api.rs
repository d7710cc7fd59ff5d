//! The Talos API client (`adapters::talos::TalosClient`) against the sandbox's simulated Talos
//! API (`sandbox::talos_api`) on loopback, with the machine configs driftless renders for
//! examples/homelab-talos, filled from a generated secrets bundle: maintenance mode, the first
//! apply, mTLS with the talosconfig, dry runs and their diffs, bootstrap, the kubeconfig, the
//! schema check, credentials of another cluster, and impostors (`talos_api::serve_impostor`)
//! at a node's address: what the client tells apart, and that they are sent nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use driftless::adapters::talos::TalosClient;
use driftless::cluster::talos_secrets::{self, TalosSecrets};
use driftless::model::{LoadOptions, RepoFiles};
use driftless::ports::{TalosApi, TalosApplyMode, TalosError, TalosNodeState};
use driftless::render::ArtifactKind;
use driftless_sandbox::cluster_state;
use driftless_sandbox::talos_api::{self, ImpostorKind, TalosApiHandle};

const CP: &str = "10.0.0.10";
const WORKER: &str = "10.0.0.21";
const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\nclusters: []\n# the simulated API server's admin kubeconfig\n";

// ------------------------------------------------------------------------------- rendering

fn example() -> RepoFiles {
    let dir = testkit::root().join("examples/homelab-talos");
    driftless::source::read_dir(&dir).expect("examples/homelab-talos reads")
}

/// Rewrites the line of `path` starting with `prefix`.
fn set_line(files: &mut RepoFiles, path: &str, prefix: &str, line: &str) {
    let text = String::from_utf8(files.files[path].clone()).expect("UTF-8");
    assert!(
        text.lines().any(|l| l.starts_with(prefix)),
        "no `{prefix}` line in {path}"
    );
    let mut out: Vec<&str> = text
        .lines()
        .map(|l| if l.starts_with(prefix) { line } else { l })
        .collect();
    out.push("");
    files.files.insert(path.to_string(), out.join("\n").into_bytes());
}

/// node name -> rendered Talos machine config (placeholders, not secrets).
fn render(files: &RepoFiles) -> BTreeMap<String, String> {
    let desired = driftless::model::load(files, &LoadOptions::default())
        .unwrap_or_else(|d| panic!("the example does not load:\n{d}"));
    let artifacts =
        driftless::render::render_all(&desired).unwrap_or_else(|d| panic!("the example does not render:\n{d}"));
    artifacts
        .into_iter()
        .filter(|a| a.kind == ArtifactKind::TalosConfig)
        .map(|a| (a.node, a.content))
        .collect()
}

fn filled(rendered: &BTreeMap<String, String>, node: &str, bundle: &TalosSecrets) -> String {
    let config = talos_secrets::fill(&rendered[node], "talos-secrets", bundle).expect("the bundle fills the config");
    assert!(!config.contains("<secret:"), "{node}: a placeholder is left");
    config
}

// ------------------------------------------------------------------------------- the sandbox

struct Sandbox {
    _dir: tempfile::TempDir,
    state: PathBuf,
    api: TalosApiHandle,
}

async fn sandbox() -> Sandbox {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().to_path_buf();
    // Written by `sandbox::start` in the real sandbox; the Talos API only hands it out.
    let kubeconfig = cluster_state::admin_kubeconfig_path(&state);
    std::fs::create_dir_all(kubeconfig.parent().unwrap()).unwrap();
    std::fs::write(&kubeconfig, KUBECONFIG).unwrap();
    let api = talos_api::serve(state.clone(), SocketAddr::from(([127, 0, 0, 1], 0)), 7)
        .await
        .expect("the Talos API starts");
    assert!(api.endpoint.starts_with("127.0.0.1:"), "{}", api.endpoint);
    Sandbox { _dir: dir, state, api }
}

fn client(bundle: &TalosSecrets, sandbox: &Sandbox) -> TalosClient {
    let talosconfig = talos_secrets::talosconfig(
        bundle,
        "talos-homelab",
        &[CP.to_string()],
        &[CP.to_string(), WORKER.to_string()],
    )
    .expect("a talosconfig");
    TalosClient::from_talosconfig(talosconfig.as_bytes(), Some(&sandbox.api.endpoint)).expect("a client")
}

fn api_code(err: &TalosError) -> &str {
    match err {
        TalosError::Api { code, .. } => code,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

/// Every value of the bundle, for "does not appear" checks.
fn secret_values(bundle: &TalosSecrets) -> Vec<String> {
    let mut out = Vec::new();
    for field in bundle.field_names() {
        out.push(bundle.get(field).unwrap().to_string());
        if field.starts_with("certs.") {
            let pem = bundle.pem(field).unwrap();
            out.extend(pem.lines().filter(|l| !l.starts_with("-----")).map(String::from));
        }
    }
    out
}

// ------------------------------------------------------------------------------- tests

#[tokio::test]
async fn a_control_plane_from_maintenance_mode_to_kubeconfig() {
    let sandbox = sandbox().await;
    let bundle = TalosSecrets::generate();
    let talos = client(&bundle, &sandbox);
    let rendered = render(&example());
    let cp_config = filled(&rendered, "talos-cp-1", &bundle);

    // A fresh VM: maintenance mode, no trust yet (its certificate is self-signed, so calls
    // that need the talosconfig's trust fail at TLS).
    assert_eq!(talos.probe(CP).await.unwrap(), TalosNodeState::Maintenance);
    let err = talos.kubeconfig(CP).await.unwrap_err();
    assert!(matches!(err, TalosError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("did not sign its certificate"), "{err}");
    assert!(!err.retryable());

    // The first config goes in without client certificates.
    let first = talos
        .apply_configuration(CP, cp_config.as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .expect("the first apply");
    assert_eq!(first.mode, "reboot");

    // From now on mTLS with the talosconfig: the server certificate is signed by the OS CA.
    assert_eq!(
        talos.probe(CP).await.unwrap(),
        TalosNodeState::Configured {
            version: "v1.13.9".into()
        }
    );

    // The kubelet registered, not running before bootstrap.
    let node = cluster_state::read_node(&sandbox.state, "talos-cp-1").expect("the SimNode file");
    assert_eq!(node.role, "controlplane");
    assert_eq!(node.internal_ip, CP);
    assert_eq!(node.kubelet_version, "v1.34.1");
    assert_eq!(node.vmid, None);
    assert!(!node.kubelet_running);
    assert_eq!(
        node.labels
            .get("node.kubernetes.io/exclude-from-external-load-balancers")
            .map(String::as_str),
        Some("")
    );
    assert!(
        node.taints
            .iter()
            .any(|t| t.to_string() == "node-role.kubernetes.io/control-plane:NoSchedule")
    );

    // The same config again: nothing to do.
    let same = talos
        .apply_configuration(CP, cp_config.as_bytes(), TalosApplyMode::Auto, true, false)
        .await
        .unwrap();
    assert_eq!(same.mode, "no-reboot");
    assert_eq!(
        same.mode_details,
        "Dry run summary:\nApplied configuration without a reboot (skipped in dry-run).\nConfig diff:\n\nNo changes."
    );

    // A change next to the OS CA: the diff shows secrets, redact takes them out.
    let changed = cp_config.replace("  certSANs: []\n", "  certSANs:\n    - cp.home.arpa\n");
    assert_ne!(changed, cp_config);
    let dry = talos
        .apply_configuration(CP, changed.as_bytes(), TalosApplyMode::Auto, true, false)
        .await
        .unwrap();
    assert!(
        dry.mode_details.contains("Config diff:\n\n--- a\n+++ b\n@@ "),
        "{}",
        dry.mode_details
    );
    assert!(
        dry.mode_details
            .contains("\n-  certSANs: []\n+  certSANs:\n+    - cp.home.arpa\n"),
        "{}",
        dry.mode_details
    );
    assert!(
        dry.mode_details.contains(bundle.get("certs.os.key").unwrap()),
        "the raw diff carries the CA key"
    );
    let redacted = talos_secrets::redact(&dry.mode_details, &bundle);
    for value in secret_values(&bundle) {
        assert!(!redacted.contains(&value), "a secret survived redaction:\n{redacted}");
    }
    assert!(
        redacted.contains("key: \"<secret:talos-secrets/certs.os.key>\""),
        "{redacted}"
    );
    // Nothing was stored by the dry run.
    let again = talos
        .apply_configuration(CP, cp_config.as_bytes(), TalosApplyMode::Auto, true, false)
        .await
        .unwrap();
    assert!(again.mode_details.ends_with("No changes."), "{}", again.mode_details);

    // Applied for real: no reboot needed.
    let applied = talos
        .apply_configuration(CP, changed.as_bytes(), TalosApplyMode::Auto, false, false)
        .await
        .unwrap();
    assert_eq!(
        (applied.mode.as_str(), applied.mode_details.as_str()),
        ("no-reboot", "Applied configuration without a reboot")
    );

    // No kubeconfig before bootstrap.
    let err = talos.kubeconfig(CP).await.unwrap_err();
    assert_eq!(api_code(&err), "FailedPrecondition", "{err}");

    // Bootstrap once; the second time etcd is already there.
    assert!(talos.bootstrap(CP).await.unwrap());
    assert!(!talos.bootstrap(CP).await.unwrap());
    assert!(
        cluster_state::read_node(&sandbox.state, "talos-cp-1")
            .unwrap()
            .kubelet_running
    );
    assert_eq!(talos.kubeconfig(CP).await.unwrap(), KUBECONFIG.as_bytes());

    // A worker booting now: maintenance, even though the server's certificate is trusted.
    assert_eq!(talos.probe(WORKER).await.unwrap(), TalosNodeState::Maintenance);
    let worker_config = filled(&rendered, "talos-worker-1", &bundle);
    talos
        .apply_configuration(WORKER, worker_config.as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .unwrap();
    assert!(matches!(
        talos.probe(WORKER).await.unwrap(),
        TalosNodeState::Configured { .. }
    ));
    let worker = cluster_state::read_node(&sandbox.state, "talos-worker-1").expect("the worker's SimNode");
    assert_eq!((worker.role.as_str(), worker.internal_ip.as_str()), ("worker", WORKER));
    assert!(
        worker.kubelet_running,
        "the control plane is up: the worker's kubelet runs at once"
    );
    assert!(worker.taints.is_empty() && worker.labels.is_empty(), "{worker:?}");
    // Workers take no bootstrap and hand out no kubeconfig.
    assert_eq!(
        api_code(&talos.bootstrap(WORKER).await.unwrap_err()),
        "FailedPrecondition"
    );

    sandbox.api.shutdown().await;
}

#[tokio::test]
async fn schema_errors_and_unfilled_placeholders_are_invalid_arguments() {
    let sandbox = sandbox().await;
    let bundle = TalosSecrets::generate();
    let talos = client(&bundle, &sandbox);
    let rendered = render(&example());
    let config = filled(&rendered, "talos-cp-1", &bundle);

    let unfilled = talos
        .apply_configuration(CP, rendered["talos-cp-1"].as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .unwrap_err();
    assert_eq!(api_code(&unfilled), "InvalidArgument");
    assert!(
        unfilled.to_string().contains("config contains unfilled placeholders"),
        "{unfilled}"
    );

    // A key Talos's v1.13 schema does not know.
    let broken = config.replace("machine:\n", "machine:\n  kubeletImage: surprise\n");
    let err = talos
        .apply_configuration(CP, broken.as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), "InvalidArgument");
    let message = err.to_string();
    assert!(
        message.contains("kubeletImage") && message.contains("`/machine`"),
        "{message}"
    );
    assert!(message.contains("v1.13.9"), "{message}");
    // An address without its prefix length, in a LinkConfig document.
    let broken = config.replace("address: \"10.0.0.10/24\"", "address: \"10.0.0.10\"");
    assert_ne!(broken, config);
    let err = talos
        .apply_configuration(CP, broken.as_bytes(), TalosApplyMode::Auto, true, true)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("LinkConfig at `/addresses/0/address`"),
        "{err}"
    );
    // Not even YAML.
    let err = talos
        .apply_configuration(CP, b"machine: [", TalosApplyMode::Auto, false, true)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), "InvalidArgument", "{err}");

    // Nothing got stored: still in maintenance mode. The valid config goes in.
    assert_eq!(talos.probe(CP).await.unwrap(), TalosNodeState::Maintenance);
    let dry = talos
        .apply_configuration(CP, config.as_bytes(), TalosApplyMode::Auto, true, true)
        .await
        .unwrap();
    assert_eq!(
        dry.mode_details,
        "Dry run summary:\nNode is running in maintenance mode and does not have a config yet."
    );
    assert_eq!(talos.probe(CP).await.unwrap(), TalosNodeState::Maintenance);
    talos
        .apply_configuration(CP, config.as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .unwrap();
    // Configured nodes check too, over mTLS.
    let err = talos
        .apply_configuration(CP, rendered["talos-cp-1"].as_bytes(), TalosApplyMode::Auto, true, false)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), "InvalidArgument");
    sandbox.api.shutdown().await;
}

#[tokio::test]
async fn credentials_of_another_cluster_are_refused() {
    let sandbox = sandbox().await;
    let bundle = TalosSecrets::generate();
    let talos = client(&bundle, &sandbox);
    let rendered = render(&example());
    talos
        .apply_configuration(
            CP,
            filled(&rendered, "talos-cp-1", &bundle).as_bytes(),
            TalosApplyMode::Auto,
            false,
            true,
        )
        .await
        .unwrap();

    // A talosconfig from another bundle: its CA does not sign the server's certificate, and a
    // configured node is not in maintenance mode: not this cluster's node, whatever it is.
    let other = TalosSecrets::generate();
    let stranger = client(&other, &sandbox);
    let err = stranger.probe(CP).await.unwrap_err();
    assert!(matches!(err, TalosError::Untrusted { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with("the Talos API at 10.0.0.10 is not the cluster's: "),
        "{text}"
    );
    assert!(text.contains("did not sign its certificate"), "{text}");
    assert!(
        text.contains("does not answer as Talos's maintenance service does (Unauthenticated"),
        "{text}"
    );
    let err = stranger
        .apply_configuration(CP, b"version: v1alpha1\n", TalosApplyMode::Auto, true, false)
        .await
        .unwrap_err();
    assert!(matches!(err, TalosError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(stranger.bootstrap(CP).await.is_err());

    // Trusting the server but showing another cluster's client certificate: apid says no.
    let ours: serde_json::Value =
        yaml_serde::from_str(&talos_secrets::talosconfig(&bundle, "c", &[CP.into()], &[]).unwrap()).unwrap();
    let theirs: serde_json::Value =
        yaml_serde::from_str(&talos_secrets::talosconfig(&other, "c", &[CP.into()], &[]).unwrap()).unwrap();
    let mixed = format!(
        "context: c\ncontexts:\n  c:\n    endpoints: [{CP}]\n    ca: {}\n    crt: {}\n    key: {}\n",
        ours["contexts"]["c"]["ca"].as_str().unwrap(),
        theirs["contexts"]["c"]["crt"].as_str().unwrap(),
        theirs["contexts"]["c"]["key"].as_str().unwrap(),
    );
    let impostor = TalosClient::from_talosconfig(mixed.as_bytes(), Some(&sandbox.api.endpoint)).unwrap();
    let err = impostor.bootstrap(CP).await.unwrap_err();
    assert_eq!(api_code(&err), "Unauthenticated", "{err}");
    let err = impostor.kubeconfig(CP).await.unwrap_err();
    assert_eq!(api_code(&err), "Unauthenticated", "{err}");

    // The rightful client still gets in.
    assert!(talos.bootstrap(CP).await.unwrap());
    sandbox.api.shutdown().await;
}

#[tokio::test]
async fn talos_v1_14_multi_document_configs() {
    let sandbox = sandbox().await;
    let bundle = TalosSecrets::generate();
    let talos = client(&bundle, &sandbox);
    let mut files = example();
    set_line(&mut files, "cluster.yaml", "version:", "version: v1.14.0");
    let rendered = render(&files);
    let config = filled(&rendered, "talos-cp-1", &bundle);
    // Typed documents take PEM text where v1alpha1 takes base64.
    assert!(config.contains("-----BEGIN CERTIFICATE-----\\n"), "{config}");
    talos
        .apply_configuration(CP, config.as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .expect("the main-branch schema accepts the v1.14 config");
    assert_eq!(
        talos.probe(CP).await.unwrap(),
        TalosNodeState::Configured {
            version: "v1.14.0".into()
        }
    );
    let node = cluster_state::read_node(&sandbox.state, "talos-cp-1").unwrap();
    assert_eq!(node.kubelet_version, "v1.34.1");
    assert_eq!(
        node.labels
            .get("node-role.kubernetes.io/control-plane")
            .map(String::as_str),
        Some("")
    );
    assert!(
        node.taints
            .iter()
            .any(|t| t.to_string() == "node-role.kubernetes.io/control-plane:NoSchedule")
    );
    // A v1.13-only key in a v1.14 config: the main-branch schema has no machine.kubelet.
    let broken = config.replace("machine:\n", "machine:\n  kubelet:\n    image: x\n");
    let err = talos
        .apply_configuration(CP, broken.as_bytes(), TalosApplyMode::Auto, true, false)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), "InvalidArgument", "{err}");
    sandbox.api.shutdown().await;
}

#[tokio::test]
async fn staged_and_try_modes() {
    let sandbox = sandbox().await;
    let bundle = TalosSecrets::generate();
    let talos = client(&bundle, &sandbox);
    let rendered = render(&example());
    // The control plane first: only it holds the OS CA's key (workers' apid certificates come
    // from the control plane's trustd).
    talos
        .apply_configuration(
            CP,
            filled(&rendered, "talos-cp-1", &bundle).as_bytes(),
            TalosApplyMode::Auto,
            false,
            true,
        )
        .await
        .unwrap();
    let config = filled(&rendered, "talos-worker-1", &bundle);
    talos
        .apply_configuration(WORKER, config.as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .unwrap();
    let labelled = config.replace(
        "  features:\n",
        "  nodeLabels:\n    topology.kubernetes.io/zone: rack-1\n  features:\n",
    );
    assert_ne!(labelled, config);
    let dry_same = |t: &TalosClient, c: String| {
        let t = t.clone();
        async move {
            t.apply_configuration(WORKER, c.as_bytes(), TalosApplyMode::NoReboot, true, false)
                .await
                .unwrap()
                .mode_details
        }
    };

    // Staged: kept for the next reboot, the running config unchanged.
    let staged = talos
        .apply_configuration(WORKER, labelled.as_bytes(), TalosApplyMode::Staged, false, false)
        .await
        .unwrap();
    assert_eq!(staged.mode, "staged");
    assert_eq!(
        staged.mode_details,
        "Staged configuration to be applied after the next reboot"
    );
    assert!(dry_same(&talos, config.clone()).await.ends_with("No changes."));
    assert!(
        !cluster_state::read_node(&sandbox.state, "talos-worker-1")
            .unwrap()
            .labels
            .contains_key("topology.kubernetes.io/zone")
    );

    // Try: running at once, reverted when the timeout passes.
    let tried = talos
        .apply_configuration(WORKER, labelled.as_bytes(), TalosApplyMode::Try, false, false)
        .await
        .unwrap();
    assert_eq!(tried.mode, "try");
    assert!(
        tried
            .mode_details
            .ends_with("will be automatically reverted back in 1m0s"),
        "{}",
        tried.mode_details
    );
    assert!(dry_same(&talos, labelled.clone()).await.ends_with("No changes."));
    assert_eq!(
        cluster_state::read_node(&sandbox.state, "talos-worker-1")
            .unwrap()
            .labels["topology.kubernetes.io/zone"],
        "rack-1"
    );
    // Let the minute pass.
    let meta = sandbox.state.join(".sandbox/talos/nodes/10.0.0.21/meta.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    json["try_deadline"] = 0.into();
    std::fs::write(&meta, serde_json::to_vec(&json).unwrap()).unwrap();
    assert!(dry_same(&talos, config.clone()).await.ends_with("No changes."));
    assert!(
        !cluster_state::read_node(&sandbox.state, "talos-worker-1")
            .unwrap()
            .labels
            .contains_key("topology.kubernetes.io/zone")
    );

    // no-reboot cannot change the install section; auto reboots for it.
    let reinstall = config.replace("wipe: false", "wipe: true");
    assert_ne!(reinstall, config);
    let err = talos
        .apply_configuration(WORKER, reinstall.as_bytes(), TalosApplyMode::NoReboot, true, false)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), "InvalidArgument", "{err}");
    let auto = talos
        .apply_configuration(WORKER, reinstall.as_bytes(), TalosApplyMode::Auto, false, false)
        .await
        .unwrap();
    assert_eq!(auto.mode, "reboot");
    sandbox.api.shutdown().await;
}

#[tokio::test]
async fn upgrade_checks_the_installer_reference_reboots_the_node_and_keeps_its_config() {
    let sandbox = sandbox().await;
    let bundle = TalosSecrets::generate();
    let talos = client(&bundle, &sandbox);
    let rendered = render(&example());
    let config = filled(&rendered, "talos-cp-1", &bundle);
    talos
        .apply_configuration(CP, config.as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .unwrap();
    // A node in maintenance mode has no installed Talos to upgrade.
    let err = talos
        .upgrade(WORKER, "ghcr.io/siderolabs/installer:v1.13.10")
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), "Unimplemented", "{err}");

    let digest = format!("ghcr.io/siderolabs/installer@sha256:{}", "a".repeat(64));
    for bad in [
        "installer:v1.13.10",
        "ghcr.io/siderolabs/installer",
        "ghcr.io/siderolabs/installer:latest",
        "ghcr.io/Siderolabs/installer:v1.13.10",
        digest.as_str(),
    ] {
        let err = talos.upgrade(CP, bad).await.unwrap_err();
        assert_eq!(api_code(&err), "InvalidArgument", "{bad}: {err}");
        assert!(err.to_string().contains("error validating installer image"), "{err}");
    }
    assert_eq!(
        talos.probe(CP).await.unwrap(),
        TalosNodeState::Configured {
            version: "v1.13.9".into()
        },
        "a refused upgrade changes nothing"
    );

    let ack = talos
        .upgrade(CP, "ghcr.io/siderolabs/installer:v1.13.10")
        .await
        .unwrap();
    assert_eq!(ack, "Upgrade request received");
    // Unreachable while it reboots (a retryable answer), then the new version.
    let mut tries = 0;
    loop {
        match talos.probe(CP).await {
            Ok(TalosNodeState::Configured { version }) if version == "v1.13.10" => break,
            Err(e) => {
                assert_eq!(api_code(&e), "Unavailable", "{e}");
                assert!(e.retryable());
            }
            other => panic!("{other:?}"),
        }
        tries += 1;
        assert!(tries < 600, "the node never came back");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let records = talos_api::upgrades(&sandbox.state);
    assert_eq!(records.len(), 1);
    assert_eq!(
        (
            records[0].node.as_str(),
            records[0].from.as_str(),
            records[0].to.as_str()
        ),
        (CP, "v1.13.9", "v1.13.10")
    );
    // The config is kept: the same one again is no change.
    let dry = talos
        .apply_configuration(CP, config.as_bytes(), TalosApplyMode::Auto, true, false)
        .await
        .unwrap();
    assert!(dry.mode_details.ends_with("No changes."), "{}", dry.mode_details);
}

/// A bundle made of what real `talosctl gen config` output holds (tests/fixtures/talos: public
/// test secrets, keys Go wrote), as `talosctl gen secrets --from-controlplane-config` would.
fn bundle_from_talosctl_output() -> TalosSecrets {
    let path = testkit::root().join("tests/fixtures/talos/talos-example-v1.13-controlplane.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let doc: serde_json::Value = yaml_serde::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .next()
        .unwrap();
    let g = |p: &str| {
        doc.pointer(p)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no {p}"))
            .to_string()
    };
    let yaml = format!(
        "cluster:\n    id: {}\n    secret: {}\nsecrets:\n    bootstraptoken: {}\n    secretboxencryptionsecret: {}\n\
         trustdinfo:\n    token: {}\ncerts:\n    etcd:\n        crt: {}\n        key: {}\n    k8s:\n        crt: {}\n        key: {}\n\
         \x20   k8saggregator:\n        crt: {}\n        key: {}\n    k8sserviceaccount:\n        key: {}\n    os:\n        crt: {}\n        key: {}\n",
        g("/cluster/id"),
        g("/cluster/secret"),
        g("/cluster/token"),
        g("/cluster/secretboxEncryptionSecret"),
        g("/machine/token"),
        g("/cluster/etcd/ca/crt"),
        g("/cluster/etcd/ca/key"),
        g("/cluster/ca/crt"),
        g("/cluster/ca/key"),
        g("/cluster/aggregatorCA/crt"),
        g("/cluster/aggregatorCA/key"),
        g("/cluster/serviceAccount/key"),
        g("/machine/ca/crt"),
        g("/machine/ca/key"),
    );
    TalosSecrets::parse(&yaml).expect("a bundle of talosctl's own values parses")
}

#[tokio::test]
async fn a_bundle_talosctl_made_works_end_to_end() {
    // Go-encoded CA names and Go-written Ed25519 keys: the admin and server certificates
    // driftless signs with them must chain (the issuer name is copied byte for byte).
    let sandbox = sandbox().await;
    let bundle = bundle_from_talosctl_output();
    let talos = client(&bundle, &sandbox);
    let config = filled(&render(&example()), "talos-cp-1", &bundle);
    talos
        .apply_configuration(CP, config.as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .unwrap();
    assert!(matches!(
        talos.probe(CP).await.unwrap(),
        TalosNodeState::Configured { .. }
    ));
    assert!(talos.bootstrap(CP).await.unwrap());
    sandbox.api.shutdown().await;
}

// ------------------------------------------------------------------------------- impostors

/// A config as driftless would send it: the bundle's secrets filled in.
fn secret_config(bundle: &TalosSecrets) -> String {
    filled(&render(&example()), "talos-cp-1", bundle)
}

/// The impostor saw none of the bundle's values, nor a config.
fn assert_sent_nothing(log: &talos_api::ImpostorLog, bundle: &TalosSecrets) {
    assert!(log.configs.is_empty(), "a config reached the impostor");
    assert!(
        log.calls
            .iter()
            .all(|(path, _)| path != driftless::adapters::talos::proto::APPLY_CONFIGURATION),
        "{:?}",
        log.calls
    );
    let received = String::from_utf8_lossy(&log.received);
    for value in secret_values(bundle) {
        assert!(
            !received.contains(&value),
            "a secret of the bundle reached the impostor"
        );
    }
}

#[tokio::test]
async fn an_impostor_that_answers_without_client_certificates_is_refused_naming_the_node() {
    let bundle = TalosSecrets::generate();
    let impostor = talos_api::serve_impostor(ImpostorKind::Answering, None).await.unwrap();
    let talosconfig = talos_secrets::talosconfig(&bundle, "c", &[CP.into()], &[]).unwrap();
    let talos = TalosClient::from_talosconfig(talosconfig.as_bytes(), Some(&impostor.endpoint)).unwrap();

    let err = talos.probe(CP).await.unwrap_err();
    let TalosError::Untrusted { node, message } = &err else {
        panic!("{err}")
    };
    assert_eq!(node, CP);
    assert!(
        message.starts_with("the cluster CA (the talosconfig's `ca`) did not sign its certificate, and it answers a Version request without a client certificate"),
        "{message}"
    );
    assert!(!err.retryable());
    // Every call that would carry something refuses at TLS.
    let config = secret_config(&bundle);
    for dry_run in [true, false] {
        let err = talos
            .apply_configuration(CP, config.as_bytes(), TalosApplyMode::Auto, dry_run, false)
            .await
            .unwrap_err();
        assert!(matches!(err, TalosError::Untrusted { .. }), "{err}");
    }
    assert!(matches!(talos.bootstrap(CP).await, Err(TalosError::Untrusted { .. })));
    assert!(matches!(talos.kubeconfig(CP).await, Err(TalosError::Untrusted { .. })));

    // It was asked for its version, without credentials, once; nothing else reached it.
    let log = impostor.log();
    assert_eq!(
        log.calls,
        [(
            driftless::adapters::talos::proto::VERSION.to_string(),
            Some(CP.to_string())
        )]
    );
    assert_sent_nothing(&log, &bundle);
    impostor.shutdown().await;
}

#[tokio::test]
async fn an_impostor_imitating_maintenance_mode_is_maintenance_mode_to_the_client_and_gets_no_mtls_call() {
    // Nothing on the wire tells it from a node booted without a config: that is why the
    // cluster layer sends maintenance-mode configs only to VMs its run created (or to nodes
    // whose file allows it; tests/e2e_talos.rs, cluster::access's tests).
    let bundle = TalosSecrets::generate();
    let impostor = talos_api::serve_impostor(ImpostorKind::Maintenance, None)
        .await
        .unwrap();
    let talosconfig = talos_secrets::talosconfig(&bundle, "c", &[CP.into()], &[]).unwrap();
    let talos = TalosClient::from_talosconfig(talosconfig.as_bytes(), Some(&impostor.endpoint)).unwrap();
    assert_eq!(talos.probe(CP).await.unwrap(), TalosNodeState::Maintenance);
    let err = talos
        .apply_configuration(
            CP,
            secret_config(&bundle).as_bytes(),
            TalosApplyMode::Auto,
            false,
            false,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TalosError::Untrusted { .. }), "{err}");
    assert_sent_nothing(&impostor.log(), &bundle);
    impostor.shutdown().await;
}

#[tokio::test]
async fn an_impostor_showing_the_cluster_nodes_own_certificate_without_its_key_is_refused() {
    // The certificate is public: a copy of it, signed by the cluster CA and naming the node,
    // presented with another key. The handshake signature gives it away, with or without
    // verification of the chain.
    let bundle = TalosSecrets::generate();
    let (stolen, _key) = bundle
        .os_ca()
        .unwrap()
        .issue_server_cert(&["127.0.0.1".into(), CP.into()])
        .unwrap();
    let own_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .unwrap()
        .serialize_der();
    let impostor = talos_api::serve_impostor(ImpostorKind::Maintenance, Some((stolen, own_key)))
        .await
        .unwrap();
    let talosconfig = talos_secrets::talosconfig(&bundle, "c", &[CP.into()], &[]).unwrap();
    let talos = TalosClient::from_talosconfig(talosconfig.as_bytes(), Some(&impostor.endpoint)).unwrap();
    let err = talos.probe(CP).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TalosError::Untrusted { .. }), "{text}");
    assert!(
        text.contains("does not hold the key of the certificate it shows"),
        "{text}"
    );
    let err = talos
        .apply_configuration(CP, secret_config(&bundle).as_bytes(), TalosApplyMode::Auto, false, true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("BadSignature"), "{err}");
    let log = impostor.log();
    assert!(log.calls.is_empty(), "no TLS session got through: {:?}", log.calls);
    assert_sent_nothing(&log, &bundle);
    impostor.shutdown().await;
}
