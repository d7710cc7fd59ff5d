//! The simulated controllers, run by the API server every [`TICK`] (and only when something
//! changed or a timer is pending):
//!
//! * apiextensions: a new CRD is Established (NamesAccepted, Established, acceptedNames,
//!   storedVersions) at the next tick; its kinds are then served.
//! * Deployments, ReplicaSets, StatefulSets: progressing at once, rolled out [`ROLLOUT`] after
//!   their spec changed (`observedGeneration`, ready/updated/available replicas, the
//!   Available and Progressing conditions), when a node can run their pods. DaemonSets: one
//!   pod per node whose taints the template tolerates; `numberReady` once rolled out.
//! * Jobs complete [`ROLLOUT`] after they start (`succeeded`, SuccessCriteriaMet and Complete
//!   conditions). A kube-system Job running `cilium install` (Talos's documented way with
//!   the Cilium CLI) leaves what the CLI installs: the `cilium` DaemonSet, the
//!   `cilium-operator` Deployment, their ServiceAccounts and the `cilium-config` ConfigMap.
//! * K3s's helm controller: a HelmChart gets a `helm-install-<name>` Job (its ServiceAccount
//!   and values ConfigMap), its status names the Job (JobCreated); when the Job completes,
//!   Helm's release record (`sh.helm.release.v1.<name>.v<N>` Secret) appears in the target
//!   namespace, with the CRDs of well-known charts (MetalLB's, cert-manager's). A changed chart
//!   gets a new Job and release revision.
//! * Namespaces: each gets its `default` ServiceAccount and `kube-root-ca.crt` ConfigMap; a
//!   deleted one is emptied, then removed.
//! * Garbage collection: objects whose owners are all gone are deleted; a deleted CRD takes
//!   its custom resources along.
//!
//! Pods are not stored: the pods of these workloads are derived from them when listed.
//!
//! A pod can run on a node whose kubelet runs and whose taints it tolerates, and only on a
//! Ready node (one with a network) unless it uses the host's network, which is how a CNI's
//! own pods start on a cluster that has none.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::fields::{self, Ctx};
use super::handlers;
use super::objects::{Entry, Objects, now_ms};
use super::resources::{Catalog, Resource};
use super::{Readiness, Shared, View, now, pod_suffix};
use crate::cluster_state::SimNode;
use crate::store;

/// How often the controllers look.
pub const TICK: Duration = Duration::from_millis(250);
/// How long a rollout or a Job takes.
pub const ROLLOUT: u64 = 1200;

const CONTROLLER: &str = "kube-controller-manager";
const HELM_CONTROLLER: &str = "helm-controller";
const KLIPPER_HELM: &str = "rancher/klipper-helm:v0.9.4-build20250113";

fn res(group: &str, plural: &str) -> Resource {
    Catalog::new(true, &[])
        .resources
        .into_iter()
        .find(|r| r.is(group, plural))
        .expect("a built-in resource")
}

/// The namespaces every cluster starts with.
pub fn seed_namespaces(shared: &Shared, objects: &Objects) {
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        if objects.get("", "namespaces", None, ns).is_none() {
            let _ = create(
                shared,
                objects,
                "",
                "namespaces",
                json!({"metadata": {"name": ns}}),
                "kube-apiserver",
            );
        }
    }
}

/// Store a new object as the API server would (uid, timestamps, managedFields).
fn create(
    shared: &Shared,
    objects: &Objects,
    group: &str,
    plural: &str,
    mut object: Value,
    manager: &str,
) -> Option<Value> {
    let r = res(group, plural);
    let name = object["metadata"]["name"].as_str()?.to_string();
    let ns = object["metadata"]["namespace"].as_str().map(String::from);
    if objects.get(group, plural, ns.as_deref(), &name).is_some() {
        return None;
    }
    object = handlers::served(&r, &object);
    let rv = objects.next_rv().ok()?;
    handlers::initialise(shared, &r, &mut object, rv);
    fields::record_update(
        None,
        &mut object,
        manager,
        &r.api_version(),
        &now(),
        None,
        Ctx::builtin(),
    );
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    objects
        .put(
            group,
            plural,
            &Entry {
                changed_ms: now_ms(),
                object: object.clone(),
            },
        )
        .ok()?;
    Some(object)
}

/// Write a controller's status (only when it changed, keeping condition times of unchanged
/// conditions).
fn set_status(objects: &Objects, group: &str, plural: &str, entry: &Entry, mut status: Value, manager: &str) {
    let old_status = entry.object.get("status").cloned().unwrap_or(Value::Null);
    keep_condition_times(&old_status, &mut status);
    if old_status == status {
        return;
    }
    let r = res_or_custom(group, plural, &entry.object);
    let mut object = entry.object.clone();
    object["status"] = status;
    fields::record_update(
        Some(&entry.object),
        &mut object,
        manager,
        &r.api_version(),
        &now(),
        Some("status"),
        Ctx::builtin(),
    );
    let Ok(rv) = objects.next_rv() else { return };
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let _ = objects.put(
        group,
        plural,
        &Entry {
            changed_ms: entry.changed_ms,
            object,
        },
    );
}

