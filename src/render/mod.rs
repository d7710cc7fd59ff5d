//! Rendering: each node's artifacts from minijinja templates. Built-in templates are embedded
//! in the binary; a template of the same name in the repository's templates/ overrides one.
//! Pure and deterministic: the same desired state renders to the same bytes.

pub(crate) mod context;
mod proxmox;

use crate::model::diag::{Diagnostic, Diagnostics, Location};
use crate::model::schema::{Distribution, GuestKind};
use crate::model::{Desired, Node};
use context::{cluster_context, node_context};
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;
use std::collections::BTreeSet;

/// The built-in templates, by name.
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    ("lxc.conf.j2", include_str!("../../templates/lxc.conf.j2")),
    ("qemu.conf.j2", include_str!("../../templates/qemu.conf.j2")),
    ("k3s-config.yaml.j2", include_str!("../../templates/k3s-config.yaml.j2")),
    (
        "talos-machineconfig.yaml.j2",
        include_str!("../../templates/talos-machineconfig.yaml.j2"),
    ),
];

/// The instructions one render of one template may run (minijinja's fuel). The built-in
/// templates use a few hundred per node (the Talos machine config of examples/homelab-talos
/// needs 300), plus a few per label, taint or raw line; a pull request's template that loops a
/// billion times stops here, within a second, with an error naming it, instead of pinning the
/// worker.
pub const TEMPLATE_FUEL: u64 = 1_000_000;

/// The largest artifact a template may render. Real ones are a few KiB; the check is made as
/// the output is written, so a template that renders gigabytes stops at the limit.
pub const MAX_ARTIFACT_BYTES: usize = 1024 * 1024;

/// What a rendered file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactKind {
    /// The Proxmox guest config file (/etc/pve/lxc/VMID.conf or qemu-server/VMID.conf).
    ProxmoxConf,
    /// The Proxmox API parameters that create the guest.
    ProxmoxApi,
    /// /etc/rancher/k3s/config.yaml.
    K3sConfig,
    /// The Talos machine configuration.
    TalosConfig,
    /// An add-on's Kubernetes objects (`addons/NAME/`), labelled, as one YAML stream.
    AddonManifests,
}

impl ArtifactKind {
    pub fn file_name(self) -> &'static str {
        match self {
            ArtifactKind::ProxmoxConf => "proxmox.conf",
            ArtifactKind::ProxmoxApi => "proxmox-api.json",
            ArtifactKind::K3sConfig => "k3s-config.yaml",
            ArtifactKind::TalosConfig => "talos-machineconfig.yaml",
            ArtifactKind::AddonManifests => "manifests.yaml",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    pub node: String,
    pub kind: ArtifactKind,
    /// Where this file lives on its target system.
    pub target: String,
    pub content: String,
}

/// The placeholder a secret renders to. Secrets are resolved only when a file is written to
/// its target; everything shown to people carries this placeholder instead.
pub fn secret_placeholder(name: &str, field: Option<&str>) -> String {
    match field {
        Some(f) => format!("<secret:{name}/{f}>"),
        None => format!("<secret:{name}>"),
    }
}

struct Renderer<'a> {
    env: Environment<'a>,
    desired: &'a Desired,
    /// Computed once: every template of every node sees the same cluster.
    cluster: Value,
}

/// Why a node did not render.
struct NodeError {
    diag: Diagnostic,
    /// A template ran out of fuel or output: it would for the next node too, so rendering stops.
    exhausted: bool,
}

impl From<Diagnostic> for NodeError {
    fn from(diag: Diagnostic) -> Self {
        NodeError { diag, exhausted: false }
    }
}

fn template_file(d: &Desired, name: &str) -> String {
    d.templates
        .get(name)
        .map(|t| t.file.clone())
        .unwrap_or_else(|| format!("(built-in) templates/{name}"))
}

