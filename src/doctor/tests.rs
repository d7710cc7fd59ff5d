//! The checks as pure functions of what was seen: one healthy lab, then one thing broken at a
//! time, each with the line and the advice a user would read.

use super::*;
use crate::plan::{Observed, desired_guests};
use crate::ports::{CommandOutput, GuestSummary, NetworkInterface, ProxmoxError, PveNode, PveVersion, ShellError};

fn lab() -> (Desired, Plan) {
    let (desired, artifacts) = crate::test_repo::lab();
    let guests = desired_guests(&desired, &artifacts);
    let plan = crate::plan::plan(&desired, &guests, &Observed::default());
    (desired, plan)
}

fn all_privileges() -> BTreeMap<String, bool> {
    crate::ports::fakes::ALL_PRIVILEGES
        .iter()
        .map(|p| (p.to_string(), true))
        .collect()
}

fn storage(id: &str, kind: &str, content: &[&str], avail_gib: u64) -> StorageStatus {
    StorageStatus {
        storage: id.into(),
        kind: kind.into(),
        content: content.iter().map(|c| c.to_string()).collect(),
        active: true,
        enabled: true,
        shared: false,
        total: Some(256 << 30),
        used: Some((256 - avail_gib) << 30),
        avail: Some(avail_gib << 30),
    }
}

fn healthy(desired: &Desired, plan: &Plan) -> Observations {
    let paths: BTreeSet<String> = required_privileges(desired, plan)
        .into_iter()
        .chain(later_privileges(desired))
        .map(|n| n.path)
        .collect();
    let host = HostSeen {
        network: Some(Ok(vec![
            NetworkInterface {
                iface: "eno1".into(),
                kind: "eth".into(),
                active: true,
            },
            NetworkInterface {
                iface: "vmbr0".into(),
                kind: "bridge".into(),
                active: true,
            },
        ])),
        storages: Some(Ok(vec![
            storage("local", "dir", &["backup", "iso", "vztmpl"], 92),
            storage("local-lvm", "lvmthin", &["images", "rootdir"], 200),
        ])),
        content: BTreeMap::from([(
            "local".to_string(),
            Ok(vec![StorageVolume {
                volid: "local:vztmpl/ubuntu.tar.zst".into(),
                content: "vztmpl".into(),
                format: "tzst".into(),
                size: 1 << 27,
                vmid: None,
            }]),
        )]),
    };
    Observations {
        token: TokenSeen {
            id: Ok("driftless@pve!apply".into()),
            source: "secret pve-token".into(),
        },
        api: Some(ApiSeen {
            endpoint: "https://pve:8006".into(),
            trust: Trust::Fingerprint("AB:CD".into()),
            version: Ok(PveVersion {
                version: "9.1.3".into(),
                release: "9.1".into(),
            }),
            nodes: Some(Ok(vec![PveNode {
                node: "pve".into(),
                status: "online".into(),
                ssl_fingerprint: None,
            }])),
            plan: Some(Ok(plan.clone())),
            guests: BTreeMap::new(),
            permissions: paths.into_iter().map(|p| (p, all_privileges())).collect(),
            permissions_error: None,
            hosts: BTreeMap::from([("pve".to_string(), host)]),
        }),
        plan_token: None,
        plans_pull_requests: false,
        host_shells: Some(vec![HostShellSeen {
            pve_node: "pve".into(),
            target: "root@pve:22".into(),
            known_hosts: Some("secrets/pve.known_hosts".into()),
            pct: Ok(CommandOutput {
                status: 0,
                stdout: b"VMID Status Lock Name\n".to_vec(),
                stderr: Vec::new(),
            }),
        }]),
        vm_nodes: BTreeMap::new(),
        secrets_dir: "secrets".into(),
        secrets_dir_mode: Some(0o700),
        secrets: vec![SecretSeen {
            name: "pve-token".into(),
            purpose: "Proxmox API token".into(),
            source: SecretSource::File {
                path: "secrets/pve-token".into(),
                mode: 0o600,
                empty: false,
            },
            overridden_by: None,
            shape_error: None,
        }],
        repository: None,
    }
}

