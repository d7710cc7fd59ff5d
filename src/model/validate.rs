//! Cross-file rules: unique vmid / name / address, addresses inside the cluster network,
//! roles valid for the distribution, Talos only on VMs, raw LXC keys Proxmox accepts,
//! K3s config keys that are K3s flags.

use super::desired::*;
use super::diag::{Diagnostic, Diagnostics, Location, did_you_mean};
use super::load::Doc;
use super::schema::*;
use super::yaml::Seg;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::OnceLock;

fn key(path: &[&str]) -> Vec<Seg> {
    path.iter().map(|k| Seg::Key(k.to_string())).collect()
}

/// Build the cluster from cluster.yaml and the resolved cluster-level keys.
pub(crate) fn cluster(
    cf: &ClusterFile,
    doc: &Doc,
    level: ClusterLevel,
    prov: Provenance,
    diags: &mut Diagnostics,
) -> Option<Cluster> {
    let before = diags.len();
    let net = &cf.network;
    let cidr = match net.cidr.parse::<ipnet::IpNet>() {
        Ok(c) => Some(c),
        Err(_) => {
            diags.push(
                Diagnostic::new(
                    doc.value_loc(&key(&["network", "cidr"])),
                    format!("`network.cidr`: `{}` is not a network", net.cidr),
                )
                .hint("write it like 192.168.2.0/24"),
            );
            None
        }
    };
    if let Some(c) = cidr
        && c.trunc() != c
    {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["network", "cidr"])),
                format!("`network.cidr`: `{c}` has host bits set"),
            )
            .hint(format!("the network is `{}`", c.trunc())),
        );
    }
    let gateway = parse_ip(&net.gateway, doc, &["network", "gateway"], diags);
    if let (Some(c), Some(g)) = (cidr, gateway)
        && !c.contains(&g)
    {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["network", "gateway"])),
                format!("gateway {g} is outside the cluster network {c}"),
            )
            .related(doc.value_loc(&key(&["network", "cidr"])), "the network is set here")
            .hint("the gateway must be an address inside network.cidr"),
        );
    }
    let mut dns = Vec::new();
    for (i, d) in net.dns.iter().enumerate() {
        let mut p = key(&["network", "dns"]);
        p.push(Seg::Index(i));
        match d.parse::<IpAddr>() {
            Ok(a) => dns.push(a),
            Err(_) => diags.push(Diagnostic::new(
                doc.value_loc(&p),
                format!("`network.dns`: `{d}` is not an IP address"),
            )),
        }
    }

    let distribution = match level.distribution {
        Some(d) => Some(d),
        None => {
            diags.push(
                Diagnostic::new(Location::file_start(&doc.file), "the cluster has no `distribution`")
                    .hint("set `distribution: k3s` or `distribution: talos` in cluster.yaml, or in an accepted ADR's config block"),
            );
            None
        }
    };
    let version = match (&level.version, distribution) {
        (Some(v), Some(d)) => {
            let ok = match d {
                Distribution::K3s => v.starts_with('v') && v.contains("+k3s"),
                Distribution::Talos => v.starts_with('v') && v[1..].split('.').count() == 3,
            };
            if !ok {
                let loc = prov
                    .get("version")
                    .map(|s| s.winner().location.clone())
                    .unwrap_or_else(|| Location::file_start(&doc.file));
                let example = if d == Distribution::K3s {
                    "v1.31.4+k3s1"
                } else {
                    "v1.13.9"
                };
                diags.push(
                    Diagnostic::new(loc, format!("`version: {v}` is not a {} version", d.as_str()))
                        .hint(format!("write it as the release is tagged, e.g. `{example}`")),
                );
            }
            Some(v.clone())
        }
        (None, Some(_)) => {
            diags.push(
                Diagnostic::new(Location::file_start(&doc.file), "the cluster has no `version`")
                    .hint("set the K3s or Talos release, e.g. `version: v1.31.4+k3s1`"),
            );
            None
        }
        _ => None,
    };
    if distribution == Some(Distribution::Talos) && level.kubernetes_version.is_none() {
        diags.push(
            Diagnostic::new(
                Location::file_start(&doc.file),
                "a Talos cluster needs `kubernetes_version`",
            )
            .hint("set the Kubernetes release Talos runs, e.g. `kubernetes_version: v1.33.4`"),
        );
    }
    let cni = level.cni.clone().unwrap_or_else(|| "flannel".into());
    if !["flannel", "cilium", "none"].contains(&cni.as_str()) {
        let loc = prov
            .get("cni")
            .map(|s| s.winner().location.clone())
            .unwrap_or_else(|| Location::file_start(&doc.file));
        diags.push(Diagnostic::new(loc, format!("unknown CNI `{cni}`")).hint("one of: flannel, cilium, none"));
    }

    // Proxmox connection settings
    for (i, api) in cf.proxmox.api.to_vec().iter().enumerate() {
        if !api.starts_with("https://") {
            let mut p = key(&["proxmox", "api"]);
            if matches!(cf.proxmox.api, OneOrMany::Many(_)) {
                p.push(Seg::Index(i));
            }
            diags.push(
                Diagnostic::new(doc.value_loc(&p), format!("Proxmox API `{api}` is not an https:// URL"))
                    .hint("the Proxmox API listens on https://HOST:8006"),
            );
        }
    }
    if let Some(fp) = &cf.proxmox.fingerprint {
        let hex: String = fp.chars().filter(|c| *c != ':').collect();
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            diags.push(
                Diagnostic::new(
                    doc.value_loc(&key(&["proxmox", "fingerprint"])),
                    "`proxmox.fingerprint` is not a SHA-256 fingerprint",
                )
                .hint("32 hex bytes separated by colons, as `pvenode cert info` shows them"),
            );
        }
    }
    if cf.proxmox.fingerprint.is_some() && cf.proxmox.ca_file.is_some() {
        diags.push(Diagnostic::new(
            doc.loc(&key(&["proxmox", "ca_file"])),
            "set either `fingerprint` or `ca_file`, not both",
        ));
    }
    if parse_duration(&cf.reconcile.interval).is_none() {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["reconcile", "interval"])),
                format!("`reconcile.interval`: `{}` is not a duration", cf.reconcile.interval),
            )
            .hint("write it like 30s, 5m or 1h"),
        );
    }
    if let Err(e) = check_cron(&cf.reconcile.drift_schedule) {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["reconcile", "drift_schedule"])),
                format!("`reconcile.drift_schedule`: {e}"),
            )
            .hint("five crontab fields: minute hour day-of-month month day-of-week, e.g. \"0 */6 * * *\""),
        );
    }
    if !valid_tag(&cf.reconcile.ownership_tag) {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["reconcile", "ownership_tag"])),
                format!("`{}` is not a valid Proxmox tag", cf.reconcile.ownership_tag),
            )
            .hint("tags are letters, digits and - _ . +, starting with a letter or digit"),
        );
    }
    if let Some(mode) = &cf.talos.apply_mode
        && !["auto", "no-reboot", "reboot", "staged", "try"].contains(&mode.as_str())
    {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["talos", "apply_mode"])),
                format!("unknown Talos apply mode `{mode}`"),
            )
            .hint("one of: auto, no-reboot, reboot, staged, try"),
        );
    }

    if diags.len() > before {
        return None;
    }
    Some(Cluster {
        name: cf.name.clone(),
        distribution: distribution?,
        version: version?,
        kubernetes_version: level.kubernetes_version,
        cni,
        proxmox: cf.proxmox.clone(),
        network: Network {
            cidr: cidr?.trunc(),
            gateway: gateway?,
            dns,
            search_domain: net.search_domain.clone(),
        },
        reconcile: cf.reconcile.clone(),
        k3s: cf.k3s.clone(),
        talos: cf.talos.clone(),
        secrets: cf.secrets.clone(),
        provenance: prov,
    })
}

