//! Add-ons against the Kubernetes API (through `ports::KubeApi`): observe for the plan,
//! apply one add-on, remove one that left git. Every object is applied server-side with
//! field manager `driftless`; a conflict stops the add-on unless it says `force_conflicts`.
//! Namespaces go first, then CRDs (waited for until Established, so their kinds are served),
//! then the rest; then the add-on's Deployments, DaemonSets, StatefulSets, Jobs, HelmCharts
//! and declared health checks must be healthy within the gate timeout. Prune deletes only
//! what the add-on's inventory lists.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value as Json;

use super::plan::{AddonsObserved, ObjectObserved};
use super::{INVENTORY_LABEL, INVENTORY_NAMESPACE, ObjectKey, addon_objects, inventory_name, inventory_object};
use crate::model::{Addon, Desired, HealthRef};
use crate::ports::{ApiKind, KubeApi, KubeError};
use crate::render::Artifact;

/// Why an add-on did not apply. Messages name objects and the API server's words, never a
/// Secret's values (driftless never quotes an object's data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddonError {
    #[error("add-on {addon}: {object}: {error}")]
    Kube {
        addon: String,
        object: String,
        error: KubeError,
    },
    #[error(
        "add-on {addon}: {object}: fields are owned by another field manager ({message}); set `force_conflicts: true` \
         on the add-on to take them over"
    )]
    Conflict {
        addon: String,
        object: String,
        message: String,
    },
    #[error("add-on {addon}: {object}: the API server does not serve {kind} ({api_version})")]
    NotServed {
        addon: String,
        object: String,
        kind: String,
        api_version: String,
    },
    #[error("add-on {addon}: {object} was not healthy within {secs} s ({reason}); the apply stops here")]
    Unhealthy {
        addon: String,
        object: String,
        secs: u64,
        reason: String,
    },
    #[error("add-on {addon}: {object} failed: {reason}")]
    Failed {
        addon: String,
        object: String,
        reason: String,
    },
}

impl AddonError {
    pub fn retryable(&self) -> bool {
        match self {
            AddonError::Kube { error, .. } => error.retryable(),
            AddonError::Unhealthy { .. } | AddonError::NotServed { .. } => true,
            AddonError::Conflict { .. } | AddonError::Failed { .. } => false,
        }
    }
}

/// How long to wait for what an add-on applied, and how often to look.
#[derive(Debug, Clone, Copy)]
pub struct Waits {
    pub timeout: Duration,
    pub interval: Duration,
}

pub fn configmaps() -> ApiKind {
    ApiKind {
        group: String::new(),
        version: "v1".into(),
        kind: "ConfigMap".into(),
        plural: "configmaps".into(),
        namespaced: true,
    }
}

/// Discovery answers, asked once per kind.
struct Kinds<'k, K: KubeApi> {
    kube: &'k K,
    known: BTreeMap<(String, String), ApiKind>,
}

impl<'k, K: KubeApi> Kinds<'k, K> {
    fn new(kube: &'k K) -> Self {
        Kinds {
            kube,
            known: BTreeMap::new(),
        }
    }

    async fn resolve(&mut self, api_version: &str, kind: &str) -> Result<Option<ApiKind>, KubeError> {
        let k = (api_version.to_string(), kind.to_string());
        if let Some(found) = self.known.get(&k) {
            return Ok(Some(found.clone()));
        }
        let found = self.kube.resolve(api_version, kind).await?;
        if let Some(f) = &found {
            self.known.insert(k, f.clone());
        }
        Ok(found)
    }
}

/// The object as it is applied: a namespaced kind without a namespace goes to `default`, as
/// kubectl does; a cluster-wide kind carries none.
fn placed(object: &Json, kind: &ApiKind) -> (Json, ObjectKey) {
    let mut o = object.clone();
    let meta = o["metadata"].as_object_mut().expect("rendered objects have metadata");
    if kind.namespaced {
        let ns = meta.get("namespace").and_then(Json::as_str).filter(|s| !s.is_empty());
        if ns.is_none() {
            meta.insert("namespace".into(), Json::String("default".into()));
        }
    } else {
        meta.remove("namespace");
    }
    let key = ObjectKey::of(&o).expect("rendered objects have a key");
    (o, key)
}

