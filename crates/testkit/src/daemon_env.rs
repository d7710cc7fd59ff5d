//! A whole GitOps setup on one machine for daemon tests and benchmarks: a bare repository
//! served by the real git CLI (file:// or `git daemon` on loopback) holding an example
//! homelab, the sandbox Proxmox, and `driftless daemon` as a child process against them.

use crate::{Killed, copy_dir, free_port, git, git_try, wait_until};
use driftless_sandbox::{self as sandbox, SandboxHandle, SandboxOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub bare: PathBuf,
    pub work: PathBuf,
    pub state: PathBuf,
    pub rt: tokio::runtime::Runtime,
    pub sandbox: Option<SandboxHandle>,
    pub token_file: PathBuf,
    pub git_daemon: Option<(Killed, u16)>,
    pub daemon: Option<Killed>,
    pub daemon_log: PathBuf,
    pub listen: u16,
    /// Run the cluster layer too (K3s/Talos/Kubernetes in the sandbox); off by default, the
    /// daemon tests being about the loop.
    pub cluster_layer: bool,
    /// Leave the Proxmox API and its pin to cluster.yaml (no DRIFTLESS_PROXMOX_URL or
    /// _FINGERPRINT override): for tests of what a repository may and may not choose.
    pub proxmox_from_repository: bool,
}