fn parse_ip(s: &str, doc: &Doc, path: &[&str], diags: &mut Diagnostics) -> Option<IpAddr> {
    match s.parse::<IpAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            diags.push(Diagnostic::new(
                doc.value_loc(&key(path)),
                format!("`{}`: `{s}` is not an IP address", path.join(".")),
            ));
            None
        }
    }
}

/// `30s`, `5m`, `1h`, `1h30m` in seconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            let n: u64 = num.parse().ok()?;
            num.clear();
            total += n * match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                _ => return None,
            };
        }
    }
    (num.is_empty() && total > 0).then_some(total)
}

fn check_cron(s: &str) -> Result<(), String> {
    let fields: Vec<&str> = s.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("`{s}` has {} fields, a crontab schedule has 5", fields.len()));
    }
    let ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
    for (f, (lo, hi)) in fields.iter().zip(ranges) {
        for part in f.split(',') {
            let (range, step) = part.split_once('/').unwrap_or((part, "1"));
            if step.parse::<u32>().map_or(true, |s| s == 0) {
                return Err(format!("bad step in `{part}`"));
            }
            if range == "*" {
                continue;
            }
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            for v in [a, b] {
                match v.parse::<u32>() {
                    Ok(n) if (lo..=hi).contains(&n) => {}
                    _ => return Err(format!("`{v}` is out of range {lo}-{hi} in `{f}`")),
                }
            }
        }
    }
    Ok(())
}