/// Read the inventories, and every declared object: live, and as a dry-run apply would
/// leave it. Writes nothing. Without `dry_run` (a pull request's objects are untrusted: the
/// cluster is sent none of them, not even as a dry run), the object is laid over the live one
/// here instead: the fields it sets, compared without the server's defaulting.
pub async fn observe<K: KubeApi>(
    kube: &K,
    desired: &Desired,
    artifacts: &[Artifact],
    dry_run: bool,
) -> Result<AddonsObserved, KubeError> {
    let mut observed = AddonsObserved {
        api: true,
        inventories: inventories(kube).await?,
        ..AddonsObserved::default()
    };
    let mut kinds = Kinds::new(kube);
    for addon in &desired.cluster.addons {
        for object in addon_objects(artifacts, &addon.name) {
            let Some(rendered) = ObjectKey::of(&object) else {
                continue;
            };
            let Some(kind) = kinds.resolve(&rendered.api_version, &rendered.kind).await? else {
                observed.objects.insert(rendered, ObjectObserved::default());
                continue;
            };
            let (object, key) = placed(&object, &kind);
            let live = kube.get_object(&kind, key.namespace.as_deref(), &key.name).await?;
            let mut seen = ObjectObserved {
                key: Some(key.clone()),
                served: true,
                ..ObjectObserved::default()
            };
            if let Some(live) = live.as_ref().filter(|_| !dry_run) {
                let mut laid = live.clone();
                overlay(&mut laid, &object);
                seen.would_be = Some(laid);
            } else if live.is_some() {
                let ns = key.namespace.as_deref();
                seen.would_be = match kube.apply_object(&kind, ns, &object, true, false).await {
                    Ok(o) => Some(o),
                    Err(KubeError::Api { status: 409, message }) => {
                        seen.conflict = Some(message);
                        Some(kube.apply_object(&kind, ns, &object, true, true).await?)
                    }
                    Err(e) => return Err(e),
                };
            }
            seen.live = live;
            observed.objects.insert(rendered, seen);
        }
    }
    Ok(observed)
}