fn template_error(d: &Desired, name: &str, node: &str, e: &minijinja::Error) -> Diagnostic {
    let file = e
        .name()
        .map(|n| template_file(d, n))
        .unwrap_or_else(|| template_file(d, name));
    let line = e.line().unwrap_or(1) as u32;
    let mut msg = format!("template error rendering `{name}` for node `{node}`: {}", e.kind());
    if let Some(detail) = e.detail() {
        msg.push_str(": ");
        msg.push_str(detail);
    }
    // An error inside an `include` or a macro arrives wrapped ("could not render include"):
    // the innermost one says what went wrong (the recursion limit of a template including
    // itself, say).
    let mut cause = std::error::Error::source(e);
    let mut innermost = None;
    while let Some(c) = cause {
        if let Some(inner) = c.downcast_ref::<minijinja::Error>() {
            innermost = Some(inner);
        }
        cause = c.source();
    }
    if let Some(inner) = innermost {
        msg.push_str(&format!(" (caused by: {}", inner.kind()));
        if let Some(detail) = inner.detail() {
            msg.push_str(": ");
            msg.push_str(detail);
        }
        msg.push(')');
    }
    Diagnostic::new(Location::new(file, line, 1), msg)
        .hint("check the template against the values `driftless explain NODE` shows")
}

