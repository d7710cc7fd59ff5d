//! `driftless import`: node files (and a cluster.yaml skeleton) from guests that exist on a
//! Proxmox, so a homelab with hand-made containers has a way in.
//!
//! Pure: [`import`] turns the guests' configs (read by [`read`] through the ports) into file
//! texts in the repository format of `model::schema`. Every guest's settings become node
//! values; values every imported guest of a kind shares are lifted into cluster.yaml
//! `defaults`; each node file says `adopt: true`, so the first plan shows exactly what
//! driftless would change (for guests made by hand: the ownership tag, and what the
//! repository format cannot say, listed in the file's comments).

pub mod read;

use crate::model::schema::{Distribution, NODE_IDENTITY_KEYS, Size};
use crate::ports::{GuestSummary, LiveConfig, PveKind};
use crate::pve::conf;
use crate::pve::lxc_keys::{RawKeyVerdict, check_raw_key};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// One guest as read from Proxmox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedGuest {
    pub summary: GuestSummary,
    /// The API's view (pending changes applied, as Proxmox returns it).
    pub config: LiveConfig,
    /// The raw `lxc.*` keys in file order and the snapshot names, when the config file was
    /// read through the host shell; `None`: only the API was asked.
    pub file: Option<ConfFile>,
}

/// What only the config file tells.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfFile {
    pub raw_lxc: Vec<(String, String)>,
    pub snapshots: Vec<String>,
}

/// Which guests to import: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Inclusive vmid range.
    pub vmids: Option<(u32, u32)>,
    /// The guest carries one of these tags.
    pub tags: Vec<String>,
    /// The guest's name matches one of these patterns (`*` and `?`).
    pub names: Vec<String>,
}

impl Selection {
    pub fn matches(&self, g: &GuestSummary) -> bool {
        let name = g.name.as_deref().unwrap_or("");
        self.vmids.is_none_or(|(lo, hi)| (lo..=hi).contains(&g.vmid))
            && (self.tags.is_empty()
                || g.tags
                    .iter()
                    .any(|t| self.tags.iter().any(|w| w.eq_ignore_ascii_case(t))))
            && (self.names.is_empty() || self.names.iter().any(|p| glob(p, name)))
    }
}

/// `*` any run of characters, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `100-199`, `100` or `100-`.
pub fn parse_vmid_range(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{s}` is not a vmid range like 100-199");
    let (lo, hi) = match s.split_once('-') {
        Some((lo, "")) => (lo.trim().parse().map_err(|_| bad())?, 999_999_999),
        Some((lo, hi)) => (
            lo.trim().parse().map_err(|_| bad())?,
            hi.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let v = s.trim().parse().map_err(|_| bad())?;
            (v, v)
        }
    };
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// What the imported repository is, beyond the guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    pub cluster_name: String,
    pub distribution: Distribution,
    /// The K3s or Talos release (written into the skeleton, to check).
    pub version: String,
    /// Talos: the Kubernetes release.
    pub kubernetes_version: Option<String>,
    /// The API the guests were read from (the skeleton's `proxmox.api`, and the comments).
    pub api: String,
    pub fingerprint: Option<String>,
    /// `USER@HOST[:PORT]` of the host shell, for the skeleton's `proxmox.hosts`.
    pub ssh: Option<(String, Option<u16>)>,
    pub ownership_tag: String,
    /// The network's gateway, when the guests do not say it.
    pub gateway: Option<IpAddr>,
    /// VM addresses (a VM's config does not hold its address): node name -> `IP/PREFIX`.
    pub addresses: BTreeMap<String, IpNet>,
    /// Roles by node name, instead of the guess from the name.
    pub roles: BTreeMap<String, String>,
    /// The OS template every imported container names (only used to re-create one).
    pub template: Option<String>,
    /// The templates the Proxmox nodes hold (`local:vztmpl/...`), to guess a container's from.
    pub templates: BTreeMap<String, Vec<String>>,
}

/// A guest that was not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub vmid: u32,
    pub name: String,
    pub reason: String,
}

/// The repository files to write, and what the user should know.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Imported {
    /// `cluster.yaml`, `nodes/NAME.yaml`: path -> text.
    pub files: BTreeMap<String, String>,
    /// Per node: what the first plan will change or what is kept unmanaged.
    pub notes: BTreeMap<String, Vec<String>>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("no guest matches the selection (vmid range, tag, name pattern)")]
    NothingSelected,
    #[error("no guest could be imported: {0}")]
    NothingImported(String),
    #[error("no gateway: none of the guests names one; give it with --gateway")]
    NoGateway,
}

// ---- values ----------------------------------------------------------------------------------

/// A node setting's value, as YAML will show it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Val {
    /// Already YAML (a number, a boolean, a quoted or plain string).
    Scalar(String),
    /// A list of scalars.
    List(Vec<String>),
    /// `lxc.raw`: a list of one-key maps.
    Raw(Vec<(String, String)>),
}

/// A string as a YAML scalar: plain when it reads back as the same string, else quoted.
pub fn yaml_str(s: &str) -> String {
    let reserved = [
        "true", "false", "null", "yes", "no", "on", "off", "~", "y", "n", "True", "False", "Null", "TRUE", "FALSE",
        "NULL", "Yes", "No", "On", "Off", "YES", "NO", "ON", "OFF",
    ];
    let numeric = s.parse::<f64>().is_ok() || s.starts_with("0x") || s.starts_with("0o");
    let plain = !s.is_empty()
        && !reserved.contains(&s)
        && !numeric
        && !s.starts_with(|c: char| "-?:,[]{}#&*!|>'\"%@`= ".contains(c))
        && !s.ends_with([' ', ':'])
        && !s.contains(": ")
        && !s.contains(" #")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@+=;, ()".contains(c));
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("strings serialise")
    }
}

