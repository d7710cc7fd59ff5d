//! Guest config changes the way Proxmox makes them, on a parsed [`GuestConf`]:
//!
//! * LXC: pve-container `update_pct_config`, `vmconfig_apply_pending` (stopped guest) and
//!   `vmconfig_hotplug_pending` (running guest), `check_ct_modify_config_perm` (what only
//!   `root@pam` may change), `create_vm` (disks, OS detection, defaults).
//! * QEMU: qemu-server's pending/hotplug model, simplified (see [`qemu_update`]).
//!
//! Values are normalised as Proxmox stores them: tags sorted, lower-cased and `;`-joined,
//! network devices re-printed with a generated MAC address (`BC:24:11:..`), new disks
//! (`STORAGE:SIZE`) allocated as `STORAGE:vm-VMID-disk-N,...,size=SIZEG`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::access::Perms;
use crate::store;
use driftless::pve::api_schema::{ApiSchema, ParamErrors, Property};
use driftless::pve::conf::{self, GuestConf, PveKind, Section};

/// An error the way Proxmox's REST handler reports it: HTTP status, message (Perl `die`
/// text, usually ending in a newline) and, for HTTP 400, the per-parameter errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub message: String,
    pub errors: BTreeMap<String, String>,
}

impl ApiError {
    /// `die "...\n"`: HTTP 500.
    pub fn die(msg: impl Into<String>) -> ApiError {
        let mut message = msg.into();
        if !message.ends_with('\n') {
            message.push('\n');
        }
        ApiError {
            status: 500,
            message,
            errors: BTreeMap::new(),
        }
    }

    /// `raise_param_exc({ key => msg })`: HTTP 400.
    pub fn param(key: &str, msg: impl Into<String>) -> ApiError {
        let mut errors = BTreeMap::new();
        errors.insert(key.to_string(), msg.into());
        ApiError::param_map(errors)
    }

    pub fn param_map(errors: BTreeMap<String, String>) -> ApiError {
        ApiError {
            status: 400,
            message: "Parameter verification failed.\n".into(),
            errors,
        }
    }

    pub fn params(e: ParamErrors) -> ApiError {
        ApiError::param_map(e.errors)
    }

    /// `raise_perm_exc($what)`: HTTP 403.
    pub fn perm(what: &str) -> ApiError {
        ApiError {
            status: 403,
            message: format!("Permission check failed ({what})\n"),
            errors: BTreeMap::new(),
        }
    }

    /// Any status with a message used as is.
    pub fn status(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            errors: BTreeMap::new(),
        }
    }

    /// The first line: what goes in the HTTP status line and a task's exit status.
    pub fn first_line(&self) -> &str {
        self.message.lines().next().unwrap_or("")
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> ApiError {
        ApiError::die(e.to_string())
    }
}

/// `CT` or `VM`, as Proxmox names the guest in messages.
pub(crate) fn type_str(kind: PveKind) -> &'static str {
    match kind {
        PveKind::Lxc => "CT",
        PveKind::Qemu => "VM",
    }
}

fn schema() -> &'static ApiSchema {
    ApiSchema::embedded()
}

/// The property-string format of a config key (`net0`, `rootfs`, `scsi1`, ...).
fn config_format(kind: PveKind, key: &str) -> Option<&'static BTreeMap<String, Property>> {
    schema().config_property(kind, key)?.format_properties()
}

/// Whether `key` is a config option of this kind of guest (`option_exists`).
pub(crate) fn option_exists(kind: PveKind, key: &str) -> bool {
    schema().config_property(kind, key).is_some()
}

/// `key` is `prefix` followed by digits.
pub(crate) fn numbered(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

// ---- sections: options, description and env behind one key space --------------------------

pub(crate) fn sget(s: &Section, key: &str) -> Option<String> {
    match key {
        "description" => (!s.description.is_empty()).then(|| s.description.clone()),
        "env" => s.env_api_value(),
        _ => s.options.get(key).cloned(),
    }
}

pub(crate) fn sset(s: &mut Section, kind: PveKind, key: &str, value: &str) {
    match key {
        "description" => s.description = conf::normalize_description(value, kind),
        "env" => {
            s.env = value
                .split('\0')
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .collect()
        }
        _ => {
            s.options.insert(key.to_string(), value.to_string());
        }
    }
}

pub(crate) fn sremove(s: &mut Section, key: &str) -> Option<String> {
    let old = sget(s, key);
    match key {
        "description" => s.description.clear(),
        "env" => s.env.clear(),
        _ => {
            s.options.remove(key);
        }
    }
    old
}

/// Every key set in a section, sorted.
pub(crate) fn skeys(s: &Section) -> Vec<String> {
    let mut keys: Vec<String> = s.options.keys().cloned().collect();
    if !s.description.is_empty() {
        keys.push("description".into());
    }
    if !s.env.is_empty() {
        keys.push("env".into());
    }
    keys.sort();
    keys
}

fn pd_name(entry: &str) -> &str {
    entry.strip_prefix('!').unwrap_or(entry)
}

fn pd_add(c: &mut GuestConf, opt: &str, force: bool) {
    c.pending_delete.retain(|d| pd_name(d) != opt);
    c.pending_delete
        .push(if force { format!("!{opt}") } else { opt.to_string() });
    c.pending_delete.sort_by(|a, b| pd_name(a).cmp(pd_name(b)));
}

fn pd_remove(c: &mut GuestConf, opt: &str) {
    c.pending_delete.retain(|d| pd_name(d) != opt);
}

fn pd_names(c: &GuestConf) -> Vec<String> {
    let mut v: Vec<String> = c.pending_delete.iter().map(|d| pd_name(d).to_string()).collect();
    v.sort();
    v.dedup();
    v
}

/// `cleanup_pending`: drop pending values equal to the current ones, and pending deletions
/// of options that are not set.
fn cleanup_pending(c: &mut GuestConf) {
    for key in skeys(&c.pending) {
        if let Some(cur) = sget(&c.current, &key)
            && Some(cur) == sget(&c.pending, &key)
        {
            sremove(&mut c.pending, &key);
        }
    }
    let current = c.current.clone();
    c.pending_delete.retain(|d| sget(&current, pd_name(d)).is_some());
}

fn move_pending(c: &mut GuestConf, key: &str, value: &str) {
    let kind = c.kind;
    sremove(&mut c.pending, key);
    sset(&mut c.current, kind, key, value);
}

// ---- values ---------------------------------------------------------------------------------

/// `PVE::Tools::split_list`.
pub(crate) fn split_list(s: &str) -> Vec<String> {
    if s.contains('\0') {
        return s.split('\0').filter(|x| !x.is_empty()).map(str::to_string).collect();
    }
    s.split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// `PVE::GuestHelpers::get_unique_tags` with the default tag style: sorted
/// case-insensitively, lower-cased, duplicates dropped, `;`-joined.
pub(crate) fn unique_tags(s: &str) -> String {
    let mut tags = split_list(s);
    tags.sort_by_key(|t| t.to_lowercase());
    let mut out: Vec<String> = Vec::new();
    for t in tags {
        let t = t.to_lowercase();
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out.join(";")
}

/// `PVE::LXC::verify_nameserver_list` / `verify_searchdomain_list`.
fn verify_list(value: &str, ip: bool) -> Result<String, ApiError> {
    let mut out = Vec::new();
    for item in split_list(value) {
        if ip && item.parse::<IpAddr>().is_err() {
            return Err(ApiError::die("value does not look like a valid IP address"));
        }
        if !ip
            && !item
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(ApiError::die("value does not look like a valid DNS name"));
        }
        out.push(item);
    }
    Ok(out.join(" "))
}

/// `NEW_DISK_RE` (`^(([^/:\s]+):)?(\d+(\.\d+)?)$`): a disk to allocate, as (storage, GiB).
pub(crate) fn new_disk(volume: &str) -> Option<(Option<&str>, &str)> {
    let (storage, size) = match volume.rsplit_once(':') {
        Some((s, z)) => (Some(s), z),
        None => (None, volume),
    };
    if let Some(s) = storage
        && (s.is_empty() || s.contains(['/', ':']) || s.contains(char::is_whitespace))
    {
        return None;
    }
    let valid = match size.split_once('.') {
        Some((i, f)) => !i.is_empty() && !f.is_empty() && (i.bytes().chain(f.bytes())).all(|b| b.is_ascii_digit()),
        None => !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit()),
    };
    valid.then_some((storage, size))
}

/// GiB as given (`32`, `0.5`) to bytes, the way `create_disks` rounds (whole KiB).
fn gib_to_bytes(size: &str) -> u64 {
    let gib: f64 = size.parse().unwrap_or(0.0);
    ((gib * 1024.0 * 1024.0).floor() as u64) * 1024
}

/// `PVE::JSONSchema::format_size`.
pub(crate) fn format_size(bytes: u64) -> String {
    let kb = bytes / 1024;
    if kb * 1024 != bytes {
        return bytes.to_string();
    }
    let mb = kb / 1024;
    if mb * 1024 != kb {
        return format!("{kb}K");
    }
    let gb = mb / 1024;
    if gb * 1024 != mb {
        return format!("{mb}M");
    }
    let tb = gb / 1024;
    if tb * 1024 != gb {
        return format!("{gb}G");
    }
    format!("{tb}T")
}

/// `PVE::JSONSchema::parse_size` (`32G`, `512M`, `1024`).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let v: f64 = num.parse().ok()?;
    Some((v * mult as f64) as u64)
}

