//! The Proxmox host shell over SSH (russh): [`SshHostShell`] implements [`HostShell`].
//!
//! * One SSH connection per Proxmox node, opened on first use and shared by every command
//!   and file write (one session channel each, at most [`MAX_CHANNELS_PER_CONNECTION`] at
//!   once; callers beyond that wait for a free slot). Callers that arrive together wait for
//!   one connection rather than each opening their own, and share its error when it fails.
//! * A connection that dropped (closed by the server, keepalive failed, a channel open that
//!   finds it gone or gets no answer) is opened again. A command that could not be started
//!   on a kept connection is sent once more on a fresh one; a command that was started when
//!   the connection dropped is not (it may have taken effect): it fails, saying so.
//! * The server's host key must be in the node's known_hosts file, read as OpenSSH's `ssh`
//!   reads it with `StrictHostKeyChecking=yes` ([`crate::adapters::known_hosts`]): hashed
//!   names, `[host]:port`, wildcards and negation, several keys per host, `@revoked` and
//!   `@cert-authority`. A key listed `@revoked` is [`ShellError::HostKeyRevoked`]; a host
//!   listed only with other keys is [`ShellError::HostKeyMismatch`]; no entry is
//!   [`ShellError::UnknownHost`]. Unknown keys are never accepted or recorded. Host
//!   certificates are asked for (as `ssh` does) and accepted only through a
//!   `@cert-authority` line; otherwise their plain key is checked.
//! * Public-key authentication with the node's private key file (OpenSSH format).
//! * argv is quoted into one command line ([`command_line`]); values never become shell
//!   syntax. Compare-and-swap writes are one fixed remote script that takes the path and
//!   the expected SHA-1 as positional parameters.
//! * Key material, a passphrase, and command output are never logged or put in errors;
//!   logs name the node and the program (argv\[0\]) only.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Handle, Msg};
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::{Instant, timeout, timeout_at};

use crate::adapters::known_hosts::{KnownHosts, Presented, Verdict};
use crate::adapters::shell_quote::{command_line, has_nul};
use crate::ports::{CommandOutput, Held, HeldCommand, HostShell, ShellError, append_capped};
use crate::pve::conf::sha256_hex;

/// Where and how to reach the Proxmox host serving one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTarget {
    /// Normally `root`.
    pub user: String,
    /// Address or DNS name; also the name looked up in `known_hosts`.
    pub host: String,
    pub port: u16,
    /// OpenSSH known_hosts file holding the host's key (`host` or `[host]:port` entries,
    /// hashed entries work too).
    pub known_hosts: PathBuf,
    /// OpenSSH private key file (ed25519 recommended).
    pub key_file: PathBuf,
}