/// `over` laid on `base`: mappings key by key, anything else replaced.
fn overlay(base: &mut Json, over: &Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                overlay(b.entry(k.clone()).or_insert(Json::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Every add-on inventory in the cluster: add-on name -> objects.
async fn inventories<K: KubeApi>(kube: &K) -> Result<BTreeMap<String, Vec<ObjectKey>>, KubeError> {
    let list = kube
        .list_objects(
            &configmaps(),
            Some(INVENTORY_NAMESPACE),
            &format!("{INVENTORY_LABEL}=true"),
        )
        .await?;
    Ok(list
        .iter()
        .filter_map(|cm| {
            let addon = cm.pointer(&format!("/metadata/labels/{}", super::ADDON_LABEL.replace('/', "~1")))?;
            let name = addon.as_str()?;
            (cm.pointer("/metadata/name")?.as_str()? == inventory_name(name)).then(|| {
                let text = cm.pointer("/data/objects").and_then(Json::as_str).unwrap_or("");
                (name.to_string(), super::parse_inventory(text))
            })
        })
        .collect())
}

/// Apply one add-on: its objects in order, wait for them, prune what left its inventory
/// (`prune`), record the inventory.
pub async fn apply<K: KubeApi>(
    kube: &K,
    addon: &Addon,
    manifests: &str,
    prune: bool,
    waits: Waits,
    log: &mut Vec<String>,
) -> Result<(), AddonError> {
    let name = addon.name.as_str();
    let kube_err = |object: &dyn std::fmt::Display, error: KubeError| AddonError::Kube {
        addon: name.to_string(),
        object: object.to_string(),
        error,
    };
    let mut objects = super::objects(manifests);
    objects.sort_by_key(|o| ObjectKey::of(o).map_or(2, |k| k.apply_rank()));
    let mut kinds = Kinds::new(kube);
    let mut applied: Vec<(ApiKind, ObjectKey)> = Vec::new();
    let mut created = 0;
    for object in &objects {
        let rendered = ObjectKey::of(object).expect("rendered objects have a key");
        let kind = served_kind(&mut kinds, &rendered, waits)
            .await
            .map_err(|e| kube_err(&rendered, e))?
            .ok_or_else(|| AddonError::NotServed {
                addon: name.to_string(),
                object: rendered.to_string(),
                kind: rendered.kind.clone(),
                api_version: rendered.api_version.clone(),
            })?;
        let (object, key) = placed(object, &kind);
        let ns = key.namespace.as_deref();
        let existed = kube
            .get_object(&kind, ns, &key.name)
            .await
            .map_err(|e| kube_err(&key, e))?
            .is_some();
        match kube
            .apply_object(&kind, ns, &object, false, addon.force_conflicts)
            .await
        {
            Ok(_) => {}
            Err(KubeError::Api { status: 409, message }) => {
                return Err(AddonError::Conflict {
                    addon: name.to_string(),
                    object: key.to_string(),
                    message,
                });
            }
            Err(e) => return Err(kube_err(&key, e)),
        }
        if !existed {
            created += 1;
        }
        if key.apply_rank() == 1 {
            wait_for(kube, name, &kind, &key, waits, established).await?;
        }
        applied.push((kind, key));
    }
    log.push(format!("{}: {} object(s) applied, {created} new", name, applied.len()));
    for (kind, key) in &applied {
        if let Some(judge) = judge_for(key.group(), &key.kind) {
            wait_for(kube, name, kind, key, waits, judge).await?;
        }
    }
    for check in &addon.health {
        let Some(kind) = health_kind(&mut kinds, check).await.map_err(|e| kube_err(check, e))? else {
            return Err(AddonError::NotServed {
                addon: name.to_string(),
                object: check.to_string(),
                kind: check.kind.clone(),
                api_version: "?".into(),
            });
        };
        let key = ObjectKey {
            api_version: kind.api_version(),
            kind: kind.kind.clone(),
            namespace: check.namespace.clone(),
            name: check.name.clone(),
        };
        let judge = judge_for(&kind.group, &kind.kind).expect("health kinds are judged");
        wait_for(kube, name, &kind, &key, waits, judge).await?;
    }
    log.push(format!("{name}: healthy"));

    // The inventory: what is applied now, and (prune off) what left git but stays.
    let wanted: BTreeSet<ObjectKey> = applied.iter().map(|(_, k)| k.clone()).collect();
    let cm = configmaps();
    let old = kube
        .get_object(&cm, Some(INVENTORY_NAMESPACE), &inventory_name(name))
        .await
        .map_err(|e| kube_err(&"the inventory", e))?
        .and_then(|o| {
            o.pointer("/data/objects")
                .and_then(Json::as_str)
                .map(super::parse_inventory)
        })
        .unwrap_or_default();
    let stale: Vec<ObjectKey> = old.into_iter().filter(|k| !wanted.contains(k)).collect();
    let mut recorded = wanted.clone();
    if prune {
        delete_all(kube, name, &stale, log).await?;
    } else {
        recorded.extend(stale);
    }
    kube.apply_object(
        &cm,
        Some(INVENTORY_NAMESPACE),
        &inventory_object(name, &recorded),
        false,
        true,
    )
    .await
    .map_err(|e| kube_err(&"the inventory", e))?;
    Ok(())
}

/// Remove an add-on that left git: everything its inventory lists, then the inventory.
pub async fn remove<K: KubeApi>(kube: &K, addon: &str, log: &mut Vec<String>) -> Result<(), AddonError> {
    let cm = configmaps();
    let inventory = kube
        .get_object(&cm, Some(INVENTORY_NAMESPACE), &inventory_name(addon))
        .await
        .map_err(|error| AddonError::Kube {
            addon: addon.to_string(),
            object: "the inventory".into(),
            error,
        })?
        .and_then(|o| {
            o.pointer("/data/objects")
                .and_then(Json::as_str)
                .map(super::parse_inventory)
        })
        .unwrap_or_default();
    delete_all(kube, addon, &inventory, log).await?;
    kube.delete_object(&cm, Some(INVENTORY_NAMESPACE), &inventory_name(addon))
        .await
        .map_err(|error| AddonError::Kube {
            addon: addon.to_string(),
            object: "the inventory".into(),
            error,
        })?;
    log.push(format!("{addon}: removed"));
    Ok(())
}

/// Delete `keys`, the reverse of the apply order: objects, then CRDs, then namespaces.
async fn delete_all<K: KubeApi>(
    kube: &K,
    addon: &str,
    keys: &[ObjectKey],
    log: &mut Vec<String>,
) -> Result<(), AddonError> {
    let mut keys = keys.to_vec();
    keys.sort_by_key(|k| std::cmp::Reverse(k.apply_rank()));
    for key in keys {
        let err = |error| AddonError::Kube {
            addon: addon.to_string(),
            object: key.to_string(),
            error,
        };
        let Some(kind) = kube.resolve(&key.api_version, &key.kind).await.map_err(err)? else {
            continue; // its CRD is gone, and the object with it
        };
        if kube
            .delete_object(&kind, key.namespace.as_deref(), &key.name)
            .await
            .map_err(err)?
        {
            log.push(format!("{addon}: pruned {key}"));
        }
    }
    Ok(())
}

/// Discovery for an object's kind, waiting (within the timeout) for a kind a CRD applied
/// moments ago has not made served yet.
async fn served_kind<K: KubeApi>(
    kinds: &mut Kinds<'_, K>,
    key: &ObjectKey,
    waits: Waits,
) -> Result<Option<ApiKind>, KubeError> {
    let deadline = tokio::time::Instant::now() + waits.timeout;
    loop {
        match kinds.resolve(&key.api_version, &key.kind).await? {
            Some(k) => return Ok(Some(k)),
            None if tokio::time::Instant::now() < deadline => tokio::time::sleep(waits.interval).await,
            None => return Ok(None),
        }
    }
}

/// The kind a health check names, at its usual API version.
async fn health_kind<K: KubeApi>(kinds: &mut Kinds<'_, K>, check: &HealthRef) -> Result<Option<ApiKind>, KubeError> {
    let api_version = match check.kind.as_str() {
        "Job" => "batch/v1",
        "HelmChart" => "helm.cattle.io/v1",
        _ => "apps/v1",
    };
    kinds.resolve(api_version, &check.kind).await
}

/// What a judge says of an object now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Not yet, and why.
    Waiting(String),
    /// Will not get healthy by waiting.
    Failed(String),
}

type Judge = fn(&Json, Option<&Json>) -> Verdict;

/// The judge of a kind, when driftless waits for that kind.
fn judge_for(group: &str, kind: &str) -> Option<Judge> {
    Some(match (group, kind) {
        ("apps", "Deployment") | ("apps", "StatefulSet") => rolled_out,
        ("apps", "DaemonSet") => daemonset_rolled_out,
        ("batch", "Job") => job_complete,
        ("helm.cattle.io", "HelmChart") => helmchart_installed,
        _ => return None,
    })
}

fn int(o: &Json, path: &str) -> i64 {
    o.pointer(path).and_then(Json::as_i64).unwrap_or(0)
}

fn condition<'a>(o: &'a Json, kind: &str) -> Option<&'a Json> {
    o.pointer("/status/conditions")
        .and_then(Json::as_array)?
        .iter()
        .find(|c| c["type"] == kind)
}

