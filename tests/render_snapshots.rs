//! Every artifact the examples render, pinned byte for byte in
//! tests/snapshots/<example>/<node>/<file> (what `driftless render --out DIR` writes), plus
//! what must hold for any rendered artifact: deterministic, a Proxmox config file that
//! Proxmox's own grammar accepts and that parses and writes back to the same bytes, and API
//! parameters that the Proxmox API schema accepts.
//!
//! After an intended change to the output, regenerate the snapshots with
//!
//!     DRIFTLESS_BLESS=1 cargo test --test integration render_snapshots
//!
//! and read `git diff tests/snapshots` the way an operator would before committing it.

use driftless::pve::ApiSchema;
use driftless::pve::conf::{self, PveKind};
use regex::Regex;
use std::collections::BTreeMap;
use std::path::Path;

const EXAMPLES: &[&str] = &["homelab-k3s", "homelab-talos"];

fn blessing() -> bool {
    std::env::var("DRIFTLESS_BLESS").is_ok_and(|v| v == "1")
}

/// `driftless --repo examples/EX render --out DIR` into a fresh temp dir.
fn render_out(example: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("temp dir");
    testkit::run_repo(
        &testkit::example(example),
        ["render", "--out", out.path().to_str().expect("utf-8 temp path")],
    )
    .expect_code(0, &format!("render --out {example}"));
    out
}

/// Every artifact of an example: (node, kind, target, content), from `--output json render`.
fn artifacts(example: &str) -> Vec<(String, String, String, String)> {
    let r = testkit::run_repo(&testkit::example(example), ["--output", "json", "render"]);
    r.expect_code(0, &format!("render {example}"));
    r.json()
        .as_array()
        .expect("a list of artifacts")
        .iter()
        .map(|a| {
            let s = |k: &str| {
                a[k].as_str()
                    .unwrap_or_else(|| panic!("artifact without {k}: {a}"))
                    .to_string()
            };
            (s("node"), s("kind"), s("target"), s("content"))
        })
        .collect()
}

fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    if !dir.exists() {
        return BTreeMap::new();
    }
    testkit::list_files(dir)
        .into_iter()
        .map(|rel| {
            let bytes = std::fs::read(dir.join(&rel)).expect("read snapshot");
            (rel, bytes)
        })
        .collect()
}

/// Where two texts first differ, for a readable failure.
fn first_difference(want: &[u8], got: &[u8]) -> String {
    let want = String::from_utf8_lossy(want);
    let got = String::from_utf8_lossy(got);
    let (w, g): (Vec<&str>, Vec<&str>) = (
        want.split_inclusive('\n').collect(),
        got.split_inclusive('\n').collect(),
    );
    for i in 0..w.len().max(g.len()) {
        if w.get(i) != g.get(i) {
            return format!(
                "line {}: snapshot {:?}, rendered {:?}",
                i + 1,
                w.get(i).copied().unwrap_or("<end>"),
                g.get(i).copied().unwrap_or("<end>")
            );
        }
    }
    "identical".into()
}

