//! The sandbox's files: guest configs laid out like `/etc/pve`, the power state, the
//! storages of each node, and the deterministic values (MAC addresses, UUIDs) the sandbox
//! generates.
//!
//! Storages are those of a fresh Proxmox VE install: `local` (a directory: templates, ISOs,
//! backups) whose files live in `STATE/.sandbox/storage/<node>/local/` laid out like
//! /var/lib/vz (`template/cache/*.tar.zst`, `template/iso/*.iso`, `dump/`), seeded with the
//! examples' template and ISO; and `local-lvm` (LVM-thin: guest disks), whose volumes are the
//! disks the guest configs name and whose size is an option.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::SandboxError;
use crate::guest::{numbered, parse_size};
use driftless::pve::conf::{self, GuestConf, PveKind};

/// `splitmix64`: a small, well-mixed hash of a `u64`.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash_bytes(seed: u64, parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// A UUID-shaped (version 4 bits set) value derived from `seed` and `what`.
pub(crate) fn uuid_from(seed: u64, what: &str) -> String {
    let mut b = hash_bytes(seed, &["uuid", what]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b[..16].iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `PVE::Tools::random_ether_addr` with the datacenter default prefix `BC:24:11`, but
/// deterministic: a function of the seed, the guest, the interface and what it was given.
pub(crate) fn mac_from(seed: u64, vmid: u32, key: &str, salt: &str) -> String {
    let b = hash_bytes(seed, &["mac", &vmid.to_string(), key, salt]);
    format!("BC:24:11:{:02X}:{:02X}:{:02X}", b[0], b[1], b[2])
}

/// The default size of `local-lvm`.
pub(crate) const DEFAULT_LVM_SIZE: u64 = 256 << 30;

/// `pve-node` format.
pub(crate) fn valid_node_name(node: &str) -> bool {
    let b = node.as_bytes();
    !b.is_empty() && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') && b[0] != b'-' && b[b.len() - 1] != b'-'
}

/// The directory under `nodes/<node>/` holding one kind of guest.
pub(crate) fn kind_dir(kind: PveKind) -> &'static str {
    match kind {
        PveKind::Lxc => "lxc",
        PveKind::Qemu => "qemu-server",
    }
}

/// A config file as read: raw bytes (for the digest) and the lenient parse.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub node: String,
    pub kind: PveKind,
    pub vmid: u32,
    pub digest: String,
    pub conf: GuestConf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PowerFile {
    #[serde(default)]
    pub guests: BTreeMap<u32, PowerEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PowerEntry {
    pub status: String,
    /// Unix time the guest was started.
    #[serde(default)]
    pub since: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Store {
    pub root: PathBuf,
    pub nodes: Vec<String>,
    /// The size of each node's `local-lvm`, in bytes.
    pub lvm_size: u64,
}

/// What a fresh install's `local` holds in the sandbox: the examples' template and ISO, and
/// the Debian template some tests create containers from.
pub(crate) const SEEDED_FILES: &[(&str, &str)] = &[
    ("template/cache", "ubuntu-22.04-standard_22.04-1_amd64.tar.zst"),
    ("template/cache", "debian-12-standard_12.7-1_amd64.tar.zst"),
    ("template/iso", "metal-amd64.iso"),
];

/// The size of `local` (the root filesystem's directory storage) and what the system uses of it.
const LOCAL_SIZE: u64 = 100 << 30;
const LOCAL_BASE_USED: u64 = 8 << 30;

/// One storage of one node, as `GET /nodes/{node}/storage` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageInfo {
    pub id: &'static str,
    /// The plugin type: `dir`, `lvmthin`.
    pub plugin: &'static str,
    /// Sorted, as Proxmox prints a content list.
    pub content: &'static str,
    pub total: u64,
    pub used: u64,
}

/// One volume of a storage, as `GET .../storage/{storage}/content` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Volume {
    pub volid: String,
    pub content: &'static str,
    pub format: &'static str,
    pub size: u64,
    pub vmid: Option<u32>,
    pub ctime: u64,
}

impl Store {
    pub fn new(root: PathBuf, nodes: Vec<String>) -> Store {
        Store {
            root,
            nodes,
            lvm_size: DEFAULT_LVM_SIZE,
        }
    }

    /// A store over every node directory found under `root/nodes`.
    pub fn discover(root: &Path) -> Result<Store, SandboxError> {
        let dir = root.join("nodes");
        let mut nodes = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| SandboxError::io(&dir, e))?;
        for entry in entries.flatten() {
            if entry.path().is_dir()
                && let Some(name) = entry.file_name().to_str()
                && valid_node_name(name)
            {
                nodes.push(name.to_string());
            }
        }
        nodes.sort();
        Ok(Store::new(root.to_path_buf(), nodes))
    }

    pub fn init(&self) -> Result<(), SandboxError> {
        for node in &self.nodes {
            for kind in [PveKind::Lxc, PveKind::Qemu] {
                let dir = self.root.join("nodes").join(node).join(kind_dir(kind));
                std::fs::create_dir_all(&dir).map_err(|e| SandboxError::io(&dir, e))?;
            }
        }
        let dir = self.root.join(".sandbox");
        std::fs::create_dir_all(&dir).map_err(|e| SandboxError::io(&dir, e))?;
        for node in &self.nodes {
            // Seeded once: a test (or a user) that removes a template keeps it removed.
            let local = self.storage_dir(node, "local");
            if local.exists() {
                continue;
            }
            for sub in ["template/cache", "template/iso", "dump"] {
                let d = local.join(sub);
                std::fs::create_dir_all(&d).map_err(|e| SandboxError::io(&d, e))?;
            }
            for (sub, file) in SEEDED_FILES {
                let path = local.join(sub).join(file);
                std::fs::write(&path, format!("sandbox stand-in for {file}\n"))
                    .map_err(|e| SandboxError::io(&path, e))?;
            }
        }
        Ok(())
    }

    /// Where a directory storage's files are: `STATE/.sandbox/storage/<node>/<storage>`.
    pub fn storage_dir(&self, node: &str, storage: &str) -> PathBuf {
        self.root.join(".sandbox").join("storage").join(node).join(storage)
    }

    /// The storages of `node`, with what is used of each.
    pub fn storages(&self, node: &str) -> Vec<StorageInfo> {
        let local_used: u64 = self.volumes(node, "local").iter().map(|v| v.size).sum();
        let lvm_used: u64 = self.volumes(node, "local-lvm").iter().map(|v| v.size).sum();
        vec![
            StorageInfo {
                id: "local",
                plugin: "dir",
                content: "backup,iso,vztmpl",
                total: LOCAL_SIZE,
                used: (LOCAL_BASE_USED + local_used).min(LOCAL_SIZE),
            },
            StorageInfo {
                id: "local-lvm",
                plugin: "lvmthin",
                content: "images,rootdir",
                total: self.lvm_size,
                used: lvm_used.min(self.lvm_size),
            },
        ]
    }

    /// The volumes of one storage of `node`: the files of `local`, the guest disks of
    /// `local-lvm` (any other storage id is empty).
    pub fn volumes(&self, node: &str, storage: &str) -> Vec<Volume> {
        let mut out = Vec::new();
        if storage == "local" {
            let dir = self.storage_dir(node, storage);
            for (sub, content, exts) in [
                ("template/cache", "vztmpl", &[".tar.gz", ".tar.xz", ".tar.zst"][..]),
                ("template/iso", "iso", &[".iso", ".img"][..]),
                ("dump", "backup", &[".tar.zst", ".tar.gz", ".vma.zst", ".tar.lzo"][..]),
            ] {
                let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let Some(ext) = exts.iter().find(|e| name.ends_with(*e)) else {
                        continue;
                    };
                    let Ok(meta) = entry.metadata() else { continue };
                    if !meta.is_file() {
                        continue;
                    }
                    let kind = if content == "backup" { "backup" } else { content };
                    out.push(Volume {
                        volid: format!("{storage}:{}/{name}", kind),
                        content,
                        format: match content {
                            "iso" => "iso",
                            _ => ext.trim_start_matches('.').split('.').next_back().unwrap_or(""),
                        },
                        size: meta.len(),
                        vmid: None,
                        ctime: meta
                            .modified()
                            .ok()
                            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                            .map(|d| d.as_secs())
                            .unwrap_or(0),
                    });
                }
            }
        } else if storage == "local-lvm" {
            for g in self.list().into_iter().filter(|g| g.node == node) {
                for (key, value) in &g.conf.options {
                    let is_disk = match g.kind {
                        PveKind::Lxc => key == "rootfs" || numbered(key, "mp"),
                        PveKind::Qemu => {
                            (["ide", "sata", "scsi", "virtio"].iter().any(|p| numbered(key, p))
                                || key == "efidisk0"
                                || key == "tpmstate0")
                                && !value.split(',').any(|p| p == "media=cdrom")
                        }
                    };
                    let volume = value.split(',').next().unwrap_or("");
                    let Some(name) = volume.strip_prefix("local-lvm:") else {
                        continue;
                    };
                    if !is_disk {
                        continue;
                    }
                    let size = value
                        .split(',')
                        .find_map(|p| p.strip_prefix("size="))
                        .and_then(parse_size)
                        .unwrap_or(0);
                    out.push(Volume {
                        volid: format!("local-lvm:{name}"),
                        content: if g.kind == PveKind::Lxc { "rootdir" } else { "images" },
                        format: "raw",
                        size,
                        vmid: Some(g.vmid),
                        ctime: 0,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.volid.cmp(&b.volid));
        out
    }

    pub fn conf_path(&self, node: &str, kind: PveKind, vmid: u32) -> PathBuf {
        self.root
            .join("nodes")
            .join(node)
            .join(kind_dir(kind))
            .join(format!("{vmid}.conf"))
    }

    /// The path as Proxmox names it in messages (`nodes/pve/lxc/100.conf`).
    pub fn cfs_path(node: &str, kind: PveKind, vmid: u32) -> String {
        format!("nodes/{node}/{}/{vmid}.conf", kind_dir(kind))
    }

    pub fn has_node(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n == node)
    }

    /// Read and parse a guest config; `None` when the file does not exist.
    pub fn load(&self, node: &str, kind: PveKind, vmid: u32) -> std::io::Result<Option<Loaded>> {
        let path = self.conf_path(node, kind, vmid);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&bytes);
        let (conf, _warnings) = conf::parse_lenient(&text, kind);
        Ok(Some(Loaded {
            node: node.to_string(),
            kind,
            vmid,
            digest: conf::digest_bytes(&bytes),
            conf,
        }))
    }

    pub fn write(&self, node: &str, kind: PveKind, vmid: u32, conf: &GuestConf) -> std::io::Result<()> {
        atomic_write(&self.conf_path(node, kind, vmid), conf.write().as_bytes())
    }

    pub fn remove(&self, node: &str, kind: PveKind, vmid: u32) -> std::io::Result<()> {
        match std::fs::remove_file(self.conf_path(node, kind, vmid)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every guest config file: (node, kind, vmid), sorted by vmid.
    pub fn guest_ids(&self) -> Vec<(String, PveKind, u32)> {
        let mut out = Vec::new();
        for node in &self.nodes {
            for kind in [PveKind::Lxc, PveKind::Qemu] {
                let dir = self.root.join("nodes").join(node).join(kind_dir(kind));
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if let Some(vmid) = name.strip_suffix(".conf").and_then(|v| v.parse::<u32>().ok())
                        && vmid >= 100
                    {
                        out.push((node.clone(), kind, vmid));
                    }
                }
            }
        }
        out.sort_by_key(|(_, _, vmid)| *vmid);
        out
    }

    /// Where a vmid lives (vmids are unique in the cluster).
    pub fn find(&self, vmid: u32) -> Option<(String, PveKind)> {
        for node in &self.nodes {
            for kind in [PveKind::Lxc, PveKind::Qemu] {
                if self.conf_path(node, kind, vmid).is_file() {
                    return Some((node.clone(), kind));
                }
            }
        }
        None
    }

    pub fn list(&self) -> Vec<Loaded> {
        self.guest_ids()
            .into_iter()
            .filter_map(|(node, kind, vmid)| self.load(&node, kind, vmid).ok().flatten())
            .collect()
    }

    fn seed_path(&self) -> PathBuf {
        self.root.join(".sandbox").join("seed")
    }

    /// Remember the seed, so `pct` generates the same values as the server.
    pub fn write_seed(&self, seed: u64) -> Result<(), SandboxError> {
        let path = self.seed_path();
        atomic_write(&path, format!("{seed}\n").as_bytes()).map_err(|e| SandboxError::io(&path, e))
    }

    pub fn read_seed(&self) -> u64 {
        std::fs::read_to_string(self.seed_path())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn power_path(&self) -> PathBuf {
        self.root.join(".sandbox").join("status.json")
    }

    pub fn power(&self) -> PowerFile {
        std::fs::read(self.power_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn is_running(&self, vmid: u32) -> bool {
        self.power().guests.get(&vmid).is_some_and(|e| e.status == "running")
    }

    /// Seconds since the guest started, when it runs.
    pub fn uptime(&self, vmid: u32, now: u64) -> Option<u64> {
        self.power()
            .guests
            .get(&vmid)
            .filter(|e| e.status == "running")
            .map(|e| now.saturating_sub(e.since))
    }

    pub fn set_running(&self, vmid: u32, running: bool, now: u64) -> std::io::Result<()> {
        let mut p = self.power();
        if running {
            p.guests.insert(
                vmid,
                PowerEntry {
                    status: "running".into(),
                    since: now,
                },
            );
        } else {
            p.guests.remove(&vmid);
        }
        let text = serde_json::to_vec_pretty(&p).map_err(std::io::Error::other)?;
        let path = self.power_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        atomic_write(&path, &text)
    }
}

/// Write a temporary file in the same directory, then rename it over `path`.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.flush()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_values_are_deterministic_and_well_formed() {
        assert_eq!(mac_from(1, 100, "net0", "x"), mac_from(1, 100, "net0", "x"));
        assert_ne!(mac_from(1, 100, "net0", "x"), mac_from(2, 100, "net0", "x"));
        let mac = mac_from(7, 100, "net0", "");
        assert!(mac.starts_with("BC:24:11:") && mac.len() == 17, "{mac}");
        let u = uuid_from(3, "a");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(valid_node_name("pve-1") && !valid_node_name("-x") && !valid_node_name("a_b"));
    }
}
