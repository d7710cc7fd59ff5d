//! Which steps of a plan must wait for which: the order apply keeps when it runs steps side
//! by side. Pure: a function of the steps and the control-plane node names.
//!
//! The rules, each an edge from an earlier step to a later one:
//! 1. a node's steps run in plan order (create, then install, then configure);
//! 2. the control plane first: a cluster step waits for every earlier cluster step of a
//!    control-plane node (servers join one at a time; agents and workers join a ready server);
//! 3. one disruptive step at a time: a disruptive step (a member's restart, a K3s upgrade, a
//!    Talos apply) waits for every earlier disruptive step and every earlier step with a
//!    health gate, so nothing is disrupted while an earlier gate may still fail the wave;
//! 4. deletes last: a pruned guest goes after every other step;
//! 5. add-ons after the nodes, one at a time: a cluster-wide step (an add-on, the all-nodes
//!    gate) waits for every earlier step, so waves run in order.
//!
//! Everything else may run side by side: creating guests, workers joining, updates that do
//! not interrupt a node. A plan's order satisfies every edge, so running the steps one at a
//! time in plan order is always a valid schedule.

use super::{Action, Step};
use std::collections::BTreeSet;

/// For each step, the indices of the earlier steps it must wait for (sorted, minimal enough:
/// transitive edges are not removed).
pub fn dependencies(steps: &[Step], control_plane: &BTreeSet<String>) -> Vec<Vec<usize>> {
    let is_delete = |s: &Step| matches!(s.action, Action::Delete { .. });
    let gated = |s: &Step| {
        s.disruptive
            || matches!(&s.action, Action::K3sConfigure { restart, .. } if !restart.is_empty())
            || matches!(s.action, Action::TalosApply { .. } | Action::TalosBootstrap)
    };
    let cp_cluster = |s: &Step| s.action.is_cluster() && control_plane.contains(&s.node);
    steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let mut after = BTreeSet::new();
            let earlier = &steps[..i];
            if let Some(j) = earlier.iter().rposition(|s| s.node == step.node) {
                after.insert(j);
            }
            if step.action.is_cluster() {
                after.extend((0..i).filter(|&j| cp_cluster(&earlier[j])));
            }
            if step.disruptive {
                after.extend((0..i).filter(|&j| gated(&earlier[j])));
            }
            if is_delete(step) {
                after.extend((0..i).filter(|&j| !is_delete(&earlier[j])));
            }
            if step.action.is_cluster_wide() {
                after.extend(0..i);
            }
            after.into_iter().collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::PveKind;

    fn step(node: &str, action: Action, disruptive: bool) -> Step {
        Step {
            node: node.into(),
            vmid: 0,
            pve_node: "pve".into(),
            kind: PveKind::Lxc,
            disruptive,
            action,
        }
    }

    fn install() -> Action {
        Action::K3sInstall {
            version: "v1.31.4+k3s1".into(),
            installed: None,
            source: String::new(),
        }
    }

    fn configure() -> Action {
        Action::K3sConfigure {
            changes: Vec::new(),
            restart: String::new(),
            kubeconfig: false,
            config: String::new(),
        }
    }

    fn create() -> Action {
        Action::Create {
            params: Default::default(),
            root_options: Vec::new(),
            raw_lxc: Vec::new(),
            provenance: Default::default(),
        }
    }

    #[test]
    fn addons_wait_for_every_node_step_and_for_each_other() {
        let addon = |name: &str, wave| Action::Addon {
            addon: name.into(),
            wave,
            cni: false,
            declared: String::new(),
            create: Vec::new(),
            change: Vec::new(),
            prune: Vec::new(),
            manifests: String::new(),
        };
        let steps = vec![
            step("server", create(), false),
            step("agent", create(), false),
            step("agent", install(), false),
            step("addons/metallb", addon("metallb", 1), false),
            step("addons/pool", addon("pool", 2), false),
        ];
        let deps = dependencies(&steps, &BTreeSet::from(["server".to_string()]));
        assert_eq!(deps[3], [0, 1, 2], "after every node step");
        assert_eq!(deps[4], [0, 1, 2, 3], "and after the wave before it");
    }

    #[test]
    fn new_guests_are_created_side_by_side_and_agents_join_after_the_server() {
        let steps = vec![
            step("server", create(), false),
            step("server", install(), false),
            step("server", configure(), false),
            step("agent-1", create(), false),
            step("agent-1", install(), false),
            step("agent-1", configure(), false),
            step("agent-2", create(), false),
            step("agent-2", install(), false),
            step("agent-2", configure(), false),
        ];
        let deps = dependencies(&steps, &BTreeSet::from(["server".to_string()]));
        assert_eq!(deps[0], Vec::<usize>::new());
        assert_eq!(
            deps[3],
            Vec::<usize>::new(),
            "an agent's guest is created with the server's"
        );
        assert_eq!(deps[6], Vec::<usize>::new());
        assert_eq!(
            deps[4],
            [1, 2, 3],
            "installing waits for its guest and the control plane"
        );
        assert_eq!(deps[5], [1, 2, 4]);
        assert_eq!(deps[8], [1, 2, 7], "the second agent does not wait for the first");
    }

    #[test]
    fn servers_join_one_at_a_time_and_disruptive_steps_never_overlap() {
        let steps = vec![
            step("s1", configure(), true),
            step("s2", configure(), true),
            step("w1", Action::Restart { reason: "cores".into() }, true),
            step("w2", Action::Start, false),
            step("w2", configure(), false),
            step("old", Action::Delete { running: true }, false),
        ];
        let cp = BTreeSet::from(["s1".to_string(), "s2".to_string()]);
        let deps = dependencies(&steps, &cp);
        assert_eq!(deps[1], [0]);
        assert_eq!(deps[2], [0, 1], "a restart waits for the disruptive steps before it");
        assert_eq!(
            deps[3],
            Vec::<usize>::new(),
            "starting a stopped guest interrupts nothing"
        );
        assert_eq!(deps[4], [0, 1, 3]);
        assert_eq!(deps[5], [0, 1, 2, 3, 4], "deletes go last");
    }

    #[test]
    fn nothing_is_disrupted_while_an_earlier_gate_may_still_fail() {
        let restarting = Action::K3sConfigure {
            changes: Vec::new(),
            restart: "k3s-agent is not running".into(),
            kubeconfig: false,
            config: String::new(),
        };
        let steps = vec![
            step("s1", configure(), false),
            // w1 is not Ready, so restarting it disrupts nothing, but its gate may fail.
            step("w1", restarting, false),
            step("w2", install(), true),
            step("w3", configure(), false),
        ];
        let deps = dependencies(&steps, &BTreeSet::from(["s1".to_string()]));
        assert_eq!(deps[2], [0, 1], "w2's upgrade waits for w1's gate");
        assert_eq!(deps[3], [0], "a join that disrupts nothing does not wait");
    }

    #[test]
    fn the_plan_order_always_satisfies_the_edges() {
        let steps = vec![
            step("a", create(), false),
            step("b", Action::Restart { reason: String::new() }, true),
            step("a", configure(), true),
            step("c", Action::Delete { running: false }, false),
        ];
        for (i, after) in dependencies(&steps, &BTreeSet::from(["a".to_string()]))
            .iter()
            .enumerate()
        {
            assert!(
                after.iter().all(|&j| j < i),
                "step {i} waits for a later step: {after:?}"
            );
        }
    }
}
