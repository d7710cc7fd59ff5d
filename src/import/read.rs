//! The effectful half of `driftless import`: read the selected guests through the ports.
//! Nothing is written to Proxmox.

use super::{ConfFile, ImportedGuest, Selection};
use crate::ports::{HostShell, ProxmoxApi, ProxmoxError, PveKind, ShellError};
use crate::pve::conf;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read the guests from Proxmox: {0}")]
    Proxmox(#[from] ProxmoxError),
    #[error("cannot read the config file of {vmid} through the host shell: {source}")]
    Shell {
        vmid: u32,
        #[source]
        source: ShellError,
    },
}

/// The config file of a guest on its Proxmox node: `{pve_root}/nodes/{node}/{lxc,qemu-server}/{vmid}.conf`.
pub fn conf_path(pve_root: &str, node: &str, kind: PveKind, vmid: u32) -> String {
    let root = if pve_root.is_empty() {
        crate::settings::DEFAULT_PVE_ROOT
    } else {
        pve_root.trim_end_matches('/')
    };
    let dir = match kind {
        PveKind::Lxc => "lxc",
        PveKind::Qemu => "qemu-server",
    };
    format!("{root}/nodes/{node}/{dir}/{vmid}.conf")
}

/// The selected guests (each config through the API; with a host shell, its file too, for
/// the raw `lxc.*` keys in their order and the snapshots), and the container templates each
/// Proxmox node holds.
pub async fn read<P: ProxmoxApi, H: HostShell>(
    api: &P,
    host: Option<&H>,
    pve_root: &str,
    selection: &Selection,
) -> Result<(Vec<ImportedGuest>, BTreeMap<String, Vec<String>>), ReadError> {
    let listing = api.list_guests().await?;
    let mut guests = Vec::new();
    for summary in listing.into_iter().filter(|g| selection.matches(g)) {
        let config = api.read_config(&summary.node, summary.kind, summary.vmid).await?;
        let file = match host {
            None => None,
            Some(h) => {
                let path = conf_path(pve_root, &summary.node, summary.kind, summary.vmid);
                let bytes = h
                    .read_file(&summary.node, &path)
                    .await
                    .map_err(|source| ReadError::Shell {
                        vmid: summary.vmid,
                        source,
                    })?;
                let kind = summary.kind;
                // Lenient, as Proxmox reads it: a key it would warn about does not stop an import.
                let (parsed, _) = conf::parse_lenient(&String::from_utf8_lossy(&bytes), kind);
                Some(ConfFile {
                    raw_lxc: parsed.current.raw_lxc.clone(),
                    snapshots: parsed.snapshots.keys().cloned().collect(),
                })
            }
        };
        guests.push(ImportedGuest { summary, config, file });
    }
    let mut templates: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut nodes: Vec<String> = guests.iter().map(|g| g.summary.node.clone()).collect();
    nodes.sort();
    nodes.dedup();
    for node in nodes {
        // Only a guess at a template is made from these: a storage that cannot be listed
        // leaves the guess to the user.
        let Ok(storages) = api.storages(&node).await else {
            continue;
        };
        for st in storages.iter().filter(|s| s.holds("vztmpl")) {
            if let Ok(volumes) = api.storage_content(&node, &st.storage, Some("vztmpl")).await {
                templates
                    .entry(node.clone())
                    .or_default()
                    .extend(volumes.into_iter().map(|v| v.volid));
            }
        }
    }
    Ok((guests, templates))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::GuestSummary;
    use crate::ports::fakes::{FakeHostShell, FakeProxmox};

    fn summary(vmid: u32, name: &str, tags: &[&str]) -> GuestSummary {
        GuestSummary {
            vmid,
            node: "pve".into(),
            kind: PveKind::Lxc,
            name: Some(name.into()),
            status: "running".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn the_selection_picks_guests_and_the_host_shell_gives_raw_keys_and_snapshots() {
        let fake = FakeProxmox::with_pve_host();
        fake.insert(
            summary(100, "web", &["k3s"]),
            BTreeMap::from([("hostname".into(), "web".into())]),
        );
        fake.insert(
            summary(200, "db", &[]),
            BTreeMap::from([("hostname".into(), "db".into())]),
        );
        let shell = FakeHostShell::default();
        shell.files.lock().unwrap().insert(
            "/etc/pve/nodes/pve/lxc/100.conf".into(),
            b"hostname: web\nparent: before\nlxc.cap.drop: \nlxc.apparmor.profile: unconfined\n\n[before]\nhostname: web\n"
                .to_vec(),
        );
        let selection = Selection {
            tags: vec!["K3S".into()],
            ..Selection::default()
        };
        let (guests, templates) = read(&fake, Some(&shell), "", &selection).await.unwrap();
        assert_eq!(guests.len(), 1);
        let file = guests[0].file.as_ref().unwrap();
        assert_eq!(
            file.raw_lxc,
            [
                ("lxc.cap.drop".to_string(), String::new()),
                ("lxc.apparmor.profile".to_string(), "unconfined".to_string())
            ]
        );
        assert_eq!(file.snapshots, ["before"]);
        assert_eq!(
            templates["pve"],
            ["local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst"]
        );
        assert!(
            fake.calls()
                .iter()
                .all(|c| !c.starts_with("update") && !c.starts_with("create"))
        );
    }

    #[tokio::test]
    async fn a_host_shell_that_cannot_read_the_file_stops_the_import() {
        let fake = FakeProxmox::with_pve_host();
        fake.insert(summary(100, "web", &[]), BTreeMap::new());
        let shell = FakeHostShell::default();
        let err = read(&fake, Some(&shell), "", &Selection::default()).await.unwrap_err();
        assert!(err.to_string().contains("config file of 100"), "{err}");
    }
}
