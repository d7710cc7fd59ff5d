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
    let cidr = network_cidr(net, doc, diags);
    cidr_has_no_host_bits(cidr, doc, diags);
    let gateway = parse_ip(&net.gateway, doc, &["network", "gateway"], diags);
    gateway_inside_network(cidr, gateway, doc, diags);
    let dns = dns_servers(net, doc, diags);
    let distribution = distribution_set(&level, doc, diags);
    let version = version_matches_distribution(&level, distribution, &prov, doc, diags);
    talos_has_kubernetes_version(&level, distribution, doc, diags);
    let cni = cni_known(&level, &prov, doc, diags);
    let addons = addons_declared(&level, &prov, doc, diags);
    proxmox_api_is_https(&cf.proxmox, doc, diags);
    fingerprint_is_sha256(&cf.proxmox, doc, diags);
    fingerprint_or_ca_file(&cf.proxmox, doc, diags);
    host_files_in_the_secrets_directory(&cf.proxmox, doc, diags);
    interval_is_duration(&cf.reconcile, doc, diags);
    drift_schedule_is_cron(&cf.reconcile, doc, diags);
    parallelism_at_least_one(&cf.reconcile, doc, diags);
    ownership_tag_is_proxmox_tag(&cf.reconcile, doc, diags);
    talos_apply_mode_known(&cf.talos, doc, diags);

    // Every rule runs so all of cluster.yaml's mistakes show at once; any one means no cluster.
    if diags.len() > before {
        return None;
    }
    Some(Cluster {
        name: cf.name.clone(),
        distribution: distribution?,
        version: version?,
        kubernetes_version: level.kubernetes_version,
        cni,
        addons,
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

/// Where a cluster-wide key's value is written: cluster.yaml or the ADR it comes from.
fn level_loc(prov: &Provenance, key: &str, doc: &Doc) -> Location {
    prov.get(key)
        .map(|s| s.winner().location.clone())
        .unwrap_or_else(|| Location::file_start(&doc.file))
}

/// `network.cidr` is a network.
fn network_cidr(net: &NetworkSettings, doc: &Doc, diags: &mut Diagnostics) -> Option<ipnet::IpNet> {
    match net.cidr.parse::<ipnet::IpNet>() {
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
    }
}

/// `network.cidr` is written as a network: `192.168.2.0/24`, not `192.168.2.7/24`.
fn cidr_has_no_host_bits(cidr: Option<ipnet::IpNet>, doc: &Doc, diags: &mut Diagnostics) {
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
}

/// The gateway is inside the cluster network.
fn gateway_inside_network(cidr: Option<ipnet::IpNet>, gateway: Option<IpAddr>, doc: &Doc, diags: &mut Diagnostics) {
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
}

/// Every `network.dns` entry is an IP address.
fn dns_servers(net: &NetworkSettings, doc: &Doc, diags: &mut Diagnostics) -> Vec<IpAddr> {
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
    dns
}

/// The cluster has a distribution, from cluster.yaml or an ADR.
fn distribution_set(level: &ClusterLevel, doc: &Doc, diags: &mut Diagnostics) -> Option<Distribution> {
    if level.distribution.is_none() {
        diags.push(
            Diagnostic::new(Location::file_start(&doc.file), "the cluster has no `distribution`")
                .hint("set `distribution: k3s` or `distribution: talos` in cluster.yaml, or in an accepted ADR's config block"),
        );
    }
    level.distribution
}

/// The cluster has a version, tagged as the distribution tags its releases.
fn version_matches_distribution(
    level: &ClusterLevel,
    distribution: Option<Distribution>,
    prov: &Provenance,
    doc: &Doc,
    diags: &mut Diagnostics,
) -> Option<String> {
    match (&level.version, distribution) {
        (Some(v), Some(d)) => {
            let ok = match d {
                Distribution::K3s => v.starts_with('v') && v.contains("+k3s"),
                Distribution::Talos => v.starts_with('v') && v[1..].split('.').count() == 3,
            };
            if !ok {
                let example = if d == Distribution::K3s {
                    "v1.31.4+k3s1"
                } else {
                    "v1.13.9"
                };
                diags.push(
                    Diagnostic::new(
                        level_loc(prov, "version", doc),
                        format!("`version: {v}` is not a {} version", d.as_str()),
                    )
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
        // Without a distribution there is nothing to check a version against; that is reported.
        _ => None,
    }
}

/// A Talos cluster names the Kubernetes release it runs (a K3s version already includes it).
fn talos_has_kubernetes_version(
    level: &ClusterLevel,
    distribution: Option<Distribution>,
    doc: &Doc,
    diags: &mut Diagnostics,
) {
    if distribution == Some(Distribution::Talos) && level.kubernetes_version.is_none() {
        diags.push(
            Diagnostic::new(
                Location::file_start(&doc.file),
                "a Talos cluster needs `kubernetes_version`",
            )
            .hint("set the Kubernetes release Talos runs, e.g. `kubernetes_version: v1.33.4`"),
        );
    }
}

/// The CNI is one driftless knows how to set up (flannel when unset).
fn cni_known(level: &ClusterLevel, prov: &Provenance, doc: &Doc, diags: &mut Diagnostics) -> String {
    let cni = level.cni.clone().unwrap_or_else(|| "flannel".into());
    if !["flannel", "cilium", "none"].contains(&cni.as_str()) {
        diags.push(
            Diagnostic::new(level_loc(prov, "cni", doc), format!("unknown CNI `{cni}`"))
                .hint("one of: flannel, cilium, none"),
        );
    }
    cni
}

/// The declared add-ons, enabled ones only, by wave then name: each name a DNS label (it
/// names the add-on's directory, label and inventory), health checks `Kind/namespace/name` of
/// a kind driftless can judge, at most one CNI add-on, and the CNI's wave before every other.
fn addons_declared(level: &ClusterLevel, prov: &Provenance, doc: &Doc, diags: &mut Diagnostics) -> Vec<Addon> {
    let Some(declared) = &level.addons else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, decl) in declared {
        let wave_key = format!("addons.{}.wave", display_key(std::slice::from_ref(name)));
        let loc = level_loc(prov, &wave_key, doc);
        if !is_dns_label(name) || name.len() > 47 {
            diags.push(
                Diagnostic::new(
                    loc.clone(),
                    format!("add-on name `{name}` is not a DNS label of at most 47 characters"),
                )
                .hint("lower-case letters, digits and `-`, like `metallb` or `cert-manager`"),
            );
            continue;
        }
        if decl.enabled == Some(false) {
            continue;
        }
        let mut health = Vec::new();
        let health_key = format!("addons.{name}.health");
        for (i, h) in decl.health.iter().flatten().enumerate() {
            let at = prov
                .get(&health_key)
                .and_then(|s| s.winner().items.get(i).cloned())
                .unwrap_or_else(|| loc.clone());
            match HealthRef::parse(h) {
                Some(r) if HealthRef::KINDS.contains(&r.kind.as_str()) => health.push(r),
                Some(r) => diags.push(
                    Diagnostic::new(at, format!("add-on `{name}`: cannot judge the health of a {}", r.kind))
                        .hint(format!("health checks wait for: {}", HealthRef::KINDS.join(", "))),
                ),
                None => diags.push(
                    Diagnostic::new(
                        at,
                        format!("add-on `{name}`: health check `{h}` is not Kind/namespace/name"),
                    )
                    .hint("e.g. Deployment/metallb-system/metallb-controller"),
                ),
            }
        }
        out.push(Addon {
            name: name.clone(),
            wave: decl.wave,
            cni: decl.cni.unwrap_or(false),
            force_conflicts: decl.force_conflicts.unwrap_or(false),
            health,
            declared: prov
                .get(&wave_key)
                .map(Setting::cite_with_adr)
                .unwrap_or_else(|| loc.to_string()),
            location: loc,
            values: decl.values.clone().unwrap_or_default(),
            files: Vec::new(),
        });
    }
    out.sort_by(|a, b| (a.wave, &a.name).cmp(&(b.wave, &b.name)));
    let cnis: Vec<&Addon> = out.iter().filter(|a| a.cni).collect();
    if let [first, second, ..] = cnis.as_slice() {
        diags.push(
            Diagnostic::new(
                level_loc(prov, &format!("addons.{}.cni", second.name), doc),
                format!("two add-ons install the CNI: `{}` and `{}`", first.name, second.name),
            )
            .hint("a cluster runs one CNI: set `cni: true` on one add-on"),
        );
    }
    if let Some(cni) = cnis.first() {
        for a in out.iter().filter(|a| !a.cni && a.wave <= cni.wave) {
            diags.push(
                Diagnostic::new(
                    level_loc(prov, &format!("addons.{}.wave", a.name), doc),
                    format!(
                        "add-on `{}` is in wave {}, not after the CNI add-on `{}` (wave {})",
                        a.name, a.wave, cni.name, cni.wave
                    ),
                )
                .hint("nothing can run before the pod network: give it a later wave"),
            );
        }
    }
    out
}

/// A Kubernetes DNS label: lower-case letters, digits and `-`, not at either end.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Every Proxmox API URL is https://.
fn proxmox_api_is_https(proxmox: &ProxmoxSettings, doc: &Doc, diags: &mut Diagnostics) {
    for (i, api) in proxmox.api.to_vec().iter().enumerate() {
        if !api.starts_with("https://") {
            let mut p = key(&["proxmox", "api"]);
            if matches!(proxmox.api, OneOrMany::Many(_)) {
                p.push(Seg::Index(i));
            }
            diags.push(
                Diagnostic::new(doc.value_loc(&p), format!("Proxmox API `{api}` is not an https:// URL"))
                    .hint("the Proxmox API listens on https://HOST:8006"),
            );
        }
    }
}

/// `proxmox.fingerprint` is a SHA-256 fingerprint: 32 hex bytes, colons optional.
fn fingerprint_is_sha256(proxmox: &ProxmoxSettings, doc: &Doc, diags: &mut Diagnostics) {
    if let Some(fp) = &proxmox.fingerprint {
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
}

/// The Proxmox certificate is trusted one way: a pinned fingerprint or a CA file, not both.
/// `ca_file`, `known_hosts` and host keys name files of the secrets directory on the host that
/// runs driftless: plain names, so the repository cannot choose another file of that host.
fn host_files_in_the_secrets_directory(proxmox: &ProxmoxSettings, doc: &Doc, diags: &mut Diagnostics) {
    let mut named: Vec<(Vec<String>, &str)> = Vec::new();
    if let Some(ca) = &proxmox.ca_file {
        named.push((vec!["proxmox".into(), "ca_file".into()], ca));
    }
    for (node, host) in &proxmox.hosts {
        let base = ["proxmox", "hosts", node.as_str()].map(String::from);
        if let Some(k) = &host.known_hosts {
            named.push(([&base[..], &["known_hosts".to_string()]].concat(), k));
        }
        if let Some(key) = &host.key {
            let path = [&base[..], &["key".to_string(), "secret".to_string()]].concat();
            named.push((path, &key.secret));
        }
    }
    for (path, name) in named {
        if !crate::secrets::is_plain_name(name) {
            let segs: Vec<&str> = path.iter().map(String::as_str).collect();
            diags.push(
                Diagnostic::new(
                    doc.value_loc(&key(&segs)),
                    format!("`{}`: `{name}` is not a plain file name", segs.join(".")),
                )
                .hint("host-side files are read from the secrets directory by name: no `/`, no `..`"),
            );
        }
    }
}

fn fingerprint_or_ca_file(proxmox: &ProxmoxSettings, doc: &Doc, diags: &mut Diagnostics) {
    if proxmox.fingerprint.is_some() && proxmox.ca_file.is_some() {
        diags.push(Diagnostic::new(
            doc.loc(&key(&["proxmox", "ca_file"])),
            "set either `fingerprint` or `ca_file`, not both",
        ));
    }
}

/// `reconcile.interval` is a duration.
fn interval_is_duration(reconcile: &ReconcilePolicy, doc: &Doc, diags: &mut Diagnostics) {
    if parse_duration(&reconcile.interval).is_none() {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["reconcile", "interval"])),
                format!("`reconcile.interval`: `{}` is not a duration", reconcile.interval),
            )
            .hint("write it like 30s, 5m or 1h"),
        );
    }
}

/// `reconcile.parallelism` lets at least one step run.
fn parallelism_at_least_one(reconcile: &ReconcilePolicy, doc: &Doc, diags: &mut Diagnostics) {
    if reconcile.parallelism == 0 {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["reconcile", "parallelism"])),
                "`reconcile.parallelism`: 0 would apply nothing".to_string(),
            )
            .hint("1 applies one step at a time, in plan order; the default is 8 per Proxmox node"),
        );
    }
}