impl HostTarget {
    fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A passphrase that never shows up in `Debug` output.
#[derive(Clone)]
struct Passphrase(String);

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Session channels open at once on one connection. OpenSSH's sshd refuses session channels
/// beyond `MaxSessions` (default 10) on one connection. 8 stays below that with room to spare
/// for a channel the server has not released yet (a timed-out command's process keeps its
/// session until it exits). More concurrent commands wait for a free slot on the same
/// connection instead of opening a second one.
pub const MAX_CHANNELS_PER_CONNECTION: usize = 8;

struct Host {
    target: HostTarget,
    /// The kept connection. Locked while connecting, so callers that arrive together wait
    /// for one connection; not locked while channels are opened or commands run.
    conn: Mutex<Kept>,
    /// One permit per session channel in use on this host's connection.
    channels: Semaphore,
}

/// What a host's connection slot holds.
enum Kept {
    None,
    Open(Arc<Handle<Client>>),
    /// The last attempt to connect failed, and when it ended. Callers that were already
    /// waiting for that attempt get its error rather than each trying again: with a host
    /// that does not answer, eight waiting commands would otherwise pay the connect timeout
    /// eight times in a row. A caller that arrives later tries again.
    Failed {
        at: Instant,
        error: ShellError,
    },
}

/// Why a command could not be started. Either way nothing was sent to run.
enum NotStarted {
    /// The connection is gone or does not answer: another connection may work.
    Dropped(String),
    /// The server answered and would not open a session channel.
    Refused(String),
}

/// [`HostShell`] over SSH; see the module documentation.
pub struct SshHostShell {
    hosts: BTreeMap<String, Host>,
    passphrase: Option<Passphrase>,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl fmt::Debug for SshHostShell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshHostShell")
            .field(
                "hosts",
                &self.hosts.iter().map(|(n, h)| (n, &h.target)).collect::<Vec<_>>(),
            )
            .field("passphrase", &self.passphrase)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

/// Host certificate types offered to the server, most preferred first (plain keys follow).
const HOST_CERTIFICATE_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

/// Exit status of the compare-and-swap script when the file's SHA-1 is not the expected one.
const CHANGED_STATUS: u32 = 79;

/// Exit status of the compare-and-swap script when what arrived is not what was sent (the
/// connection dropped, the client was killed): the file is left as it was.
const INCOMPLETE_STATUS: u32 = 74;

/// Checks that stdin, saved in `$t`, is `$len` bytes with SHA-256 `$sum`, else exits 74
/// naming `$dest`: a write cut short (connection dropped, client killed) must never replace
/// a file with half of it. A macro so that `concat!` puts the one check into every write
/// script (this one, and the node scripts of `cluster::node_access`).
macro_rules! check_arrived {
    () => {
        r#"got=$(wc -c < "$t") || exit 71
got_sum=$(sha256sum < "$t") || exit 71
if [ "$got" -ne "$len" ] || [ "${got_sum%% *}" != "$sum" ]; then
  printf 'received %s of %s bytes: %s left as it was\n' "$got" "$len" "$dest" >&2; exit 74
fi
"#
    };
}
pub(crate) use check_arrived;

/// Replace `$1` with stdin only if the SHA-1 of `$1` is `$2` (an absent file counts as the
/// empty string), and only when what arrived is `$3` bytes with SHA-256 `$4`: a write cut
/// short never replaces the file (an empty or truncated container config is a guest lost).
/// Temporary file in the same directory, unique per process, mode copied, synced, then `mv`
/// (a rename). pmxcfs accepts this: its chmod allows the mode the file already has, and
/// rename within a directory is how Proxmox itself replaces files. A container's config is
/// edited under Proxmox's own config lock, as `pct set` takes it, when the host has one.
const WRITE_IF_UNCHANGED: &str = concat!(
    r#"dest=$1 want=$2 len=$3 sum=$4
case $dest in
  */lxc/*.conf) id=${dest##*/}; lock=/run/lock/lxc/pve-config-${id%.conf}.lock ;;
  *) lock= ;;
esac
if [ -n "$lock" ] && [ -d /run/lock/lxc ]; then
  exec 9>>"$lock" && flock -w 30 9 || { printf 'cannot take %s\n' "$lock" >&2; exit 75; }
fi
if [ -e "$dest" ]; then
  cur=$(sha1sum < "$dest") || exit 70
  cur=${cur%% *}
else
  cur=
fi
if [ "$cur" != "$want" ]; then
  printf 'sha1 of %s is %s\n' "$dest" "${cur:-absent}" >&2
  exit 79
fi
t=$dest.driftless.$$
trap 'rm -f -- "$t"' EXIT
trap 'exit 1' HUP INT TERM
cat > "$t" || exit 71
"#,
    check_arrived!(),
    r#"if [ -e "$dest" ]; then chmod --reference="$dest" -- "$t" || exit 72; fi
sync -- "$t" 2>/dev/null
mv -f -- "$t" "$dest" || exit 73
sync -- "${dest%/*}" 2>/dev/null
exit 0
"#
);

