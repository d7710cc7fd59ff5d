//! The Talos machine configurations driftless renders, checked against Talos's own JSON schemas
//! (`driftless_sandbox::talos_schema`, copied from siderolabs/talos) for the Talos version each
//! one targets.
//!
//! Both schemas are Draft 2020-12 documents whose root is a `oneOf` of `$ref`s into `$defs`,
//! one definition per document kind. Every rendered document is validated against the
//! definition of its own kind (precise errors) and against the root (the `oneOf` Talos's
//! tooling uses), with format checking on.

use driftless::model::{LoadOptions, RepoFiles};
use driftless::render::ArtifactKind;
use driftless_sandbox::talos_schema::{Schema, kind_of, main_branch, v1_13};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

// ------------------------------------------------------------------------------- schemas

fn fixture(name: &str) -> String {
    let path = testkit::root().join("tests/fixtures/talos").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Validates every document of a rendered file; panics with all errors and the file.
fn assert_valid(schema: &Schema, what: &str, text: &str) -> Vec<Value> {
    let docs = documents(text);
    let errors: Vec<String> = docs.iter().flat_map(|d| schema.errors(d)).collect();
    assert!(
        errors.is_empty(),
        "{what} does not match the Talos {} schema:\n  {}\n--- rendered:\n{text}",
        schema.name,
        errors.join("\n  ")
    );
    docs
}

/// Every YAML document of a file as JSON. Through yaml_serde's own Value first, so duplicate
/// keys and non-string keys are errors rather than silently merged.
fn documents(text: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, de)| {
            let yaml = yaml_serde::Value::deserialize(de)
                .unwrap_or_else(|e| panic!("document {i} is not valid YAML: {e}\n{text}"));
            serde_json::to_value(yaml).unwrap_or_else(|e| panic!("document {i} is not JSON-like: {e}\n{text}"))
        })
        .collect()
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter().map(kind_of).collect()
}

fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut found = docs.iter().filter(|d| kind_of(d) == kind);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} document among {:?}", kinds(docs)));
    assert!(found.next().is_none(), "more than one {kind} document");
    first
}

// ------------------------------------------------------------------------------- rendering

fn example() -> RepoFiles {
    driftless::source::read_dir(&testkit::example("homelab-talos")).expect("examples/homelab-talos reads")
}

/// Rewrites one file of the in-memory repository; the edit must change something.
fn edit(files: &mut RepoFiles, path: &str, change: impl FnOnce(&str) -> String) {
    let before = String::from_utf8(
        files
            .files
            .get(path)
            .unwrap_or_else(|| panic!("no {path} in the example"))
            .clone(),
    )
    .expect("UTF-8");
    let after = change(&before);
    assert_ne!(before, after, "editing {path} changed nothing");
    files.files.insert(path.to_string(), after.into_bytes());
}

/// Replaces the line starting with `prefix` (which must exist) by `line`.
fn set_line(files: &mut RepoFiles, path: &str, prefix: &str, line: &str) {
    let text = String::from_utf8(files.files[path].clone()).expect("UTF-8");
    assert!(
        text.lines().any(|l| l.starts_with(prefix)),
        "no line `{prefix}...` in {path}"
    );
    let mut out: Vec<&str> = text
        .lines()
        .map(|l| if l.starts_with(prefix) { line } else { l })
        .collect();
    out.push("");
    files.files.insert(path.to_string(), out.join("\n").into_bytes());
}

fn with_version(version: &str) -> RepoFiles {
    let mut files = example();
    set_line(&mut files, "cluster.yaml", "version:", &format!("version: {version}"));
    files
}

fn with_cni(mut files: RepoFiles, cni: &str) -> RepoFiles {
    edit(&mut files, "adr/ADR-002-kubernetes-approach-talos.md", |t| {
        t.replace("cni: cilium", &format!("cni: {cni}"))
    });
    files
}

