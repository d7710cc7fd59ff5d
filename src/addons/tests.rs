//! Add-ons: declaration and loading (errors at file:line), rendering, planning against the
//! fake Kubernetes API, applying in order with waits, pruning by inventory only.

use std::time::Duration;

use super::apply::{AddonError, Waits};
use super::plan::AddonsObserved;
use super::*;
use crate::model::{LoadOptions, RepoFiles, load};
use crate::plan::{Action, Step};
use crate::ports::fakes::FakeKube;
use crate::render::render_all;
use crate::test_repo::{CLUSTER, files_of};

const ADDONS: &str = "addons:\n  calico: {wave: 0, cni: true}\n  metallb: {wave: 1, health: [Deployment/metallb-system/controller]}\n  dashboards: {wave: 2}\n";

const METALLB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: controller, namespace: metallb-system}\nspec: {replicas: 1}\n\
---\napiVersion: v1\nkind: Namespace\nmetadata: {name: metallb-system}\n\
---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: ipaddresspools.metallb.io}\n\
spec: {group: metallb.io, scope: Namespaced, names: {kind: IPAddressPool, plural: ipaddresspools}}\n";

const POOL: &str = "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: lan, namespace: metallb-system}\n\
spec:\n  addresses: [\"{{ cluster.network.cidr }}\"]\n";

fn repo(extra: &[(&str, &str)]) -> RepoFiles {
    let mut files = files_of(2);
    files.insert("cluster.yaml", format!("{CLUSTER}{ADDONS}"));
    files.insert(
        "addons/calico/calico.yaml",
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: calico-node, namespace: kube-system}\n",
    );
    files.insert("addons/metallb/metallb.yaml", METALLB);
    files.insert("addons/metallb/pool.yaml.j2", POOL);
    files.insert(
        "addons/dashboards/secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: grafana, namespace: default}\nstringData: {password: hunter2}\n",
    );
    for (p, t) in extra {
        files.insert(*p, t.as_bytes());
    }
    files
}

fn said(files: &RepoFiles) -> Vec<String> {
    let result = load(files, &LoadOptions::default()).and_then(|d| render_all(&d).map(|_| d));
    match result {
        Ok(_) => Vec::new(),
        Err(d) => d.0.iter().map(|d| format!("{}: {}", d.location, d.message)).collect(),
    }
}

fn waits() -> Waits {
    Waits {
        timeout: Duration::from_secs(5),
        interval: Duration::from_millis(500),
    }
}

#[test]
fn addons_load_in_wave_order_with_their_files_and_where_they_are_declared() {
    let d = load(&repo(&[]), &LoadOptions::default()).expect("valid");
    let names: Vec<(&str, u32)> = d.cluster.addons.iter().map(|a| (a.name.as_str(), a.wave)).collect();
    assert_eq!(names, [("calico", 0), ("metallb", 1), ("dashboards", 2)]);
    assert_eq!(d.cluster.addons[1].declared, "cluster.yaml:9");
    assert_eq!(d.cluster.addons[1].files.len(), 2);
    assert_eq!(
        d.cluster.addons[1].health[0].to_string(),
        "Deployment/metallb-system/controller"
    );
}

#[test]
fn an_accepted_adr_declares_an_addon_and_is_cited_for_it() {
    let mut files = repo(&[]);
    files.insert("cluster.yaml", CLUSTER);
    files.insert(
        "adr/ADR-002-cni.md",
        "# ADR-002: CNI\n\n## Status\nAccepted\n\n## Decision\n\n```yaml driftless\naddons:\n  calico: {wave: 0, cni: true}\n```\n",
    );
    files
        .files
        .retain(|p, _| !p.starts_with("addons/metallb") && !p.starts_with("addons/dashboards"));
    let d = load(&files, &LoadOptions::default()).expect("valid");
    assert_eq!(d.cluster.addons.len(), 1);
    assert_eq!(d.cluster.addons[0].declared, "ADR-002 adr/ADR-002-cni.md:10");
    assert!(d.cluster.addons[0].cni);
}

