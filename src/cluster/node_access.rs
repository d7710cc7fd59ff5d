//! Reaching a cluster node: an LXC container through its Proxmox host (`pct exec`, `pct push`
//! over the host shell, so a fresh container needs no SSH server of its own), or a VM over SSH.
//!
//! Every value goes to the remote side as a positional parameter of a fixed script or as an
//! argv word quoted by the host shell: never spliced into shell syntax. File contents travel
//! on stdin, so a token written to a node is in no command line and no process listing.

use crate::adapters::ssh::{SshHostShell, sha256_hex};
use crate::ports::{CommandOutput, HostShell, NodeShell, ShellError};

/// Checks that stdin, saved in `$t`, is `$len` bytes with SHA-256 `$sum`: a write cut short
/// (connection dropped, client killed) must not replace the file with half of it. A macro so
/// that `concat!` can put it into both scripts.
macro_rules! check_arrived {
    () => {
        r#"got=$(wc -c < "$t"); got_sum=$(sha256sum < "$t")
if [ "$got" -ne "$len" ] || [ "${got_sum%% *}" != "$sum" ]; then
  printf 'received %s of %s bytes: %s left as it was\n' "$got" "$len" "$dest" >&2; exit 74
fi
"#
    };
}

/// Replaces `$dest` in the container from stdin: a temporary file on the host, checked, `pct
/// push` to a temporary name unique to this process beside the destination with the mode and
/// owner, then `mv` (a rename in the same directory: readers see the old file or the new one,
/// never half of it). Positional parameters: vmid, destination, mode, length, SHA-256, then
/// the pct command's words.
pub const PCT_WRITE_SCRIPT: &str = concat!(
    r#"set -eu
vmid=$1; dest=$2; mode=$3; len=$4; sum=$5; shift 5
t=$(mktemp)
trap 'rm -f "$t"' EXIT
cat > "$t"
"#,
    check_arrived!(),
    r#"new="$dest.driftless-new.$$"
"$@" exec "$vmid" -- mkdir -p -- "${dest%/*}"
"$@" push "$vmid" "$t" "$new" --perms "$mode" --user 0 --group 0
"$@" exec "$vmid" -- mv -f -- "$new" "$dest"
"#
);

/// The same on a node reached over SSH: temporary file in the destination's directory,
/// checked, mode, owner root when running as root, rename. Positional parameters:
/// destination, mode, length, SHA-256.
pub const SSH_WRITE_SCRIPT: &str = concat!(
    r#"set -eu
dest=$1; mode=$2; len=$3; sum=$4
mkdir -p -- "${dest%/*}"
t=$(mktemp "$dest.driftless-XXXXXX")
trap 'rm -f "$t"' EXIT
cat > "$t"
"#,
    check_arrived!(),
    r#"chmod "$mode" "$t"
if [ "$(id -u)" = 0 ]; then chown 0:0 "$t"; fi
mv -f -- "$t" "$dest"
trap - EXIT
"#
);

/// `cat` of a file, exit 3 when it does not exist (so "missing" is not mistaken for an error).
pub const READ_SCRIPT: &str = r#"if [ -e "$1" ]; then exec cat -- "$1"; else exit 3; fi"#;

fn sh(script: &str, args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut argv = vec!["sh".to_string(), "-c".to_string(), script.to_string(), "sh".to_string()];
    argv.extend(args);
    argv
}

fn check(out: CommandOutput, host: &str, what: &str) -> Result<CommandOutput, ShellError> {
    if out.status == 0 {
        Ok(out)
    } else {
        Err(ShellError::Command {
            host: host.to_string(),
            command: what.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A container reached through `pct` on its Proxmox host.
pub struct LxcNode<'a, H: HostShell> {
    pub host: &'a H,
    pub pve_node: String,
    pub vmid: u32,
    /// `pct` on a real host.
    pub pct_command: Vec<String>,
    /// Prefix of every path inside the node (empty on real nodes).
    pub root: String,
}

impl<H: HostShell> LxcNode<'_, H> {
    fn exec_argv(&self, argv: &[String]) -> Vec<String> {
        let mut full = self.pct_command.clone();
        full.extend(["exec".to_string(), self.vmid.to_string(), "--".to_string()]);
        full.extend(argv.iter().cloned());
        full
    }
}

impl<H: HostShell> NodeShell for LxcNode<'_, H> {
    fn describe(&self) -> String {
        format!("pct exec {} on {}", self.vmid, self.pve_node)
    }

    fn path(&self, path: &str) -> String {
        format!("{}{path}", self.root)
    }

    async fn run(&self, argv: &[String], stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        self.host.run(&self.pve_node, &self.exec_argv(argv), stdin).await
    }

    async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, ShellError> {
        let path = self.path(path);
        let out = self.run(&sh(READ_SCRIPT, [path.clone()]), b"").await?;
        if out.status == 3 {
            return Ok(None);
        }
        Ok(Some(check(out, &self.describe(), &format!("read {path}"))?.stdout))
    }

    async fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), ShellError> {
        let path = self.path(path);
        let mut args = vec![
            self.vmid.to_string(),
            path.clone(),
            format!("{mode:04o}"),
            contents.len().to_string(),
            sha256_hex(contents),
        ];
        args.extend(self.pct_command.iter().cloned());
        let out = self
            .host
            .run(&self.pve_node, &sh(PCT_WRITE_SCRIPT, args), contents)
            .await?;
        check(out, &self.describe(), &format!("write {path}")).map(|_| ())
    }

    async fn push_from_host(&self, host_path: &str, dest: &str, mode: u32) -> Result<(), ShellError> {
        let dest = self.path(dest);
        let mut argv = self.pct_command.clone();
        argv.extend([
            "push".into(),
            self.vmid.to_string(),
            host_path.to_string(),
            dest.clone(),
            "--perms".into(),
            format!("{mode:04o}"),
        ]);
        let out = self.host.run(&self.pve_node, &argv, b"").await?;
        check(out, &self.describe(), &format!("pct push of {dest}")).map(|_| ())
    }
}