impl SshHostShell {
    /// One target per Proxmox node name. Nothing connects until the first command.
    pub fn new(hosts: BTreeMap<String, HostTarget>) -> SshHostShell {
        SshHostShell {
            hosts: hosts
                .into_iter()
                .map(|(node, target)| {
                    let host = Host {
                        target,
                        conn: Mutex::new(Kept::None),
                        channels: Semaphore::new(MAX_CHANNELS_PER_CONNECTION),
                    };
                    (node, host)
                })
                .collect(),
            passphrase: None,
            connect_timeout: Duration::from_secs(20),
            command_timeout: Duration::from_secs(600),
        }
    }

    /// Passphrase for encrypted private key files (all nodes). Never logged.
    pub fn with_key_passphrase(mut self, passphrase: impl Into<String>) -> SshHostShell {
        self.passphrase = Some(Passphrase(passphrase.into()));
        self
    }

    /// Limits: TCP connect + handshake + authentication, and one command from exec to exit.
    pub fn with_timeouts(mut self, connect: Duration, command: Duration) -> SshHostShell {
        self.connect_timeout = connect;
        self.command_timeout = command;
        self
    }

    /// The target configured for a Proxmox node.
    pub fn target(&self, pve_node: &str) -> Option<&HostTarget> {
        self.hosts.get(pve_node).map(|h| &h.target)
    }

    fn host(&self, pve_node: &str) -> Result<&Host, ShellError> {
        self.hosts
            .get(pve_node)
            .ok_or_else(|| ShellError::Other(format!("no SSH host is configured for Proxmox node {pve_node}")))
    }

