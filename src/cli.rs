//! Command-line arguments.

use crate::render::ArtifactKind;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const ABOUT: &str = "Keep a Proxmox-hosted K3s or Talos homelab exactly as a git repository describes it.";

const LONG_ABOUT: &str = "\
Keep a Proxmox-hosted K3s or Talos homelab exactly as a git repository describes it.

An infrastructure repository holds cluster.yaml, one file per node under nodes/, and
Architecture Decision Records under adr/ whose accepted decisions carry config in a
```yaml driftless block. driftless loads and validates it, renders each node's Proxmox
guest config and its K3s or Talos config, and explains where every value came from.";

const EXAMPLES: &str = "\
Examples:
  driftless --repo examples/homelab-k3s validate
  driftless --repo examples/homelab-k3s render k3s-master --artifact proxmox-conf
  driftless --repo examples/homelab-k3s render --out /tmp/rendered
  driftless --repo examples/homelab-k3s explain k3s-master lxc.features.nesting
  driftless --repo https://git.example.com/homelab.git --rev main validate
  driftless --repo . --rev HEAD~1 render --output json";

const VALIDATE_EXAMPLES: &str = "\
Examples:
  driftless --repo examples/homelab-k3s validate
  driftless --repo . --rev main validate --output json";

const RENDER_EXAMPLES: &str = "\
Examples:
  driftless --repo examples/homelab-k3s render k3s-master --artifact proxmox-conf
  driftless --repo examples/homelab-k3s render --out /tmp/rendered";

const EXPLAIN_EXAMPLES: &str = "\
Examples:
  driftless --repo examples/homelab-k3s explain k3s-master lxc.features.nesting
  driftless --repo examples/homelab-k3s explain k3s-master";

const PLAN_EXAMPLES: &str = "\
Examples:
  driftless --repo . plan
  driftless --repo . plan --output markdown > plan.md
  driftless --repo . plan --detailed-exitcode --proxmox-url https://127.0.0.1:8006 \\
      --proxmox-token-file token --proxmox-fingerprint AB:CD:...
  driftless --repo . plan --kube-server https://127.0.0.1:16443   # the API through a tunnel";

const DAEMON_EXAMPLES: &str = "\
Examples:
  driftless daemon --repository https://git.example.com/homelab.git --branch main \\
      --plan-refs 'refs/pull/*/head' --webhook-secret-file /etc/driftless/webhook \\
      --secrets-dir /etc/driftless/secrets --state-dir /var/lib/driftless
  driftless daemon --config /etc/driftless/daemon.yaml --log-format json";

const APPLY_EXAMPLES: &str = "\
Examples:
  driftless --repo . apply
  driftless --repo . apply --auto-approve --secrets-dir /etc/driftless/secrets
  driftless --repo . apply --guests-only          # the Proxmox guests, not K3s/Talos
  driftless --repo . apply --gate-timeout 10m     # slow nodes: wait longer for Ready";

#[derive(Debug, Parser)]
#[command(name = "driftless", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The infrastructure repository: a directory, a local git repository, or a git URL
    /// (https://, ssh://, file://). A directory without --rev is read as it is on disk,
    /// uncommitted edits included.
    #[arg(
        long,
        global = true,
        env = "DRIFTLESS_REPO",
        default_value = ".",
        value_name = "PATH|URL"
    )]
    pub repo: String,

    /// Read the repository from this git revision (branch, tag, commit) instead of the
    /// directory; a URL without --rev reads the remote's default branch.
    #[arg(long, global = true, env = "DRIFTLESS_REV", value_name = "REV")]
    pub rev: Option<String>,

    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Treat a proposed ADR as accepted (repeatable), to see what accepting it would change.
    #[arg(long = "assume-accepted", global = true, value_name = "ADR")]
    pub assume_accepted: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
    /// For plan and drift: a markdown report, for a pull request.
    Markdown,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the repository: every problem at once, each as file:line:col with a hint.
    ///
    /// Loads cluster.yaml, nodes/*.yaml and the ADRs, applies accepted decisions, checks the
    /// cross-file rules (unique vmid, name and address, addresses inside the network, roles,
    /// raw LXC keys, K3s flags, secrets) and renders every template. Exit code 0 when valid,
    /// 1 when not.
    #[command(after_help = VALIDATE_EXAMPLES)]
    Validate,

    /// Render each node's artifacts: the Proxmox guest config file and API parameters,
    /// and the K3s config.yaml or Talos machine config.
    ///
    /// Secrets appear as <secret:NAME> placeholders; real values are filled in only when a
    /// file is written to its target.
    #[command(after_help = RENDER_EXAMPLES)]
    Render(RenderArgs),

    /// Compare the repository with Proxmox and the cluster and show what applying would change.
    ///
    /// Reads Proxmox (one listing, one config read per guest driftless may touch), then the
    /// nodes (K3s through `pct exec` or SSH, Talos through its API, with Talos's own dry-run
    /// diff) and the Kubernetes API, and prints the steps in the order apply runs them, node by
    /// node, control plane first: + create, ~ update (key: old -> new, with the file and line
    /// that set the new value), ! restart, > start, install/upgrade/configure k3s, apply talos
    /// config, bootstrap, label, - delete (only with `reconcile.prune: true` and the ownership
    /// tag), each marked (disruptive) when it interrupts a running node, and conflicts that are
    /// never touched. `--guests-only` leaves the cluster layer out.
    #[command(after_help = PLAN_EXAMPLES)]
    Plan(PlanArgs),

    /// The same read-only pass as plan, worded as a drift report: what differs from git.
    Drift(PlanArgs),

    /// Show the plan, ask for confirmation, and apply it: one step at a time, every Proxmox
    /// task awaited, every disruptive step followed by a health gate (the node Ready and the
    /// API server's /readyz ok within --gate-timeout), stopping at the first failure with a
    /// report of what was and was not done.
    #[command(after_help = APPLY_EXAMPLES)]
    Apply(ApplyArgs),

    /// Run the GitOps loop: fetch the repository on an interval (and at once on a signed
    /// webhook), apply each new revision of the branch, plan pull request refs without
    /// applying, check drift on a schedule, and commit a status report for every run to the
    /// status branch. Serves /healthz, /readyz, /metrics and /webhook. Stops cleanly on
    /// SIGTERM (between two steps, never inside one).
    #[command(after_help = DAEMON_EXAMPLES)]
    Daemon(Box<DaemonCmd>),

    /// One run of the daemon, in its own process: the daemon starts it with the job on
    /// stdin and reads the outcome from stdout. Not for people.
    #[command(hide = true, name = "daemon-run")]
    DaemonRun,

    /// Show the last status report the daemon committed for a ref.
    Status(StatusArgs),

    /// The cluster health view: the API server's /readyz, every node Ready with its kubelet
    /// version, the K3s server's node-token, and the kube-system pods (coredns, traefik,
    /// metrics-server) running. Uses the kubeconfig apply saved in the secrets directory.
    /// Exit code 0 when healthy, 1 when not.
    Health(PlanArgs),

    /// Show a node's final values and the chain of files and ADRs that set them.
    #[command(after_help = EXPLAIN_EXAMPLES)]
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct DaemonCmd {
    #[command(flatten)]
    pub daemon: crate::daemon::config::DaemonArgs,
    #[command(flatten)]
    pub connect: crate::connect::ConnectArgs,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "DRIFTLESS_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The infrastructure repository the daemon reports to (URL or path).
    #[arg(long, env = "DRIFTLESS_REPOSITORY", value_name = "URL")]
    pub repository: String,
    /// The ref whose report to show.
    #[arg(long = "ref", default_value = "refs/heads/main", value_name = "REF")]
    pub git_ref: String,
    #[arg(
        long,
        env = "DRIFTLESS_STATUS_BRANCH",
        default_value = "driftless/status",
        value_name = "BRANCH"
    )]
    pub status_branch: String,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Exit 0 when there is nothing to change, 2 when there is, 1 on errors.
    #[arg(long)]
    pub detailed_exitcode: bool,
    #[command(flatten)]
    pub connect: crate::connect::ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Apply without asking (for automation). Without it, apply asks on a terminal and
    /// refuses when there is no terminal to ask on.
    #[arg(long)]
    pub auto_approve: bool,
    #[command(flatten)]
    pub connect: crate::connect::ConnectArgs,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Render only this node.
    pub node: Option<String>,

    /// Render only these artifacts (repeatable).
    #[arg(long, value_enum)]
    pub artifact: Vec<ArtifactKind>,

    /// Write the artifacts to DIR/<node>/<file> instead of printing them.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The node to explain.
    pub node: String,

    /// One key, such as `cores`, `lxc.features.nesting` or `k3s.config.write-kubeconfig-mode`;
    /// every key when absent.
    pub key: Option<String>,
}