/// A VM reached over SSH (host key checked against known_hosts by [`SshHostShell`]).
pub struct SshNode<'a> {
    pub ssh: &'a SshHostShell,
    /// The key of this node's target in `ssh`.
    pub name: String,
    pub root: String,
}

impl NodeShell for SshNode<'_> {
    fn describe(&self) -> String {
        match self.ssh.target(&self.name) {
            Some(t) => format!("ssh {}@{}", t.user, t.host),
            None => format!("ssh {}", self.name),
        }
    }

    fn path(&self, path: &str) -> String {
        format!("{}{path}", self.root)
    }

    async fn run(&self, argv: &[String], stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        self.ssh.run(&self.name, argv, stdin).await
    }

    async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, ShellError> {
        let path = self.path(path);
        let out = self.run(&sh(READ_SCRIPT, [path.clone()]), b"").await?;
        if out.status == 3 {
            return Ok(None);
        }
        Ok(Some(check(out, &self.describe(), &format!("read {path}"))?.stdout))
    }

    async fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), ShellError> {
        let path = self.path(path);
        let argv = sh(
            SSH_WRITE_SCRIPT,
            [
                path.clone(),
                format!("{mode:04o}"),
                contents.len().to_string(),
                sha256_hex(contents),
            ],
        );
        let out = self.run(&argv, contents).await?;
        check(out, &self.describe(), &format!("write {path}")).map(|_| ())
    }

    async fn push_from_host(&self, _: &str, dest: &str, _: u32) -> Result<(), ShellError> {
        Err(ShellError::Other(format!(
            "{}: {dest} would come from the Proxmox host, which only containers have",
            self.describe()
        )))
    }

    fn may_be_booting(&self) -> bool {
        true
    }
}

/// The shell of any node: through the Proxmox host for containers, SSH for VMs.
pub enum AnyNode<'a, H: HostShell> {
    Lxc(LxcNode<'a, H>),
    Ssh(SshNode<'a>),
}

impl<H: HostShell> NodeShell for AnyNode<'_, H> {
    fn describe(&self) -> String {
        match self {
            AnyNode::Lxc(n) => n.describe(),
            AnyNode::Ssh(n) => n.describe(),
        }
    }
    fn path(&self, path: &str) -> String {
        match self {
            AnyNode::Lxc(n) => n.path(path),
            AnyNode::Ssh(n) => n.path(path),
        }
    }
    async fn run(&self, argv: &[String], stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        match self {
            AnyNode::Lxc(n) => n.run(argv, stdin).await,
            AnyNode::Ssh(n) => n.run(argv, stdin).await,
        }
    }
    async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, ShellError> {
        match self {
            AnyNode::Lxc(n) => n.read_file(path).await,
            AnyNode::Ssh(n) => n.read_file(path).await,
        }
    }
    async fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), ShellError> {
        match self {
            AnyNode::Lxc(n) => n.write_file(path, contents, mode).await,
            AnyNode::Ssh(n) => n.write_file(path, contents, mode).await,
        }
    }
    async fn push_from_host(&self, host_path: &str, dest: &str, mode: u32) -> Result<(), ShellError> {
        match self {
            AnyNode::Lxc(n) => n.push_from_host(host_path, dest, mode).await,
            AnyNode::Ssh(n) => n.push_from_host(host_path, dest, mode).await,
        }
    }
    fn may_be_booting(&self) -> bool {
        match self {
            AnyNode::Lxc(n) => n.may_be_booting(),
            AnyNode::Ssh(n) => n.may_be_booting(),
        }
    }
}

/// Run argv on the node and fail on a non-zero exit, naming the node and the program.
pub async fn run_checked<N: NodeShell>(node: &N, argv: &[String], stdin: &[u8]) -> Result<CommandOutput, ShellError> {
    let out = node.run(argv, stdin).await?;
    let what = argv.first().map(String::as_str).unwrap_or("command");
    let what = if what == "sh" { "script" } else { what };
    check(out, &node.describe(), what)
}

/// `sh -c SCRIPT sh ARGS...`: the form every fixed script is run in.
pub fn script_argv(script: &str, args: &[String]) -> Vec<String> {
    sh(script, args.iter().cloned())
}

#[cfg(test)]
mod write_script_tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    #[test]
    fn a_node_file_write_cut_short_leaves_the_old_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("etc/rancher/k3s/config.yaml");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, "node-name: k3s-1\n").unwrap();
        let new = b"node-name: k3s-1\nnode-ip: 10.0.0.11\n";
        let run = |sent: &[u8]| {
            let mut child = Command::new("sh")
                .args(["-c", SSH_WRITE_SCRIPT, "sh"])
                .arg(&dest)
                .args(["0600", &new.len().to_string(), &sha256_hex(new)])
                .stdin(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(sent).unwrap();
            child.wait().unwrap().code()
        };
        assert_eq!(run(&new[..7]), Some(74));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "node-name: k3s-1\n");
        assert_eq!(run(new), Some(0));
        assert_eq!(std::fs::read(&dest).unwrap(), new);
        assert_eq!(
            std::fs::read_dir(dest.parent().unwrap()).unwrap().count(),
            1,
            "a temporary file was left"
        );
    }
}