impl<'a> Renderer<'a> {
    fn new(desired: &'a Desired) -> Result<Self, Diagnostics> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(TEMPLATE_FUEL));
        // Artifacts are config files, not HTML: values are quoted by the templates (`tojson`)
        // where the format needs it, never escaped behind their back.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(true)
                .build()
                .expect("default delimiters are valid"),
        );
        // A description line as Proxmox writes it after `#` in a guest config (percent-encoded).
        env.add_filter("pve_text", |s: String| crate::pve::conf::encode_text(&s));
        let declared: BTreeSet<String> = desired.cluster.secrets.keys().cloned().collect();
        // `secret("k3s-token")`, or one field of a bundle: `secret("talos-secrets", "certs.os.crt")`.
        env.add_function(
            "secret",
            move |name: String, field: Option<String>| -> Result<String, minijinja::Error> {
                if declared.contains(&name) {
                    Ok(secret_placeholder(&name, field.as_deref()))
                } else {
                    Err(minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        format!("unknown secret `{name}` (declare it under `secrets:` in cluster.yaml)"),
                    ))
                }
            },
        );
        let mut diags = Diagnostics::default();
        for (name, builtin) in BUILTIN_TEMPLATES {
            let source = desired
                .templates
                .get(*name)
                .map(|t| t.source.as_str())
                .unwrap_or(builtin);
            if let Err(e) = env.add_template_owned(name.to_string(), source.to_string()) {
                let file = template_file(desired, name);
                diags.push(
                    Diagnostic::new(
                        Location::new(file, e.line().unwrap_or(1) as u32, 1),
                        format!("template syntax error: {}", e.detail().unwrap_or("invalid template")),
                    )
                    .hint("minijinja follows Jinja2 syntax"),
                );
            }
        }
        for (name, t) in &desired.templates {
            if !BUILTIN_TEMPLATES.iter().any(|(n, _)| n == name) {
                diags.push(
                    Diagnostic::new(
                        Location::file_start(&t.file),
                        format!("`{name}` does not override any built-in template"),
                    )
                    .hint({
                        let names = BUILTIN_TEMPLATES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
                        match crate::model::diag::did_you_mean(name, BUILTIN_TEMPLATES.iter().map(|(n, _)| *n)) {
                            Some(h) => format!("{h} (templates: {names})"),
                            None => format!("templates: {names}"),
                        }
                    }),
                );
            }
        }
        if !diags.is_empty() {
            return Err(diags);
        }
        let cluster = Value::from(minijinja::value::Serde(cluster_context(desired)));
        Ok(Renderer { env, desired, cluster })
    }

    fn render(&self, name: &str, node: &Node, node_ctx: &Value) -> Result<String, NodeError> {
        let ctx = minijinja::context! { cluster => self.cluster.clone(), node => node_ctx.clone() };
        let tmpl = self
            .env
            .get_template(name)
            .map_err(|e| template_error(self.desired, name, &node.name, &e))?;
        let mut out = CappedOutput::default();
        let result = tmpl.render_captured_to(ctx, &mut out).map(|_| ());
        let exhausted = out.overflowed || matches!(&result, Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel);
        let diag = match result {
            Ok(()) => return Ok(String::from_utf8(out.bytes).expect("minijinja writes text")),
            // At the template's start: minijinja replaces the error of a failed write with one
            // that has no line.
            Err(_) if out.overflowed => Diagnostic::new(
                Location::file_start(template_file(self.desired, name)),
                format!(
                    "`{name}` renders more than {} MiB for node `{}`",
                    MAX_ARTIFACT_BYTES / (1024 * 1024),
                    node.name
                ),
            ),
            Err(e) => template_error(self.desired, name, &node.name, &e),
        };
        Err(NodeError { diag, exhausted })
    }

    /// Rendered YAML must parse: a template that emits broken YAML is a template error.
    fn render_yaml(&self, name: &str, node: &Node, node_ctx: &Value) -> Result<String, NodeError> {
        let text = self.render(name, node, node_ctx)?;
        for doc in text.split("\n---\n") {
            if let Err(e) = crate::model::yaml::parse(doc, 0) {
                return Err(NodeError::from(Diagnostic::new(
                    Location::file_start(template_file(self.desired, name)),
                    format!(
                        "`{name}` rendered invalid YAML for node `{}`: line {}: {}",
                        node.name, e.pos.line, e.message
                    ),
                )));
            }
        }
        Ok(text)
    }

    fn node(&self, node: &Node) -> Result<Vec<Artifact>, NodeError> {
        let mut out = Vec::new();
        let node_ctx = Value::from(minijinja::value::Serde(node_context(self.desired, node)));
        let (conf_template, conf_dir) = match node.kind {
            GuestKind::Lxc => ("lxc.conf.j2", "lxc"),
            GuestKind::Vm => ("qemu.conf.j2", "qemu-server"),
        };
        let raw = self.render(conf_template, node, &node_ctx)?;
        let conf = proxmox::canonical_conf(&raw, node.kind).map_err(|e| {
            Diagnostic::new(
                Location::file_start(template_file(self.desired, conf_template)),
                format!(
                    "`{conf_template}` rendered an invalid Proxmox config for node `{}`: {}",
                    node.name,
                    // Proxmox's messages may span lines; a diagnostic is one line.
                    e.to_string().trim_end().replace('\n', "; ")
                ),
            )
        })?;
        let api = proxmox::create_params(&conf, node);
        out.push(Artifact {
            node: node.name.clone(),
            kind: ArtifactKind::ProxmoxConf,
            target: format!("/etc/pve/nodes/{}/{conf_dir}/{}.conf", node.proxmox_node, node.vmid),
            content: conf.write(),
        });
        let api_path = format!(
            "/nodes/{}/{}",
            node.proxmox_node,
            if node.kind == GuestKind::Lxc { "lxc" } else { "qemu" }
        );
        out.push(Artifact {
            node: node.name.clone(),
            kind: ArtifactKind::ProxmoxApi,
            target: format!("POST {api_path}"),
            content: serde_json::to_string_pretty(&api).expect("params serialise") + "\n",
        });
        match self.desired.cluster.distribution {
            Distribution::K3s => out.push(Artifact {
                node: node.name.clone(),
                kind: ArtifactKind::K3sConfig,
                target: "/etc/rancher/k3s/config.yaml".into(),
                content: self.render_yaml("k3s-config.yaml.j2", node, &node_ctx)?,
            }),
            Distribution::Talos => out.push(Artifact {
                node: node.name.clone(),
                kind: ArtifactKind::TalosConfig,
                target: format!("talos://{}:50000", node.ip()),
                content: self.render_yaml("talos-machineconfig.yaml.j2", node, &node_ctx)?,
            }),
        }
        Ok(out)
    }
}