fn res_or_custom(group: &str, plural: &str, object: &Value) -> Resource {
    Catalog::new(true, &[])
        .resources
        .into_iter()
        .find(|r| r.is(group, plural))
        .unwrap_or_else(|| {
            let av = object["apiVersion"].as_str().unwrap_or("v1");
            let (g, v) = av.rsplit_once('/').unwrap_or(("", av));
            Resource {
                group: g.into(),
                version: v.into(),
                plural: plural.into(),
                singular: String::new(),
                kind: object["kind"].as_str().unwrap_or_default().into(),
                namespaced: object["metadata"]["namespace"].is_string(),
                short_names: Vec::new(),
                categories: Vec::new(),
                status: true,
                schema: None,
                printer_columns: Vec::new(),
                custom: true,
            }
        })
}

/// Conditions whose status did not change keep their transition times.
fn keep_condition_times(old: &Value, new: &mut Value) {
    let now = now();
    let Some(conds) = new.get_mut("conditions").and_then(Value::as_array_mut) else {
        return;
    };
    for c in conds {
        let prev = old["conditions"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["type"] == c["type"]));
        for key in ["lastTransitionTime", "lastUpdateTime", "lastProbeTime"] {
            if c.get(key).is_none() {
                continue;
            }
            let keep = prev.filter(|p| p["status"] == c["status"] && p["reason"] == c["reason"]);
            c[key] = match keep.and_then(|p| p.get(key)) {
                Some(t) => t.clone(),
                None => json!(now),
            };
        }
    }
}

fn condition(kind: &str, status: bool, reason: &str, message: &str) -> Value {
    json!({
        "type": kind, "status": if status { "True" } else { "False" },
        "lastUpdateTime": "", "lastTransitionTime": "", "reason": reason, "message": message,
    })
}

fn generation(o: &Value) -> i64 {
    o.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1)
}

fn name_of(o: &Value) -> String {
    o["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

fn ns_of(o: &Value) -> Option<String> {
    o["metadata"]["namespace"].as_str().map(String::from)
}

// ---- scheduling -----------------------------------------------------------------------------------

fn tolerates(tolerations: &[Value], key: &str, value: Option<&str>, effect: &str) -> bool {
    tolerations.iter().any(|t| {
        let t_key = t["key"].as_str().unwrap_or("");
        let op = t["operator"].as_str().unwrap_or("Equal");
        let t_effect = t["effect"].as_str().unwrap_or("");
        let key_ok = (t_key.is_empty() && op == "Exists") || t_key == key;
        let value_ok = op == "Exists" || t["value"].as_str().unwrap_or("") == value.unwrap_or("");
        let effect_ok = t_effect.is_empty() || t_effect == effect;
        key_ok && value_ok && effect_ok
    })
}

/// Whether a pod of `pod_spec` can be placed on the node (taints, nodeSelector), and whether
/// it can run there now (kubelet running; a network, unless host networking).
fn placement(view: &View, shared: &Shared, node: &SimNode, readiness: Readiness, pod_spec: &Value) -> (bool, bool) {
    let tolerations = pod_spec["tolerations"].as_array().cloned().unwrap_or_default();
    let fits_taints = node
        .taints
        .iter()
        .filter(|t| t.effect != "PreferNoSchedule")
        .all(|t| tolerates(&tolerations, &t.key, t.value.as_deref(), &t.effect));
    let labels = super::node_json(shared, node, readiness)["metadata"]["labels"].clone();
    let fits_selector = pod_spec["nodeSelector"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let _ = view;
    let schedulable = fits_taints && fits_selector && readiness != Readiness::Stopped;
    let host_network = pod_spec["hostNetwork"] == true;
    let runs = schedulable && (readiness == Readiness::Ready || host_network);
    (schedulable, runs)
}

/// Nodes where a pod of this spec can run now.
fn runnable_nodes<'v>(view: &'v View, shared: &Shared, pod_spec: &Value) -> Vec<&'v SimNode> {
    view.nodes
        .iter()
        .filter(|(n, r)| placement(view, shared, n, *r, pod_spec).1)
        .map(|(n, _)| n)
        .collect()
}

fn template_spec(o: &Value) -> Value {
    o.pointer("/spec/template/spec").cloned().unwrap_or(json!({}))
}

fn elapsed(entry: &Entry) -> u64 {
    now_ms().saturating_sub(entry.changed_ms)
}

// ---- CNI ---------------------------------------------------------------------------------------------

/// A CNI add-on runs: a rolled-out CNI DaemonSet, or a completed `cilium install` Job.
pub fn cni_running(objects: &Objects) -> bool {
    let daemonsets = ["kube-system", "kube-flannel", "calico-system"]
        .iter()
        .flat_map(|ns| objects.list("apps", "daemonsets", Some(ns)));
    for ds in daemonsets {
        let o = &ds.object;
        let name = name_of(o);
        let is_cni = ["cilium", "calico-node", "kube-flannel-ds"].contains(&name.as_str())
            || o.pointer("/metadata/labels/k8s-app") == Some(&json!("cilium"));
        if is_cni && daemonset_rolled_out(o) {
            return true;
        }
    }
    objects
        .list("batch", "jobs", Some("kube-system"))
        .iter()
        .any(|j| runs_cilium_install(&j.object) && job_complete(&j.object))
}

fn daemonset_rolled_out(o: &Value) -> bool {
    let s = &o["status"];
    let ready = s["numberReady"].as_i64().unwrap_or(0);
    ready > 0
        && ready == s["desiredNumberScheduled"].as_i64().unwrap_or(-1)
        && s["observedGeneration"].as_i64() == Some(generation(o))
}

fn job_complete(o: &Value) -> bool {
    o["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Complete" && c["status"] == "True"))
}