/// Proxmox's tag format (pve-tag): `[a-z0-9_][a-z0-9_\-\+\.]*`, case-insensitive.
pub fn valid_tag(t: &str) -> bool {
    let mut chars = t.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.'))
}

struct K3sFlags {
    server: BTreeMap<String, String>,
    agent: BTreeMap<String, String>,
}

/// K3s's own flag list (k3s pkg/cli/cmds server.go and agent.go): config.yaml keys are these names.
fn k3s_flags() -> &'static K3sFlags {
    static FLAGS: OnceLock<K3sFlags> = OnceLock::new();
    FLAGS.get_or_init(|| {
        let v: Json = serde_json::from_str(include_str!("data/k3s-flags.json")).expect("embedded k3s flags are JSON");
        let read = |role: &str| -> BTreeMap<String, String> {
            v["details"][role]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    (
                        f["name"].as_str().unwrap_or_default().to_string(),
                        f["type"].as_str().unwrap_or("string").to_string(),
                    )
                })
                .collect()
        };
        K3sFlags {
            server: read("server"),
            agent: read("agent"),
        }
    })
}

fn setting_loc(node: &Node, k: &str) -> Location {
    node.provenance
        .get(k)
        .map(|s| s.winner().location.clone())
        .unwrap_or_else(|| Location::file_start(&node.file))
}