fn find<'a>(report: &'a Report, name: &str) -> &'a Check {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check `{name}` in\n{}", report.text()))
}

/// The one error of a report, with its advice.
fn only_error(report: &Report) -> &Check {
    let errors: Vec<&Check> = report.checks.iter().filter(|c| c.status == Status::Error).collect();
    assert_eq!(errors.len(), 1, "{}", report.text());
    errors[0]
}

#[test]
fn a_healthy_lab_passes_every_check() {
    let (desired, plan) = lab();
    let report = checks(&desired, &healthy(&desired, &plan));
    assert!(report.ok(), "{}", report.text());
    assert_eq!(report.count(Status::Warning), 0, "{}", report.text());
    for name in [
        "api token",
        "proxmox api",
        "privileges",
        "proxmox node pve",
        "storage pve/local-lvm",
        "bridge pve/vmbr0",
        "image pve/local:vztmpl/ubuntu.tar.zst",
        "host shell pve",
        "secret pve-token",
    ] {
        assert_eq!(find(&report, name).status, Status::Ok, "{name}\n{}", report.text());
    }
    assert_eq!(find(&report, "repository").status, Status::Skip);
    let text = report.text();
    assert!(text.contains("ready"), "{text}");
    assert!(text.contains("3 new disks need 24 GiB"), "{text}");
}

#[test]
fn a_wrong_pin_says_where_to_read_the_right_one() {
    let (desired, plan) = lab();
    let mut seen = healthy(&desired, &plan);
    let api = seen.api.as_mut().unwrap();
    api.version = Err(ProxmoxError::Transport {
        endpoint: "https://pve:8006".into(),
        message: "invalid peer certificate (the server's certificate is not trusted: check the CA file or the pinned \
                  fingerprint)"
            .into(),
    });
    let report = checks(&desired, &seen);
    let c = only_error(&report);
    assert_eq!(c.name, "proxmox api");
    assert!(
        c.detail.contains("does not match the pinned fingerprint AB:CD"),
        "{c:?}"
    );
    assert!(c.advice.as_deref().unwrap().contains("pvenode cert info"), "{c:?}");
}

#[test]
fn an_unreachable_api_and_a_refused_token_are_told_apart() {
    let (desired, plan) = lab();
    let mut seen = healthy(&desired, &plan);
    seen.api.as_mut().unwrap().version = Err(ProxmoxError::Transport {
        endpoint: "https://pve:8006".into(),
        message: "connection refused".into(),
    });
    let c = only_error(&checks(&desired, &seen)).clone();
    assert!(c.advice.unwrap().contains("systemctl status pveproxy"));
    seen.api.as_mut().unwrap().version = Err(ProxmoxError::Api {
        status: 401,
        what: "GET /version".into(),
        message: "invalid token value!".into(),
    });
    let c = only_error(&checks(&desired, &seen)).clone();
    assert!(c.detail.contains("refused"), "{c:?}");
    assert!(c.advice.unwrap().contains("pveum user token list"));
}

#[test]
fn a_token_missing_a_privilege_names_it_with_the_path_and_the_step() {
    let (desired, plan) = lab();
    let mut seen = healthy(&desired, &plan);
    let perms = &mut seen.api.as_mut().unwrap().permissions;
    perms.get_mut("/vms/100").unwrap().remove("VM.Allocate");
    let report = checks(&desired, &seen);
    let c = only_error(&report);
    assert_eq!(c.name, "privileges");
    assert!(c.detail.contains("VM.Allocate on /vms/100 (create k3s-1)"), "{c:?}");
    assert!(
        c.advice.as_deref().unwrap().contains("pveum acl modify /vms/100"),
        "{c:?}"
    );
}

