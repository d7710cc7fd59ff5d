//! A pull request is untrusted input: anyone who can open one controls its files. Its plan
//! computes the pull request's desired state (nodes, ADRs, values, templates), but every
//! setting that decides where a credential goes, what runs where, or when, comes from the
//! watched branch's last valid revision. Pure: a function of two desired states.

use crate::model::Desired;

/// The state to plan a pull request with: `pr` with the trusted settings of `trusted` in
/// place of its own, and the names of the trusted settings the pull request changes (they
/// apply after merge, and are not used for this plan).
pub fn pull_request_state(mut pr: Desired, trusted: &Desired) -> (Desired, Vec<String>) {
    let mut ignored = Vec::new();
    let (p, t) = (&mut pr.cluster, &trusted.cluster);
    // Where the Proxmox token, the host shell's key and the known_hosts go.
    replace(
        &mut p.proxmox,
        &t.proxmox,
        "proxmox (API, certificate, token, hosts)",
        &mut ignored,
    );
    // A host path the Proxmox host pushes into containers, and the join token's secret.
    replace(&mut p.k3s, &t.k3s, "k3s (binary, token)", &mut ignored);
    // Which secret is the Talos bundle, and the endpoint configs are made for.
    replace(&mut p.talos.secrets, &t.talos.secrets, "talos.secrets", &mut ignored);
    replace(&mut p.talos.endpoint, &t.talos.endpoint, "talos.endpoint", &mut ignored);
    // Which secrets the daemon resolves at all.
    replace(&mut p.secrets, &t.secrets, "secrets", &mut ignored);
    // Ownership tag, prune, interval, drift schedule, suspend: what is touched and when.
    replace(&mut p.reconcile, &t.reconcile, "reconcile", &mut ignored);
    (pr, ignored)
}

fn replace<T: Clone + PartialEq>(value: &mut T, trusted: &T, name: &str, ignored: &mut Vec<String>) {
    if value != trusted {
        ignored.push(name.to_string());
        *value = trusted.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, load};
    use crate::test_repo::{CLUSTER, files};

    #[test]
    fn a_pull_request_plans_its_nodes_with_the_watched_branchs_credentials_and_policy() {
        let trusted = load(&files(), &LoadOptions::default()).unwrap();
        let mut pr_files = files();
        let hostile = CLUSTER.replace("https://127.0.0.1:8006", "https://attacker.example:8006")
            + "reconcile: {prune: true, ownership_tag: other, interval: 1s}\nk3s: {binary: /etc/shadow}\n";
        pr_files.insert("cluster.yaml", hostile);
        pr_files.insert(
            "nodes/k3s-4.yaml",
            "vmid: 103\nproxmox_node: pve\nkind: lxc\nrole: agent\naddress: 10.0.0.14/24\n",
        );
        let pr = load(&pr_files, &LoadOptions::default()).unwrap();

        let (planned, ignored) = pull_request_state(pr, &trusted);
        assert_eq!(planned.nodes.len(), 4, "the pull request's nodes are planned");
        assert_eq!(planned.cluster.proxmox, trusted.cluster.proxmox);
        assert_eq!(planned.cluster.reconcile, trusted.cluster.reconcile);
        assert_eq!(planned.cluster.k3s, trusted.cluster.k3s);
        assert_eq!(
            ignored,
            [
                "proxmox (API, certificate, token, hosts)",
                "k3s (binary, token)",
                "reconcile"
            ]
        );
    }

    #[test]
    fn a_pull_request_that_changes_no_trusted_setting_has_nothing_ignored() {
        let trusted = load(&files(), &LoadOptions::default()).unwrap();
        let (planned, ignored) = pull_request_state(trusted.clone(), &trusted);
        assert!(ignored.is_empty());
        assert_eq!(planned.cluster.proxmox, trusted.cluster.proxmox);
    }
}
