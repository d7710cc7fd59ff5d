//! A small repository in memory for unit tests of the effectful layer: one K3s server and
//! two agents in LXC containers, no ADRs, nothing but what cluster.yaml and the node files
//! say.

use crate::model::{Desired, LoadOptions, RepoFiles, load};
use crate::render::{Artifact, render_all};

pub const CLUSTER: &str = "name: lab\ndistribution: k3s\nversion: v1.31.4+k3s1\n\
    proxmox: {api: \"https://127.0.0.1:8006\"}\n\
    network: {cidr: 10.0.0.0/24, gateway: 10.0.0.1}\n\
    defaults: {lxc: {template: \"local:vztmpl/ubuntu.tar.zst\", cores: 2}}\n";

/// The lab's files: `k3s-1` (vmid 100, server), `k3s-2` and `k3s-3` (agents).
pub fn files() -> RepoFiles {
    files_of(3)
}

/// A lab of `n` nodes: `k3s-1` (vmid 100, 10.0.0.11) the server, the others agents.
pub fn files_of(n: u32) -> RepoFiles {
    let mut files = RepoFiles::new("memory");
    files.insert("cluster.yaml", CLUSTER);
    for i in 1..=n {
        let role = if i == 1 { "server" } else { "agent" };
        files.insert(
            format!("nodes/k3s-{i}.yaml"),
            format!(
                "vmid: {}\nproxmox_node: pve\nkind: lxc\nrole: {role}\naddress: 10.0.0.{}/24\n",
                99 + i,
                10 + i
            ),
        );
    }
    files
}

pub fn load_files(files: &RepoFiles) -> (Desired, Vec<Artifact>) {
    let desired = load(files, &LoadOptions::default()).expect("the test repository is valid");
    let artifacts = render_all(&desired).expect("the test repository renders");
    (desired, artifacts)
}

pub fn lab() -> (Desired, Vec<Artifact>) {
    load_files(&files())
}

/// examples/homelab-talos with cluster.yaml's `version` and `kubernetes_version` set.
pub fn talos_example_at(version: &str, kubernetes: &str) -> RepoFiles {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/homelab-talos");
    let mut files = crate::source::read_dir(&dir).unwrap();
    let text = String::from_utf8(files.files["cluster.yaml"].clone()).unwrap();
    let text = text
        .replace("version: v1.13.9", &format!("version: {version}"))
        .replace(
            "kubernetes_version: v1.34.1",
            &format!("kubernetes_version: {kubernetes}"),
        );
    files.insert("cluster.yaml".to_string(), text);
    files
}