/// `reconcile.drift_schedule` is a five-field crontab schedule.
fn drift_schedule_is_cron(reconcile: &ReconcilePolicy, doc: &Doc, diags: &mut Diagnostics) {
    if let Err(e) = check_cron(&reconcile.drift_schedule) {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["reconcile", "drift_schedule"])),
                format!("`reconcile.drift_schedule`: {e}"),
            )
            .hint("five crontab fields: minute hour day-of-month month day-of-week, e.g. \"0 */6 * * *\""),
        );
    }
}

/// `reconcile.ownership_tag` is a tag Proxmox accepts.
fn ownership_tag_is_proxmox_tag(reconcile: &ReconcilePolicy, doc: &Doc, diags: &mut Diagnostics) {
    if !valid_tag(&reconcile.ownership_tag) {
        diags.push(
            Diagnostic::new(
                doc.value_loc(&key(&["reconcile", "ownership_tag"])),
                format!("`{}` is not a valid Proxmox tag", reconcile.ownership_tag),
            )
            .hint("tags are letters, digits and - _ . +, starting with a letter or digit"),
        );
    }
}

/// `talos.apply_mode` is one of talosctl's apply modes.
fn talos_apply_mode_known(talos: &TalosCluster, doc: &Doc, diags: &mut Diagnostics) {
    if let Some(mode) = &talos.apply_mode
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
    // Diagnostics::finish sorts by place and message, and no two of these rules share a message,
    // so running each over all nodes (not node by node, as before) prints the same.
    unique_vmids(nodes, diags);
    unique_names(nodes, diags);
    unique_addresses(nodes, diags);
    for node in nodes.iter() {
        name_matches_file(node, diags);
        name_is_hostname(node, diags);
        vmid_in_range(node, diags);
        role_matches_distribution(cluster.distribution, node, diags);
        vlan_in_range(node, diags);
        address_inside_network(&cluster.network, node, diags);
        talos_only_on_vms(cluster.distribution, node, diags);
        proxmox_node_known(&cluster.proxmox, node, diags);
        has_template_or_image(cluster.distribution, node, diags);
        vm_has_no_lxc_settings(node, diags);
        mount_feature_names_filesystems(node, diags);
        raw_lxc_keys_allowed(node, diags);
        no_k3s_settings_on_talos(cluster.distribution, node, diags);
        k3s_flags_known(cluster.distribution, node, diags);
        label_keys_valid(node, diags);
        taints_have_effects(node, diags);
        tags_valid(node, diags);
    }
    has_control_plane(cluster.distribution, nodes, all_nodes_loaded, diags);
}

