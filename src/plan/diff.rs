//! Per-guest comparison of the rendered config with the live one.

use super::{Action, Change, Step, Via};
use crate::model::{Desired, Node};
use crate::ports::{LiveConfig, PveKind};
use crate::pve::conf;
use crate::render::{Artifact, ArtifactKind};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// A guest as the repository wants it: the rendered config and create parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredGuest {
    pub node: String,
    pub vmid: u32,
    pub pve_node: String,
    pub kind: PveKind,
    pub options: BTreeMap<String, String>,
    pub raw_lxc: Vec<(String, String)>,
    pub create_params: BTreeMap<String, String>,
    /// Config key -> where its value comes from.
    pub provenance: BTreeMap<String, String>,
}

/// Build the desired guests from the rendered artifacts, in apply order.
pub fn desired_guests(desired: &Desired, artifacts: &[Artifact]) -> Vec<DesiredGuest> {
    desired
        .nodes
        .iter()
        .filter_map(|node| {
            let find = |k: ArtifactKind| artifacts.iter().find(|a| a.node == node.name && a.kind == k);
            let conf_text = &find(ArtifactKind::ProxmoxConf)?.content;
            let params_text = &find(ArtifactKind::ProxmoxApi)?.content;
            let kind = pve_kind(node);
            let parsed = conf::parse(conf_text, kind).expect("rendered configs are canonical");
            let create_params: BTreeMap<String, String> =
                serde_json::from_str(params_text).expect("rendered parameters are JSON");
            // The API lists the description as a key like any other: compared the same way,
            // so a description added in git to an existing guest is planned.
            let mut options = parsed.current.options.clone();
            let description = parsed.current.description.trim_end_matches('\n');
            if !description.is_empty() {
                options.insert("description".into(), description.to_string());
            }
            let provenance = options
                .keys()
                .map(String::as_str)
                .chain(std::iter::once("lxc.raw"))
                .filter_map(|k| cite_for(desired, node, k).map(|c| (k.to_string(), c)))
                .collect();
            Some(DesiredGuest {
                node: node.name.clone(),
                vmid: node.vmid,
                pve_node: node.proxmox_node.clone(),
                kind,
                options,
                raw_lxc: parsed.current.raw_lxc.clone(),
                create_params,
                provenance,
            })
        })
        .collect()
}

fn pve_kind(node: &Node) -> PveKind {
    node.kind.pve()
}

/// Which model keys a Proxmox config key is made of, for provenance.
fn model_keys(kind: PveKind, key: &str) -> &'static [&'static str] {
    match (kind, key) {
        (_, "cores") => &["cores"],
        (_, "memory") => &["memory"],
        (_, "swap") => &["swap"],
        (_, "onboot") => &["onboot"],
        (_, "tags") => &["tags"],
        (_, "description") => &["description"],
        (PveKind::Lxc, "features") => &[
            "lxc.features.nesting",
            "lxc.features.keyctl",
            "lxc.features.fuse",
            "lxc.features.mknod",
        ],
        (PveKind::Lxc, "net0") => &["address", "bridge", "vlan"],
        (PveKind::Lxc, "rootfs") => &["disk", "storage"],
        (PveKind::Lxc, "arch") => &["lxc.arch"],
        (PveKind::Lxc, "ostype") => &["lxc.ostype"],
        (PveKind::Lxc, "unprivileged") => &["lxc.unprivileged"],
        (PveKind::Lxc, "lxc.raw") => &["lxc.raw"],
        (PveKind::Qemu, "net0") => &["bridge", "vm.net_model", "vlan"],
        (PveKind::Qemu, "scsi0") => &["disk", "storage"],
        (PveKind::Qemu, "ide2") => &["image"],
        (PveKind::Qemu, "cpu") => &["vm.cpu"],
        (PveKind::Qemu, "sockets") => &["vm.sockets"],
        (PveKind::Qemu, "machine") => &["vm.machine"],
        (PveKind::Qemu, "bios") => &["vm.bios"],
        (PveKind::Qemu, "ostype") => &["vm.ostype"],
        (PveKind::Qemu, "scsihw") => &["vm.scsihw"],
        (PveKind::Qemu, "agent") => &["vm.agent"],
        _ => &[],
    }
}

