//! The resources the simulated API server serves: the built-in kinds of the groups below
//! (K3s's `helm.cattle.io` and `k3s.cattle.io` only on a K3s cluster) and the kinds of
//! every Established CustomResourceDefinition, and the discovery documents that list them
//! (`/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`), in kube-apiserver's shapes.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// One resource of one group version.
#[derive(Debug, Clone)]
pub struct Resource {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    /// The plural: what the URL names.
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a `status` subresource: writes to the object leave `status` alone, and `/status`
    /// writes only `status`.
    pub status: bool,
    /// A CRD version's `openAPIV3Schema` (its list types decide how apply merges lists).
    pub schema: Option<Value>,
    /// A CRD version's `additionalPrinterColumns`.
    pub printer_columns: Vec<Value>,
    /// Served from a CustomResourceDefinition.
    pub custom: bool,
}

impl Resource {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `configmaps` or `deployments.apps`: how errors name the resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn is(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }

    fn verbs(&self) -> Vec<&'static str> {
        if self.is("", "namespaces") {
            vec!["create", "delete", "get", "list", "patch", "update", "watch"]
        } else {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        }
    }

    /// The entries of an APIResourceList: the resource and its subresources.
    fn discovery(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs(),
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let hash = Sha256::digest(format!("{}/{}/{}", self.group, self.version, self.kind));
        main["storageVersionHash"] = json!(base64_short(&hash[..8]));
        let mut out = vec![main];
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

fn base64_short(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// group, version, plural, singular, kind, namespaced, short names, categories, status.
type Builtin = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    &'static [&'static str],
    bool,
);

const ALL: &[&str] = &["all"];

