//! A generated homelab of any size: the seed's cluster and ADRs, N LXC nodes in 10.0.0.0/16.

use driftless::model::RepoFiles;

pub fn generate(nodes: usize) -> RepoFiles {
    let root = crate::example("homelab-k3s");
    let mut files = driftless::source::read_dir(&root).expect("example repository");
    let cluster = String::from_utf8(files.files["cluster.yaml"].clone()).unwrap();
    let cluster = cluster
        .replace("cidr: 192.168.2.0/24", "cidr: 10.0.0.0/16")
        .replace("gateway: 192.168.2.1", "gateway: 10.0.0.1");
    files.insert("cluster.yaml", cluster);
    files.files.retain(|p, _| !p.starts_with("nodes/"));
    for i in 0..nodes {
        let role = if i < 3 { "server" } else { "agent" };
        let name = format!("node-{i:04}");
        let body = format!(
            "vmid: {}\nproxmox_node: pve\nkind: lxc\nrole: {role}\naddress: 10.0.{}.{}/16\nlabels:\n  homelab/rack: r{}\n",
            1000 + i,
            (i + 2) / 250,
            (i + 2) % 250 + 2,
            i % 8
        );
        files.insert(format!("nodes/{name}.yaml"), body);
    }
    files
}
