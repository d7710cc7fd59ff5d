//! End to end, add-ons: the built binary applies the examples' core apps into the sandbox
//! through its Kubernetes API (discovery, server-side apply, simulated controllers). The K3s
//! homelab gets MetalLB, its address pool, cert-manager and Longhorn as HelmCharts, healthy;
//! a second apply does nothing; an add-on removed from git is left with prune off and pruned
//! with it on; an object edited behind driftless's back is drift. The Talos homelab, with the
//! sandbox enforcing the CNI (nodes NotReady until a CNI runs), gets Ready only through its
//! Cilium add-on, and without it the apply stops at the gate naming the nodes and the CNI.

use driftless::adapters::kube::KubeClient;
use driftless::ports::{ApiKind, KubeApi};
use serde_json::json;
use testkit::cluster_env::Env;

fn steps(plan: &serde_json::Value) -> Vec<String> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s["action"].as_str().unwrap(), s["node"].as_str().unwrap()))
        .collect()
}

/// The add-on steps of a plan (and the all-nodes gate).
fn addon_steps(plan: &serde_json::Value) -> Vec<String> {
    steps(plan)
        .into_iter()
        .filter(|s| s.starts_with("addon") || s.starts_with("nodes_ready"))
        .collect()
}

fn kind(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> ApiKind {
    ApiKind {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        namespaced,
    }
}

/// A client of the sandbox's API with its admin kubeconfig (not driftless's).
fn admin(env: &Env) -> KubeClient {
    let kubeconfig = std::fs::read(&env.sandbox().kube.kubeconfig_path).unwrap();
    let _guard = env.rt.enter();
    KubeClient::from_kubeconfig(&kubeconfig, None).unwrap()
}

fn get(env: &Env, k: &ApiKind, ns: Option<&str>, name: &str) -> Option<serde_json::Value> {
    let kube = admin(env);
    env.rt.block_on(kube.get_object(k, ns, name)).unwrap()
}

fn edit_cluster_yaml(env: &Env, f: impl FnOnce(String) -> String) {
    let path = env.repo.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, f(text)).unwrap();
}

#[test]
fn the_k3s_homelab_gets_its_core_apps_healthy_then_prunes_only_with_prune_on_and_reports_drift() {
    let env = Env::new("homelab-k3s");
    let plan = env.plan_json();
    assert_eq!(
        addon_steps(&plan),
        [
            "addon addons/cert-manager",
            "addon addons/longhorn",
            "addon addons/metallb",
            "addon addons/metallb-pool",
        ],
        "after the nodes, wave by wave"
    );
    assert!(steps(&plan)[..9].iter().all(|s| !s.starts_with("addon")), "{plan:#}");

    let r = env.apply();
    assert!(
        r.stdout.contains("Applied 13 of 13 steps."),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let charts = kind("helm.cattle.io", "v1", "HelmChart", "helmcharts", true);
    for chart in ["metallb", "cert-manager", "longhorn"] {
        let c = get(&env, &charts, Some("kube-system"), chart).unwrap_or_else(|| panic!("{chart} applied"));
        assert_eq!(c["metadata"]["labels"]["app.kubernetes.io/managed-by"], "driftless");
        assert_eq!(c["metadata"]["labels"]["driftless.dev/addon"], chart);
        // Installed: the helm controller's Job completed and the release is recorded.
        let job = c["status"]["jobName"].as_str().expect("an install Job");
        let jobs = kind("batch", "v1", "Job", "jobs", true);
        let job = get(&env, &jobs, Some("kube-system"), job).unwrap();
        assert!(job.to_string().contains("\"Complete\""), "{job:#}");
    }
    let pools = kind("metallb.io", "v1beta1", "IPAddressPool", "ipaddresspools", true);
    let pool = get(&env, &pools, Some("metallb-system"), "homelab").expect("the pool, once MetalLB's CRDs exist");
    assert_eq!(pool["spec"]["addresses"], json!(["192.168.2.240-192.168.2.250"]));
    let master = env.rootfs_file(100, "/etc/rancher/k3s/config.yaml").unwrap();
    assert!(master.contains("disable: [\"servicelb\"]"), "{master}");

    // Converged: nothing to plan, and a second apply does nothing.
    assert_eq!(steps(&env.plan_json()), Vec::<String>::new());
    let again = env.apply();
    assert!(again.stdout.contains("Nothing to apply."), "{}", again.stdout);

    // Longhorn leaves git. Prune off: it stays, and the plan says so.
    std::fs::remove_dir_all(env.repo.path().join("addons/longhorn")).unwrap();
    edit_cluster_yaml(&env, |t| t.replace("  longhorn: {wave: 1}\n", ""));
    let r = env.run(&["plan"], &[]);
    r.expect_code(0, "plan");
    assert!(
        r.stdout
            .contains("add-on `longhorn` left git; its 1 object(s) are left in the cluster (prune: false)"),
        "{}",
        r.stdout
    );
    env.apply();
    assert!(
        get(&env, &charts, Some("kube-system"), "longhorn").is_some(),
        "left alone"
    );

    // Prune on: what its inventory lists goes, nothing else.
    edit_cluster_yaml(&env, |t| t.replace("  prune: false", "  prune: true"));
    assert_eq!(steps(&env.plan_json()), ["addon_remove addons/longhorn"]);
    env.apply();
    assert!(get(&env, &charts, Some("kube-system"), "longhorn").is_none(), "pruned");
    assert!(get(&env, &charts, Some("kube-system"), "metallb").is_some());
    assert_eq!(steps(&env.plan_json()), Vec::<String>::new());

    // Behind driftless's back: the pool edited, the L2 advertisement deleted. Both are drift.
    let kube = admin(&env);
    env.rt.block_on(async {
        let client = {
            let kubeconfig = std::fs::read(&env.sandbox().kube.kubeconfig_path).unwrap();
            let cfg = kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::from_yaml(std::str::from_utf8(&kubeconfig).unwrap()).unwrap(),
                &Default::default(),
            )
            .await
            .unwrap();
            kube::Client::try_from(cfg).unwrap()
        };
        let ar = kube::api::ApiResource {
            group: "metallb.io".into(),
            version: "v1beta1".into(),
            api_version: "metallb.io/v1beta1".into(),
            kind: "IPAddressPool".into(),
            plural: "ipaddresspools".into(),
        };
        let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(client, "metallb-system", &ar);
        api.patch(
            "homelab",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"addresses": ["192.168.2.200-192.168.2.210"]}})),
        )
        .await
        .unwrap();
        let l2 = kind("metallb.io", "v1beta1", "L2Advertisement", "l2advertisements", true);
        assert!(
            kube.delete_object(&l2, Some("metallb-system"), "homelab")
                .await
                .unwrap()
        );
    });
    let drift = env.run(&["--output", "json", "drift"], &[]);
    let report = drift.json();
    assert_eq!(addon_steps(&report), ["addon addons/metallb-pool"], "{report:#}");
    let step = &report["steps"][0];
    assert_eq!(step["create"], json!(["L2Advertisement/metallb-system/homelab"]));
    let change = &step["change"][0];
    assert_eq!(change["object"], "IPAddressPool/metallb-system/homelab");
    assert!(
        change["changes"].to_string().contains("192.168.2.240-192.168.2.250"),
        "{change:#}"
    );
}