/// A Job one of whose containers runs `cilium install` (command and args, or a shell line).
pub fn runs_cilium_install(job: &Value) -> bool {
    job.pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| {
            let words: Vec<String> = ["command", "args"]
                .iter()
                .flat_map(|k| c[*k].as_array().cloned().unwrap_or_default())
                .filter_map(|w| w.as_str().map(String::from))
                .flat_map(|w| w.split_whitespace().map(String::from).collect::<Vec<_>>())
                .collect();
            words
                .windows(2)
                .any(|w| (w[0] == "cilium" || w[0].ends_with("/cilium")) && w[1] == "install")
        })
}

/// The version a `cilium install` line asks for (`--version 1.18.0`), for the image tags.
fn cilium_version(job: &Value) -> String {
    let text = job
        .pointer("/spec/template/spec/containers")
        .map(|c| c.to_string())
        .unwrap_or_default();
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '[' || c == ']')
        .filter(|w| !w.is_empty())
        .collect();
    for (i, w) in words.iter().enumerate() {
        if let Some(v) = w.strip_prefix("--version=") {
            return format!("v{}", v.trim_start_matches('v'));
        }
        if *w == "--version"
            && let Some(v) = words.get(i + 1)
        {
            return format!("v{}", v.trim_start_matches('v'));
        }
    }
    "v1.18.0".into()
}

/// What `cilium install` creates (the parts the sandbox shows).
fn install_cilium(shared: &Shared, objects: &Objects, job: &Value) {
    let v = cilium_version(job);
    let mgr = "cilium-cli";
    let ns = "kube-system";
    for sa in ["cilium", "cilium-operator"] {
        create(
            shared,
            objects,
            "",
            "serviceaccounts",
            json!({"metadata": {"name": sa, "namespace": ns}}),
            mgr,
        );
    }
    create(
        shared,
        objects,
        "",
        "configmaps",
        json!({"metadata": {"name": "cilium-config", "namespace": ns},
               "data": {"ipam": "kubernetes", "cluster-name": "default", "enable-ipv4": "true"}}),
        mgr,
    );
    let labels =
        json!({"k8s-app": "cilium", "app.kubernetes.io/name": "cilium-agent", "app.kubernetes.io/part-of": "cilium"});
    create(
        shared,
        objects,
        "apps",
        "daemonsets",
        json!({
            "metadata": {"name": "cilium", "namespace": ns, "labels": labels},
            "spec": {
                "selector": {"matchLabels": {"k8s-app": "cilium"}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "hostNetwork": true,
                        "serviceAccountName": "cilium",
                        "priorityClassName": "system-node-critical",
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "cilium-agent", "image": format!("quay.io/cilium/cilium:{v}"),
                                        "command": ["cilium-agent"], "args": ["--config-dir=/tmp/cilium/config-map"]}],
                    },
                },
            },
        }),
        mgr,
    );
    let op_labels =
        json!({"io.cilium/app": "operator", "name": "cilium-operator", "app.kubernetes.io/part-of": "cilium"});
    create(
        shared,
        objects,
        "apps",
        "deployments",
        json!({
            "metadata": {"name": "cilium-operator", "namespace": ns, "labels": op_labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"io.cilium/app": "operator", "name": "cilium-operator"}},
                "template": {
                    "metadata": {"labels": op_labels},
                    "spec": {
                        "hostNetwork": true,
                        "serviceAccountName": "cilium-operator",
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "cilium-operator", "image": format!("quay.io/cilium/operator-generic:{v}")}],
                    },
                },
            },
        }),
        mgr,
    );
}

// ---- the loop ------------------------------------------------------------------------------------------

/// What the last pass saw, to skip passes that would change nothing.
#[derive(Default)]
pub struct LastPass {
    signature: Vec<u8>,
    pending: bool,
}

fn signature(objects: &Objects, view: &View) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(objects.current_rv().to_le_bytes());
    for (n, r) in &view.nodes {
        h.update(serde_json::to_vec(n).unwrap_or_default());
        h.update([*r as u8]);
    }
    h.finalize().to_vec()
}

/// Run the controllers until the server stops.
pub async fn run(shared: std::sync::Arc<Shared>) {
    let mut last = LastPass::default();
    loop {
        tokio::time::sleep(TICK).await;
        let _guard = shared.patch_lock.lock().await;
        pass(&shared, &mut last);
    }
}

/// One pass of every controller.
pub fn pass(shared: &Shared, last: &mut LastPass) {
    let objects = Objects::new(&shared.state_dir);
    let view = View::load(&shared.state_dir);
    let sig = signature(&objects, &view);
    if sig == last.signature && !last.pending {
        return;
    }
    let mut pending = false;
    crds(&objects);
    namespaces(shared, &objects);
    pending |= deployments(shared, &objects, &view);
    pending |= daemonsets(shared, &objects, &view);
    pending |= jobs(shared, &objects, &view);
    if view.is_k3s() {
        helm_charts(shared, &objects);
    }
    garbage_collect(shared, &objects);
    // A pass that changed something runs again: what it wrote may move another controller.
    let view = View::load(&shared.state_dir);
    let after = signature(&objects, &view);
    last.pending = pending || after != sig;
    last.signature = after;
}