#[test]
fn mistakes_in_addons_are_reported_at_their_file_and_line() {
    // A stray directory nobody declares is not applied; a broken object of a declared one is
    // reported where it is.
    let files = repo(&[
        ("addons/stray/x.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n"),
        (
            "addons/metallb/broken.yaml",
            "kind: Service\nmetadata: {name: x}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
        ),
    ]);
    assert_eq!(
        said(&files),
        [
            "addons/metallb/broken.yaml:1:1: add-on `metallb`: an object without `apiVersion`",
            "addons/metallb/broken.yaml:4:1: add-on `metallb`: a ConfigMap without `metadata.name`",
        ]
    );
    let mut files = repo(&[]);
    files.insert(
        "cluster.yaml",
        format!("{CLUSTER}addons:\n  calico: {{wave: 1, cni: true}}\n  metallb: {{wave: 1, health: [Pod/x]}}\n  dashboards: {{wave: 2}}\n"),
    );
    assert_eq!(
        said(&files),
        [
            "cluster.yaml:9:13: add-on `metallb` is in wave 1, not after the CNI add-on `calico` (wave 1)",
            "cluster.yaml:9:31: add-on `metallb`: cannot judge the health of a Pod",
        ]
    );
    let mut files = repo(&[]);
    files.insert("cluster.yaml", format!("{CLUSTER}{ADDONS}  empty: {{wave: 3}}\n"));
    assert_eq!(
        said(&files),
        ["cluster.yaml:11:11: add-on `empty` has no manifests in addons/empty/"]
    );
}

#[test]
fn rendering_labels_every_object_and_templates_see_the_cluster() {
    let d = load(&repo(&[]), &LoadOptions::default()).unwrap();
    let artifacts = render_all(&d).unwrap();
    let metallb = addon_objects(&artifacts, "metallb");
    assert_eq!(metallb.len(), 4);
    for o in &metallb {
        assert_eq!(o["metadata"]["labels"][MANAGED_BY], "driftless");
        assert_eq!(o["metadata"]["labels"][ADDON_LABEL], "metallb");
    }
    assert_eq!(metallb[3]["spec"]["addresses"][0], "10.0.0.0/24");
}

/// The plan of `files` against `kube`, the add-on steps only.
async fn plan_on(kube: &FakeKube, files: &RepoFiles) -> (Vec<Step>, Vec<String>) {
    let d = load(files, &LoadOptions::default()).unwrap();
    let artifacts = render_all(&d).unwrap();
    let observed = apply::observe(kube, &d, &artifacts, true).await.unwrap();
    let (steps, notices) = plan::steps(&d, &artifacts, &observed, false);
    (steps, notices.into_iter().map(|n| n.message).collect())
}

async fn apply_all(kube: &FakeKube, files: &RepoFiles, steps: &[Step]) -> Result<Vec<String>, AddonError> {
    let d = load(files, &LoadOptions::default()).unwrap();
    let mut log = Vec::new();
    for s in steps {
        match &s.action {
            Action::Addon { addon, manifests, .. } => {
                let a = d.cluster.addons.iter().find(|a| &a.name == addon).unwrap();
                apply::apply(kube, a, manifests, d.cluster.reconcile.prune, waits(), &mut log).await?
            }
            Action::AddonRemove { addon, .. } => apply::remove(kube, addon, &mut log).await?,
            _ => {}
        }
    }
    Ok(log)
}

