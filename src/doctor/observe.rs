//! The effectful half of `driftless doctor`: read what the checks need, through the ports,
//! changing nothing. Each function reads one system; [`super::checks`] judges.

use super::{
    ApiSeen, HostSeen, HostShellSeen, NodeReach, PlanTokenSeen, RepositorySeen, SecretSeen, SecretSource, Trust,
};
use crate::apply::observe as observe_guests;
use crate::cluster::access::{TALOSCONFIG_FILE, target};
use crate::cluster::talos_secrets::{self, TalosSecrets};
use crate::model::Desired;
use crate::model::schema::{Distribution, GuestKind};
use crate::plan::desired_guests;
use crate::ports::{ClusterConnector, HostShell, NodeShell, ProxmoxApi, TalosApi};
use crate::render::Artifact;
use crate::secrets::SecretStore;
use crate::settings::RunSettings;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Storage ids holding the templates and ISOs the nodes name, by Proxmox node.
fn volume_storages(desired: &Desired) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for n in &desired.nodes {
        let volume = match n.kind {
            GuestKind::Lxc => n.settings.template.as_deref(),
            GuestKind::Vm => n.settings.image.as_deref(),
        };
        if let Some((storage, _)) = volume.and_then(|v| v.split_once(':')) {
            out.entry(n.proxmox_node.clone())
                .or_default()
                .insert(storage.to_string());
        }
    }
    out
}

/// Read Proxmox as the run's token sees it: the version (reachability, TLS, token), the
/// nodes, the plan of the guests, the token's privileges on every path the plan and the
/// later changes need, and each used node's network, storages and template content.
pub async fn proxmox<P: ProxmoxApi>(
    desired: &Desired,
    artifacts: &[Artifact],
    api: &P,
    endpoint: &str,
    trust: Trust,
) -> ApiSeen {
    let version = api.api_version().await;
    let mut seen = ApiSeen {
        endpoint: endpoint.to_string(),
        trust,
        version,
        nodes: None,
        plan: None,
        guests: BTreeMap::new(),
        permissions: BTreeMap::new(),
        permissions_error: None,
        hosts: BTreeMap::new(),
    };
    if seen.version.is_err() {
        return seen;
    }
    seen.nodes = Some(api.nodes().await);
    let guests = desired_guests(desired, artifacts);
    match observe_guests(api, &guests).await {
        Ok(observed) => {
            seen.guests = observed.guests.iter().map(|g| (g.vmid, g.status.clone())).collect();
            seen.plan = Some(Ok(crate::plan::plan(desired, &guests, &observed)));
        }
        Err(e) => seen.plan = Some(Err(e)),
    }
    let mut paths: BTreeSet<String> = super::later_privileges(desired).into_iter().map(|n| n.path).collect();
    if let Some(Ok(plan)) = &seen.plan {
        paths.extend(super::required_privileges(desired, plan).into_iter().map(|n| n.path));
    }
    for path in paths {
        match api.permissions(Some(&path)).await {
            Ok(p) => {
                seen.permissions
                    .insert(path.clone(), p.get(&path).cloned().unwrap_or_default());
            }
            Err(e) => {
                seen.permissions_error = Some(e);
                break;
            }
        }
    }
    let online: BTreeSet<String> = match &seen.nodes {
        Some(Ok(list)) => list
            .iter()
            .filter(|n| n.status == "online")
            .map(|n| n.node.clone())
            .collect(),
        _ => BTreeSet::new(),
    };
    let content_storages = volume_storages(desired);
    let used: BTreeSet<&str> = desired.nodes.iter().map(|n| n.proxmox_node.as_str()).collect();
    for pve in used.into_iter().filter(|n| online.contains(*n)) {
        let mut host = HostSeen {
            network: Some(api.node_network(pve).await),
            storages: Some(api.storages(pve).await),
            content: BTreeMap::new(),
        };
        for storage in content_storages.get(pve).into_iter().flatten() {
            host.content
                .insert(storage.clone(), api.storage_content(pve, storage, None).await);
        }
        seen.hosts.insert(pve.to_string(), host);
    }
    seen
}

/// The read-only token: its privileges everywhere it has any, and on each node's guest
/// (asked path by path: a deeper ACL entry may take away what a path above grants).
pub async fn plan_token<P: ProxmoxApi>(
    desired: &Desired,
    source: &str,
    id: Result<(String, &P), String>,
) -> PlanTokenSeen {
    match id {
        Ok((id, api)) => {
            let mut permissions = api.permissions(None).await;
            for node in &desired.nodes {
                let path = format!("/vms/{}", node.vmid);
                let Ok(all) = &mut permissions else { break };
                match api.permissions(Some(&path)).await {
                    Ok(p) => {
                        all.insert(path.clone(), p.get(&path).cloned().unwrap_or_default());
                    }
                    Err(e) => permissions = Err(e),
                }
            }
            PlanTokenSeen {
                source: source.to_string(),
                id: Ok(id),
                permissions,
            }
        }
        Err(e) => PlanTokenSeen {
            source: source.to_string(),
            id: Err(e.clone()),
            permissions: Err(crate::ports::ProxmoxError::Other(e)),
        },
    }
}

