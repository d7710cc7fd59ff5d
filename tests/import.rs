//! `driftless import` against the sandbox: both examples' guests applied, their tags taken
//! away (guests as a hand-made homelab has them), imported into an empty directory; the
//! files validate, say where they came from, and plan to the ownership tag alone. And a
//! container made by hand with raw lxc keys, a mount point and a snapshot.

use driftless::adapters::proxmox::{ApiToken, ClientOptions, ProxmoxClient};
use driftless::adapters::tls::TlsTrust;
use driftless::ports::{ProxmoxApi, PveKind};
use driftless_sandbox::{self as sandbox, SandboxHandle, SandboxOptions};
use std::collections::BTreeMap;
use std::path::Path;

struct Env {
    rt: tokio::runtime::Runtime,
    sandbox: Option<SandboxHandle>,
    state: tempfile::TempDir,
    secrets: tempfile::TempDir,
    token_file: std::path::PathBuf,
}

impl Env {
    fn new() -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = tempfile::tempdir().unwrap();
        let sandbox = rt.block_on(sandbox::start(SandboxOptions::new(state.path()))).unwrap();
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(
            secrets.path().join("talos-secrets"),
            testkit::cluster_env::Env::talos_bundle().to_yaml(),
        )
        .unwrap();
        let token_file = state.path().join("token");
        std::fs::write(&token_file, &sandbox.token).unwrap();
        Env {
            rt,
            sandbox: Some(sandbox),
            state,
            secrets,
            token_file,
        }
    }

    fn sandbox(&self) -> &SandboxHandle {
        self.sandbox.as_ref().unwrap()
    }

    fn flags(&self) -> Vec<String> {
        let s = self.sandbox();
        [
            ("--proxmox-url", s.url.clone()),
            ("--proxmox-token-file", self.token_file.display().to_string()),
            ("--proxmox-fingerprint", s.fingerprint.clone()),
            ("--host-shell", "local".into()),
            ("--pve-root", self.state.path().display().to_string()),
            ("--pct-command", testkit::pct_command(self.state.path())),
            ("--secrets-dir", self.secrets.path().display().to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }

    /// `driftless --repo REPO ARGS... <sandbox flags>`.
    fn run(&self, repo: &Path, args: &[&str]) -> testkit::Run {
        let mut all: Vec<String> = vec!["--repo".into(), repo.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend(self.flags());
        testkit::run(&all)
    }

    fn client(&self) -> ProxmoxClient {
        let s = self.sandbox();
        ProxmoxClient::new(ClientOptions::new(
            vec![s.url.clone()],
            ApiToken::parse(&s.token).unwrap(),
            TlsTrust::Fingerprint(s.fingerprint.clone()),
        ))
        .unwrap()
    }

    /// Take every guest's tags away, as a guest made by hand has none.
    fn untag_all(&self) {
        let c = self.client();
        self.rt.block_on(async {
            for g in c.list_guests().await.unwrap() {
                c.update_config(&g.node, g.kind, g.vmid, &BTreeMap::new(), &["tags".to_string()], "")
                    .await
                    .unwrap();
            }
        });
    }

    fn conf_path(&self, vmid: u32) -> std::path::PathBuf {
        self.state.path().join(format!("nodes/pve/lxc/{vmid}.conf"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.sandbox.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

/// The plan's steps as `verb node key,key`, from `plan --output json`.
fn steps(plan: &serde_json::Value) -> Vec<String> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let keys: Vec<&str> = s["changes"]
                .as_array()
                .map(|c| c.iter().map(|c| c["key"].as_str().unwrap()).collect())
                .unwrap_or_default();
            format!(
                "{} {} {}",
                s["action"].as_str().unwrap(),
                s["node"].as_str().unwrap(),
                keys.join(",")
            )
            .trim_end()
            .to_string()
        })
        .collect()
}

/// Import into a fresh directory: the files validate and each node file says where it
/// came from; returns the directory.
fn import_into_fresh_dir(env: &Env, extra: &[&str]) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let out_arg = out.path().display().to_string();
    let mut args = vec!["import", "--out", out_arg.as_str()];
    args.extend(extra);
    let r = env.run(out.path(), &args);
    r.expect_code(0, "import");
    let files = testkit::list_files(out.path());
    assert!(files.contains(&"cluster.yaml".to_string()), "{files:?}\n{}", r.stdout);
    for f in files.iter().filter(|f| f.starts_with("nodes/")) {
        let text = std::fs::read_to_string(out.path().join(f)).unwrap();
        assert!(
            text.starts_with("# Imported by `driftless import` from ") && text.contains(&env.sandbox().url),
            "{f} does not say where it came from:\n{text}"
        );
        assert!(text.contains("\nadopt: true\n"), "{f}:\n{text}");
    }
    testkit::run_repo(out.path(), ["validate"]).expect_code(0, "the imported repository validates");
    out
}

#[test]
fn the_k3s_seed_round_trips_to_the_ownership_tag_alone() {
    let env = Env::new();
    let seed = testkit::temp_copy("homelab-k3s");
    env.run(seed.path(), &["apply", "--auto-approve", "--guests-only"])
        .expect_code(0, "apply the seed");
    env.untag_all();
    let out = import_into_fresh_dir(&env, &["--vmid", "100-199"]);
    let cluster = std::fs::read_to_string(out.path().join("cluster.yaml")).unwrap();
    // ADR-001's raw keys, read through the host shell in the file's order, are shared by
    // all three containers: lifted into the defaults.
    assert!(
        cluster.contains(
            "      raw:\n        - lxc.mount.entry: /dev/kmsg dev/kmsg none bind,rw,optional,create=file\n        - lxc.apparmor.profile: unconfined\n        - lxc.cap.drop: \"\"\n"
        ),
        "{cluster}"
    );
    let plan = env.run(out.path(), &["--output", "json", "plan", "--guests-only"]);
    plan.expect_code(0, "plan");
    assert_eq!(
        steps(&plan.json()),
        [
            "update k3s-master tags",
            "update k3s-worker-1 tags",
            "update k3s-worker-2 tags"
        ],
        "{}",
        plan.stdout
    );
    // Applied, the imported repository owns the guests and plans nothing.
    env.run(out.path(), &["apply", "--auto-approve", "--guests-only"])
        .expect_code(0, "apply the import");
    env.run(out.path(), &["plan", "--guests-only", "--detailed-exitcode"])
        .expect_code(0, "nothing left to change");

    // Selection by name pattern: two workers; existing files are never overwritten.
    let again = env.run(
        out.path(),
        &[
            "import",
            "--out",
            &out.path().display().to_string(),
            "--name",
            "k3s-worker-*",
        ],
    );
    again.expect_code(0, "import again");
    assert!(again.stdout.contains("left alone:"), "{}", again.stdout);
    assert!(!again.stdout.contains("k3s-master"), "{}", again.stdout);
    assert!(out.path().join("cluster.yaml.imported").exists());
}

#[test]
fn the_talos_vms_round_trip_with_their_addresses_given() {
    let env = Env::new();
    let seed = testkit::temp_copy("homelab-talos");
    env.run(seed.path(), &["apply", "--auto-approve", "--guests-only"])
        .expect_code(0, "apply the seed");
    env.untag_all();
    let out = import_into_fresh_dir(
        &env,
        &[
            "--distribution",
            "talos",
            "--cluster-name",
            "talos-homelab",
            "--address",
            "talos-cp-1=10.0.0.10/24",
            "--address",
            "talos-worker-1=10.0.0.21/24",
            "--address",
            "talos-worker-2=10.0.0.22/24",
        ],
    );
    let cp = std::fs::read_to_string(out.path().join("nodes/talos-cp-1.yaml")).unwrap();
    assert!(cp.contains("role: controlplane"), "{cp}");
    let plan = env.run(out.path(), &["--output", "json", "plan", "--guests-only"]);
    plan.expect_code(0, "plan");
    assert_eq!(
        steps(&plan.json()),
        [
            "update talos-cp-1 tags",
            "update talos-worker-1 tags",
            "update talos-worker-2 tags"
        ],
        "{}",
        plan.stdout
    );
}

#[test]
fn a_hand_made_container_with_raw_keys_a_mount_point_and_a_snapshot() {
    let env = Env::new();
    let c = env.client();
    env.rt.block_on(async {
        let params: BTreeMap<String, String> = [
            ("vmid", "150"),
            ("hostname", "legacy"),
            ("ostemplate", "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"),
            ("rootfs", "local-lvm:8"),
            ("mp0", "local-lvm:4,mp=/data"),
            (
                "net0",
                "name=eth0,bridge=vmbr0,firewall=1,ip=192.168.2.50/24,gw=192.168.2.1",
            ),
            ("memory", "1024"),
            ("cores", "1"),
            ("start", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let upid = c.create("pve", PveKind::Lxc, &params).await.unwrap();
        c.wait_task(&upid).await.unwrap();
    });
    // What the operator did on the host: raw keys in the file, and a snapshot.
    let path = env.conf_path(150);
    let conf = std::fs::read_to_string(&path).unwrap();
    let snapshot_section: String = conf
        .lines()
        .filter(|l| !l.starts_with("lxc."))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &path,
        format!(
            "{}parent: before-upgrade\nlxc.apparmor.profile: unconfined\nlxc.cgroup2.devices.allow: c 10:200 rwm\n\n[before-upgrade]\n{}snaptime: 1700000000\n",
            conf.trim_end_matches('\n').to_string() + "\n",
            snapshot_section
        ),
    )
    .unwrap();

    let out = import_into_fresh_dir(&env, &["--vmid", "150"]);
    let node = std::fs::read_to_string(out.path().join("nodes/legacy.yaml")).unwrap();
    for want in [
        "  raw:\n    - lxc.apparmor.profile: unconfined\n    - lxc.cgroup2.devices.allow: c 10:200 rwm\n",
        "template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst  # guessed from its OS type",
        "# Not managed by driftless, kept as they are:\n",
        "#   mp0: local-lvm:vm-150-disk-1,mp=/data,size=4G\n",
        "#   snapshots: before-upgrade\n",
        "# Note: onboot is not set (off)",
        "# Note: net0 also has firewall=1",
        "unprivileged: true",
    ] {
        assert!(node.contains(want), "missing {want:?} in\n{node}");
    }
    // The first plan is what the notes said: the tag, and onboot written out.
    let plan = env.run(out.path(), &["--output", "json", "plan", "--guests-only"]);
    plan.expect_code(0, "plan");
    assert_eq!(steps(&plan.json()), ["update legacy onboot,tags"], "{}", plan.stdout);
    env.run(out.path(), &["apply", "--auto-approve", "--guests-only"])
        .expect_code(0, "apply");
    let after = std::fs::read_to_string(&path).unwrap();
    for kept in [
        "mp0: local-lvm:vm-150-disk-1,mp=/data,size=4G",
        "lxc.cgroup2.devices.allow: c 10:200 rwm",
        "[before-upgrade]",
        "firewall=1",
    ] {
        assert!(after.contains(kept), "{kept} was lost:\n{after}");
    }
}

#[test]
fn nothing_selected_is_an_error() {
    let env = Env::new();
    let out = tempfile::tempdir().unwrap();
    let r = env.run(out.path(), &["import", "--vmid", "900-999"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("no guest matches the selection"), "{}", r.stderr);
    assert!(testkit::list_files(out.path()).is_empty());
}
