//! `driftless doctor`: a read-only preflight of a repository against the real systems, in
//! the spirit of `flux check --pre`. One line per check, ok / warning / error, and what to do.
//!
//! This module is pure: [`checks`] turns what [`observe`] (the effectful half, through the
//! ports) saw into [`Check`]s. What a plan needs from the API token is computed here too
//! ([`required_privileges`]), from pve-container's and qemu-server's permission checks and
//! the `permissions` of the API schema (see `docs/setup.md` for the role they add up to).

pub mod observe;

use crate::model::Desired;
use crate::model::schema::GuestKind;
use crate::plan::{Action, Plan, Via};
use crate::ports::{
    CommandOutput, Permissions, ProxmoxError, PveKind, PveNode, PveVersion, ShellError, StorageStatus, StorageVolume,
    TalosError, TalosNodeState,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Not checked (nothing to check, or an earlier check failed): never a failure.
    Skip,
    /// Works now, but deserves attention; does not fail `doctor`.
    Warning,
    /// Will fail: `doctor` exits 1.
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warning => "warning",
            Status::Error => "error",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked: `proxmox api`, `bridge pve/vmbr0`, `secret pve-token`.
    pub name: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (warnings and errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

impl Check {
    fn new(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status,
            detail: detail.into(),
            advice: None,
        }
    }

    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Ok, detail)
    }

    fn skip(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Skip, detail)
    }

    fn warning(name: impl Into<String>, detail: impl Into<String>, advice: impl Into<String>) -> Check {
        Check::new(name, Status::Warning, detail).advise(advice)
    }

    fn error(name: impl Into<String>, detail: impl Into<String>, advice: impl Into<String>) -> Check {
        Check::new(name, Status::Error, detail).advise(advice)
    }

    fn advise(mut self, advice: impl Into<String>) -> Check {
        self.advice = Some(advice.into());
        self
    }
}

/// Every check, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// No error (warnings allowed).
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Error)
    }

    pub fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// One line per check, the advice indented below it, and a summary.
    pub fn text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!("{:<7}  {:<width$}  {}\n", c.status.as_str(), c.name, c.detail));
            if let Some(advice) = &c.advice {
                for (i, line) in advice.lines().enumerate() {
                    let lead = if i == 0 { "fix:" } else { "" };
                    out.push_str(&format!("{:<7}  {:<width$}  {lead:<4} {line}\n", "", ""));
                }
            }
        }
        let n = |s: Status| self.count(s);
        let plural = |k: usize, w: &str| format!("{k} {w}{}", if k == 1 { "" } else { "s" });
        out.push_str(&format!(
            "\n{} ok, {}, {}, {} skipped: {}\n",
            n(Status::Ok),
            plural(n(Status::Warning), "warning"),
            plural(n(Status::Error), "error"),
            n(Status::Skip),
            if self.ok() {
                "ready"
            } else {
                "not ready: fix the errors above, then run `driftless doctor` again"
            }
        ));
        out
    }
}

// ---- privileges ------------------------------------------------------------------------------

/// A privilege the plan needs on an ACL path (any one of `any_of`), and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Need {
    pub path: String,
    pub any_of: Vec<String>,
    pub why: String,
}

fn need(path: impl Into<String>, privs: &[&str], why: impl Into<String>) -> Need {
    Need {
        path: path.into(),
        any_of: privs.iter().map(|p| p.to_string()).collect(),
        why: why.into(),
    }
}