fn crds(objects: &Objects) {
    for e in objects.list("apiextensions.k8s.io", "customresourcedefinitions", None) {
        let o = &e.object;
        if o.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let names = &o["spec"]["names"];
        let kind = names["kind"].as_str().unwrap_or_default();
        let mut accepted = names.clone();
        if accepted.get("listKind").is_none() {
            accepted["listKind"] = json!(format!("{kind}List"));
        }
        if accepted.get("singular").is_none() {
            accepted["singular"] = json!(kind.to_lowercase());
        }
        let storage: Vec<Value> = o["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["storage"] == true)
            .map(|v| v["name"].clone())
            .collect();
        let status = json!({
            "conditions": [
                condition("NamesAccepted", true, "NoConflicts", "no conflicts found"),
                condition("Established", true, "InitialNamesAccepted", "the initial names have been accepted"),
            ],
            "acceptedNames": accepted,
            "storedVersions": storage,
        });
        let mut status = status;
        for c in status["conditions"].as_array_mut().into_iter().flatten() {
            c.as_object_mut().expect("an object").remove("lastUpdateTime");
        }
        set_status(
            objects,
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            &e,
            status,
            "kube-apiserver",
        );
    }
}

fn namespaces(shared: &Shared, objects: &Objects) {
    for e in objects.list("", "namespaces", None) {
        let ns = name_of(&e.object);
        if e.object.pointer("/metadata/deletionTimestamp").is_some() {
            // The namespace controller: remove everything in it, then the namespace.
            for (group, plural) in objects.kinds() {
                for o in objects.list(&group, &plural, Some(&ns)) {
                    let _ = objects.remove(&group, &plural, Some(&ns), &name_of(&o.object));
                }
            }
            let _ = objects.remove("", "namespaces", None, &ns);
            let _ = objects.next_rv();
            continue;
        }
        if objects.get("", "serviceaccounts", Some(&ns), "default").is_none() {
            create(
                shared,
                objects,
                "",
                "serviceaccounts",
                json!({"metadata": {"name": "default", "namespace": ns}}),
                CONTROLLER,
            );
        }
        if objects.get("", "configmaps", Some(&ns), "kube-root-ca.crt").is_none() {
            create(
                shared,
                objects,
                "",
                "configmaps",
                json!({"metadata": {"name": "kube-root-ca.crt", "namespace": ns,
                                    "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
                       "data": {"ca.crt": shared.ca_pem}}),
                CONTROLLER,
            );
        }
    }
}

/// The ready count of a replicated workload now; `true` in `.1` while its timer runs.
fn replicas_ready(view: &View, shared: &Shared, e: &Entry, replicas: i64) -> (i64, bool) {
    let runnable = !runnable_nodes(view, shared, &template_spec(&e.object)).is_empty();
    if !runnable || replicas == 0 {
        return (0, false);
    }
    if elapsed(e) >= ROLLOUT {
        (replicas, false)
    } else {
        (0, true)
    }
}

/// `<name>-<pod-template-hash>`: the ReplicaSet of a Deployment's current template.
pub fn template_hash(o: &Value) -> String {
    pod_suffix(0, &o["spec"]["template"].to_string(), 10)
}

fn deployments(shared: &Shared, objects: &Objects, view: &View) -> bool {
    let mut pending = false;
    for (plural, kind) in [
        ("deployments", "Deployment"),
        ("replicasets", "ReplicaSet"),
        ("statefulsets", "StatefulSet"),
    ] {
        for e in objects.list("apps", plural, None) {
            let o = &e.object;
            if o.pointer("/metadata/deletionTimestamp").is_some() {
                continue;
            }
            let replicas = o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
            let (ready, waiting) = replicas_ready(view, shared, &e, replicas);
            pending |= waiting;
            let mut status = json!({"observedGeneration": generation(o), "replicas": replicas});
            let rs = format!("{}-{}", name_of(o), template_hash(o));
            match kind {
                "Deployment" => {
                    status["updatedReplicas"] = json!(replicas);
                    if ready > 0 {
                        status["readyReplicas"] = json!(ready);
                        status["availableReplicas"] = json!(ready);
                    }
                    if replicas > ready {
                        status["unavailableReplicas"] = json!(replicas - ready);
                    }
                    let available = ready >= replicas;
                    status["conditions"] = json!([
                        if available {
                            condition(
                                "Available",
                                true,
                                "MinimumReplicasAvailable",
                                "Deployment has minimum availability.",
                            )
                        } else {
                            condition(
                                "Available",
                                false,
                                "MinimumReplicasUnavailable",
                                "Deployment does not have minimum availability.",
                            )
                        },
                        if available {
                            condition(
                                "Progressing",
                                true,
                                "NewReplicaSetAvailable",
                                &format!("ReplicaSet \"{rs}\" has successfully progressed."),
                            )
                        } else {
                            condition(
                                "Progressing",
                                true,
                                "ReplicaSetUpdated",
                                &format!("ReplicaSet \"{rs}\" is progressing."),
                            )
                        },
                    ]);
                }
                "StatefulSet" => {
                    let rev = format!("{}-{}", name_of(o), template_hash(o));
                    status["currentReplicas"] = json!(replicas);
                    status["updatedReplicas"] = json!(replicas);
                    status["readyReplicas"] = json!(ready);
                    status["availableReplicas"] = json!(ready);
                    status["currentRevision"] = json!(rev);
                    status["updateRevision"] = json!(rev);
                    status["collisionCount"] = json!(0);
                }
                _ => {
                    status["fullyLabeledReplicas"] = json!(replicas);
                    status["readyReplicas"] = json!(ready);
                    status["availableReplicas"] = json!(ready);
                }
            }
            set_status(objects, "apps", plural, &e, status, CONTROLLER);
        }
    }
    let _ = shared;
    pending
}

/// The nodes a DaemonSet places a pod on, and on which of them it runs.
fn daemonset_nodes<'v>(view: &'v View, shared: &Shared, o: &Value) -> Vec<(&'v SimNode, bool)> {
    let spec = template_spec(o);
    view.nodes
        .iter()
        .filter_map(|(n, r)| {
            // DaemonSet pods tolerate the not-ready and unreachable taints by default.
            let (placed, runs) = placement(view, shared, n, *r, &spec);
            placed.then_some((n, runs))
        })
        .collect()
}

fn daemonsets(shared: &Shared, objects: &Objects, view: &View) -> bool {
    let mut pending = false;
    for e in objects.list("apps", "daemonsets", None) {
        let o = &e.object;
        let nodes = daemonset_nodes(view, shared, o);
        let desired = nodes.len() as i64;
        let runnable = nodes.iter().filter(|(_, r)| *r).count() as i64;
        let ready = if elapsed(&e) >= ROLLOUT {
            runnable
        } else {
            pending |= runnable > 0;
            0
        };
        let mut status = json!({
            "observedGeneration": generation(o),
            "desiredNumberScheduled": desired,
            "currentNumberScheduled": desired,
            "updatedNumberScheduled": desired,
            "numberMisscheduled": 0,
            "numberReady": ready,
        });
        if ready > 0 {
            status["numberAvailable"] = json!(ready);
        }
        if desired > ready {
            status["numberUnavailable"] = json!(desired - ready);
        }
        set_status(objects, "apps", "daemonsets", &e, status, CONTROLLER);
    }
    pending
}

fn jobs(shared: &Shared, objects: &Objects, view: &View) -> bool {
    let mut pending = false;
    for e in objects.list("batch", "jobs", None) {
        let o = &e.object;
        if job_complete(o) {
            continue;
        }
        let runnable = !runnable_nodes(view, shared, &template_spec(o)).is_empty();
        let started = o["status"]["startTime"].as_str().map(String::from).unwrap_or_else(now);
        let completions = o.pointer("/spec/completions").and_then(Value::as_i64).unwrap_or(1);
        let status = if runnable && elapsed(&e) >= ROLLOUT {
            let msg = "Reached expected number of succeeded pods";
            let mut sm = condition("SuccessCriteriaMet", true, "CompletionsReached", msg);
            let mut done = condition("Complete", true, "CompletionsReached", msg);
            for c in [&mut sm, &mut done] {
                let m = c.as_object_mut().expect("an object");
                m.remove("lastUpdateTime");
                m.insert("lastProbeTime".into(), json!(""));
            }
            json!({
                "startTime": started, "completionTime": now(), "succeeded": completions, "ready": 0,
                "terminating": 0, "uncountedTerminatedPods": {}, "conditions": [sm, done],
            })
        } else {
            pending |= runnable;
            json!({"startTime": started, "active": 1, "ready": 0, "terminating": 0, "uncountedTerminatedPods": {}})
        };
        let complete = status.get("completionTime").is_some();
        set_status(objects, "batch", "jobs", &e, status, CONTROLLER);
        if complete && ns_of(o).as_deref() == Some("kube-system") && runs_cilium_install(o) {
            install_cilium(shared, objects, o);
        }
    }
    pending
}

// ---- K3s's helm controller ---------------------------------------------------------------------------

fn helm_charts(shared: &Shared, objects: &Objects) {
    for e in objects.list("helm.cattle.io", "helmcharts", None) {
        let chart = &e.object;
        if chart.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let name = name_of(chart);
        let ns = ns_of(chart).unwrap_or_else(|| "kube-system".into());
        let spec = &chart["spec"];
        let target = spec["targetNamespace"].as_str().unwrap_or(&ns).to_string();
        let hash = format!("SHA256={}", hex(&Sha256::digest(spec.to_string().as_bytes())));
        let job_name = format!("helm-install-{name}");
        let owner = json!([{
            "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "name": name,
            "uid": chart["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
        }]);
        let existing = objects.get("batch", "jobs", Some(&ns), &job_name);
        let current = existing.as_ref().is_some_and(|j| {
            j.object
                .pointer("/metadata/annotations/helmcharts.helm.cattle.io~1configHash")
                == Some(&json!(hash))
        });
        if !current {
            if existing.is_some() {
                let _ = objects.remove("batch", "jobs", Some(&ns), &job_name);
            }
            create(
                shared,
                objects,
                "",
                "serviceaccounts",
                json!({"metadata": {"name": format!("helm-{name}"), "namespace": ns, "ownerReferences": owner}}),
                HELM_CONTROLLER,
            );
            let values_cm = format!("chart-values-{name}");
            let _ = objects.remove("", "configmaps", Some(&ns), &values_cm);
            create(
                shared,
                objects,
                "",
                "configmaps",
                json!({"metadata": {"name": values_cm, "namespace": ns, "ownerReferences": owner},
                       "data": {"values-01_HelmChart.yaml": spec["valuesContent"].as_str().unwrap_or("")}}),
                HELM_CONTROLLER,
            );
            let env = |k: &str, v: &Value| json!({"name": k, "value": v.as_str().unwrap_or("")});
            create(
                shared,
                objects,
                "batch",
                "jobs",
                json!({
                    "metadata": {
                        "name": job_name, "namespace": ns, "ownerReferences": owner,
                        "labels": {"helmcharts.helm.cattle.io/chart": name},
                        "annotations": {"helmcharts.helm.cattle.io/configHash": hash},
                    },
                    "spec": {
                        "backoffLimit": 1000,
                        "template": {
                            "metadata": {"labels": {"helmcharts.helm.cattle.io/chart": name}},
                            "spec": {
                                "restartPolicy": "OnFailure",
                                "serviceAccountName": format!("helm-{name}"),
                                "hostNetwork": spec["bootstrap"] == true,
                                "tolerations": if spec["bootstrap"] == true { json!([{"operator": "Exists"}]) } else { json!([]) },
                                "containers": [{
                                    "name": "helm", "image": KLIPPER_HELM, "args": ["install"],
                                    "env": [
                                        env("NAME", &json!(name)),
                                        env("VERSION", &spec["version"]),
                                        env("REPO", &spec["repo"]),
                                        env("CHART", &spec["chart"]),
                                        env("TARGET_NAMESPACE", &json!(target)),
                                        env("CHART_NAMESPACE", &json!(ns)),
                                        env("HELM_DRIVER", &json!("secret")),
                                    ],
                                }],
                            },
                        },
                    },
                }),
                HELM_CONTROLLER,
            );
        }
        let job = objects.get("batch", "jobs", Some(&ns), &job_name);
        let done = job.as_ref().is_some_and(|j| job_complete(&j.object));
        let mut failed = (false, String::new());
        if done {
            failed = helm_release(shared, objects, chart, &target, &hash);
        }
        let mut created = condition(
            "JobCreated",
            true,
            "Job created",
            &format!("Applying HelmChart using Job {ns}/{job_name}"),
        );
        let mut fail = condition("Failed", failed.0, if failed.0 { "Error" } else { "" }, &failed.1);
        for c in [&mut created, &mut fail] {
            c.as_object_mut().expect("an object").remove("lastUpdateTime");
        }
        set_status(
            objects,
            "helm.cattle.io",
            "helmcharts",
            &e,
            json!({"jobName": job_name, "conditions": [created, fail]}),
            HELM_CONTROLLER,
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Helm's release record for a chart whose install Job completed: a new revision when the
/// chart changed. `(failed, message)`.
fn helm_release(shared: &Shared, objects: &Objects, chart: &Value, target: &str, hash: &str) -> (bool, String) {
    let name = name_of(chart);
    if objects.get("", "namespaces", None, target).is_none() {
        if chart["spec"]["createNamespace"] == true {
            create(
                shared,
                objects,
                "",
                "namespaces",
                json!({"metadata": {"name": target}}),
                HELM_CONTROLLER,
            );
        } else {
            return (
                true,
                format!("Error: INSTALLATION FAILED: create: failed to create: namespaces \"{target}\" not found"),
            );
        }
    }
    let releases: Vec<Entry> = objects
        .list("", "secrets", Some(target))
        .into_iter()
        .filter(|s| s.object.pointer("/metadata/labels/owner") == Some(&json!("helm")))
        .filter(|s| s.object.pointer("/metadata/labels/name") == Some(&json!(name)))
        .collect();
    if releases.iter().any(|s| {
        s.object
            .pointer("/metadata/annotations/helmcharts.helm.cattle.io~1configHash")
            == Some(&json!(hash))
    }) {
        return (false, String::new());
    }
    let revision = releases
        .iter()
        .filter_map(|s| {
            s.object
                .pointer("/metadata/labels/version")
                .and_then(Value::as_str)?
                .parse::<u32>()
                .ok()
        })
        .max()
        .unwrap_or(0)
        + 1;
    for old in &releases {
        let mut o = old.object.clone();
        o["metadata"]["labels"]["status"] = json!("superseded");
        let _ = objects.put(
            "",
            "secrets",
            &Entry {
                changed_ms: old.changed_ms,
                object: o,
            },
        );
    }
    let record = json!({
        "name": name, "version": revision, "namespace": target,
        "chart": {"metadata": {"name": chart["spec"]["chart"], "version": chart["spec"]["version"]}},
        "info": {"status": "deployed", "description": if revision == 1 { "Install complete" } else { "Upgrade complete" }},
    });
    chart_crds(shared, objects, chart);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    create(
        shared,
        objects,
        "",
        "secrets",
        json!({
            "metadata": {
                "name": format!("sh.helm.release.v1.{name}.v{revision}"), "namespace": target,
                "labels": {"name": name, "owner": "helm", "status": "deployed", "version": revision.to_string()},
                "annotations": {"helmcharts.helm.cattle.io/configHash": hash},
            },
            "type": "helm.sh/release.v1",
            "data": {"release": b64.encode(b64.encode(record.to_string()))},
        }),
        "helm",
    );
    (false, String::new())
}

/// The CRDs well-known charts install (the ones whose custom resources a cluster's add-ons
/// declare next): (chart, group, version, kind, plural, namespaced).
const CHART_CRDS: &[(&str, &str, &str, &str, &str, bool)] = &[
    (
        "metallb",
        "metallb.io",
        "v1beta1",
        "IPAddressPool",
        "ipaddresspools",
        true,
    ),
    (
        "metallb",
        "metallb.io",
        "v1beta1",
        "L2Advertisement",
        "l2advertisements",
        true,
    ),
    (
        "cert-manager",
        "cert-manager.io",
        "v1",
        "Certificate",
        "certificates",
        true,
    ),
    ("cert-manager", "cert-manager.io", "v1", "Issuer", "issuers", true),
    (
        "cert-manager",
        "cert-manager.io",
        "v1",
        "ClusterIssuer",
        "clusterissuers",
        false,
    ),
];

/// What `helm install` of a well-known chart creates besides its release: its CRDs (made
/// Established by the next pass of the apiextensions controller).
fn chart_crds(shared: &Shared, objects: &Objects, chart: &Value) {
    let chart_name = chart["spec"]["chart"].as_str().unwrap_or("");
    for (_, group, version, kind, plural, namespaced) in CHART_CRDS.iter().filter(|c| c.0 == chart_name) {
        let name = format!("{plural}.{group}");
        if objects
            .get("apiextensions.k8s.io", "customresourcedefinitions", None, &name)
            .is_some()
        {
            continue;
        }
        create(
            shared,
            objects,
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            json!({
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "Helm"}},
                "spec": {
                    "group": group,
                    "scope": if *namespaced { "Namespaced" } else { "Cluster" },
                    "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                              "listKind": format!("{kind}List")},
                    "versions": [{"name": version, "served": true, "storage": true,
                                  "schema": {"openAPIV3Schema": {"type": "object",
                                                                 "x-kubernetes-preserve-unknown-fields": true}}}],
                },
            }),
            "helm",
        );
    }
}

// ---- deletion --------------------------------------------------------------------------------------

/// After an object is deleted: what goes with it at once (a CRD's custom resources, a
/// HelmChart's release records: helm-controller runs `helm uninstall`).
pub fn on_deleted(_shared: &Shared, objects: &Objects, res: &Resource, object: &Value) {
    if res.is("apiextensions.k8s.io", "customresourcedefinitions") {
        let group = object["spec"]["group"].as_str().unwrap_or_default();
        let plural = object["spec"]["names"]["plural"].as_str().unwrap_or_default();
        if !group.is_empty() && !plural.is_empty() {
            for e in objects.list(group, plural, None) {
                let _ = objects.remove(group, plural, ns_of(&e.object).as_deref(), &name_of(&e.object));
            }
        }
    }
    if res.is("helm.cattle.io", "helmcharts") {
        let name = name_of(object);
        let ns = ns_of(object).unwrap_or_default();
        let target = object["spec"]["targetNamespace"].as_str().unwrap_or(&ns).to_string();
        for s in objects.list("", "secrets", Some(&target)) {
            if s.object.pointer("/metadata/labels/owner") == Some(&json!("helm"))
                && s.object.pointer("/metadata/labels/name") == Some(&json!(name))
            {
                let _ = objects.remove("", "secrets", Some(&target), &name_of(&s.object));
            }
        }
    }
}

/// `propagationPolicy: Orphan`: dependents lose their owner reference instead of going.
pub fn orphan_dependents(objects: &Objects, owner: &Value) {
    let uid = owner["metadata"]["uid"].clone();
    for (group, plural) in objects.kinds() {
        for mut e in objects.list(&group, &plural, None) {
            let Some(refs) = e
                .object
                .pointer_mut("/metadata/ownerReferences")
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            let before = refs.len();
            refs.retain(|r| r["uid"] != uid);
            if refs.len() != before {
                let _ = objects.put(&group, &plural, &e);
            }
        }
    }
}

/// Delete objects whose owners are all gone.
fn garbage_collect(shared: &Shared, objects: &Objects) {
    let kinds = objects.kinds();
    let mut uids: BTreeSet<String> = BTreeSet::new();
    let mut all: Vec<(String, String, Entry)> = Vec::new();
    for (group, plural) in &kinds {
        for e in objects.list(group, plural, None) {
            if let Some(uid) = e.object.pointer("/metadata/uid").and_then(Value::as_str) {
                uids.insert(uid.to_string());
            }
            all.push((group.clone(), plural.clone(), e));
        }
    }
    let catalog = Catalog::new(true, &[]);
    let mut owners_gone: BTreeMap<(String, String), Vec<Entry>> = BTreeMap::new();
    for (group, plural, e) in all {
        let refs = e.object.pointer("/metadata/ownerReferences").and_then(Value::as_array);
        let Some(refs) = refs.filter(|r| !r.is_empty()) else {
            continue;
        };
        if refs.iter().all(|r| !uids.contains(r["uid"].as_str().unwrap_or(""))) {
            owners_gone.entry((group, plural)).or_default().push(e);
        }
    }
    for ((group, plural), entries) in owners_gone {
        let r = catalog
            .resources
            .iter()
            .find(|r| r.is(&group, &plural))
            .cloned()
            .unwrap_or_else(|| res_or_custom(&group, &plural, &entries[0].object));
        for e in entries {
            let _ = handlers::delete_object(shared, objects, &r, e, false, false);
        }
    }
}

// ---- pods ---------------------------------------------------------------------------------------------

/// The pods of the stored workloads, in one namespace or all.
pub fn workload_pods(shared: &Shared, view: &View, objects: &Objects, namespace: Option<&str>) -> Vec<Value> {
    let mut pods = Vec::new();
    for e in objects.list("apps", "deployments", namespace) {
        let o = &e.object;
        let replicas = o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
        let ready = o.pointer("/status/readyReplicas").and_then(Value::as_i64).unwrap_or(0);
        let hash = template_hash(o);
        let rs = format!("{}-{hash}", name_of(o));
        for i in 0..replicas {
            let name = format!("{rs}-{}", pod_suffix(shared.seed, &format!("{rs}/{i}"), 5));
            let mut labels = o
                .pointer("/spec/template/metadata/labels")
                .cloned()
                .unwrap_or(json!({}));
            labels["pod-template-hash"] = json!(hash);
            pods.push(pod(
                shared,
                view,
                o,
                &name,
                labels,
                ("ReplicaSet", &rs),
                None,
                i < ready,
                false,
                i as usize,
            ));
        }
    }
    for e in objects.list("apps", "statefulsets", namespace) {
        let o = &e.object;
        let replicas = o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
        let ready = o.pointer("/status/readyReplicas").and_then(Value::as_i64).unwrap_or(0);
        for i in 0..replicas {
            let name = format!("{}-{i}", name_of(o));
            let labels = o
                .pointer("/spec/template/metadata/labels")
                .cloned()
                .unwrap_or(json!({}));
            pods.push(pod(
                shared,
                view,
                o,
                &name,
                labels,
                ("StatefulSet", &name_of(o)),
                None,
                i < ready,
                false,
                i as usize,
            ));
        }
    }
    for e in objects.list("apps", "daemonsets", namespace) {
        let o = &e.object;
        let rolled = o.pointer("/status/numberReady").and_then(Value::as_i64).unwrap_or(0) > 0;
        for (i, (node, runs)) in daemonset_nodes(view, shared, o).into_iter().enumerate() {
            let name = format!(
                "{}-{}",
                name_of(o),
                pod_suffix(shared.seed, &format!("{}/{}", name_of(o), node.name), 5)
            );
            let labels = o
                .pointer("/spec/template/metadata/labels")
                .cloned()
                .unwrap_or(json!({}));
            pods.push(pod(
                shared,
                view,
                o,
                &name,
                labels,
                ("DaemonSet", &name_of(o)),
                Some(node),
                rolled && runs,
                false,
                i,
            ));
        }
    }
    for e in objects.list("batch", "jobs", namespace) {
        let o = &e.object;
        let name = format!("{}-{}", name_of(o), pod_suffix(shared.seed, &name_of(o), 5));
        let mut labels = o
            .pointer("/spec/template/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        labels["job-name"] = json!(name_of(o));
        labels["batch.kubernetes.io/job-name"] = json!(name_of(o));
        pods.push(pod(
            shared,
            view,
            o,
            &name,
            labels,
            ("Job", &name_of(o)),
            None,
            false,
            job_complete(o),
            0,
        ));
    }
    pods
}

#[allow(clippy::too_many_arguments)]
fn pod(
    shared: &Shared,
    view: &View,
    owner: &Value,
    name: &str,
    labels: Value,
    (owner_kind, owner_name): (&str, &str),
    node: Option<&SimNode>,
    ready: bool,
    succeeded: bool,
    index: usize,
) -> Value {
    let spec = template_spec(owner);
    let nodes = runnable_nodes(view, shared, &spec);
    let node = node.or_else(|| (!nodes.is_empty()).then(|| nodes[index % nodes.len()]));
    let created = owner["metadata"]["creationTimestamp"].clone();
    let containers = spec["containers"].as_array().cloned().unwrap_or_default();
    let running = ready || succeeded;
    let statuses: Vec<Value> = containers
        .iter()
        .map(|c| {
            let state = if succeeded {
                json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": created, "finishedAt": created}})
            } else if ready {
                json!({"running": {"startedAt": created}})
            } else {
                json!({"waiting": {"reason": "ContainerCreating"}})
            };
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": ready, "started": ready,
                   "restartCount": 0, "state": state})
        })
        .collect();
    let status = match (node, running) {
        (None, _) => json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": format!("0/{} nodes are available: {} node(s) had untolerated taint {{node.kubernetes.io/not-ready: }}.",
                                   view.nodes.len(), view.nodes.len())}],
        }),
        (Some(n), _) => json!({
            "phase": if succeeded { "Succeeded" } else if ready { "Running" } else { "Pending" },
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": if ready { "True" } else { "False" }},
            ],
            "hostIP": n.internal_ip,
            "podIP": if spec["hostNetwork"] == true { json!(n.internal_ip) } else { json!(format!("10.42.{}.{}", index % 250, (store::splitmix64(shared.seed ^ index as u64) % 250) + 2)) },
            "startTime": created,
            "containerStatuses": statuses,
        }),
    };
    let mut pod_spec = spec.clone();
    if let Some(n) = node {
        pod_spec["nodeName"] = json!(n.name);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": owner["metadata"]["namespace"],
            "uid": store::uuid_from(shared.seed, &format!("pod/{}/{name}", owner["metadata"]["uid"])),
            "creationTimestamp": created, "labels": labels,
            "ownerReferences": [{"apiVersion": if owner_kind == "Job" { "batch/v1" } else { "apps/v1" }, "kind": owner_kind, "name": owner_name,
                                 "uid": owner["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": pod_spec,
        "status": status,
    })
}