/// Labels, taints (one replacing the control plane's default taint), an install image, a search domain.
fn with_extras(mut files: RepoFiles) -> RepoFiles {
    let extras = "labels:\n  topology.kubernetes.io/zone: rack-1\n  node.kubernetes.io/exclude-from-external-load-balancers: \"true\"\n\
                  taints:\n  - dedicated=storage:NoSchedule\n  - example.com/maintenance:NoExecute\n";
    edit(&mut files, "nodes/talos-worker-1.yaml", |t| {
        format!(
            "{t}{extras}talos:\n  install_image: factory.talos.dev/installer/376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba:v1.13.9\n"
        )
    });
    edit(&mut files, "nodes/talos-cp-1.yaml", |t| {
        format!("{t}{extras}  - node-role.kubernetes.io/control-plane:PreferNoSchedule\n")
    });
    edit(&mut files, "cluster.yaml", |t| {
        t.replace(
            "  dns: [10.0.0.1]\n",
            "  dns: [10.0.0.1, 10.0.0.2]\n  search_domain: home.arpa\n",
        )
    });
    files
}

/// node name -> rendered Talos machine configuration.
fn render(files: &RepoFiles) -> BTreeMap<String, String> {
    let desired = driftless::model::load(files, &LoadOptions::default())
        .unwrap_or_else(|d| panic!("the example does not load:\n{d}"));
    let artifacts =
        driftless::render::render_all(&desired).unwrap_or_else(|d| panic!("the example does not render:\n{d}"));
    let talos: BTreeMap<String, String> = artifacts
        .into_iter()
        .filter(|a| a.kind == ArtifactKind::TalosConfig)
        .map(|a| (a.node, a.content))
        .collect();
    assert_eq!(
        talos.keys().map(String::as_str).collect::<Vec<_>>(),
        ["talos-cp-1", "talos-worker-1", "talos-worker-2"]
    );
    talos
}

/// Every variant of the example, with the schema of the Talos version it targets.
fn variants() -> Vec<(String, RepoFiles, &'static Schema)> {
    let mut out = Vec::new();
    for (version, schema) in [("v1.13.9", v1_13()), ("v1.14.0", main_branch())] {
        out.push((format!("{version} cilium"), with_version(version), schema));
        out.push((
            format!("{version} flannel"),
            with_cni(with_version(version), "flannel"),
            schema,
        ));
        out.push((
            format!("{version} none + extras"),
            with_extras(with_cni(with_version(version), "none")),
            schema,
        ));
    }
    out
}

const V1_13_NETWORK: [&str; 4] = ["HostnameConfig", "LinkAliasConfig", "LinkConfig", "ResolverConfig"];

// ------------------------------------------------------------------------------- tests

#[test]
fn the_example_matches_the_v1_13_schema() {
    for (node, text) in render(&example()) {
        let docs = assert_valid(v1_13(), &node, &text);
        let mut expected = vec!["v1alpha1"];
        expected.extend(V1_13_NETWORK);
        assert_eq!(kinds(&docs), expected, "{node}");
    }
}

#[test]
fn the_example_at_v1_14_matches_the_main_branch_schema() {
    for (node, text) in render(&with_version("v1.14.2")) {
        let docs = assert_valid(main_branch(), &node, &text);
        let kinds: BTreeSet<String> = kinds(&docs).into_iter().collect();
        for kind in [
            "v1alpha1",
            "HostnameConfig",
            "LinkConfig",
            "ResolverConfig",
            "UnattendedInstall",
            "KubeClusterConfig",
            "KubeNodeConfig",
            "KubeletConfig",
            "KubeNetworkConfig",
            "KubeAPIServerCAConfig",
            "DiscoveryIdentityConfig",
        ] {
            assert!(kinds.contains(kind), "{node}: no {kind} document");
        }
        // The multi-document format moved these out of the v1alpha1 document.
        let v1alpha1 = doc(&docs, "v1alpha1");
        for gone in [
            "/machine/kubelet",
            "/machine/install",
            "/machine/nodeLabels",
            "/cluster/controlPlane",
            "/cluster/network",
        ] {
            assert!(
                v1alpha1.pointer(gone).is_none(),
                "{node}: {gone} is still in the v1alpha1 document"
            );
        }
    }
}