/// No two guests share a vmid: a repeat is reported where it is set, pointing at the one before.
fn unique_vmids(nodes: &[Node], diags: &mut Diagnostics) {
    let mut by_vmid: BTreeMap<u32, &Node> = BTreeMap::new();
    for node in nodes {
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
    }
}

/// No two nodes share a name.
fn unique_names(nodes: &[Node], diags: &mut Diagnostics) {
    let mut by_name: BTreeMap<&str, &Node> = BTreeMap::new();
    for node in nodes {
        if let Some(first) = by_name.insert(&node.name, node) {
            diags.push(
                Diagnostic::new(
                    setting_loc(node, "name").clone(),
                    format!("node name `{}` is used twice", node.name),
                )
                .related(Location::file_start(&first.file), "first used here"),
            );
        }
    }
}

/// No two nodes share an IP address.
fn unique_addresses(nodes: &[Node], diags: &mut Diagnostics) {
    let mut by_ip: BTreeMap<IpAddr, &Node> = BTreeMap::new();
    for node in nodes {
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
}

/// A node's name is its file's name (`name:` may only repeat it).
fn name_matches_file(node: &Node, diags: &mut Diagnostics) {
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
}

/// A node's name can be its host name.
fn name_is_hostname(node: &Node, diags: &mut Diagnostics) {
    if !valid_hostname(&node.name) {
        diags.push(
            Diagnostic::new(
                setting_loc(node, "name"),
                format!("`{}` is not a valid host name", node.name),
            )
            .hint("use lowercase letters, digits and '-', at most 63 characters, not starting or ending with '-'"),
        );
    }
}

/// The vmid is one Proxmox accepts for a guest.
fn vmid_in_range(node: &Node, diags: &mut Diagnostics) {
    if !(100..=999_999_999).contains(&node.vmid) {
        diags.push(
            Diagnostic::new(setting_loc(node, "vmid"), format!("vmid {} is out of range", node.vmid))
                .hint("Proxmox guest ids run from 100 to 999999999"),
        );
    }
}

/// The role is one of the distribution's roles.
fn role_matches_distribution(dist: Distribution, node: &Node, diags: &mut Diagnostics) {
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
}

/// A VLAN tag, when set, is one Proxmox accepts.
fn vlan_in_range(node: &Node, diags: &mut Diagnostics) {
    if let Some(vlan) = node.settings.vlan.filter(|v| !(1..=4094).contains(v)) {
        diags.push(
            Diagnostic::new(setting_loc(node, "vlan"), format!("VLAN tag {vlan} is out of range"))
                .hint("Proxmox VLAN tags run from 1 to 4094; leave `vlan` out for an untagged NIC"),
        );
    }
}

/// The address is a host of the cluster network, written with the network's prefix length.
/// One finding per node: each case assumes the one before it holds.
fn address_inside_network(net: &Network, node: &Node, diags: &mut Diagnostics) {
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
}

/// Talos nodes are VMs: Talos is a whole operating system with its own kernel.
fn talos_only_on_vms(dist: Distribution, node: &Node, diags: &mut Diagnostics) {
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
}

/// The Proxmox node is one of `proxmox.hosts`, when cluster.yaml lists them.
fn proxmox_node_known(proxmox: &ProxmoxSettings, node: &Node, diags: &mut Diagnostics) {
    if !proxmox.hosts.is_empty() && !proxmox.hosts.contains_key(&node.proxmox_node) {
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
                proxmox.hosts.keys().map(String::as_str),
            )),
        );
    }
}