fn numbered(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The bridge and VLAN tag of a NIC's property string.
fn nic_bridge(value: &str) -> (Option<&str>, Option<&str>) {
    let mut bridge = None;
    let mut tag = None;
    for part in value.split(',') {
        if let Some(b) = part.strip_prefix("bridge=") {
            bridge = Some(b);
        } else if let Some(t) = part.strip_prefix("tag=") {
            tag = Some(t);
        }
    }
    (bridge, tag)
}

/// `SDN.Use` on the bridge (or the VLAN below it): pve-guest-common `check_vnet_access`.
fn bridge_need(value: &str, why: &str) -> Option<Need> {
    let (bridge, tag) = nic_bridge(value);
    let path = match tag {
        Some(t) => format!("/sdn/zones/localnetwork/{}/{t}", bridge?),
        None => format!("/sdn/zones/localnetwork/{}", bridge?),
    };
    Some(need(path, &["SDN.Use"], why))
}

/// `STORAGE:SIZE` (a disk to allocate): the storage.
fn new_disk_storage(value: &str) -> Option<&str> {
    let volume = value.split(',').next()?;
    let (storage, size) = volume.split_once(':')?;
    let is_size = !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    is_size.then_some(storage)
}

/// What one LXC option needs (pve-container `check_ct_modify_config_perm`).
fn lxc_option_needs(vmid: u32, key: &str, value: Option<&str>, why: &str, out: &mut Vec<Need>) {
    let vm = format!("/vms/{vmid}");
    match key {
        "cores" | "cpuunits" | "cpulimit" => out.push(need(vm, &["VM.Config.CPU"], why)),
        "memory" | "swap" => out.push(need(vm, &["VM.Config.Memory"], why)),
        "nameserver" | "searchdomain" | "hostname" => out.push(need(vm, &["VM.Config.Network"], why)),
        // Only `nesting` reaches the API (the rest goes through the host shell as root).
        "features" => out.push(need(vm, &["VM.Allocate"], why)),
        k if k == "rootfs" || numbered(k, "mp") => {
            out.push(need(vm, &["VM.Config.Disk"], why));
            if let Some(sid) = value.and_then(new_disk_storage) {
                out.push(need(format!("/storage/{sid}"), &["Datastore.AllocateSpace"], why));
            }
        }
        k if numbered(k, "net") => {
            out.push(need(vm, &["VM.Config.Network"], why));
            if let Some(n) = value.and_then(|v| bridge_need(v, why)) {
                out.push(n);
            }
        }
        _ => out.push(need(vm, &["VM.Config.Options"], why)),
    }
}

/// What one QEMU option needs (qemu-server `check_vm_modify_config_perm`, storage and
/// bridge access); `update` is a config change (drives need `VM.Config.Disk`/`CDROM`).
fn qemu_option_needs(vmid: u32, key: &str, value: Option<&str>, update: bool, why: &str, out: &mut Vec<Need>) {
    let vm = format!("/vms/{vmid}");
    let is_drive =
        ["ide", "sata", "scsi", "virtio"].iter().any(|p| numbered(key, p)) || key == "efidisk0" || key == "tpmstate0";
    if is_drive {
        let cdrom = value.is_some_and(|v| v.split(',').any(|p| p == "media=cdrom"));
        if update {
            out.push(need(
                vm.clone(),
                &[if cdrom { "VM.Config.CDROM" } else { "VM.Config.Disk" }],
                why,
            ));
        }
        let volume = value.and_then(|v| v.split(',').next()).unwrap_or("");
        if let (Some(sid), false) = (new_disk_storage(volume), cdrom) {
            out.push(need(format!("/storage/{sid}"), &["Datastore.AllocateSpace"], why));
        } else if let Some((sid, _)) = volume.split_once(':') {
            out.push(need(
                format!("/storage/{sid}"),
                &["Datastore.AllocateSpace", "Datastore.Audit"],
                why,
            ));
        }
        return;
    }
    let privilege = match key {
        "cores" | "cpu" | "cpulimit" | "cpuunits" | "numa" | "sockets" | "vcpus" => "VM.Config.CPU",
        "memory" | "balloon" | "shares" => "VM.Config.Memory",
        "acpi" | "hotplug" | "kvm" | "machine" | "scsihw" | "smbios1" | "tablet" | "vga" | "watchdog" => {
            "VM.Config.HWType"
        }
        "boot" | "bootdisk" => "VM.Config.Disk",
        k if numbered(k, "net") => {
            if let Some(n) = value.and_then(|v| bridge_need(v, why)) {
                out.push(n);
            }
            "VM.Config.Network"
        }
        _ => "VM.Config.Options",
    };
    out.push(need(vm, &[privilege], why));
}

/// Create parameters that are not config options.
const CREATE_ONLY_PARAMS: &[&str] = &[
    "vmid",
    "ostemplate",
    "storage",
    "unprivileged",
    "start",
    "password",
    "ssh-public-keys",
    "pool",
    "unique",
    "force",
];

/// Every privilege a plan's steps need, on which path, and why; plus reading each node's
/// guest, which every plan does. Root-only changes (raw `lxc.*` keys, features other than
/// `nesting`) need no privilege: they need the host shell ([`root_only_changes`]).
pub fn required_privileges(desired: &Desired, plan: &Plan) -> Vec<Need> {
    let mut out = Vec::new();
    for node in &desired.nodes {
        out.push(need(
            format!("/vms/{}", node.vmid),
            &["VM.Audit"],
            format!("read {} (vmid {})", node.name, node.vmid),
        ));
    }
    for step in &plan.steps {
        let vmid = step.vmid;
        let vm = format!("/vms/{vmid}");
        match &step.action {
            Action::Create { params, .. } => {
                let why = format!("create {}", step.node);
                out.push(need(vm.clone(), &["VM.Allocate"], &why));
                for (key, value) in params {
                    if CREATE_ONLY_PARAMS.contains(&key.as_str()) {
                        continue;
                    }
                    match step.kind {
                        PveKind::Lxc => lxc_option_needs(vmid, key, Some(value), &why, &mut out),
                        PveKind::Qemu => qemu_option_needs(vmid, key, Some(value), false, &why, &mut out),
                    }
                }
                if step.kind == PveKind::Lxc {
                    if let Some((sid, _)) = params.get("ostemplate").and_then(|t| t.split_once(':')) {
                        out.push(need(
                            format!("/storage/{sid}"),
                            &["Datastore.AllocateSpace", "Datastore.Audit"],
                            format!("{why} from its template"),
                        ));
                    }
                    if params.get("unprivileged").is_some_and(|u| u == "0") {
                        out.push(need("/", &["Sys.Modify"], format!("{why} (a privileged container)")));
                    }
                }
                out.push(need(vm, &["VM.PowerMgmt"], format!("start {}", step.node)));
            }
            Action::Update { changes, .. } => {
                for c in changes.iter().filter(|c| c.via == Via::Api) {
                    let why = format!("change {} of {}", c.key, step.node);
                    match step.kind {
                        PveKind::Lxc => lxc_option_needs(vmid, &c.key, c.new.as_deref(), &why, &mut out),
                        PveKind::Qemu => qemu_option_needs(vmid, &c.key, c.new.as_deref(), true, &why, &mut out),
                    }
                }
            }
            Action::Restart { .. } => out.push(need(vm, &["VM.PowerMgmt"], format!("restart {}", step.node))),
            Action::Start => out.push(need(vm, &["VM.PowerMgmt"], format!("start {}", step.node))),
            Action::Delete { running } => {
                out.push(need(vm.clone(), &["VM.Allocate"], format!("delete {}", step.node)));
                if *running {
                    out.push(need(vm, &["VM.PowerMgmt"], format!("stop {}", step.node)));
                }
            }
            _ => {}
        }
    }
    out
}

/// What later changes of the nodes' guests would need beyond this plan (a changed size, a
/// restart): worth a warning when missing, not an error.
pub fn later_privileges(desired: &Desired) -> Vec<Need> {
    let mut out = Vec::new();
    for node in &desired.nodes {
        let why = format!("later changes of {}", node.name);
        out.push(need(
            format!("/vms/{}", node.vmid),
            &[
                "VM.Config.CPU",
                "VM.Config.Memory",
                "VM.Config.Network",
                "VM.Config.Options",
                "VM.PowerMgmt",
            ],
            why,
        ));
    }
    out
}

/// The plan's changes only `root@pam` may make: through the host shell.
pub fn root_only_changes(plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    for step in &plan.steps {
        match &step.action {
            Action::Create {
                root_options, raw_lxc, ..
            } => {
                for (k, _) in root_options {
                    out.push(format!("{} of {}", k, step.node));
                }
                if !raw_lxc.is_empty() {
                    out.push(format!("raw lxc keys of {}", step.node));
                }
            }
            Action::Update { changes, .. } => {
                for c in changes
                    .iter()
                    .filter(|c| matches!(c.via, Via::RootShell | Via::ConfFile))
                {
                    out.push(format!("{} of {}", c.key, step.node));
                }
            }
            _ => {}
        }
    }
    out
}

/// Privileges that are write access: a read-only token must have none of them.
pub const WRITE_PRIVILEGES: &[&str] = &[
    "VM.Allocate",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.PowerMgmt",
    "VM.Migrate",
    "VM.Snapshot",
    "VM.Backup",
    "VM.Console",
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Sys.Modify",
    "Sys.PowerMgmt",
    "Sys.Console",
    "SDN.Use",
    "SDN.Allocate",
    "Permissions.Modify",
    "User.Modify",
];

/// The missing ones among `needs`, given the privileges effective on each path; needs of
/// one path and privilege set are merged, their reasons listed once each.
fn missing(needs: &[Need], granted: &BTreeMap<String, BTreeMap<String, bool>>) -> Vec<(String, String, Vec<String>)> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for n in needs {
        let have = granted.get(&n.path);
        if have.is_some_and(|privs| n.any_of.iter().any(|p| privs.contains_key(p))) {
            continue;
        }
        let whys = out.entry((n.path.clone(), n.any_of.join("|"))).or_default();
        if !whys.contains(&n.why) {
            whys.push(n.why.clone());
        }
    }
    out.into_iter()
        .map(|((path, privs), whys)| (path, privs, whys))
        .collect()
}