#[test]
fn what_a_plan_needs_follows_proxmoxs_own_checks() {
    let (desired, plan) = lab();
    let needs = required_privileges(&desired, &plan);
    let has = |path: &str, privilege: &str| {
        needs
            .iter()
            .any(|n| n.path == path && n.any_of.iter().any(|p| p == privilege))
    };
    for (path, privilege) in [
        ("/vms/100", "VM.Audit"),
        ("/vms/100", "VM.Allocate"),
        ("/vms/100", "VM.Config.CPU"),
        ("/vms/100", "VM.Config.Memory"),
        ("/vms/100", "VM.Config.Network"),
        ("/vms/100", "VM.Config.Disk"),
        ("/vms/100", "VM.Config.Options"),
        ("/vms/100", "VM.PowerMgmt"),
        ("/storage/local-lvm", "Datastore.AllocateSpace"),
        ("/storage/local", "Datastore.Audit"),
        ("/sdn/zones/localnetwork/vmbr0", "SDN.Use"),
    ] {
        assert!(has(path, privilege), "{privilege} on {path} missing from {needs:#?}");
    }
    // Unprivileged containers (Proxmox's default) need no Sys.Modify.
    assert!(!has("/", "Sys.Modify"));
}

#[test]
fn only_a_guest_step_needs_write_privileges() {
    let (desired, artifacts) = crate::test_repo::lab();
    let guests = desired_guests(&desired, &artifacts);
    let observed = Observed {
        guests: guests
            .iter()
            .map(|g| GuestSummary {
                vmid: g.vmid,
                node: g.pve_node.clone(),
                kind: g.kind,
                name: Some(g.node.clone()),
                status: "running".into(),
                tags: vec!["driftless".into()],
            })
            .collect(),
        configs: guests
            .iter()
            .map(|g| {
                (
                    g.vmid,
                    crate::ports::LiveConfig {
                        options: g.options.clone(),
                        raw_lxc: g.raw_lxc.clone(),
                        digest: "d".into(),
                    },
                )
            })
            .collect(),
    };
    let plan = crate::plan::plan(&desired, &guests, &observed);
    assert!(plan.is_empty());
    let needs = required_privileges(&desired, &plan);
    assert!(needs.iter().all(|n| n.any_of == ["VM.Audit"]), "{needs:#?}");
}

#[test]
fn root_only_changes_without_a_host_shell_are_an_error() {
    let (desired, plan) = lab();
    let mut plan = plan;
    if let Action::Create { raw_lxc, .. } = &mut plan.steps[0].action {
        raw_lxc.push(("lxc.apparmor.profile".into(), "unconfined".into()));
    }
    let mut seen = healthy(&desired, &plan);
    seen.host_shells = None;
    let report = checks(&desired, &seen);
    let c = only_error(&report);
    assert_eq!(c.name, "root-only changes");
    assert!(c.detail.contains("raw lxc keys of k3s-1"), "{c:?}");
    assert!(c.advice.as_deref().unwrap().contains("proxmox.hosts"), "{c:?}");
}

