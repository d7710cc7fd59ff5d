//! The Proxmox guest config in Proxmox's own form, and the API parameters that create it.

use crate::model::Node;
use crate::model::schema::GuestKind;
use crate::pve::conf::{self, GuestConf};
use std::collections::BTreeMap;

/// Parse what a template produced and write it back the way Proxmox writes its files:
/// description first, keys sorted, property strings in canonical order, raw keys last.
pub fn canonical_conf(text: &str, kind: GuestKind) -> Result<GuestConf, String> {
    let mut parsed = conf::parse(text, kind.pve()).map_err(|e| e.to_string())?;
    for (key, value) in parsed.current.options.iter_mut() {
        if let Some(required) = canonical_order(kind, key) {
            *value = conf::print_property_string_ordered(None, required, &conf::parse_property_string(value));
        }
    }
    Ok(parsed)
}

/// LXC property strings Proxmox re-prints in canonical order (default key first, required
/// sub-keys next, the rest sorted), with their required sub-keys. QEMU values are kept as
/// written: their default key (`virtio=MAC`) carries data Proxmox fills in itself.
fn canonical_order(kind: GuestKind, key: &str) -> Option<&'static [&'static str]> {
    let numbered = |prefix: &str| {
        key.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match kind {
        GuestKind::Lxc if numbered("net") => Some(&["name"]),
        GuestKind::Lxc if numbered("mp") => Some(&["mp"]),
        GuestKind::Lxc if key == "features" || key == "rootfs" => Some(&[]),
        _ => None,
    }
}

/// The parameters of `POST /nodes/{node}/lxc` (or `/qemu`) that create this guest: the config
/// options, with disks given as `STORAGE:SIZE_GiB` to allocate, and what only creation takes.
/// Raw `lxc.*` keys are not API parameters; they go through the host shell.
pub fn create_params(conf: &GuestConf, node: &Node) -> BTreeMap<String, String> {
    let mut params: BTreeMap<String, String> = conf.current.options.clone();
    params.insert("vmid".into(), node.vmid.to_string());
    let disk_gib = node.settings.disk.map_or(8, |d| d.gib());
    let storage = node.settings.storage.clone().unwrap_or_else(|| "local-lvm".into());
    match node.kind {
        GuestKind::Lxc => {
            params.insert("rootfs".into(), format!("{storage}:{disk_gib}"));
            if let Some(t) = &node.settings.template {
                params.insert("ostemplate".into(), t.clone());
            }
        }
        GuestKind::Vm => {
            for (k, v) in params.iter_mut() {
                let is_disk = ["scsi", "virtio", "sata"]
                    .iter()
                    .any(|p| k.strip_prefix(p).is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())));
                if is_disk && v.contains(&format!("vm-{}-disk-", node.vmid)) {
                    let opts: Vec<&str> = v.split(',').skip(1).filter(|o| !o.starts_with("size=")).collect();
                    let mut alloc = format!("{storage}:{disk_gib}");
                    for o in opts {
                        alloc.push(',');
                        alloc.push_str(o);
                    }
                    *v = alloc;
                }
            }
        }
    }
    if !conf.current.description.is_empty() {
        params.insert(
            "description".into(),
            conf.current.description.trim_end_matches('\n').to_string(),
        );
    }
    params
}