fn list_reasons(whys: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = whys.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if whys.len() > SHOWN {
        text.push_str(&format!(" and {} more", whys.len() - SHOWN));
    }
    text
}

// ---- what observe saw ------------------------------------------------------------------------

/// How the API's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    Fingerprint(String),
    CaFile(String),
    System,
    Insecure,
}

/// The API token of this run: its id, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSeen {
    pub id: Result<String, String>,
    /// Where it came from: `--proxmox-token-file FILE`, `secret pve-token`.
    pub source: String,
}

/// The Proxmox API as seen through the run's token.
#[derive(Debug, Clone)]
pub struct ApiSeen {
    pub endpoint: String,
    pub trust: Trust,
    pub version: Result<PveVersion, ProxmoxError>,
    pub nodes: Option<Result<Vec<PveNode>, ProxmoxError>>,
    /// The plan of the guests, when Proxmox could be read (or why not).
    pub plan: Option<Result<Plan, ProxmoxError>>,
    /// The guests that exist, by vmid, with their power state.
    pub guests: BTreeMap<u32, String>,
    /// Privileges effective on each path asked about.
    pub permissions: BTreeMap<String, BTreeMap<String, bool>>,
    pub permissions_error: Option<ProxmoxError>,
    /// Per Proxmox node: its interfaces, its storages, and the content of the storages
    /// holding templates and ISOs the nodes name.
    pub hosts: BTreeMap<String, HostSeen>,
}

/// One Proxmox node's network and storage.
#[derive(Debug, Clone, Default)]
pub struct HostSeen {
    pub network: Option<Result<Vec<crate::ports::NetworkInterface>, ProxmoxError>>,
    pub storages: Option<Result<Vec<StorageStatus>, ProxmoxError>>,
    /// Storage id -> its volumes.
    pub content: BTreeMap<String, Result<Vec<StorageVolume>, ProxmoxError>>,
}

/// The read-only token for pull request plans.
#[derive(Debug, Clone)]
pub struct PlanTokenSeen {
    pub source: String,
    pub id: Result<String, String>,
    pub permissions: Result<Permissions, ProxmoxError>,
}

/// The Proxmox host shell of one node: where it goes, and what `pct list` did.
#[derive(Debug, Clone)]
pub struct HostShellSeen {
    pub pve_node: String,
    /// `root@192.168.2.10:22, host key from FILE`, or `local`.
    pub target: String,
    pub known_hosts: Option<String>,
    pub pct: Result<CommandOutput, ShellError>,
}

/// A VM node's own way in.
#[derive(Debug, Clone)]
pub enum NodeReach {
    /// The guest does not exist yet: nothing to reach.
    NotCreated,
    Stopped,
    Ssh(Result<(), ShellError>),
    Talos(Result<TalosNodeState, TalosError>),
    /// The way in could not even be set up (no talosconfig or bundle, no SSH target).
    Unavailable(String),
}

/// One declared secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSeen {
    pub name: String,
    /// What cluster.yaml says it is for.
    pub purpose: String,
    pub source: SecretSource,
    /// Not used by this run: an override replaces it (`--proxmox-token-file`).
    pub overridden_by: Option<String>,
    /// What the value is expected to be, when driftless can tell: the API token, the Talos bundle.
    pub shape_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `DRIFTLESS_SECRET_<NAME>`.
    Env(String),
    Missing {
        path: String,
    },
    Unreadable {
        path: String,
        error: String,
    },
    File {
        path: String,
        mode: u32,
        empty: bool,
    },
}

/// The daemon's repository: fetched with its credentials, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositorySeen {
    pub url: String,
    pub branch: String,
    /// The branch's commit.
    pub result: Result<String, String>,
}