/// `pct list` through the host shell of every Proxmox node the nodes use: the shell is
/// reachable (host key pinned, login accepted) and the host has `pct`.
pub async fn host_shells<H: HostShell>(
    desired: &Desired,
    host: &H,
    settings: &RunSettings,
    describe: impl Fn(&str) -> (String, Option<String>),
) -> Vec<HostShellSeen> {
    let used: BTreeSet<&str> = desired.nodes.iter().map(|n| n.proxmox_node.as_str()).collect();
    let mut out = Vec::new();
    for pve in used {
        let mut argv = settings.host.pct_command.clone();
        argv.push("list".into());
        let (target, known_hosts) = describe(pve);
        out.push(HostShellSeen {
            pve_node: pve.to_string(),
            target,
            known_hosts,
            pct: host.run(pve, &argv, b"").await,
        });
    }
    out
}

/// The talosconfig a run would use: the secrets directory's, else one made from the
/// bundle in memory (doctor writes nothing).
fn talosconfig(desired: &Desired, secrets: &SecretStore) -> Result<Vec<u8>, String> {
    if let Ok(bytes) = std::fs::read(secrets.dir.join(TALOSCONFIG_FILE)) {
        return Ok(bytes);
    }
    let name = desired
        .cluster
        .talos
        .secrets
        .as_ref()
        .map(|s| s.secret.clone())
        .ok_or("talos.secrets is not set in cluster.yaml: there is no bundle to make the talosconfig from")?;
    let value = secrets.resolve(&name).map_err(|e| e.to_string())?;
    let bundle = TalosSecrets::parse(value.expose()).map_err(|e| format!("secret `{name}`: {e}"))?;
    let endpoints: Vec<String> = desired.control_plane().map(|n| n.ip().to_string()).collect();
    let nodes: Vec<String> = desired.nodes.iter().map(|n| n.ip().to_string()).collect();
    talos_secrets::talosconfig(&bundle, &desired.cluster.name, &endpoints, &nodes)
        .map(String::into_bytes)
        .map_err(|e| format!("cannot make the talosconfig: {e}"))
}

/// Each VM node whose guest runs: its SSH (K3s) or its Talos API answers.
pub async fn vm_nodes<C: ClusterConnector>(
    desired: &Desired,
    guests: &BTreeMap<u32, String>,
    connector: &C,
    secrets: &SecretStore,
) -> BTreeMap<String, NodeReach> {
    let mut out = BTreeMap::new();
    let mut talos: Option<Result<C::Talos, String>> = None;
    for node in desired.nodes.iter().filter(|n| n.kind == GuestKind::Vm) {
        let reach = match guests.get(&node.vmid).map(String::as_str) {
            None => NodeReach::NotCreated,
            Some(status) if status != "running" => NodeReach::Stopped,
            Some(_) => match desired.cluster.distribution {
                Distribution::K3s => match connector.node_shell(&target(node)) {
                    None => NodeReach::Unavailable(format!("no SSH target for {}", node.name)),
                    Some(shell) => NodeReach::Ssh(shell.run(&["true".to_string()], b"").await.and_then(|o| {
                        if o.status == 0 {
                            Ok(())
                        } else {
                            Err(crate::ports::ShellError::Other(format!(
                                "`true` exited with {}",
                                o.status
                            )))
                        }
                    })),
                },
                Distribution::Talos => {
                    let client = talos.get_or_insert_with(|| {
                        talosconfig(desired, secrets).and_then(|c| connector.talos(&c).map_err(|e| e.to_string()))
                    });
                    match client {
                        Ok(c) => NodeReach::Talos(c.probe(&node.ip().to_string()).await),
                        Err(e) => NodeReach::Unavailable(e.clone()),
                    }
                }
            },
        };
        out.insert(node.name.clone(), reach);
    }
    out
}