#[tokio::test(start_paused = true)]
async fn a_fresh_cluster_gets_every_addon_wave_by_wave_namespaces_and_crds_first() {
    let kube = FakeKube::default();
    let files = repo(&[]);
    let (steps, _) = plan_on(&kube, &files).await;
    let addons: Vec<&str> = steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::Addon { addon, .. } => Some(addon.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(addons, ["calico", "metallb", "dashboards"]);
    let Action::Addon { create, .. } = &steps[1].action else {
        panic!()
    };
    assert!(
        create.contains(&"IPAddressPool/metallb-system/lan".to_string()),
        "{create:?}"
    );

    apply_all(&kube, &files, &steps).await.unwrap();
    let writes = kube.writes();
    let metallb: Vec<&str> = writes
        .iter()
        .map(String::as_str)
        .filter(|w| w.contains("metallb") && !w.contains("driftless-addon"))
        .collect();
    assert_eq!(
        metallb,
        [
            "apply Namespace/metallb-system",
            "apply CustomResourceDefinition/ipaddresspools.metallb.io",
            "apply Deployment/metallb-system/controller",
            "apply IPAddressPool/metallb-system/lan",
        ]
    );
    let calico = writes.iter().position(|w| w.contains("calico-node")).unwrap();
    let first_metallb = writes.iter().position(|w| w.contains("metallb")).unwrap();
    assert!(calico < first_metallb, "the CNI's wave first: {writes:?}");
    let inventory = kube
        .object("v1", "ConfigMap", "kube-system", "driftless-addon-metallb")
        .expect("an inventory");
    assert!(
        inventory["data"]["objects"]
            .as_str()
            .unwrap()
            .contains("metallb.io/v1beta1 IPAddressPool metallb-system lan")
    );

    // Applied and recorded: nothing left to do.
    let (steps, notices) = plan_on(&kube, &files).await;
    assert!(steps.is_empty(), "{steps:#?}");
    assert!(notices.is_empty(), "{notices:?}");
}

#[tokio::test(start_paused = true)]
async fn an_edited_object_is_a_field_change_and_secret_values_are_never_shown() {
    let kube = FakeKube::default();
    let files = repo(&[]);
    let (steps, _) = plan_on(&kube, &files).await;
    apply_all(&kube, &files, &steps).await.unwrap();

    let mut edited = kube
        .object("apps/v1", "Deployment", "metallb-system", "controller")
        .unwrap();
    edited["spec"]["replicas"] = serde_json::json!(3);
    kube.put_object(edited);
    let mut secret = kube.object("v1", "Secret", "default", "grafana").unwrap();
    secret["stringData"]["password"] = serde_json::json!("changed-behind-our-back");
    kube.put_object(secret);

    let (steps, _) = plan_on(&kube, &files).await;
    let changes: Vec<String> = steps
        .iter()
        .flat_map(|s| match &s.action {
            Action::Addon { change, .. } => change.clone(),
            _ => Vec::new(),
        })
        .flat_map(|c| {
            c.changes
                .into_iter()
                .map(move |f| format!("{} {}: {:?} -> {:?}", c.object, f.key, f.old, f.new))
        })
        .collect();
    assert_eq!(
        changes,
        [
            "Deployment/metallb-system/controller spec.replicas: Some(\"3\") -> Some(\"1\")",
            "Secret/default/grafana stringData.password: Some(\"(secret)\") -> Some(\"(secret)\")",
        ]
    );
    let shown = crate::plan::display::text(
        &crate::plan::Plan {
            cluster: "lab".into(),
            steps,
            conflicts: vec![],
            orphans: vec![],
            notices: vec![],
        },
        crate::plan::display::Wording::Drift,
        false,
    );
    assert!(
        !shown.contains("hunter2") && !shown.contains("changed-behind"),
        "{shown}"
    );
}

#[tokio::test(start_paused = true)]
async fn prune_deletes_only_what_an_inventory_lists_and_only_when_it_is_on() {
    let kube = FakeKube::default();
    let files = repo(&[]);
    let (steps, _) = plan_on(&kube, &files).await;
    apply_all(&kube, &files, &steps).await.unwrap();
    // Someone else's object, labelled as if it were driftless's: no inventory lists it.
    kube.put_object(serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "theirs", "namespace": "default",
                     "labels": {MANAGED_BY: "driftless", ADDON_LABEL: "dashboards"}}}));

    // The dashboards add-on leaves git, prune off: left, and said so.
    let mut gone = files.clone();
    gone.files.retain(|p, _| !p.starts_with("addons/dashboards"));
    gone.insert(
        "cluster.yaml",
        format!("{CLUSTER}addons:\n  calico: {{wave: 0, cni: true}}\n  metallb: {{wave: 1}}\n"),
    );
    let (steps, notices) = plan_on(&kube, &gone).await;
    assert!(steps.is_empty(), "{steps:#?}");
    assert_eq!(
        notices,
        ["add-on `dashboards` left git; its 1 object(s) are left in the cluster (prune: false)"]
    );

    // Prune on: its inventory's objects go, and nothing else.
    let pruning = {
        let mut f = gone.clone();
        let text = String::from_utf8(f.files["cluster.yaml"].clone()).unwrap();
        f.insert(
            "cluster.yaml",
            text.replace("name: lab\n", "name: lab\nreconcile: {prune: true}\n"),
        );
        f
    };
    let (steps, _) = plan_on(&kube, &pruning).await;
    assert!(
        matches!(&steps[..], [Step { action: Action::AddonRemove { addon, prune }, .. }]
            if addon == "dashboards" && prune == &["Secret/default/grafana".to_string()]),
        "{steps:#?}"
    );
    let before = kube.writes().len();
    apply_all(&kube, &pruning, &steps).await.unwrap();
    assert_eq!(
        kube.writes()[before..],
        [
            "delete Secret/default/grafana".to_string(),
            "delete ConfigMap/kube-system/driftless-addon-dashboards".to_string()
        ]
    );
    assert!(kube.object("v1", "ConfigMap", "default", "theirs").is_some());
    assert!(
        kube.object("v1", "ConfigMap", "kube-system", "driftless-addon-dashboards")
            .is_none()
    );
    let (steps, notices) = plan_on(&kube, &pruning).await;
    assert!(steps.is_empty() && notices.is_empty(), "{steps:#?} {notices:?}");
}