/// Per-node and cross-node rules.
pub(crate) fn nodes(cluster: &Cluster, nodes: &mut [Node], all_nodes_loaded: bool, diags: &mut Diagnostics) {
    let dist = cluster.distribution;
    let mut by_vmid: BTreeMap<u32, &Node> = BTreeMap::new();
    let mut by_name: BTreeMap<&str, &Node> = BTreeMap::new();
    let mut by_ip: BTreeMap<IpAddr, &Node> = BTreeMap::new();
    for node in nodes.iter() {
        if let Some(first) = by_vmid.insert(node.vmid, node) {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "vmid"),
                    format!(
                        "vmid {} is used twice: by `{}` and `{}`",
                        node.vmid, first.name, node.name
                    ),
                )
                .related(setting_loc(first, "vmid"), "first used here")
                .hint("every guest on a Proxmox cluster needs its own vmid"),
            );
        }
        if let Some(first) = by_name.insert(&node.name, node) {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "name").clone(),
                    format!("node name `{}` is used twice", node.name),
                )
                .related(Location::file_start(&first.file), "first used here"),
            );
        }
        if let Some(first) = by_ip.insert(node.ip(), node) {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "address"),
                    format!(
                        "address {} is used twice: by `{}` and `{}`",
                        node.ip(),
                        first.name,
                        node.name
                    ),
                )
                .related(setting_loc(first, "address"), "first used here"),
            );
        }
    }

    for node in nodes.iter() {
        let file_stem = super::files::node_stem(&node.file);
        if node.name != file_stem {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "name"),
                    format!("node `{}` is in a file named `{}`", node.name, node.file),
                )
                .hint(format!(
                    "rename the file to nodes/{}.yaml, or drop `name:` to use the file name",
                    node.name
                )),
            );
        }
        if !valid_hostname(&node.name) {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "name"),
                    format!("`{}` is not a valid host name", node.name),
                )
                .hint("use lowercase letters, digits and '-', at most 63 characters, not starting or ending with '-'"),
            );
        }
        if !(100..=999_999_999).contains(&node.vmid) {
            diags.push(
                Diagnostic::new(setting_loc(node, "vmid"), format!("vmid {} is out of range", node.vmid))
                    .hint("Proxmox guest ids run from 100 to 999999999"),
            );
        }
        if !dist.roles().contains(&node.role.as_str()) {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "role"),
                    format!("role `{}` is not a {} role", node.role, dist.as_str()),
                )
                .hint({
                    let roles = format!("{} roles: {}", dist.as_str(), dist.roles().join(", "));
                    match did_you_mean(&node.role, dist.roles().iter().copied()) {
                        Some(h) => format!("{h} ({roles})"),
                        None => roles,
                    }
                }),
            );
        }
        if let Some(vlan) = node.settings.vlan.filter(|v| !(1..=4094).contains(v)) {
            diags.push(
                Diagnostic::new(setting_loc(node, "vlan"), format!("VLAN tag {vlan} is out of range"))
                    .hint("Proxmox VLAN tags run from 1 to 4094; leave `vlan` out for an untagged NIC"),
            );
        }
        let net = &cluster.network;
        if !net.cidr.contains(&node.ip()) {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "address"),
                    format!("address {} is outside the cluster network {}", node.ip(), net.cidr),
                )
                .hint(format!(
                    "pick an address in {} (network.cidr in cluster.yaml)",
                    net.cidr
                )),
            );
        } else if node.address.prefix_len() != net.cidr.prefix_len() {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "address"),
                    format!(
                        "address prefix /{} differs from the network's /{}",
                        node.address.prefix_len(),
                        net.cidr.prefix_len()
                    ),
                )
                .hint(format!("write `{}/{}`", node.ip(), net.cidr.prefix_len())),
            );
        } else if node.ip() == net.gateway || node.ip() == net.cidr.network() || node.ip() == net.cidr.broadcast() {
            diags.push(Diagnostic::new(
                setting_loc(node, "address"),
                format!(
                    "address {} is the network's gateway, network or broadcast address",
                    node.ip()
                ),
            ));
        }
        if dist == Distribution::Talos && node.kind == GuestKind::Lxc {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "kind"),
                    format!(
                        "node `{}` runs Talos in an LXC container; Talos runs only as a VM",
                        node.name
                    ),
                )
                .hint("set `kind: vm` (Talos is a whole operating system with its own kernel)"),
            );
        }
        if !cluster.proxmox.hosts.is_empty() && !cluster.proxmox.hosts.contains_key(&node.proxmox_node) {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "proxmox_node"),
                    format!(
                        "Proxmox node `{}` is not in cluster.yaml `proxmox.hosts`",
                        node.proxmox_node
                    ),
                )
                .maybe_hint(did_you_mean(
                    &node.proxmox_node,
                    cluster.proxmox.hosts.keys().map(String::as_str),
                )),
            );
        }
        let s = &node.settings;
        match node.kind {
            // Talos in a container is reported above; a template would not make it right.
            GuestKind::Lxc if s.template.is_none() && dist != Distribution::Talos => diags.push(
                Diagnostic::new(
                    Location::file_start(&node.file),
                    format!("lxc node `{}` has no `template`", node.name),
                )
                .hint("set the OS template (local:vztmpl/...) in the node file, cluster.yaml defaults.lxc or an ADR"),
            ),
            GuestKind::Vm if s.image.is_none() => diags.push(
                Diagnostic::new(
                    Location::file_start(&node.file),
                    format!("vm node `{}` has no `image`", node.name),
                )
                .hint("set the boot image (local:iso/...) in the node file, cluster.yaml defaults.vm or an ADR"),
            ),
            _ => {}
        }
        if node.kind == GuestKind::Vm && s.lxc.is_some() {
            let loc = node
                .provenance
                .iter()
                .find(|(k, _)| k.starts_with("lxc."))
                .map(|(_, v)| v.winner().location.clone());
            diags.push(
                Diagnostic::new(
                    loc.unwrap_or_else(|| Location::file_start(&node.file)),
                    format!("vm node `{}` has `lxc` settings", node.name),
                )
                .hint("lxc settings apply to containers; scope the ADR or defaults with `kind: lxc`"),
            );
        }
        check_raw_lxc(node, diags);
        check_k3s_config(cluster, node, diags);
        check_labels_and_taints(node, diags);
        for (i, t) in s.tags.iter().flatten().enumerate() {
            if !valid_tag(t) {
                let loc = node
                    .provenance
                    .get("tags")
                    .and_then(|p| p.winner().items.get(i).cloned())
                    .unwrap_or_else(|| setting_loc(node, "tags"));
                diags.push(Diagnostic::new(loc, format!("`{t}` is not a valid Proxmox tag")));
            }
        }
    }
    if all_nodes_loaded && !nodes.is_empty() && !nodes.iter().any(|n| dist.is_control_plane(&n.role)) {
        let first = &nodes[0];
        diags.push(
            Diagnostic::new(
                Location::file_start(&first.file),
                format!("the cluster has no {} node", dist.roles()[0]),
            )
            .hint(format!("give at least one node `role: {}`", dist.roles()[0])),
        );
    }
}

fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn check_raw_lxc(node: &Node, diags: &mut Diagnostics) {
    let Some(raw) = node.settings.lxc.as_ref().and_then(|l| l.raw.as_ref()) else {
        return;
    };
    let setting = node.provenance.get("lxc.raw");
    for (i, entry) in raw.iter().enumerate() {
        let loc = setting
            .and_then(|s| s.winner().items.get(i).cloned())
            .unwrap_or_else(|| setting_loc(node, "lxc.raw"));
        if entry.len() != 1 {
            diags.push(
                Diagnostic::new(loc, "each raw LXC entry is one `lxc.key: value` pair")
                    .hint("write one list item per key: `- lxc.apparmor.profile: unconfined`"),
            );
            continue;
        }
        let (k, v) = entry.iter().next().expect("one entry");
        use crate::pve::lxc_keys::{ALLOWED_KEYS, RawKeyVerdict, check_raw_key};
        match check_raw_key(k) {
            RawKeyVerdict::Allowed | RawKeyVerdict::Deprecated { .. } => {}
            RawKeyVerdict::Rejected { reason } => {
                diags.push(Diagnostic::new(loc.clone(), format!("Proxmox refuses raw key `{k}`: {reason}")));
            }
            RawKeyVerdict::Unknown => diags.push(
                Diagnostic::new(loc.clone(), format!("`{k}` is not a raw LXC key Proxmox accepts"))
                    .maybe_hint(did_you_mean(k, ALLOWED_KEYS.iter().copied()).or_else(|| {
                        Some("Proxmox allows the keys in pve-container's list plus lxc.cgroup2.*, lxc.prlimit.* and lxc.net.*".into())
                    })),
            ),
        }
        if v.text().contains(['\n', '\r']) {
            diags.push(Diagnostic::new(
                loc,
                format!("the value of `{k}` spans lines; Proxmox config values are one line"),
            ));
        }
    }
}

/// K3s config keys driftless writes from the model, and where to say what they hold instead.
const K3S_MANAGED_KEYS: &[(&str, &str)] = &[
    ("server", "agents and joining servers get the first server's URL"),
    (
        "token",
        "the join token is written to token-file, never into the config",
    ),
    (
        "token-file",
        "the join token is written to /etc/rancher/k3s/cluster-token",
    ),
    (
        "cluster-init",
        "the first server of several starts the embedded etcd cluster",
    ),
    ("node-name", "it is the node's name"),
    ("node-ip", "it is the node's `address`"),
    ("node-label", "set `labels:` on the node instead"),
    ("node-taint", "set `taints:` on the node instead"),
];