/// Everything [`observe`] saw.
#[derive(Debug, Clone)]
pub struct Observations {
    pub token: TokenSeen,
    /// `None` when there was no client to ask with (no usable token).
    pub api: Option<ApiSeen>,
    pub plan_token: Option<PlanTokenSeen>,
    /// Whether the daemon plans pull requests (`--plan-refs`).
    pub plans_pull_requests: bool,
    /// `None`: no host shell configured.
    pub host_shells: Option<Vec<HostShellSeen>>,
    /// VM nodes, by name.
    pub vm_nodes: BTreeMap<String, NodeReach>,
    pub secrets_dir: String,
    /// The mode of the secrets directory, when it exists.
    pub secrets_dir_mode: Option<u32>,
    pub secrets: Vec<SecretSeen>,
    pub repository: Option<RepositorySeen>,
}

// ---- the checks ------------------------------------------------------------------------------

const GUIDE: &str = "docs/setup.md";

/// Every check, from what was seen.
pub fn checks(desired: &Desired, seen: &Observations) -> Report {
    let mut out = Vec::new();
    out.push(token_check(&seen.token));
    match &seen.api {
        None => out.push(Check::skip(
            "proxmox api",
            "no usable API token: nothing to ask Proxmox with",
        )),
        Some(api) => {
            let reachable = api.version.is_ok();
            out.push(api_check(api));
            if reachable {
                out.extend(privilege_checks(desired, api, seen.host_shells.is_some()));
                out.extend(node_checks(desired, api));
            }
        }
    }
    out.push(plan_token_check(desired, seen));
    out.extend(host_shell_checks(desired, seen));
    out.extend(vm_node_checks(desired, seen));
    out.extend(secret_checks(seen));
    out.push(repository_check(seen.repository.as_ref()));
    Report { checks: out }
}

fn token_check(t: &TokenSeen) -> Check {
    match &t.id {
        Ok(id) => Check::ok("api token", format!("{id} ({})", t.source)),
        Err(why) => Check::error(
            "api token",
            why.clone(),
            format!(
                "create a token on the host (`pveum user token add driftless@pve apply --privsep 0`, {GUIDE}) and put \
                 `USER@REALM!TOKENID=SECRET` in the secret cluster.yaml's proxmox.token names (mode 0600)"
            ),
        ),
    }
}

fn api_check(api: &ApiSeen) -> Check {
    let name = "proxmox api";
    match &api.version {
        Ok(v) => {
            let version = format!("Proxmox VE {} at {}", v.version, api.endpoint);
            match &api.trust {
                Trust::Fingerprint(_) => {
                    Check::ok(name, format!("{version}, certificate matches the pinned fingerprint"))
                }
                Trust::CaFile(f) => Check::ok(name, format!("{version}, certificate verified with {f}")),
                Trust::System => Check::ok(name, format!("{version}, certificate verified by the system's CAs")),
                Trust::Insecure => Check::warning(
                    name,
                    format!("{version}, certificate NOT verified (--proxmox-insecure)"),
                    "anyone on the path can read the token: pin the certificate instead, proxmox.fingerprint in \
                     cluster.yaml with the SHA-256 `pvenode cert info` prints on the host",
                ),
            }
        }
        Err(ProxmoxError::Transport { endpoint, message }) if message.contains("certificate") => {
            let advice = match &api.trust {
                Trust::Fingerprint(_) => {
                    "read the certificate's SHA-256 fingerprint on the host's console: `pvenode cert info` (the \
                     pveproxy-ssl.pem entry if there is one, else pve-ssl.pem) and set proxmox.fingerprint (or \
                     --proxmox-fingerprint) to it; a renewed certificate changes it"
                }
                Trust::CaFile(_) => {
                    "the CA file does not sign this certificate: use /etc/pve/pve-root-ca.pem from the host, or pin the \
                     fingerprint (`pvenode cert info`)"
                }
                _ => {
                    "Proxmox uses a self-signed certificate: pin it with proxmox.fingerprint (`pvenode cert info` on \
                     the host prints the SHA-256) or give proxmox.ca_file (/etc/pve/pve-root-ca.pem)"
                }
            };
            let detail = match &api.trust {
                Trust::Fingerprint(fp) => {
                    format!("the certificate of {endpoint} does not match the pinned fingerprint {fp}")
                }
                _ => format!("the certificate of {endpoint} is not trusted"),
            };
            Check::error(name, detail, advice)
        }
        Err(ProxmoxError::Transport { endpoint, message }) => Check::error(
            name,
            format!("cannot reach {endpoint}: {message}"),
            "check proxmox.api in cluster.yaml (or --proxmox-url): https://HOST:8006; on the host, \
             `systemctl status pveproxy`; and that port 8006 is open from here",
        ),
        Err(ProxmoxError::Api {
            status: 401, message, ..
        }) => Check::error(
            name,
            format!("the token was refused: {message}"),
            "the token does not exist or its secret is wrong: `pveum user token list driftless@pve` on the host; a \
             new token's secret is shown once, store all of USER@REALM!TOKENID=SECRET",
        ),
        Err(e) => Check::error(
            name,
            e.to_string(),
            "see the message; `driftless doctor` again once it is fixed",
        ),
    }
}