#[rustfmt::skip]
const BUILTINS: &[Builtin] = &[
    ("", "v1", "configmaps", "configmap", "ConfigMap", true, &["cm"], &[], false),
    ("", "v1", "endpoints", "endpoints", "Endpoints", true, &["ep"], &[], false),
    ("", "v1", "events", "event", "Event", true, &["ev"], &[], false),
    ("", "v1", "limitranges", "limitrange", "LimitRange", true, &["limits"], &[], false),
    ("", "v1", "namespaces", "namespace", "Namespace", false, &["ns"], &[], true),
    ("", "v1", "nodes", "node", "Node", false, &["no"], &[], true),
    ("", "v1", "persistentvolumeclaims", "persistentvolumeclaim", "PersistentVolumeClaim", true, &["pvc"], &[], true),
    ("", "v1", "persistentvolumes", "persistentvolume", "PersistentVolume", false, &["pv"], &[], true),
    ("", "v1", "pods", "pod", "Pod", true, &["po"], ALL, true),
    ("", "v1", "podtemplates", "podtemplate", "PodTemplate", true, &[], &[], false),
    ("", "v1", "replicationcontrollers", "replicationcontroller", "ReplicationController", true, &["rc"], ALL, true),
    ("", "v1", "resourcequotas", "resourcequota", "ResourceQuota", true, &["quota"], &[], true),
    ("", "v1", "secrets", "secret", "Secret", true, &[], &[], false),
    ("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, &["sa"], &[], false),
    ("", "v1", "services", "service", "Service", true, &["svc"], ALL, true),
    ("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "mutatingwebhookconfiguration", "MutatingWebhookConfiguration", false, &[], &["api-extensions"], false),
    ("admissionregistration.k8s.io", "v1", "validatingadmissionpolicies", "validatingadmissionpolicy", "ValidatingAdmissionPolicy", false, &[], &["api-extensions"], true),
    ("admissionregistration.k8s.io", "v1", "validatingadmissionpolicybindings", "validatingadmissionpolicybinding", "ValidatingAdmissionPolicyBinding", false, &[], &["api-extensions"], false),
    ("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations", "validatingwebhookconfiguration", "ValidatingWebhookConfiguration", false, &[], &["api-extensions"], false),
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions", "customresourcedefinition", "CustomResourceDefinition", false, &["crd", "crds"], &["api-extensions"], true),
    ("apiregistration.k8s.io", "v1", "apiservices", "apiservice", "APIService", false, &[], &["api-extensions"], true),
    ("apps", "v1", "controllerrevisions", "controllerrevision", "ControllerRevision", true, &[], &[], false),
    ("apps", "v1", "daemonsets", "daemonset", "DaemonSet", true, &["ds"], ALL, true),
    ("apps", "v1", "deployments", "deployment", "Deployment", true, &["deploy"], ALL, true),
    ("apps", "v1", "replicasets", "replicaset", "ReplicaSet", true, &["rs"], ALL, true),
    ("apps", "v1", "statefulsets", "statefulset", "StatefulSet", true, &["sts"], ALL, true),
    ("autoscaling", "v2", "horizontalpodautoscalers", "horizontalpodautoscaler", "HorizontalPodAutoscaler", true, &["hpa"], ALL, true),
    ("batch", "v1", "cronjobs", "cronjob", "CronJob", true, &["cj"], ALL, true),
    ("batch", "v1", "jobs", "job", "Job", true, &[], ALL, true),
    ("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, &[], &[], false),
    ("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", true, &[], &[], false),
    ("networking.k8s.io", "v1", "ingressclasses", "ingressclass", "IngressClass", false, &[], &[], false),
    ("networking.k8s.io", "v1", "ingresses", "ingress", "Ingress", true, &["ing"], &[], true),
    ("networking.k8s.io", "v1", "networkpolicies", "networkpolicy", "NetworkPolicy", true, &["netpol"], &[], false),
    ("policy", "v1", "poddisruptionbudgets", "poddisruptionbudget", "PodDisruptionBudget", true, &["pdb"], &[], true),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", false, &[], &[], false),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "clusterrole", "ClusterRole", false, &[], &[], false),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "rolebinding", "RoleBinding", true, &[], &[], false),
    ("rbac.authorization.k8s.io", "v1", "roles", "role", "Role", true, &[], &[], false),
    ("scheduling.k8s.io", "v1", "priorityclasses", "priorityclass", "PriorityClass", false, &["pc"], &[], false),
    ("storage.k8s.io", "v1", "csidrivers", "csidriver", "CSIDriver", false, &[], &[], false),
    ("storage.k8s.io", "v1", "csinodes", "csinode", "CSINode", false, &[], &[], false),
    ("storage.k8s.io", "v1", "storageclasses", "storageclass", "StorageClass", false, &["sc"], &[], false),
    ("storage.k8s.io", "v1", "volumeattachments", "volumeattachment", "VolumeAttachment", false, &[], &[], true),
];

/// K3s's own CRDs (its helm controller and manifest addons): served on a K3s cluster only.
#[rustfmt::skip]
const K3S_BUILTINS: &[Builtin] = &[
    ("helm.cattle.io", "v1", "helmchartconfigs", "helmchartconfig", "HelmChartConfig", true, &[], &[], false),
    ("helm.cattle.io", "v1", "helmcharts", "helmchart", "HelmChart", true, &[], &[], true),
    ("k3s.cattle.io", "v1", "addons", "addon", "Addon", true, &[], &[], false),
];

/// The order kube-apiserver lists its groups in (`/apis`).
const GROUP_ORDER: &[&str] = &[
    "apiregistration.k8s.io",
    "apps",
    "autoscaling",
    "batch",
    "networking.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "storage.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "scheduling.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "helm.cattle.io",
    "k3s.cattle.io",
];

fn builtin(b: &Builtin) -> Resource {
    let (group, version, plural, singular, kind, namespaced, short, categories, status) = *b;
    Resource {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        singular: singular.into(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: categories.iter().map(|s| s.to_string()).collect(),
        status,
        schema: None,
        printer_columns: Vec::new(),
        custom: false,
    }
}

/// Every resource served right now.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub resources: Vec<Resource>,
}

impl Catalog {
    /// The built-in resources (K3s's with `k3s`), and those of the Established CRDs in `crds`.
    pub fn new(k3s: bool, crds: &[Value]) -> Catalog {
        let mut resources: Vec<Resource> = BUILTINS.iter().map(builtin).collect();
        if k3s {
            resources.extend(K3S_BUILTINS.iter().map(builtin));
        }
        for crd in crds {
            if !crd_established(crd) || crd.pointer("/metadata/deletionTimestamp").is_some() {
                continue;
            }
            for r in crd_resources(crd) {
                // A CRD cannot take over a built-in resource.
                if !resources.iter().any(|b| !b.custom && b.is(&r.group, &r.plural)) {
                    resources.push(r);
                }
            }
        }
        Catalog { resources }
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&Resource> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// The served versions of a group, preferred first.
    fn versions(&self, group: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.resources.iter().filter(|r| r.group == group) {
            if !out.contains(&r.version) {
                out.push(r.version.clone());
            }
        }
        out.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        out
    }

    fn groups(&self) -> Vec<String> {
        let mut custom: Vec<String> = Vec::new();
        let mut out: Vec<String> = Vec::new();
        for g in GROUP_ORDER {
            if self.resources.iter().any(|r| r.group == *g) {
                out.push(g.to_string());
            }
        }
        for r in &self.resources {
            if !r.group.is_empty() && !out.contains(&r.group) && !custom.contains(&r.group) {
                custom.push(r.group.clone());
            }
        }
        custom.sort();
        out.extend(custom);
        out
    }

    /// `GET /api`.
    pub fn api_versions(&self, server: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
        })
    }

    /// `GET /apis`.
    pub fn group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .map(|g| {
                let versions: Vec<Value> = self
                    .versions(g)
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                    .collect();
                json!({"name": g, "versions": versions, "preferredVersion": versions[0].clone()})
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /apis/{group}`.
    pub fn group(&self, group: &str) -> Option<Value> {
        let versions: Vec<Value> = self
            .versions(group)
            .iter()
            .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
            .collect();
        if versions.is_empty() {
            return None;
        }
        Some(json!({
            "kind": "APIGroup", "apiVersion": "v1", "name": group,
            "versions": versions, "preferredVersion": versions[0].clone(),
        }))
    }

    /// `GET /api/v1`, `GET /apis/{group}/{version}`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut matching: Vec<&Resource> = self
            .resources
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .collect();
        if matching.is_empty() {
            return None;
        }
        matching.sort_by(|a, b| a.plural.cmp(&b.plural));
        let resources: Vec<Value> = matching.iter().flat_map(|r| r.discovery()).collect();
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources,
        }))
    }
}

/// Kubernetes's version order: GA above beta above alpha, higher numbers first.
fn version_priority(v: &str) -> (u8, u32, u32) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let major: u32 = digits.parse().unwrap_or(0);
    let tail = &rest[digits.len()..];
    let (stage, minor) = if tail.is_empty() {
        (3, 0)
    } else if let Some(n) = tail.strip_prefix("beta") {
        (2, n.parse().unwrap_or(0))
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n.parse().unwrap_or(0))
    } else {
        (0, 0)
    };
    (stage, major, minor)
}

/// A CRD's `Established` condition is `True`.
pub fn crd_established(crd: &Value) -> bool {
    crd.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Established" && c["status"] == "True"))
}

/// The resources a CRD serves, one per served version.
pub fn crd_resources(crd: &Value) -> Vec<Resource> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    let mut out = Vec::new();
    for v in spec["versions"].as_array().into_iter().flatten() {
        if v["served"] != Value::Bool(true) {
            continue;
        }
        out.push(Resource {
            group: spec["group"].as_str().unwrap_or_default().to_string(),
            version: v["name"].as_str().unwrap_or_default().to_string(),
            plural: names["plural"].as_str().unwrap_or_default().to_string(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase()),
            kind: kind.clone(),
            namespaced: spec["scope"] == "Namespaced",
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            status: v.pointer("/subresources/status").is_some(),
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            printer_columns: v["additionalPrinterColumns"].as_array().cloned().unwrap_or_default(),
            custom: true,
        });
    }
    out
}