fn check_k3s_config(cluster: &Cluster, node: &Node, diags: &mut Diagnostics) {
    let Some(config) = node.settings.k3s.as_ref().and_then(|k| k.config.as_ref()) else {
        return;
    };
    if cluster.distribution != Distribution::K3s {
        diags.push(
            Diagnostic::new(
                setting_loc(
                    node,
                    config
                        .keys()
                        .next()
                        .map(|k| format!("k3s.config.{k}"))
                        .as_deref()
                        .unwrap_or("k3s"),
                ),
                "`k3s` settings in a Talos cluster",
            )
            .hint("remove them, or set `distribution: k3s`"),
        );
        return;
    }
    let flags = k3s_flags();
    let (table, role_name) = if node.role == "server" {
        (&flags.server, "server")
    } else {
        (&flags.agent, "agent")
    };
    for (flag, value) in config {
        if let Some((_, why)) = K3S_MANAGED_KEYS.iter().find(|(k, _)| *k == flag.as_str()) {
            let display = display_key(&["k3s".into(), "config".into(), flag.clone()]);
            diags.push(
                Diagnostic::new(
                    setting_loc(node, &display),
                    format!("`{flag}` is set by driftless itself: {why}"),
                )
                .hint(format!("remove `{flag}` from k3s.config")),
            );
            continue;
        }
        let display = display_key(&["k3s".into(), "config".into(), flag.clone()]);
        let loc = setting_loc(node, &display);
        let name = flag.trim_end_matches('+');
        match table.get(name) {
            None => {
                let other = if role_name == "server" {
                    &flags.agent
                } else {
                    &flags.server
                };
                let hint = if other.contains_key(name) {
                    Some(format!(
                        "`{name}` is a K3s {} flag, and this node is a{} {role_name}",
                        if role_name == "server" { "agent" } else { "server" },
                        if role_name == "agent" { "n" } else { "" }
                    ))
                } else {
                    did_you_mean(name, table.keys().map(String::as_str))
                };
                diags.push(Diagnostic::new(loc, format!("`{name}` is not a K3s {role_name} flag")).maybe_hint(hint));
            }
            Some(ty) => {
                let ok = match ty.as_str() {
                    "bool" => value.is_boolean(),
                    "int" => value.is_i64() || value.is_u64(),
                    "stringslice" => {
                        value.is_string() || value.as_array().is_some_and(|a| a.iter().all(|v| v.is_string()))
                    }
                    _ => value.is_string() || value.is_number(),
                };
                if !ok {
                    let want = match ty.as_str() {
                        "bool" => "true or false",
                        "int" => "a whole number",
                        "stringslice" => "a string or a list of strings",
                        _ => "a string",
                    };
                    diags.push(Diagnostic::new(
                        loc,
                        format!("K3s flag `{name}` takes {want}, not {value}"),
                    ));
                }
            }
        }
    }
}

fn check_labels_and_taints(node: &Node, diags: &mut Diagnostics) {
    for k in node.settings.labels.iter().flat_map(|l| l.keys()) {
        let (prefix, name) = k.rsplit_once('/').map_or((None, k.as_str()), |(p, n)| (Some(p), n));
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let prefix_ok = prefix.is_none_or(|p| {
            !p.is_empty()
                && p.len() <= 253
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
        });
        if !(name_ok && prefix_ok) {
            let display = display_key(&["labels".into(), k.clone()]);
            diags.push(Diagnostic::new(
                setting_loc(node, &display),
                format!("`{k}` is not a valid Kubernetes label key"),
            ));
        }
    }
    let taints = node.provenance.get("taints");
    for (i, t) in node.settings.taints.iter().flatten().enumerate() {
        let effect = t.rsplit_once(':').map(|(_, e)| e);
        if !matches!(effect, Some("NoSchedule" | "PreferNoSchedule" | "NoExecute")) {
            let loc = taints
                .and_then(|s| s.winner().items.get(i).cloned())
                .unwrap_or_else(|| setting_loc(node, "taints"));
            diags.push(
                Diagnostic::new(loc, format!("taint `{t}` has no valid effect"))
                    .hint("write `key=value:NoSchedule` (or PreferNoSchedule, NoExecute)"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_cron() {
        assert_eq!(parse_duration("5m"), Some(300));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("5 minutes"), None);
        assert!(check_cron("0 */6 * * *").is_ok());
        assert!(check_cron("0 */6 * *").is_err());
        assert!(check_cron("61 * * * *").is_err());
    }

    #[test]
    fn k3s_flags_are_embedded() {
        assert!(k3s_flags().server.contains_key("write-kubeconfig-mode"));
        assert!(k3s_flags().agent.contains_key("node-ip"));
        assert!(!k3s_flags().agent.contains_key("cluster-init"));
    }
}
