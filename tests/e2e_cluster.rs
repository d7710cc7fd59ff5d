//! End to end, the cluster layer: the built binary applies the seed K3s homelab into the
//! sandbox from nothing to a Ready cluster. Containers are reached with `pct exec` / `pct
//! push` through a real OpenSSH server on loopback (the Proxmox host shell); the health gates
//! ask the sandbox's Kubernetes API through kube-rs with the kubeconfig fetched from the
//! server.

use testkit::cluster_env;

use cluster_env::Env;

fn verbs(plan: &serde_json::Value) -> Vec<String> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s["action"].as_str().unwrap(), s["node"].as_str().unwrap()))
        .collect()
}

const NODES: [(&str, u32); 3] = [("k3s-master", 100), ("k3s-worker-1", 101), ("k3s-worker-2", 102)];

fn bump_version(env: &Env, to: &str) {
    let path = env.repo.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("version: v1.31.4+k3s1", &format!("version: {to}"))).unwrap();
}

#[test]
fn the_seed_homelab_becomes_a_ready_k3s_cluster_and_stays_converged() {
    let env = Env::new("homelab-k3s");
    let plan = env.plan_json();
    // Node by node, server first: the guest, K3s on it, then the next node.
    assert_eq!(
        verbs(&plan),
        [
            "create k3s-master",
            "k3s_install k3s-master",
            "k3s_configure k3s-master",
            "create k3s-worker-1",
            "k3s_install k3s-worker-1",
            "k3s_configure k3s-worker-1",
            "create k3s-worker-2",
            "k3s_install k3s-worker-2",
            "k3s_configure k3s-worker-2",
            // The core apps after the nodes, wave by wave (tests/addons.rs follows them).
            "addon addons/cert-manager",
            "addon addons/longhorn",
            "addon addons/metallb",
            "addon addons/metallb-pool",
        ]
    );
    assert_eq!(
        plan["steps"][2]["kubeconfig"], true,
        "the first server hands out the kubeconfig"
    );

    let r = env.apply();
    assert!(
        r.stdout.contains("Applied 13 of 13 steps."),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    // Every node joined and is Ready as the Kubernetes API reports it.
    for (name, vmid) in NODES {
        let n = env.node(name);
        assert!(n.kubelet_running, "{name}");
        assert_eq!(n.kubelet_version, "v1.31.4+k3s1");
        assert_eq!(n.vmid, Some(vmid));
        let config = env.rootfs_file(vmid, "/etc/rancher/k3s/config.yaml").unwrap();
        assert!(config.contains(&format!("node-name: {name}")), "{config}");
    }
    assert_eq!(env.node("k3s-master").role, "server");
    assert_eq!(env.node("k3s-worker-1").role, "agent");
    // The agents' token is the server's node-token, written 0600 beside the config.
    let server_token = env.rootfs_file(100, "/var/lib/rancher/k3s/server/node-token").unwrap();
    assert_eq!(
        env.rootfs_file(101, "/etc/rancher/k3s/cluster-token").unwrap().trim(),
        server_token.trim()
    );
    // The kubeconfig for operators: in the secrets directory, pointing at the server.
    let kubeconfig = std::fs::read_to_string(env.secrets.path().join("kubeconfig")).unwrap();
    assert!(kubeconfig.contains("server: https://192.168.2.20:6443"), "{kubeconfig}");
    assert!(r.stderr.contains("Ready, API ready"), "{}", r.stderr);

    // The seed's checks, as one health view: API ready, nodes Ready, token, system pods.
    let health = env.run(&["health"], &[]);
    health.expect_code(0, "health");
    for want in [
        "ok   API server /readyz",
        "ok   node k3s-master Ready (v1.31.4+k3s1)",
        "ok   node k3s-worker-2 Ready",
        "ok   server node-token present",
        "ok   pod kube-system/coredns-",
        "ok   pod kube-system/traefik-",
        "ok   pod kube-system/metrics-server-",
    ] {
        assert!(health.stdout.contains(want), "{want}\n{}", health.stdout);
    }
    env.sandbox().set_never_ready(&["k3s-worker-2"]).unwrap();
    let sick = env.run(&["health"], &[]);
    assert_eq!(sick.code, 1, "{}", sick.stdout);
    assert!(sick.stdout.contains("FAIL node k3s-worker-2 Ready"), "{}", sick.stdout);
    env.sandbox().set_never_ready(&[]).unwrap();

    // Converged: nothing to plan, and a second apply does nothing.
    let plan = env.plan_json();
    assert_eq!(verbs(&plan), Vec::<String>::new(), "{plan:#}");
    let again = env.apply();
    assert!(again.stdout.contains("Nothing to apply."), "{}", again.stdout);

    // Neither the join token nor the API token ever reached any output.
    let printed = env.printed.borrow();
    let secret = server_token.trim().rsplit("::server:").next().unwrap();
    assert!(!printed.contains(secret), "the join token was printed");
    assert!(
        !printed.contains(&env.sandbox().kube.token),
        "the API token was printed"
    );
}

#[test]
fn a_version_bump_upgrades_servers_then_agents_one_at_a_time_and_a_node_that_never_gets_ready_stops_the_wave() {
    let env = Env::new("homelab-k3s");
    env.apply();

    bump_version(&env, "v1.31.5+k3s1");
    let plan = env.plan_json();
    assert_eq!(
        verbs(&plan),
        [
            "k3s_install k3s-master",
            "k3s_configure k3s-master",
            "k3s_install k3s-worker-1",
            "k3s_configure k3s-worker-1",
            "k3s_install k3s-worker-2",
            "k3s_configure k3s-worker-2",
        ]
    );
    for s in plan["steps"].as_array().unwrap() {
        assert_eq!(s["disruptive"], true, "upgrading a member is disruptive: {s}");
    }
    let text = env.run(&["plan"], &[]);
    assert!(
        text.stdout.contains("k3s v1.31.4+k3s1 -> v1.31.5+k3s1"),
        "{}",
        text.stdout
    );

    // worker-1's kubelet never comes back: the wave stops there, worker-2 stays as it was.
    env.sandbox().set_never_ready(&["k3s-worker-1"]).unwrap();
    env.gate_timeout.set("3s");
    let r = env.run(&["apply"], &["--auto-approve"]);
    env.gate_timeout.set("20s");
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stdout.contains("k3s-worker-1 did not become Ready within 3 s"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.contains("Not done: upgrade k3s k3s-worker-2"), "{}", r.stdout);
    assert_eq!(env.node("k3s-master").kubelet_version, "v1.31.5+k3s1");
    assert_eq!(env.node("k3s-worker-2").kubelet_version, "v1.31.4+k3s1");
    // The server went first and was gated before any agent was touched.
    let master_at = r.stderr.find("configure k3s k3s-master").unwrap();
    let worker_at = r.stderr.find("upgrade k3s k3s-worker-1").unwrap();
    assert!(master_at < worker_at, "{}", r.stderr);

    // Once the node recovers, the rest of the wave completes and the cluster converges.
    env.sandbox().set_never_ready(&[]).unwrap();
    env.apply();
    assert_eq!(env.node("k3s-worker-2").kubelet_version, "v1.31.5+k3s1");
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());
}