/// Sandbox storage model: `local` is the default directory storage of a fresh install
/// (ISO images, templates, backups; no container or VM disks); every other storage id is
/// taken to hold disks.
pub(crate) fn storage_holds_disks(storage: &str) -> bool {
    storage != "local"
}

/// Every value in the config (current, pending, snapshots): what disk names are taken from.
fn all_values(c: &GuestConf) -> Vec<&str> {
    let mut v: Vec<&str> = Vec::new();
    for s in [&c.current, &c.pending].into_iter().chain(c.snapshots.values()) {
        v.extend(s.options.values().map(String::as_str));
    }
    v
}

/// `find_free_diskname`: the first `PREFIX-VMID-disk-N` not used on that storage.
fn free_disk_name(c: &GuestConf, vmid: u32, storage: &str, prefix: &str) -> String {
    let values = all_values(c);
    (0..)
        .map(|n| format!("{prefix}-{vmid}-disk-{n}"))
        .find(|name| {
            let needle = format!("{storage}:");
            !values.iter().any(|v| {
                v.split(',').any(|part| {
                    part.strip_prefix(&needle)
                        .is_some_and(|rest| rest.trim_start_matches("base-") == name)
                })
            })
        })
        .unwrap_or_default()
}

/// `add_unused_volume`: park a detached volume as the first free `unusedN`.
fn add_unused_volume(c: &mut GuestConf, volid: &str) {
    if c.current
        .options
        .iter()
        .any(|(k, v)| numbered(k, "unused") && v == volid)
    {
        return;
    }
    let key = (0..256)
        .map(|n| format!("unused{n}"))
        .find(|k| !c.current.options.contains_key(k));
    if let Some(k) = key {
        c.current.options.insert(k, volid.to_string());
    }
}

fn volume_in_use(c: &GuestConf, volid: &str, skip_key: &str) -> bool {
    [&c.current, &c.pending].iter().any(|s| {
        s.options
            .iter()
            .filter(|(k, _)| k.as_str() != skip_key && !numbered(k, "unused"))
            .any(|(_, v)| v.split(',').next() == Some(volid))
    })
}

/// Parse a property string with the config key's format, Proxmox's messages on failure.
fn parse_prop(kind: PveKind, key: &str, value: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(format) = config_format(kind, key) else {
        return Err(ApiError::die(format!("unable to parse value of '{key}'")));
    };
    schema()
        .parse_property_string(format, value, key)
        .map_err(|e| ApiError::die(format!("unable to parse value of '{key}' - {}", e.trim_end())))
}

fn print_prop(kind: PveKind, key: &str, values: &BTreeMap<String, String>) -> String {
    match config_format(kind, key) {
        Some(format) => schema().print_property_string(format, values),
        None => values.get("").cloned().unwrap_or_default(),
    }
}

/// `classify_mountpoint`.
pub(crate) fn mountpoint_type(volume: &str) -> &'static str {
    if volume.starts_with("/dev/") {
        "device"
    } else if volume.starts_with('/') {
        "bind"
    } else {
        "volume"
    }
}

/// The storage a volume (`local-lvm:vm-100-disk-0`) or new disk (`local-lvm:8`) is on.
pub(crate) fn volume_storage(volume: &str) -> Option<&str> {
    volume.split_once(':').map(|(s, _)| s)
}

/// An LXC mount point as Proxmox stores it, allocating a new disk for `STORAGE:SIZE`.
fn lxc_mountpoint(c: &GuestConf, vmid: u32, key: &str, value: &str) -> Result<String, ApiError> {
    let mut m = parse_prop(PveKind::Lxc, key, value)?;
    let volume = m.get("volume").cloned().unwrap_or_default();
    if let Some((storage, size)) = new_disk(&volume) {
        let Some(storage) = storage else {
            return Err(ApiError::die(format!(
                "{key}: missing storage for new volume '{volume}'"
            )));
        };
        if !storage_holds_disks(storage) {
            return Err(ApiError::die(format!(
                "storage '{storage}' does not allow content type 'rootdir' (Container)"
            )));
        }
        let prefix = if storage.contains("zfs") { "subvol" } else { "vm" };
        let name = free_disk_name(c, vmid, storage, prefix);
        m.insert("volume".into(), format!("{storage}:{name}"));
        m.insert("size".into(), format_size(gib_to_bytes(size)));
    }
    if key == "rootfs" {
        m.remove("mp");
    }
    Ok(print_prop(PveKind::Lxc, key, &m))
}