fn privilege_checks(desired: &Desired, api: &ApiSeen, host_shell: bool) -> Vec<Check> {
    let name = "privileges";
    let mut out = Vec::new();
    let plan = match &api.plan {
        Some(Ok(plan)) => plan,
        Some(Err(e)) => {
            out.push(Check::error(
                name,
                format!("cannot read the guests to plan: {e}"),
                format!("the token needs VM.Audit on /vms (or on each node's /vms/VMID) to see the guests ({GUIDE})"),
            ));
            return out;
        }
        None => {
            out.push(Check::skip(name, "the guests were not read"));
            return out;
        }
    };
    if let Some(e) = &api.permissions_error {
        out.push(Check::error(
            name,
            format!("cannot read the token's permissions: {e}"),
            "GET /access/permissions answers every token about itself: check the token and the API",
        ));
        return out;
    }
    let needs = required_privileges(desired, plan);
    let lacking = missing(&needs, &api.permissions);
    let paths: BTreeSet<&str> = needs.iter().map(|n| n.path.as_str()).collect();
    if lacking.is_empty() {
        let steps = plan.steps.iter().filter(|s| !s.action.is_cluster()).count();
        let detail = if steps == 0 {
            format!(
                "nothing to change; reading the {} guest{} is granted",
                desired.nodes.len(),
                if desired.nodes.len() == 1 { "" } else { "s" }
            )
        } else {
            format!(
                "everything the plan's {steps} guest step{} need{} on {} path{} is granted",
                if steps == 1 { "" } else { "s" },
                if steps == 1 { "s" } else { "" },
                paths.len(),
                if paths.len() == 1 { "" } else { "s" }
            )
        };
        out.push(Check::ok(name, detail));
    } else {
        let detail = lacking
            .iter()
            .map(|(path, privs, whys)| format!("{privs} on {path} ({})", list_reasons(whys)))
            .collect::<Vec<_>>()
            .join("; ");
        let first = &lacking[0];
        out.push(Check::error(
            name,
            format!("the token lacks {detail}"),
            format!(
                "grant them to the token's user (and to the token itself if it is privilege-separated), e.g. \
                 `pveum acl modify {} --users driftless@pve --roles DriftlessApply`; {GUIDE} lists the role's \
                 privileges and paths",
                first.0
            ),
        ));
    }
    let later = missing(&later_privileges(desired), &api.permissions);
    if !later.is_empty() && lacking.is_empty() {
        let detail = later
            .iter()
            .map(|(path, privs, _)| format!("{} on {path}", privs.replace('|', " or ")))
            .collect::<Vec<_>>()
            .join("; ");
        out.push(Check::warning(
            "privileges later",
            format!("this plan works, but a later change would need {detail}"),
            format!("give the token's user the DriftlessApply role on /vms ({GUIDE})"),
        ));
    }
    let root = root_only_changes(plan);
    if !root.is_empty() {
        let detail = format!("{} only root@pam may make", list_reasons(&root));
        if host_shell {
            out.push(Check::ok(
                "root-only changes",
                format!("{detail}: through the host shell"),
            ));
        } else {
            out.push(Check::error(
                "root-only changes",
                format!("{detail}, and no host shell is configured"),
                format!(
                    "an API token is never root@pam: list the host under proxmox.hosts in cluster.yaml with an SSH \
                     key ({GUIDE}, \"The host shell\"), or run driftless on the host with --host-shell local"
                ),
            ));
        }
    }
    out
}

/// What the nodes of one Proxmox node need there.
#[derive(Default)]
struct HostNeeds<'a> {
    /// Storage -> (guest, GiB, whether it is to be created, container?).
    disks: BTreeMap<String, Vec<(&'a str, u64, bool, bool)>>,
    bridges: BTreeMap<String, Vec<&'a str>>,
    /// Template or ISO volume -> (guest, to be created).
    volumes: BTreeMap<String, Vec<(&'a str, bool)>>,
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 10.0 || g.fract() < 0.05 {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.1} GiB")
    }
}

fn node_checks(desired: &Desired, api: &ApiSeen) -> Vec<Check> {
    let mut out = Vec::new();
    let mut by_host: BTreeMap<&str, HostNeeds> = BTreeMap::new();
    for node in &desired.nodes {
        let s = &node.settings;
        let create = !api.guests.contains_key(&node.vmid);
        let h = by_host.entry(node.proxmox_node.as_str()).or_default();
        let storage = s.storage.clone().unwrap_or_else(|| "local-lvm".into());
        let disk = s.disk.map_or(8, |d| d.gib());
        h.disks
            .entry(storage)
            .or_default()
            .push((&node.name, disk, create, node.kind == GuestKind::Lxc));
        h.bridges
            .entry(s.bridge.clone().unwrap_or_else(|| "vmbr0".into()))
            .or_default()
            .push(&node.name);
        let volume = match node.kind {
            GuestKind::Lxc => s.template.clone(),
            GuestKind::Vm => s.image.clone(),
        };
        if let Some(v) = volume {
            h.volumes.entry(v).or_default().push((&node.name, create));
        }
    }
    let known: Option<&Vec<PveNode>> = match &api.nodes {
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            out.push(Check::error(
                "proxmox nodes",
                format!("cannot list the cluster's nodes: {e}"),
                "GET /nodes needs no privilege: check the API",
            ));
            None
        }
        None => None,
    };
    for (pve, needs) in &by_host {
        let users: Vec<&str> = desired
            .nodes
            .iter()
            .filter(|n| n.proxmox_node == *pve)
            .map(|n| n.file.as_str())
            .collect();
        let name = format!("proxmox node {pve}");
        let online = match known {
            None => {
                out.push(Check::skip(&name, "the cluster's nodes were not listed"));
                false
            }
            Some(list) => match list.iter().find(|n| n.node == *pve) {
                None => {
                    let names: Vec<&str> = list.iter().map(|n| n.node.as_str()).collect();
                    out.push(Check::error(
                        &name,
                        format!(
                            "not a node of this Proxmox cluster (nodes: {}); named by {}",
                            names.join(", "),
                            users.join(", ")
                        ),
                        "set proxmox_node to the node's name as the web UI and `pvecm nodes` show it",
                    ));
                    false
                }
                Some(n) if n.status != "online" => {
                    out.push(Check::error(
                        &name,
                        format!("{}: guests on it can be neither read nor changed", n.status),
                        "start the node, or check the cluster with `pvecm status` on another node",
                    ));
                    false
                }
                Some(_) => {
                    out.push(Check::ok(&name, "online"));
                    true
                }
            },
        };
        let host = api.hosts.get(*pve);
        let skip_detail = if online { "not read" } else { "the node is not usable" };
        for (storage, disks) in &needs.disks {
            let name = format!("storage {pve}/{storage}");
            match host.and_then(|h| h.storages.as_ref()) {
                Some(Ok(list)) if online => out.push(storage_check(&name, storage, list, disks)),
                Some(Err(e)) if online => out.push(Check::error(
                    &name,
                    format!("cannot list {pve}'s storages: {e}"),
                    format!("the token needs Datastore.Audit or Datastore.AllocateSpace on /storage/{storage}"),
                )),
                _ => out.push(Check::skip(&name, skip_detail)),
            }
        }
        for (bridge, guests) in &needs.bridges {
            let name = format!("bridge {pve}/{bridge}");
            match host.and_then(|h| h.network.as_ref()) {
                Some(Ok(ifaces)) if online => out.push(bridge_check(&name, bridge, ifaces, guests)),
                Some(Err(e)) if online => out.push(Check::error(
                    &name,
                    format!("cannot read {pve}'s network: {e}"),
                    "GET /nodes/{node}/network needs no privilege: check the API",
                )),
                _ => out.push(Check::skip(&name, skip_detail)),
            }
        }
        for (volume, guests) in &needs.volumes {
            let name = format!("image {pve}/{volume}");
            let storage = volume.split_once(':').map(|(s, _)| s).unwrap_or("");
            match host.and_then(|h| h.content.get(storage)) {
                Some(content) if online => out.push(volume_check(&name, volume, content, guests)),
                _ => out.push(Check::skip(&name, skip_detail)),
            }
        }
    }
    out
}

