//! Simulated containers for `pct exec` and `pct push`: a root filesystem per container under
//! `STATE/.sandbox/rootfs/<vmid>/`, and K3s as driftless drives it. The commands driftless
//! runs on a node are a fixed set (argv words and the constant scripts of `cluster::k3s` and
//! `cluster::node_access`); each is recognised exactly and simulated with its effect on the
//! node, anything else answers as a missing command would (status 127).
//!
//! K3s behaves as the real one does where driftless can tell: installing does not start the
//! service; a server's first start writes node-token and k3s.yaml; an agent (or a joining
//! server) starts only when a server at its `server:` URL runs and its token matches, and
//! fails like systemd otherwise; `node-label` and `node-taint` apply at registration only;
//! the node is registered with the simulated Kubernetes API (`cluster_state`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::SandboxError;
use crate::cluster_state::{self, SimNode};
use crate::store::{Store, atomic_write, uuid_from};
use driftless::cluster::{k3s, node_access};
use driftless::ports::Taint;

/// What a `pct exec` printed and its exit status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    fn ok(stdout: impl Into<Vec<u8>>) -> ExecOutput {
        ExecOutput {
            status: 0,
            stdout: stdout.into(),
            stderr: Vec::new(),
        }
    }
    fn fail(status: i32, stderr: impl Into<String>) -> ExecOutput {
        ExecOutput {
            status,
            stdout: Vec::new(),
            stderr: stderr.into().into_bytes(),
        }
    }
}

/// K3s on one simulated container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct K3sState {
    installed: Option<String>,
    enabled: Vec<String>,
    active: Option<String>,
    /// A server's join secret (node-token is `K10<ca hash>::server:<secret>`).
    server_secret: Option<String>,
}

pub fn rootfs(state_dir: &Path, vmid: u32) -> PathBuf {
    state_dir.join(".sandbox").join("rootfs").join(vmid.to_string())
}

fn in_root(state_dir: &Path, vmid: u32, path: &str) -> PathBuf {
    rootfs(state_dir, vmid).join(path.trim_start_matches('/'))
}

fn k3s_state_path(state_dir: &Path, vmid: u32) -> PathBuf {
    state_dir.join(".sandbox").join("k3s").join(format!("{vmid}.json"))
}

