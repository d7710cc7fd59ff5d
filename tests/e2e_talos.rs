//! End to end, Talos: the built binary applies examples/homelab-talos into the sandbox from
//! nothing to a Ready cluster. VMs are created through the Proxmox API; each boots in maintenance
//! mode and takes its first machine config over the Talos API without client certificates, the
//! first control plane node is bootstrapped, the kubeconfig comes from Talos, and later changes
//! go over mTLS with the talosconfig made from the secrets bundle, Talos's own dry-run diff in
//! the plan. The sandbox's Talos API validates every config it is sent against the official
//! schema. An impostor taking the nodes' address (`talos_api::serve_impostor`) is sent no
//! config: the plan or the apply stops, naming the node. A change of `version` upgrades the
//! nodes through Talos's Upgrade call, one at a time, control plane first, each waited for (the
//! sandbox reboots it); a change of `kubernetes_version` is refused before anything is sent.

use driftless_sandbox::talos_api::{self, ImpostorKind};
use testkit::cluster_env;

use cluster_env::Env;

/// `driftless ARGS` against `env`, with the nodes' Talos API at `endpoint` (what answers at
/// their address: `--talos-endpoint` routes every node through it, with `node` metadata).
fn run_with_talos_at(env: &Env, cmd: &[&str], endpoint: &str) -> testkit::Run {
    let mut args = vec!["--repo".to_string(), env.repo.path().display().to_string()];
    args.extend(cmd.iter().map(|s| s.to_string()));
    let mut settings = env.args();
    let at = settings.iter().position(|a| a == "--talos-endpoint").unwrap() + 1;
    settings[at] = endpoint.to_string();
    args.extend(settings);
    let r = testkit::run(&args);
    let mut printed = env.printed.borrow_mut();
    printed.push_str(&r.stdout);
    printed.push_str(&r.stderr);
    r
}

/// What of the bundle must never leave driftless but to the cluster's own nodes: every value,
/// and every line of its PEM texts.
fn bundle_secrets() -> Vec<String> {
    let bundle = Env::talos_bundle();
    let mut out = Vec::new();
    for field in bundle.field_names() {
        out.push(bundle.get(field).unwrap().to_string());
        if let Ok(pem) = bundle.pem(field) {
            out.extend(
                pem.lines()
                    .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                    .map(String::from),
            );
        }
    }
    out
}

fn assert_impostor_got_nothing(log: &talos_api::ImpostorLog) {
    assert!(log.configs.is_empty(), "the impostor was sent a machine config");
    assert!(
        log.calls.iter().all(|(path, _)| path.ends_with("/Version")),
        "{:?}",
        log.calls
    );
    let received = String::from_utf8_lossy(&log.received);
    for secret in bundle_secrets() {
        assert!(
            !received.contains(&secret),
            "a secret of the bundle reached the impostor"
        );
    }
}

fn verbs(plan: &serde_json::Value) -> Vec<String> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s["action"].as_str().unwrap(), s["node"].as_str().unwrap()))
        .collect()
}

#[test]
fn the_talos_homelab_bootstraps_to_a_ready_cluster_and_changes_go_through_talos_dry_runs() {
    let env = Env::new("homelab-talos");
    let plan = env.plan_json();
    assert_eq!(
        verbs(&plan),
        [
            "create talos-cp-1",
            "talos_apply talos-cp-1",
            "talos_bootstrap talos-cp-1",
            "create talos-worker-1",
            "talos_apply talos-worker-1",
            "create talos-worker-2",
            "talos_apply talos-worker-2",
            // Cilium, the CNI add-on of ADR-002, then every node Ready (tests/addons.rs).
            "addon addons/cilium",
            "nodes_ready nodes",
        ]
    );
    assert_eq!(plan["steps"][1]["maintenance"], true);

    let r = env.apply();
    assert!(r.stdout.contains("Applied 9 of 9 steps."), "{}\n{}", r.stdout, r.stderr);
    for (name, role) in [
        ("talos-cp-1", "controlplane"),
        ("talos-worker-1", "worker"),
        ("talos-worker-2", "worker"),
    ] {
        let n = env.node(name);
        assert!(n.kubelet_running, "{name}");
        assert_eq!(n.role, role);
        assert_eq!(n.kubelet_version, "v1.34.1");
    }
    assert!(env.secrets.path().join("kubeconfig").exists());
    assert!(env.secrets.path().join("talosconfig").exists());
    assert!(r.stderr.contains("etcd bootstrapped"), "{}", r.stderr);
    let health = env.run(&["health"], &[]);
    health.expect_code(0, "health");

    // Converged: Talos's dry runs report no changes, nothing is bootstrapped twice.
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());

    // A label in a node file changes the worker's machine config: the plan carries Talos's
    // own diff of it (over mTLS now), and the apply is gated.
    let worker = env.repo.path().join("nodes/talos-worker-1.yaml");
    let base = std::fs::read_to_string(&worker).unwrap();
    std::fs::write(&worker, format!("{base}labels:\n  tier: storage\n")).unwrap();
    let plan = env.plan_json();
    assert_eq!(verbs(&plan), ["talos_apply talos-worker-1"]);
    let step = &plan["steps"][0];
    assert_eq!(step["maintenance"], false);
    let diff = step["diff"].as_str().unwrap();
    assert!(diff.contains("tier"), "{diff}");
    let r = env.apply();
    assert!(r.stderr.contains("talos-worker-1 Ready, API ready"), "{}", r.stderr);
    assert_eq!(
        env.node("talos-worker-1").labels.get("tier").map(String::as_str),
        Some("storage")
    );
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());

    // No value of the secrets bundle reached any output.
    let printed = env.printed.borrow();
    let bundle = Env::talos_bundle();
    for field in bundle.field_names() {
        let value = bundle.get(field).unwrap();
        assert!(!printed.contains(value), "{field} was printed");
        if let Ok(pem) = bundle.pem(field) {
            for line in pem.lines().filter(|l| l.len() >= 16 && !l.starts_with("-----")) {
                assert!(!printed.contains(line), "a line of {field} was printed");
            }
        }
    }
}