#[test]
fn every_variant_matches_its_versions_schema() {
    for (name, files, schema) in variants() {
        for (node, text) in render(&files) {
            assert_valid(schema, &format!("{name}: {node}"), &text);
        }
    }
}

#[test]
fn real_talosctl_output_matches_the_schemas() {
    // The positive control: the schemas and the per-kind lookup accept what talosctl itself
    // generates, less `persist`, a deprecated field the schemas no longer list.
    for (file, schema) in [
        ("talos-example-v1.13-controlplane.yaml", v1_13()),
        ("talos-example-v1.13-worker.yaml", v1_13()),
        ("talos-example-v1.14-controlplane.yaml", main_branch()),
        ("talos-example-v1.14-worker.yaml", main_branch()),
    ] {
        let mut docs = documents(&fixture(file));
        assert_eq!(docs[0]["persist"], true);
        docs[0].as_object_mut().unwrap().remove("persist");
        let errors: Vec<String> = docs.iter().flat_map(|d| schema.errors(d)).collect();
        assert!(errors.is_empty(), "{file}:\n  {}", errors.join("\n  "));
    }
}

#[test]
fn the_validator_catches_mistakes() {
    let v13 = render(&example());
    let v14 = render(&with_version("v1.14.0"));
    let cp13 = documents(&v13["talos-cp-1"]);
    let cp14 = documents(&v14["talos-cp-1"]);
    assert!(cp13.iter().all(|d| v1_13().errors(d).is_empty()));
    assert!(cp14.iter().all(|d| main_branch().errors(d).is_empty()));

    let broken = |docs: &[Value], kind: &str, pointer: &str, change: &dyn Fn(&mut Value)| {
        let mut d = doc(docs, kind).clone();
        change(
            d.pointer_mut(pointer)
                .unwrap_or_else(|| panic!("no {pointer} in {kind}")),
        );
        d
    };
    let add_key = |key: &'static str| {
        move |v: &mut Value| {
            v.as_object_mut()
                .expect("an object")
                .insert(key.into(), Value::from("surprise"));
        }
    };
    let set = |value: Value| move |v: &mut Value| *v = value.clone();
    let mistakes: Vec<(&str, &Schema, Value)> = vec![
        (
            "unknown key in machine",
            v1_13(),
            broken(&cp13, "v1alpha1", "/machine", &add_key("kubeletImage")),
        ),
        (
            "unknown top-level key",
            v1_13(),
            broken(&cp13, "v1alpha1", "", &add_key("persist")),
        ),
        (
            "unknown key in a LinkConfig",
            v1_13(),
            broken(&cp13, "LinkConfig", "", &add_key("gateway")),
        ),
        (
            "address without prefix",
            v1_13(),
            broken(&cp13, "LinkConfig", "/addresses/0/address", &set("10.0.0.10".into())),
        ),
        (
            "unknown machine type",
            v1_13(),
            broken(&cp13, "v1alpha1", "/machine/type", &set("master".into())),
        ),
        (
            "endpoint not https",
            v1_13(),
            broken(
                &cp13,
                "v1alpha1",
                "/cluster/controlPlane/endpoint",
                &set("10.0.0.10:6443".into()),
            ),
        ),
        (
            "unknown CNI",
            v1_13(),
            broken(&cp13, "v1alpha1", "/cluster/network/cni/name", &set("cilium".into())),
        ),
        (
            "unknown key in KubeletConfig",
            main_branch(),
            broken(&cp14, "KubeletConfig", "", &add_key("disableManifestsDirectory")),
        ),
        ("KubeletConfig without image", main_branch(), {
            let mut d = doc(&cp14, "KubeletConfig").clone();
            d.as_object_mut().unwrap().remove("image");
            d
        }),
        (
            "unknown kind",
            main_branch(),
            broken(&cp14, "KubeNodeConfig", "/kind", &set("KubeNodeConfigs".into())),
        ),
        // The other version's format: v1.13's v1alpha1 document is not a v1.14 one, and back.
        (
            "v1.13 v1alpha1 document at v1.14",
            main_branch(),
            doc(&cp13, "v1alpha1").clone(),
        ),
        (
            "v1.14 KubeletConfig at v1.13",
            v1_13(),
            doc(&cp14, "KubeletConfig").clone(),
        ),
    ];
    for (what, schema, d) in mistakes {
        assert!(!schema.errors(&d).is_empty(), "the validator accepted {what}:\n{d:#}");
    }
}

