//! Command-line arguments: clap structs only. Each run's settings are made from them once
//! (`ConnectArgs::settings`, `DaemonArgs::flags`); nothing after that reads a flag.

use clap::{Args, Parser, Subcommand, ValueEnum};
use driftless::daemon::config::DaemonFlags;
use driftless::render::ArtifactKind;
use driftless::settings::{self, HostShellKind, LogFormat, ProxmoxOverrides, RunFlags, RunSettings};
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

const DOCTOR_EXAMPLES: &str = "\
Examples:
  driftless --repo . doctor                       # before the first apply
  driftless --repo . doctor --output json         # for scripts: {\"ok\": ..., \"checks\": [...]}
  driftless --repo . doctor --repository ssh://git@git.example.com/homelab/infra.git \\
      --git-ssh-key /etc/driftless/secrets/deploy-key \\
      --git-known-hosts /etc/driftless/secrets/git.known_hosts
  driftless --repo . doctor --plan-refs 'refs/pull/*/head' --plan-token-file secrets/pve-plan-token

Exit code 0 when no check failed (warnings allowed), 1 otherwise. docs/setup.md walks
through every check from a fresh Proxmox VE host.";

const IMPORT_EXAMPLES: &str = "\
Examples:
  driftless import --out homelab --vmid 100-199 --proxmox-url https://192.168.2.10:8006 \\
      --proxmox-token-file secrets/pve-token --proxmox-fingerprint AB:CD:...
  driftless import --out homelab --tag k3s --ssh-host 192.168.2.10 --ssh-known-hosts secrets/pve.known_hosts
  driftless import --out homelab --name 'talos-*' --distribution talos \\
      --address talos-cp-1=10.0.0.10/24 --address talos-worker-1=10.0.0.21/24
  driftless import --vmid 105 --dry-run            # print the files instead of writing them

