//! `driftless doctor` against the sandbox: a fresh sandbox passes it; then one test per
//! failing check, each asserting the line a user reads and its advice. Also: the sandbox
//! answers doctor's read-only calls as Proxmox does, and enforces a token's privileges.

use driftless_sandbox::{self as sandbox, Acl, AclEntry, SandboxHandle, SandboxOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A token of `driftless@pve` without privilege separation, its ACLs given by the test.
const APPLY_TOKEN: &str = "driftless@pve!apply=6f1c2f4e-9a55-4c1e-8a61-5b0d7c9e2a10";

struct Env {
    rt: tokio::runtime::Runtime,
    sandbox: Option<SandboxHandle>,
    repo: tempfile::TempDir,
    state: tempfile::TempDir,
    secrets: tempfile::TempDir,
}

impl Env {
    fn new(example: &str) -> Env {
        Env::with(example, |_| {})
    }

    /// A sandbox set up by `options`, a copy of `example`, and a secrets directory holding
    /// the token as the repository's `pve-token` secret (mode 0600) and a Talos bundle.
    fn with(example: &str, options: impl FnOnce(&mut SandboxOptions)) -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = tempfile::tempdir().unwrap();
        let mut opts = SandboxOptions::new(state.path());
        options(&mut opts);
        let sandbox = rt.block_on(sandbox::start(opts)).unwrap();
        let secrets = tempfile::tempdir().unwrap();
        write_private(&secrets.path().join("pve-token"), &sandbox.token);
        write_private(
            &secrets.path().join("talos-secrets"),
            &testkit::cluster_env::Env::talos_bundle().to_yaml(),
        );
        Env {
            rt,
            sandbox: Some(sandbox),
            repo: testkit::temp_copy(example),
            state,
            secrets,
        }
    }

    fn sandbox(&self) -> &SandboxHandle {
        self.sandbox.as_ref().unwrap()
    }

    /// The sandbox's endpoints and the host shell on this machine (the sandbox's pct); the
    /// token comes from the secrets directory, as on a real host.
    fn args(&self) -> Vec<(String, String)> {
        let s = self.sandbox();
        [
            ("--proxmox-url", s.url.clone()),
            ("--proxmox-fingerprint", s.fingerprint.clone()),
            ("--host-shell", "local".into()),
            ("--pve-root", self.state.path().display().to_string()),
            ("--pct-command", testkit::pct_command(self.state.path())),
            ("--secrets-dir", self.secrets.path().display().to_string()),
            ("--kube-server", s.kube.url.clone()),
            ("--talos-endpoint", s.talos.endpoint.clone()),
            ("--gate-timeout", "20s".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn run_with(&self, cmd: &[&str], args: &[(String, String)]) -> testkit::Run {
        let mut all: Vec<String> = vec!["--repo".into(), self.repo.path().display().to_string()];
        all.extend(cmd.iter().map(|s| s.to_string()));
        all.extend(args.iter().flat_map(|(k, v)| [k.clone(), v.clone()]));
        testkit::run(&all)
    }

    /// `driftless --repo REPO CMD... EXTRA...` with the sandbox's flags; EXTRA replaces a
    /// sandbox flag of the same name.
    fn run(&self, cmd: &[&str], extra: &[&str]) -> testkit::Run {
        let mut all: Vec<String> = vec!["--repo".into(), self.repo.path().display().to_string()];
        all.extend(cmd.iter().map(|s| s.to_string()));
        all.extend(extra.iter().map(|s| s.to_string()));
        for (k, v) in self.args() {
            if !extra.contains(&k.as_str()) {
                all.push(k);
                all.push(v);
            }
        }
        testkit::run(&all)
    }

    fn doctor(&self, extra: &[&str]) -> Doctor {
        Doctor::from(self.run(&["--output", "json", "doctor"], extra))
    }

    fn write(&self, rel: &str, text: &str) {
        testkit::write(self.repo.path(), rel, text);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.sandbox.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// One doctor run: its exit code and its checks by name.
struct Doctor {
    run: testkit::Run,
    checks: BTreeMap<String, serde_json::Value>,
}

impl From<testkit::Run> for Doctor {
    fn from(run: testkit::Run) -> Doctor {
        let json = run.json();
        let checks = json["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
            .collect();
        Doctor { run, checks }
    }
}

impl Doctor {
    fn check(&self, name: &str) -> &serde_json::Value {
        self.checks
            .get(name)
            .unwrap_or_else(|| panic!("no check `{name}` in {}", self.run.stdout))
    }

    fn status(&self, name: &str) -> &str {
        self.check(name)["status"].as_str().unwrap()
    }

    /// The names of the checks that failed.
    fn errors(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|(_, c)| c["status"] == "error")
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Exactly one check failed, `name`; its detail and advice contain what is given.
    fn fails_with(&self, name: &str, detail: &str, advice: &str) {
        assert_eq!(self.run.code, 1, "doctor should fail\n{}", self.run.stdout);
        assert_eq!(self.errors(), [name], "{}", self.run.stdout);
        let c = self.check(name);
        assert!(c["detail"].as_str().unwrap().contains(detail), "detail of {name}: {c}");
        assert!(
            c["advice"].as_str().unwrap_or("").contains(advice),
            "advice of {name}: {c}"
        );
    }
}

#[test]
fn a_fresh_sandbox_passes_every_check_in_text_and_json() {
    let env = Env::new("homelab-k3s");
    let d = env.doctor(&[]);
    assert_eq!(d.run.code, 0, "{}\n{}", d.run.stdout, d.run.stderr);
    assert!(d.errors().is_empty(), "{}", d.run.stdout);
    for name in [
        "api token",
        "proxmox api",
        "privileges",
        "root-only changes",
        "proxmox node pve",
        "storage pve/local-lvm",
        "bridge pve/vmbr0",
        "image pve/local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst",
        "host shell pve",
        "secret pve-token",
    ] {
        assert_eq!(d.status(name), "ok", "{name}: {}", d.run.stdout);
    }
    assert_eq!(d.status("repository"), "skip");
    let text = env.run(&["doctor"], &[]);
    text.expect_code(0, "doctor");
    assert!(
        text.stdout.lines().any(|l| l.starts_with("ok")
            && l.contains("proxmox api")
            && l.contains("certificate matches the pinned fingerprint")),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("0 errors"), "{}", text.stdout);
    // Nothing was written: doctor is read-only.
    let counts = env.sandbox().request_counts();
    assert!(
        counts.keys().all(|k| k.starts_with("GET ")),
        "doctor sent a write: {counts:?}"
    );
}

#[test]
fn after_the_talos_apply_every_vm_node_answers() {
    let env = Env::new("homelab-talos");
    env.run(&["apply"], &["--auto-approve"]).expect_code(0, "apply");
    let d = env.doctor(&[]);
    assert_eq!(d.run.code, 0, "{}", d.run.stdout);
    for node in ["talos-cp-1", "talos-worker-1", "talos-worker-2"] {
        assert_eq!(d.status(&format!("node {node}")), "ok", "{}", d.run.stdout);
    }
    assert!(
        d.check("node talos-cp-1")["detail"]
            .as_str()
            .unwrap()
            .contains("Talos v1.13.9"),
        "{}",
        d.run.stdout
    );
    // A Talos API that does not answer: the VM node's check says so.
    let closed = format!("127.0.0.1:{}", testkit::free_port());
    let d = env.doctor(&["--talos-endpoint", closed.as_str()]);
    assert_eq!(d.run.code, 1, "{}", d.run.stdout);
    let c = d.check("node talos-cp-1");
    assert_eq!(c["status"], "error", "{c}");
    assert!(c["advice"].as_str().unwrap().contains("port 50000"), "{c}");
}

#[test]
fn a_wrong_pin_says_where_to_read_the_right_one() {
    let env = Env::new("homelab-k3s");
    let wrong = "AA:".repeat(31) + "AA";
    let d = env.doctor(&["--proxmox-fingerprint", wrong.as_str()]);
    d.fails_with(
        "proxmox api",
        "does not match the pinned fingerprint",
        "pvenode cert info",
    );
    assert!(
        !d.checks.contains_key("privileges"),
        "nothing more is asked of a server that is not trusted: {}",
        d.run.stdout
    );
}

/// The sandbox with `driftless@pve` holding the custom role `Apply` made of `privs` on `/`.
fn with_role(privs: &[&str]) -> impl FnOnce(&mut SandboxOptions) {
    let privs: Vec<String> = privs.iter().map(|p| p.to_string()).collect();
    move |o: &mut SandboxOptions| {
        o.token = APPLY_TOKEN.into();
        o.acl = Some(Acl {
            roles: BTreeMap::from([("Apply".to_string(), privs)]),
            entries: vec![AclEntry::new("/", "driftless@pve", &["Apply"])],
            privsep: BTreeSet::new(),
        });
    }
}

/// The least-privilege role docs/setup.md creates (tests/setup_guide.rs reads the guide's).
const APPLY_ROLE: &[&str] = &[
    "VM.Allocate",
    "VM.Audit",
    "VM.Config.CPU",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.PowerMgmt",
    "Datastore.AllocateSpace",
    "Datastore.Audit",
    "SDN.Use",
    "Sys.Modify",
];

#[test]
fn a_token_missing_a_privilege_is_named_before_apply_fails_on_it() {
    let without: Vec<&str> = APPLY_ROLE.iter().copied().filter(|p| *p != "VM.Allocate").collect();
    let env = Env::with("homelab-k3s", with_role(&without));
    env.doctor(&[]).fails_with(
        "privileges",
        "VM.Allocate on /vms/100 (create k3s-master)",
        "pveum acl modify /vms/100 --users driftless@pve --roles DriftlessApply",
    );
    // What doctor foresaw is what Proxmox (here, the sandbox) refuses.
    let r = env.run(&["apply"], &["--auto-approve", "--guests-only"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        format!("{}{}", r.stdout, r.stderr).contains("Permission check failed"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
}

#[test]
fn the_least_privilege_role_passes_and_applies() {
    let env = Env::with("homelab-k3s", with_role(APPLY_ROLE));
    let d = env.doctor(&[]);
    assert_eq!(d.run.code, 0, "{}", d.run.stdout);
    assert!(!d.checks.contains_key("privileges later"), "{}", d.run.stdout);
    env.run(&["apply"], &["--auto-approve", "--guests-only"])
        .expect_code(0, "apply with the least-privilege role");
    // Without Sys.Modify on /, the seed's privileged containers cannot be created.
    let without: Vec<&str> = APPLY_ROLE.iter().copied().filter(|p| *p != "Sys.Modify").collect();
    let env = Env::with("homelab-k3s", with_role(&without));
    env.doctor(&[]).fails_with(
        "privileges",
        "Sys.Modify on / (create k3s-master (a privileged container)",
        "DriftlessApply",
    );
}

#[test]
fn a_missing_bridge_lists_the_bridges_there_are() {
    let env = Env::with("homelab-k3s", |o| o.bridges = vec!["vmbr1".into()]);
    env.doctor(&[]).fails_with(
        "bridge pve/vmbr0",
        "no bridge vmbr0 on this node (bridges: vmbr1)",
        "Linux Bridge",
    );
}

#[test]
fn a_missing_template_says_how_to_download_it() {
    let env = Env::new("homelab-k3s");
    std::fs::remove_file(
        env.state
            .path()
            .join(".sandbox/storage/pve/local/template/cache/ubuntu-22.04-standard_22.04-1_amd64.tar.zst"),
    )
    .unwrap();
    env.doctor(&[]).fails_with(
        "image pve/local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst",
        "needed to create k3s-master, k3s-worker-1, k3s-worker-2",
        "pveam download local ubuntu-22.04-standard_22.04-1_amd64.tar.zst",
    );
}

#[test]
fn a_missing_iso_says_where_it_goes() {
    let env = Env::new("homelab-talos");
    std::fs::remove_file(
        env.state
            .path()
            .join(".sandbox/storage/pve/local/template/iso/metal-amd64.iso"),
    )
    .unwrap();
    env.doctor(&[]).fails_with(
        "image pve/local:iso/metal-amd64.iso",
        "not in the storage",
        "/var/lib/vz/template/iso/metal-amd64.iso",
    );
}

#[test]
fn a_storage_too_small_for_the_new_disks() {
    let env = Env::with("homelab-k3s", |o| o.local_lvm_size = 64 << 30);
    env.doctor(&[]).fails_with(
        "storage pve/local-lvm",
        "(64 GiB free); 3 new disks need 96 GiB",
        "free space",
    );
}

#[test]
fn an_unknown_or_offline_proxmox_node() {
    let env = Env::new("homelab-k3s");
    let node = std::fs::read_to_string(env.repo.path().join("nodes/k3s-worker-2.yaml")).unwrap();
    let cluster = std::fs::read_to_string(env.repo.path().join("cluster.yaml")).unwrap();
    env.write(
        "nodes/k3s-worker-2.yaml",
        &node.replace("proxmox_node: pve", "proxmox_node: pve2"),
    );
    env.write(
        "cluster.yaml",
        &cluster.replace(
            "    pve: {ssh: root@192.168.2.10, known_hosts: pve.known_hosts}\n",
            "    pve: {ssh: root@192.168.2.10, known_hosts: pve.known_hosts}\n    pve2: {ssh: root@192.168.2.11}\n",
        ),
    );
    env.doctor(&[]).fails_with(
        "proxmox node pve2",
        "not a node of this Proxmox cluster (nodes: pve)",
        "pvecm nodes",
    );
    env.write("nodes/k3s-worker-2.yaml", &node);
    env.write("cluster.yaml", &cluster);
    env.sandbox().knobs().set_node_offline("pve", true);
    let d = env.doctor(&[]);
    assert!(d.errors().contains(&"proxmox node pve"), "{}", d.run.stdout);
    assert!(
        d.check("proxmox node pve")["detail"]
            .as_str()
            .unwrap()
            .starts_with("offline")
    );
    assert_eq!(d.status("bridge pve/vmbr0"), "skip");
}

#[test]
fn secrets_that_are_missing_unreadable_open_to_others_or_malformed() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("homelab-talos");
    let bundle = env.secrets.path().join("talos-secrets");
    std::fs::set_permissions(&bundle, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.doctor(&[])
        .fails_with("secret talos-secrets", "mode 0644: readable by others", "chmod 600");

    // A directory where the file should be cannot be read (not even by root).
    std::fs::remove_file(&bundle).unwrap();
    std::fs::create_dir(&bundle).unwrap();
    env.doctor(&[])
        .fails_with("secret talos-secrets", "cannot read", "chmod 600");

    std::fs::remove_dir(&bundle).unwrap();
    env.doctor(&[]).fails_with(
        "secret talos-secrets",
        "does not exist (The Talos secrets bundle (talosctl gen secrets))",
        "install -m 600 /dev/stdin",
    );

    write_private(&bundle, "not: a bundle\n");
    env.doctor(&[]).fails_with(
        "secret talos-secrets",
        "not a Talos secrets bundle",
        "talosctl gen secrets",
    );
}

#[test]
fn an_unknown_host_key_is_refused_with_how_to_pin_it() {
    let Some(sshd) = testkit::sshd::Sshd::start() else {
        return;
    };
    let env = Env::new("homelab-k3s");
    let unknown = sshd.known_hosts_without_this_host();
    let mut args: Vec<(String, String)> = env.args().into_iter().filter(|(k, _)| k != "--host-shell").collect();
    args.extend(
        [
            ("--ssh-host", "127.0.0.1".to_string()),
            ("--ssh-port", sshd.port.to_string()),
            ("--ssh-user", sshd.user.clone()),
            ("--ssh-key-file", sshd.client_key.display().to_string()),
            ("--ssh-known-hosts", unknown.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v)),
    );
    let d = Doctor::from(env.run_with(&["--output", "json", "doctor"], &args));
    d.fails_with(
        "host shell pve",
        "is not in the known_hosts file",
        &format!("ssh-keyscan -t ed25519 127.0.0.1 >> {}", unknown.display()),
    );
    // With the host's key pinned, the same shell passes, pct and all.
    let last = args.len() - 1;
    args[last].1 = sshd.known_hosts.display().to_string();
    let d = Doctor::from(env.run_with(&["--output", "json", "doctor"], &args));
    assert_eq!(d.run.code, 0, "{}", d.run.stdout);
    assert!(
        d.check("host shell pve")["detail"]
            .as_str()
            .unwrap()
            .contains("pct answers")
    );
}

#[test]
fn a_plan_token_must_be_read_only() {
    const PLAN_TOKEN: &str = "driftless@pve!plan=0b7d3c1a-2f44-4c8e-9d7a-1e2f3a4b5c6d";
    let env = Env::with("homelab-k3s", |o| {
        o.token = APPLY_TOKEN.into();
        o.extra_tokens = vec![PLAN_TOKEN.into()];
        o.acl = Some(Acl {
            roles: BTreeMap::from([("Apply".to_string(), APPLY_ROLE.iter().map(|p| p.to_string()).collect())]),
            entries: vec![
                AclEntry::new("/", "driftless@pve", &["Apply"]),
                AclEntry::new("/", "driftless@pve!plan", &["PVEAuditor"]),
            ],
            privsep: BTreeSet::from(["driftless@pve!plan".to_string()]),
        });
    });
    let d = env.doctor(&["--plan-refs", "refs/pull/*/head"]);
    assert_eq!(d.status("plan token"), "warning", "{}", d.run.stdout);
    assert_eq!(d.run.code, 0, "a warning does not fail doctor: {}", d.run.stdout);

    let file = env.secrets.path().join("pve-plan-token");
    write_private(&file, PLAN_TOKEN);
    let file_arg = file.display().to_string();
    let d = env.doctor(&["--plan-token-file", file_arg.as_str()]);
    assert_eq!(d.status("plan token"), "ok", "{}", d.run.stdout);

    // The apply token given as the plan token can change guests: refused.
    let apply = env.secrets.path().join("pve-token").display().to_string();
    env.doctor(&["--plan-token-file", apply.as_str()]).fails_with(
        "plan token",
        "driftless@pve!apply can change things: ",
        "--roles PVEAuditor",
    );
}

#[test]
fn the_daemons_repository_is_fetched_with_its_credentials() {
    let env = Env::new("homelab-k3s");
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("homelab.git");
    let work = dir.path().join("work");
    testkit::git(
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
    testkit::git(
        dir.path(),
        &["-c", "init.defaultBranch=main", "init", "-q", work.to_str().unwrap()],
    );
    testkit::copy_dir(env.repo.path(), &work);
    testkit::git(&work, &["add", "-A"]);
    testkit::git(&work, &["commit", "-q", "-m", "seed"]);
    testkit::git(&work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    let url = format!("file://{}", bare.display());
    let d = env.doctor(&["--repository", url.as_str()]);
    assert_eq!(d.status("repository"), "ok", "{}", d.run.stdout);
    assert!(d.check("repository")["detail"].as_str().unwrap().contains("main is at"));
    env.doctor(&["--repository", url.as_str(), "--branch", "production"])
        .fails_with("repository", "no branch production", "--branch");
}

#[test]
fn a_token_that_does_not_exist_stops_at_the_api() {
    let env = Env::new("homelab-k3s");
    write_private(
        &env.secrets.path().join("pve-token"),
        "root@pam!nope=11111111-2222-3333-4444-555555555555",
    );
    env.doctor(&[])
        .fails_with("proxmox api", "the token was refused", "pveum user token list");
}

// ---- the sandbox answers doctor's calls as Proxmox does ----------------------------------------

mod sandbox_answers {
    use super::*;
    use driftless::adapters::proxmox::{ApiToken, ClientOptions, ProxmoxClient};
    use driftless::adapters::tls::TlsTrust;
    use driftless::ports::{ProxmoxApi, ProxmoxError};

    fn client(s: &SandboxHandle, token: &str) -> ProxmoxClient {
        let mut o = ClientOptions::new(
            vec![s.url.clone()],
            ApiToken::parse(token).unwrap(),
            TlsTrust::Fingerprint(s.fingerprint.clone()),
        );
        o.retries = 0;
        ProxmoxClient::new(o).unwrap()
    }

    #[test]
    fn nodes_network_storages_and_content() {
        let env = Env::new("homelab-k3s");
        let c = client(env.sandbox(), &env.sandbox().token);
        env.rt.block_on(async {
            let nodes = c.nodes().await.unwrap();
            assert_eq!(nodes[0].node, "pve");
            assert_eq!(nodes[0].status, "online");
            assert_eq!(
                nodes[0].ssl_fingerprint.as_deref(),
                Some(env.sandbox().fingerprint.as_str())
            );
            let net = c.node_network("pve").await.unwrap();
            let vmbr0 = net.iter().find(|i| i.iface == "vmbr0").unwrap();
            assert!(vmbr0.is_bridge() && vmbr0.active);
            assert!(net.iter().any(|i| i.kind == "eth"));
            let storages = c.storages("pve").await.unwrap();
            let lvm = storages.iter().find(|s| s.storage == "local-lvm").unwrap();
            assert_eq!(lvm.kind, "lvmthin");
            assert!(lvm.holds("rootdir") && lvm.holds("images") && !lvm.holds("vztmpl"));
            assert_eq!(lvm.avail, Some(256 << 30));
            let status = c.storage_status("pve", "local").await.unwrap();
            assert_eq!(status.content, ["backup", "iso", "vztmpl"]);
            let templates = c.storage_content("pve", "local", Some("vztmpl")).await.unwrap();
            assert!(
                templates
                    .iter()
                    .any(|v| v.volid == "local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst")
            );
            assert!(templates.iter().all(|v| v.content == "vztmpl"));
            let err = c.storage_status("pve", "nfs").await.unwrap_err();
            assert!(err.to_string().contains("storage 'nfs' does not exist"), "{err}");
        });
        // A container's disk shows up in local-lvm's content and takes its space.
        env.run(&["apply"], &["--auto-approve", "--guests-only"])
            .expect_code(0, "apply");
        env.rt.block_on(async {
            let disks = c.storage_content("pve", "local-lvm", None).await.unwrap();
            let d = disks.iter().find(|v| v.vmid == Some(100)).unwrap();
            assert_eq!(
                (d.volid.as_str(), d.content.as_str(), d.size),
                ("local-lvm:vm-100-disk-0", "rootdir", 32 << 30)
            );
            let lvm = c.storage_status("pve", "local-lvm").await.unwrap();
            assert_eq!(lvm.avail, Some((256 - 96) << 30));
        });
    }

    #[test]
    fn permissions_are_computed_and_enforced_like_pve_access_control() {
        let env = Env::with("homelab-k3s", |o| {
            o.token = APPLY_TOKEN.into();
            o.acl = Some(Acl {
                roles: BTreeMap::from([("Reader".to_string(), vec!["VM.Audit".to_string()])]),
                entries: vec![
                    AclEntry::new("/vms", "driftless@pve", &["Reader"]),
                    AclEntry::new("/vms/101", "driftless@pve", &["NoAccess"]),
                ],
                privsep: BTreeSet::new(),
            });
        });
        let c = client(env.sandbox(), APPLY_TOKEN);
        env.rt.block_on(async {
            let p = c.permissions(Some("/vms/100")).await.unwrap();
            assert_eq!(p["/vms/100"].keys().collect::<Vec<_>>(), ["VM.Audit"]);
            let p = c.permissions(Some("/vms/101")).await.unwrap();
            assert!(p["/vms/101"].is_empty(), "{p:?}");
            let all = c.permissions(None).await.unwrap();
            assert!(all.contains_key("/vms") && !all.contains_key("/"), "{all:?}");
            // A create without VM.Allocate: refused with 403.
            let params = BTreeMap::from([
                ("vmid".to_string(), "100".to_string()),
                (
                    "ostemplate".to_string(),
                    "local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst".to_string(),
                ),
            ]);
            match c.create("pve", driftless::ports::PveKind::Lxc, &params).await {
                Err(ProxmoxError::Api {
                    status: 403, message, ..
                }) => assert!(message.contains("Permission check failed"), "{message}"),
                other => panic!("{other:?}"),
            }
            // The schema's check, before the parameters are looked at.
            match c.storage_status("pve", "local").await {
                Err(ProxmoxError::Api {
                    status: 403, message, ..
                }) => assert!(
                    message.contains("/storage/local, Datastore.Audit|Datastore.AllocateSpace"),
                    "{message}"
                ),
                other => panic!("{other:?}"),
            }
            assert!(
                c.storages("pve").await.unwrap().is_empty(),
                "storages the token may not see are hidden"
            );
        });
    }
}