fn storage_check(name: &str, storage: &str, list: &[StorageStatus], disks: &[(&str, u64, bool, bool)]) -> Check {
    let Some(st) = list.iter().find(|s| s.storage == storage) else {
        let names: Vec<&str> = list.iter().map(|s| s.storage.as_str()).collect();
        return Check::error(
            name,
            format!(
                "no storage `{storage}` here (visible: {})",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            ),
            "set `storage:` to one of the storages above, or grant the token Datastore.Audit on \
             /storage/STORAGE if it exists but is hidden",
        );
    };
    if !st.enabled || !st.active {
        return Check::error(
            name,
            format!(
                "{} ({}) is {}",
                storage,
                st.kind,
                if st.enabled { "not active" } else { "disabled" }
            ),
            "enable it in Datacenter > Storage, and check `pvesm status` on the host",
        );
    }
    let containers = disks.iter().any(|d| d.3);
    let vms = disks.iter().any(|d| !d.3);
    for (want, who) in [("rootdir", containers), ("images", vms)] {
        if who && !st.holds(want) {
            return Check::error(
                name,
                format!(
                    "{storage} does not hold {} (content: {})",
                    if want == "rootdir" {
                        "container disks (rootdir)"
                    } else {
                        "VM disks (images)"
                    },
                    st.content.join(",")
                ),
                format!(
                    "set `storage:` to a storage with `{want}` content (local-lvm on a default install), or add `{want}` to its content in Datacenter > Storage"
                ),
            );
        }
    }
    let new: Vec<&(&str, u64, bool, bool)> = disks.iter().filter(|d| d.2).collect();
    let wanted: u64 = new.iter().map(|d| d.1 << 30).sum();
    let free = st.avail;
    let space = match free {
        Some(f) => format!("{} free", gib(f)),
        None => "free space unknown".into(),
    };
    if new.is_empty() {
        return Check::ok(name, format!("{} ({space}); every disk exists", st.kind));
    }
    let asked = format!(
        "{} new disk{} need{} {}",
        new.len(),
        if new.len() == 1 { "" } else { "s" },
        if new.len() == 1 { "s" } else { "" },
        gib(wanted)
    );
    match free {
        Some(f) if f < wanted => Check::error(
            name,
            format!("{} ({space}); {asked}", st.kind),
            "free space on the storage, or make the disks smaller (`disk:`), or use another storage",
        ),
        _ => Check::ok(name, format!("{} ({space}); {asked}", st.kind)),
    }
}

fn bridge_check(name: &str, bridge: &str, ifaces: &[crate::ports::NetworkInterface], guests: &[&str]) -> Check {
    let bridges: Vec<&str> = ifaces
        .iter()
        .filter(|i| i.is_bridge())
        .map(|i| i.iface.as_str())
        .collect();
    match ifaces.iter().find(|i| i.iface == bridge) {
        Some(i) if !i.is_bridge() => Check::error(
            name,
            format!("{bridge} is a {} interface, not a bridge", i.kind),
            format!(
                "guests attach to bridges: set `bridge:` to one of: {}",
                bridges.join(", ")
            ),
        ),
        Some(i) if !i.active => Check::warning(
            name,
            format!("{bridge} exists but is not active (pending in /etc/network/interfaces.new?)"),
            "apply the network configuration on the host: `ifreload -a`, or Apply Configuration in the web UI",
        ),
        Some(_) => Check::ok(name, format!("bridge for {}", guests.join(", "))),
        None => Check::error(
            name,
            format!(
                "no bridge {bridge} on this node (bridges: {}); needed by {}",
                if bridges.is_empty() {
                    "none".into()
                } else {
                    bridges.join(", ")
                },
                guests.join(", ")
            ),
            String::from(
                "create it (System > Network > Create > Linux Bridge, then Apply Configuration), or set `bridge:` to \
                 an existing one",
            ),
        ),
    }
}

