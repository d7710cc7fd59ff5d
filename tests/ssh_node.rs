//! The SSH path to a VM node against a real OpenSSH server on loopback: K3s's config and join
//! token are written atomically (a new file renamed over the old one, mode 0600) and the
//! service restarts only when something changed. The node's root is a directory of the test;
//! `systemctl` and `k3s` are small scripts on the session's PATH that record their calls.

use testkit::sshd;

use driftless::adapters::ssh::{HostTarget, SshHostShell};
use driftless::cluster::k3s;
use driftless::cluster::node_access::SshNode;
use driftless::secrets::Secret;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

struct Node {
    _sshd: sshd::Sshd,
    _tools: tempfile::TempDir,
    ssh: SshHostShell,
    root: tempfile::TempDir,
    calls: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
}

fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

impl Node {
    fn start() -> Node {
        let tools_dir = tempfile::tempdir().unwrap();
        let tools = tools_dir.path().to_path_buf();
        let calls = tools.join("calls.log");
        let state = tools.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let bin = tools.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        script(
            &bin.join("systemctl"),
            &format!(
                "#!/bin/sh\necho \"systemctl $*\" >> '{calls}'\ncase \"$1\" in\n  is-active) [ -f '{state}'/\"$3\" ] ;;\n  restart) touch '{state}'/\"$2\" ;;\nesac\n",
                calls = calls.display(),
                state = state.display()
            ),
        );
        script(
            &bin.join("k3s"),
            "#!/bin/sh\necho 'k3s version v1.31.4+k3s1 (a1b2c3d4)'\necho 'go version go1.22.9'\n",
        );
        let sshd = sshd::Sshd::start_with(&format!("SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin", bin.display()))
            .expect("this test needs OpenSSH's sshd (.ci/run installs openssh-server)");
        let target = HostTarget {
            user: sshd.user.clone(),
            host: "127.0.0.1".into(),
            port: sshd.port,
            known_hosts: sshd.known_hosts.clone(),
            key_file: sshd.client_key.clone(),
        };
        Node {
            ssh: SshHostShell::new(BTreeMap::from([("k3s-vm".to_string(), target)])),
            _sshd: sshd,
            _tools: tools_dir,
            root: tempfile::tempdir().unwrap(),
            calls,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn shell(&self) -> SshNode<'_> {
        SshNode {
            ssh: &self.ssh,
            name: "k3s-vm".into(),
            root: self.root.path().display().to_string(),
        }
    }

    fn configure(&self, role: &str, config: &str, token: Option<&Secret>) -> k3s::Configured {
        self.rt
            .block_on(k3s::configure(&self.shell(), role, config, token, false))
            .expect("configure over SSH")
    }

    fn file(&self, path: &str) -> std::path::PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

const CONFIG: &str = "node-name: k3s-vm\nnode-ip: 10.0.0.30\ntls-san:\n  - 10.0.0.30\n";

#[test]
fn the_config_is_written_atomically_and_the_service_restarts_only_on_change() {
    let node = Node::start();
    let first = node.configure("server", CONFIG, None);
    assert_eq!(first.written, [k3s::CONFIG_PATH]);
    assert!(first.restarted);
    let path = node.file(k3s::CONFIG_PATH);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), CONFIG);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(
        node.calls()
            .iter()
            .filter(|c| !c.contains("is-active"))
            .cloned()
            .collect::<Vec<_>>(),
        ["systemctl enable k3s", "systemctl restart k3s"]
    );

    // The same config again: nothing written, no restart.
    let inode = std::fs::metadata(&path).unwrap().ino();
    let calls = node.calls().len();
    let again = node.configure("server", CONFIG, None);
    assert_eq!(again, k3s::Configured::default());
    assert!(
        node.calls()[calls..].iter().all(|c| c.contains("is-active")),
        "{:?}",
        node.calls()
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "an unchanged file is not rewritten"
    );

    // A change replaces the file by renaming a new one over it (a reader never sees half),
    // leaves no temporary file behind, and restarts.
    let changed = CONFIG.replace("10.0.0.30", "10.0.0.31");
    let third = node.configure("server", &changed, None);
    assert!(third.restarted);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), changed);
    assert_ne!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "replaced, not rewritten in place"
    );
    let dir: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dir, ["config.yaml"]);
    assert_eq!(node.calls().last().unwrap(), "systemctl restart k3s");

    // What observe reads back over SSH.
    let seen = node
        .rt
        .block_on(k3s::observe(&node.shell(), &k3s::sha256_hex(changed.as_bytes())))
        .unwrap();
    assert_eq!(seen.version.as_deref(), Some("v1.31.4+k3s1"));
    assert_eq!(seen.active.as_deref(), Some("k3s"));
    assert_eq!(seen.config, None, "the config matches: not read again");
}

#[test]
fn an_agent_gets_its_join_token_as_a_0600_file_and_the_token_is_in_no_command() {
    let node = Node::start();
    let token = Secret::new("K10deadbeef::server:s3cr3t-join-token");
    let done = node.configure(
        "agent",
        "server: https://10.0.0.30:6443\ntoken-file: /etc/rancher/k3s/cluster-token\n",
        Some(&token),
    );
    assert_eq!(done.written, [k3s::CONFIG_PATH, k3s::TOKEN_PATH]);
    assert!(done.restarted);
    let path = node.file(k3s::TOKEN_PATH);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}\n", token.expose()));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(node.calls().contains(&"systemctl restart k3s-agent".to_string()));
    assert!(!node.calls().iter().any(|c| c.contains("s3cr3t")));

    // A rotated token is written again (and restarts); the same token is left alone.
    let same = node.configure(
        "agent",
        "server: https://10.0.0.30:6443\ntoken-file: /etc/rancher/k3s/cluster-token\n",
        Some(&token),
    );
    assert!(same.written.is_empty() && !same.restarted);
    let rotated = Secret::new("K10deadbeef::server:rotated");
    let again = node.configure(
        "agent",
        "server: https://10.0.0.30:6443\ntoken-file: /etc/rancher/k3s/cluster-token\n",
        Some(&rotated),
    );
    assert_eq!(again.written, [k3s::TOKEN_PATH]);
    assert!(again.restarted);
}

#[test]
fn a_node_that_answers_without_end_is_cut_off_at_the_output_cap() {
    use driftless::ports::{HostShell, ShellError};
    let node = Node::start();
    // What a compromised guest can do to any command driftless runs there.
    let argv: Vec<String> = ["yes", "secret-looking-line"].iter().map(|s| s.to_string()).collect();
    let err = node.rt.block_on(node.ssh.run("k3s-vm", &argv, b"")).unwrap_err();
    assert!(matches!(err, ShellError::TooMuchOutput { .. }), "{err}");
    // The connection is still usable for the next command.
    let ok = node
        .rt
        .block_on(node.ssh.run("k3s-vm", &["true".to_string()], b""))
        .unwrap();
    assert_eq!(ok.status, 0);
}