Then: `driftless --repo homelab validate`, `driftless --repo homelab plan`. Existing files are
never overwritten (a cluster.yaml that exists gets the skeleton beside it as cluster.yaml.imported).";

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

    /// Show the plan, ask for confirmation, and apply it: independent steps side by side (up to
    /// --parallelism per Proxmox node; 1 keeps the plan's order), every Proxmox task awaited, every disruptive step followed by a health gate (the node Ready and the
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

    /// Check a repository against the real systems before applying it: read-only, one line
    /// per check (ok, warning, error) and what to do about each.
    ///
    /// The API answers and its certificate matches the pin; the token has the privileges the
    /// current plan needs on each path (creating guests, changing their config, starting
    /// them) and root-only changes have a host shell; for pull request plans, a read-only
    /// token is given; every Proxmox node a node file names is online, with the storage (and
    /// room for the new disks), the bridge and the template or ISO it names; the host shell
    /// answers with a pinned host key and has `pct`; running VM nodes answer on SSH (K3s) or
    /// the Talos API; every declared secret is there with mode 0600; and, with --repository,
    /// the daemon can fetch the repository with its credentials. Nothing is changed anywhere.
    #[command(after_help = DOCTOR_EXAMPLES)]
    Doctor(DoctorArgs),

    /// Write node files (and a cluster.yaml skeleton) from guests that exist on a Proxmox.
    ///
    /// Each selected guest (by --vmid range, --tag, --name pattern) becomes nodes/NAME.yaml
    /// with its settings as node values, `adopt: true`, and a comment saying where it came
    /// from; values every imported guest of a kind shares are lifted into cluster.yaml
    /// `defaults`. Raw `lxc.*` keys (and snapshots) are read from the config file through the
    /// host shell when one is given (--ssh-host, or --host-shell local on the host itself).
    /// What the repository format cannot say (mount points, extra NICs, snapshots) is listed
    /// in the file as kept unmanaged; what the first plan would change is noted. Then `driftless plan` shows exactly what driftless would change:
    /// for guests made by hand, ideally nothing but the ownership tag.
    #[command(after_help = IMPORT_EXAMPLES)]
    Import(Box<ImportArgs>),
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// A read-only API token for pull request plans (a file holding USER@REALM!TOKENID=SECRET):
    /// checked to read every node's guest and to change nothing.
    #[arg(
        long,
        env = "DRIFTLESS_PLAN_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Daemon"
    )]
    pub plan_token_file: Option<PathBuf>,
    /// The refs the daemon plans (its --plan-refs): with any, a read-only token is expected.
    #[arg(
        long = "plan-refs",
        env = "DRIFTLESS_PLAN_REFS",
        value_name = "PATTERN",
        value_delimiter = ',',
        help_heading = "Daemon"
    )]
    pub plan_refs: Vec<String>,
    /// The daemon's repository (https://, ssh://, file:// or a path): fetched once, into a
    /// temporary directory, with the credentials below. Not checked without it.
    #[arg(long, env = "DRIFTLESS_REPOSITORY", value_name = "URL", help_heading = "Daemon")]
    pub repository: Option<String>,
    /// The branch the daemon applies.
    #[arg(long, env = "DRIFTLESS_BRANCH", default_value = "main", help_heading = "Daemon")]
    pub branch: String,
    /// SSH key the daemon fetches ssh:// repositories with (its --ssh-key).
    #[arg(long, env = "DRIFTLESS_GIT_SSH_KEY", value_name = "FILE", help_heading = "Daemon")]
    pub git_ssh_key: Option<PathBuf>,
    /// known_hosts the daemon checks the forge's host key with (its --known-hosts).
    #[arg(
        long,
        env = "DRIFTLESS_GIT_KNOWN_HOSTS",
        value_name = "FILE",
        help_heading = "Daemon"
    )]
    pub git_known_hosts: Option<PathBuf>,
    /// Token file the daemon fetches https:// repositories with (its --token-file).
    #[arg(long, env = "DRIFTLESS_GIT_TOKEN_FILE", value_name = "FILE", help_heading = "Daemon")]
    pub git_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `--distribution` of import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CliDistribution {
    K3s,
    Talos,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Where to write cluster.yaml and nodes/ (created when missing); default: --repo.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the files instead of writing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Only guests whose vmid is in this range: `100-199`, `105`, `200-`.
    #[arg(long, value_name = "FROM-TO", help_heading = "Selection")]
    pub vmid: Option<String>,
    /// Only guests carrying this tag (repeatable: any of them).
    #[arg(long = "tag", value_name = "TAG", help_heading = "Selection")]
    pub tags: Vec<String>,
    /// Only guests whose name matches this pattern, `*` and `?` (repeatable: any of them).
    #[arg(long = "name", value_name = "PATTERN", help_heading = "Selection")]
    pub names: Vec<String>,
    /// The distribution the guests run.
    #[arg(long, value_enum, default_value_t = CliDistribution::K3s, help_heading = "Repository")]
    pub distribution: CliDistribution,
    /// The K3s or Talos release they run [default: v1.31.4+k3s1, or v1.13.9 for Talos].
    #[arg(long, value_name = "VERSION", help_heading = "Repository")]
    pub version: Option<String>,
    /// Talos: the Kubernetes release [default: v1.34.1].
    #[arg(long, value_name = "VERSION", help_heading = "Repository")]
    pub kubernetes_version: Option<String>,
    /// The cluster's name in cluster.yaml.
    #[arg(long, default_value = "homelab", help_heading = "Repository")]
    pub cluster_name: String,
    /// A node's role instead of the guess from its name (server/agent, controlplane/worker);
    /// repeatable: `--role db-1=agent`.
    #[arg(long = "role", value_name = "NODE=ROLE", help_heading = "Repository")]
    pub roles: Vec<String>,
    /// A VM node's address (its Proxmox config does not hold it); repeatable:
    /// `--address talos-cp-1=10.0.0.10/24`.
    #[arg(long = "address", value_name = "NODE=IP/PREFIX", help_heading = "Repository")]
    pub addresses: Vec<String>,
    /// The network's gateway, when no guest names it.
    #[arg(long, value_name = "IP", help_heading = "Repository")]
    pub gateway: Option<std::net::IpAddr>,
    /// The OS template of every imported container (only used to re-create one) instead of a
    /// guess from its OS type among the host's templates.
    #[arg(long, value_name = "VOLID", help_heading = "Repository")]
    pub template: Option<String>,
    /// The tag that marks guests driftless manages.
    #[arg(long, default_value = "driftless", help_heading = "Repository")]
    pub ownership_tag: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct DaemonCmd {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Log format.
    #[arg(long, value_enum, default_value_t = CliLogFormat::Text, env = "DRIFTLESS_LOG_FORMAT")]
    pub log_format: CliLogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CliLogFormat {
    Text,
    Json,
}

impl CliLogFormat {
    pub fn settings(self) -> LogFormat {
        match self {
            CliLogFormat::Text => LogFormat::Text,
            CliLogFormat::Json => LogFormat::Json,
        }
    }
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
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Apply without asking (for automation). Without it, apply asks on a terminal and
    /// refuses when there is no terminal to ask on.
    #[arg(long)]
    pub auto_approve: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
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

#[derive(Debug, Clone, Args)]
/// Connection and cluster-layer flags of plan, drift, apply, health and daemon; `None` (or the
/// default shown) keeps what cluster.yaml says.
pub struct ConnectArgs {
    /// Proxmox API URL (overrides proxmox.api).
    #[arg(long, env = "DRIFTLESS_PROXMOX_URL", value_name = "URL", help_heading = "Connection")]
    pub proxmox_url: Option<String>,
    /// File holding the API token `USER@REALM!TOKENID=SECRET` (overrides proxmox.token).
    /// The token itself may instead be given in DRIFTLESS_PROXMOX_TOKEN.
    #[arg(
        long,
        env = "DRIFTLESS_PROXMOX_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub proxmox_token_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the API certificate to pin (overrides proxmox.fingerprint).
    #[arg(
        long,
        env = "DRIFTLESS_PROXMOX_FINGERPRINT",
        value_name = "AB:CD:..",
        help_heading = "Connection"
    )]
    pub proxmox_fingerprint: Option<String>,
    /// CA certificate file to verify the API with (overrides proxmox.ca_file).
    #[arg(
        long,
        env = "DRIFTLESS_PROXMOX_CA_FILE",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub proxmox_ca_file: Option<PathBuf>,
    /// Do not verify the API's certificate at all. Anyone on the path can then read the
    /// token: for throwaway test setups only.
    #[arg(long, env = "DRIFTLESS_PROXMOX_INSECURE", help_heading = "Connection")]
    pub proxmox_insecure: bool,
    /// Host (or address) of the Proxmox host shell, for every Proxmox node (overrides proxmox.hosts.*.ssh).
    #[arg(long, env = "DRIFTLESS_SSH_HOST", value_name = "HOST", help_heading = "Connection")]
    pub ssh_host: Option<String>,
    /// SSH port of the host shell.
    #[arg(long, env = "DRIFTLESS_SSH_PORT", value_name = "PORT", help_heading = "Connection")]
    pub ssh_port: Option<u16>,
    /// SSH user of the host shell (root on a Proxmox host).
    #[arg(long, env = "DRIFTLESS_SSH_USER", value_name = "USER", help_heading = "Connection")]
    pub ssh_user: Option<String>,
    /// Private key file for the host shell.
    #[arg(
        long,
        env = "DRIFTLESS_SSH_KEY_FILE",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub ssh_key_file: Option<PathBuf>,
    /// known_hosts file the host shell's key is checked against.
    #[arg(
        long,
        env = "DRIFTLESS_SSH_KNOWN_HOSTS",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub ssh_known_hosts: Option<PathBuf>,
    /// How to reach the Proxmox host's root shell: `ssh` (proxmox.hosts in cluster.yaml), or
    /// `local` when driftless runs on the Proxmox host itself (or against the sandbox).
    #[arg(long, env = "DRIFTLESS_HOST_SHELL", value_enum, default_value_t = CliHostShell::Ssh, help_heading = "Connection")]
    pub host_shell: CliHostShell,
    /// Where /etc/pve is on the Proxmox host.
    #[arg(
        long,
        env = "DRIFTLESS_PVE_ROOT",
        value_name = "DIR",
        default_value = settings::DEFAULT_PVE_ROOT,
        help_heading = "Connection"
    )]
    pub pve_root: String,
    /// The `pct` command on the Proxmox host, as words separated by spaces.
    #[arg(
        long,
        env = "DRIFTLESS_PCT_COMMAND",
        value_name = "COMMAND",
        default_value = settings::DEFAULT_PCT_COMMAND,
        help_heading = "Connection"
    )]
    pub pct_command: String,
    /// Directory holding the secrets the repository names (`<dir>/<name>`); a secret may also
    /// come from DRIFTLESS_SECRET_<NAME>.
    #[arg(
        long,
        env = "DRIFTLESS_SECRETS_DIR",
        value_name = "DIR",
        default_value = settings::DEFAULT_SECRETS_DIR,
        help_heading = "Connection"
    )]
    pub secrets_dir: PathBuf,
    /// Plan and apply the Proxmox guests only: no K3s, Talos or Kubernetes step.
    #[arg(long, env = "DRIFTLESS_GUESTS_ONLY", help_heading = "Cluster layer")]
    pub guests_only: bool,
    /// Reach the Kubernetes API at this URL instead of the kubeconfig's server (a tunnel,
    /// or the sandbox).
    #[arg(
        long,
        env = "DRIFTLESS_KUBE_SERVER",
        value_name = "URL",
        help_heading = "Cluster layer"
    )]
    pub kube_server: Option<String>,
    /// Reach every Talos node's API through this endpoint (`HOST:PORT`), with the node in
    /// gRPC metadata as `talosctl --endpoints E --nodes N` does.
    #[arg(
        long,
        env = "DRIFTLESS_TALOS_ENDPOINT",
        value_name = "HOST:PORT",
        help_heading = "Cluster layer"
    )]
    pub talos_endpoint: Option<String>,
    /// How long a node may take to be Ready (and the API server ready) after a disruptive
    /// step before the wave stops: `300s`, `5m`.
    #[arg(long, env = "DRIFTLESS_GATE_TIMEOUT", value_name = "DURATION", default_value = "5m", value_parser = settings::parse_duration, help_heading = "Cluster layer")]
    pub gate_timeout: std::time::Duration,
    /// SSH user for VM nodes running K3s.
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_USER",
        value_name = "USER",
        default_value = settings::DEFAULT_NODE_SSH_USER,
        help_heading = "Cluster layer"
    )]
    pub node_ssh_user: String,
    /// SSH port of VM nodes.
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_PORT",
        value_name = "PORT",
        default_value_t = settings::DEFAULT_NODE_SSH_PORT,
        help_heading = "Cluster layer"
    )]
    pub node_ssh_port: u16,
    /// Private key for VM nodes (default: the host shell's key, or ~/.ssh/id_ed25519).
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_KEY_FILE",
        value_name = "FILE",
        help_heading = "Cluster layer"
    )]
    pub node_ssh_key_file: Option<PathBuf>,
    /// known_hosts holding the VM nodes' host keys (default: the host shell's, or
    /// ~/.ssh/known_hosts). Unknown keys are refused.
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_KNOWN_HOSTS",
        value_name = "FILE",
        help_heading = "Cluster layer"
    )]
    pub node_ssh_known_hosts: Option<PathBuf>,
    /// Connect to this host instead of each VM node's address.
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_HOST",
        value_name = "HOST",
        help_heading = "Cluster layer"
    )]
    pub node_ssh_host: Option<String>,
    /// A directory every node path is under (tests, or nodes whose root is mounted here).
    #[arg(
        long,
        env = "DRIFTLESS_NODE_ROOT",
        value_name = "DIR",
        default_value = "",
        hide_default_value = true,
        help_heading = "Cluster layer"
    )]
    pub node_root: String,
    /// How many steps apply runs at once on one Proxmox node [default: cluster.yaml
    /// reconcile.parallelism, else 8]. Steps that depend on each other still wait (a node's
    /// own steps, the control plane first, one disruptive step at a time); 1 applies one step
    /// at a time, in plan order.
    #[arg(
        long,
        env = "DRIFTLESS_PARALLELISM",
        value_name = "N",
        help_heading = "Cluster layer"
    )]
    pub parallelism: Option<usize>,
    /// How long apply waits for another run (another apply, the daemon, another machine)
    /// to release the cluster's run lock before it refuses, naming that run.
    #[arg(long, env = "DRIFTLESS_LOCK_WAIT", value_name = "DURATION", default_value = "60s", value_parser = settings::parse_duration, help_heading = "Connection")]
    pub lock_wait: std::time::Duration,
    /// How long idempotent Proxmox API calls (reads, task status) are retried, with
    /// exponential backoff, while the API is unreachable or answers 5xx: long enough to ride
    /// out a restart of the Proxmox API.
    #[arg(long, env = "DRIFTLESS_API_RETRY", value_name = "DURATION", default_value = "90s", value_parser = settings::parse_duration, help_heading = "Connection")]
    pub api_retry: std::time::Duration,
}