fn scalar_str(s: &str) -> Val {
    Val::Scalar(yaml_str(s))
}

fn scalar_bool(b: bool) -> Val {
    Val::Scalar(b.to_string())
}

fn size_val(mib: u64) -> Val {
    if mib == 0 {
        Val::Scalar("0".into())
    } else {
        Val::Scalar(Size { mib }.to_string())
    }
}

fn truthy(v: &str) -> bool {
    matches!(v, "1" | "on" | "yes" | "true")
}

/// `32G`, `512M`, `1T` (or bytes) as MiB.
fn size_mib(s: &str) -> Option<u64> {
    let (num, factor) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1.0 / 1024.0),
        'M' => (&s[..s.len() - 1], 1.0),
        'G' => (&s[..s.len() - 1], 1024.0),
        'T' => (&s[..s.len() - 1], 1024.0 * 1024.0),
        _ => (s, 1.0 / (1024.0 * 1024.0)),
    };
    let v: f64 = num.parse().ok()?;
    Some((v * factor).ceil() as u64)
}

fn props(v: &str) -> Vec<(String, String)> {
    conf::parse_property_string(v)
}

fn prop<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

// ---- one guest -------------------------------------------------------------------------------

/// One guest's node file, before defaults are lifted out of it.
#[derive(Debug, Clone)]
struct Draft {
    name: String,
    vmid: u32,
    pve_node: String,
    kind: PveKind,
    role: String,
    role_guessed: bool,
    address: IpNet,
    gateway: Option<IpAddr>,
    dns: Option<String>,
    search_domain: Option<String>,
    /// Settings, by dotted key (`cores`, `lxc.features.nesting`).
    values: BTreeMap<String, Val>,
    /// Comments on values (`template`: guessed).
    remarks: BTreeMap<String, String>,
    /// What the repository cannot say: kept unmanaged.
    unmanaged: Vec<String>,
    /// What the first plan will change, and why.
    notes: Vec<String>,
    digest: String,
    source: String,
}

/// A valid node name from a guest's name: lowercase, `-` for anything else.
fn node_name(name: &str) -> String {
    let mut out: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').chars().take(63).collect()
}

/// The role a name suggests: control plane names, else a worker.
fn guess_role(dist: Distribution, name: &str) -> String {
    let cp = ["master", "server", "control", "cp"].iter().any(|w| {
        name.split(['-', '_', '.'])
            .any(|part| part == *w || part.starts_with(w) && *w != "cp")
    });
    dist.roles()[if cp { 0 } else { 1 }].to_string()
}

/// LXC options the repository format sets (the rest is kept unmanaged and listed).
const LXC_MANAGED: &[&str] = &[
    "arch",
    "cores",
    "description",
    "features",
    "hostname",
    "memory",
    "nameserver",
    "net0",
    "onboot",
    "ostype",
    "rootfs",
    "searchdomain",
    "swap",
    "tags",
    "unprivileged",
    // Proxmox's own bookkeeping, not settings.
    "digest",
    "parent",
    "snaptime",
    "lock",
];

const QEMU_MANAGED: &[&str] = &[
    "agent",
    "bios",
    "boot",
    "cores",
    "cpu",
    "description",
    "ide2",
    "machine",
    "memory",
    "name",
    "net0",
    "onboot",
    "ostype",
    "scsi0",
    "scsihw",
    "sockets",
    "tags",
    // Generated by Proxmox at creation, or bookkeeping.
    "smbios1",
    "vmgenid",
    "meta",
    "digest",
    "parent",
    "snaptime",
    "lock",
];