#[test]
fn rendered_artifacts_match_the_snapshots() {
    let mut failures = Vec::new();
    for example in EXAMPLES {
        let out = render_out(example);
        let snap_dir = testkit::root().join("tests/snapshots").join(example);
        let rendered = read_tree(out.path());
        assert!(!rendered.is_empty(), "{example} rendered nothing");
        if blessing() {
            if snap_dir.exists() {
                std::fs::remove_dir_all(&snap_dir).expect("clear old snapshots");
            }
            testkit::copy_dir(out.path(), &snap_dir);
            eprintln!(
                "blessed {} files of {example} in {}",
                rendered.len(),
                snap_dir.display()
            );
            continue;
        }
        let pinned = read_tree(&snap_dir);
        for (rel, want) in &pinned {
            match rendered.get(rel) {
                None => failures.push(format!("{example}/{rel}: pinned, but no longer rendered")),
                Some(got) if got != want => failures.push(format!("{example}/{rel}: {}", first_difference(want, got))),
                Some(_) => {}
            }
        }
        for rel in rendered.keys().filter(|r| !pinned.contains_key(*r)) {
            failures.push(format!("{example}/{rel}: rendered, but has no snapshot"));
        }
    }
    assert!(
        failures.is_empty(),
        "rendered artifacts differ from tests/snapshots (if the change is intended, run \
         `DRIFTLESS_BLESS=1 cargo test --test integration render_snapshots` and review the diff):\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn rendering_twice_gives_identical_bytes() {
    for example in EXAMPLES {
        let a = read_tree(render_out(example).path());
        let b = read_tree(render_out(example).path());
        assert_eq!(a, b, "{example}: two renders differ");
        let first = testkit::run_repo(&testkit::example(example), ["render"]);
        let second = testkit::run_repo(&testkit::example(example), ["render"]);
        assert_eq!(
            first.stdout, second.stdout,
            "{example}: `render` output differs between runs"
        );
    }
}

// ---------------------------------------------------------------- Proxmox config files

fn guest_kind(target: &str) -> PveKind {
    if target.contains("/lxc/") {
        PveKind::Lxc
    } else if target.contains("/qemu-server/") {
        PveKind::Qemu
    } else {
        panic!("a proxmox.conf target that is neither lxc/ nor qemu-server/: {target}")
    }
}

fn proxmox_confs() -> Vec<(String, PveKind, String)> {
    let mut out = Vec::new();
    for example in EXAMPLES {
        for (node, kind, target, content) in artifacts(example) {
            if kind == "proxmox-conf" {
                out.push((format!("{example}/{node}"), guest_kind(&target), content));
            }
        }
    }
    let kinds: Vec<PveKind> = out.iter().map(|(_, k, _)| *k).collect();
    assert!(
        kinds.contains(&PveKind::Lxc) && kinds.contains(&PveKind::Qemu),
        "the examples render both container and VM configs"
    );
    out
}

#[test]
fn proxmox_conf_is_accepted_by_the_strict_parser_and_round_trips() {
    let mut failures = Vec::new();
    for (name, kind, text) in proxmox_confs() {
        match conf::parse(&text, kind) {
            Err(e) => failures.push(format!("{name}: the strict parser refuses it: {e}")),
            Ok(parsed) => {
                let written = parsed.write();
                if written != text {
                    failures.push(format!(
                        "{name}: parse -> write changes it: {}",
                        first_difference(text.as_bytes(), written.as_bytes())
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// The file grammar, copied from pve-container src/PVE/LXC/Config.pm @ 94f55852
// (parse_pct_config 1156-1214, write_pct_config 1243-1284); qemu-server's parse_vm_config
// and write_vm_config use the same option grammar and ordering:
// * `#` lines are the description, written first;
// * an option is `^([a-z][a-z_]*\d*):\s*(.+?)\s*$`, written as "$key: $value\n" with the
//   keys sorted (`sort keys`), so a written value has no surrounding whitespace;
// * raw container keys `^(lxc\.[a-z0-9_\-\.]+)(:|\s*=)\s*(.*?)\s*$` come last, in their
//   order, always written as "$key: $value\n" (an empty value leaves "key: ").
const OPTION_LINE: &str = r"^([a-z][a-z_]*\d*): (\S(?:.*\S)?)$";
const RAW_LXC_LINE: &str = r"^(lxc\.[a-z0-9_\-\.]+): (.*)$";
const DESCRIPTION_LINE: &str = r"^#";

#[test]
fn proxmox_conf_lines_follow_the_file_grammar() {
    let option = Regex::new(OPTION_LINE).unwrap();
    let raw = Regex::new(RAW_LXC_LINE).unwrap();
    let description = Regex::new(DESCRIPTION_LINE).unwrap();
    let mut failures = Vec::new();
    for (name, kind, text) in proxmox_confs() {
        if !text.ends_with('\n') {
            failures.push(format!("{name}: does not end with a newline"));
        }
        // 0 description, 1 options, 2 raw lxc keys: never going back.
        let mut stage = 0;
        let mut keys: Vec<String> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let at = format!("{name}:{}: {line:?}", i + 1);
            let this = if description.is_match(line) {
                0
            } else if let Some(c) = raw.captures(line) {
                if kind != PveKind::Lxc {
                    failures.push(format!("{at}: raw lxc key in a VM config"));
                }
                if c[2].trim() != &c[2] {
                    failures.push(format!("{at}: value has surrounding whitespace Proxmox would trim"));
                }
                2
            } else if let Some(c) = option.captures(line) {
                keys.push(c[1].to_string());
                1
            } else {
                failures.push(format!("{at}: matches no line of the grammar"));
                continue;
            };
            if this < stage {
                failures.push(format!("{at}: out of order (description, options, then raw lxc keys)"));
            }
            stage = this;
        }
        let mut sorted = keys.clone();
        sorted.sort();
        if keys != sorted {
            failures.push(format!("{name}: option keys are not sorted: {keys:?}"));
        }
        let mut unique = sorted.clone();
        unique.dedup();
        if unique != sorted {
            failures.push(format!("{name}: an option key repeats: {keys:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The grammar check itself: it must refuse what Proxmox refuses.
#[test]
fn the_grammar_check_refuses_what_proxmox_refuses() {
    let option = Regex::new(OPTION_LINE).unwrap();
    let raw = Regex::new(RAW_LXC_LINE).unwrap();
    for bad in [
        "Cores: 2",
        "ha-managed: 1",
        "cores:2",
        "cores: ",
        "cores: 2 ",
        "net0 = bridge=vmbr0",
    ] {
        assert!(!option.is_match(bad), "{bad:?}");
    }
    for good in [
        "cores: 2",
        "net0: name=eth0,bridge=vmbr0",
        "mp12: local:1,mp=/a",
        "nameserver: 1.1.1.1 8.8.8.8",
    ] {
        assert!(option.is_match(good), "{good:?}");
    }
    assert!(raw.is_match("lxc.cap.drop: "));
    assert!(raw.is_match("lxc.mount.auto: proc:rw sys:rw"));
    assert!(
        !raw.is_match("lxc.apparmor.profile = unconfined"),
        "written form is always `: `"
    );
}

// ---------------------------------------------------------------- Proxmox API parameters

#[test]
fn proxmox_api_params_validate_against_the_api_schema() {
    let schema = ApiSchema::embedded();
    let mut failures = Vec::new();
    let mut checked = Vec::new();
    for example in EXAMPLES {
        for (node, kind, target, content) in artifacts(example) {
            if kind != "proxmox-api" {
                continue;
            }
            let name = format!("{example}/{node}");
            let (method, path) = target.split_once(' ').expect("target is `METHOD PATH`");
            let params: BTreeMap<String, String> =
                serde_json::from_str(&content).unwrap_or_else(|e| panic!("{name}: proxmox-api.json: {e}"));
            assert!(params.values().all(|v| !v.is_empty()), "{name}: empty parameter");
            let Some((endpoint, _)) = schema.find(method, path) else {
                failures.push(format!("{name}: no endpoint {target} in the schema"));
                continue;
            };
            checked.push(endpoint.path.clone());
            if let Err(e) = schema.validate_request(method, path, &params) {
                failures.push(format!("{name}: {target} refused:\n{e}"));
            }
            // Raw lxc.* keys are not API parameters (they go into the file over SSH).
            if let Some(k) = params.keys().find(|k| k.starts_with("lxc.")) {
                failures.push(format!("{name}: `{k}` is not an API parameter"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    checked.sort();
    checked.dedup();
    assert_eq!(checked, ["/nodes/{node}/lxc", "/nodes/{node}/qemu"]);
}

/// The schema check itself: the rendered parameters pass because they are right, not
/// because the validator accepts anything.
#[test]
fn the_api_schema_refuses_what_proxmox_refuses() {
    let schema = ApiSchema::embedded();
    let (_, _, target, content) = artifacts("homelab-k3s")
        .into_iter()
        .find(|(n, k, _, _)| n == "k3s-master" && k == "proxmox-api")
        .expect("k3s-master's API parameters");
    let (method, path) = target.split_once(' ').unwrap();
    let good: BTreeMap<String, String> = serde_json::from_str(&content).unwrap();
    for (key, value) in [
        ("lxc.apparmor.profile", "unconfined"),
        ("cores", "two"),
        ("net0", "name=eth0,bridge=vmbr0,tag=5000"),
        ("features", "nesting=1,bogus=1"),
    ] {
        let mut bad = good.clone();
        bad.insert(key.into(), value.into());
        assert!(
            schema.validate_request(method, path, &bad).is_err(),
            "the schema accepts {key}={value}"
        );
    }
}

// ---------------------------------------------------------------- what an operator checks

/// A pinned artifact; while blessing (the snapshots are being rewritten), a fresh render.
fn snapshot(example: &str, node: &str, file: &str) -> String {
    if blessing() {
        let artifact = match file {
            "proxmox.conf" => "proxmox-conf",
            "proxmox-api.json" => "proxmox-api",
            "k3s-config.yaml" => "k3s-config",
            _ => "talos-config",
        };
        let r = testkit::run_repo(&testkit::example(example), ["render", node, "--artifact", artifact]);
        r.expect_code(0, &format!("render {example} {node} {artifact}"));
        return r.stdout;
    }
    let p = testkit::root()
        .join("tests/snapshots")
        .join(example)
        .join(node)
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The seed homelab as ADR-001 and ADR-004 describe it: K3s in LXC containers with the raw
/// LXC config K3s needs, 2 vCPU / 4 GiB / 32 GiB, 192.168.2.20-22/24 via 192.168.2.1.
/// Asserted on the snapshots, so a careless re-bless cannot pin a broken homelab.
#[test]
fn the_seed_homelab_has_what_k3s_in_lxc_needs() {
    let raw = "lxc.mount.entry: /dev/kmsg dev/kmsg none bind,rw,optional,create=file\n\
               lxc.apparmor.profile: unconfined\n\
               lxc.cap.drop: \n\
               lxc.cgroup2.devices.allow: a\n\
               lxc.mount.auto: proc:rw sys:rw\n";
    for (i, node) in ["k3s-master", "k3s-worker-1", "k3s-worker-2"].iter().enumerate() {
        let conf = snapshot("homelab-k3s", node, "proxmox.conf");
        assert!(
            conf.ends_with(raw),
            "{node}: raw LXC keys (all of them, in order, last):\n{conf}"
        );
        for line in [
            "cores: 2".to_string(),
            "features: fuse=1,keyctl=1,nesting=1".into(),
            format!("hostname: {node}"),
            "memory: 4096".into(),
            format!(
                "net0: name=eth0,bridge=vmbr0,gw=192.168.2.1,ip=192.168.2.{}/24,type=veth",
                20 + i
            ),
            format!("rootfs: local-lvm:vm-{}-disk-0,size=32G", 100 + i),
            "nameserver: 192.168.2.1 8.8.8.8".into(),
        ] {
            assert!(conf.lines().any(|l| l == line), "{node}: no `{line}` in\n{conf}");
        }
        let api: serde_json::Value = serde_json::from_str(&snapshot("homelab-k3s", node, "proxmox-api.json")).unwrap();
        assert_eq!(api["vmid"], (100 + i).to_string());
        assert_eq!(api["rootfs"], "local-lvm:32", "{node}: a new 32 GiB volume");
        assert_eq!(
            api["ostemplate"],
            "local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst"
        );
        assert_eq!(api["memory"], "4096");

        let k3s = snapshot("homelab-k3s", node, "k3s-config.yaml");
        assert!(k3s.contains(&format!("node-ip: 192.168.2.{}\n", 20 + i)), "{k3s}");
        if *node == "k3s-master" {
            assert!(k3s.contains("\nwrite-kubeconfig-mode: \"644\"\n"), "{k3s}");
            assert!(!k3s.contains("\nserver:"), "the only server joins no one:\n{k3s}");
        } else {
            assert!(k3s.contains("\nserver: https://192.168.2.20:6443\n"), "{k3s}");
            assert!(k3s.contains("\ntoken-file: /etc/rancher/k3s/cluster-token\n"), "{k3s}");
            assert!(
                !k3s.contains("write-kubeconfig-mode"),
                "ADR-004 is scoped to servers:\n{k3s}"
            );
        }
    }
}

/// The Talos design: VMs with 2 cores, 4 GiB and 32 GiB booting the Talos ISO, no raw LXC keys.
#[test]
fn the_talos_homelab_is_vms_booting_the_talos_image() {
    for (i, node) in ["talos-cp-1", "talos-worker-1", "talos-worker-2"].iter().enumerate() {
        let conf = snapshot("homelab-talos", node, "proxmox.conf");
        for line in [
            "cores: 2".to_string(),
            "cpu: host".into(),
            "memory: 4096".into(),
            format!("name: {node}"),
            "ide2: local:iso/metal-amd64.iso,media=cdrom".into(),
            format!("scsi0: local-lvm:vm-{}-disk-0,discard=on,iothread=1,size=32G", 200 + i),
        ] {
            assert!(conf.lines().any(|l| l == line), "{node}: no `{line}` in\n{conf}");
        }
        assert!(!conf.contains("lxc."), "{conf}");
        let api: serde_json::Value =
            serde_json::from_str(&snapshot("homelab-talos", node, "proxmox-api.json")).unwrap();
        assert_eq!(api["scsi0"], "local-lvm:32,discard=on,iothread=1");
    }
}