/// `parse_lxc_network` + `print_lxc_network`: `type=veth` and a MAC address added.
pub(crate) fn lxc_net(seed: u64, vmid: u32, key: &str, value: &str) -> Result<String, ApiError> {
    let mut m = parse_prop(PveKind::Lxc, key, value)?;
    m.insert("type".into(), "veth".into());
    if !m.contains_key("hwaddr") {
        m.insert("hwaddr".into(), store::mac_from(seed, vmid, key, value));
    }
    Ok(print_prop(PveKind::Lxc, key, &m))
}

/// qemu-server `parse_net` + `print_net`: `MODEL=MAC` first (MAC generated when missing),
/// then the other options sorted.
pub(crate) fn qemu_net(seed: u64, vmid: u32, key: &str, value: &str) -> Result<String, ApiError> {
    let mut m = parse_prop(PveKind::Qemu, key, value)?;
    let Some(model) = m.remove("model") else {
        return Err(ApiError::die(format!("unable to parse network options for '{key}'")));
    };
    let mac = m
        .remove("macaddr")
        .unwrap_or_else(|| store::mac_from(seed, vmid, key, value));
    let mut out = format!("{model}={mac}");
    for (k, v) in &m {
        out.push_str(&format!(",{k}={v}"));
    }
    Ok(out)
}

/// QEMU disk keys.
pub(crate) fn is_qemu_drive(key: &str) -> bool {
    ["ide", "sata", "scsi", "virtio"].iter().any(|p| numbered(key, p)) || key == "efidisk0" || key == "tpmstate0"
}

fn is_cdrom(value: &str) -> bool {
    value.split(',').any(|p| p == "media=cdrom") || value == "cdrom"
}

/// A QEMU drive as qemu-server stores it (`print_drive`), allocating `STORAGE:SIZE`.
fn qemu_drive(c: &GuestConf, vmid: u32, key: &str, value: &str) -> Result<String, ApiError> {
    let mut m = parse_prop(PveKind::Qemu, key, value)?;
    let file = m.get("file").cloned().unwrap_or_default();
    if let Some((storage, size)) = new_disk(&file) {
        let Some(storage) = storage else {
            return Err(ApiError::die(format!("{key}: missing storage for new disk '{file}'")));
        };
        if !storage_holds_disks(storage) {
            return Err(ApiError::die(format!(
                "storage '{storage}' does not support content-type 'images'"
            )));
        }
        let name = free_disk_name(c, vmid, storage, "vm");
        m.insert("file".into(), format!("{storage}:{name}"));
        let size = match key {
            "efidisk0" if m.get("efitype").map(String::as_str) == Some("4m") => "4M".to_string(),
            "efidisk0" => "528K".to_string(),
            "tpmstate0" => "4M".to_string(),
            _ => format_size(gib_to_bytes(size)),
        };
        m.insert("size".into(), size);
        m.remove("import-from");
    }
    Ok(print_prop(PveKind::Qemu, key, &m))
}

// ---- permissions (API tokens are never root@pam) --------------------------------------------

/// pve-container `check_ct_modify_config_perm` for a non-`root@pam` caller that otherwise
/// has every privilege (an API token of root without privilege separation).
pub(crate) fn lxc_check_perm(
    authid: &str,
    old: Option<&Section>,
    new: &BTreeMap<String, String>,
    delete: &[String],
    unprivileged: bool,
) -> Result<(), ApiError> {
    if authid == "root@pam" {
        return Ok(());
    }
    let check = |opt: &str, is_delete: bool| -> Result<(), ApiError> {
        if opt == "rootfs" || numbered(opt, "mp") {
            if is_delete {
                return Ok(());
            }
            let value = new.get(opt).map(String::as_str).unwrap_or("");
            let m = parse_prop(PveKind::Lxc, opt, value)?;
            let ty = mountpoint_type(m.get("volume").map(String::as_str).unwrap_or(""));
            if ty != "volume" {
                return Err(ApiError::perm(&format!(
                    "mount point type {ty} is only allowed for root@pam"
                )));
            }
        } else if numbered(opt, "dev") {
            return Err(ApiError::perm(
                "configuring device passthrough is only allowed for root@pam",
            ));
        } else if opt == "features" {
            if !unprivileged {
                return Err(ApiError::perm(
                    "changing feature flags for privileged container is only allowed for root@pam",
                ));
            }
            let parse = |v: Option<String>| -> Result<BTreeMap<String, String>, ApiError> {
                match v {
                    Some(v) if !v.is_empty() => parse_prop(PveKind::Lxc, "features", &v),
                    _ => Ok(BTreeMap::new()),
                }
            };
            let only_nesting =
                |f: &BTreeMap<String, String>| f.len() == 1 && f.get("nesting").is_some_and(|v| v != "0");
            let old_value = old.and_then(|s| sget(s, "features"));
            let other_changed = if !is_delete {
                let features = parse(new.get(opt).cloned())?;
                if old_value.as_deref().is_some_and(|v| !v.is_empty()) {
                    let old_features = parse(old_value)?;
                    old_features
                        .keys()
                        .chain(features.keys())
                        .any(|k| k != "nesting" && old_features.get(k) != features.get(k))
                } else {
                    !features.is_empty() && !only_nesting(&features)
                }
            } else {
                let features = parse(old_value)?;
                !features.is_empty() && !only_nesting(&features)
            };
            if other_changed {
                return Err(ApiError::perm(
                    "changing feature flags (except nesting) is only allowed for root@pam",
                ));
            }
        } else if opt == "hookscript" {
            return Err(ApiError::perm("changing the hookscript is only allowed for root@pam"));
        }
        Ok(())
    };
    for opt in new.keys() {
        check(opt, false)?;
    }
    for opt in delete {
        check(opt, true)?;
    }
    Ok(())
}

/// qemu-server `check_vm_modify_config_perm`: the options only `root@pam` may set.
pub(crate) fn qemu_check_perm(authid: &str, keys: &[String]) -> Result<(), ApiError> {
    if authid == "root@pam" {
        return Ok(());
    }
    for opt in keys {
        if opt == "args" || opt == "lock" || opt == "hookscript" {
            return Err(ApiError::die(format!("only root can set '{opt}' config")));
        }
    }
    Ok(())
}