fn draft(g: &ImportedGuest, opts: &ImportOptions) -> Result<Draft, String> {
    let o = &g.config.options;
    let raw_name = match g.summary.kind {
        PveKind::Lxc => o.get("hostname").or(g.summary.name.as_ref()),
        PveKind::Qemu => o.get("name").or(g.summary.name.as_ref()),
    }
    .cloned()
    .unwrap_or_else(|| format!("guest-{}", g.summary.vmid));
    let name = node_name(&raw_name);
    if name.is_empty() {
        return Err(format!(
            "its name `{raw_name}` has no letter or digit to make a node name of"
        ));
    }
    let mut values = BTreeMap::new();
    let mut remarks = BTreeMap::new();
    let mut unmanaged = Vec::new();
    let mut notes = Vec::new();
    if name != raw_name {
        notes.push(format!(
            "its name `{raw_name}` is not a valid host name: the node is `{name}`, and the first plan renames it"
        ));
    }
    let kind_word = if g.summary.kind == PveKind::Lxc { "CT" } else { "VM" };
    let (role, role_guessed) = match opts.roles.get(&name) {
        Some(r) => (r.clone(), false),
        None => (guess_role(opts.distribution, &name), true),
    };

    // Network: net0 holds a container's address; a VM's comes from the options or cloud-init.
    let net0 = o.get("net0").map(|v| props(v)).unwrap_or_default();
    let (mut address, mut gateway) = (None, None);
    match g.summary.kind {
        PveKind::Lxc => {
            if net0.is_empty() {
                return Err("it has no net0: driftless gives every node one NIC with a static address".into());
            }
            match prop(&net0, "ip") {
                Some(ip) if ip.contains('/') => {
                    address = Some(
                        ip.parse::<IpNet>()
                            .map_err(|_| format!("net0 ip={ip} is not an address"))?,
                    );
                }
                Some(ip) => {
                    return Err(format!(
                        "net0 has ip={ip}: driftless needs a static address (IP/PREFIX) for every node"
                    ));
                }
                None => return Err("net0 has no ip: driftless needs a static address for every node".into()),
            }
            gateway = prop(&net0, "gw").and_then(|gw| gw.parse().ok());
            if prop(&net0, "name").is_some_and(|n| n != "eth0") {
                notes.push(format!(
                    "net0 is named `{}`: driftless names it eth0, the first plan renames it",
                    prop(&net0, "name").unwrap_or("")
                ));
            }
            let extra: Vec<String> = net0
                .iter()
                .filter(|(k, _)| !["name", "bridge", "gw", "ip", "tag", "type", "hwaddr"].contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !extra.is_empty() {
                notes.push(format!(
                    "net0 also has {}: kept now, but dropped if driftless ever changes net0",
                    extra.join(",")
                ));
            }
        }
        PveKind::Qemu => {
            if let Some(ip) = o.get("ipconfig0").map(|v| props(v)) {
                address = prop(&ip, "ip").and_then(|a| a.parse().ok());
                gateway = prop(&ip, "gw").and_then(|a| a.parse().ok());
            }
            if let Some(given) = opts.addresses.get(&name) {
                address = Some(*given);
            }
            if address.is_none() {
                return Err(format!(
                    "a VM's config does not hold its address: give it with --address {name}=IP/PREFIX"
                ));
            }
        }
    }
    let address = address.expect("set above or returned");
    if let Some(b) = prop(&net0, "bridge") {
        values.insert("bridge".into(), scalar_str(b));
    }
    if let Some(tag) = prop(&net0, "tag") {
        values.insert("vlan".into(), Val::Scalar(tag.to_string()));
    }

    let num = |k: &str| o.get(k).and_then(|v| v.parse::<u64>().ok());
    match num("cores") {
        Some(c) => {
            values.insert("cores".into(), Val::Scalar(c.to_string()));
        }
        None => notes.push(
            "cores is not set (all of the host's CPUs): driftless always sets a count, the first plan sets 1 unless \
             you write one"
                .into(),
        ),
    }
    let memory = o.get("memory").and_then(|m| {
        props(m)
            .into_iter()
            .find(|(k, _)| k.is_empty() || k == "current")
            .and_then(|(_, v)| v.parse::<u64>().ok())
    });
    if let Some(m) = memory {
        values.insert("memory".into(), size_val(m));
    }
    match o.get("onboot") {
        Some(v) => {
            values.insert("onboot".into(), scalar_bool(truthy(v)));
        }
        None => {
            values.insert("onboot".into(), scalar_bool(false));
            notes.push("onboot is not set (off): the first plan writes `onboot: 0`, which changes nothing".into());
        }
    }
    if let Some(d) = o.get("description") {
        let d = d.trim_end();
        if !d.is_empty() {
            values.insert("description".into(), scalar_str(d));
        }
    }
    let tags: Vec<String> = crate::plan::normalize_tags(&g.summary.tags)
        .into_iter()
        .filter(|t| *t != opts.ownership_tag.to_ascii_lowercase())
        .collect();
    if !tags.is_empty() {
        values.insert("tags".into(), Val::List(tags.iter().map(|t| yaml_str(t)).collect()));
    }

    let (managed, kind) = match g.summary.kind {
        PveKind::Lxc => (LXC_MANAGED, crate::model::schema::GuestKind::Lxc),
        PveKind::Qemu => (QEMU_MANAGED, crate::model::schema::GuestKind::Vm),
    };
    match kind {
        crate::model::schema::GuestKind::Lxc => {
            lxc_values(g, opts, &mut values, &mut remarks, &mut unmanaged, &mut notes)
        }
        crate::model::schema::GuestKind::Vm => vm_values(g, &mut values, &mut remarks, &mut notes),
    }
    for (k, v) in o {
        if managed.contains(&k.as_str()) {
            continue;
        }
        if g.summary.kind == PveKind::Qemu && k.starts_with("unused") {
            continue;
        }
        unmanaged.push(format!("{k}: {v}"));
    }
    if let Some(f) = &g.file
        && !f.snapshots.is_empty()
    {
        unmanaged.push(format!("snapshots: {}", f.snapshots.join(", ")));
    }
    if let Some(l) = o.get("lock") {
        notes.push(format!(
            "it is locked ({l}): driftless waits for no lock, a change fails until it is released"
        ));
    }
    if g.summary.status != "running" {
        notes.push(format!(
            "it is {}: driftless keeps nodes running, the first apply starts it",
            g.summary.status
        ));
    }
    let source = format!(
        "{kind_word} {} `{raw_name}` on Proxmox node {} at {}",
        g.summary.vmid, g.summary.node, opts.api
    );
    Ok(Draft {
        name,
        vmid: g.summary.vmid,
        pve_node: g.summary.node.clone(),
        kind: g.summary.kind,
        role,
        role_guessed,
        address,
        gateway,
        dns: o.get("nameserver").cloned(),
        search_domain: o.get("searchdomain").cloned(),
        values,
        remarks,
        unmanaged,
        notes,
        digest: g.config.digest.clone(),
        source,
    })
}

fn lxc_values(
    g: &ImportedGuest,
    opts: &ImportOptions,
    values: &mut BTreeMap<String, Val>,
    remarks: &mut BTreeMap<String, String>,
    unmanaged: &mut Vec<String>,
    notes: &mut Vec<String>,
) {
    let o = &g.config.options;
    if let Some(s) = o.get("swap").and_then(|v| v.parse::<u64>().ok()) {
        values.insert("swap".into(), size_val(s));
    }
    if let Some(rootfs) = o.get("rootfs") {
        let p = props(rootfs);
        let volume = prop(&p, "").or(prop(&p, "volume")).unwrap_or("");
        match volume.split_once(':') {
            Some((storage, _)) if !volume.starts_with('/') => {
                values.insert("storage".into(), scalar_str(storage));
            }
            _ => notes.push(format!("its root filesystem is not a storage volume ({volume})")),
        }
        if let Some(mib) = prop(&p, "size").and_then(size_mib) {
            values.insert("disk".into(), size_val(mib.div_ceil(1024) * 1024));
        }
    }
    for k in ["ostype", "arch"] {
        if let Some(v) = o.get(k) {
            values.insert(format!("lxc.{k}"), scalar_str(v));
        }
    }
    values.insert(
        "lxc.unprivileged".into(),
        scalar_bool(o.get("unprivileged").is_some_and(|v| truthy(v))),
    );
    if let Some(f) = o.get("features") {
        for (k, v) in props(f) {
            match k.as_str() {
                "nesting" | "keyctl" | "fuse" | "mknod" | "force_rw_sys" => {
                    values.insert(format!("lxc.features.{k}"), scalar_bool(truthy(&v)));
                }
                "mount" => {
                    values.insert("lxc.features.mount".into(), scalar_str(&v));
                }
                _ => unmanaged.push(format!("features {k}={v}")),
            }
        }
    }
    let raw = match &g.file {
        Some(f) => f.raw_lxc.clone(),
        None => {
            if !g.config.raw_lxc.is_empty() {
                notes.push("raw lxc keys read through the API (no host shell): check their order".into());
            }
            g.config.raw_lxc.clone()
        }
    };
    let mut kept = Vec::new();
    for (k, v) in raw {
        match check_raw_key(&k) {
            RawKeyVerdict::Allowed | RawKeyVerdict::Deprecated { .. } if k != "lxc.environment.runtime" => {
                kept.push((k, v))
            }
            _ => unmanaged.push(format!("{k}: {v}")),
        }
    }
    if !kept.is_empty() {
        values.insert("lxc.raw".into(), Val::Raw(kept));
    }
    // The template is not in a container's config: only needed to re-create it.
    let template = opts.template.clone().or_else(|| {
        let ostype = o.get("ostype")?;
        opts.templates
            .get(&g.summary.node)?
            .iter()
            .filter(|t| {
                t.rsplit('/')
                    .next()
                    .is_some_and(|f| f.to_ascii_lowercase().starts_with(&format!("{ostype}-")))
            })
            .max()
            .cloned()
    });
    match template {
        Some(t) => {
            if opts.template.is_none() {
                remarks.insert(
                    "template".into(),
                    "guessed from its OS type; only used to re-create it".into(),
                );
            }
            values.insert("template".into(), scalar_str(&t));
        }
        None => {
            let ostype = o.get("ostype").map(String::as_str).unwrap_or("unknown");
            values.insert(
                "template".into(),
                scalar_str(&format!("local:vztmpl/SET-ME-{ostype}.tar.zst")),
            );
            remarks.insert(
                "template".into(),
                "no template on the host matches: set the one it was made from (only used to re-create it)".into(),
            );
            notes.push("no template matches its OS type: set `template:` (driftless doctor flags it)".into());
        }
    }
}

fn vm_values(
    g: &ImportedGuest,
    values: &mut BTreeMap<String, Val>,
    remarks: &mut BTreeMap<String, String>,
    notes: &mut Vec<String>,
) {
    let o = &g.config.options;
    for k in ["cpu", "machine", "bios", "ostype", "scsihw"] {
        match o.get(k) {
            Some(v) => {
                values.insert(format!("vm.{k}"), scalar_str(v));
            }
            None => notes.push(format!(
                "{k} is not set (Proxmox's default): driftless always sets it, see the first plan"
            )),
        }
    }
    if let Some(s) = o.get("sockets").and_then(|v| v.parse::<u64>().ok()) {
        values.insert("vm.sockets".into(), Val::Scalar(s.to_string()));
    }
    match o.get("agent") {
        Some(a) => {
            let enabled = props(a)
                .into_iter()
                .find(|(k, _)| k.is_empty() || k == "enabled")
                .is_some_and(|(_, v)| truthy(&v));
            values.insert("vm.agent".into(), scalar_bool(enabled));
        }
        None => {
            values.insert("vm.agent".into(), scalar_bool(false));
            notes.push("agent is not set (off): the first plan writes `agent: 0`, which changes nothing".into());
        }
    }
    if let Some(net) = o.get("net0") {
        let p = props(net);
        let model = p
            .iter()
            .find(|(k, _)| ["virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"].contains(&k.as_str()))
            .map(|(k, _)| k.clone())
            .or_else(|| prop(&p, "model").map(str::to_string));
        if let Some(m) = model {
            values.insert("vm.net_model".into(), scalar_str(&m));
        }
    }
    if let Some(boot) = o.get("boot")
        && boot != "order=scsi0;ide2"
    {
        notes.push(format!(
            "boot is `{boot}`: driftless sets order=scsi0;ide2, see the first plan"
        ));
    }
    match o.get("scsi0") {
        Some(disk) => {
            let p = props(disk);
            if let Some((storage, _)) = prop(&p, "").or(prop(&p, "file")).and_then(|v| v.split_once(':')) {
                values.insert("storage".into(), scalar_str(storage));
            }
            if let Some(mib) = prop(&p, "size").and_then(size_mib) {
                values.insert("disk".into(), size_val(mib.div_ceil(1024) * 1024));
            }
        }
        None => notes.push("it has no scsi0 disk: driftless describes the first disk as scsi0".into()),
    }
    let iso = o
        .get("ide2")
        .map(|v| props(v))
        .and_then(|p| prop(&p, "").or(prop(&p, "file")).map(str::to_string))
        .filter(|v| v.contains(":iso/"));
    match iso {
        Some(i) => {
            values.insert("image".into(), scalar_str(&i));
        }
        None => {
            values.insert("image".into(), scalar_str("local:iso/SET-ME.iso"));
            remarks.insert(
                "image".into(),
                "no ISO in its CD drive: set the image it boots from (only used to re-create it)".into(),
            );
            notes.push("no ISO in its CD drive: set `image:`".into());
        }
    }
}

// ---- the repository --------------------------------------------------------------------------

/// A tree of settings for YAML output: `lxc.features.nesting` as nested maps.
fn nest(values: &BTreeMap<String, Val>) -> Vec<(String, Node)> {
    let mut root: Vec<(String, Node)> = Vec::new();
    for (key, val) in values {
        let parts: Vec<&str> = split_key(key);
        insert(&mut root, &parts, val.clone());
    }
    root
}

/// `lxc.raw` and `lxc.features.nesting` split at the model's dots (raw keys have their own).
fn split_key(key: &str) -> Vec<&str> {
    key.splitn(3, '.').collect()
}

#[derive(Debug, Clone)]
enum Node {
    Leaf(Val),
    Map(Vec<(String, Node)>),
}

fn insert(map: &mut Vec<(String, Node)>, parts: &[&str], val: Val) {
    let (head, rest) = (parts[0], &parts[1..]);
    if rest.is_empty() {
        map.push((head.to_string(), Node::Leaf(val)));
        return;
    }
    let pos = match map.iter().position(|(k, _)| k == head) {
        Some(p) => p,
        None => {
            map.push((head.to_string(), Node::Map(Vec::new())));
            map.len() - 1
        }
    };
    if let Node::Map(inner) = &mut map[pos].1 {
        insert(inner, rest, val);
    }
}

/// The order keys appear in: identity first, then as the repository format documents them.
const KEY_ORDER: &[&str] = &[
    "cores",
    "memory",
    "swap",
    "disk",
    "storage",
    "bridge",
    "vlan",
    "template",
    "image",
    "onboot",
    "description",
    "tags",
    "lxc",
    "vm",
    "unprivileged",
    "arch",
    "ostype",
    "features",
    "raw",
    "sockets",
    "cpu",
    "machine",
    "bios",
    "scsihw",
    "agent",
    "net_model",
];

fn order(k: &str) -> usize {
    KEY_ORDER.iter().position(|o| *o == k).unwrap_or(KEY_ORDER.len())
}

fn emit(out: &mut String, nodes: &[(String, Node)], indent: usize, remarks: &BTreeMap<String, String>, prefix: &str) {
    let mut sorted: Vec<&(String, Node)> = nodes.iter().collect();
    sorted.sort_by_key(|(k, _)| (order(k), k.clone()));
    let pad = " ".repeat(indent);
    for (k, n) in sorted {
        let full = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let remark = remarks.get(&full).map(|r| format!("  # {r}")).unwrap_or_default();
        match n {
            Node::Leaf(Val::Scalar(s)) => out.push_str(&format!("{pad}{k}: {s}{remark}\n")),
            Node::Leaf(Val::List(items)) => out.push_str(&format!("{pad}{k}: [{}]{remark}\n", items.join(", "))),
            Node::Leaf(Val::Raw(pairs)) => {
                out.push_str(&format!("{pad}{k}:{remark}\n"));
                for (rk, rv) in pairs {
                    out.push_str(&format!("{pad}  - {rk}: {}\n", yaml_raw_value(rv)));
                }
            }
            Node::Map(inner) => {
                out.push_str(&format!("{pad}{k}:{remark}\n"));
                emit(out, inner, indent + 2, remarks, &full);
            }
        }
    }
}

/// A raw value: an empty one as `""` (what Proxmox stores as `lxc.cap.drop:`).
fn yaml_raw_value(v: &str) -> String {
    if v.is_empty() { "\"\"".into() } else { yaml_str(v) }
}

/// The files for the guests, selected already.
pub fn import(guests: &[ImportedGuest], opts: &ImportOptions) -> Result<Imported, ImportError> {
    if guests.is_empty() {
        return Err(ImportError::NothingSelected);
    }
    let mut result = Imported::default();
    let mut drafts: Vec<Draft> = Vec::new();
    let mut sorted: Vec<&ImportedGuest> = guests.iter().collect();
    sorted.sort_by_key(|g| g.summary.vmid);
    for g in sorted {
        match draft(g, opts) {
            Ok(d) => drafts.push(d),
            Err(reason) => result.skipped.push(Skipped {
                vmid: g.summary.vmid,
                name: g.summary.name.clone().unwrap_or_default(),
                reason,
            }),
        }
    }
    // Two guests with one name: the later ones get their vmid appended.
    let mut seen_names = BTreeSet::new();
    for d in &mut drafts {
        if !seen_names.insert(d.name.clone()) {
            d.notes.push(format!(
                "another guest is named `{}` too: this one is `{}-{}`",
                d.name, d.name, d.vmid
            ));
            d.name = format!("{}-{}", d.name, d.vmid);
            seen_names.insert(d.name.clone());
        }
    }

    // One network: the one most guests are in; the others are left for another import.
    let mut nets: BTreeMap<IpNet, usize> = BTreeMap::new();
    for d in &drafts {
        *nets.entry(d.address.trunc()).or_default() += 1;
    }
    let Some(cidr) = nets
        .iter()
        .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
        .map(|(n, _)| *n)
    else {
        let why = result
            .skipped
            .iter()
            .map(|s| format!("{} ({}): {}", s.vmid, s.name, s.reason))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ImportError::NothingImported(why));
    };
    let (kept, other): (Vec<Draft>, Vec<Draft>) = drafts.into_iter().partition(|d| d.address.trunc() == cidr);
    for d in other {
        result.skipped.push(Skipped {
            vmid: d.vmid,
            name: d.name,
            reason: format!(
                "its address {} is outside {cidr}, the network of the others: import it separately",
                d.address
            ),
        });
    }
    let mut drafts = kept;
    let gateway = opts
        .gateway
        .or_else(|| most_common(drafts.iter().filter_map(|d| d.gateway)))
        .or_else(|| cidr.hosts().next())
        .ok_or(ImportError::NoGateway)?;
    let gateway_guessed = opts.gateway.is_none() && drafts.iter().all(|d| d.gateway.is_none());
    for d in &mut drafts {
        if d.gateway.is_some_and(|g| g != gateway) {
            d.notes.push(format!(
                "its gateway is {}: the cluster's is {gateway}, the first plan changes net0",
                d.gateway.expect("checked")
            ));
        }
    }
    let dns = most_common(drafts.iter().filter_map(|d| d.dns.clone()));
    let search = most_common(drafts.iter().filter_map(|d| d.search_domain.clone()));
    for d in &mut drafts {
        if d.kind == PveKind::Lxc && d.dns != dns {
            d.notes.push(format!(
                "its nameserver is {}: the cluster's is {}, the first plan changes it",
                d.dns.as_deref().unwrap_or("unset"),
                dns.as_deref().unwrap_or("unset")
            ));
        }
        if d.kind == PveKind::Lxc && d.search_domain != search {
            d.notes.push(format!(
                "its search domain is {}: the cluster's is {}, the first plan changes it",
                d.search_domain.as_deref().unwrap_or("unset"),
                search.as_deref().unwrap_or("unset")
            ));
        }
    }
    // At least one control plane node: the lowest vmid when no name says so.
    let dist = opts.distribution;
    if !drafts.iter().any(|d| dist.is_control_plane(&d.role))
        && let Some(first) = drafts.iter_mut().find(|d| d.role_guessed)
    {
        first.role = dist.roles()[0].to_string();
    }

    // Lift what every guest of a kind shares into defaults.<kind>.
    let mut defaults: BTreeMap<&str, BTreeMap<String, Val>> = BTreeMap::new();
    for (kind, section) in [(PveKind::Lxc, "lxc"), (PveKind::Qemu, "vm")] {
        let group: Vec<&Draft> = drafts.iter().filter(|d| d.kind == kind).collect();
        if group.len() < 2 {
            continue;
        }
        let shared: BTreeMap<String, Val> = group[0]
            .values
            .iter()
            .filter(|(k, v)| *k != "description" && group.iter().all(|d| d.values.get(*k) == Some(v)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for d in drafts.iter_mut().filter(|d| d.kind == kind) {
            for k in shared.keys() {
                d.values.remove(k);
            }
        }
        if !shared.is_empty() {
            defaults.insert(section, shared);
        }
    }
    let mut shared_remarks = BTreeMap::new();
    for d in &drafts {
        for (k, r) in &d.remarks {
            if defaults.values().any(|m| m.contains_key(k)) {
                shared_remarks.insert(k.clone(), r.clone());
            }
        }
    }

    for d in &drafts {
        result
            .files
            .insert(format!("nodes/{}.yaml", d.name), node_file(d, dist));
        if !d.notes.is_empty() {
            result.notes.insert(d.name.clone(), d.notes.clone());
        }
    }
    result.files.insert(
        "cluster.yaml".into(),
        cluster_file(
            opts,
            &drafts,
            cidr,
            gateway,
            gateway_guessed,
            dns.as_deref(),
            search.as_deref(),
            &defaults,
            &shared_remarks,
        ),
    );
    Ok(result)
}

fn most_common<T: Ord + Clone>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for i in items {
        *counts.entry(i).or_default() += 1;
    }
    counts.into_iter().max_by_key(|(_, c)| *c).map(|(v, _)| v)
}

fn node_file(d: &Draft, dist: Distribution) -> String {
    let mut out = format!(
        "# Imported by `driftless import` from {} (config digest {}).\n\
         # adopt: true lets driftless manage the existing guest; `driftless plan` shows what it would change.\n",
        d.source,
        &d.digest[..d.digest.len().min(12)]
    );
    for n in &d.notes {
        out.push_str(&format!("# Note: {n}.\n"));
    }
    out.push_str(&format!("vmid: {}\n", d.vmid));
    out.push_str(&format!("proxmox_node: {}\n", yaml_str(&d.pve_node)));
    out.push_str(&format!(
        "kind: {}\n",
        if d.kind == PveKind::Lxc { "lxc" } else { "vm" }
    ));
    let role_remark = if d.role_guessed {
        format!(
            "  # guessed from the name: {} roles are {}",
            dist.as_str(),
            dist.roles().join(", ")
        )
    } else {
        String::new()
    };
    out.push_str(&format!("role: {}{role_remark}\n", d.role));
    out.push_str(&format!("address: {}\n", d.address));
    out.push_str("adopt: true\n");
    debug_assert!(NODE_IDENTITY_KEYS.contains(&"adopt"));
    emit(&mut out, &nest(&d.values), 0, &d.remarks, "");
    if !d.unmanaged.is_empty() {
        out.push_str("# Not managed by driftless, kept as they are:\n");
        for u in &d.unmanaged {
            out.push_str(&format!("#   {}\n", u.replace('\n', " ")));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn cluster_file(
    opts: &ImportOptions,
    drafts: &[Draft],
    cidr: IpNet,
    gateway: IpAddr,
    gateway_guessed: bool,
    dns: Option<&str>,
    search: Option<&str>,
    defaults: &BTreeMap<&str, BTreeMap<String, Val>>,
    remarks: &BTreeMap<String, String>,
) -> String {
    let mut out = format!(
        "# Written by `driftless import` from {} ({} guest{}); check it, then `driftless validate`.\n",
        opts.api,
        drafts.len(),
        if drafts.len() == 1 { "" } else { "s" }
    );
    out.push_str(&format!("name: {}\n", yaml_str(&opts.cluster_name)));
    out.push_str(&format!("distribution: {}\n", opts.distribution.as_str()));
    out.push_str(&format!(
        "version: {}  # the release your nodes run: check it\n",
        yaml_str(&opts.version)
    ));
    if let Some(k) = &opts.kubernetes_version {
        out.push_str(&format!("kubernetes_version: {}\n", yaml_str(k)));
    }
    out.push_str("\nproxmox:\n");
    out.push_str(&format!("  api: {}\n", yaml_str(&opts.api)));
    out.push_str("  token: {secret: pve-token}\n");
    match &opts.fingerprint {
        Some(fp) => out.push_str(&format!("  fingerprint: {}\n", yaml_str(fp))),
        None => out.push_str("  # fingerprint: \"AB:CD:...\"   # `pvenode cert info` on the host\n"),
    }
    let nodes: BTreeSet<&str> = drafts.iter().map(|d| d.pve_node.as_str()).collect();
    match &opts.ssh {
        Some((target, port)) => {
            out.push_str("  hosts:\n");
            for n in &nodes {
                let port = port.map(|p| format!(", port: {p}")).unwrap_or_default();
                out.push_str(&format!(
                    "    {n}: {{ssh: {}{port}, known_hosts: {n}.known_hosts}}\n",
                    yaml_str(target)
                ));
            }
        }
        None => {
            out.push_str("  # The host shell (raw lxc keys, root-only features): see docs/setup.md.\n");
            out.push_str("  # hosts:\n");
            for n in &nodes {
                out.push_str(&format!(
                    "  #   {n}: {{ssh: root@HOST, known_hosts: {n}.known_hosts}}\n"
                ));
            }
        }
    }
    out.push_str("\nnetwork:\n");
    out.push_str(&format!("  cidr: {cidr}\n"));
    let remark = if gateway_guessed {
        "  # guessed: no guest names its gateway"
    } else {
        ""
    };
    out.push_str(&format!("  gateway: {gateway}{remark}\n"));
    if let Some(d) = dns {
        let list: Vec<String> = d.split_whitespace().map(yaml_str).collect();
        out.push_str(&format!("  dns: [{}]\n", list.join(", ")));
    }
    if let Some(s) = search {
        out.push_str(&format!("  search_domain: {}\n", yaml_str(s)));
    }
    if !defaults.is_empty() {
        out.push_str("\n# What every imported guest of a kind shares.\ndefaults:\n");
        for (section, values) in defaults {
            out.push_str(&format!("  {section}:\n"));
            emit(&mut out, &nest(values), 4, remarks, "");
        }
    }
    out.push_str(&format!(
        "\nreconcile:\n  ownership_tag: {}\n",
        yaml_str(&opts.ownership_tag)
    ));
    out.push_str("\nsecrets:\n  pve-token: \"Proxmox API token: USER@REALM!TOKENID=SECRET\"\n");
    if opts.distribution == Distribution::Talos {
        out.push_str("  talos-secrets: \"The Talos secrets bundle (talosctl gen secrets)\"\n");
        out.push_str("\ntalos:\n  secrets: {secret: talos-secrets}\n");
    }
    out
}

#[cfg(test)]
mod tests;
