//! A real OpenSSH server for tests: `/usr/sbin/sshd -D -e -f CONFIG` on 127.0.0.1, on a free
//! port, as the current user, with a fresh ed25519 host key and client key (ssh-keygen) in a
//! temporary directory, a known_hosts file for it, and password authentication off.
//! Killed when dropped.
//!
//! Use it from an integration test with
//! ```ignore
//! let Some(server) = testkit::sshd::Sshd::start() else { return }; // sshd not installed
//! ```
//! `start` returns `None` (and says why) only when sshd is not installed; any other
//! problem is a test failure. CI installs `openssh-server` (see `.ci/run`).
//!
//! The login runs with `UsePAM no`, so the account must not be locked (`!` in /etc/shadow);
//! root in the usual container images has `*`, which is fine.

use crate::free_port;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian (and most distributions) install the server.
pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    child: Child,
    /// Holds every file below; removed on drop.
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The user the server runs as and accepts (the current user).
    pub user: String,
    /// The client's private key (OpenSSH format, no passphrase) and its `.pub` next to it.
    pub client_key: PathBuf,
    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA...`
    pub known_hosts: PathBuf,
    /// The server's host public key as `ssh-ed25519 AAAA...` (no comment).
    pub host_public_key: String,
    /// sshd's own log (its stderr).
    pub log_file: PathBuf,
}

/// `ssh-keygen -t ed25519` without passphrase: writes `path` and `path.pub`.
pub fn ssh_keygen(path: &Path, comment: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (package openssh-client) must be installed");
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ssh-ed25519 AAAA...` from a `.pub` file (the comment dropped).
fn public_key(pub_file: &Path) -> String {
    let text = fs::read_to_string(pub_file).expect("read public key");
    text.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    assert!(out.status.success(), "id -un failed");
    String::from_utf8(out.stdout).expect("user name").trim().to_string()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Sshd {
    /// Start a server; `None` only when sshd is not installed.
    pub fn start() -> Option<Sshd> {
        Sshd::start_with("")
    }

    /// With extra sshd_config lines (e.g. `SetEnv PATH=...` for a test's own commands).
    pub fn start_with(extra_config: &str) -> Option<Sshd> {
        if !Path::new(SSHD).exists() {
            eprintln!("skipping: {SSHD} is not installed (apt-get install openssh-server)");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("driftless-sshd-")
            .tempdir()
            .expect("temporary directory");
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).expect("chmod tempdir");
        let host_key = root.join("ssh_host_ed25519_key");
        let client_key = root.join("id_ed25519");
        ssh_keygen(&host_key, "driftless-test-host");
        ssh_keygen(&client_key, "driftless-test-client");
        let host_public_key = public_key(&host_key.with_extension("pub"));
        let authorized_keys = root.join("authorized_keys");
        fs::write(
            &authorized_keys,
            format!("{}\n", public_key(&client_key.with_extension("pub"))),
        )
        .unwrap();
        fs::set_permissions(&authorized_keys, fs::Permissions::from_mode(0o600)).unwrap();
        // The privilege separation directory sshd insists on (Debian's unit creates it).
        if is_root() {
            fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        } else {
            let _ = fs::create_dir_all("/run/sshd");
        }
        let user = current_user();
        let log_file = root.join("sshd.log");

        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let config = root.join("sshd_config");
            fs::write(
                &config,
                format!(
                    "\
Port {port}
ListenAddress 127.0.0.1
AddressFamily inet
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PermitUserEnvironment no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PrintMotd no
MaxStartups 100
MaxSessions 100
LogLevel VERBOSE
{extra_config}
",
                    host_key = host_key.display(),
                    authorized_keys = authorized_keys.display(),
                ),
            )
            .unwrap();
            let log = fs::File::create(&log_file).expect("create sshd log");
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn sshd");
            let deadline = Instant::now() + Duration::from_secs(10);
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            loop {
                if let Some(status) = child.try_wait().expect("wait for sshd") {
                    last_log = fs::read_to_string(&log_file).unwrap_or_default();
                    eprintln!("sshd exited ({status}) on port {port}, retrying: {last_log}");
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    let known_hosts = root.join("known_hosts");
                    let mut f = fs::File::create(&known_hosts).unwrap();
                    writeln!(f, "[127.0.0.1]:{port} {host_public_key}").unwrap();
                    return Some(Sshd {
                        child,
                        dir,
                        port,
                        user,
                        client_key,
                        known_hosts,
                        host_public_key,
                        log_file,
                    });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "sshd did not accept connections on {addr} within 10s: {}",
                        fs::read_to_string(&log_file).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("sshd would not start: {last_log}");
    }

    /// A known_hosts line for this server with another key (a freshly generated one): the
    /// "host key changed" case.
    pub fn known_hosts_with_wrong_key(&self) -> PathBuf {
        let other = self.dir.path().join("other_host_key");
        if !other.exists() {
            ssh_keygen(&other, "driftless-test-other");
        }
        let path = self.dir.path().join("known_hosts.wrong");
        fs::write(
            &path,
            format!(
                "[127.0.0.1]:{} {}\n",
                self.port,
                public_key(&other.with_extension("pub"))
            ),
        )
        .unwrap();
        path
    }

    /// A known_hosts file that lists only some other host: the "unknown host" case.
    pub fn known_hosts_without_this_host(&self) -> PathBuf {
        let path = self.dir.path().join("known_hosts.other");
        fs::write(
            &path,
            format!("[127.0.0.1]:{} {}\n", self.port.wrapping_add(1), self.host_public_key),
        )
        .unwrap();
        path
    }

    /// What sshd logged so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