fn condition_true(o: &Json, kind: &str) -> bool {
    condition(o, kind).is_some_and(|c| c["status"] == "True")
}

fn generation_observed(o: &Json) -> bool {
    int(o, "/status/observedGeneration") >= int(o, "/metadata/generation")
}

/// A Deployment or StatefulSet: the controller saw this generation, every replica updated and ready.
pub fn rolled_out(o: &Json, _: Option<&Json>) -> Verdict {
    let want = o.pointer("/spec/replicas").and_then(Json::as_i64).unwrap_or(1);
    let (ready, updated) = (int(o, "/status/readyReplicas"), int(o, "/status/updatedReplicas"));
    if !generation_observed(o) {
        Verdict::Waiting("the controller has not seen the new spec yet".into())
    } else if ready < want || updated < want {
        Verdict::Waiting(format!("{ready}/{want} replicas ready, {updated} updated"))
    } else {
        Verdict::Healthy
    }
}

pub fn daemonset_rolled_out(o: &Json, _: Option<&Json>) -> Verdict {
    let want = int(o, "/status/desiredNumberScheduled");
    let (ready, updated) = (int(o, "/status/numberReady"), int(o, "/status/updatedNumberScheduled"));
    if !generation_observed(o) || o.get("status").is_none() {
        Verdict::Waiting("the controller has not seen the new spec yet".into())
    } else if ready < want || updated < want {
        Verdict::Waiting(format!("{ready}/{want} pods ready, {updated} updated"))
    } else {
        Verdict::Healthy
    }
}