#[test]
fn the_talos_homelab_gets_ready_only_through_its_cilium_addon() {
    let env = Env::new("homelab-talos");
    env.sandbox().set_require_cni(true).unwrap();
    let plan = env.plan_json();
    assert_eq!(
        steps(&plan),
        [
            "create talos-cp-1",
            "talos_apply talos-cp-1",
            "talos_bootstrap talos-cp-1",
            "create talos-worker-1",
            "talos_apply talos-worker-1",
            "create talos-worker-2",
            "talos_apply talos-worker-2",
            "addon addons/cilium",
            "nodes_ready nodes",
        ]
    );
    assert!(
        plan["steps"][7]["declared"]
            .as_str()
            .unwrap()
            .starts_with("ADR-002 adr/ADR-002-kubernetes-approach-talos.md:"),
        "{:#}",
        plan["steps"][7]
    );
    let r = env.apply();
    assert!(r.stdout.contains("Applied 9 of 9 steps."), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("registered (no CNI yet), API ready"), "{}", r.stderr);
    assert!(r.stderr.contains("every node Ready"), "{}", r.stderr);
    let ds = kind("apps", "v1", "DaemonSet", "daemonsets", true);
    assert!(
        get(&env, &ds, Some("kube-system"), "cilium").is_some(),
        "what cilium install leaves"
    );
    env.run(&["health"], &[]).expect_code(0, "health");
    assert_eq!(steps(&env.plan_json()), Vec::<String>::new());
}

#[test]
fn without_its_cni_addon_the_talos_apply_stops_at_the_gate_naming_the_nodes_and_the_cni() {
    let env = Env::new("homelab-talos");
    env.sandbox().set_require_cni(true).unwrap();
    env.gate_timeout.set("6s");
    std::fs::remove_dir_all(env.repo.path().join("addons")).unwrap();
    let adr = env.repo.path().join("adr/ADR-002-kubernetes-approach-talos.md");
    let text = std::fs::read_to_string(&adr).unwrap();
    std::fs::write(&adr, text.replace("addons:\n  cilium: {wave: 0, cni: true}\n", "")).unwrap();

    let r = env.run(&["apply"], &["--auto-approve"]);
    r.expect_code(1, "apply without a CNI");
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(
        out.contains("health gate: talos-cp-1, talos-worker-1, talos-worker-2 not Ready within 6 s"),
        "{out}"
    );
    assert!(
        out.contains("the cluster's CNI (cilium, ADR-002 adr/ADR-002-kubernetes-approach-talos.md:")
            && out.contains("no declared add-on has `cni: true`"),
        "{out}"
    );
}