    /// Connect, check the host key, authenticate.
    async fn connect(&self, target: &HostTarget) -> Result<Handle<Client>, ShellError> {
        let address = target.address();
        let connect_err = |message: String| ShellError::Connect {
            host: address.clone(),
            message,
        };
        let key = load_key(target, self.passphrase.as_ref()).map_err(&connect_err)?;
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            preferred: russh::Preferred {
                // Ask for host certificates as `ssh` does; one no `@cert-authority` line
                // vouches for falls back to its plain key (known_hosts.rs).
                host_key_certificates: HOST_CERTIFICATE_ALGORITHMS.into(),
                ..Default::default()
            },
            ..Default::default()
        });
        let handler = Client {
            host: target.host.clone(),
            port: target.port,
            address: address.clone(),
            known_hosts: target.known_hosts.clone(),
        };
        let work = async {
            let mut handle = client::connect(config, (target.host.as_str(), target.port), handler)
                .await
                .map_err(|e| match e {
                    ClientError::Refused(err) => err,
                    ClientError::Ssh(e) => connect_err(e.to_string()),
                })?;
            let hash_alg = if key.algorithm().is_rsa() {
                handle.best_supported_rsa_hash().await.ok().flatten().flatten()
            } else {
                None
            };
            let auth = handle
                .authenticate_publickey(target.user.clone(), PrivateKeyWithHashAlg::new(Arc::new(key), hash_alg))
                .await
                .map_err(|e| connect_err(format!("authentication did not complete: {e}")))?;
            if !auth.success() {
                return Err(ShellError::Auth { host: address.clone() });
            }
            Ok(handle)
        };
        let handle = timeout(self.connect_timeout, work)
            .await
            .map_err(|_| connect_err(format!("timed out after {:?}", self.connect_timeout)))??;
        tracing::debug!(host = %address, user = %target.user, "ssh connected");
        Ok(handle)
    }

    /// The node's kept connection, or a new one when there is none or it closed. Also
    /// says whether the connection was made by this call.
    async fn connection(&self, host: &Host) -> Result<(Arc<Handle<Client>>, bool), ShellError> {
        let arrived = Instant::now();
        let mut conn = host.conn.lock().await;
        match &*conn {
            Kept::Open(handle) if !handle.is_closed() => return Ok((handle.clone(), false)),
            Kept::Failed { at, error } if *at >= arrived => return Err(error.clone()),
            _ => {}
        }
        match self.connect(&host.target).await {
            Ok(handle) => {
                let handle = Arc::new(handle);
                *conn = Kept::Open(handle.clone());
                Ok((handle, true))
            }
            Err(error) => {
                *conn = Kept::Failed {
                    at: Instant::now(),
                    error: error.clone(),
                };
                Err(error)
            }
        }
    }

    /// Stop handing out a connection that failed, unless another caller already replaced it.
    async fn forget(&self, host: &Host, failed: &Arc<Handle<Client>>) {
        let mut conn = host.conn.lock().await;
        if matches!(&*conn, Kept::Open(current) if Arc::ptr_eq(current, failed)) {
            *conn = Kept::None;
        }
    }

    /// Open a session channel and ask the server to run `line` on it.
    async fn start(&self, handle: &Handle<Client>, line: &str, what: &str) -> Result<Channel<Msg>, NotStarted> {
        let channel = match timeout(self.connect_timeout, handle.channel_open_session()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                return Err(NotStarted::Refused(format!(
                    "the server refused a session channel ({reason:?}); driftless opens up to \
                     {MAX_CHANNELS_PER_CONNECTION} at once per host, check the server's MaxSessions"
                )));
            }
            Ok(Err(e)) => return Err(NotStarted::Dropped(format!("cannot open a session channel: {e}"))),
            Err(_) => {
                return Err(NotStarted::Dropped(format!(
                    "no answer to a session channel request within {:?}",
                    self.connect_timeout
                )));
            }
        };
        // Sending fails only when the connection is already gone: the request never left.
        channel
            .exec(true, line)
            .await
            .map_err(|e| NotStarted::Dropped(format!("cannot start `{what}`: {e}")))?;
        Ok(channel)
    }

    /// Run argv; `what` names the command in errors (defaults to the command line).
    async fn run_described(
        &self,
        pve_node: &str,
        argv: &[String],
        stdin: &[u8],
        what: Option<&str>,
    ) -> Result<CommandOutput, ShellError> {
        if argv.is_empty() {
            return Err(ShellError::Other("empty command".into()));
        }
        if has_nul(argv) {
            return Err(ShellError::Other(
                "an argument contains a NUL byte, which SSH cannot carry".into(),
            ));
        }
        let host = self.host(pve_node)?;
        let address = host.target.address();
        let line = command_line(argv);
        let what = what.map(str::to_string).unwrap_or_else(|| line.clone());
        // Held until the command is done, so the server never sees more channels than it allows.
        let _slot = host.channels.acquire().await.expect("the semaphore is never closed");
        tracing::debug!(node = pve_node, program = %argv[0], "ssh exec");
        let (channel, _) = self.start_on(host, &line, &what).await?;
        exec(channel, stdin, Instant::now() + self.command_timeout, &address, &what).await
    }

    /// Start `line` on the host's connection (made or made again as needed).
    async fn start_on(
        &self,
        host: &Host,
        line: &str,
        what: &str,
    ) -> Result<(Channel<Msg>, Arc<Handle<Client>>), ShellError> {
        let address = host.target.address();
        let mut retried = false;
        loop {
            let (handle, fresh) = self.connection(host).await?;
            match self.start(&handle, line, what).await {
                Ok(channel) => return Ok((channel, handle)),
                Err(NotStarted::Dropped(message)) => {
                    self.forget(host, &handle).await;
                    // A kept connection may have dropped since its last use: nothing ran, so
                    // the command goes once more on a fresh connection. A fresh one failing
                    // the same way is the answer.
                    if fresh || retried {
                        return Err(ShellError::Connect { host: address, message });
                    }
                    tracing::debug!(host = %address, %message, "ssh connection went away; reconnecting");
                    retried = true;
                }
                Err(NotStarted::Refused(message)) => return Err(ShellError::Connect { host: address, message }),
            }
        }
    }
}