#[test]
fn labels_and_taints_from_node_files_are_reconciled_through_the_kubernetes_api() {
    let env = Env::new("homelab-k3s");
    env.apply();
    let worker = env.repo.path().join("nodes/k3s-worker-1.yaml");
    let base = std::fs::read_to_string(&worker).unwrap();
    std::fs::write(
        &worker,
        format!("{base}labels:\n  tier: storage\ntaints:\n  - dedicated=storage:NoSchedule\n"),
    )
    .unwrap();
    let plan = env.plan_json();
    let v = verbs(&plan);
    // The config changes too (node-label/node-taint), and the API step records them.
    assert!(v.contains(&"node_metadata k3s-worker-1".to_string()), "{v:?}");
    env.apply();
    let n = env.node("k3s-worker-1");
    assert_eq!(n.labels.get("tier").map(String::as_str), Some("storage"));
    assert!(
        n.taints.iter().any(|t| t.to_string() == "dedicated=storage:NoSchedule"),
        "{:?}",
        n.taints
    );
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());

    // Removing them from the node file removes them from the node, and only them.
    std::fs::write(&worker, &base).unwrap();
    env.apply();
    let n = env.node("k3s-worker-1");
    assert_eq!(n.labels.get("tier"), None);
    assert!(n.taints.is_empty(), "{:?}", n.taints);
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());
}

#[test]
fn several_servers_form_an_ha_control_plane_with_embedded_etcd() {
    let env = Env::new("homelab-k3s");
    // k3s-worker-1 becomes a second server: it joins the first, which starts the cluster.
    let path = env.repo.path().join("nodes/k3s-worker-1.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("role: agent", "role: server");
    std::fs::write(&path, text).unwrap();
    let plan = env.plan_json();
    assert_eq!(
        verbs(&plan)[..6],
        [
            "create k3s-master",
            "k3s_install k3s-master",
            "k3s_configure k3s-master",
            "create k3s-worker-1",
            "k3s_install k3s-worker-1",
            "k3s_configure k3s-worker-1",
        ]
    );
    env.apply();
    let first = env.rootfs_file(100, "/etc/rancher/k3s/config.yaml").unwrap();
    let second = env.rootfs_file(101, "/etc/rancher/k3s/config.yaml").unwrap();
    assert!(first.contains("cluster-init: true"), "{first}");
    assert!(second.contains("server: https://192.168.2.20:6443"), "{second}");
    assert!(
        second.contains("token-file: /etc/rancher/k3s/cluster-token"),
        "{second}"
    );
    assert_eq!(env.node("k3s-worker-1").role, "server");
    assert!(env.node("k3s-worker-1").kubelet_running);
    // The agent joined too, and the second server's token is the first's.
    assert!(env.node("k3s-worker-2").kubelet_running);
    assert_eq!(
        env.rootfs_file(101, "/etc/rancher/k3s/cluster-token").unwrap(),
        env.rootfs_file(102, "/etc/rancher/k3s/cluster-token").unwrap()
    );
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());
}

