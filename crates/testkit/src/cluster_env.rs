//! The test environment of the end-to-end cluster tests: the sandbox (Proxmox, Kubernetes and
//! Talos APIs), a real OpenSSH server on loopback as the Proxmox host shell, a copy of an
//! example repository, and a secrets directory with a Talos bundle. Every run's output is kept
//! for the secret grep.

use crate::sshd;
use driftless::cluster::talos_secrets::TalosSecrets;
use driftless_sandbox::cluster_state;
use driftless_sandbox::{self as sandbox, SandboxHandle, SandboxOptions};
use std::path::PathBuf;

pub struct Env {
    pub rt: tokio::runtime::Runtime,
    pub sandbox: Option<SandboxHandle>,
    pub sshd: sshd::Sshd,
    pub repo: tempfile::TempDir,
    pub state: tempfile::TempDir,
    pub secrets: tempfile::TempDir,
    pub token_file: PathBuf,
    /// Everything every run printed, for the secret grep.
    pub printed: std::cell::RefCell<String>,
    pub gate_timeout: std::cell::Cell<&'static str>,
}

impl Env {
    pub fn new(example: &str) -> Env {
        let sshd = sshd::Sshd::start().expect("these tests need OpenSSH's sshd (.ci/run installs openssh-server)");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = tempfile::tempdir().unwrap();
        let sandbox = rt.block_on(sandbox::start(SandboxOptions::new(state.path()))).unwrap();
        let token_file = state.path().join("token");
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(secrets.path().join("talos-secrets"), Env::talos_bundle().to_yaml()).unwrap();
        std::fs::write(&token_file, &sandbox.token).unwrap();
        Env {
            rt,
            sandbox: Some(sandbox),
            sshd,
            repo: crate::temp_copy(example),
            state,
            secrets,
            token_file,
            printed: Default::default(),
            gate_timeout: std::cell::Cell::new("20s"),
        }
    }

    /// The same bundle every time (generated once per test binary).
    pub fn talos_bundle() -> TalosSecrets {
        static BUNDLE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let yaml = BUNDLE.get_or_init(|| TalosSecrets::generate().to_yaml());
        TalosSecrets::parse(yaml).unwrap()
    }

    pub fn sandbox(&self) -> &SandboxHandle {
        self.sandbox.as_ref().unwrap()
    }

    pub fn args(&self) -> Vec<String> {
        let s = self.sandbox();
        [
            ("--proxmox-url", s.url.clone()),
            ("--proxmox-token-file", self.token_file.display().to_string()),
            ("--proxmox-fingerprint", s.fingerprint.clone()),
            ("--ssh-host", "127.0.0.1".into()),
            ("--ssh-port", self.sshd.port.to_string()),
            ("--ssh-user", self.sshd.user.clone()),
            ("--ssh-key-file", self.sshd.client_key.display().to_string()),
            ("--ssh-known-hosts", self.sshd.known_hosts.display().to_string()),
            ("--pve-root", self.state.path().display().to_string()),
            ("--pct-command", crate::pct_command(self.state.path())),
            ("--secrets-dir", self.secrets.path().display().to_string()),
            ("--kube-server", s.kube.url.clone()),
            ("--talos-endpoint", s.talos.endpoint.clone()),
            ("--gate-timeout", self.gate_timeout.get().into()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }

    pub fn run(&self, cmd: &[&str], extra: &[&str]) -> crate::Run {
        let mut args: Vec<String> = vec!["--repo".into(), self.repo.path().display().to_string()];
        args.extend(cmd.iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.args());
        let r = crate::run(&args);
        let mut p = self.printed.borrow_mut();
        p.push_str(&r.stdout);
        p.push_str(&r.stderr);
        r
    }

    pub fn apply(&self) -> crate::Run {
        let r = self.run(&["apply"], &["--auto-approve"]);
        r.expect_code(0, "apply");
        r
    }

    pub fn plan_json(&self) -> serde_json::Value {
        let r = self.run(&["--output", "json", "plan"], &[]);
        r.expect_code(0, "plan");
        r.json()
    }

    pub fn node(&self, name: &str) -> cluster_state::SimNode {
        cluster_state::read_node(self.state.path(), name).unwrap_or_else(|| panic!("{name} never registered"))
    }

    pub fn rootfs_file(&self, vmid: u32, path: &str) -> Option<String> {
        std::fs::read_to_string(sandbox::k3s_sim::rootfs(self.state.path(), vmid).join(path.trim_start_matches('/')))
            .ok()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.sandbox.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}