impl Setup {
    /// A bare repository with `example` committed on main, and the sandbox.
    pub fn new(example: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("homelab.git");
        let work = dir.path().join("work");
        let state = dir.path().join("pve");
        git(
            dir.path(),
            &[
                "-c",
                "init.defaultBranch=main",
                "init",
                "-q",
                "--bare",
                bare.to_str().unwrap(),
            ],
        );
        git(
            dir.path(),
            &["-c", "init.defaultBranch=main", "init", "-q", work.to_str().unwrap()],
        );
        let src = crate::example(example);
        copy_dir(&src, &work);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "The seed homelab"]);
        git(&work, &["push", "-q", bare.to_str().unwrap(), "main"]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sandbox = rt.block_on(sandbox::start(SandboxOptions::new(&state))).unwrap();
        let token_file = dir.path().join("pve-token");
        std::fs::write(&token_file, &sandbox.token).unwrap();
        let daemon_log = dir.path().join("daemon.log");
        Setup {
            dir,
            bare,
            work,
            state,
            rt,
            sandbox: Some(sandbox),
            token_file,
            git_daemon: None,
            daemon: None,
            daemon_log,
            listen: free_port(),
            cluster_layer: false,
            proxmox_from_repository: false,
        }
    }

    pub fn sandbox(&self) -> &SandboxHandle {
        self.sandbox.as_ref().unwrap()
    }

    pub fn file_url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Serve the bare repository with `git daemon` (push allowed) and return its URL.
    pub fn serve_git(&mut self) -> String {
        let port = free_port();
        let base = self.dir.path().display().to_string();
        let child = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                &format!("--base-path={base}"),
                "--export-all",
                "--enable=receive-pack",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &base,
            ])
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon starts");
        wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .expect("git daemon listens");
        self.git_daemon = Some((Killed(child), port));
        format!("git://127.0.0.1:{port}/homelab.git")
    }

    /// Start `driftless daemon` against `url` with extra flags.
    pub fn start_daemon(&mut self, url: &str, extra: &[&str]) {
        let log = std::fs::File::create(&self.daemon_log).unwrap();
        let mut cmd = self.daemon_command(url, &self.dir.path().join("daemon-state"), self.listen, extra);
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        self.daemon = Some(Killed(cmd.spawn().expect("daemon starts")));
        let port = self.listen;
        wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .unwrap_or_else(|| panic!("the daemon listens\n{}", self.log()));
    }

    /// `driftless daemon` against `url` and the sandbox, with its state in `state_dir`.
    fn daemon_command(&self, url: &str, state_dir: &Path, listen: u16, extra: &[&str]) -> Command {
        let exe = crate::driftless_bin();
        let s = self.sandbox();
        let mut cmd = Command::new(exe);
        cmd.args(["daemon", "--repository", url, "--state-dir"])
            .arg(state_dir)
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(extra)
            .env("DRIFTLESS_PROXMOX_TOKEN_FILE", &self.token_file)
            .env("DRIFTLESS_PVE_ROOT", &self.state)
            .env("DRIFTLESS_PCT_COMMAND", crate::pct_command(&self.state))
            .env("DRIFTLESS_HOST_SHELL", "local")
            .env(
                "DRIFTLESS_GUESTS_ONLY",
                if self.cluster_layer { "false" } else { "true" },
            )
            .env("DRIFTLESS_KUBE_SERVER", &s.kube.url)
            .env("DRIFTLESS_TALOS_ENDPOINT", &s.talos.endpoint)
            .env("DRIFTLESS_LOG", "info,driftless=debug,notify=warn")
            .env("DRIFTLESS_SECRETS_DIR", self.dir.path().join("secrets"))
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
        if !self.proxmox_from_repository {
            cmd.env("DRIFTLESS_PROXMOX_URL", &s.url)
                .env("DRIFTLESS_PROXMOX_FINGERPRINT", &s.fingerprint);
        }
        cmd
    }

    /// One more daemon against `url`, as a replica with its own state, port and log:
    /// `name` names its files.
    pub fn start_replica(&self, name: &str, url: &str, extra: &[&str]) -> Replica {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let listen = free_port();
        let state = self.dir.path().join(format!("{name}-state"));
        let mut cmd = self.daemon_command(url, &state, listen, extra);
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        let replica = Replica {
            name: name.to_string(),
            child: Killed(cmd.spawn().expect("daemon starts")),
            listen,
            log,
        };
        wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", listen)).ok()
        })
        .unwrap_or_else(|| panic!("the replica {name} listens\n{}", replica.log()));
        replica
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    /// Commit a change in the work tree and push it; returns the new commit.
    pub fn push_change(&self, rel: &str, text: &str, message: &str, branch: &str) -> String {
        self.commit_change(rel, text, message, &[]);
        self.push(branch)
    }

    /// Commit a change in the work tree without pushing it; returns the new commit. With
    /// `signing` (git `-c` settings such as `gpg.format=ssh`, `user.signingkey=FILE`) the commit
    /// is signed (`commit -S`).
    pub fn commit_change(&self, rel: &str, text: &str, message: &str, signing: &[&str]) -> String {
        std::fs::write(self.work.join(rel), text).unwrap();
        git(&self.work, &["add", "-A"]);
        let mut args: Vec<&str> = signing.iter().flat_map(|setting| ["-c", *setting]).collect();
        args.extend(["commit", "-q", "-m", message]);
        if !signing.is_empty() {
            args.push("-S");
        }
        git(&self.work, &args);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Push the work tree's HEAD to `branch` (forced); returns the commit pushed.
    pub fn push(&self, branch: &str) -> String {
        git(
            &self.work,
            &[
                "push",
                "-q",
                "-f",
                self.bare.to_str().unwrap(),
                &format!("HEAD:refs/heads/{branch}"),
            ],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// The status report JSON for a ref (`heads/main`), read with the git CLI.
    pub fn report(&self, name: &str) -> Option<serde_json::Value> {
        let text = git_try(&self.bare, &["show", &format!("driftless/status:status/{name}.json")])?;
        serde_json::from_str(&text).ok()
    }

    pub fn wait_report(
        &self,
        name: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_until(timeout, || self.report(name).filter(|r| f(r))).unwrap_or_else(|| {
            panic!(
                "no matching report for {name}: {:?}\n--- daemon log\n{}",
                self.report(name),
                self.log()
            )
        })
    }

    pub fn conf(&self, vmid: u32) -> String {
        std::fs::read_to_string(self.state.join(format!("nodes/pve/lxc/{vmid}.conf"))).unwrap_or_default()
    }

    pub fn status_commits(&self) -> usize {
        git_try(&self.bare, &["rev-list", "--count", "driftless/status"])
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.daemon.take();
        if let Some(s) = self.sandbox.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

/// A daemon started by [`Setup::start_replica`]; killed when dropped.
pub struct Replica {
    pub name: String,
    pub child: Killed,
    pub listen: u16,
    pub log: PathBuf,
}

impl Replica {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// `GET path` on the replica's HTTP server: the status code and the body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.listen, path)
    }
}

/// A plain HTTP/1.1 GET on loopback: the status code and the body (0 and empty when the
/// server does not answer).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The worker-2 change used by several tests: 6 GiB of memory, a recorded deviation.
pub fn worker2_with_memory(work: &Path, gib: u32) -> String {
    let base = "# A K3s worker (Stories 1.2 and 1.3): the same LXC configuration as the control plane.\nvmid: 102\nproxmox_node: pve\nkind: lxc\nrole: agent\naddress: 192.168.2.22/24\n";
    let _ = work;
    format!(
        "{base}memory: {gib}GiB\ndeviations:\n  - adr: ADR-001\n    keys: [memory]\n    reason: runs the database\n"
    )
}