/// `--host-shell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CliHostShell {
    Ssh,
    Local,
}

impl ConnectArgs {
    /// The run's settings: flags with every default applied (`settings::RunSettings::resolve`).
    pub fn settings(&self) -> RunSettings {
        RunSettings::resolve(RunFlags {
            proxmox: ProxmoxOverrides {
                url: self.proxmox_url.clone(),
                token_file: self.proxmox_token_file.clone(),
                fingerprint: self.proxmox_fingerprint.clone(),
                ca_file: self.proxmox_ca_file.clone(),
                insecure: self.proxmox_insecure,
            },
            host_shell: Some(match self.host_shell {
                CliHostShell::Ssh => HostShellKind::Ssh,
                CliHostShell::Local => HostShellKind::Local,
            }),
            ssh_host: self.ssh_host.clone(),
            ssh_port: self.ssh_port,
            ssh_user: self.ssh_user.clone(),
            ssh_key_file: self.ssh_key_file.clone(),
            ssh_known_hosts: self.ssh_known_hosts.clone(),
            pve_root: Some(self.pve_root.clone()),
            pct_command: Some(self.pct_command.clone()),
            secrets_dir: Some(self.secrets_dir.clone()),
            guests_only: self.guests_only,
            kube_server: self.kube_server.clone(),
            talos_endpoint: self.talos_endpoint.clone(),
            gate_timeout: Some(self.gate_timeout),
            node_ssh_user: Some(self.node_ssh_user.clone()),
            node_ssh_port: Some(self.node_ssh_port),
            node_ssh_key_file: self.node_ssh_key_file.clone(),
            node_ssh_known_hosts: self.node_ssh_known_hosts.clone(),
            node_ssh_host: self.node_ssh_host.clone(),
            node_root: Some(self.node_root.clone()).filter(|r| !r.is_empty()),
            parallelism: self.parallelism,
            lock_wait: Some(self.lock_wait),
            api_retry: Some(self.api_retry),
        })
    }
}