/// A template's output, refused past [`MAX_ARTIFACT_BYTES`] (the render stops at that write).
#[derive(Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_ARTIFACT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered output over the size limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Render every artifact of every node, in apply order. Any template error fails the whole
/// render: a repository with an error renders nothing.
pub fn render_all(desired: &Desired) -> Result<Vec<Artifact>, Diagnostics> {
    let r = Renderer::new(desired)?;
    let mut out = Vec::new();
    let mut diags = Diagnostics::default();
    // A template mistake fails every node the same way: report it once, for the first node.
    let mut seen = BTreeSet::new();
    for (node, result) in desired.nodes.iter().zip(r.nodes(&desired.nodes)) {
        match result {
            Some(Ok(a)) => out.extend(a),
            Some(Err(e)) => {
                let d = e.diag;
                let key = (
                    d.location.clone(),
                    d.message.replace(&format!(" node `{}`", node.name), ""),
                );
                if seen.insert(key) {
                    diags.push(d);
                }
                if e.exhausted {
                    break;
                }
            }
            // Not rendered: an earlier node exhausted a template.
            None => break,
        }
    }
    // The add-ons, after every node: they are applied after the nodes.
    match crate::addons::render(desired) {
        Ok(a) => out.extend(a),
        Err(d) => diags.extend(d),
    }
    if diags.is_empty() { Ok(out) } else { Err(diags.finish()) }
}

/// Nodes per thread, at least, before rendering is spread over cores.
const NODES_PER_THREAD: usize = 64;