/// The privilege half of pve-container's `check_ct_modify_config_perm` (the root-only half
/// is [`lxc_check_perm`]): which privilege each option needs on `/vms/{vmid}`, and storage
/// and bridge access for disks and NICs.
pub(crate) fn lxc_check_privs(
    perms: &Perms,
    vmid: u32,
    old: Option<&Section>,
    new: &BTreeMap<String, String>,
    delete: &[String],
) -> Result<(), ApiError> {
    let check = |opt: &str, is_delete: bool| -> Result<(), ApiError> {
        if opt == "cores" || opt == "cpuunits" || opt == "cpulimit" {
            perms.check_vm(vmid, &["VM.Config.CPU"])
        } else if opt == "rootfs" || numbered(opt, "mp") {
            perms.check_vm(vmid, &["VM.Config.Disk"])?;
            if is_delete {
                return Ok(());
            }
            let value = new.get(opt).map(String::as_str).unwrap_or("");
            let volume = value.split(',').next().unwrap_or("");
            let volume = volume.strip_prefix("volume=").unwrap_or(volume);
            match new_disk(volume) {
                Some((Some(sid), _)) => perms.check(&format!("/storage/{sid}"), &["Datastore.AllocateSpace"]),
                _ => Ok(()),
            }
        } else if opt == "memory" || opt == "swap" {
            perms.check_vm(vmid, &["VM.Config.Memory"])
        } else if numbered(opt, "net") {
            perms.check_vm(vmid, &["VM.Config.Network"])?;
            let old_value = old.and_then(|s| sget(s, opt));
            for value in [
                old_value.as_deref(),
                if is_delete {
                    None
                } else {
                    new.get(opt).map(String::as_str)
                },
            ]
            .into_iter()
            .flatten()
            {
                let (bridge, tag) = nic_bridge(value);
                if let Some(bridge) = bridge {
                    perms.check_bridge(&bridge, tag.as_deref())?;
                }
            }
            Ok(())
        } else if opt == "nameserver" || opt == "searchdomain" || opt == "hostname" {
            perms.check_vm(vmid, &["VM.Config.Network"])
        } else if opt == "features" {
            // Root-only changes were refused before; what is left changes `nesting` alone.
            let old_value = old.and_then(|s| sget(s, "features")).unwrap_or_default();
            let new_value = if is_delete {
                String::new()
            } else {
                new.get(opt).cloned().unwrap_or_default()
            };
            let nesting = |v: &str| {
                v.split(',')
                    .find_map(|p| p.strip_prefix("nesting="))
                    .unwrap_or("")
                    .to_string()
            };
            if nesting(&old_value) != nesting(&new_value) {
                perms.check_vm(vmid, &["VM.Allocate"])
            } else {
                Ok(())
            }
        } else {
            // `tags` (assert_tag_permissions, every tag allowed: the datacenter default) and
            // every other option.
            perms.check_vm(vmid, &["VM.Config.Options"])
        }
    };
    for opt in new.keys() {
        check(opt, false)?;
    }
    for opt in delete {
        check(opt, true)?;
    }
    Ok(())
}

/// The bridge and VLAN tag of a NIC's property string (LXC `bridge=vmbr0,tag=20`, QEMU
/// `virtio=MAC,bridge=vmbr0`).
fn nic_bridge(value: &str) -> (Option<String>, Option<String>) {
    let mut bridge = None;
    let mut tag = None;
    for part in value.split(',') {
        if let Some(b) = part.strip_prefix("bridge=") {
            bridge = Some(b.to_string());
        } else if let Some(t) = part.strip_prefix("tag=") {
            tag = Some(t.to_string());
        }
    }
    (bridge, tag)
}

/// qemu-server's privilege classes of config options (`$cpuoptions`, `$memoryoptions`, ...).
fn qemu_option_privilege(opt: &str) -> Option<&'static str> {
    const CPU: &[&str] = &[
        "cores",
        "cpu",
        "runningcpu",
        "cpulimit",
        "cpuunits",
        "numa",
        "smp",
        "sockets",
        "vcpus",
    ];
    const MEMORY: &[&str] = &["memory", "balloon", "shares", "allow-ksm"];
    const HWTYPE: &[&str] = &[
        "acpi",
        "hotplug",
        "kvm",
        "machine",
        "runningmachine",
        "scsihw",
        "smbios1",
        "tablet",
        "vga",
        "watchdog",
        "audio0",
        "rng0",
    ];
    const GENERAL: &[&str] = &[
        "agent",
        "autostart",
        "bios",
        "description",
        "keyboard",
        "localtime",
        "migrate_downtime",
        "migrate_speed",
        "name",
        "onboot",
        "ostype",
        "protection",
        "reboot",
        "startdate",
        "startup",
        "tdf",
        "template",
        "tags",
    ];
    const DISK: &[&str] = &["boot", "bootdisk", "vmstatestorage"];
    if CPU.contains(&opt) || numbered(opt, "numa") {
        Some("VM.Config.CPU")
    } else if MEMORY.contains(&opt) {
        Some("VM.Config.Memory")
    } else if HWTYPE.contains(&opt) {
        Some("VM.Config.HWType")
    } else if GENERAL.contains(&opt) {
        Some("VM.Config.Options")
    } else if DISK.contains(&opt) {
        Some("VM.Config.Disk")
    } else if numbered(opt, "net") {
        Some("VM.Config.Network")
    } else {
        None
    }
}

/// qemu-server's privilege checks of a create (`update: false`) or a config change: the
/// option classes (`check_vm_modify_config_perm`, creation skips drives), drives (a CD-ROM
/// needs `VM.Config.CDROM`, a disk `VM.Config.Disk`; new disks `Datastore.AllocateSpace`,
/// ISOs read access to their storage) and bridges (`SDN.Use`). Options outside every class
/// are root-only in Proxmox; the sandbox leaves that to [`qemu_check_perm`]'s list.
pub(crate) fn qemu_check_privs(
    perms: &Perms,
    vmid: u32,
    set: &BTreeMap<String, String>,
    delete: &[String],
    update: bool,
) -> Result<(), ApiError> {
    for opt in delete {
        let o = if opt == "cdrom" { "ide2" } else { opt.as_str() };
        if is_qemu_drive(o) {
            perms.check_vm(vmid, &["VM.Config.Disk"])?;
        } else if let Some(p) = qemu_option_privilege(o) {
            perms.check_vm(vmid, &[p])?;
        }
    }
    for (opt, value) in set {
        let o = if opt == "cdrom" { "ide2" } else { opt.as_str() };
        if is_qemu_drive(o) {
            let cdrom = opt == "cdrom" || is_cdrom(value);
            if update {
                perms.check_vm(vmid, &[if cdrom { "VM.Config.CDROM" } else { "VM.Config.Disk" }])?;
            }
            let volume = value.split(',').next().unwrap_or("");
            let volume = volume.strip_prefix("file=").unwrap_or(volume);
            if volume == "none" || volume == "cdrom" || volume.is_empty() {
                continue;
            }
            match new_disk(volume) {
                Some((Some(sid), _)) if !cdrom => {
                    perms.check(&format!("/storage/{sid}"), &["Datastore.AllocateSpace"])?
                }
                _ => perms.check_template_access(volume)?,
            }
        } else if let Some(p) = qemu_option_privilege(o) {
            perms.check_vm(vmid, &[p])?;
        }
        if numbered(opt, "net") {
            let (bridge, tag) = nic_bridge(value);
            if let Some(bridge) = bridge {
                perms.check_bridge(&bridge, tag.as_deref())?;
            }
        }
    }
    Ok(())
}

// ---- updates --------------------------------------------------------------------------------

/// What a `PUT .../config` asks for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Changes {
    pub set: BTreeMap<String, String>,
    pub delete: Vec<String>,
    pub revert: Vec<String>,
}

/// Options a running container takes at once (`$LXC_FASTPLUG_OPTIONS`).
const LXC_FASTPLUG: &[&str] = &[
    "description",
    "onboot",
    "startup",
    "protection",
    "hostname",
    "hookscript",
    "cores",
    "tags",
    "lock",
];