fn load_k3s(state_dir: &Path, vmid: u32) -> K3sState {
    std::fs::read(k3s_state_path(state_dir, vmid))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_k3s(state_dir: &Path, vmid: u32, s: &K3sState) -> std::io::Result<()> {
    let p = k3s_state_path(state_dir, vmid);
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    atomic_write(&p, &serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?)
}

fn running_container(store: &Store, vmid: u32) -> Result<(), SandboxError> {
    match store.find(vmid) {
        Some((_, driftless::pve::conf::PveKind::Lxc)) if store.is_running(vmid) => Ok(()),
        Some((_, driftless::pve::conf::PveKind::Lxc)) => Err(SandboxError::Pct(format!("CT {vmid} not running"))),
        _ => Err(SandboxError::Pct(format!(
            "Configuration file 'nodes/{}/lxc/{vmid}.conf' does not exist",
            store.nodes.first().map(String::as_str).unwrap_or("pve")
        ))),
    }
}

/// A container's root filesystem starts as its template leaves it: the usual directories.
fn ensure_rootfs(state_dir: &Path, vmid: u32) -> Result<(), SandboxError> {
    let root = rootfs(state_dir, vmid);
    if root.is_dir() {
        return Ok(());
    }
    for dir in ["etc", "tmp", "root", "usr/local/bin", "var/lib"] {
        std::fs::create_dir_all(root.join(dir)).map_err(|e| SandboxError::io(&root, e))?;
    }
    Ok(())
}

fn parse_vmid(arg: Option<&String>, usage: &str) -> Result<u32, SandboxError> {
    arg.and_then(|a| a.parse().ok())
        .filter(|v| *v >= 100)
        .ok_or_else(|| SandboxError::Pct(format!("400 not enough arguments\n{usage}")))
}

/// `pct push <vmid> <file> <destination> [--perms MODE] [--user UID] [--group GID]`.
pub fn push(state_dir: &Path, args: &[String]) -> Result<String, SandboxError> {
    let usage = "pct push <vmid> <file> <destination> [OPTIONS]";
    let store = Store::discover(state_dir)?;
    let vmid = parse_vmid(args.first(), usage)?;
    let (Some(src), Some(dest)) = (args.get(1), args.get(2)) else {
        return Err(SandboxError::Pct(format!("400 not enough arguments\n{usage}")));
    };
    running_container(&store, vmid)?;
    ensure_rootfs(state_dir, vmid)?;
    let mut perms = 0o644;
    let mut i = 3;
    while i < args.len() {
        match (args[i].as_str(), args.get(i + 1)) {
            ("--perms", Some(v)) => {
                perms = u32::from_str_radix(v.trim_start_matches("0o"), 8).map_err(|_| {
                    SandboxError::Pct(format!(
                        "400 Parameter verification failed.\nperms: invalid format - '{v}'"
                    ))
                })?;
            }
            ("--user" | "--group", Some(_)) => {}
            (other, _) => return Err(SandboxError::Pct(format!("Unknown option: {other}\n{usage}"))),
        }
        i += 2;
    }
    let bytes = std::fs::read(src).map_err(|e| SandboxError::Pct(format!("failed to open {src} for reading: {e}")))?;
    let target = in_root(state_dir, vmid, dest);
    let parent = target.parent().expect("inside the rootfs");
    if !parent.is_dir() {
        return Err(SandboxError::Pct(format!(
            "failed to open {dest} for writing: No such file or directory"
        )));
    }
    std::fs::write(&target, &bytes).map_err(|e| SandboxError::io(&target, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(perms))
            .map_err(|e| SandboxError::io(&target, e))?;
    }
    Ok(String::new())
}

/// `pct exec <vmid> -- <command...>`.
pub fn exec(state_dir: &Path, args: &[String]) -> Result<ExecOutput, SandboxError> {
    let usage = "pct exec <vmid> [<extra-args>]";
    let store = Store::discover(state_dir)?;
    let vmid = parse_vmid(args.first(), usage)?;
    running_container(&store, vmid)?;
    ensure_rootfs(state_dir, vmid)?;
    let argv: Vec<&str> = args[1..]
        .iter()
        .map(String::as_str)
        .skip_while(|a| *a == "--")
        .collect();
    let sim = Node {
        state_dir,
        vmid,
        store: &store,
    };
    Ok(sim.run(&argv))
}

struct Node<'a> {
    state_dir: &'a Path,
    vmid: u32,
    store: &'a Store,
}