#[test]
fn a_missing_node_bridge_storage_or_template_each_say_what_exists() {
    let (desired, plan) = lab();

    let mut seen = healthy(&desired, &plan);
    seen.api.as_mut().unwrap().nodes = Some(Ok(vec![PveNode {
        node: "pve2".into(),
        status: "online".into(),
        ssl_fingerprint: None,
    }]));
    let report = checks(&desired, &seen);
    let c = only_error(&report);
    assert_eq!(c.name, "proxmox node pve");
    assert!(c.detail.contains("(nodes: pve2)"), "{c:?}");
    assert_eq!(find(&report, "bridge pve/vmbr0").status, Status::Skip);

    let mut seen = healthy(&desired, &plan);
    seen.api.as_mut().unwrap().nodes.as_mut().unwrap().as_mut().unwrap()[0].status = "offline".into();
    assert_eq!(only_error(&checks(&desired, &seen)).name, "proxmox node pve");

    let mut seen = healthy(&desired, &plan);
    let host = seen.api.as_mut().unwrap().hosts.get_mut("pve").unwrap();
    host.network = Some(Ok(vec![NetworkInterface {
        iface: "vmbr1".into(),
        kind: "bridge".into(),
        active: true,
    }]));
    let c = only_error(&checks(&desired, &seen)).clone();
    assert_eq!(c.name, "bridge pve/vmbr0");
    assert!(
        c.detail.contains("no bridge vmbr0 on this node (bridges: vmbr1)"),
        "{c:?}"
    );
    assert!(c.advice.unwrap().contains("Linux Bridge"));

    let mut seen = healthy(&desired, &plan);
    let host = seen.api.as_mut().unwrap().hosts.get_mut("pve").unwrap();
    host.content.insert("local".into(), Ok(Vec::new()));
    let c = only_error(&checks(&desired, &seen)).clone();
    assert_eq!(c.name, "image pve/local:vztmpl/ubuntu.tar.zst");
    assert!(c.detail.contains("needed to create k3s-1, k3s-2, k3s-3"), "{c:?}");
    assert!(c.advice.unwrap().contains("pveam download local ubuntu.tar.zst"));

    let mut seen = healthy(&desired, &plan);
    let host = seen.api.as_mut().unwrap().hosts.get_mut("pve").unwrap();
    host.storages = Some(Ok(vec![storage("local-lvm", "lvmthin", &["images", "rootdir"], 20)]));
    let c = only_error(&checks(&desired, &seen)).clone();
    assert_eq!(c.name, "storage pve/local-lvm");
    assert!(c.detail.contains("20 GiB free"), "{c:?}");
    assert!(c.detail.contains("3 new disks need 24 GiB"), "{c:?}");

    let mut seen = healthy(&desired, &plan);
    let host = seen.api.as_mut().unwrap().hosts.get_mut("pve").unwrap();
    host.storages = Some(Ok(vec![storage("local-lvm", "lvmthin", &["images"], 200)]));
    let c = only_error(&checks(&desired, &seen)).clone();
    assert!(c.detail.contains("does not hold container disks"), "{c:?}");
}

#[test]
fn a_template_missing_for_guests_that_exist_is_only_a_warning() {
    let (desired, plan) = lab();
    let mut seen = healthy(&desired, &plan);
    let api = seen.api.as_mut().unwrap();
    api.guests = [100, 101, 102]
        .into_iter()
        .map(|v| (v, "running".to_string()))
        .collect();
    api.hosts
        .get_mut("pve")
        .unwrap()
        .content
        .insert("local".into(), Ok(Vec::new()));
    let report = checks(&desired, &seen);
    assert!(report.ok(), "{}", report.text());
    let c = find(&report, "image pve/local:vztmpl/ubuntu.tar.zst");
    assert_eq!(c.status, Status::Warning);
    assert!(c.detail.contains("re-creating"), "{c:?}");
}

#[test]
fn host_shell_failures_each_come_with_their_fix() {
    let (desired, plan) = lab();
    for (error, detail, fix) in [
        (
            ShellError::UnknownHost {
                host: "10.0.0.2:22".into(),
                known_hosts: "secrets/pve.known_hosts".into(),
            },
            "is not in the known_hosts file",
            "ssh-keyscan -t ed25519 10.0.0.2 >> secrets/pve.known_hosts",
        ),
        (
            ShellError::HostKeyMismatch {
                host: "10.0.0.2:22".into(),
            },
            "does not match",
            "replace its line",
        ),
        (
            ShellError::Auth {
                host: "10.0.0.2:22".into(),
            },
            "authentication",
            "authorized_keys",
        ),
    ] {
        let mut seen = healthy(&desired, &plan);
        seen.host_shells.as_mut().unwrap()[0].pct = Err(error);
        let report = checks(&desired, &seen);
        let c = only_error(&report);
        assert_eq!(c.name, "host shell pve");
        assert!(c.detail.contains(detail), "{c:?}");
        assert!(c.advice.as_deref().unwrap().contains(fix), "{c:?}");
    }
    let mut seen = healthy(&desired, &plan);
    seen.host_shells.as_mut().unwrap()[0].pct = Ok(CommandOutput {
        status: 127,
        stdout: Vec::new(),
        stderr: b"sh: pct: not found".to_vec(),
    });
    let c = only_error(&checks(&desired, &seen)).clone();
    assert!(c.detail.contains("`pct` not found"), "{c:?}");
}