/// pve-container `update_pct_config`: changes go to the pending section, then are applied
/// (stopped guest) or hot-plugged where possible (running guest). The rest stays pending.
pub(crate) fn lxc_update(
    c: &mut GuestConf,
    vmid: u32,
    running: bool,
    changes: &Changes,
    seed: u64,
) -> Result<(), ApiError> {
    for opt in &changes.revert {
        sremove(&mut c.pending, opt);
        pd_remove(c, opt);
    }
    for opt in &changes.delete {
        if sget(&c.current, opt).is_none() && sget(&c.pending, opt).is_none() {
            continue; // "cannot delete 'x' - not set in current configuration!" (a warning)
        }
        if opt == "memory" || opt == "rootfs" || opt == "ostype" {
            return Err(ApiError::die(format!("unable to delete required option '{opt}'")));
        }
        if opt == "unprivileged" {
            return Err(ApiError::die(format!("unable to delete read-only option: '{opt}'")));
        }
        pd_add(c, opt, false);
    }
    for (opt, value) in &changes.set {
        let value = if opt == "rootfs" || numbered(opt, "mp") {
            let m = parse_prop(PveKind::Lxc, opt, value)?;
            if let Some(storage) = m.get("volume").and_then(|v| volume_storage(v))
                && mountpoint_type(m.get("volume").map(String::as_str).unwrap_or("")) == "volume"
                && !storage_holds_disks(storage)
            {
                return Err(ApiError::die(format!(
                    "storage '{storage}' does not allow content type 'rootdir' (Container)"
                )));
            }
            value.clone()
        } else if opt == "nameserver" {
            verify_list(value, true)?
        } else if opt == "searchdomain" {
            verify_list(value, false)?
        } else if opt == "unprivileged" {
            return Err(ApiError::die(format!("unable to modify read-only option: '{opt}'")));
        } else if opt == "tags" {
            unique_tags(value)
        } else if numbered(opt, "net") {
            parse_prop(PveKind::Lxc, opt, value)?;
            value.clone()
        } else {
            value.clone()
        };
        sset(&mut c.pending, PveKind::Lxc, opt, &value);
        pd_remove(c, opt);
    }
    cleanup_pending(c);
    let mut errors = BTreeMap::new();
    if running {
        lxc_hotplug_pending(c, vmid, seed, &mut errors);
    } else {
        lxc_apply_pending(c, vmid, seed, &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::param_map(errors))
    }
}

/// `apply_pending_mountpoint`: allocate or re-print, park the replaced volume as unused.
fn lxc_apply_mountpoint(c: &mut GuestConf, vmid: u32, opt: &str, running: bool) -> Result<Option<String>, ApiError> {
    let value = sget(&c.pending, opt).unwrap_or_default();
    let old = sget(&c.current, opt);
    if running && old.is_some() {
        return Ok(None); // no hot-plugging over an existing mount point
    }
    let new = lxc_mountpoint(c, vmid, opt, &value)?;
    if let Some(old) = old {
        let volid = old.split(',').next().unwrap_or("").to_string();
        if mountpoint_type(&volid) == "volume"
            && !volume_in_use(c, &volid, opt)
            && new.split(',').next() != Some(&volid)
        {
            add_unused_volume(c, &volid);
        }
    }
    Ok(Some(new))
}

/// `vmconfig_apply_pending` (pve-container).
pub(crate) fn lxc_apply_pending(c: &mut GuestConf, vmid: u32, seed: u64, errors: &mut BTreeMap<String, String>) {
    for opt in pd_names(c) {
        if numbered(&opt, "mp")
            && let Some(old) = sget(&c.current, &opt)
        {
            let volid = old.split(',').next().unwrap_or("").to_string();
            if mountpoint_type(&volid) == "volume" && !volume_in_use(c, &volid, &opt) {
                add_unused_volume(c, &volid);
            }
        }
        sremove(&mut c.current, &opt);
        pd_remove(c, &opt);
    }
    cleanup_pending(c);
    for opt in skeys(&c.pending) {
        let value = sget(&c.pending, &opt).unwrap_or_default();
        let result = if numbered(&opt, "mp") {
            lxc_apply_mountpoint(c, vmid, &opt, false).map(|v| v.unwrap_or(value))
        } else if numbered(&opt, "net") {
            lxc_net(seed, vmid, &opt, &value)
        } else {
            Ok(value)
        };
        match result {
            Ok(v) => move_pending(c, &opt, &v),
            Err(e) => {
                errors.insert(
                    opt.clone(),
                    format!("unable to apply pending change {opt} : {}", e.message),
                );
            }
        }
    }
}

/// `vmconfig_hotplug_pending` (pve-container): fast-plug options, CPU limits, memory and
/// swap, network devices, new mount points and devices take effect on a running container;
/// everything else (features, nameserver, rootfs, ostype, ...) stays pending until restart.
pub(crate) fn lxc_hotplug_pending(c: &mut GuestConf, vmid: u32, seed: u64, errors: &mut BTreeMap<String, String>) {
    for opt in skeys(&c.pending) {
        if LXC_FASTPLUG.contains(&opt.as_str()) {
            let v = sget(&c.pending, &opt).unwrap_or_default();
            move_pending(c, &opt, &v);
        }
    }
    for opt in pd_names(c) {
        let hot = LXC_FASTPLUG.contains(&opt.as_str())
            || numbered(&opt, "unused")
            || numbered(&opt, "net")
            || matches!(opt.as_str(), "swap" | "cpulimit" | "cpuunits");
        if hot {
            sremove(&mut c.current, &opt);
            pd_remove(c, &opt);
        }
    }
    for opt in skeys(&c.pending) {
        let value = sget(&c.pending, &opt).unwrap_or_default();
        let result: Result<Option<String>, ApiError> =
            if matches!(opt.as_str(), "cpulimit" | "cpuunits" | "memory" | "swap") {
                Ok(Some(value))
            } else if numbered(&opt, "net") {
                lxc_net(seed, vmid, &opt, &value).map(Some)
            } else if numbered(&opt, "mp") {
                lxc_apply_mountpoint(c, vmid, &opt, true)
            } else if numbered(&opt, "dev") {
                Ok((sget(&c.current, &opt).is_none()).then_some(value))
            } else {
                Ok(None)
            };
        match result {
            Ok(Some(v)) => move_pending(c, &opt, &v),
            Ok(None) => {}
            Err(e) => {
                errors.insert(opt.clone(), format!("unable to hotplug {opt}: {}", e.message));
            }
        }
    }
}

/// Options a running VM takes at once (qemu-server `$fast_plug_option`).
const QEMU_FASTPLUG: &[&str] = &[
    "description",
    "hookscript",
    "lock",
    "name",
    "onboot",
    "protection",
    "shares",
    "startup",
    "tags",
    "vmstatestorage",
];