impl Node<'_> {
    fn path(&self, p: &str) -> PathBuf {
        in_root(self.state_dir, self.vmid, p)
    }

    fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.path(p)).ok()
    }

    fn run(&self, argv: &[&str]) -> ExecOutput {
        match argv {
            ["sh", "-c", script, "sh", rest @ ..] => self.script(script, rest),
            ["mkdir", "-p", "--", dir] | ["mkdir", "-p", dir] => match std::fs::create_dir_all(self.path(dir)) {
                Ok(()) => ExecOutput::ok(""),
                Err(e) => ExecOutput::fail(1, format!("mkdir: cannot create directory '{dir}': {e}\n")),
            },
            ["mv", "-f", "--", from, to] | ["mv", "-f", from, to] => {
                match std::fs::rename(self.path(from), self.path(to)) {
                    Ok(()) => ExecOutput::ok(""),
                    Err(e) => ExecOutput::fail(1, format!("mv: cannot move '{from}' to '{to}': {e}\n")),
                }
            }
            ["rm", "-f", "--", file] | ["rm", "-f", file] => match std::fs::remove_file(self.path(file)) {
                Ok(()) => ExecOutput::ok(""),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => ExecOutput::ok(""),
                Err(e) => ExecOutput::fail(1, format!("rm: cannot remove '{file}': {e}\n")),
            },
            ["cat", "--", file] | ["cat", file] => match std::fs::read(self.path(file)) {
                Ok(b) => ExecOutput::ok(b),
                Err(_) => ExecOutput::fail(1, format!("cat: {file}: No such file or directory\n")),
            },
            ["systemctl", "enable", svc] => self.enable(svc),
            ["systemctl", "restart", svc] | ["systemctl", "start", svc] => self.start(svc),
            ["systemctl", "stop", svc] => self.stop(svc),
            [program, ..] => ExecOutput::fail(127, format!("sh: 1: {program}: not found\n")),
            [] => ExecOutput::fail(255, "no command given\n"),
        }
    }

    fn script(&self, script: &str, args: &[&str]) -> ExecOutput {
        match (script, args) {
            (s, [path]) if s == node_access::READ_SCRIPT => match std::fs::read(self.path(path)) {
                Ok(b) => ExecOutput::ok(b),
                Err(_) => ExecOutput {
                    status: 3,
                    ..ExecOutput::default()
                },
            },
            (s, [config, token, pending]) if s == k3s::OBSERVE_SCRIPT => self.observe(config, token, pending),
            (s, [version, exec_as, _url]) if s == k3s::INSTALL_SCRIPT => self.install(Some(version), exec_as),
            (s, [exec_as]) if s == k3s::AIRGAP_INSTALL_SCRIPT => self.install(None, exec_as),
            _ => ExecOutput::fail(127, "the sandbox does not simulate this script\n"),
        }
    }

    fn observe(&self, config: &str, token: &str, pending: &str) -> ExecOutput {
        let st = load_k3s(self.state_dir, self.vmid);
        let mut out = String::new();
        if let Some(v) = &st.installed {
            out.push_str(&format!("version={v}\n"));
        }
        if let Some(a) = &st.active {
            out.push_str(&format!("active={a}\n"));
        }
        for (key, p) in [("config_sha256", config), ("token_sha256", token)] {
            if let Ok(b) = std::fs::read(self.path(p)) {
                out.push_str(&format!("{key}={}\n", k3s::sha256_hex(&b)));
            }
        }
        if self.path(pending).exists() {
            out.push_str("restart_pending=1\n");
        }
        ExecOutput::ok(out)
    }

    fn install(&self, version: Option<&str>, exec_as: &str) -> ExecOutput {
        if !matches!(exec_as, "server" | "agent") {
            return ExecOutput::fail(1, format!("[ERROR]  Unknown INSTALL_K3S_EXEC {exec_as}\n"));
        }
        let downloaded = version.is_some();
        let version = match version {
            Some(v) => v.to_string(),
            // Air-gapped: the version is the pushed binary's (the sandbox reads `k3s version X`
            // from the file when present).
            None => match self.read("/usr/local/bin/k3s") {
                Some(text) => text
                    .split_whitespace()
                    .skip_while(|w| *w != "version")
                    .nth(1)
                    .unwrap_or("v0.0.0+unknown")
                    .to_string(),
                None => {
                    return ExecOutput::fail(
                        1,
                        "[ERROR]  /usr/local/bin/k3s is missing for INSTALL_K3S_SKIP_DOWNLOAD\n",
                    );
                }
            },
        };
        let mut st = load_k3s(self.state_dir, self.vmid);
        st.installed = Some(version.clone());
        let svc = if exec_as == "server" { "k3s" } else { "k3s-agent" };
        if !st.enabled.iter().any(|s| s == svc) {
            st.enabled.push(svc.to_string());
        }
        if downloaded {
            let bin = self.path("/usr/local/bin/k3s");
            let _ = std::fs::create_dir_all(bin.parent().expect("has a parent"));
            let _ = std::fs::write(&bin, format!("#!/bin/sh\n# simulated: k3s version {version}\n"));
        }
        match save_k3s(self.state_dir, self.vmid, &st) {
            Ok(()) => ExecOutput::ok(format!(
                "[INFO]  Using {version} as release\n[INFO]  systemd: Enabling {svc} unit\n[INFO]  No change detected so skipping service start\n"
            )),
            Err(e) => ExecOutput::fail(1, format!("{e}\n")),
        }
    }

    fn enable(&self, svc: &str) -> ExecOutput {
        let mut st = load_k3s(self.state_dir, self.vmid);
        if st.installed.is_none() || !st.enabled.iter().any(|s| s == svc) && !matches!(svc, "k3s" | "k3s-agent") {
            return ExecOutput::fail(
                1,
                format!("Failed to enable unit: Unit file {svc}.service does not exist.\n"),
            );
        }
        if !st.enabled.iter().any(|s| s == svc) {
            st.enabled.push(svc.to_string());
        }
        match save_k3s(self.state_dir, self.vmid, &st) {
            Ok(()) => ExecOutput::ok(""),
            Err(e) => ExecOutput::fail(1, format!("{e}\n")),
        }
    }

    fn stop(&self, svc: &str) -> ExecOutput {
        let mut st = load_k3s(self.state_dir, self.vmid);
        if st.active.as_deref() == Some(svc) {
            st.active = None;
        }
        let _ = save_k3s(self.state_dir, self.vmid, &st);
        ExecOutput::ok("")
    }

    fn unit_failed(svc: &str, why: &str) -> ExecOutput {
        ExecOutput::fail(
            1,
            format!(
                "Job for {svc}.service failed because the control process exited with error code.\n\
                 See \"systemctl status {svc}.service\" and \"journalctl -xeu {svc}.service\" for details.\n\
                 journal: level=fatal msg=\"{why}\"\n"
            ),
        )
    }

    /// Start (or restart) K3s with the config on disk.
    fn start(&self, svc: &str) -> ExecOutput {
        let mut st = load_k3s(self.state_dir, self.vmid);
        let Some(version) = st.installed.clone() else {
            return ExecOutput::fail(
                5,
                format!("Failed to restart {svc}.service: Unit {svc}.service not found.\n"),
            );
        };
        if !matches!(svc, "k3s" | "k3s-agent") {
            return ExecOutput::fail(
                5,
                format!("Failed to restart {svc}.service: Unit {svc}.service not found.\n"),
            );
        }
        let config: BTreeMap<String, serde_json::Value> = match self.read(k3s::CONFIG_PATH) {
            Some(text) => match yaml_serde::from_str(&text) {
                Ok(c) => c,
                Err(e) => return Self::unit_failed(svc, &format!("Error: invalid config file: {e}")),
            },
            None => BTreeMap::new(),
        };
        let get = |k: &str| config.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let list = |k: &str| -> Vec<String> {
            match config.get(k) {
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
                Some(serde_json::Value::String(s)) => vec![s.clone()],
                _ => Vec::new(),
            }
        };
        let token = match get("token-file") {
            Some(f) => match self.read(&f) {
                Some(t) => Some(t.trim().to_string()),
                None => {
                    return Self::unit_failed(
                        svc,
                        &format!("failed to read token file {f}: no such file or directory"),
                    );
                }
            },
            None => get("token"),
        };
        let is_server = svc == "k3s";
        if let Some(url) = get("server") {
            // Joining: a server must run at that address, and the token must be its.
            let ip = url
                .trim_start_matches("https://")
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_default();
            let Some(server) = cluster_state::nodes(self.state_dir)
                .into_iter()
                .find(|n| n.internal_ip == ip && n.role == "server" && n.kubelet_running)
            else {
                return Self::unit_failed(
                    svc,
                    &format!(
                        "Error: failed to get CA certs: Get \"{url}/cacerts\": dial tcp {ip}:6443: connect: connection refused"
                    ),
                );
            };
            let server_secret = server
                .vmid
                .map(|v| load_k3s(self.state_dir, v))
                .and_then(|s| s.server_secret);
            let valid = match (&token, &server_secret) {
                (Some(t), Some(secret)) => t == secret || t.ends_with(&format!("::server:{secret}")),
                _ => false,
            };
            if !valid {
                return Self::unit_failed(svc, "token CA hash does not match the Cluster CA certificate hash");
            }
            if is_server {
                // Joining servers need embedded etcd on the server they join: one started
                // with cluster-init, or itself joined (K3s's sqlite cannot be joined).
                let etcd = server.vmid.is_some_and(|v| {
                    let text =
                        std::fs::read_to_string(in_root(self.state_dir, v, k3s::CONFIG_PATH)).unwrap_or_default();
                    let conf: BTreeMap<String, serde_json::Value> = yaml_serde::from_str(&text).unwrap_or_default();
                    conf.get("cluster-init") == Some(&serde_json::Value::Bool(true)) || conf.contains_key("server")
                });
                if !etcd {
                    return Self::unit_failed(
                        svc,
                        "this server is not a member of the etcd cluster: the server it joins runs no embedded etcd (start the first server with cluster-init)",
                    );
                }
                st.server_secret = server_secret;
            }
        } else if is_server {
            // K3s encrypts its bootstrap data with the token it was first started with: a
            // different token on an initialised server does not start.
            let secret_part = token.as_deref().map(|t| k3s::token_secret_part(t).to_string());
            match (&st.server_secret, secret_part) {
                (Some(have), Some(given)) if *have != given => {
                    return Self::unit_failed(
                        svc,
                        "starting kubernetes: preparing server: bootstrap data already found and encrypted with different token",
                    );
                }
                (Some(_), _) => {}
                (None, given) => {
                    st.server_secret = Some(given.unwrap_or_else(|| {
                        uuid_from(self.store.read_seed() ^ u64::from(self.vmid), "k3s-token").replace('-', "")
                    }));
                }
            }
        } else {
            return Self::unit_failed(svc, "--server is required for an agent");
        }
        if is_server {
            // The server's flannel-backend decides whether the cluster has a CNI of its own.
            let cni = match get("flannel-backend").as_deref() {
                Some("none") => cluster_state::BuiltinCni::None,
                _ => cluster_state::BuiltinCni::Flannel,
            };
            if let Err(e) = cluster_state::set_builtin_cni(self.state_dir, cni) {
                return ExecOutput::fail(1, format!("{e}\n"));
            }
            let secret = st.server_secret.clone().expect("set above");
            let node_token = format!(
                "K10{}::server:{secret}\n",
                &k3s::sha256_hex(b"sandbox-cluster-ca")[..40]
            );
            let p = self.path(k3s::SERVER_TOKEN_PATH);
            let _ = std::fs::create_dir_all(p.parent().expect("has a parent"));
            let _ = atomic_write(&p, node_token.as_bytes());
            if let Ok(admin) = std::fs::read_to_string(cluster_state::admin_kubeconfig_path(self.state_dir)) {
                let local = replace_server(&admin, "https://127.0.0.1:6443");
                let p = self.path(k3s::KUBECONFIG_PATH);
                let _ = std::fs::create_dir_all(p.parent().expect("has a parent"));
                let _ = atomic_write(&p, local.as_bytes());
            }
        }
        let hostname = self
            .store
            .find(self.vmid)
            .and_then(|(node, kind)| self.store.load(&node, kind, self.vmid).ok().flatten())
            .and_then(|l| l.conf.options.get("hostname").cloned());
        let name = get("node-name")
            .or(hostname)
            .unwrap_or_else(|| format!("ct{}", self.vmid));
        let existing = cluster_state::read_node(self.state_dir, &name);
        let mut node = existing.clone().unwrap_or_else(|| SimNode {
            name: name.clone(),
            ..SimNode::default()
        });
        if existing.is_none() {
            // node-label and node-taint apply when the node registers, as in K3s.
            for l in list("node-label") {
                if let Some((k, v)) = l.split_once('=') {
                    node.labels.insert(k.to_string(), v.to_string());
                }
            }
            node.taints = list("node-taint").iter().filter_map(|t| Taint::parse(t)).collect();
        }
        node.vmid = Some(self.vmid);
        node.internal_ip = get("node-ip").unwrap_or_default();
        node.kubelet_version = version;
        node.role = if is_server { "server" } else { "agent" }.to_string();
        node.kubelet_running = true;
        st.active = Some(svc.to_string());
        if let Err(e) =
            save_k3s(self.state_dir, self.vmid, &st).and_then(|_| cluster_state::write_node(self.state_dir, &node))
        {
            return ExecOutput::fail(1, format!("{e}\n"));
        }
        ExecOutput::ok("")
    }
}

/// The kubeconfig with its `server:` set to `url`.
fn replace_server(kubeconfig: &str, url: &str) -> String {
    kubeconfig
        .lines()
        .map(|l| match l.split_once("server:") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}server: {url}"),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