pub fn job_complete(o: &Json, _: Option<&Json>) -> Verdict {
    if condition_true(o, "Complete") {
        Verdict::Healthy
    } else if let Some(c) = condition(o, "Failed").filter(|c| c["status"] == "True") {
        Verdict::Failed(
            c["message"]
                .as_str()
                .or(c["reason"].as_str())
                .unwrap_or("the Job failed")
                .to_string(),
        )
    } else {
        Verdict::Waiting(format!("{} pod(s) active, not complete", int(o, "/status/active")))
    }
}

/// A K3s HelmChart: its install Job (`status.jobName`) completed and it is not Failed.
/// `job`: that Job, when read.
pub fn helmchart_installed(o: &Json, job: Option<&Json>) -> Verdict {
    if let Some(c) = condition(o, "Failed").filter(|c| c["status"] == "True") {
        return Verdict::Failed(
            c["message"]
                .as_str()
                .unwrap_or("the chart failed to install")
                .to_string(),
        );
    }
    if o.pointer("/status/jobName").and_then(Json::as_str).is_none() {
        return Verdict::Waiting("the helm controller has not started an install Job".into());
    }
    match job {
        None => Verdict::Waiting("its install Job is not there yet".into()),
        Some(j) => match job_complete(j, None) {
            Verdict::Healthy => Verdict::Healthy,
            Verdict::Waiting(w) => Verdict::Waiting(format!("install Job: {w}")),
            // helm-controller retries the Job: report it, keep waiting for the deadline.
            Verdict::Failed(f) => Verdict::Waiting(format!("install Job failed: {f}")),
        },
    }
}

/// A CRD is Established: its kinds are served.
pub fn established(o: &Json, _: Option<&Json>) -> Verdict {
    if condition_true(o, "Established") {
        Verdict::Healthy
    } else {
        Verdict::Waiting("not Established yet".into())
    }
}

/// Poll `key` until `judge` says healthy, within the timeout.
async fn wait_for<K: KubeApi>(
    kube: &K,
    addon: &str,
    kind: &ApiKind,
    key: &ObjectKey,
    waits: Waits,
    judge: Judge,
) -> Result<(), AddonError> {
    let deadline = tokio::time::Instant::now() + waits.timeout;
    let ns = key.namespace.as_deref();
    loop {
        let verdict = match kube.get_object(kind, ns, &key.name).await {
            Ok(Some(o)) => {
                let job = match o.pointer("/status/jobName").and_then(Json::as_str) {
                    Some(job) if kind.group == "helm.cattle.io" => {
                        let jobs = ApiKind {
                            group: "batch".into(),
                            version: "v1".into(),
                            kind: "Job".into(),
                            plural: "jobs".into(),
                            namespaced: true,
                        };
                        kube.get_object(&jobs, ns, job).await.ok().flatten()
                    }
                    _ => None,
                };
                judge(&o, job.as_ref())
            }
            Ok(None) => Verdict::Waiting("not there".into()),
            Err(e) if e.retryable() => Verdict::Waiting(e.to_string()),
            Err(error) => {
                return Err(AddonError::Kube {
                    addon: addon.to_string(),
                    object: key.to_string(),
                    error,
                });
            }
        };
        match verdict {
            Verdict::Healthy => return Ok(()),
            Verdict::Failed(reason) => {
                return Err(AddonError::Failed {
                    addon: addon.to_string(),
                    object: key.to_string(),
                    reason,
                });
            }
            Verdict::Waiting(reason) if tokio::time::Instant::now() >= deadline => {
                return Err(AddonError::Unhealthy {
                    addon: addon.to_string(),
                    object: key.to_string(),
                    secs: waits.timeout.as_secs(),
                    reason,
                });
            }
            Verdict::Waiting(_) => tokio::time::sleep(waits.interval).await,
        }
    }
}