/// qemu-server `update_vm_api`, simplified: changes are written to `[PENDING]`, new disks
/// allocated and NICs given a MAC at once; a stopped VM applies everything; a running VM
/// (default `hotplug: network,disk,usb`) applies fast-plug options, network devices and new
/// disks / CD-ROM changes, and keeps the rest (cores, memory, cpu, ...) pending.
pub(crate) fn qemu_update(
    c: &mut GuestConf,
    vmid: u32,
    running: bool,
    changes: &Changes,
    seed: u64,
) -> Result<(), ApiError> {
    let alias = |k: &String| if k == "cdrom" { "ide2".to_string() } else { k.clone() };
    let mut set: BTreeMap<String, String> = changes.set.iter().map(|(k, v)| (alias(k), v.clone())).collect();
    let mut delete: Vec<String> = changes.delete.iter().map(alias).collect();
    for opt in changes.revert.iter().map(alias) {
        if let Some(cur) = sget(&c.current, &opt) {
            set.insert(opt, cur);
        } else if sget(&c.pending, &opt).is_some() {
            delete.push(opt);
        }
    }
    for opt in &delete {
        if sget(&c.current, opt).is_none() && sget(&c.pending, opt).is_none() {
            continue;
        }
        sremove(&mut c.pending, opt);
        pd_add(c, opt, false);
    }
    for (opt, value) in &set {
        let value = if is_qemu_drive(opt) {
            qemu_drive(c, vmid, opt, value)?
        } else if numbered(opt, "net") {
            qemu_net(seed, vmid, opt, value)?
        } else if opt == "tags" {
            unique_tags(value)
        } else {
            value.clone()
        };
        sset(&mut c.pending, PveKind::Qemu, opt, &value);
        pd_remove(c, opt);
    }
    cleanup_pending(c);
    if running {
        qemu_hotplug_pending(c);
    } else {
        qemu_apply_pending(c);
    }
    Ok(())
}

fn detach_drive(c: &mut GuestConf, opt: &str) {
    if let Some(old) = sget(&c.current, opt)
        && is_qemu_drive(opt)
        && !is_cdrom(&old)
    {
        let volid = old.split(',').next().unwrap_or("").to_string();
        if volid.contains(':') && !volume_in_use(c, &volid, opt) {
            add_unused_volume(c, &volid);
        }
    }
}

/// qemu-server `vmconfig_apply_pending`.
pub(crate) fn qemu_apply_pending(c: &mut GuestConf) {
    for opt in pd_names(c) {
        detach_drive(c, &opt);
        sremove(&mut c.current, &opt);
        pd_remove(c, &opt);
    }
    cleanup_pending(c);
    for opt in skeys(&c.pending) {
        let value = sget(&c.pending, &opt).unwrap_or_default();
        if is_qemu_drive(&opt)
            && sget(&c.current, &opt).is_some_and(|old| old.split(',').next() != value.split(',').next())
        {
            detach_drive(c, &opt);
        }
        move_pending(c, &opt, &value);
    }
}

fn qemu_hotplug_pending(c: &mut GuestConf) {
    for opt in pd_names(c) {
        let hot = QEMU_FASTPLUG.contains(&opt.as_str())
            || numbered(&opt, "net")
            || numbered(&opt, "unused")
            || (is_qemu_drive(&opt) && sget(&c.current, &opt).is_some());
        if hot {
            detach_drive(c, &opt);
            sremove(&mut c.current, &opt);
            pd_remove(c, &opt);
        }
    }
    for opt in skeys(&c.pending) {
        let value = sget(&c.pending, &opt).unwrap_or_default();
        let hot = QEMU_FASTPLUG.contains(&opt.as_str())
            || numbered(&opt, "net")
            || (is_qemu_drive(&opt) && (sget(&c.current, &opt).is_none() || is_cdrom(&value)));
        if hot {
            move_pending(c, &opt, &value);
        }
    }
}

/// Apply every pending change (start, reboot).
pub(crate) fn apply_all_pending(c: &mut GuestConf, vmid: u32, seed: u64) -> Result<(), ApiError> {
    if c.pending.is_empty() && c.pending_delete.is_empty() {
        return Ok(());
    }
    match c.kind {
        PveKind::Lxc => {
            let mut errors = BTreeMap::new();
            lxc_apply_pending(c, vmid, seed, &mut errors);
            match errors.into_iter().next() {
                Some((_, msg)) => Err(ApiError::die(msg)),
                None => Ok(()),
            }
        }
        PveKind::Qemu => {
            qemu_apply_pending(c);
            Ok(())
        }
    }
}

// ---- creation -------------------------------------------------------------------------------

/// `PVE::Storage::check_volume_access` for the `ostemplate` of a new container.
pub(crate) fn check_ostemplate(ostemplate: &str) -> Result<(), ApiError> {
    let Some((storage, volname)) = ostemplate.split_once(':') else {
        return Err(ApiError::die(format!("unable to parse volume ID '{ostemplate}'")));
    };
    let storage_ok = storage.len() >= 2
        && storage.as_bytes()[0].is_ascii_alphabetic()
        && storage.as_bytes()[storage.len() - 1].is_ascii_alphanumeric()
        && storage
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !storage_ok || volname.is_empty() {
        return Err(ApiError::die(format!("unable to parse volume ID '{ostemplate}'")));
    }
    match volname.strip_prefix("vztmpl/") {
        Some(file) if !file.is_empty() && !file.contains('/') => Ok(()),
        _ => Err(ApiError::die(format!(
            "unable to use volume {ostemplate} - content type needs to be 'vztmpl'"
        ))),
    }
}

/// What `PVE::LXC::Setup` would detect from the template's root filesystem, guessed from
/// the template's file name (`ubuntu-22.04-standard_...` is `ubuntu`).
pub(crate) fn detect_ostype(ostemplate: &str) -> &'static str {
    let file = ostemplate.rsplit('/').next().unwrap_or(ostemplate).to_ascii_lowercase();
    match file.split(['-', '_']).next().unwrap_or("") {
        "ubuntu" => "ubuntu",
        "debian" => "debian",
        "alpine" => "alpine",
        "centos" | "rockylinux" | "almalinux" | "oracle" | "oraclelinux" | "rhel" => "centos",
        "fedora" => "fedora",
        "archlinux" => "archlinux",
        "opensuse" => "opensuse",
        "gentoo" => "gentoo",
        "devuan" => "devuan",
        "nixos" => "nixos",
        _ => "unmanaged",
    }
}

fn detect_arch(ostemplate: &str) -> &'static str {
    let file = ostemplate.rsplit('/').next().unwrap_or(ostemplate).to_ascii_lowercase();
    if file.contains("arm64") || file.contains("aarch64") {
        "arm64"
    } else if file.contains("armhf") {
        "armhf"
    } else if file.contains("i386") {
        "i386"
    } else {
        "amd64"
    }
}