#[derive(Debug, Clone, Default, Args)]
pub struct DaemonArgs {
    /// Daemon config file (YAML; keys as the flags below, with `_` for `-`).
    #[arg(long, env = "DRIFTLESS_DAEMON_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The infrastructure repository: https://, ssh://, file:// URL or a local path.
    #[arg(long, env = "DRIFTLESS_REPOSITORY", value_name = "URL")]
    pub repository: Option<String>,
    /// The branch to apply [default: main].
    #[arg(long, env = "DRIFTLESS_BRANCH")]
    pub branch: Option<String>,
    /// How often to fetch, e.g. 30s, 5m [default: cluster.yaml reconcile.interval, else 1m]; up to
    /// 10% random jitter is added.
    #[arg(long, env = "DRIFTLESS_POLL_INTERVAL", value_name = "DURATION")]
    pub poll_interval: Option<String>,
    /// Where status reports are committed [default: driftless/status]; never a watched branch.
    #[arg(long, env = "DRIFTLESS_STATUS_BRANCH", value_name = "BRANCH")]
    pub status_branch: Option<String>,
    /// Refs to plan but never apply (repeatable): refs/heads/pr/*, refs/pull/*/head,
    /// refs/merge-requests/*/head.
    #[arg(
        long = "plan-refs",
        env = "DRIFTLESS_PLAN_REFS",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub plan_refs: Vec<String>,
    /// Drift check schedule, crontab syntax [default: cluster.yaml reconcile.drift_schedule].
    #[arg(long, env = "DRIFTLESS_DRIFT_SCHEDULE", value_name = "CRON")]
    pub drift_schedule: Option<String>,
    /// Run the drift check at this interval instead of a cron schedule (for tests and demos).
    #[arg(long, env = "DRIFTLESS_DRIFT_INTERVAL", value_name = "DURATION", hide = true)]
    pub drift_interval: Option<String>,
    /// Apply drift when found [default: cluster.yaml reconcile.auto_correct].
    #[arg(long, env = "DRIFTLESS_AUTO_CORRECT")]
    pub auto_correct: Option<bool>,
    /// Address for /healthz, /readyz, /metrics and /webhook [default: 127.0.0.1:9090].
    #[arg(long, env = "DRIFTLESS_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// File holding the webhook secret (GitHub, Gitea/Forgejo HMAC or GitLab token); webhooks
    /// are off without it.
    #[arg(long, env = "DRIFTLESS_WEBHOOK_SECRET_FILE", value_name = "FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Where the daemon keeps its mirror of the repository [default: ./driftless-state].
    #[arg(long, env = "DRIFTLESS_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// SSH key for ssh:// repositories.
    #[arg(long, env = "DRIFTLESS_GIT_SSH_KEY", value_name = "FILE")]
    pub ssh_key: Option<PathBuf>,
    /// known_hosts for ssh:// repositories (host keys are always checked).
    #[arg(long, env = "DRIFTLESS_GIT_KNOWN_HOSTS", value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// File holding a token for https:// repositories.
    #[arg(long, env = "DRIFTLESS_GIT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A read-only Proxmox token (a PVEAuditor role) for pull request plans, in a file as
    /// USER@REALM!TOKENID=SECRET: a plan of untrusted content never holds the token that writes.
    #[arg(long, env = "DRIFTLESS_PLAN_TOKEN_FILE", value_name = "FILE")]
    pub plan_token_file: Option<PathBuf>,
    /// How long one reconcile or drift check may take before it is stopped [default: 1h].
    #[arg(long, env = "DRIFTLESS_RUN_TIMEOUT", value_name = "DURATION")]
    pub run_timeout: Option<String>,
    /// How long one pull request plan may take before it is stopped [default: 10m].
    #[arg(long, env = "DRIFTLESS_PLAN_TIMEOUT", value_name = "DURATION")]
    pub plan_timeout: Option<String>,
    /// The most memory (address space) one run's worker may use [default: 2GiB].
    #[arg(long, env = "DRIFTLESS_WORKER_MEMORY", value_name = "SIZE")]
    pub worker_memory: Option<String>,
    /// Which commits must be signed when verifying: head (the revision applied) or all (every
    /// commit new since the last verified one) [default: head].
    #[arg(long, env = "DRIFTLESS_VERIFY_MODE", value_name = "MODE")]
    pub verify_mode: Option<String>,
    /// Apply only commits signed by a key of this allowed-signers file (git's
    /// gpg.ssh.allowedSignersFile format).
    #[arg(long, env = "DRIFTLESS_VERIFY_ALLOWED_SIGNERS", value_name = "FILE")]
    pub verify_allowed_signers: Option<PathBuf>,
    /// Apply only commits signed by one of these armored OpenPGP public keys (repeatable).
    #[arg(
        long = "verify-openpgp-keys",
        env = "DRIFTLESS_VERIFY_OPENPGP_KEYS",
        value_name = "FILE",
        value_delimiter = ','
    )]
    pub verify_openpgp_keys: Vec<PathBuf>,
}

impl DaemonArgs {
    pub fn flags(&self) -> DaemonFlags {
        DaemonFlags {
            config: self.config.clone(),
            repository: self.repository.clone(),
            branch: self.branch.clone(),
            poll_interval: self.poll_interval.clone(),
            status_branch: self.status_branch.clone(),
            plan_refs: self.plan_refs.clone(),
            drift_schedule: self.drift_schedule.clone(),
            drift_interval: self.drift_interval.clone(),
            auto_correct: self.auto_correct,
            listen: self.listen.clone(),
            webhook_secret_file: self.webhook_secret_file.clone(),
            state_dir: self.state_dir.clone(),
            ssh_key: self.ssh_key.clone(),
            known_hosts: self.known_hosts.clone(),
            token_file: self.token_file.clone(),
            plan_token_file: self.plan_token_file.clone(),
            run_timeout: self.run_timeout.clone(),
            plan_timeout: self.plan_timeout.clone(),
            worker_memory: self.worker_memory.clone(),
            verify_mode: self.verify_mode.clone(),
            verify_allowed_signers: self.verify_allowed_signers.clone(),
            verify_openpgp_keys: self.verify_openpgp_keys.clone(),
        }
    }
}
