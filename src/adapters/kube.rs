//! The Kubernetes API through kube-rs: [`KubeClient`] implements [`KubeApi`] with the
//! cluster's admin kubeconfig (K3s's `k3s.yaml`, `talosctl kubeconfig`).
//!
//! * TLS is always verified against the kubeconfig's certificate authority:
//!   `insecure-skip-tls-verify` is ignored and a kubeconfig without a CA is refused.
//! * Credentials must be inline (a bearer token, or a client certificate and key). The
//!   kubeconfig is read from a cluster node, so driftless refuses what would let that node
//!   act on the machine driftless runs on: `exec` and `auth-provider` plugins (a command to
//!   run) and `tokenFile` (a local file sent as the bearer token).
//! * `server_override` replaces the cluster URL (an API reached through a tunnel); the
//!   certificate is then checked against the override's host.
//! * The API server is reached directly: `HTTPS_PROXY` is not used and a kubeconfig
//!   `proxy-url` is refused.
//! * No error, log line or Debug output contains the bearer token, the client key or the
//!   kubeconfig; [`KubeClient`]'s Debug shows the server URL only.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use axum::http;
use futures_util::FutureExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::discovery::Scope;
use serde_json::{Map, Value, json};

use crate::ports::{ApiKind, KubeApi, KubeError, KubeNode, NodePatch, PodSummary, Taint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a non-Status error body goes into an error message.
const BODY_EXCERPT: usize = 600;

/// A Kubernetes API client for one cluster.
#[derive(Clone)]
pub struct KubeClient {
    client: kube::Client,
    server: String,
}

impl fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeClient")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl KubeClient {
    /// A client for the kubeconfig's current context. `server_override` (`https://HOST:PORT`)
    /// replaces the cluster's URL. Must be called inside a Tokio runtime (the client's
    /// request queue runs on it).
    pub fn from_kubeconfig(yaml: &[u8], server_override: Option<&str>) -> Result<KubeClient, KubeError> {
        let text =
            std::str::from_utf8(yaml).map_err(|_| KubeError::Other("the kubeconfig is not UTF-8 text".into()))?;
        let kubeconfig = Kubeconfig::from_yaml(text).map_err(kubeconfig_error)?;
        refuse_unsafe_settings(&kubeconfig)?;

        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .now_or_never()
            .ok_or_else(|| KubeError::Other("reading the kubeconfig did not complete".into()))?
            .map_err(kubeconfig_error)?;

        if let Some(server) = server_override {
            config.cluster_url = server
                .trim_end_matches('/')
                .parse()
                .map_err(|e| KubeError::Other(format!("invalid Kubernetes API URL '{server}': {e}")))?;
        }
        let server = config.cluster_url.to_string().trim_end_matches('/').to_string();
        if config.cluster_url.scheme_str() != Some("https") {
            return Err(KubeError::Other(format!(
                "the Kubernetes API URL must be https:// (got {server})"
            )));
        }
        if config.root_cert.is_none() {
            return Err(KubeError::Other(
                "the kubeconfig has no certificate-authority-data: driftless verifies the API server's \
                 certificate and never skips the check"
                    .into(),
            ));
        }
        config.accept_invalid_certs = false;
        // Only the kubeconfig's own proxy-url is refused above; this drops HTTPS_PROXY.
        config.proxy_url = None;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        config.read_timeout = Some(READ_TIMEOUT);
        config.reset_reader_on_write = true;
        config.write_timeout = Some(WRITE_TIMEOUT);

        if tokio::runtime::Handle::try_current().is_err() {
            return Err(KubeError::Other(
                "the Kubernetes client must be created inside a Tokio runtime".into(),
            ));
        }
        let client = kube::Client::try_from(config).map_err(|e| map_error(&server, e))?;
        Ok(KubeClient { client, server })
    }

    /// The API server's URL (`https://192.168.2.20:6443`).
    pub fn server(&self) -> &str {
        &self.server
    }

    fn err(&self, e: kube::Error) -> KubeError {
        map_error(&self.server, e)
    }
}