/// Wait for the first line a held command prints, or for its end.
async fn first_line(
    read: &mut russh::ChannelReadHalf,
    within: Duration,
    address: &str,
    what: &str,
) -> Result<Result<String, CommandOutput>, ShellError> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut status = None;
    let waited = timeout(within, async {
        loop {
            match read.wait().await {
                None | Some(ChannelMsg::Close) => break,
                Some(ChannelMsg::Data { data }) => {
                    if !append_capped(&mut stdout, &data) {
                        break;
                    }
                    if let Some(end) = stdout.iter().position(|b| *b == b'\n') {
                        return Some(String::from_utf8_lossy(&stdout[..end]).into_owned());
                    }
                }
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    let _ = append_capped(&mut stderr, &data);
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                Some(_) => {}
            }
        }
        None
    })
    .await;
    match waited {
        Err(_) => Err(ShellError::Other(format!(
            "`{what}` on {address} printed nothing within {} s",
            within.as_secs()
        ))),
        Ok(Some(line)) => Ok(Ok(line)),
        Ok(None) => match status {
            Some(status) => Ok(Err(CommandOutput { status, stdout, stderr })),
            None => Err(ShellError::Connect {
                host: address.to_string(),
                message: format!("the connection dropped while `{what}` was starting"),
            }),
        },
    }
}

/// Finish one command whose exec request was sent: feed stdin then EOF while collecting
/// stdout/stderr, until the server closes the channel.
async fn exec(
    channel: Channel<Msg>,
    stdin: &[u8],
    deadline: Instant,
    address: &str,
    what: &str,
) -> Result<CommandOutput, ShellError> {
    let lost = |message: String| ShellError::Connect {
        host: address.to_string(),
        message,
    };
    let too_much = || ShellError::TooMuchOutput {
        host: address.to_string(),
        command: what.to_string(),
    };
    let (mut read, write) = channel.split();

    let writer = async {
        write.data(stdin).await?;
        write.eof().await
    };
    tokio::pin!(writer);
    let mut writer_done = false;
    let mut write_error = None;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut status = None;
    let mut signal = None;
    let collected = timeout_at(deadline, async {
        loop {
            tokio::select! {
                r = &mut writer, if !writer_done => {
                    writer_done = true;
                    write_error = r.err();
                }
                msg = read.wait() => match msg {
                    None | Some(ChannelMsg::Close) => break Ok(()),
                    Some(ChannelMsg::Data { data }) => if !append_capped(&mut stdout, &data) {
                        break Err(too_much());
                    },
                    Some(ChannelMsg::ExtendedData { data, ext: 1 }) => if !append_capped(&mut stderr, &data) {
                        break Err(too_much());
                    },
                    Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                    Some(ChannelMsg::ExitSignal { signal_name, .. }) => signal = Some(format!("{signal_name:?}")),
                    Some(ChannelMsg::Failure) => break Err(ShellError::Other(format!(
                        "{address} refused to run `{what}`"
                    ))),
                    Some(_) => {}
                },
            }
        }
    })
    .await;
    match collected {
        Err(_) => {
            let _ = write.close().await;
            return Err(ShellError::Other(format!("`{what}` on {address} timed out")));
        }
        Ok(Err(e)) => {
            // Closing the channel stops the remote command instead of letting it stream on.
            let _ = write.close().await;
            return Err(e);
        }
        Ok(Ok(())) => {}
    }
    match (status, signal) {
        (Some(status), _) => Ok(CommandOutput { status, stdout, stderr }),
        (None, Some(signal)) => Err(ShellError::Other(format!(
            "`{what}` on {address} was killed by signal {signal}"
        ))),
        // The command was started: it may have taken effect, so it is not sent again.
        (None, None) => Err(lost(match write_error {
            Some(e) => format!(
                "the connection dropped while sending input to `{what}` (it may have taken effect; not run again): {e}"
            ),
            None => {
                format!("the connection dropped while `{what}` was running (it may have taken effect; not run again)")
            }
        })),
    }
}