fn volume_check(
    name: &str,
    volume: &str,
    content: &Result<Vec<StorageVolume>, ProxmoxError>,
    guests: &[(&str, bool)],
) -> Check {
    let to_create: Vec<&str> = guests.iter().filter(|g| g.1).map(|g| g.0).collect();
    let list = match content {
        Ok(l) => l,
        Err(e) => {
            return Check::error(
                name,
                format!("cannot list the storage's content: {e}"),
                "the token needs Datastore.Audit (or Datastore.AllocateSpace) on the storage holding it",
            );
        }
    };
    if list.iter().any(|v| v.volid == volume) {
        return Check::ok(name, "present");
    }
    let (storage, rest) = volume.split_once(':').unwrap_or(("local", volume));
    let file = rest.rsplit('/').next().unwrap_or(rest);
    let advice = if rest.starts_with("vztmpl/") {
        format!(
            "download it on the host: `pveam update && pveam download {storage} {file}` (`pveam available --section \
             system` lists the templates)"
        )
    } else {
        format!(
            "put the ISO in the storage: on the host, `wget -O /var/lib/vz/template/iso/{file} URL` (for `local`), \
             or upload it in the web UI (the storage > ISO Images > Upload); Talos images come from \
             https://factory.talos.dev"
        )
    };
    if to_create.is_empty() {
        Check::warning(
            name,
            "not in the storage: the guests exist, but re-creating one would fail",
            advice,
        )
    } else {
        Check::error(
            name,
            format!("not in the storage; needed to create {}", to_create.join(", ")),
            advice,
        )
    }
}

fn plan_token_check(desired: &Desired, seen: &Observations) -> Check {
    let name = "plan token";
    let Some(pt) = &seen.plan_token else {
        return if seen.plans_pull_requests {
            Check::warning(
                name,
                "pull requests are planned, and no read-only token is given for them (--plan-token-file)",
                format!(
                    "a pull request's plan should not hold a token that can change guests: create a PVEAuditor token \
                     ({GUIDE}, \"A read-only token for pull request plans\")"
                ),
            )
        } else {
            Check::skip(
                name,
                "no read-only token for pull request plans given (--plan-token-file)",
            )
        };
    };
    let id = match &pt.id {
        Ok(id) => id.clone(),
        Err(e) => {
            return Check::error(
                name,
                format!("{}: {e}", pt.source),
                "the file holds one line USER@REALM!TOKENID=SECRET",
            );
        }
    };
    let perms = match &pt.permissions {
        Ok(p) => p,
        Err(e) => {
            return Check::error(
                name,
                format!("{id}: {e}"),
                "check the token on the host: `pveum user token list driftless@pve`",
            );
        }
    };
    let mut writes: BTreeSet<String> = BTreeSet::new();
    for (path, privs) in perms {
        for p in privs.keys() {
            if WRITE_PRIVILEGES.contains(&p.as_str()) {
                writes.insert(format!("{p} on {path}"));
            }
        }
    }
    if !writes.is_empty() {
        return Check::error(
            name,
            format!(
                "{id} can change things: {}",
                writes.into_iter().take(4).collect::<Vec<_>>().join(", ")
            ),
            "make it privilege-separated with only PVEAuditor: `pveum user token add driftless@pve plan --privsep 1` \
             and `pveum acl modify / --tokens 'driftless@pve!plan' --roles PVEAuditor`",
        );
    }
    let unreadable: Vec<String> = desired
        .nodes
        .iter()
        .filter(|n| {
            !perms
                .get(&format!("/vms/{}", n.vmid))
                .is_some_and(|p| p.contains_key("VM.Audit"))
        })
        .map(|n| format!("/vms/{}", n.vmid))
        .collect();
    if !unreadable.is_empty() {
        return Check::error(
            name,
            format!("{id} cannot read {}", unreadable.join(", ")),
            "give it PVEAuditor on / (privilege-separated: its user must have VM.Audit there too)",
        );
    }
    Check::ok(name, format!("{id}: reads every guest, changes nothing"))
}

fn shell_advice(e: &ShellError, known_hosts: Option<&str>) -> String {
    let kh = known_hosts.unwrap_or("the known_hosts file");
    match e {
        ShellError::UnknownHost { host, .. } => format!(
            "add the host's key: `ssh-keyscan -t ed25519 {} >> {kh}`, then compare `ssh-keygen -lf {kh}` with \
             `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the host's console",
            host.split(':').next().unwrap_or(host)
        ),
        ShellError::HostKeyMismatch { .. } => format!(
            "the host presents another key than {kh} holds: if the host was reinstalled, check the new key on its \
             console (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) and replace its line; otherwise, do not \
             connect"
        ),
        ShellError::HostKeyRevoked { .. } => format!("the key is marked @revoked in {kh}: never connect with it"),
        ShellError::Auth { .. } => format!(
            "put driftless's public key into /root/.ssh/authorized_keys on the host ({GUIDE}, \"The host shell\")"
        ),
        ShellError::Connect { .. } => {
            "is sshd running on the host and its port open from here? (`systemctl status ssh`)".into()
        }
        _ => "see the message".into(),
    }
}