/// The synchronous half of `POST /nodes/{node}/lxc` (after the permission checks): the
/// config without disks, and the mount points to create in the task.
pub(crate) fn lxc_create_prepare(
    vmid: u32,
    params: &BTreeMap<String, String>,
    storage: &str,
    unprivileged: bool,
    authid: &str,
    seed: u64,
) -> Result<(GuestConf, BTreeMap<String, String>), ApiError> {
    let mut mp_param: BTreeMap<String, String> = BTreeMap::new();
    let mut no_disk = BTreeMap::new();
    for (opt, value) in params {
        if opt == "rootfs" || numbered(opt, "mp") {
            let v = if new_disk(value).is_some_and(|(s, _)| s.is_none()) {
                format!("{storage}:{value}")
            } else {
                value.clone()
            };
            mp_param.insert(opt.clone(), v);
        } else if numbered(opt, "unused") {
            // "ignoring 'unusedN', cannot create/restore with unused volume"
        } else {
            no_disk.insert(opt.clone(), value.clone());
        }
    }
    if !mp_param.is_empty() && !mp_param.contains_key("rootfs") {
        return Err(ApiError::die(
            "mount points configured, but 'rootfs' not set - aborting",
        ));
    }
    let check_storage = |sid: &str| -> Result<(), ApiError> {
        if storage_holds_disks(sid) {
            Ok(())
        } else {
            Err(ApiError::param(
                "storage",
                format!("storage '{sid}' does not support container directories"),
            ))
        }
    };
    for (opt, value) in &mp_param {
        let m = parse_prop(PveKind::Lxc, opt, value)?;
        let volume = m.get("volume").cloned().unwrap_or_default();
        if mountpoint_type(&volume) != "volume" {
            if authid != "root@pam" {
                return Err(ApiError::die("Only root can pass arbitrary filesystem paths."));
            }
        } else if let Some(sid) = volume_storage(&volume) {
            check_storage(sid)?;
        }
    }
    if !mp_param.contains_key("rootfs") {
        check_storage(storage)?;
        mp_param.insert("rootfs".into(), format!("{storage}:4"));
    }
    let mut c = GuestConf::new(PveKind::Lxc);
    let changes = Changes {
        set: no_disk,
        ..Changes::default()
    };
    lxc_update(&mut c, vmid, false, &changes, seed)?;
    if unprivileged {
        c.options.insert("unprivileged".into(), "1".into());
    }
    Ok((c, mp_param))
}

/// The task half of the container creation: disks, OS detection, defaults.
pub(crate) fn lxc_create_finish(
    mut c: GuestConf,
    mp_param: &BTreeMap<String, String>,
    vmid: u32,
    ostemplate: &str,
) -> Result<GuestConf, ApiError> {
    let mut keys: Vec<&String> = mp_param.keys().collect();
    keys.sort_by_key(|k| (k.as_str() != "rootfs", k.as_str()));
    for key in keys {
        let value = lxc_mountpoint(&c, vmid, key, &mp_param[key])?;
        c.options.insert(key.clone(), value);
    }
    c.options
        .entry("arch".into())
        .or_insert_with(|| detect_arch(ostemplate).to_string());
    c.options
        .entry("ostype".into())
        .or_insert_with(|| detect_ostype(ostemplate).to_string());
    let truthy = |v: Option<&String>| v.is_some_and(|v| !v.is_empty() && v != "0");
    if !truthy(c.options.get("hostname")) {
        c.options.insert("hostname".into(), format!("CT{vmid}"));
    }
    if !truthy(c.options.get("memory")) {
        c.options.insert("memory".into(), "512".into());
    }
    c.options.entry("swap".into()).or_insert_with(|| "512".into());
    Ok(c)
}

/// The QEMU version a new VM records in `meta: creation-qemu=...` (PVE 9.1).
const CREATION_QEMU: &str = "10.1.2";

/// The config a new VM gets (`qmcreate`): disks allocated, NICs with MAC addresses, and what
/// qemu-server adds itself: `boot` (when not given), `smbios1` UUID, `vmgenid`, `meta`.
pub(crate) fn qemu_create_conf(
    vmid: u32,
    params: &BTreeMap<String, String>,
    seed: u64,
    now: u64,
) -> Result<GuestConf, ApiError> {
    let mut c = GuestConf::new(PveKind::Qemu);
    for (opt, value) in params {
        let opt = if opt == "cdrom" { "ide2" } else { opt.as_str() };
        let value = if is_qemu_drive(opt) {
            qemu_drive(&c, vmid, opt, value)?
        } else if numbered(opt, "net") {
            qemu_net(seed, vmid, opt, value)?
        } else if opt == "tags" {
            unique_tags(value)
        } else {
            value.clone()
        };
        sset(&mut c.current, PveKind::Qemu, opt, &value);
    }
    if !c.options.contains_key("boot") {
        let order = default_boot_order(&c.current);
        if !order.is_empty() {
            c.options.insert("boot".into(), format!("order={}", order.join(";")));
        }
    }
    if !c.options.contains_key("smbios1") {
        let uuid = store::uuid_from(seed, &format!("smbios1-{vmid}"));
        c.options.insert("smbios1".into(), format!("uuid={uuid}"));
    }
    if c.options.get("vmgenid").is_none_or(|v| v == "1") {
        let uuid = store::uuid_from(seed, &format!("vmgenid-{vmid}"));
        c.options.insert("vmgenid".into(), uuid);
    } else if c.options.get("vmgenid").map(String::as_str) == Some("0") {
        c.options.remove("vmgenid");
    }
    c.options
        .insert("meta".into(), format!("creation-qemu={CREATION_QEMU},ctime={now}"));
    Ok(c)
}

/// `get_default_bootdevices`: the first disk, the first CD-ROM, the first NIC.
fn default_boot_order(s: &Section) -> Vec<String> {
    let drives: Vec<String> = (0..4)
        .map(|i| format!("ide{i}"))
        .chain((0..6).map(|i| format!("sata{i}")))
        .chain((0..31).map(|i| format!("scsi{i}")))
        .chain((0..16).map(|i| format!("virtio{i}")))
        .filter(|k| s.options.contains_key(k))
        .collect();
    let mut out = Vec::new();
    if let Some(d) = drives.iter().find(|k| !is_cdrom(&s.options[*k])) {
        out.push(d.clone());
    }
    if let Some(d) = drives.iter().find(|k| is_cdrom(&s.options[*k])) {
        out.push(d.clone());
    }
    if let Some(n) = (0..32).map(|i| format!("net{i}")).find(|k| s.options.contains_key(k)) {
        out.push(n);
    }
    out
}

// ---- API views ------------------------------------------------------------------------------

/// A config value typed as Perl's JSON encoder sends it: integers and booleans (normalised
/// by `check_type` on parse) are numbers, everything else strings.
pub(crate) fn typed(kind: PveKind, key: &str, value: &str) -> Value {
    let lookup = if kind == PveKind::Qemu && key == "cdrom" {
        "ide2"
    } else {
        key
    };
    let ty = schema().config_property(kind, lookup).and_then(|p| p.ty.as_deref());
    match ty {
        Some("integer") | Some("boolean") => value
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(value.to_string())),
        _ => Value::String(value.to_string()),
    }
}

/// `load_current_config`: the current section with the pending changes applied (unless
/// `current_only`).
pub(crate) fn effective_section(c: &GuestConf, current_only: bool) -> Section {
    let mut s = c.current.clone();
    if !current_only {
        for key in skeys(&c.pending) {
            if let Some(v) = sget(&c.pending, &key) {
                sset(&mut s, c.kind, &key, &v);
            }
        }
        for key in pd_names(c) {
            sremove(&mut s, &key);
        }
    }
    s
}

