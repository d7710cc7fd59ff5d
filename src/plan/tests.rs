//! Planning with plain values: the example homelab against hand-made observed states.

use super::*;
use crate::model::{LoadOptions, load};
use crate::ports::{GuestSummary, LiveConfig, PveKind};
use crate::render::render_all;
use std::path::Path;

fn example(name: &str) -> (Desired, Vec<DesiredGuest>) {
    let files = crate::source::read_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)).unwrap();
    let desired = load(&files, &LoadOptions::default()).unwrap();
    let artifacts = render_all(&desired).unwrap();
    let guests = desired_guests(&desired, &artifacts);
    (desired, guests)
}

/// What Proxmox holds after creating `g` from its parameters: the same options, plus what
/// Proxmox adds itself (a MAC address, the OS type).
fn live_of(g: &DesiredGuest) -> LiveConfig {
    let mut options = g.options.clone();
    if let Some(net) = options.get_mut("net0") {
        net.push_str(",hwaddr=BC:24:11:00:00:01");
    }
    options.insert("ostype".into(), "ubuntu".into());
    LiveConfig {
        options,
        raw_lxc: g.raw_lxc.clone(),
        digest: format!("digest-{}", g.vmid),
    }
}

fn summary(g: &DesiredGuest, status: &str, tags: &[&str]) -> GuestSummary {
    GuestSummary {
        vmid: g.vmid,
        node: g.pve_node.clone(),
        kind: g.kind,
        name: Some(g.node.clone()),
        status: status.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

fn converged(guests: &[DesiredGuest]) -> Observed {
    Observed {
        guests: guests.iter().map(|g| summary(g, "running", &["driftless"])).collect(),
        configs: guests.iter().map(|g| (g.vmid, live_of(g))).collect(),
    }
}

#[test]
fn empty_proxmox_creates_every_node_control_plane_first() {
    let (desired, guests) = example("homelab-k3s");
    let plan = plan(&desired, &guests, &Observed::default());
    let order: Vec<(&str, &str)> = plan.steps.iter().map(|s| (s.action.verb(), s.node.as_str())).collect();
    assert_eq!(
        order,
        [
            ("create", "k3s-master"),
            ("create", "k3s-worker-1"),
            ("create", "k3s-worker-2")
        ]
    );
    let Action::Create {
        params,
        root_options,
        raw_lxc,
        provenance,
    } = &plan.steps[0].action
    else {
        panic!()
    };
    // The seed's containers are privileged: an API token may set no feature on them at all,
    // so every feature goes through `pct set` as root.
    assert_eq!(params["unprivileged"], "0");
    assert!(!params.contains_key("features"), "{params:?}");
    assert_eq!(
        root_options,
        &[("features".to_string(), "fuse=1,keyctl=1,nesting=1".to_string())]
    );
    assert_eq!(raw_lxc.len(), 5);
    assert_eq!(params["rootfs"], "local-lvm:32");
    assert!(
        provenance["cores"].starts_with("ADR-001 adr/ADR-001-lxc-containers-for-k3s.md:"),
        "{provenance:?}"
    );
}

#[test]
fn a_converged_cluster_plans_nothing() {
    let (desired, guests) = example("homelab-k3s");
    let plan = plan(&desired, &guests, &converged(&guests));
    assert!(
        plan.is_empty(),
        "{}",
        display::text(&plan, display::Wording::Plan, false)
    );
    assert!(plan.conflicts.is_empty() && plan.orphans.is_empty());
}

#[test]
fn a_changed_value_is_one_update_with_provenance_and_keeps_the_mac() {
    let (desired, guests) = example("homelab-k3s");
    let mut observed = converged(&guests);
    let live = observed.configs.get_mut(&101).unwrap();
    live.options.insert("cores".into(), "4".into());
    live.options.insert(
        "net0".into(),
        "name=eth0,bridge=vmbr1,gw=192.168.2.1,hwaddr=BC:24:11:AA:BB:CC,ip=192.168.2.21/24,type=veth".into(),
    );
    let plan = plan(&desired, &guests, &observed);
    assert_eq!(
        plan.steps.len(),
        1,
        "{}",
        display::text(&plan, display::Wording::Plan, false)
    );
    let Action::Update { changes, digest, .. } = &plan.steps[0].action else {
        panic!()
    };
    assert_eq!(digest, "digest-101");
    let cores = changes.iter().find(|c| c.key == "cores").unwrap();
    assert_eq!(
        (cores.old.as_deref(), cores.new.as_deref(), cores.needs_restart),
        (Some("4"), Some("2"), false)
    );
    assert!(
        cores
            .provenance
            .as_deref()
            .unwrap()
            .contains("adr/ADR-001-lxc-containers-for-k3s.md:")
    );
    let net = changes.iter().find(|c| c.key == "net0").unwrap();
    assert!(
        net.new.as_deref().unwrap().contains("hwaddr=BC:24:11:AA:BB:CC"),
        "the MAC address stays: {net:?}"
    );
    assert!(net.new.as_deref().unwrap().contains("bridge=vmbr0"));
}

#[test]
fn features_and_raw_keys_need_root_and_a_restart() {
    let (desired, guests) = example("homelab-k3s");
    let mut observed = converged(&guests);
    let live = observed.configs.get_mut(&100).unwrap();
    live.options.insert("features".into(), "nesting=1".into());
    live.raw_lxc.retain(|(k, _)| k != "lxc.apparmor.profile");
    let plan = plan(&desired, &guests, &observed);
    let verbs: Vec<&str> = plan.steps.iter().map(|s| s.action.verb()).collect();
    assert_eq!(verbs, ["update", "restart"]);
    assert!(plan.steps[1].disruptive);
    let Action::Update { changes, .. } = &plan.steps[0].action else {
        panic!()
    };
    let f = changes.iter().find(|c| c.key == "features").unwrap();
    assert_eq!((f.via, f.needs_restart), (Via::RootShell, true));
    let raw = changes.iter().find(|c| c.key == "lxc.raw").unwrap();
    assert_eq!(raw.via, Via::ConfFile);
    assert!(raw.new.as_deref().unwrap().contains("lxc.apparmor.profile: unconfined"));
}

#[test]
fn untagged_guests_are_conflicts_unless_adopted() {
    let (desired, guests) = example("homelab-k3s");
    let mut observed = converged(&guests);
    observed.guests[1].tags = vec!["prod".into()];
    let p = plan(&desired, &guests, &observed);
    assert!(p.steps.is_empty());
    assert_eq!(p.conflicts.len(), 1);
    assert_eq!(p.conflicts[0].vmid, 101);
    assert!(p.conflicts[0].reason.contains("adopt: true"));

    let mut adopting = desired.clone();
    adopting.nodes.iter_mut().find(|n| n.vmid == 101).unwrap().adopt = true;
    observed
        .configs
        .get_mut(&101)
        .unwrap()
        .options
        .insert("tags".into(), "prod".into());
    let p = plan(&adopting, &guests, &observed);
    let Action::Update { changes, .. } = &p.steps[0].action else {
        panic!("{p:?}")
    };
    assert_eq!(changes[0].key, "tags");
    assert_eq!(changes[0].new.as_deref(), Some("driftless"));
}

#[test]
fn tags_compare_the_way_proxmox_stores_them() {
    assert_eq!(
        normalize_tags(&["Prod;driftless,web".into()]),
        ["driftless", "prod", "web"]
    );
    let (desired, guests) = example("homelab-k3s");
    let mut observed = converged(&guests);
    observed
        .configs
        .get_mut(&100)
        .unwrap()
        .options
        .insert("tags".into(), "DRIFTLESS".into());
    observed.guests[0].tags = vec!["DriftLess".into()];
    assert!(plan(&desired, &guests, &observed).is_empty());
}

#[test]
fn orphans_are_left_alone_without_prune_and_deleted_with_it() {
    let (mut desired, guests) = example("homelab-k3s");
    let mut observed = converged(&guests);
    observed.guests.push(GuestSummary {
        vmid: 150,
        node: "pve".into(),
        kind: PveKind::Lxc,
        name: Some("old-worker".into()),
        status: "running".into(),
        tags: vec!["driftless".into()],
    });
    observed.guests.push(GuestSummary {
        vmid: 151,
        node: "pve".into(),
        kind: PveKind::Lxc,
        name: Some("someone-elses".into()),
        status: "running".into(),
        tags: vec![],
    });
    let p = plan(&desired, &guests, &observed);
    assert!(p.steps.is_empty());
    assert_eq!(p.orphans.iter().map(|o| o.vmid).collect::<Vec<_>>(), [150]);
    desired.cluster.reconcile.prune = true;
    let p = plan(&desired, &guests, &observed);
    assert_eq!(p.steps.len(), 1);
    assert_eq!(
        (p.steps[0].vmid, p.steps[0].action.clone()),
        (150, Action::Delete { running: true })
    );
}

#[test]
fn plans_are_stable_values() {
    let (desired, guests) = example("homelab-talos");
    let a = plan(&desired, &guests, &Observed::default());
    let b = plan(&desired, &guests, &Observed::default());
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    assert_eq!(
        display::markdown(&a, display::Wording::Plan),
        display::markdown(&b, display::Wording::Plan)
    );
    assert_eq!(a.count("create"), 3);
    assert!(a.steps.iter().all(|s| s.kind == PveKind::Qemu));
}

#[test]
fn a_stopped_guest_is_started() {
    let (desired, guests) = example("homelab-k3s");
    let mut observed = converged(&guests);
    observed.guests[2].status = "stopped".into();
    let p = plan(&desired, &guests, &observed);
    assert_eq!(
        p.steps.iter().map(|s| (s.action.verb(), s.vmid)).collect::<Vec<_>>(),
        [("start", 102)]
    );
}

#[test]
fn a_description_added_in_git_to_an_existing_guest_is_planned_with_its_source() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/homelab-k3s");
    let mut files = crate::source::read_dir(&dir).unwrap();
    let node = String::from_utf8(files.files["nodes/k3s-worker-1.yaml"].clone()).unwrap();
    files.insert(
        "nodes/k3s-worker-1.yaml",
        format!("{node}description: \"Worker 1, rack B\"\n"),
    );
    let before = example("homelab-k3s").1;
    let desired = load(&files, &LoadOptions::default()).unwrap();
    let guests = desired_guests(&desired, &render_all(&desired).unwrap());
    // Proxmox holds the guest as it was created before the description was written.
    let observed = converged(&before);
    let plan = plan(&desired, &guests, &observed);
    let [step] = &plan.steps[..] else {
        panic!("{}", display::text(&plan, display::Wording::Plan, false))
    };
    let Action::Update { changes, .. } = &step.action else {
        panic!("{step:?}")
    };
    let [c] = &changes[..] else { panic!("{changes:?}") };
    assert_eq!((c.key.as_str(), c.old.as_deref()), ("description", None));
    assert!(c.new.as_deref().unwrap().contains("Worker 1, rack B"), "{c:?}");
    assert!(
        c.provenance.as_deref().unwrap().starts_with("nodes/k3s-worker-1.yaml:"),
        "{c:?}"
    );
    assert!(!c.needs_restart);
}

#[test]
fn a_step_is_named_with_its_guest_and_a_cluster_wide_step_without_one() {
    assert_eq!(super::subject("k3s-2", 101), "k3s-2 (vmid 101)");
    // Add-ons and the all-nodes gate act on no guest: no "(vmid 0)" in progress or reports.
    assert_eq!(super::subject("addons/cilium", 0), "addons/cilium");
}