impl KubeApi for KubeClient {
    async fn readyz(&self) -> Result<(), KubeError> {
        let request = http::Request::get("/readyz?verbose")
            .body(kube::client::Body::empty())
            .map_err(|e| KubeError::Other(e.to_string()))?;
        let response = self.client.send(request).await.map_err(|e| self.err(e))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect_bytes().await.map_err(|e| self.err(e))?;
        if status == 200 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&body);
        let message = if let Ok(s) = serde_json::from_str::<kube::core::Status>(&text) {
            status_message(&s)
        } else {
            let failing: Vec<&str> = text.lines().map(str::trim).filter(|l| l.starts_with("[-]")).collect();
            if failing.is_empty() {
                excerpt(text.trim())
            } else {
                failing.join("; ")
            }
        };
        Err(KubeError::Api { status, message })
    }

    async fn nodes(&self) -> Result<Vec<KubeNode>, KubeError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default()).await.map_err(|e| self.err(e))?;
        Ok(list.items.into_iter().map(kube_node).collect())
    }

    async fn patch_node(&self, name: &str, patch: &NodePatch) -> Result<(), KubeError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let body = merge_patch(patch);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn pods(&self, namespace: &str) -> Result<Vec<PodSummary>, KubeError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let list = api.list(&ListParams::default()).await.map_err(|e| self.err(e))?;
        Ok(list.items.into_iter().map(pod_summary).collect())
    }

    async fn resolve(&self, api_version: &str, kind: &str) -> Result<Option<ApiKind>, KubeError> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok((ar, caps)) => Ok(Some(ApiKind {
                group: ar.group,
                version: ar.version,
                kind: ar.kind,
                plural: ar.plural,
                namespaced: caps.scope == Scope::Namespaced,
            })),
            // A group the server does not serve, or a group without that kind.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(kube::Error::Discovery(_)) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn get_object(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, KubeError> {
        let found = self
            .dynamic(kind, namespace)
            .get_opt(name)
            .await
            .map_err(|e| self.err(e))?;
        Ok(found.map(|o| serde_json::to_value(o).expect("objects serialise")))
    }

    async fn apply_object(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        object: &Value,
        dry_run: bool,
        force: bool,
    ) -> Result<Value, KubeError> {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or_else(|| KubeError::Other("an object without metadata.name".into()))?;
        let mut params = PatchParams::apply(crate::addons::FIELD_MANAGER);
        if force {
            params = params.force();
        }
        if dry_run {
            params = params.dry_run();
        }
        let applied = self
            .dynamic(kind, namespace)
            .patch(name, &params, &Patch::Apply(object))
            .await
            .map_err(|e| self.err(e))?;
        Ok(serde_json::to_value(applied).expect("objects serialise"))
    }

    async fn delete_object(&self, kind: &ApiKind, namespace: Option<&str>, name: &str) -> Result<bool, KubeError> {
        match self
            .dynamic(kind, namespace)
            .delete(name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn list_objects(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        label_selector: &str,
    ) -> Result<Vec<Value>, KubeError> {
        let list = self
            .dynamic(kind, namespace)
            .list(&ListParams::default().labels(label_selector))
            .await
            .map_err(|e| self.err(e))?;
        Ok(list
            .items
            .into_iter()
            .map(|o| serde_json::to_value(o).expect("objects serialise"))
            .collect())
    }
}

impl KubeClient {
    /// The API of one resource, in `namespace` when it is namespaced.
    fn dynamic(&self, kind: &ApiKind, namespace: Option<&str>) -> Api<DynamicObject> {
        let ar = ApiResource {
            group: kind.group.clone(),
            version: kind.version.clone(),
            api_version: kind.api_version(),
            kind: kind.kind.clone(),
            plural: kind.plural.clone(),
        };
        match namespace {
            Some(ns) if kind.namespaced => Api::namespaced_with(self.client.clone(), ns, &ar),
            _ => Api::all_with(self.client.clone(), &ar),
        }
    }
}

/// The JSON merge patch (RFC 7386) for `patch`: `null` removes a label or annotation;
/// `spec.taints` is the whole new list when given.
pub fn merge_patch(patch: &NodePatch) -> Value {
    fn entries(map: &BTreeMap<String, Option<String>>) -> Value {
        Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_ref().map_or(Value::Null, |v| Value::String(v.clone()))))
                .collect(),
        )
    }
    let mut root = Map::new();
    let mut metadata = Map::new();
    if !patch.labels.is_empty() {
        metadata.insert("labels".into(), entries(&patch.labels));
    }
    if !patch.annotations.is_empty() {
        metadata.insert("annotations".into(), entries(&patch.annotations));
    }
    if !metadata.is_empty() {
        root.insert("metadata".into(), Value::Object(metadata));
    }
    if let Some(taints) = &patch.taints {
        let list: Vec<Value> = taints
            .iter()
            .map(|t| {
                let mut o = json!({"key": t.key, "effect": t.effect});
                if let Some(v) = &t.value {
                    o["value"] = Value::String(v.clone());
                }
                o
            })
            .collect();
        root.insert("spec".into(), json!({ "taints": list }));
    }
    Value::Object(root)
}