#[test]
fn secrets_must_exist_be_private_and_look_right() {
    let (desired, plan) = lab();
    let cases: [(SecretSource, Option<&str>, &str, &str); 4] = [
        (
            SecretSource::Missing {
                path: "secrets/pve-token".into(),
            },
            None,
            "does not exist",
            "install -m 600 /dev/stdin secrets/pve-token",
        ),
        (
            SecretSource::File {
                path: "secrets/pve-token".into(),
                mode: 0o644,
                empty: false,
            },
            None,
            "mode 0644: readable by others",
            "chmod 600 secrets/pve-token",
        ),
        (
            SecretSource::Unreadable {
                path: "secrets/pve-token".into(),
                error: "Is a directory".into(),
            },
            None,
            "cannot read secrets/pve-token",
            "chmod 600",
        ),
        (
            SecretSource::File {
                path: "secrets/pve-token".into(),
                mode: 0o600,
                empty: false,
            },
            Some("not an API token: no '!' before the token id"),
            "not an API token",
            "Proxmox API token",
        ),
    ];
    for (source, shape, detail, fix) in cases {
        let mut seen = healthy(&desired, &plan);
        seen.secrets[0].source = source;
        seen.secrets[0].shape_error = shape.map(str::to_string);
        let report = checks(&desired, &seen);
        let c = only_error(&report);
        assert_eq!(c.name, "secret pve-token");
        assert!(c.detail.contains(detail), "{c:?}");
        assert!(c.advice.as_deref().unwrap().contains(fix), "{c:?}");
    }
    let mut seen = healthy(&desired, &plan);
    seen.secrets[0].source = SecretSource::Missing {
        path: "secrets/pve-token".into(),
    };
    seen.secrets[0].overridden_by = Some("--proxmox-token-file /tmp/t".into());
    let report = checks(&desired, &seen);
    assert!(report.ok(), "an overridden secret is not needed: {}", report.text());
}

#[test]
fn a_plan_token_must_read_everything_and_change_nothing() {
    let (desired, plan) = lab();
    let read_only: Permissions =
        BTreeMap::from([("/vms".to_string(), BTreeMap::from([("VM.Audit".to_string(), true)]))]);
    let mut seen = healthy(&desired, &plan);
    seen.plans_pull_requests = true;
    let report = checks(&desired, &seen);
    assert_eq!(find(&report, "plan token").status, Status::Warning);

    // The fake's answers come per path; a token with VM.Audit on /vms reads /vms/100 too.
    let per_vm: Permissions = [100, 101, 102]
        .iter()
        .map(|v| (format!("/vms/{v}"), read_only["/vms"].clone()))
        .collect();
    seen.plan_token = Some(PlanTokenSeen {
        source: "--plan-token-file t".into(),
        id: Ok("driftless@pve!plan".into()),
        permissions: Ok(per_vm),
    });
    assert_eq!(find(&checks(&desired, &seen), "plan token").status, Status::Ok);

    let mut writable = read_only.clone();
    writable.get_mut("/vms").unwrap().insert("VM.Allocate".into(), true);
    seen.plan_token.as_mut().unwrap().permissions = Ok(writable);
    let c = only_error(&checks(&desired, &seen)).clone();
    assert_eq!(c.name, "plan token");
    assert!(c.detail.contains("VM.Allocate on /vms"), "{c:?}");
    assert!(c.advice.unwrap().contains("PVEAuditor"));
}