#[test]
fn a_config_the_official_schema_rejects_is_refused_by_talos_already_at_plan_time() {
    let env = Env::new("homelab-talos");
    env.apply();
    // A user template that writes a key Talos does not know.
    let tpl = std::fs::read_to_string(testkit::root().join("templates/talos-machineconfig.yaml.j2")).unwrap();
    let broken = tpl.replacen("machine:\n", "machine:\n  kubeletImage: nope\n", 1);
    assert_ne!(tpl, broken);
    std::fs::create_dir_all(env.repo.path().join("templates")).unwrap();
    std::fs::write(env.repo.path().join("templates/talos-machineconfig.yaml.j2"), broken).unwrap();
    let r = env.run(&["plan"], &[]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("InvalidArgument"), "{}", r.stderr);
    assert!(r.stderr.contains("kubeletImage"), "{}", r.stderr);
}

#[test]
fn an_impostor_at_the_nodes_address_is_sent_no_config_and_the_run_stops_naming_the_node() {
    let env = Env::new("homelab-talos");
    env.apply();

    // Something answers at the nodes' address exactly as Talos's maintenance service does
    // (a self-signed certificate, no client certificate asked). The VMs exist: this apply
    // creates none, so no config goes out unauthenticated.
    let impostor = env
        .rt
        .block_on(talos_api::serve_impostor(ImpostorKind::Maintenance, None))
        .unwrap();
    let r = run_with_talos_at(&env, &["--output", "json", "plan"], &impostor.endpoint);
    r.expect_code(0, "plan");
    let plan = r.json();
    assert_eq!(
        verbs(&plan),
        [
            "talos_apply talos-cp-1",
            "talos_apply talos-worker-1",
            "talos_apply talos-worker-2"
        ]
    );
    for step in plan["steps"].as_array().unwrap() {
        assert_eq!(step["maintenance"], false, "{step}");
        let diff = step["diff"].as_str().unwrap();
        assert!(
            diff.starts_with(
                "refused: answers as a Talos node in maintenance mode, but this apply does not create its VM"
            ),
            "{diff}"
        );
    }
    let r = run_with_talos_at(&env, &["apply", "--auto-approve"], &impostor.endpoint);
    assert_ne!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let output = format!("{}{}", r.stdout, r.stderr);
    assert!(
        output.contains("talos-cp-1: answers as a Talos node in maintenance mode"),
        "{output}"
    );
    assert!(
        output.contains("set `talos: {maintenance_apply: true}` in nodes/talos-cp-1.yaml"),
        "{output}"
    );
    assert!(!output.contains("config applied"), "{output}");
    assert_impostor_got_nothing(&impostor.log());
    env.rt.block_on(impostor.shutdown());

    // Something that answers without client certificates, as no Talos node does: not even a
    // plan, and the error names the node and the certificate.
    let impostor = env
        .rt
        .block_on(talos_api::serve_impostor(ImpostorKind::Answering, None))
        .unwrap();
    for cmd in [&["plan"][..], &["apply", "--auto-approve"][..]] {
        let r = run_with_talos_at(&env, cmd, &impostor.endpoint);
        assert_ne!(r.code, 0, "{cmd:?}: {}\n{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(
                "talos-cp-1: the Talos API at 10.0.0.10 is not the cluster's: the cluster CA (the talosconfig's `ca`) \
                 did not sign its certificate"
            ),
            "{cmd:?}: {}",
            r.stderr
        );
    }
    assert_impostor_got_nothing(&impostor.log());
    env.rt.block_on(impostor.shutdown());

    // The cluster's own nodes were left as they were, and nothing secret was printed.
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());
    let printed = env.printed.borrow();
    for secret in bundle_secrets() {
        assert!(!printed.contains(&secret), "a secret of the bundle was printed");
    }
}