impl Renderer<'_> {
    /// Every node rendered, in order, on the machine's cores (a node's templates see only that
    /// node and the cluster), each thread with a renderer of its own. A node after one whose
    /// template was exhausted is not rendered (`None`); every node before it is, so the result
    /// is what rendering one node after the other gives.
    fn nodes(&self, nodes: &[Node]) -> Vec<Option<Result<Vec<Artifact>, NodeError>>> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let first_exhausted = AtomicUsize::new(usize::MAX);
        // The first (or only) thread uses this renderer; the others build their own.
        let own = |thread: usize| (thread > 0).then(|| Renderer::new(self.desired).ok()).flatten();
        crate::threads::map_in_order_with(nodes, NODES_PER_THREAD, own, |own, i, node| {
            if i > first_exhausted.load(Ordering::Relaxed) {
                return None;
            }
            let result = own.as_ref().unwrap_or(self).node(node);
            if matches!(&result, Err(e) if e.exhausted) {
                first_exhausted.fetch_min(i, Ordering::Relaxed);
            }
            Some(result)
        })
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;
    use crate::model::{LoadOptions, load};
    use crate::test_repo::files_of;

    fn render_with(template: Option<&str>, extra_node_lines: &str) -> Result<Vec<Artifact>, Diagnostics> {
        let mut files = files_of(3);
        if let Some(t) = template {
            files.insert("templates/k3s-config.yaml.j2", t);
        }
        let path = "nodes/k3s-2.yaml";
        let mut node = String::from_utf8(files.files[path].clone()).unwrap();
        node.push_str(extra_node_lines);
        files.insert(path, node);
        render_all(&load(&files, &LoadOptions::default()).expect("valid"))
    }

    #[test]
    fn many_nodes_render_on_threads_to_the_bytes_one_after_the_other_gives() {
        let desired = load(&files_of(200), &LoadOptions::default()).expect("valid");
        let r = Renderer::new(&desired).unwrap();
        let one_by_one: Vec<Artifact> = desired
            .nodes
            .iter()
            .flat_map(|n| r.node(n).unwrap_or_else(|e| panic!("{:?}", e.diag)))
            .collect();
        assert_eq!(render_all(&desired).unwrap(), one_by_one);
    }

    #[test]
    fn on_threads_the_nodes_after_an_exhausted_template_are_not_rendered_and_those_before_are() {
        let files = files_of(200);
        let order: Vec<String> = load(&files, &LoadOptions::default())
            .expect("valid")
            .nodes
            .into_iter()
            .map(|n| n.name)
            .collect();
        // A mistake for an early node, an endless loop for a late one, another mistake after it.
        let (early, endless, after) = (&order[10], &order[150], &order[180]);
        let template = format!(
            "{{% if node.name == \"{early}\" %}}{{{{ early_mistake }}}}{{% endif %}}\n\
             {{% if node.name == \"{endless}\" %}}{{% for i in range(100000) %}}{{% for j in range(100000) %}}\
             {{% endfor %}}{{% endfor %}}{{% endif %}}\n\
             {{% if node.name == \"{after}\" %}}{{{{ later_mistake }}}}{{% endif %}}\n"
        );
        let mut files = files;
        files.insert("templates/k3s-config.yaml.j2", template);
        let diags = render_all(&load(&files, &LoadOptions::default()).expect("valid")).unwrap_err();
        let said: Vec<&str> = diags.0.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(said.len(), 2, "{said:#?}");
        assert!(said[0].contains(&format!("node `{early}`")) && said[0].contains("early_mistake"));
        assert!(said[1].contains(&format!("node `{endless}`")) && said[1].contains("ran out of fuel"));
    }

    #[test]
    fn the_built_in_templates_stay_far_inside_the_fuel() {
        // A node with 200 labels: the loops of the built-in templates run 200 rounds.
        let labels: String = (0..200).map(|i| format!("  label-{i}: value-{i}\n")).collect();
        let artifacts = render_with(None, &format!("labels:\n{labels}")).unwrap();
        assert!(artifacts.iter().any(|a| a.content.contains("label-199=value-199")));
    }

    #[test]
    fn a_template_that_loops_a_billion_times_runs_out_of_fuel_and_is_named() {
        let looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n";
        let diags = render_with(Some(looping), "").unwrap_err();
        assert_eq!(diags.len(), 1, "{diags:?}");
        let d = &diags.0[0];
        assert_eq!(d.location.file, "templates/k3s-config.yaml.j2");
        assert_eq!(d.location.line, 1);
        assert!(d.message.contains("ran out of fuel"), "{}", d.message);
    }

    #[test]
    fn a_template_that_recurses_forever_is_stopped_and_named() {
        for endless in [
            "{% macro deeper(n) %}{{ deeper(n + 1) }}{% endmacro %}{{ deeper(0) }}\n",
            "{% include \"k3s-config.yaml.j2\" %}\n",
        ] {
            let diags = render_with(Some(endless), "").unwrap_err();
            assert_eq!(diags.len(), 1, "{diags:?}");
            let d = &diags.0[0];
            assert_eq!(d.location.file, "templates/k3s-config.yaml.j2", "{endless}");
            assert!(d.message.contains("recursion limit exceeded"), "{}", d.message);
        }
    }

    #[test]
    fn an_artifact_stops_at_the_output_limit() {
        // 10 GB if it ran to the end; minijinja refuses a single repeat past 100 MB by itself.
        let huge = "# node {{ node.name }}\n{% for i in range(100) %}{{ \"x\" * 100000000 }}{% endfor %}\n";
        let diags = render_with(Some(huge), "").unwrap_err();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert!(
            diags.0[0].message.contains("renders more than 1 MiB"),
            "{}",
            diags.0[0].message
        );
        assert_eq!(
            (diags.0[0].location.file.as_str(), diags.0[0].location.line),
            ("templates/k3s-config.yaml.j2", 1),
            "the template, at its start"
        );
        // Many small writes are cut at the limit too.
        let many = "{% for i in range(100000) %}{{ \"0123456789\" * 2 }}{% endfor %}\n";
        let diags = render_with(Some(many), "").unwrap_err();
        assert!(
            diags.0[0].message.contains("renders more than 1 MiB"),
            "{}",
            diags.0[0].message
        );
        // Just under the limit is fine.
        let fits = "{% for i in range(50000) %}{{ \"0123456789\" * 2 }}{% endfor %}\n";
        let artifacts = render_with(Some(fits), "").unwrap();
        assert!(artifacts.iter().any(|a| a.content.len() >= 1_000_000));
    }
}