fn kube_node(node: Node) -> KubeNode {
    let status = node.status.unwrap_or_default();
    let ready_condition = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready");
    let (ready, not_ready_reason) = match ready_condition {
        Some(c) if c.status == "True" => (true, None),
        Some(c) => {
            let reason = [c.message, c.reason]
                .into_iter()
                .flatten()
                .map(|s| s.trim().to_string())
                .find(|s| !s.is_empty())
                .unwrap_or_else(|| format!("Ready is {}", c.status));
            (false, Some(reason))
        }
        None => (false, Some("no Ready condition".to_string())),
    };
    let taints = node
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| Taint {
            key: t.key,
            value: t.value.filter(|v| !v.is_empty()),
            effect: t.effect,
        })
        .collect();
    KubeNode {
        name: node.metadata.name.unwrap_or_default(),
        ready,
        not_ready_reason,
        kubelet_version: status.node_info.map(|i| i.kubelet_version).unwrap_or_default(),
        labels: node.metadata.labels.unwrap_or_default(),
        annotations: node.metadata.annotations.unwrap_or_default(),
        taints,
    }
}

fn pod_summary(pod: Pod) -> PodSummary {
    let status = pod.status.unwrap_or_default();
    let containers = status.container_statuses.unwrap_or_default();
    PodSummary {
        name: pod.metadata.name.unwrap_or_default(),
        phase: status.phase.unwrap_or_else(|| "Unknown".to_string()),
        ready: !containers.is_empty() && containers.iter().all(|c| c.ready),
    }
}

/// Refuse what a kubeconfig read from a cluster node must not make driftless do.
fn refuse_unsafe_settings(kubeconfig: &Kubeconfig) -> Result<(), KubeError> {
    let Some(context_name) = &kubeconfig.current_context else {
        return Ok(()); // kube reports the missing current-context
    };
    let Some(context) = kubeconfig
        .contexts
        .iter()
        .find(|c| &c.name == context_name)
        .and_then(|c| c.context.as_ref())
    else {
        return Ok(());
    };
    if let Some(cluster) = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.as_ref())
        && cluster.proxy_url.is_some()
    {
        return Err(KubeError::Other(format!(
            "cluster '{}' of the kubeconfig sets proxy-url: driftless reaches the Kubernetes API directly",
            context.cluster
        )));
    }
    let user = context.user.as_ref().and_then(|name| {
        kubeconfig
            .auth_infos
            .iter()
            .find(|u| &u.name == name)
            .and_then(|u| u.auth_info.as_ref())
    });
    if let Some(user) = user {
        let refused = if user.exec.is_some() {
            Some("an exec plugin")
        } else if user.auth_provider.is_some() {
            Some("an auth-provider plugin")
        } else if user.token_file.is_some() {
            Some("tokenFile")
        } else {
            None
        };
        if let Some(what) = refused {
            return Err(KubeError::Other(format!(
                "user '{}' of the kubeconfig uses {what}: driftless accepts only an inline token or client \
                 certificate",
                context.user.as_deref().unwrap_or_default()
            )));
        }
    }
    Ok(())
}