fn host_shell_checks(desired: &Desired, seen: &Observations) -> Vec<Check> {
    let Some(shells) = &seen.host_shells else {
        let needs_root = desired.nodes.iter().any(|n| {
            n.kind == GuestKind::Lxc
                && n.settings.lxc.as_ref().is_some_and(|l| {
                    l.raw.as_ref().is_some_and(|r| !r.is_empty())
                        || l.features.as_ref().is_some_and(|f| {
                            f.keyctl.is_some() || f.fuse.is_some() || f.mknod.is_some() || f.mount.is_some()
                        })
                })
        });
        return vec![if needs_root {
            Check::error(
                "host shell",
                "none configured, and the repository sets raw lxc keys or container features only root@pam may set",
                format!("list the host under proxmox.hosts in cluster.yaml ({GUIDE}, \"The host shell\")"),
            )
        } else {
            Check::skip("host shell", "none configured (proxmox.hosts), and nothing needs one")
        }];
    };
    shells
        .iter()
        .map(|s| {
            let name = format!("host shell {}", s.pve_node);
            match &s.pct {
                Ok(out) if out.status == 0 => Check::ok(name, format!("{}; pct answers", s.target)),
                Ok(out) if out.status == 127 || String::from_utf8_lossy(&out.stderr).contains("not found") => {
                    Check::error(
                        name,
                        format!("{}: `pct` not found", s.target),
                        "is this a Proxmox VE host? The host shell must be the node's root shell (--pct-command if pct \
                         lives elsewhere)",
                    )
                }
                Ok(out) => Check::error(
                    name,
                    format!(
                        "{}: `pct list` exited with {}: {}",
                        s.target,
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    "driftless runs pct as root on the host: log in as root (proxmox.hosts.*.ssh root@HOST)",
                ),
                Err(e) => Check::error(
                    name,
                    format!("{}: {e}", s.target),
                    shell_advice(e, s.known_hosts.as_deref()),
                ),
            }
        })
        .collect()
}

fn vm_node_checks(desired: &Desired, seen: &Observations) -> Vec<Check> {
    let mut out = Vec::new();
    for node in desired.nodes.iter().filter(|n| n.kind == GuestKind::Vm) {
        let Some(reach) = seen.vm_nodes.get(&node.name) else {
            continue;
        };
        let name = format!("node {}", node.name);
        out.push(match reach {
            NodeReach::NotCreated => Check::skip(name, "its guest does not exist yet"),
            NodeReach::Stopped => Check::skip(name, "its guest is stopped"),
            NodeReach::Ssh(Ok(())) => Check::ok(name, format!("SSH to {} works", node.ip())),
            NodeReach::Ssh(Err(e)) => Check::error(
                name,
                format!("SSH to {}: {e}", node.ip()),
                shell_advice(e, Some("the node known_hosts (--node-ssh-known-hosts)")),
            ),
            NodeReach::Talos(Ok(TalosNodeState::Maintenance)) => Check::ok(
                name,
                format!(
                    "the Talos API of {} answers (maintenance mode: apply sends its first config)",
                    node.ip()
                ),
            ),
            NodeReach::Talos(Ok(TalosNodeState::Configured { version })) => Check::ok(
                name,
                format!("the Talos API of {} answers (Talos {version})", node.ip()),
            ),
            NodeReach::Talos(Err(e)) => Check::error(
                name,
                e.to_string(),
                format!(
                    "is the VM booted from the Talos image, with port 50000 reachable from here? A configured node \
                     needs the talosconfig made from the bundle (secret {})",
                    desired
                        .cluster
                        .talos
                        .secrets
                        .as_ref()
                        .map(|s| s.secret.as_str())
                        .unwrap_or("talos.secrets")
                ),
            ),
            NodeReach::Unavailable(why) => Check::error(name, why.clone(), "see the message"),
        });
    }
    out
}

fn secret_checks(seen: &Observations) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(mode) = seen.secrets_dir_mode
        && mode & 0o077 != 0
    {
        out.push(Check::warning(
            "secrets directory",
            format!("{} is mode {:04o}: others may list it", seen.secrets_dir, mode & 0o7777),
            format!("chmod 700 {}", seen.secrets_dir),
        ));
    }
    for s in &seen.secrets {
        let name = format!("secret {}", s.name);
        if let Some(by) = &s.overridden_by {
            out.push(Check::skip(name, format!("not used by this run: {by} replaces it")));
            continue;
        }
        let check = match &s.source {
            SecretSource::Env(var) => Check::ok(&name, format!("from {var}")),
            SecretSource::Missing { path } => Check::error(
                &name,
                format!("{path} does not exist ({})", s.purpose),
                format!("put it there with mode 0600: `install -m 600 /dev/stdin {path}`, paste it, then Ctrl-D"),
            ),
            SecretSource::Unreadable { path, error } => Check::error(
                &name,
                format!("cannot read {path}: {error}"),
                format!("make it a file the user running driftless can read: `chmod 600 {path}` (and chown it)"),
            ),
            SecretSource::File { path, empty: true, .. } => Check::error(
                &name,
                format!("{path} is empty"),
                format!("write the secret into it ({})", s.purpose),
            ),
            SecretSource::File { path, mode, .. } if mode & 0o077 != 0 => Check::error(
                &name,
                format!("{path} is mode {:04o}: readable by others", mode & 0o7777),
                format!("chmod 600 {path}"),
            ),
            SecretSource::File { path, mode, .. } => Check::ok(&name, format!("{path} (mode {:04o})", mode & 0o7777)),
        };
        out.push(match (&s.shape_error, check.status) {
            (Some(why), Status::Ok) => Check::error(name, why.clone(), format!("it should hold: {}", s.purpose)),
            _ => check,
        });
    }
    out
}

fn repository_check(repo: Option<&RepositorySeen>) -> Check {
    let name = "repository";
    let Some(r) = repo else {
        return Check::skip(name, "no --repository given: the daemon's fetch is not checked");
    };
    match &r.result {
        Ok(commit) => Check::ok(
            name,
            format!(
                "{} fetched: {} is at {}",
                r.url,
                r.branch,
                &commit[..commit.len().min(12)]
            ),
        ),
        Err(e) => {
            let lower = e.to_lowercase();
            let advice = if lower.contains("host key") || lower.contains("known_hosts") {
                "add the forge's host key to the daemon's known_hosts (--known-hosts): `ssh-keyscan HOST >> FILE`, \
                 checked against the fingerprint the forge publishes"
            } else if lower.contains("permission denied")
                || lower.contains("401")
                || lower.contains("403")
                || lower.contains("auth")
            {
                "give the daemon read access: a deploy key (--ssh-key) for ssh://, a token file (--token-file) for \
                 https://"
            } else if lower.contains("no branch") {
                "push the branch, or set --branch to the one that holds the repository"
            } else {
                "check the URL and that this machine reaches the forge"
            };
            Check::error(name, format!("{}: {e}", r.url), advice)
        }
    }
}

#[cfg(test)]
mod tests;
