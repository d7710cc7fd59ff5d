//! The command line as a user meets it: the examples validate, help teaches, unknown names
//! get a did-you-mean, `explain` cites the right file and line, ADR statuses and deviations
//! decide what applies, `render --out` writes files, JSON output parses, secrets stay out.

use std::path::Path;
use testkit::{example, run, run_repo, temp_copy, write};

const K3S: &str = "homelab-k3s";
const TALOS: &str = "homelab-talos";

/// The 1-based line of the first line of `rel` (in `repo`) that contains `needle`.
fn line_of(repo: &Path, rel: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(repo.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{rel} has no line containing `{needle}`"))
        + 1
}

fn render_one(repo: &Path, extra: &[&str], node: &str, artifact: &str) -> String {
    let mut args = extra.to_vec();
    args.extend(["render", node, "--artifact", artifact]);
    let r = run_repo(repo, &args);
    r.expect_code(0, &format!("render {node} {artifact}"));
    r.stdout
}

// ---------------------------------------------------------------- the examples

#[test]
fn both_examples_validate_with_a_summary_line() {
    let r = run_repo(&example(K3S), ["validate"]);
    r.expect_code(0, "validate homelab-k3s");
    assert_eq!(
        r.stdout.trim_end(),
        "valid: cluster `homelab` (k3s v1.31.4+k3s1), 3 nodes, 4 ADRs (4 applied)"
    );
    assert!(r.stderr.is_empty(), "stderr: {}", r.stderr);

    let r = run_repo(&example(TALOS), ["validate"]);
    r.expect_code(0, "validate homelab-talos");
    assert_eq!(
        r.stdout.trim_end(),
        "valid: cluster `talos-homelab` (talos v1.13.9), 3 nodes, 1 ADR (1 applied)"
    );
    assert!(r.stderr.is_empty(), "stderr: {}", r.stderr);
}

#[test]
fn help_teaches_with_examples() {
    let top = run(["--help"]);
    top.expect_code(0, "--help");
    assert!(top.stdout.contains("Examples:"), "{}", top.stdout);
    assert!(
        top.stdout.lines().any(|l| l
            .trim_start()
            .starts_with("driftless --repo examples/homelab-k3s validate")),
        "--help shows no example command:\n{}",
        top.stdout
    );
    for cmd in ["validate", "render", "explain"] {
        let h = run([cmd, "--help"]);
        h.expect_code(0, &format!("{cmd} --help"));
        assert!(
            h.stdout
                .lines()
                .any(|l| l.trim_start().starts_with("driftless ") && l.contains(&format!(" {cmd}"))),
            "`{cmd} --help` shows no example of `{cmd}`:\n{}",
            h.stdout
        );
    }
}

#[test]
fn an_unknown_node_gets_a_did_you_mean() {
    for args in [vec!["render", "k3s-mastr"], vec!["explain", "k3s-mastr"]] {
        let r = run_repo(&example(K3S), &args);
        r.expect_code(1, &args.join(" "));
        assert!(r.stdout.is_empty(), "{args:?}: stdout: {}", r.stdout);
        assert!(
            r.stderr.contains("no node named `k3s-mastr`") && r.stderr.contains("did you mean `k3s-master`?"),
            "{args:?}: {}",
            r.stderr
        );
    }
    // nothing close: the nodes are listed instead
    let r = run_repo(&example(K3S), ["explain", "zzz"]);
    r.expect_code(1, "explain zzz");
    assert!(r.stderr.contains("k3s-worker-1"), "{}", r.stderr);
}

#[test]
fn an_unknown_key_gets_a_did_you_mean() {
    let r = run_repo(&example(K3S), ["explain", "k3s-master", "lxc.features.nestin"]);
    r.expect_code(1, "explain an unknown key");
    assert!(
        r.stderr.contains("did you mean `lxc.features.nesting`?"),
        "{}",
        r.stderr
    );
}

// ---------------------------------------------------------------- explain

#[test]
fn explain_names_the_adr_line_that_set_a_value() {
    let repo = example(K3S);
    let adr = "adr/ADR-001-lxc-containers-for-k3s.md";
    let line = line_of(&repo, adr, "features: {nesting: true");
    let r = run_repo(&repo, ["explain", "k3s-master", "lxc.features.nesting"]);
    r.expect_code(0, "explain nesting");
    assert_eq!(
        r.stdout,
        format!("k3s-master: lxc.features.nesting = true\n  set by     {adr}:{line} (ADR-001) true\n")
    );

    // the same in JSON
    let r = run_repo(
        &repo,
        ["--output", "json", "explain", "k3s-master", "lxc.features.nesting"],
    );
    r.expect_code(0, "explain nesting --output json");
    let v = r.json();
    let chain = v["keys"]["lxc.features.nesting"]["chain"].as_array().expect("a chain");
    let last = chain.last().expect("a winner");
    assert_eq!(last["location"]["file"], adr);
    assert_eq!(last["location"]["line"], line);
    assert_eq!(last["source"]["name"], "ADR-001");
}

#[test]
fn explain_shows_the_node_file_over_the_adr_it_deviates_from() {
    let repo = temp_copy(K3S);
    write(
        repo.path(),
        "nodes/k3s-master.yaml",
        "vmid: 100\nproxmox_node: pve\nkind: lxc\nrole: server\naddress: 192.168.2.20/24\ncores: 4\n\
         deviations:\n  - adr: ADR-001\n    keys: [cores]\n    reason: the control plane also runs monitoring\n",
    );
    let r = run_repo(repo.path(), ["explain", "k3s-master", "cores"]);
    r.expect_code(0, "explain cores");
    let adr_line = line_of(repo.path(), "adr/ADR-001-lxc-containers-for-k3s.md", "cores: 2");
    assert_eq!(
        r.stdout,
        format!(
            "k3s-master: cores = 4\n\
             \x20 set by     nodes/k3s-master.yaml:6 (node file) 4\n\
             \x20 overrides  adr/ADR-001-lxc-containers-for-k3s.md:{adr_line} (ADR-001) 2\n\
             \x20 overrides  (built-in default) 1\n"
        )
    );
}

// ---------------------------------------------------------------- what applies

#[test]
fn a_recorded_deviation_lets_a_node_depart_from_an_adr() {
    let repo = temp_copy(K3S);
    write(
        repo.path(),
        "nodes/k3s-master.yaml",
        "vmid: 100\nproxmox_node: pve\nkind: lxc\nrole: server\naddress: 192.168.2.20/24\ncores: 4\n\
         deviations:\n  - adr: ADR-001\n    keys: [cores]\n    reason: the control plane also runs monitoring\n",
    );
    run_repo(repo.path(), ["validate"]).expect_code(0, "validate with a deviation");
    let conf = render_one(repo.path(), &[], "k3s-master", "proxmox-conf");
    assert!(conf.contains("\ncores: 4\n"), "{conf}");
    // the workers still follow the ADR
    let conf = render_one(repo.path(), &[], "k3s-worker-1", "proxmox-conf");
    assert!(conf.contains("\ncores: 2\n"), "{conf}");
}

/// A proposed ADR that labels the agents.
const PROPOSED_ADR: &str = "# ADR-005: Label the Storage Nodes\n\n**Status:** Proposed\n\n## Decision\n\n\
```yaml driftless\nscope: {role: agent}\nlabels:\n  storage: longhorn\n```\n";

#[test]
fn a_proposed_adr_is_not_applied() {
    let repo = temp_copy(K3S);
    write(repo.path(), "adr/ADR-005-storage-labels.md", PROPOSED_ADR);
    let r = run_repo(repo.path(), ["validate"]);
    r.expect_code(0, "validate with a proposed ADR");
    assert!(r.stdout.contains("5 ADRs (4 applied)"), "{}", r.stdout);
    let k3s = render_one(repo.path(), &[], "k3s-worker-1", "k3s-config");
    assert!(!k3s.contains("storage=longhorn"), "{k3s}");
    let r = run_repo(repo.path(), ["explain", "k3s-worker-1", "labels"]);
    r.expect_code(1, "explain a label nobody set");
}

#[test]
fn assume_accepted_applies_a_proposed_adr() {
    let repo = temp_copy(K3S);
    write(repo.path(), "adr/ADR-005-storage-labels.md", PROPOSED_ADR);
    let assume = ["--assume-accepted", "ADR-005"];
    let mut args = assume.to_vec();
    args.push("validate");
    let r = run_repo(repo.path(), &args);
    r.expect_code(0, "validate --assume-accepted");
    assert!(r.stdout.contains("5 ADRs (5 applied)"), "{}", r.stdout);
    let k3s = render_one(repo.path(), &assume, "k3s-worker-1", "k3s-config");
    assert!(k3s.contains("node-label:\n  - \"storage=longhorn\"\n"), "{k3s}");
    // servers are out of the ADR's scope
    let k3s = render_one(repo.path(), &assume, "k3s-master", "k3s-config");
    assert!(!k3s.contains("storage=longhorn"), "{k3s}");
    let mut args = assume.to_vec();
    args.extend(["explain", "k3s-worker-1", "labels.storage"]);
    let r = run_repo(repo.path(), &args);
    r.expect_code(0, "explain the assumed label");
    let line = line_of(repo.path(), "adr/ADR-005-storage-labels.md", "storage: longhorn");
    assert_eq!(
        r.stdout,
        format!(
            "k3s-worker-1: labels.storage = longhorn\n  set by     adr/ADR-005-storage-labels.md:{line} (ADR-005) longhorn\n"
        )
    );
    // other spellings of the id
    let r = run_repo(repo.path(), ["--assume-accepted", "5", "validate"]);
    r.expect_code(0, "--assume-accepted 5");
    assert!(r.stdout.contains("(5 applied)"), "{}", r.stdout);
    let r = run_repo(repo.path(), ["--assume-accepted", "five", "validate"]);
    r.expect_code(1, "--assume-accepted five");
    assert!(r.stderr.contains("`five` is not an ADR id"), "{}", r.stderr);
}

#[test]
fn a_superseded_adr_is_not_applied() {
    let repo = temp_copy(K3S);
    // ADR-005 would conflict with ADR-006 if it still applied.
    write(
        repo.path(),
        "adr/ADR-005-local-storage.md",
        "# ADR-005: Local Storage on the Agents\n\n**Status:** Superseded by [ADR-006](ADR-006-longhorn.md)\n\n\
         ```yaml driftless\nscope: {role: agent}\nlabels:\n  storage: local\n```\n",
    );
    write(
        repo.path(),
        "adr/ADR-006-longhorn.md",
        "# ADR-006: Longhorn on the Agents\n\n**Status:** Accepted\n**Supersedes:** [ADR-005](ADR-005-local-storage.md)\n\n\
         ```yaml driftless\nscope: {role: agent}\nlabels:\n  storage: longhorn\n```\n",
    );
    let r = run_repo(repo.path(), ["validate"]);
    r.expect_code(0, "validate with a superseded ADR");
    assert!(r.stdout.contains("6 ADRs (5 applied)"), "{}", r.stdout);
    let k3s = render_one(repo.path(), &[], "k3s-worker-2", "k3s-config");
    assert!(k3s.contains("\"storage=longhorn\""), "{k3s}");
    assert!(!k3s.contains("storage=local"), "{k3s}");
    let r = run_repo(repo.path(), ["--output", "json", "validate"]);
    let v = r.json();
    let adr5 = v["adrs"]
        .as_array()
        .expect("adrs")
        .iter()
        .find(|a| a["id"] == "ADR-005")
        .expect("ADR-005 is listed")
        .clone();
    assert_eq!(adr5["applies"], false);
    assert_eq!(adr5["status"], "Superseded by ADR-006");
}

// ---------------------------------------------------------------- render

#[test]
fn render_out_writes_one_directory_per_node() {
    let out = tempfile::tempdir().expect("temp dir");
    let r = run_repo(
        &example(K3S),
        ["render", "--out"]
            .iter()
            .copied()
            .chain([out.path().to_str().unwrap()]),
    );
    r.expect_code(0, "render --out");
    let files = testkit::list_files(out.path());
    let mut want = Vec::new();
    // The add-ons' objects beside the nodes' files.
    for addon in ["cert-manager", "longhorn", "metallb-pool", "metallb"] {
        want.push(format!("addons/{addon}/manifests.yaml"));
    }
    for node in ["k3s-master", "k3s-worker-1", "k3s-worker-2"] {
        for file in ["k3s-config.yaml", "proxmox-api.json", "proxmox.conf"] {
            want.push(format!("{node}/{file}"));
        }
    }
    assert_eq!(files, want);
    assert_eq!(
        r.stdout.lines().filter(|l| l.starts_with("wrote ")).count(),
        13,
        "{}",
        r.stdout
    );
    // what was written is what `render` prints
    let conf = render_one(&example(K3S), &[], "k3s-worker-2", "proxmox-conf");
    assert_eq!(
        std::fs::read_to_string(out.path().join("k3s-worker-2/proxmox.conf")).unwrap(),
        conf
    );

    // one node, one artifact
    let out = tempfile::tempdir().expect("temp dir");
    let r = run_repo(
        &example(TALOS),
        [
            "render",
            "talos-cp-1",
            "--artifact",
            "talos-config",
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    r.expect_code(0, "render one artifact --out");
    assert_eq!(testkit::list_files(out.path()), ["talos-cp-1/talos-machineconfig.yaml"]);
}

#[test]
fn a_multi_line_description_becomes_proxmox_comment_lines() {
    let repo = temp_copy(K3S);
    write(
        repo.path(),
        "nodes/k3s-worker-1.yaml",
        "vmid: 101\nproxmox_node: pve\nkind: lxc\nrole: agent\naddress: 192.168.2.21/24\n\
         description: \"K3s worker: storage\\n\\n100% managed by driftless\"\n",
    );
    let conf = render_one(repo.path(), &[], "k3s-worker-1", "proxmox-conf");
    assert!(
        conf.starts_with("#K3s worker%3A storage\n#\n#100%25 managed by driftless\narch: amd64\n"),
        "{conf}"
    );
    let api: serde_json::Value =
        serde_json::from_str(&render_one(repo.path(), &[], "k3s-worker-1", "proxmox-api")).expect("JSON");
    assert_eq!(api["description"], "K3s worker: storage\n\n100% managed by driftless");
}

#[test]
fn json_output_parses() {
    let out = tempfile::tempdir().expect("temp dir");
    let out_dir = out.path().to_str().unwrap();
    for (ex, args) in [
        (K3S, vec!["validate"]),
        (TALOS, vec!["validate"]),
        (K3S, vec!["render"]),
        (TALOS, vec!["render"]),
        (K3S, vec!["render", "k3s-master", "--artifact", "proxmox-api"]),
        (K3S, vec!["render", "--out", out_dir]),
        (K3S, vec!["explain", "k3s-master"]),
        (K3S, vec!["explain", "k3s-worker-1", "lxc.raw"]),
        (TALOS, vec!["explain", "talos-cp-1"]),
    ] {
        let mut full = vec!["--output", "json"];
        full.extend(&args);
        let r = run_repo(&example(ex), &full);
        r.expect_code(0, &format!("{ex}: {}", full.join(" ")));
        let v = r.json();
        match args[0] {
            "validate" => {
                assert_eq!(v["valid"], true);
                assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3));
            }
            "render" if args.contains(&"--out") => {
                // Nine node files, and the four add-ons' objects.
                assert_eq!(v.as_array().map(Vec::len), Some(13), "{v}");
            }
            "render" => {
                for a in v.as_array().expect("a list of artifacts") {
                    assert!(a["content"].as_str().is_some_and(|c| c.ends_with('\n')), "{a}");
                    assert!(a["node"].is_string() && a["kind"].is_string() && a["target"].is_string());
                }
            }
            _ => assert!(v["keys"].as_object().is_some_and(|k| !k.is_empty()), "{v}"),
        }
        // the proxmox-api artifact's content is itself JSON
        if args.contains(&"proxmox-api") {
            let content = v[0]["content"].as_str().expect("content");
            let params: serde_json::Value = serde_json::from_str(content).expect("API params are JSON");
            assert_eq!(params["vmid"], "100");
        }
    }
    // an invalid repository answers in JSON too, on stdout
    let repo = temp_copy(K3S);
    write(repo.path(), "nodes/k3s-worker-1.yaml", "vmid: 100\n");
    let r = run_repo(repo.path(), ["--output", "json", "validate"]);
    r.expect_code(1, "invalid --output json");
    let v = r.json();
    assert_eq!(v["valid"], false);
    assert!(!v["errors"].as_array().expect("errors").is_empty());
}

#[test]
fn secrets_never_show_up_only_placeholders() {
    // A K3s repository whose join token and host key are secrets, with sentinel descriptions.
    let k3s = temp_copy(K3S);
    let cluster = std::fs::read_to_string(k3s.path().join("cluster.yaml")).unwrap();
    let cluster = cluster
        .replace(
            "pve: {ssh: root@192.168.2.10, known_hosts: pve.known_hosts}",
            "pve: {ssh: root@192.168.2.10, known_hosts: pve.known_hosts, key: {secret: pve-ssh-key}}",
        )
        .replace(
            "secrets:\n",
            "k3s:\n  token: {secret: k3s-token}\n\nsecrets:\n  k3s-token: \"SENTINEL-K3S-TOKEN\"\n  pve-ssh-key: \"SENTINEL-SSH-KEY\"\n",
        );
    write(k3s.path(), "cluster.yaml", &cluster);
    run_repo(k3s.path(), ["validate"]).expect_code(0, "k3s with secrets");

    for (repo, declared) in [
        (k3s.path().to_path_buf(), vec!["pve-token", "k3s-token", "pve-ssh-key"]),
        (example(TALOS), vec!["pve-token", "talos-secrets"]),
    ] {
        let cluster = std::fs::read_to_string(repo.join("cluster.yaml")).unwrap();
        // What cluster.yaml says about each secret: must never be copied into an artifact.
        let descriptions: Vec<String> = cluster
            .lines()
            .skip_while(|l| !l.starts_with("secrets:"))
            .skip(1)
            .filter_map(|l| l.split_once(": ").map(|(_, v)| v.trim_matches('"').to_string()))
            .collect();
        assert!(!descriptions.is_empty());
        let mut outputs = Vec::new();
        for args in [
            vec!["render"],
            vec!["--output", "json", "render"],
            vec!["explain", "k3s-master"],
            vec!["--output", "json", "explain", "talos-cp-1"],
        ] {
            let r = run_repo(&repo, &args);
            if r.code == 0 {
                outputs.push(r.stdout);
            }
        }
        let all = outputs.join("\n");
        for d in &descriptions {
            assert!(
                !all.contains(d.as_str()),
                "{}: `{d}` shows up in the output",
                repo.display()
            );
        }
        assert!(!all.contains("SENTINEL"));
        // every placeholder names a declared secret
        let mut placeholders = 0;
        for piece in all.split("<secret:").skip(1) {
            let inner = piece.split('>').next().unwrap_or("");
            let name = inner.split('/').next().unwrap_or("");
            assert!(
                declared.contains(&name),
                "placeholder <secret:{inner}> names no declared secret"
            );
            placeholders += 1;
        }
        if repo.ends_with(TALOS) {
            assert!(placeholders > 0, "the Talos config carries its secrets as placeholders");
        }
    }

    // With a token secret, every K3s node reads the token from token-file; none carries it.
    for node in ["k3s-master", "k3s-worker-1"] {
        let cfg = render_one(k3s.path(), &[], node, "k3s-config");
        assert!(cfg.contains("token-file: /etc/rancher/k3s/cluster-token\n"), "{cfg}");
        assert!(!cfg.lines().any(|l| l.starts_with("token:")), "{cfg}");
    }
}

#[test]
fn a_repository_that_does_not_exist_is_an_error_not_a_panic() {
    let r = run(["--repo", "/nonexistent/driftless-repo", "validate"]);
    r.expect_code(1, "missing repo");
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
    assert!(r.stderr.contains("/nonexistent/driftless-repo"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn an_adr_whose_status_word_is_unknown_is_a_warning_at_its_line_and_is_not_applied() {
    let repo = temp_copy(K3S);
    let adr = "adr/ADR-004-readable-kubeconfig.md";
    let path = repo.path().join(adr);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("status: accepted", "status: ratified", 1)).unwrap();
    let line = line_of(repo.path(), adr, "status: ratified");

    let r = run_repo(repo.path(), ["validate"]);
    r.expect_code(0, "validate with an unknown ADR status");
    assert!(
        r.stderr.contains(&format!(
            "{adr}:{line}:1: warning: status `ratified` is not one driftless knows: this ADR's config is not applied"
        )),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("3 ADRs (3 applied)"), "{}", r.stdout);
    // Its config is not in what is rendered.
    let config = render_one(repo.path(), &[], "k3s-master", "k3s-config");
    assert!(!config.contains("write-kubeconfig-mode"), "{config}");
    let json = run_repo(repo.path(), ["--output", "json", "validate"]).json();
    assert_eq!(json["warnings"][0]["location"]["line"], line as u64, "{json:#}");
}