/// A kubeconfig error in words that never quote the file (a YAML error can show its text).
fn kubeconfig_error(e: KubeconfigError) -> KubeError {
    let message = match e {
        KubeconfigError::Parse(_) => "the kubeconfig is not valid kubeconfig YAML".to_string(),
        KubeconfigError::LoadClientKey(_) => "the kubeconfig's client key cannot be read".to_string(),
        other => format!("invalid kubeconfig: {other}"),
    };
    KubeError::Other(message)
}

fn map_error(server: &str, e: kube::Error) -> KubeError {
    match e {
        kube::Error::Api(status) => KubeError::Api {
            status: status.code,
            message: status_message(&status),
        },
        kube::Error::HyperError(e) => KubeError::Transport {
            server: server.to_string(),
            message: error_chain(&e),
        },
        kube::Error::Service(e) => KubeError::Transport {
            server: server.to_string(),
            message: error_chain(e.as_ref()),
        },
        kube::Error::RustlsTls(e) => KubeError::Other(match e {
            kube::client::RustlsTlsError::InvalidIdentityPem(_) => {
                "TLS setup: the kubeconfig's client certificate or key is not valid PEM".to_string()
            }
            other => format!("TLS setup: {other}"),
        }),
        kube::Error::InferKubeconfig(e) => kubeconfig_error(e),
        kube::Error::SerdeError(e) => KubeError::Other(format!("cannot read the Kubernetes API's answer: {e}")),
        other => KubeError::Other(other.to_string()),
    }
}

fn status_message(status: &kube::core::Status) -> String {
    let message = status.message.trim();
    if !message.is_empty() {
        excerpt(message)
    } else if !status.reason.is_empty() {
        status.reason.clone()
    } else {
        format!("HTTP {}", status.code)
    }
}

/// `error: source: source...`, each distinct part once (hyper repeats its inner errors).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(e);
    while let Some(err) = current {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    parts.join(": ")
}

fn excerpt(text: &str) -> String {
    if text.chars().count() <= BODY_EXCERPT {
        return text.to_string();
    }
    let mut out: String = text.chars().take(BODY_EXCERPT).collect();
    out.push_str("...");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_removes_with_null_and_replaces_taints() {
        let mut patch = NodePatch::default();
        patch.labels.insert("a".into(), Some("1".into()));
        patch.labels.insert("b".into(), None);
        patch.taints = Some(vec![Taint::parse("dedicated=db:NoSchedule").unwrap()]);
        assert_eq!(
            merge_patch(&patch),
            json!({
                "metadata": {"labels": {"a": "1", "b": null}},
                "spec": {"taints": [{"key": "dedicated", "effect": "NoSchedule", "value": "db"}]}
            })
        );
        let clear = NodePatch {
            taints: Some(vec![]),
            ..NodePatch::default()
        };
        assert_eq!(merge_patch(&clear), json!({"spec": {"taints": []}}));
        assert_eq!(merge_patch(&NodePatch::default()), json!({}));
    }

    #[test]
    fn refuses_plugins_and_token_files_without_quoting_secrets() {
        let yaml = "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\n\
                    clusters:\n- name: k\n  cluster: {server: 'https://127.0.0.1:6443'}\nusers:\n- name: u\n  user:\n    \
                    exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/steal}\n";
        let kc = Kubeconfig::from_yaml(yaml).unwrap();
        let err = refuse_unsafe_settings(&kc).unwrap_err().to_string();
        assert!(err.contains("exec plugin"), "{err}");

        let bad = "apiVersion: v1\nusers: [ {name: u, user: {token: s3cr3t-token}} ]\n  - : :\n";
        let err = KubeClient::from_kubeconfig(bad.as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}