fn load_key(target: &HostTarget, passphrase: Option<&Passphrase>) -> Result<russh::keys::PrivateKey, String> {
    let path = target.key_file.display();
    russh::keys::load_secret_key(&target.key_file, passphrase.map(|p| p.0.as_str())).map_err(|e| {
        // Only the kind of problem: never the key's bytes or the passphrase.
        let why = match e {
            russh::keys::Error::IO(io) => format!("cannot read it: {}", io.kind()),
            russh::keys::Error::KeyIsEncrypted => "it is encrypted and no passphrase was given".to_string(),
            _ if passphrase.is_some() => {
                "it is not a usable OpenSSH private key or the passphrase is wrong".to_string()
            }
            _ => "it is not a usable OpenSSH private key".to_string(),
        };
        format!("private key {path}: {why}")
    })
}

/// The russh event handler: checks the host key against known_hosts.
struct Client {
    host: String,
    port: u16,
    address: String,
    known_hosts: PathBuf,
}

#[derive(Debug)]
enum ClientError {
    Ssh(russh::Error),
    /// The host key check said no; carries the precise reason.
    Refused(ShellError),
}

impl From<russh::Error> for ClientError {
    fn from(e: russh::Error) -> Self {
        ClientError::Ssh(e)
    }
}

impl client::Handler for Client {
    type Error = ClientError;

    async fn check_server_key(&mut self, server_key: &PublicKeyOrCertificate) -> Result<bool, ClientError> {
        let path = self.known_hosts.display().to_string();
        let known = KnownHosts::read(&self.known_hosts).map_err(|e| {
            ClientError::Refused(ShellError::Connect {
                host: self.address.clone(),
                message: format!("cannot check the host key: {e}"),
            })
        })?;
        let presented = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => Presented::Key(key),
            PublicKeyOrCertificate::Certificate(cert) => Presented::Certificate(cert),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match known.verify(&self.host, self.port, presented, now) {
            Verdict::Accepted { line } => {
                tracing::debug!(host = %self.address, known_hosts = %path, line, "ssh host key accepted");
                Ok(true)
            }
            Verdict::Unknown => Err(ClientError::Refused(ShellError::UnknownHost {
                host: self.address.clone(),
                known_hosts: path,
            })),
            Verdict::Changed { line } => {
                tracing::warn!(host = %self.address, known_hosts = %path, line,
                    "ssh host key does not match known_hosts");
                Err(ClientError::Refused(ShellError::HostKeyMismatch {
                    host: self.address.clone(),
                }))
            }
            Verdict::Revoked { line } => {
                tracing::warn!(host = %self.address, known_hosts = %path, line,
                    "ssh host key is marked @revoked in known_hosts");
                Err(ClientError::Refused(ShellError::HostKeyRevoked {
                    host: self.address.clone(),
                    known_hosts: path,
                    line,
                }))
            }
        }
    }
}

impl HostShell for SshHostShell {
    async fn run(&self, pve_node: &str, argv: &[String], stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        self.run_described(pve_node, argv, stdin, None).await
    }

    async fn read_file(&self, pve_node: &str, path: &str) -> Result<Vec<u8>, ShellError> {
        let argv = ["cat".to_string(), "--".to_string(), path.to_string()];
        let out = self.run_described(pve_node, &argv, &[], None).await?;
        if out.status != 0 {
            return Err(ShellError::Command {
                host: self.host(pve_node)?.target.address(),
                command: command_line(&argv),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
            });
        }
        Ok(out.stdout)
    }

    async fn write_file_if_unchanged(
        &self,
        pve_node: &str,
        path: &str,
        contents: &[u8],
        expected_sha1: &str,
    ) -> Result<(), ShellError> {
        let (len, sha256) = (contents.len().to_string(), sha256_hex(contents));
        let argv: Vec<String> = ["sh", "-c", WRITE_IF_UNCHANGED, "sh", path, expected_sha1, &len, &sha256]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let what = format!("replace {path} if unchanged");
        let out = self.run_described(pve_node, &argv, contents, Some(&what)).await?;
        let host = self.host(pve_node)?.target.address();
        match out.status {
            0 => {
                tracing::debug!(node = pve_node, path, "replaced file");
                Ok(())
            }
            CHANGED_STATUS => Err(ShellError::Changed {
                host,
                path: path.to_string(),
            }),
            INCOMPLETE_STATUS => Err(ShellError::Connect {
                host,
                message: format!("{path} did not arrive whole and was left as it was"),
            }),
            status => Err(ShellError::Command {
                host,
                command: what,
                status,
                stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
            }),
        }
    }