#[tokio::test(start_paused = true)]
async fn a_wave_that_does_not_get_healthy_stops_the_apply_naming_the_object() {
    let kube = FakeKube::default();
    kube.stuck("controller");
    let files = repo(&[]);
    let (steps, _) = plan_on(&kube, &files).await;
    let err = apply_all(&kube, &files, &steps).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "add-on metallb: Deployment/metallb-system/controller was not healthy within 5 s (0/1 replicas ready, 0 \
         updated); the apply stops here"
    );
    assert!(
        !kube.writes().iter().any(|w| w.contains("grafana")),
        "the next wave never starts"
    );
}

#[tokio::test(start_paused = true)]
async fn a_conflict_with_another_field_manager_is_reported_and_forced_only_when_the_addon_says_so() {
    let kube = FakeKube::default();
    kube.conflicting("controller");
    let files = repo(&[]);
    let (steps, _) = plan_on(&kube, &files).await;
    let err = apply_all(&kube, &files, &steps).await.unwrap_err();
    assert!(matches!(&err, AddonError::Conflict { object, .. } if object == "Deployment/metallb-system/controller"));
    assert!(err.to_string().contains("force_conflicts: true"), "{err}");

    let mut forced = files.clone();
    forced.insert(
        "cluster.yaml",
        format!("{CLUSTER}addons:\n  calico: {{wave: 0, cni: true}}\n  metallb: {{wave: 1, force_conflicts: true}}\n  dashboards: {{wave: 2}}\n"),
    );
    let (steps, _) = plan_on(&kube, &forced).await;
    apply_all(&kube, &forced, &steps).await.unwrap();
}

#[test]
fn a_cluster_whose_cni_is_an_addon_is_gated_on_every_node_after_the_cni_wave() {
    let mut files = repo(&[]);
    files.insert("cluster.yaml", format!("{CLUSTER}cni: cilium\n{ADDONS}"));
    let d = load(&files, &LoadOptions::default()).unwrap();
    let artifacts = render_all(&d).unwrap();
    let (steps, _) = plan::steps(&d, &artifacts, &AddonsObserved::default(), true);
    let order: Vec<String> = steps
        .iter()
        .map(|s| format!("{} {}", s.action.verb(), s.node))
        .collect();
    assert_eq!(
        order,
        [
            "apply add-on addons/calico",
            "wait for nodes nodes",
            "apply add-on addons/metallb",
            "apply add-on addons/dashboards",
        ]
    );
    // Without a CNI add-on the gate comes before every add-on, and says what is missing.
    files.insert(
        "cluster.yaml",
        format!("{CLUSTER}cni: cilium\naddons:\n  metallb: {{wave: 1}}\n"),
    );
    files
        .files
        .retain(|p, _| !p.starts_with("addons/calico") && !p.starts_with("addons/dashboards"));
    let d = load(&files, &LoadOptions::default()).unwrap();
    let artifacts = render_all(&d).unwrap();
    let (steps, _) = plan::steps(&d, &artifacts, &AddonsObserved::default(), true);
    assert!(
        matches!(&steps[0].action, Action::NodesReady { cni_addon: None, .. }),
        "{steps:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pull_requests_objects_are_compared_here_and_never_sent_to_the_cluster() {
    let kube = FakeKube::default();
    let files = repo(&[]);
    let (steps, _) = plan_on(&kube, &files).await;
    apply_all(&kube, &files, &steps).await.unwrap();
    plan_on(&kube, &files).await;
    let (writes, dry_runs) = (kube.writes().len(), kube.dry_runs());
    assert!(dry_runs > 0, "the watched branch's plan asks the server");

    let mut pr = files.clone();
    pr.insert(
        "addons/metallb/metallb.yaml",
        METALLB.replace("replicas: 1", "replicas: 2"),
    );
    let d = load(&pr, &LoadOptions::default()).unwrap();
    let artifacts = render_all(&d).unwrap();
    kube.conflicting("controller"); // a dry run would have been refused
    let observed = apply::observe(&kube, &d, &artifacts, false).await.unwrap();
    let (steps, _) = plan::steps(&d, &artifacts, &observed, false);
    let Action::Addon { change, .. } = &steps[0].action else {
        panic!("{steps:#?}")
    };
    assert_eq!(change[0].object, "Deployment/metallb-system/controller");
    assert_eq!(change[0].changes[0].key, "spec.replicas");
    assert_eq!(
        (kube.writes().len(), kube.dry_runs()),
        (writes, dry_runs),
        "nothing was sent"
    );
}