#[test]
fn without_internet_k3s_comes_from_a_binary_on_the_proxmox_host() {
    let env = Env::new("homelab-k3s");
    // K3s's air-gapped install: the binary and install.sh side by side on the host.
    let airgap = env.state.path().join("airgap");
    std::fs::create_dir_all(&airgap).unwrap();
    std::fs::write(airgap.join("k3s"), "k3s version v1.31.4+k3s1 (airgap build)\n").unwrap();
    std::fs::write(airgap.join("install.sh"), "#!/bin/sh\n# the official install script\n").unwrap();
    let cluster = env.repo.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&cluster).unwrap();
    std::fs::write(&cluster, format!("{text}\nk3s:\n  binary: {}/k3s\n", airgap.display())).unwrap();

    let plan = env.run(&["plan"], &[]);
    plan.expect_code(0, "plan");
    assert!(
        plan.stdout.contains(&format!(
            "k3s v1.31.4+k3s1 (from {}/k3s on the Proxmox host)",
            airgap.display()
        )),
        "{}",
        plan.stdout
    );
    let r = env.apply();
    assert!(r.stderr.contains("installed k3s from"), "{}", r.stderr);
    assert_eq!(
        env.rootfs_file(100, "/usr/local/bin/k3s").unwrap(),
        "k3s version v1.31.4+k3s1 (airgap build)\n"
    );
    assert!(env.rootfs_file(101, "/usr/local/bin/k3s-install.sh").is_some());
    assert!(env.node("k3s-worker-2").kubelet_running);
}

#[test]
fn a_join_token_named_in_cluster_yaml_is_what_every_node_joins_with_and_is_never_printed() {
    let env = Env::new("homelab-k3s");
    let token = "K10-driftless-e2e-join-token-7f3a9c";
    std::fs::write(env.secrets.path().join("k3s-token"), format!("{token}\n")).unwrap();
    let cluster = env.repo.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&cluster).unwrap().replace(
        "secrets:\n",
        "k3s:\n  token: {secret: k3s-token}\n\nsecrets:\n  k3s-token: \"The K3s join token\"\n",
    );
    std::fs::write(&cluster, text).unwrap();

    let r = env.apply();
    assert!(
        r.stdout.contains("Applied 13 of 13 steps."),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    // The server starts with the named token too, so its node-token carries it, and every
    // node (server included) holds it in token-file.
    let node_token = env.rootfs_file(100, "/var/lib/rancher/k3s/server/node-token").unwrap();
    assert!(
        node_token.trim().ends_with(&format!("::server:{token}")),
        "{node_token}"
    );
    for (name, vmid) in NODES {
        assert_eq!(
            env.rootfs_file(vmid, "/etc/rancher/k3s/cluster-token").as_deref(),
            Some(format!("{token}\n").as_str()),
            "{name}"
        );
        let config = env.rootfs_file(vmid, "/etc/rancher/k3s/config.yaml").unwrap();
        assert!(!config.contains(token), "{name}: the token is in config.yaml");
        assert!(env.node(name).kubelet_running, "{name}");
    }
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());

    // A different secret later is not a file to rewrite: K3s would refuse to start the server
    // with it. The plan stops before any step and says what to do instead.
    std::fs::write(env.secrets.path().join("k3s-token"), "K10-rotated-token-55e1\n").unwrap();
    let plan = env.run(&["plan"], &[]);
    assert_eq!(plan.code, 1, "{}\n{}", plan.stdout, plan.stderr);
    assert!(
        plan.stderr
            .contains("k3s.token: the secret `k3s-token` is not the token the cluster runs with"),
        "{}",
        plan.stderr
    );
    assert!(plan.stderr.contains("k3s token rotate"), "{}", plan.stderr);
    let refused = env.run(&["apply"], &["--auto-approve"]);
    assert_eq!(refused.code, 1, "{}", refused.stdout);
    assert!(env.node("k3s-master").kubelet_running, "the server was left running");
    let printed = env.printed.borrow();
    assert!(!printed.contains(token), "the join token was printed");
    assert!(
        !printed.contains("K10-rotated-token-55e1"),
        "the rotated token was printed"
    );
}