/// The secrets directory's mode, and every declared secret: where it would come from, its
/// mode, and whether its value has the shape driftless expects. Values are read only to
/// check their shape; none leaves this function.
pub fn secrets(desired: &Desired, settings: &RunSettings) -> (Option<u32>, Vec<SecretSeen>) {
    let store = SecretStore::new(&settings.secrets_dir);
    let dir_mode = std::fs::metadata(&store.dir).ok().map(|m| mode_of(&m));
    let token_secret = desired.cluster.proxmox.token.as_ref().map(|s| s.secret.as_str());
    let talos_secret = desired.cluster.talos.secrets.as_ref().map(|s| s.secret.as_str());
    let token_override = if let Some(f) = &settings.proxmox.token_file {
        Some(format!("--proxmox-token-file {}", f.display()))
    } else if std::env::var_os("DRIFTLESS_PROXMOX_TOKEN").is_some() {
        Some("DRIFTLESS_PROXMOX_TOKEN".to_string())
    } else {
        None
    };
    let mut out = Vec::new();
    for (name, purpose) in &desired.cluster.secrets {
        let env = SecretStore::env_name(name);
        let path = store.dir.join(name);
        let shown = path.display().to_string();
        let overridden_by = (Some(name.as_str()) == token_secret)
            .then(|| token_override.clone())
            .flatten();
        let (source, value) = if std::env::var_os(&env).is_some() {
            (SecretSource::Env(env), std::env::var(SecretStore::env_name(name)).ok())
        } else {
            match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (SecretSource::Missing { path: shown }, None),
                Err(e) => (
                    SecretSource::Unreadable {
                        path: shown,
                        error: e.to_string(),
                    },
                    None,
                ),
                Ok(meta) => match std::fs::read_to_string(&path) {
                    Err(e) => (
                        SecretSource::Unreadable {
                            path: shown,
                            error: e.to_string(),
                        },
                        None,
                    ),
                    Ok(text) => (
                        SecretSource::File {
                            path: shown,
                            mode: mode_of(&meta),
                            empty: text.trim().is_empty(),
                        },
                        Some(text),
                    ),
                },
            }
        };
        let shape_error = value.as_deref().and_then(|v| {
            if Some(name.as_str()) == token_secret {
                crate::adapters::proxmox::ApiToken::parse(v)
                    .err()
                    .map(|e| format!("not an API token: {e}"))
            } else if Some(name.as_str()) == talos_secret {
                TalosSecrets::parse(v)
                    .err()
                    .map(|e| format!("not a Talos secrets bundle: {e}"))
            } else {
                None
            }
        });
        out.push(SecretSeen {
            name: name.clone(),
            purpose: purpose.clone(),
            source,
            overridden_by,
            shape_error,
        });
    }
    (dir_mode, out)
}

#[cfg(unix)]
fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn mode_of(_meta: &std::fs::Metadata) -> u32 {
    0o600
}

/// Fetch the daemon's branch into a throwaway mirror with the daemon's credentials.
pub fn repository(url: &str, branch: &str, auth: crate::daemon::git::GitAuth, scratch: &Path) -> RepositorySeen {
    let result = (|| -> Result<String, String> {
        let mirror = crate::daemon::git::Mirror::open_or_init(url, scratch, auth)
            .map_err(|e| e.to_string())?
            .with_timeout(std::time::Duration::from_secs(60));
        let refname = format!("refs/heads/{branch}");
        let refs = mirror
            .fetch(std::slice::from_ref(&refname))
            .map_err(|e| e.to_string())?;
        refs.get(&refname)
            .cloned()
            .ok_or_else(|| format!("no branch {branch} on the remote"))
    })()
    .map_err(|e| {
        if e.contains("has no ref matching") {
            format!("no branch {branch} on the remote")
        } else {
            e
        }
    });
    RepositorySeen {
        url: crate::daemon::git::display_url(url),
        branch: branch.to_string(),
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::fakes::{FakeHostShell, FakeProxmox};

    #[tokio::test]
    async fn a_fresh_host_is_read_without_a_single_write() {
        let (desired, artifacts) = crate::test_repo::lab();
        let fake = FakeProxmox::with_pve_host();
        let seen = proxmox(&desired, &artifacts, &fake, "https://pve:8006", Trust::System).await;
        assert!(seen.version.is_ok());
        assert!(seen.plan.as_ref().unwrap().is_ok());
        assert!(seen.hosts["pve"].network.as_ref().unwrap().is_ok());
        let calls = fake.calls();
        assert!(
            calls
                .iter()
                .all(|c| !["create", "update", "start", "delete"].iter().any(|w| c.starts_with(w))),
            "{calls:?}"
        );
        assert!(calls.iter().any(|c| c.starts_with("permissions /vms/")), "{calls:?}");
    }

    #[tokio::test]
    async fn an_unreachable_api_stops_there() {
        let (desired, artifacts) = crate::test_repo::lab();
        let fake = FakeProxmox::with_pve_host();
        fake.fail_next(
            "version",
            crate::ports::ProxmoxError::Transport {
                endpoint: "https://pve:8006".into(),
                message: "connection refused".into(),
            },
        );
        let seen = proxmox(&desired, &artifacts, &fake, "https://pve:8006", Trust::System).await;
        assert!(seen.version.is_err() && seen.plan.is_none());
        assert_eq!(fake.calls(), ["version"]);
    }

    #[tokio::test]
    async fn the_host_shell_is_asked_for_pct_on_every_node_used() {
        let (desired, _) = crate::test_repo::lab();
        let shell = FakeHostShell::default();
        let settings = RunSettings::default();
        let seen = host_shells(&desired, &shell, &settings, |n| (format!("root@{n}"), None)).await;
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].pve_node, "pve");
        let ran = shell.commands.lock().unwrap().clone();
        assert_eq!(ran, [("pve".to_string(), vec!["pct".to_string(), "list".to_string()])]);
    }
}