/// `adr/ADR-001-lxc.md:52` for the model value behind a config key; the node file for the
/// node's own identity (hostname, name), cluster.yaml for the network-wide values.
fn cite_for(desired: &Desired, node: &Node, key: &str) -> Option<String> {
    let kind = pve_kind(node);
    let cited: Vec<String> = model_keys(kind, key)
        .iter()
        .filter_map(|k| node.provenance.get(*k))
        .map(crate::model::Setting::cite_with_adr)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !cited.is_empty() {
        return Some(cited.join(", "));
    }
    match key {
        "hostname" | "name" => Some(node.file.clone()),
        "nameserver" | "searchdomain" => Some("cluster.yaml network".into()),
        _ => {
            let _ = desired;
            None
        }
    }
}

/// Proxmox's tags: split on `;`, `,` or spaces, lowercased, sorted, unique.
pub fn normalize_tags(tags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = tags
        .iter()
        .flat_map(|t| t.split([';', ',', ' ']))
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// LXC options Proxmox applies to a running container at once; the rest wait for a restart
/// (pve-container's hotplug list).
const LXC_HOTPLUG: &[&str] = &[
    "cores",
    "cpulimit",
    "cpuunits",
    "memory",
    "swap",
    "description",
    "onboot",
    "tags",
    "protection",
    "net0",
];
/// QEMU options that apply at once without hotplug configuration.
const QEMU_HOTPLUG: &[&str] = &["description", "onboot", "tags", "name", "protection"];
/// Options fixed at creation: differences are reported, not changed.
const LXC_CREATE_ONLY: &[&str] = &["rootfs", "arch", "ostype", "unprivileged"];
const QEMU_CREATE_ONLY: &[&str] = &["scsi0", "ide2"];
/// Managed options that are removed when the repository no longer sets them.
const REMOVABLE: &[&str] = &["nameserver", "searchdomain", "features", "description"];

fn pairs(v: &str) -> Vec<(String, String)> {
    conf::parse_property_string(v)
}

/// Compare a property string on the sub-keys the repository sets; extra live sub-keys
/// (the MAC address Proxmox generated, `type=veth`) do not count.
fn property_matches(desired: &str, live: &str, ignore_default_value: bool) -> bool {
    let live_pairs = pairs(live);
    pairs(desired).iter().all(|(k, v)| {
        if k.is_empty() && ignore_default_value {
            // QEMU NIC: `virtio` desired, `virtio=BC:24:11:..` live.
            return live_pairs.iter().any(|(lk, lv)| lk == v || (lk.is_empty() && lv == v));
        }
        live_pairs.iter().any(|(lk, lv)| lk == k && lv == v)
    })
}

/// The NIC value to send: the desired sub-keys, keeping the MAC address the guest already has.
fn keep_mac(kind: PveKind, desired: &str, live: Option<&str>) -> String {
    let Some(live) = live else { return desired.to_string() };
    let live_pairs = pairs(live);
    match kind {
        PveKind::Lxc => match live_pairs.iter().find(|(k, _)| k == "hwaddr") {
            Some((_, mac)) if !desired.contains("hwaddr=") => {
                let mut p = pairs(desired);
                p.push(("hwaddr".into(), mac.clone()));
                conf::print_property_string_ordered(None, &["name"], &p)
            }
            _ => desired.to_string(),
        },
        PveKind::Qemu => {
            let model = pairs(desired).into_iter().find(|(k, _)| k.is_empty()).map(|(_, v)| v);
            let live_mac = live_pairs
                .iter()
                .find(|(k, _)| Some(k) == model.as_ref())
                .map(|(_, v)| v.clone());
            match (model, live_mac) {
                (Some(m), Some(mac)) => desired.replacen(&m, &format!("{m}={mac}"), 1),
                _ => desired.to_string(),
            }
        }
    }
}

fn values_match(kind: PveKind, key: &str, desired: &str, live: &str) -> bool {
    let numbered = |p: &str| {
        key.strip_prefix(p)
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty())
    };
    if key == "tags" {
        return normalize_tags(&[desired.to_string()]) == normalize_tags(&[live.to_string()]);
    }
    if numbered("net") {
        return property_matches(desired, live, kind == PveKind::Qemu);
    }
    if key == "features" {
        let mut a = pairs(desired);
        let mut b = pairs(live);
        a.sort();
        b.sort();
        return a == b;
    }
    if key == "description" {
        return desired.trim_end() == live.trim_end();
    }
    desired == live
}

pub struct GuestDiff {
    pub changes: Vec<Change>,
    pub notices: Vec<String>,
}

/// Features other than `nesting`, and any feature of a privileged container, may be changed
/// only by root@pam: an API token cannot (pve-container's check_ct_modify_config_perm).
fn features_need_root(value: Option<&str>, privileged: bool) -> bool {
    value.is_some_and(|v| privileged || pairs(v).iter().any(|(k, _)| k != "nesting"))
}