    /// A channel of its own on the host's one connection, outside the slots commands share
    /// (sshd's default MaxSessions of 10 leaves room for it). The remote command ends when
    /// the channel closes: when the returned guard is dropped, or the connection dies with
    /// driftless.
    async fn hold(&self, pve_node: &str, argv: &[String], within: Duration) -> Result<Held, ShellError> {
        if argv.is_empty() || has_nul(argv) {
            return Err(ShellError::Other("an empty command, or one with a NUL byte".into()));
        }
        let host = self.host(pve_node)?;
        let address = host.target.address();
        let line = command_line(argv);
        let what = argv[0].clone();
        let (channel, handle) = self.start_on(host, &line, &what).await?;
        let (mut read, write) = channel.split();
        match first_line(&mut read, within, &address, &what).await {
            Err(e) => {
                let _ = write.close().await;
                Err(e)
            }
            Ok(Err(output)) => Ok(Held::Exited(output)),
            Ok(Ok(first_line)) => {
                let (release, released) = tokio::sync::oneshot::channel::<()>();
                let node = pve_node.to_string();
                tokio::spawn(async move {
                    let _connection = handle;
                    tokio::select! {
                        _ = released => {
                            let _ = write.eof().await;
                            let _ = write.close().await;
                        }
                        _ = async { while !matches!(read.wait().await, None | Some(ChannelMsg::Close)) {} } => {
                            tracing::warn!(node = %node, program = %what, "a held command on the Proxmox host ended with its channel");
                        }
                    }
                });
                Ok(Held::Running {
                    first_line,
                    command: HeldCommand::new(release),
                })
            }
        }
    }
}

#[cfg(test)]
mod write_tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// The compare-and-swap script as the host runs it, fed `sent` while told to expect `full`.
    fn run_script(path: &std::path::Path, current_sha1: &str, full: &[u8], sent: &[u8]) -> i32 {
        let mut child = Command::new("sh")
            .args(["-c", WRITE_IF_UNCHANGED, "sh"])
            .arg(path)
            .args([current_sha1, &full.len().to_string(), &sha256_hex(full)])
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(sent).unwrap();
        child.wait().unwrap().code().unwrap_or(-1)
    }

    fn sha1(bytes: &[u8]) -> String {
        crate::pve::conf::digest_bytes(bytes)
    }

    #[test]
    fn a_write_cut_short_leaves_the_config_as_it_was_and_a_whole_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("100.conf");
        let old = b"arch: amd64\ncores: 2\nhostname: k3s-1\n".to_vec();
        std::fs::write(&conf, &old).unwrap();
        let new = b"arch: amd64\ncores: 4\nhostname: k3s-1\nlxc.apparmor.profile: unconfined\n".to_vec();

        // The connection dropped after the command started: nothing, then half, arrived.
        for sent in [&new[..0], &new[..new.len() / 2]] {
            assert_eq!(run_script(&conf, &sha1(&old), &new, sent), INCOMPLETE_STATUS as i32);
            assert_eq!(std::fs::read(&conf).unwrap(), old, "the config was touched");
        }
        // Same length, other bytes: refused too.
        let mut garbled = new.clone();
        garbled[5] ^= 1;
        assert_eq!(run_script(&conf, &sha1(&old), &new, &garbled), INCOMPLETE_STATUS as i32);
        assert_eq!(std::fs::read(&conf).unwrap(), old);

        assert_eq!(run_script(&conf, &sha1(&old), &new, &new), 0);
        assert_eq!(std::fs::read(&conf).unwrap(), new);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary file left behind: {left:?}");
    }
}