#[test]
fn the_report_reads_as_one_line_per_check_with_its_fix_below() {
    let (desired, plan) = lab();
    let mut seen = healthy(&desired, &plan);
    seen.secrets[0].source = SecretSource::Missing {
        path: "secrets/pve-token".into(),
    };
    let text = checks(&desired, &seen).text();
    let line = text.lines().find(|l| l.starts_with("error")).unwrap();
    assert!(line.contains("secret pve-token"), "{text}");
    let next = text.lines().skip_while(|l| !l.starts_with("error")).nth(1).unwrap();
    assert!(next.trim_start().starts_with("fix: put it there"), "{text}");
    assert!(text.contains("1 error"), "{text}");
    assert!(text.contains("not ready"), "{text}");
}

#[test]
fn a_vm_node_that_does_not_answer_on_ssh_says_how_to_pin_its_key() {
    let files = {
        let mut f = crate::test_repo::files();
        f.insert(
            "nodes/k3s-4.yaml",
            "vmid: 104\nproxmox_node: pve\nkind: vm\nrole: agent\naddress: 10.0.0.14/24\nimage: local:iso/ubuntu.iso\n",
        );
        f
    };
    let (desired, artifacts) = crate::test_repo::load_files(&files);
    let guests = desired_guests(&desired, &artifacts);
    let plan = crate::plan::plan(&desired, &guests, &Observed::default());
    let mut seen = healthy(&desired, &plan);
    seen.api
        .as_mut()
        .unwrap()
        .hosts
        .get_mut("pve")
        .unwrap()
        .content
        .get_mut("local")
        .unwrap()
        .as_mut()
        .unwrap()
        .push(StorageVolume {
            volid: "local:iso/ubuntu.iso".into(),
            content: "iso".into(),
            format: "iso".into(),
            size: 1,
            vmid: None,
        });
    seen.vm_nodes.insert("k3s-4".into(), NodeReach::NotCreated);
    assert!(checks(&desired, &seen).ok());
    seen.vm_nodes.insert(
        "k3s-4".into(),
        NodeReach::Ssh(Err(ShellError::UnknownHost {
            host: "10.0.0.14:22".into(),
            known_hosts: "/root/.ssh/known_hosts".into(),
        })),
    );
    let report = checks(&desired, &seen);
    let c = only_error(&report);
    assert_eq!(c.name, "node k3s-4");
    assert!(c.detail.contains("SSH to 10.0.0.14"), "{c:?}");
    assert!(
        c.advice
            .as_deref()
            .unwrap()
            .contains("ssh-keyscan -t ed25519 10.0.0.14"),
        "{c:?}"
    );
}

#[test]
fn a_token_enough_for_this_plan_but_not_for_later_changes_is_a_warning() {
    let (desired, artifacts) = crate::test_repo::lab();
    let guests = desired_guests(&desired, &artifacts);
    let observed = Observed {
        guests: guests
            .iter()
            .map(|g| GuestSummary {
                vmid: g.vmid,
                node: g.pve_node.clone(),
                kind: g.kind,
                name: Some(g.node.clone()),
                status: "running".into(),
                tags: vec!["driftless".into()],
            })
            .collect(),
        configs: guests
            .iter()
            .map(|g| {
                (
                    g.vmid,
                    crate::ports::LiveConfig {
                        options: g.options.clone(),
                        raw_lxc: g.raw_lxc.clone(),
                        digest: "d".into(),
                    },
                )
            })
            .collect(),
    };
    let plan = crate::plan::plan(&desired, &guests, &observed);
    let mut seen = healthy(&desired, &plan);
    let audit_only: BTreeMap<String, bool> = BTreeMap::from([("VM.Audit".to_string(), true)]);
    for vmid in [100, 101, 102] {
        seen.api
            .as_mut()
            .unwrap()
            .permissions
            .insert(format!("/vms/{vmid}"), audit_only.clone());
    }
    let report = checks(&desired, &seen);
    assert!(report.ok(), "{}", report.text());
    let c = find(&report, "privileges later");
    assert_eq!(c.status, Status::Warning);
    assert!(c.detail.contains("VM.Config.CPU or VM.Config.Memory"), "{c:?}");
    assert_eq!(
        find(&report, "privileges").detail,
        "nothing to change; reading the 3 guests is granted"
    );
}