#[test]
fn a_talos_version_bump_upgrades_the_nodes_one_at_a_time_control_plane_first_each_gated() {
    let env = Env::new("homelab-talos");
    env.apply();

    let cluster_yaml = env.repo.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&cluster_yaml).unwrap();
    assert!(text.contains("version: v1.13.9\n"));
    std::fs::write(&cluster_yaml, text.replace("version: v1.13.9\n", "version: v1.13.10\n")).unwrap();

    // The plan: each node's upgrade, control plane first, before its config (whose install
    // image now names v1.13.10).
    let plan = env.plan_json();
    let upgrades: Vec<&serde_json::Value> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == "talos_upgrade")
        .collect();
    let order: Vec<&str> = upgrades.iter().map(|s| s["node"].as_str().unwrap()).collect();
    assert_eq!(
        order,
        ["talos-cp-1", "talos-worker-1", "talos-worker-2"],
        "{:?}",
        verbs(&plan)
    );
    for step in &upgrades {
        assert_eq!(step["from"], "v1.13.9");
        assert_eq!(step["to"], "v1.13.10");
        assert_eq!(step["image"], "ghcr.io/siderolabs/installer:v1.13.10");
        assert_eq!(step["provenance"], "cluster.yaml:4");
        assert_eq!(step["disruptive"], true);
        assert!(step.get("refused").is_none(), "{step}");
    }
    let all = verbs(&plan);
    for node in order {
        let upgrade = all.iter().position(|v| *v == format!("talos_upgrade {node}")).unwrap();
        if let Some(apply) = all.iter().position(|v| *v == format!("talos_apply {node}")) {
            assert!(upgrade < apply, "{all:?}");
        }
    }
    let text = env.run(&["plan"], &[]);
    assert!(
        text.stdout
            .contains("talos v1.13.9 -> v1.13.10 (set by cluster.yaml:4)"),
        "{}",
        text.stdout
    );

    let r = env.apply();
    for node in ["talos-cp-1", "talos-worker-1", "talos-worker-2"] {
        assert!(
            r.stderr.contains(&format!("{node} runs Talos v1.13.10")),
            "{node}: {}",
            r.stderr
        );
    }
    // The sandbox saw one upgrade per node, in order, each sent after the one before was back.
    let records = talos_api::upgrades(env.state.path());
    let nodes: Vec<&str> = records.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, ["10.0.0.10", "10.0.0.21", "10.0.0.22"]);
    for (i, record) in records.iter().enumerate() {
        assert_eq!((record.from.as_str(), record.to.as_str()), ("v1.13.9", "v1.13.10"));
        assert!(record.overlapping.is_empty(), "{record:?}");
        if i > 0 {
            assert!(record.at_ms >= records[i - 1].back_ms, "{records:?}");
        }
    }
    for node in ["talos-cp-1", "talos-worker-1", "talos-worker-2"] {
        assert!(env.node(node).kubelet_running, "{node}");
    }

    // Converged: nothing to upgrade, and the configs already name the installer that runs.
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());
}

#[test]
fn a_kubernetes_version_bump_on_talos_is_refused_in_the_plan_and_the_apply_sends_nothing() {
    let env = Env::new("homelab-talos");
    env.apply();
    let cluster_yaml = env.repo.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&cluster_yaml).unwrap();
    std::fs::write(
        &cluster_yaml,
        text.replace("kubernetes_version: v1.34.1\n", "kubernetes_version: v1.35.0\n"),
    )
    .unwrap();

    let plan = env.plan_json();
    let all = verbs(&plan);
    assert_eq!(all[0], "kubernetes_upgrade talos-cp-1", "{all:?}");
    let step = &plan["steps"][0];
    assert_eq!(
        (step["from"].as_str(), step["to"].as_str()),
        (Some("v1.34.1"), Some("v1.35.0"))
    );
    assert_eq!(step["provenance"], "cluster.yaml:5");
    let refused = step["refused"].as_str().unwrap();
    assert!(refused.contains("run `talosctl upgrade-k8s --to 1.35.0`"), "{refused}");
    assert!(refused.contains("driftless does not do this yet"), "{refused}");

    let r = env.run(&["apply"], &["--auto-approve"]);
    assert_ne!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let output = format!("{}{}", r.stdout, r.stderr);
    assert!(
        output.contains("talos-cp-1: kubernetes_version change from v1.34.1 to v1.35.0 on Talos"),
        "{output}"
    );
    assert!(!output.contains("config applied"), "{output}");
    for node in ["talos-cp-1", "talos-worker-1", "talos-worker-2"] {
        assert_eq!(env.node(node).kubelet_version, "v1.34.1", "{node}");
    }
}

#[test]
fn a_minor_talos_upgrade_sends_the_new_release_config_after_the_upgrade_and_converges() {
    let env = Env::new("homelab-talos");
    env.apply();
    let cluster_yaml = env.repo.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&cluster_yaml).unwrap();
    std::fs::write(&cluster_yaml, text.replace("version: v1.13.9\n", "version: v1.14.0\n")).unwrap();
    let plan = env.plan_json();
    for step in plan["steps"].as_array().unwrap() {
        if step["action"] == "talos_apply" {
            let diff = step["diff"].as_str().unwrap();
            assert!(
                diff.starts_with("no dry run: the config is for Talos v1.14.0"),
                "{diff}"
            );
        }
    }
    env.apply();
    let records = talos_api::upgrades(env.state.path());
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r.to == "v1.14.0" && r.overlapping.is_empty()));
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());
}