/// A container has an OS template and a VM a boot image: the guest cannot be created without one.
fn has_template_or_image(dist: Distribution, node: &Node, diags: &mut Diagnostics) {
    let s = &node.settings;
    match node.kind {
        // Talos in a container is reported by talos_only_on_vms; a template would not make it right.
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
}

/// A VM has no `lxc` settings: they are for containers.
fn vm_has_no_lxc_settings(node: &Node, diags: &mut Diagnostics) {
    if node.kind == GuestKind::Vm && node.settings.lxc.is_some() {
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
}

/// `lxc.features.mount` lists file system types (`nfs;cifs`) and nothing else: it is written
/// into Proxmox's `features:` property list, where a `,` or `=` would smuggle in another
/// feature flag (`nfs,force_rw_sys=1`) that review of the `mount` line would not see.
fn mount_feature_names_filesystems(node: &Node, diags: &mut Diagnostics) {
    let Some(mount) = node
        .settings
        .lxc
        .as_ref()
        .and_then(|l| l.features.as_ref()?.mount.as_ref())
    else {
        return;
    };
    let fs_type = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !mount.split(';').all(fs_type) {
        diags.push(
            Diagnostic::new(
                setting_loc(node, "lxc.features.mount"),
                format!("`lxc.features.mount` `{mount}` is not a list of file system types"),
            )
            .hint("write file system types separated by `;`, as Proxmox does: `nfs;cifs`"),
        );
    }
}

/// Every tag is one Proxmox accepts.
fn tags_valid(node: &Node, diags: &mut Diagnostics) {
    for (i, t) in node.settings.tags.iter().flatten().enumerate() {
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

/// There is a control plane node. Only said when every node file was read: the missing one
/// may be a file with a mistake of its own.
fn has_control_plane(dist: Distribution, nodes: &[Node], all_nodes_loaded: bool, diags: &mut Diagnostics) {
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

/// Every raw LXC entry is one `lxc.key: value` line Proxmox accepts.
fn raw_lxc_keys_allowed(node: &Node, diags: &mut Diagnostics) {
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

/// A Talos cluster has no `k3s` settings.
fn no_k3s_settings_on_talos(dist: Distribution, node: &Node, diags: &mut Diagnostics) {
    let Some(config) = node.settings.k3s.as_ref().and_then(|k| k.config.as_ref()) else {
        return;
    };
    if dist != Distribution::K3s {
        let first = config.keys().next().map(|k| format!("k3s.config.{k}"));
        diags.push(
            Diagnostic::new(
                setting_loc(node, first.as_deref().unwrap_or("k3s")),
                "`k3s` settings in a Talos cluster",
            )
            .hint("remove them, or set `distribution: k3s`"),
        );
    }
}

/// Every `k3s.config` key is a K3s flag of the node's role that driftless does not set itself,
/// with a value of the flag's type.
fn k3s_flags_known(dist: Distribution, node: &Node, diags: &mut Diagnostics) {
    let Some(config) = node.settings.k3s.as_ref().and_then(|k| k.config.as_ref()) else {
        return;
    };
    if dist != Distribution::K3s {
        return; // no_k3s_settings_on_talos says so, once
    }
    let flags = k3s_flags();
    let (table, other, role_name) = if node.role == "server" {
        (&flags.server, &flags.agent, "server")
    } else {
        (&flags.agent, &flags.server, "agent")
    };
    for (flag, value) in config {
        let display = display_key(&["k3s".into(), "config".into(), flag.clone()]);
        let loc = setting_loc(node, &display);
        if let Some((_, why)) = K3S_MANAGED_KEYS.iter().find(|(k, _)| *k == flag.as_str()) {
            diags.push(
                Diagnostic::new(loc, format!("`{flag}` is set by driftless itself: {why}"))
                    .hint(format!("remove `{flag}` from k3s.config")),
            );
            continue;
        }
        // In K3s's config file `flag+:` appends to a list flag; the flag is the name without `+`.
        let name = flag.trim_end_matches('+');
        match table.get(name) {
            None => {
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
                if let Err(want) = k3s_value_fits(ty, value) {
                    diags.push(Diagnostic::new(
                        loc,
                        format!("K3s flag `{name}` takes {want}, not {value}"),
                    ));
                }
            }
        }
    }
}

/// Whether a value suits a K3s flag of type `ty` (from k3s-flags.json); if not, what would.
fn k3s_value_fits(ty: &str, value: &Json) -> Result<(), &'static str> {
    let (ok, want) = match ty {
        "bool" => (value.is_boolean(), "true or false"),
        "int" => (value.is_i64() || value.is_u64(), "a whole number"),
        "stringslice" => (
            value.is_string() || value.as_array().is_some_and(|a| a.iter().all(|v| v.is_string())),
            "a string or a list of strings",
        ),
        _ => (value.is_string() || value.is_number(), "a string"),
    };
    if ok { Ok(()) } else { Err(want) }
}

/// Every label key is a Kubernetes label key: an optional DNS-subdomain prefix and a name.
fn label_keys_valid(node: &Node, diags: &mut Diagnostics) {
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
}

/// Every taint ends in an effect Kubernetes knows.
fn taints_have_effects(node: &Node, diags: &mut Diagnostics) {
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
    use crate::model::yaml;

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

    /// A value the node file at `file` sets at `line`:`col`.
    fn written(file: &str, line: u32, col: u32, value: Json) -> Setting {
        Setting {
            value: value.clone(),
            chain: vec![SetBy {
                source: Source::Node,
                location: Location::new(file, line, col),
                value,
                items: Vec::new(),
            }],
        }
    }

    /// An LXC k3s server in `nodes/<name>.yaml`: vmid on line 2, address on line 5.
    fn node(name: &str, vmid: u32, address: &str) -> Node {
        let file = format!("nodes/{name}.yaml");
        let provenance = Provenance::from([
            ("vmid".to_string(), written(&file, 2, 7, vmid.into())),
            ("address".to_string(), written(&file, 5, 10, address.into())),
        ]);
        Node {
            name: name.into(),
            file,
            vmid,
            proxmox_node: "pve".into(),
            kind: GuestKind::Lxc,
            role: "server".into(),
            address: address.parse().unwrap(),
            adopt: false,
            settings: NodeSettings::default(),
            provenance,
        }
    }

    fn network() -> Network {
        Network {
            cidr: "192.168.2.0/24".parse().unwrap(),
            gateway: "192.168.2.1".parse().unwrap(),
            dns: Vec::new(),
            search_domain: None,
        }
    }

    fn places(diags: &Diagnostics) -> Vec<String> {
        diags
            .0
            .iter()
            .map(|d| format!("{}: {}", d.location, d.message))
            .collect()
    }

    #[test]
    fn a_repeated_vmid_is_reported_where_the_later_node_sets_it() {
        let nodes = [
            node("a", 100, "192.168.2.20/24"),
            node("b", 101, "192.168.2.21/24"),
            node("c", 100, "192.168.2.22/24"),
        ];
        let mut diags = Diagnostics::default();
        unique_vmids(&nodes, &mut diags);
        assert_eq!(
            places(&diags),
            ["nodes/c.yaml:2:7: vmid 100 is used twice: by `a` and `c`"]
        );
        assert_eq!(diags.0[0].related[0].location, Location::new("nodes/a.yaml", 2, 7));
    }

    #[test]
    fn an_address_must_be_a_host_of_the_network_with_its_prefix() {
        let check = |address: &str| {
            let mut diags = Diagnostics::default();
            address_inside_network(&network(), &node("a", 100, address), &mut diags);
            diags.0.into_iter().map(|d| d.message).collect::<Vec<_>>()
        };
        assert_eq!(check("192.168.2.20/24"), Vec::<String>::new());
        assert_eq!(
            check("10.0.0.5/24"),
            ["address 10.0.0.5 is outside the cluster network 192.168.2.0/24"]
        );
        assert_eq!(
            check("192.168.2.20/16"),
            ["address prefix /16 differs from the network's /24"]
        );
        for reserved in ["192.168.2.1/24", "192.168.2.0/24", "192.168.2.255/24"] {
            assert_eq!(check(reserved).len(), 1, "{reserved}");
            assert!(check(reserved)[0].ends_with("is the network's gateway, network or broadcast address"));
        }
    }

    #[test]
    fn a_role_of_another_distribution_lists_this_ones_roles() {
        let mut n = node("a", 100, "192.168.2.20/24");
        let mut diags = Diagnostics::default();
        role_matches_distribution(Distribution::Talos, &n, &mut diags);
        assert_eq!(places(&diags), ["nodes/a.yaml:1:1: role `server` is not a talos role"]);
        assert_eq!(diags.0[0].hint.as_deref(), Some("talos roles: controlplane, worker"));
        n.role = "agnet".into();
        let mut diags = Diagnostics::default();
        role_matches_distribution(Distribution::K3s, &n, &mut diags);
        assert_eq!(
            diags.0[0].hint.as_deref(),
            Some("did you mean `agent`? (k3s roles: server, agent)")
        );
    }

    #[test]
    fn raw_lxc_entries_are_reported_at_their_own_list_item() {
        let mut n = node("a", 100, "192.168.2.20/24");
        let entry = |pairs: &[(&str, &str)]| -> BTreeMap<String, RawValue> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), RawValue::Str(v.to_string())))
                .collect()
        };
        n.settings.lxc = Some(LxcSettings {
            raw: Some(vec![
                entry(&[("lxc.apparmor.profile", "unconfined")]),
                entry(&[("lxc.cap.drop", ""), ("lxc.mount.auto", "proc:rw")]),
                entry(&[("lxc.mount.entry", "a\nb")]),
            ]),
            ..Default::default()
        });
        let mut raw = written("nodes/a.yaml", 8, 3, Json::Null);
        raw.chain[0].items = (0..3).map(|i| Location::new("nodes/a.yaml", 9 + i, 7)).collect();
        n.provenance.insert("lxc.raw".into(), raw);
        let mut diags = Diagnostics::default();
        raw_lxc_keys_allowed(&n, &mut diags);
        assert_eq!(
            places(&diags),
            [
                "nodes/a.yaml:10:7: each raw LXC entry is one `lxc.key: value` pair",
                "nodes/a.yaml:11:7: the value of `lxc.mount.entry` spans lines; Proxmox config values are one line",
            ]
        );
    }

    #[test]
    fn a_k3s_flag_of_the_other_role_says_so() {
        let with_config = |role: &str, flag: &str| {
            let mut n = node("a", 100, "192.168.2.20/24");
            n.role = role.into();
            n.settings.k3s = Some(K3sSettings {
                config: Some(BTreeMap::from([(flag.to_string(), Json::Bool(true))])),
            });
            n
        };
        let mut diags = Diagnostics::default();
        k3s_flags_known(
            Distribution::K3s,
            &with_config("server", "disable-apiserver-lb"),
            &mut diags,
        );
        k3s_flags_known(Distribution::K3s, &with_config("agent", "cluster-reset"), &mut diags);
        // `+` appends to a flag: still the flag
        k3s_flags_known(Distribution::K3s, &with_config("server", "cluster-reset+"), &mut diags);
        let said: Vec<_> = diags
            .0
            .iter()
            .map(|d| (d.message.as_str(), d.hint.as_deref()))
            .collect();
        assert_eq!(
            said,
            [
                (
                    "`disable-apiserver-lb` is not a K3s server flag",
                    Some("`disable-apiserver-lb` is a K3s agent flag, and this node is a server")
                ),
                (
                    "`cluster-reset` is not a K3s agent flag",
                    Some("`cluster-reset` is a K3s server flag, and this node is an agent")
                ),
            ]
        );
    }

    #[test]
    fn k3s_settings_in_a_talos_cluster_are_one_mistake_not_one_per_flag() {
        let mut n = node("a", 100, "192.168.2.20/24");
        n.settings.k3s = Some(K3sSettings {
            config: Some(BTreeMap::from([
                ("not-a-flag".to_string(), Json::Bool(true)),
                ("token".to_string(), Json::Bool(true)),
            ])),
        });
        let mut diags = Diagnostics::default();
        no_k3s_settings_on_talos(Distribution::Talos, &n, &mut diags);
        k3s_flags_known(Distribution::Talos, &n, &mut diags);
        assert_eq!(places(&diags), ["nodes/a.yaml:1:1: `k3s` settings in a Talos cluster"]);
    }

    #[test]
    fn no_control_plane_is_only_said_when_every_node_file_was_read() {
        let mut agent = node("b", 101, "192.168.2.21/24");
        agent.role = "agent".into();
        let nodes = [agent];
        let mut diags = Diagnostics::default();
        has_control_plane(Distribution::K3s, &nodes, false, &mut diags);
        assert!(diags.is_empty());
        has_control_plane(Distribution::K3s, &nodes, true, &mut diags);
        assert_eq!(places(&diags), ["nodes/b.yaml:1:1: the cluster has no server node"]);
    }

    fn cluster_doc(text: &str) -> Doc {
        Doc {
            file: "cluster.yaml".into(),
            root: yaml::parse(text, 0).unwrap(),
        }
    }

    #[test]
    fn a_gateway_outside_the_network_points_at_both() {
        let doc = cluster_doc("network:\n  cidr: 10.0.0.0/24\n  gateway: 10.0.1.1\n");
        let cidr = Some("10.0.0.0/24".parse().unwrap());
        let mut diags = Diagnostics::default();
        gateway_inside_network(cidr, Some("10.0.0.1".parse().unwrap()), &doc, &mut diags);
        assert!(diags.is_empty());
        gateway_inside_network(cidr, Some("10.0.1.1".parse().unwrap()), &doc, &mut diags);
        assert_eq!(
            places(&diags),
            ["cluster.yaml:3:12: gateway 10.0.1.1 is outside the cluster network 10.0.0.0/24"]
        );
        assert_eq!(diags.0[0].related[0].location, Location::new("cluster.yaml", 2, 9));
    }

    #[test]
    fn a_wrong_version_is_reported_where_it_was_set() {
        let doc = cluster_doc("name: x\n");
        let level = ClusterLevel {
            version: Some("1.31".into()),
            ..Default::default()
        };
        let mut prov = Provenance::new();
        prov.insert(
            "version".into(),
            written("adr/ADR-007-version.md", 12, 10, "1.31".into()),
        );
        let mut diags = Diagnostics::default();
        let version = version_matches_distribution(&level, Some(Distribution::K3s), &prov, &doc, &mut diags);
        assert_eq!(version.as_deref(), Some("1.31"));
        assert_eq!(
            places(&diags),
            ["adr/ADR-007-version.md:12:10: `version: 1.31` is not a k3s version"]
        );
    }
}