#[test]
fn control_plane_and_workers_carry_what_they_should() {
    for version in ["v1.13.9", "v1.14.0"] {
        let multidoc = version != "v1.13.9";
        let rendered = render(&with_version(version));
        for (node, text) in &rendered {
            let docs = documents(text);
            let cp = node == "talos-cp-1";
            let v1alpha1 = doc(&docs, "v1alpha1");
            let ctx = format!("{version} {node}");
            assert_eq!(
                v1alpha1["machine"]["type"],
                if cp { "controlplane" } else { "worker" },
                "{ctx}"
            );

            // The control-plane endpoint and cluster name, on every node.
            let (endpoint, cluster_name) = if multidoc {
                let kc = doc(&docs, "KubeClusterConfig");
                (&kc["endpoint"], &kc["clusterName"])
            } else {
                (
                    &v1alpha1["cluster"]["controlPlane"]["endpoint"],
                    &v1alpha1["cluster"]["clusterName"],
                )
            };
            assert_eq!(endpoint, "https://10.0.0.10:6443", "{ctx}");
            assert_eq!(cluster_name, "talos-homelab", "{ctx}");

            // Static networking.
            assert_eq!(doc(&docs, "HostnameConfig")["hostname"], node.as_str(), "{ctx}");
            let link = doc(&docs, "LinkConfig");
            assert_eq!(
                link["name"],
                doc(&docs, "LinkAliasConfig")["name"],
                "{ctx}: the link is configured through its alias"
            );
            let address = link["addresses"][0]["address"].as_str().unwrap();
            assert!(
                address.ends_with("/24") && address.starts_with("10.0.0."),
                "{ctx}: {address}"
            );
            assert_eq!(link["routes"][0]["gateway"], "10.0.0.1", "{ctx}");
            assert!(
                link["routes"][0].get("destination").is_none(),
                "{ctx}: the default route has no destination"
            );
            assert_eq!(
                doc(&docs, "ResolverConfig")["nameservers"],
                serde_json::json!([{"address": "10.0.0.1"}]),
                "{ctx}"
            );

            // Kubelet, installer, cluster network.
            let (kubelet, install_image, install_disk, network) = if multidoc {
                let ui = doc(&docs, "UnattendedInstall");
                (
                    doc(&docs, "KubeletConfig")["image"].clone(),
                    ui["installer"]["image"].clone(),
                    ui["provisioning"]["diskSelector"]["match"].clone(),
                    doc(&docs, "KubeNetworkConfig").clone(),
                )
            } else {
                let m = &v1alpha1["machine"];
                (
                    m["kubelet"]["image"].clone(),
                    m["install"]["image"].clone(),
                    m["install"]["disk"].clone(),
                    v1alpha1["cluster"]["network"].clone(),
                )
            };
            assert_eq!(kubelet, "ghcr.io/siderolabs/kubelet:v1.34.1", "{ctx}");
            assert_eq!(
                install_image,
                format!("ghcr.io/siderolabs/installer:{version}").as_str(),
                "{ctx}"
            );
            assert_eq!(
                install_disk,
                if multidoc {
                    "disk.dev_path == \"/dev/sda\""
                } else {
                    "/dev/sda"
                },
                "{ctx}"
            );
            assert_eq!(network["podSubnets"], serde_json::json!(["10.244.0.0/16"]), "{ctx}");
            assert_eq!(network["serviceSubnets"], serde_json::json!(["10.96.0.0/12"]), "{ctx}");

            // Control-plane component images at the cluster's Kubernetes version.
            if cp {
                let images: Vec<Value> = if multidoc {
                    [
                        "KubeAPIServerConfig",
                        "KubeControllerManagerConfig",
                        "KubeSchedulerConfig",
                        "KubeProxyConfig",
                    ]
                    .iter()
                    .map(|k| doc(&docs, k)["image"].clone())
                    .collect()
                } else {
                    ["apiServer", "controllerManager", "scheduler", "proxy"]
                        .iter()
                        .map(|k| v1alpha1["cluster"][k]["image"].clone())
                        .collect()
                };
                for image in images {
                    let image = image
                        .as_str()
                        .unwrap_or_else(|| panic!("{ctx}: a component without image"));
                    assert!(
                        image.starts_with("registry.k8s.io/kube-") && image.ends_with(":v1.34.1"),
                        "{ctx}: {image}"
                    );
                }
            }

            // Workers: no CA private keys, no control-plane-only secrets or documents.
            if !cp {
                assert_eq!(v1alpha1["machine"]["ca"]["key"], "", "{ctx}: machine.ca.key");
                for field in [
                    "certs.os.key",
                    "certs.k8s.key",
                    "certs.k8saggregator",
                    "certs.k8sserviceaccount",
                    "certs.etcd",
                    "secretboxencryptionsecret",
                ] {
                    assert!(!text.contains(field), "{ctx}: a worker carries {field}");
                }
                if multidoc {
                    let ca = doc(&docs, "KubeAPIServerCAConfig");
                    assert!(ca.get("issuingCA").is_none(), "{ctx}: a worker carries the issuing CA");
                    assert_eq!(
                        ca["acceptedCAs"],
                        serde_json::json!(["<secret:talos-secrets/certs.k8s.crt>"]),
                        "{ctx}"
                    );
                    for kind in [
                        "KubeAggregatorCAConfig",
                        "KubeServiceAccountConfig",
                        "KubeEtcdEncryptionConfig",
                        "KubeAPIServerConfig",
                    ] {
                        assert!(
                            !kinds(&docs).iter().any(|k| k == kind),
                            "{ctx}: a worker carries {kind}"
                        );
                    }
                } else {
                    assert_eq!(v1alpha1["cluster"]["ca"]["key"], "", "{ctx}: cluster.ca.key");
                    assert!(v1alpha1["cluster"].get("etcd").is_none(), "{ctx}");
                }
            } else {
                assert_eq!(
                    v1alpha1["machine"]["ca"]["key"], "<secret:talos-secrets/certs.os.key>",
                    "{ctx}"
                );
            }
        }
    }
}