/// Proxmox creates containers unprivileged unless told `unprivileged: 0`.
fn privileged(options: &BTreeMap<String, String>) -> bool {
    options.get("unprivileged").is_some_and(|v| v == "0")
}

pub fn diff_guest(want: &DesiredGuest, live: &LiveConfig, running: bool) -> GuestDiff {
    let kind = want.kind;
    let (hotplug, create_only) = match kind {
        PveKind::Lxc => (LXC_HOTPLUG, LXC_CREATE_ONLY),
        PveKind::Qemu => (QEMU_HOTPLUG, QEMU_CREATE_ONLY),
    };
    let mut changes = Vec::new();
    let mut notices = Vec::new();
    let provenance = |k: &str| want.provenance.get(k).cloned();
    for (key, value) in &want.options {
        let live_value = live.options.get(key);
        if live_value.is_some_and(|l| values_match(kind, key, value, l)) {
            continue;
        }
        if create_only.contains(&key.as_str()) {
            if let Some(l) = live_value {
                notices.push(format!(
                    "{key} is `{l}`, the repository says `{value}`: driftless does not change it after creation"
                ));
            }
            continue;
        }
        let new = if key.starts_with("net") {
            keep_mac(kind, value, live_value.map(String::as_str))
        } else {
            value.clone()
        };
        let privileged = privileged(&want.options) || privileged(&live.options);
        let via = if kind == PveKind::Lxc
            && key == "features"
            && (features_need_root(Some(value), privileged)
                || features_need_root(live_value.map(String::as_str), privileged))
        {
            Via::RootShell
        } else {
            Via::Api
        };
        changes.push(Change {
            key: key.clone(),
            old: live_value.cloned(),
            new: Some(new),
            via,
            needs_restart: running && !hotplug.contains(&key.as_str()),
            provenance: provenance(key),
        });
    }
    for key in REMOVABLE {
        if !want.options.contains_key(*key)
            && (kind == PveKind::Lxc || *key == "description")
            && let Some(l) = live.options.get(*key)
        {
            if *key == "description" {
                continue; // a description nobody set in git is the operator's note: keep it
            }
            let via = if *key == "features"
                && features_need_root(Some(l), privileged(&want.options) || privileged(&live.options))
            {
                Via::RootShell
            } else {
                Via::Api
            };
            changes.push(Change {
                key: key.to_string(),
                old: Some(l.clone()),
                new: None,
                via,
                needs_restart: running && !hotplug.contains(key),
                provenance: None,
            });
        }
    }
    if kind == PveKind::Lxc && !want.raw_lxc.is_empty() {
        let owned: BTreeSet<&str> = want.raw_lxc.iter().map(|(k, _)| k.as_str()).collect();
        let live_owned: Vec<(String, String)> = live
            .raw_lxc
            .iter()
            .filter(|(k, _)| owned.contains(k.as_str()))
            .cloned()
            .collect();
        if live_owned != want.raw_lxc {
            let show = |v: &[(String, String)]| {
                v.iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            changes.push(Change {
                key: "lxc.raw".into(),
                old: (!live_owned.is_empty()).then(|| show(&live_owned)),
                new: Some(show(&want.raw_lxc)),
                via: Via::ConfFile,
                needs_restart: running,
                provenance: provenance("lxc.raw"),
            });
        }
    }
    GuestDiff { changes, notices }
}

/// The step that creates a guest that does not exist yet.
pub fn create_step(node: &Node, want: &DesiredGuest) -> Step {
    let mut params = want.create_params.clone();
    let mut root_options = Vec::new();
    let privileged = privileged(&params);
    if want.kind == PveKind::Lxc && features_need_root(params.get("features").map(String::as_str), privileged) {
        let full = params.remove("features").expect("checked above");
        // An API token may set `nesting` on an unprivileged container at creation; the rest
        // goes through `pct set` as root.
        if let Some((_, v)) = pairs(&full).into_iter().find(|(k, _)| k == "nesting")
            && !privileged
        {
            params.insert("features".into(), format!("nesting={v}"));
        }
        root_options.push(("features".to_string(), full));
    }
    Step {
        node: node.name.clone(),
        vmid: want.vmid,
        pve_node: want.pve_node.clone(),
        kind: want.kind,
        disruptive: false,
        action: Action::Create {
            params,
            root_options,
            raw_lxc: want.raw_lxc.clone(),
            provenance: want.provenance.clone(),
        },
    }
}