/// `GET .../config`.
pub(crate) fn api_config(c: &GuestConf, digest: &str, current_only: bool) -> Value {
    let s = effective_section(c, current_only);
    let mut out = Map::new();
    for key in skeys(&s) {
        if let Some(v) = sget(&s, &key) {
            out.insert(key.clone(), typed(c.kind, &key, &v));
        }
    }
    if c.kind == PveKind::Lxc && !s.raw_lxc.is_empty() {
        let pairs: Vec<Value> = s
            .raw_lxc
            .iter()
            .map(|(k, v)| Value::Array(vec![Value::String(k.clone()), Value::String(v.clone())]))
            .collect();
        out.insert("lxc".into(), Value::Array(pairs));
    }
    out.insert("digest".into(), Value::String(digest.to_string()));
    Value::Object(out)
}

/// `GET .../pending`: `PVE::GuestHelpers::config_with_pending_array` (sorted by key).
pub(crate) fn pending_array(c: &GuestConf, digest: &str) -> Value {
    let mut current: BTreeMap<String, String> = skeys(&c.current)
        .into_iter()
        .filter_map(|k| sget(&c.current, &k).map(|v| (k, v)))
        .collect();
    current.insert("digest".into(), digest.to_string());
    let pending: BTreeMap<String, String> = skeys(&c.pending)
        .into_iter()
        .filter_map(|k| sget(&c.pending, &k).map(|v| (k, v)))
        .collect();
    let deletes: BTreeMap<&str, bool> = c
        .pending_delete
        .iter()
        .map(|d| (pd_name(d), d.starts_with('!')))
        .collect();
    let delete_keys: Vec<String> = deletes.keys().map(|k| k.to_string()).collect();
    let mut keys: Vec<&String> = current.keys().chain(pending.keys()).chain(delete_keys.iter()).collect();
    keys.sort();
    keys.dedup();
    let mut items = Vec::new();
    for key in keys {
        let mut item = Map::new();
        item.insert("key".into(), Value::String(key.clone()));
        if let Some(v) = current.get(key) {
            item.insert("value".into(), typed(c.kind, key, v));
        }
        if let Some(v) = pending.get(key) {
            item.insert("pending".into(), typed(c.kind, key, v));
        }
        if let Some(force) = deletes.get(key.as_str()) {
            item.insert("delete".into(), Value::from(if *force { 2 } else { 1 }));
        }
        items.push(Value::Object(item));
    }
    Value::Array(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_sorted_lowercased_and_unique() {
        assert_eq!(unique_tags("k3s,Driftless;k3s b"), "b;driftless;k3s");
        assert_eq!(unique_tags(""), "");
    }

    #[test]
    fn sizes_and_new_disks() {
        assert_eq!(format_size(gib_to_bytes("32")), "32G");
        assert_eq!(format_size(gib_to_bytes("0.5")), "512M");
        assert_eq!(format_size(gib_to_bytes("1024")), "1T");
        assert_eq!(new_disk("local-lvm:32"), Some((Some("local-lvm"), "32")));
        assert_eq!(new_disk("8"), Some((None, "8")));
        assert_eq!(new_disk("local-lvm:vm-100-disk-0"), None);
        assert_eq!(parse_size("32G"), Some(32 << 30));
    }

    #[test]
    fn lxc_network_gets_type_and_mac_in_canonical_order() {
        let v = lxc_net(1, 100, "net0", "bridge=vmbr0,name=eth0,ip=dhcp").unwrap();
        let mac = store::mac_from(1, 100, "net0", "bridge=vmbr0,name=eth0,ip=dhcp");
        assert_eq!(v, format!("name=eth0,bridge=vmbr0,hwaddr={mac},ip=dhcp,type=veth"));
    }

    #[test]
    fn qemu_network_and_disks() {
        let v = qemu_net(1, 200, "net0", "virtio,bridge=vmbr0,firewall=1").unwrap();
        assert!(
            v.starts_with("virtio=BC:24:11:") && v.ends_with(",bridge=vmbr0,firewall=1"),
            "{v}"
        );
        let kept = qemu_net(1, 200, "net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0").unwrap();
        assert_eq!(kept, "virtio=BC:24:11:00:00:01,bridge=vmbr0");
        let c = GuestConf::new(PveKind::Qemu);
        let d = qemu_drive(&c, 200, "scsi0", "local-lvm:32,iothread=1,discard=on").unwrap();
        assert_eq!(d, "local-lvm:vm-200-disk-0,discard=on,iothread=1,size=32G");
        assert_eq!(
            qemu_drive(&c, 200, "ide2", "local:iso/talos.iso,media=cdrom").unwrap(),
            "local:iso/talos.iso,media=cdrom"
        );
    }

    #[test]
    fn features_permission_for_tokens() {
        let new = |v: &str| BTreeMap::from([("features".to_string(), v.to_string())]);
        let tok = "root@pam!x";
        assert!(lxc_check_perm(tok, None, &new("nesting=1"), &[], true).is_ok());
        let e = lxc_check_perm(tok, None, &new("nesting=1,keyctl=1"), &[], true).unwrap_err();
        assert_eq!(e.status, 403);
        assert_eq!(
            e.message,
            "Permission check failed (changing feature flags (except nesting) is only allowed for root@pam)\n"
        );
        let e = lxc_check_perm(tok, None, &new("nesting=1"), &[], false).unwrap_err();
        assert!(e.message.contains("privileged container"));
        assert!(lxc_check_perm("root@pam", None, &new("keyctl=1"), &[], false).is_ok());
        // unchanged features are not a change
        let mut old = Section::default();
        old.options.insert("features".into(), "keyctl=1,nesting=1".into());
        assert!(lxc_check_perm(tok, Some(&old), &new("nesting=1,keyctl=1"), &[], true).is_ok());
        assert!(lxc_check_perm(tok, Some(&old), &new("nesting=0,keyctl=1"), &[], true).is_ok());
        assert!(lxc_check_perm(tok, Some(&old), &new("nesting=1"), &[], true).is_err());
    }

    #[test]
    fn running_container_keeps_non_hotplug_changes_pending() {
        let mut c = conf::parse("cores: 1\nhostname: a\nmemory: 512\nostype: debian\n", PveKind::Lxc).unwrap();
        let changes = Changes {
            set: BTreeMap::from([
                ("cores".to_string(), "2".to_string()),
                ("features".to_string(), "nesting=1".to_string()),
                ("nameserver".to_string(), "1.1.1.1,8.8.8.8".to_string()),
            ]),
            delete: vec!["hostname".into()],
            ..Changes::default()
        };
        lxc_update(&mut c, 100, true, &changes, 0).unwrap();
        assert_eq!(
            c.write(),
            "cores: 2\nmemory: 512\nostype: debian\n\n[pve:pending]\nfeatures: nesting=1\nnameserver: 1.1.1.1 8.8.8.8\n"
        );
        apply_all_pending(&mut c, 100, 0).unwrap();
        assert_eq!(
            c.write(),
            "cores: 2\nfeatures: nesting=1\nmemory: 512\nnameserver: 1.1.1.1 8.8.8.8\nostype: debian\n"
        );
    }
}