#[test]
fn cilium_and_none_disable_the_talos_cni() {
    for version in ["v1.13.9", "v1.14.0"] {
        let multidoc = version != "v1.13.9";
        for cni in ["cilium", "none", "flannel"] {
            let files = if cni == "cilium" {
                with_version(version)
            } else {
                with_cni(with_version(version), cni)
            };
            for (node, text) in render(&files) {
                let docs = documents(&text);
                let ctx = format!("{version} {cni} {node}");
                let cp = node == "talos-cp-1";
                if multidoc {
                    // v1.14+: Flannel is deployed when (and only when) KubeFlannelCNIConfig is present.
                    let has_flannel = kinds(&docs).iter().any(|k| k == "KubeFlannelCNIConfig");
                    assert_eq!(has_flannel, cni == "flannel" && cp, "{ctx}: KubeFlannelCNIConfig");
                    if cp {
                        let proxy_enabled = doc(&docs, "KubeProxyConfig")
                            .get("enabled")
                            .cloned()
                            .unwrap_or(Value::Bool(true));
                        assert_eq!(proxy_enabled, cni != "cilium", "{ctx}: kube-proxy");
                    }
                } else {
                    let cluster = &doc(&docs, "v1alpha1")["cluster"];
                    let name = cluster["network"]["cni"]["name"].as_str().unwrap_or("flannel");
                    assert_eq!(
                        name,
                        if cni == "flannel" { "flannel" } else { "none" },
                        "{ctx}: cluster.network.cni.name"
                    );
                    if cp {
                        assert_eq!(
                            cluster["proxy"]["disabled"].as_bool().unwrap_or(false),
                            cni == "cilium",
                            "{ctx}: cluster.proxy.disabled"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn labels_taints_image_and_search_domain_reach_the_config() {
    for version in ["v1.13.9", "v1.14.0"] {
        let multidoc = version != "v1.13.9";
        let rendered = render(&with_extras(with_version(version)));
        for node in ["talos-cp-1", "talos-worker-1"] {
            let docs = documents(&rendered[node]);
            let ctx = format!("{version} {node}");
            let cp = node == "talos-cp-1";
            let (labels, taints) = if multidoc {
                let kn = doc(&docs, "KubeNodeConfig");
                (kn["labels"].clone(), kn["taints"].clone())
            } else {
                let m = &doc(&docs, "v1alpha1")["machine"];
                (
                    m["nodeLabels"].clone(),
                    m.get("nodeTaints").cloned().unwrap_or(Value::Null),
                )
            };
            assert_eq!(labels["topology.kubernetes.io/zone"], "rack-1", "{ctx}");
            // The node's own value wins over the control plane's default label.
            assert_eq!(
                labels["node.kubernetes.io/exclude-from-external-load-balancers"], "true",
                "{ctx}"
            );
            assert_eq!(taints["dedicated"], "storage:NoSchedule", "{ctx}");
            assert_eq!(taints["example.com/maintenance"], "NoExecute", "{ctx}");
            if cp {
                // The node's own control-plane taint replaces the default one.
                assert_eq!(
                    taints["node-role.kubernetes.io/control-plane"], "PreferNoSchedule",
                    "{ctx}"
                );
            }
            if multidoc && cp {
                assert_eq!(labels["node-role.kubernetes.io/control-plane"], "", "{ctx}");
            }
            let resolver = doc(&docs, "ResolverConfig");
            assert_eq!(
                resolver["searchDomains"]["domains"],
                serde_json::json!(["home.arpa"]),
                "{ctx}"
            );
            assert_eq!(
                resolver["nameservers"],
                serde_json::json!([{"address": "10.0.0.1"}, {"address": "10.0.0.2"}]),
                "{ctx}"
            );
            let image = if multidoc {
                doc(&docs, "UnattendedInstall")["installer"]["image"].clone()
            } else {
                doc(&docs, "v1alpha1")["machine"]["install"]["image"].clone()
            };
            let expected = if cp {
                format!("ghcr.io/siderolabs/installer:{version}")
            } else {
                // The factory image keeps its schematic; its tag follows `version`.
                format!(
                    "factory.talos.dev/installer/376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba:{version}"
                )
            };
            assert_eq!(image, expected.as_str(), "{ctx}");
        }
        // Without labels or taints a worker has no label or taint keys at all.
        let docs = documents(&rendered["talos-worker-2"]);
        if multidoc {
            assert!(
                doc(&docs, "KubeNodeConfig").get("labels").is_none()
                    && doc(&docs, "KubeNodeConfig").get("taints").is_none()
            );
        } else {
            assert!(
                doc(&docs, "v1alpha1")["machine"].get("nodeLabels").is_none()
                    && doc(&docs, "v1alpha1")["machine"].get("nodeTaints").is_none()
            );
        }
    }
}

/// Keys whose values come from the Talos secrets bundle, in v1alpha1 and in the newer documents.
const SECRET_KEYS: [&str; 12] = [
    "token",
    "crt",
    "key",
    "id",
    "secret",
    "secretboxEncryptionSecret",
    "aescbcEncryptionSecret",
    "clusterID",
    "clusterSecret",
    "cert",
    "privateKey",
    "acceptedCAs",
];

/// `(document kind, JSON pointer) -> value` for every non-empty value under a secret key.
fn secret_values(docs: &[Value]) -> BTreeMap<(String, String), String> {
    fn walk(v: &Value, pointer: String, secret: bool, out: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    walk(
                        child,
                        format!("{pointer}/{k}"),
                        secret || SECRET_KEYS.contains(&k.as_str()),
                        out,
                    );
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, format!("{pointer}/{i}"), secret, out);
                }
            }
            Value::String(s) if secret && !s.is_empty() => {
                out.insert(pointer, s.clone());
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    for d in docs {
        let mut values = BTreeMap::new();
        walk(d, String::new(), false, &mut values);
        out.extend(values.into_iter().map(|(p, s)| ((kind_of(d), p), s)));
    }
    out
}

const BUNDLE_FIELDS: [&str; 14] = [
    "trustdinfo.token",
    "cluster.id",
    "cluster.secret",
    "secrets.bootstraptoken",
    "secrets.secretboxencryptionsecret",
    "certs.os.crt",
    "certs.os.key",
    "certs.k8s.crt",
    "certs.k8s.key",
    "certs.k8saggregator.crt",
    "certs.k8saggregator.key",
    "certs.k8sserviceaccount.key",
    "certs.etcd.crt",
    "certs.etcd.key",
];

#[test]
fn secrets_are_placeholders_only() {
    let cluster_yaml = String::from_utf8(example().files["cluster.yaml"].clone()).unwrap();
    let declared_secret_texts = [
        "The Talos secrets bundle (talosctl gen secrets)",
        "PVEAPIToken=USER@REALM!TOKENID=SECRET",
    ];
    for t in declared_secret_texts {
        assert!(cluster_yaml.contains(t), "the example no longer declares {t:?}");
    }
    let placeholder = regex::Regex::new(r"<secret:([^>]*)>").unwrap();
    for (version, role_examples) in [
        (
            "v1.13.9",
            [
                ("talos-cp-1", "talos-example-v1.13-controlplane.yaml"),
                ("talos-worker-1", "talos-example-v1.13-worker.yaml"),
            ],
        ),
        (
            "v1.14.0",
            [
                ("talos-cp-1", "talos-example-v1.14-controlplane.yaml"),
                ("talos-worker-1", "talos-example-v1.14-worker.yaml"),
            ],
        ),
    ] {
        let rendered = render(&with_version(version));
        let mut used = BTreeSet::new();
        for (node, text) in &rendered {
            let ctx = format!("{version} {node}");
            for t in declared_secret_texts {
                assert!(!text.contains(t), "{ctx}: carries the text of a declared secret");
            }
            // Every placeholder names the declared bundle and one of its fields.
            for m in placeholder.captures_iter(text) {
                let (name, field) = m[1]
                    .split_once('/')
                    .unwrap_or_else(|| panic!("{ctx}: placeholder {} has no field", &m[0]));
                assert_eq!(name, "talos-secrets", "{ctx}: {}", &m[0]);
                assert!(
                    BUNDLE_FIELDS.contains(&field),
                    "{ctx}: {} is not a `talosctl gen secrets` field",
                    &m[0]
                );
                used.insert(field.to_string());
            }
            // Every value under a secret key is exactly one placeholder.
            for ((kind, pointer), value) in secret_values(&documents(text)) {
                assert!(
                    placeholder.find(&value).is_some_and(|m| m.as_str() == value),
                    "{ctx}: {kind} {pointer} is not a placeholder: {value:?}"
                );
            }
        }
        assert_eq!(
            used.iter().map(String::as_str).collect::<BTreeSet<_>>(),
            BUNDLE_FIELDS.into_iter().collect(),
            "{version}: not every bundle field is used"
        );

        // talosctl's own output for the same version and role: none of its (public test) secrets
        // appear, and every place it puts a secret, driftless puts a placeholder.
        for (node, example_file) in role_examples {
            let example_secrets = secret_values(&documents(&fixture(example_file)));
            assert!(
                example_secrets.len() >= 5,
                "{example_file}: found only {example_secrets:?}"
            );
            let text = &rendered[node];
            let ours = secret_values(&documents(text));
            for ((kind, pointer), value) in &example_secrets {
                let short = &value[..value.len().min(40)];
                for (other, other_text) in &rendered {
                    assert!(
                        !other_text.contains(short),
                        "{version} {other}: carries a secret of {example_file} ({kind} {pointer})"
                    );
                }
                let mine = ours.get(&(kind.clone(), pointer.clone()));
                assert!(
                    mine.is_some(),
                    "{version} {node}: {example_file} has a secret at {kind} {pointer}, driftless has nothing there"
                );
            }
        }
    }
}

#[test]
fn rendering_is_deterministic() {
    for files in [example(), with_version("v1.14.0")] {
        assert_eq!(render(&files), render(&files));
    }
}
