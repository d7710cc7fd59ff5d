//! Import as a pure function: guests in, repository files out, and the files load, validate
//! and plan to nothing (or to the ownership tag) against the very guests they came from.

use super::*;
use crate::model::{LoadOptions, RepoFiles, load};
use crate::plan::{Observed, desired_guests};
use crate::ports::GuestSummary;

fn opts() -> ImportOptions {
    ImportOptions {
        cluster_name: "homelab".into(),
        distribution: Distribution::K3s,
        version: "v1.31.4+k3s1".into(),
        kubernetes_version: None,
        api: "https://127.0.0.1:8006".into(),
        fingerprint: None,
        ssh: None,
        ownership_tag: "driftless".into(),
        gateway: None,
        addresses: BTreeMap::new(),
        roles: BTreeMap::new(),
        template: None,
        templates: BTreeMap::from([(
            "pve".to_string(),
            vec![
                "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst".to_string(),
                "local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst".to_string(),
            ],
        )]),
    }
}

fn ct(vmid: u32, name: &str, ip: &str, tags: &[&str], extra: &[(&str, &str)]) -> ImportedGuest {
    let mut options: BTreeMap<String, String> = [
        ("arch", "amd64"),
        ("cores", "2"),
        ("hostname", name),
        ("memory", "4096"),
        ("nameserver", "192.168.2.1"),
        ("onboot", "1"),
        ("ostype", "ubuntu"),
        ("swap", "512"),
        ("unprivileged", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    options.insert(
        "net0".into(),
        format!("name=eth0,bridge=vmbr0,firewall=1,gw=192.168.2.1,hwaddr=BC:24:11:00:00:{vmid:02X},ip={ip},type=veth")
            .chars()
            .take(200)
            .collect(),
    );
    options.insert("rootfs".into(), format!("local-lvm:vm-{vmid}-disk-0,size=8G"));
    if !tags.is_empty() {
        options.insert("tags".into(), tags.join(";"));
    }
    for (k, v) in extra {
        options.insert(k.to_string(), v.to_string());
    }
    ImportedGuest {
        summary: GuestSummary {
            vmid,
            node: "pve".into(),
            kind: PveKind::Lxc,
            name: Some(name.into()),
            status: "running".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        },
        config: LiveConfig {
            options,
            raw_lxc: Vec::new(),
            digest: format!("{vmid:040}"),
        },
        file: Some(ConfFile::default()),
    }
}

fn load_imported(imported: &Imported) -> crate::model::Desired {
    let mut files = RepoFiles::new("imported");
    for (path, text) in &imported.files {
        files.insert(path.clone(), text.clone());
    }
    match load(&files, &LoadOptions::default()) {
        Ok(d) => d,
        Err(diags) => panic!(
            "the imported files do not validate:\n{diags}\n{}",
            imported
                .files
                .iter()
                .map(|(p, t)| format!("--- {p}\n{t}"))
                .collect::<String>()
        ),
    }
}

/// The plan of the imported repository against the guests it was imported from.
fn plan_against(imported: &Imported, guests: &[ImportedGuest]) -> crate::plan::Plan {
    let desired = load_imported(imported);
    let artifacts = crate::render::render_all(&desired).expect("renders");
    let wanted = desired_guests(&desired, &artifacts);
    let observed = Observed {
        guests: guests.iter().map(|g| g.summary.clone()).collect(),
        configs: guests
            .iter()
            .map(|g| {
                let mut c = g.config.clone();
                if let Some(f) = &g.file {
                    c.raw_lxc = f.raw_lxc.clone();
                }
                (g.summary.vmid, c)
            })
            .collect(),
    };
    crate::plan::plan(&desired, &wanted, &observed)
}

/// Every step of a plan as `verb node key,key`.
fn steps(plan: &crate::plan::Plan) -> Vec<String> {
    plan.steps
        .iter()
        .map(|s| match &s.action {
            crate::plan::Action::Update { changes, .. } => format!(
                "update {} {}",
                s.node,
                changes.iter().map(|c| c.key.as_str()).collect::<Vec<_>>().join(",")
            ),
            other => format!("{} {}", other.verb(), s.node),
        })
        .collect()
}

#[test]
fn hand_made_containers_import_and_plan_only_the_ownership_tag() {
    let guests = vec![
        ct(100, "k3s-master", "192.168.2.20/24", &[], &[]),
        ct(101, "k3s-worker-1", "192.168.2.21/24", &["web"], &[]),
    ];
    let imported = import(&guests, &opts()).unwrap();
    assert_eq!(
        imported.files.keys().collect::<Vec<_>>(),
        ["cluster.yaml", "nodes/k3s-master.yaml", "nodes/k3s-worker-1.yaml"]
    );
    let master = &imported.files["nodes/k3s-master.yaml"];
    assert!(
        master.starts_with(
            "# Imported by `driftless import` from CT 100 `k3s-master` on Proxmox node pve at https://127.0.0.1:8006"
        ),
        "{master}"
    );
    assert!(master.contains("adopt: true\n"), "{master}");
    assert!(master.contains("role: server  # guessed from the name"), "{master}");
    assert!(imported.files["nodes/k3s-worker-1.yaml"].contains("role: agent"));
    assert_eq!(
        steps(&plan_against(&imported, &guests)),
        ["update k3s-master tags", "update k3s-worker-1 tags"]
    );
}

#[test]
fn what_every_guest_shares_is_lifted_into_cluster_defaults() {
    let guests = vec![
        ct(100, "a-server", "192.168.2.20/24", &[], &[]),
        ct(101, "b", "192.168.2.21/24", &[], &[("cores", "4")]),
    ];
    let imported = import(&guests, &opts()).unwrap();
    let cluster = &imported.files["cluster.yaml"];
    assert!(cluster.contains("defaults:\n  lxc:\n"), "{cluster}");
    assert!(cluster.contains("    memory: 4GiB\n"), "{cluster}");
    assert!(
        cluster.contains("    template: local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst  # guessed"),
        "{cluster}"
    );
    assert!(cluster.contains("  dns: [192.168.2.1]\n"), "{cluster}");
    assert!(cluster.contains("  gateway: 192.168.2.1\n"), "{cluster}");
    // cores differ: each node says its own.
    assert!(!cluster.contains("cores:"), "{cluster}");
    assert!(imported.files["nodes/a-server.yaml"].contains("\ncores: 2\n"));
    assert!(imported.files["nodes/b.yaml"].contains("\ncores: 4\n"));
    assert!(!imported.files["nodes/b.yaml"].contains("memory:"));
    let desired = load_imported(&imported);
    assert!(
        desired.nodes[1].provenance["memory"]
            .cite()
            .starts_with("cluster.yaml:")
    );
}

#[test]
fn raw_keys_mount_points_and_snapshots_are_said_out_loud() {
    let mut g = ct(
        105,
        "Legacy_Box",
        "192.168.2.30/24",
        &["driftless"],
        &[
            ("mp0", "local-lvm:vm-105-disk-1,mp=/data,size=10G"),
            ("features", "nesting=1,keyctl=1"),
            ("description", "hand made\nin 2023"),
            ("parent", "before-upgrade"),
        ],
    );
    g.file = Some(ConfFile {
        raw_lxc: vec![
            ("lxc.apparmor.profile".into(), "unconfined".into()),
            ("lxc.cap.drop".into(), String::new()),
            (
                "lxc.mount.entry".into(),
                "/dev/kmsg dev/kmsg none bind,rw,optional,create=file".into(),
            ),
        ],
        snapshots: vec!["before-upgrade".into()],
    });
    let imported = import(std::slice::from_ref(&g), &opts()).unwrap();
    let file = &imported.files["nodes/legacy-box.yaml"];
    for want in [
        "  raw:\n    - lxc.apparmor.profile: unconfined\n    - lxc.cap.drop: \"\"\n    - lxc.mount.entry: /dev/kmsg dev/kmsg none bind,rw,optional,create=file\n",
        "  features:\n",
        "    keyctl: true\n",
        "description: \"hand made\\nin 2023\"\n",
        "# Not managed by driftless, kept as they are:\n#   mp0: local-lvm:vm-105-disk-1,mp=/data,size=10G\n#   snapshots: before-upgrade\n",
        "# Note: its name `Legacy_Box` is not a valid host name",
        "# Note: net0 also has firewall=1",
    ] {
        assert!(file.contains(want), "missing {want:?} in\n{file}");
    }
    // Already tagged: the name is the only change (the file says so), applied on a restart.
    assert_eq!(
        steps(&plan_against(&imported, &[g])),
        ["update legacy-box hostname", "restart legacy-box"]
    );
}

#[test]
fn guests_driftless_cannot_describe_are_skipped_with_the_reason() {
    let dhcp = ct(110, "dhcp", "dhcp", &[], &[]);
    let mut vm = ct(200, "talos-cp-1", "10.0.0.10/24", &[], &[]);
    vm.summary.kind = PveKind::Qemu;
    vm.config.options = BTreeMap::from([
        ("name".into(), "talos-cp-1".into()),
        ("net0".into(), "virtio=BC:24:11:00:00:01,bridge=vmbr0".into()),
        ("ide2".into(), "local:iso/metal-amd64.iso,media=cdrom".into()),
    ]);
    let far = ct(120, "far", "10.9.0.5/24", &[], &[]);
    let near = ct(100, "near", "192.168.2.20/24", &[], &[]);
    let nearer = ct(101, "nearer", "192.168.2.21/24", &[], &[]);
    let imported = import(&[dhcp, vm.clone(), far, near, nearer], &opts()).unwrap();
    let reasons: BTreeMap<u32, &str> = imported.skipped.iter().map(|s| (s.vmid, s.reason.as_str())).collect();
    assert!(reasons[&110].contains("ip=dhcp"), "{reasons:?}");
    assert!(reasons[&200].contains("--address talos-cp-1=IP/PREFIX"), "{reasons:?}");
    assert!(reasons[&120].contains("outside 192.168.2.0/24"), "{reasons:?}");
    assert_eq!(imported.files.len(), 3);

    let mut o = opts();
    o.distribution = Distribution::Talos;
    o.version = "v1.13.9".into();
    o.kubernetes_version = Some("v1.34.1".into());
    o.addresses.insert("talos-cp-1".into(), "10.0.0.10/24".parse().unwrap());
    let imported = import(&[vm], &o).unwrap();
    let file = &imported.files["nodes/talos-cp-1.yaml"];
    assert!(file.contains("role: controlplane"), "{file}");
    assert!(file.contains("image: local:iso/metal-amd64.iso"), "{file}");
    assert!(imported.files["cluster.yaml"].contains("gateway: 10.0.0.1  # guessed"));
    load_imported(&imported);
}

#[test]
fn nothing_selected_is_an_error_not_an_empty_repository() {
    assert_eq!(import(&[], &opts()).unwrap_err(), ImportError::NothingSelected);
}

#[test]
fn selections_and_patterns() {
    let g = ct(150, "k3s-worker-2", "192.168.2.22/24", &["K3s"], &[]).summary;
    assert!(Selection::default().matches(&g));
    assert!(
        Selection {
            vmids: Some(parse_vmid_range("100-199").unwrap()),
            tags: vec!["k3s".into()],
            names: vec!["k3s-*".into()],
        }
        .matches(&g)
    );
    assert!(
        !Selection {
            names: vec!["k3s-w?".into()],
            ..Selection::default()
        }
        .matches(&g)
    );
    assert!(
        !Selection {
            vmids: Some((200, 299)),
            ..Selection::default()
        }
        .matches(&g)
    );
    assert_eq!(parse_vmid_range("100").unwrap(), (100, 100));
    assert_eq!(parse_vmid_range("100-").unwrap(), (100, 999_999_999));
    assert!(parse_vmid_range("200-100").is_err());
}

#[test]
fn strings_are_quoted_exactly_when_yaml_would_read_them_otherwise() {
    for (s, want) in [
        ("vmbr0", "vmbr0"),
        ("local:vztmpl/ubuntu.tar.zst", "local:vztmpl/ubuntu.tar.zst"),
        ("true", "\"true\""),
        ("0644", "\"0644\""),
        ("a: b", "\"a: b\""),
        ("# x", "\"# x\""),
        ("", "\"\""),
        ("proc:rw sys:rw", "proc:rw sys:rw"),
    ] {
        assert_eq!(yaml_str(s), want, "{s}");
    }
}
