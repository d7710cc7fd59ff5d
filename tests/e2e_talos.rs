//! End to end, Talos: the built binary applies examples/homelab-talos into the sandbox from
//! nothing to a Ready cluster. VMs are created through the Proxmox API; each boots in maintenance
//! mode and takes its first machine config over the Talos API without client certificates, the
//! first control plane node is bootstrapped, the kubeconfig comes from Talos, and later changes
//! go over mTLS with the talosconfig made from the secrets bundle, Talos's own dry-run diff in
//! the plan. The sandbox's Talos API validates every config it is sent against the official
//! schema. An impostor taking the nodes' address (`talos_api::serve_impostor`) is sent no
//! config: the plan or the apply stops, naming the node.

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
