//! The deviations phase: a recorded departure from an ADR names a real ADR and says why.

use super::Loader;
use super::cluster::ClusterInput;
use super::nodes::NodeInput;
use crate::model::adr::{self, Adr};
use crate::model::diag::{Diagnostic, Location, did_you_mean};
use crate::model::schema::Deviation;
use std::collections::BTreeSet;

impl Loader<'_> {
    /// Every deviation in cluster.yaml and the node files.
    pub(super) fn check_deviations(&mut self, cluster: Option<&ClusterInput>, adrs: &[Adr], nodes: &[NodeInput]) {
        let cluster_devs = cluster.map(|c| c.deviations.as_slice()).unwrap_or_default();
        let known: BTreeSet<u32> = adrs.iter().map(|a| a.number).collect();
        let ids: Vec<String> = adrs.iter().map(Adr::id).collect();
        for (d, loc) in cluster_devs
            .iter()
            .chain(nodes.iter().flat_map(|n| n.layer.deviations.iter()))
        {
            self.deviation_names_an_adr(d, loc, &known, &ids);
            self.deviation_has_reason(d, loc);
        }
    }

    /// A deviation names an ADR of this repository.
    fn deviation_names_an_adr(&mut self, d: &Deviation, loc: &Location, known: &BTreeSet<u32>, ids: &[String]) {
        match adr::parse_adr_ref(&d.adr) {
            Some(n) if known.contains(&n) => {}
            _ => self.diags.push(
                Diagnostic::new(
                    loc.clone(),
                    format!("deviation names `{}`, which is not an ADR in this repository", d.adr),
                )
                .maybe_hint(
                    did_you_mean(&d.adr, ids.iter().map(String::as_str))
                        .or_else(|| Some(format!("known ADRs: {}", ids.join(", ")))),
                ),
            ),
        }
    }

    /// A deviation says why.
    fn deviation_has_reason(&mut self, d: &Deviation, loc: &Location) {
        if d.reason.trim().is_empty() {
            self.diags.push(
                Diagnostic::new(loc.clone(), "a deviation needs a reason")
                    .hint("say why this file departs from the ADR"),
            );
        }
    }
}
