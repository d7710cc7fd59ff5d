//! driftless's known_hosts check (src/adapters/known_hosts.rs) against OpenSSH itself: for each
//! known_hosts variant, the real `ssh -o StrictHostKeyChecking=yes` against a real sshd on
//! loopback, driftless's `SshHostShell` against the same server with the same file, and the
//! expected verdict written in the table must all agree; the lines `ssh-keygen -l -F` finds
//! for the name must be the lines driftless matches. Skipped only when sshd is not installed.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use driftless::adapters::known_hosts::{KnownHosts, Presented, Verdict, host_port};
use driftless::adapters::ssh::{HostTarget, SshHostShell};
use driftless::ports::{HostShell, ShellError};
use russh::keys::{Certificate, PublicKey};
use testkit::sshd::{self, Sshd};

/// What a client decided about the server's host key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Accept,
    Unknown,
    Changed,
    Revoked,
}
use Decision::*;

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Which server a case connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Server {
    /// The plain server: host key K, no certificate.
    Plain,
    /// Host key K with a host certificate from CA C for principal 127.0.0.1.
    CertGood,
    /// ...from CA C for principal pve1.lan only.
    CertOtherPrincipal,
    /// ...from CA C for 127.0.0.1, expired in 2020.
    CertExpired,
}

struct Case {
    name: &'static str,
    server: Server,
    /// The name given to ssh and to driftless: `127.0.0.1` or `localhost`.
    host: &'static str,
    /// The file, with `{P}` the server's port, `{Q}` another port, `{K}` the server's host
    /// key, `{O}` another ed25519 key, `{E}` an ECDSA key, `{C}` the CA that signed the
    /// certificates, `{X}` another CA.
    file: &'static str,
    /// Hash the file with `ssh-keygen -H` first.
    hashed: bool,
    expect: Decision,
}

const fn case(name: &'static str, file: &'static str, expect: Decision) -> Case {
    Case {
        name,
        server: Server::Plain,
        host: "127.0.0.1",
        file,
        hashed: false,
        expect,
    }
}

const fn hashed(name: &'static str, file: &'static str, expect: Decision) -> Case {
    Case {
        hashed: true,
        ..case(name, file, expect)
    }
}

const fn on(server: Server, name: &'static str, file: &'static str, expect: Decision) -> Case {
    Case {
        server,
        ..case(name, file, expect)
    }
}

const fn as_localhost(name: &'static str, file: &'static str, expect: Decision) -> Case {
    Case {
        host: "localhost",
        ..case(name, file, expect)
    }
}

const CASES: &[Case] = &[
    case("exact [host]:port entry", "[127.0.0.1]:{P} {K}\n", Accept),
    case("entry for another port", "[127.0.0.1]:{Q} {K}\n", Unknown),
    case("other key for [host]:port", "[127.0.0.1]:{P} {O}\n", Changed),
    case("empty file", "", Unknown),
    // Fault-matrix bug 1: a revoked key is refused even when a plain line lists it after.
    case(
        "@revoked line, then a plain line for the same key",
        "@revoked [127.0.0.1]:{P} {K}\n[127.0.0.1]:{P} {K}\n",
        Revoked,
    ),
    case(
        "plain line, then @revoked for the same key",
        "[127.0.0.1]:{P} {K}\n@revoked [127.0.0.1]:{P} {K}\n",
        Revoked,
    ),
    case("@revoked alone", "@revoked [127.0.0.1]:{P} {K}\n", Revoked),
    case(
        "@revoked through a wildcard",
        "[127.0.0.1]:{P} {K}\n@revoked * {K}\n",
        Revoked,
    ),
    case(
        "@revoked for another host only",
        "@revoked [127.0.0.1]:{Q} {K}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    case(
        "@revoked other key, plain line for this key",
        "@revoked [127.0.0.1]:{P} {O}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    case(
        "@revoked separated by a tab (OpenSSH: invalid marker, line skipped)",
        "@revoked\t[127.0.0.1]:{P} {K}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    case(
        "misspelt marker @revoke (line skipped)",
        "@revoke [127.0.0.1]:{P} {K}\n",
        Unknown,
    ),
    // Fault-matrix bug 2: a rotated key (old line, then new line) is accepted.
    case(
        "rotated key: old line then new line",
        "[127.0.0.1]:{P} {O}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    case(
        "rotated key: new line then old line",
        "[127.0.0.1]:{P} {K}\n[127.0.0.1]:{P} {O}\n",
        Accept,
    ),
    case(
        "several keys of several types",
        "[127.0.0.1]:{P} {E}\n[127.0.0.1]:{P} {O}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    case("only a key of another type", "[127.0.0.1]:{P} {E}\n", Changed),
    case("two other keys", "[127.0.0.1]:{P} {O}\n[127.0.0.1]:{P} {E}\n", Changed),
    // Port-less entries: `ssh` retries the plain name when nothing is listed for [host]:port.
    case("port-less entry, non-22 port", "127.0.0.1 {K}\n", Accept),
    case("port-less entry with another key", "127.0.0.1 {O}\n", Unknown),
    case("port-less @revoked", "@revoked 127.0.0.1 {K}\n", Revoked),
    case(
        "[host]:port with another key beats a port-less match",
        "[127.0.0.1]:{P} {O}\n127.0.0.1 {K}\n",
        Changed,
    ),
    case("[host]:22 is not the port-less name", "[127.0.0.1]:22 {K}\n", Unknown),
    // Patterns.
    case("wildcard *", "* {K}\n", Accept),
    case("wildcard with port", "[127.0.0.*]:* {K}\n", Accept),
    case("wildcard ?", "[127.0.0.?]:{P} {K}\n", Accept),
    case("wildcard that does not match", "[10.*]:* {K}\n", Unknown),
    case("pattern list", "pve1,[127.0.0.1]:{P},pve2 {K}\n", Accept),
    case("negation of this host", "[127.0.0.*]:*,![127.0.0.1]:{P} {K}\n", Unknown),
    // The negation excludes the line for [127.0.0.1]:PORT, so nothing is listed there and
    // `ssh` retries the port-less name, which `*` matches.
    case(
        "negated [host]:*, then *: the port-less retry matches",
        "![127.0.0.1]:*,* {K}\n",
        Accept,
    ),
    case(
        "negated [host]:* and host, then *",
        "![127.0.0.1]:*,!127.0.0.1,* {K}\n",
        Unknown,
    ),
    case("negation of another host", "!pve9,[127.0.0.1]:{P} {K}\n", Accept),
    case(
        "negated line with another key is not a change",
        "*,![127.0.0.1]:* {O}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    case("upper-case pattern", "[127.0.0.1]:{P},PVE1 {K}\n", Accept),
    // Hashed names (`ssh-keygen -H`).
    hashed("hashed [host]:port", "[127.0.0.1]:{P} {K}\n", Accept),
    hashed("hashed, another port", "[127.0.0.1]:{Q} {K}\n", Unknown),
    hashed("hashed port-less name", "127.0.0.1 {K}\n", Accept),
    hashed("hashed, other key", "[127.0.0.1]:{P} {O}\n", Changed),
    hashed(
        "hashed rotated key",
        "[127.0.0.1]:{P} {O}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    hashed(
        "hashed, with a plain @revoked",
        "[127.0.0.1]:{P} {K}\n@revoked [127.0.0.1]:{P} {K}\n",
        Revoked,
    ),
    // Comments and malformed lines are skipped.
    case(
        "comments, blank and malformed lines before the entry",
        "# comment\n\n   \n[127.0.0.1]:{P}\n[127.0.0.1]:{P} ssh-ed25519\n\
         [127.0.0.1]:{P} ssh-ed25519 AAAA\n[127.0.0.1]:{P} ssh-foo AAAAC3NzaC1lZDI1NTE5\n\
         |1|bad|hash {O}\n@bogus [127.0.0.1]:{P} {O}\n  [127.0.0.1]:{P}\t{K} trailing comment\n",
        Accept,
    ),
    case(
        "only malformed lines",
        "[127.0.0.1]:{P} ssh-ed25519 AAAA\n[127.0.0.1]:{P} # {K}\n",
        Unknown,
    ),
    case("CRLF line endings", "[127.0.0.1]:{P} {K}\r\n", Accept),
    case(
        "a key named with the wrong type",
        "[127.0.0.1]:{P} ecdsa-sha2-nistp256 {K_BODY}\n",
        Unknown,
    ),
    case(
        "@cert-authority with the host's own key does not vouch for a plain key",
        "@cert-authority [127.0.0.1]:{P} {K}\n",
        Unknown,
    ),
    // localhost is not 127.0.0.1.
    case(
        "entry for localhost, connecting to 127.0.0.1",
        "[localhost]:{P} {K}\n",
        Unknown,
    ),
    as_localhost(
        "entry for localhost, connecting to localhost",
        "[localhost]:{P} {K}\n",
        Accept,
    ),
    as_localhost(
        "entry for 127.0.0.1, connecting to localhost",
        "[127.0.0.1]:{P} {K}\n",
        Unknown,
    ),
    // Host certificates.
    on(
        Server::CertGood,
        "certificate from a listed CA",
        "@cert-authority [127.0.0.1]:* {C}\n",
        Accept,
    ),
    on(
        Server::CertGood,
        "certificate, port-less CA line",
        "@cert-authority 127.0.0.1 {C}\n",
        Accept,
    ),
    on(
        Server::CertGood,
        "certificate from another CA",
        "@cert-authority * {X}\n",
        Unknown,
    ),
    on(
        Server::CertGood,
        "certificate from another CA, plain key listed",
        "@cert-authority * {X}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    on(
        Server::CertGood,
        "certificate, CA listed for another host",
        "@cert-authority [localhost]:* {C}\n",
        Unknown,
    ),
    on(
        Server::CertGood,
        "certificate, revoked CA",
        "@cert-authority * {C}\n@revoked * {C}\n[127.0.0.1]:{P} {K}\n",
        Revoked,
    ),
    on(
        Server::CertGood,
        "certificate, revoked host key",
        "@cert-authority * {C}\n@revoked [127.0.0.1]:{P} {K}\n",
        Revoked,
    ),
    on(
        Server::CertGood,
        "certificate, CA key listed as a plain key only",
        "[127.0.0.1]:{P} {C}\n",
        Changed,
    ),
    on(
        Server::CertOtherPrincipal,
        "certificate for another principal",
        "@cert-authority * {C}\n",
        Unknown,
    ),
    on(
        Server::CertOtherPrincipal,
        "certificate for another principal, plain key listed",
        "@cert-authority * {C}\n[127.0.0.1]:{P} {K}\n",
        Accept,
    ),
    on(
        Server::CertExpired,
        "expired certificate",
        "@cert-authority * {C}\n",
        Unknown,
    ),
];

/// A second sshd with the same host key and a host certificate (the first one's config with
/// another port and a `HostCertificate`). Killed when dropped.
struct CertServer {
    child: Child,
    port: u16,
    certificate: Certificate,
}

impl Drop for CertServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn start_cert_server(server: &Sshd, ca: &Path, name: &str, principal: &str, validity: &str) -> CertServer {
    let dir = server.dir.path();
    let host_pub = dir.join("ssh_host_ed25519_key.pub");
    let copy = dir.join(format!("{name}.pub"));
    fs::copy(&host_pub, &copy).unwrap();
    run(Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-I", name, "-h", "-n", principal, "-V", validity])
        .arg(&copy));
    let cert_file = dir.join(format!("{name}-cert.pub"));
    let certificate = Certificate::read_file(&cert_file).expect("read the host certificate");
    let config = fs::read_to_string(dir.join("sshd_config")).unwrap();
    let mut last_log = String::new();
    for _attempt in 0..5 {
        let port = testkit::free_port();
        let text: String = config
            .lines()
            .map(|l| {
                if l.starts_with("Port ") {
                    format!("Port {port}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect::<String>()
            + &format!("HostCertificate {}\n", cert_file.display());
        let config_file = dir.join(format!("sshd_config.{name}"));
        fs::write(&config_file, text).unwrap();
        let log_file = dir.join(format!("sshd.{name}.log"));
        let child = Command::new(sshd::SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_file).unwrap())
            .spawn()
            .expect("spawn sshd");
        let mut started = CertServer {
            child,
            port,
            certificate: certificate.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            if started.child.try_wait().unwrap().is_some() {
                last_log = fs::read_to_string(&log_file).unwrap_or_default();
                break;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return started;
            }
            assert!(
                Instant::now() < deadline,
                "sshd with a certificate did not start: {}",
                fs::read_to_string(&log_file).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(started);
    }
    panic!("sshd with a certificate would not start: {last_log}");
}

/// `ssh-ed25519 AAAA...` of a `.pub` file.
fn public_line(pub_file: &Path) -> String {
    let text = fs::read_to_string(pub_file).unwrap();
    text.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

fn new_key_line(dir: &Path, name: &str, kind: &str) -> String {
    let path = dir.join(name);
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "", "-f"])
        .arg(&path));
    public_line(&path.with_extension("pub"))
}

/// What the real `ssh` decides: its exit status, and its messages for a refusal.
fn openssh_decision(host: &str, port: u16, file: &Path, server: &Sshd) -> Result<Decision, String> {
    let out = Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", file.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "UpdateHostKeys=no",
            "-o",
            "CheckHostIP=no",
            "-o",
            "ConnectTimeout=10",
            "-i",
        ])
        .arg(&server.client_key)
        .arg("-p")
        .arg(port.to_string())
        .arg(format!("{}@{host}", server.user))
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .expect("run ssh (package openssh-client)");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.success() {
        Ok(Accept)
    } else if stderr.contains("REVOKED HOST KEY DETECTED") {
        Ok(Revoked)
    } else if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        Ok(Changed)
    } else if stderr.contains("host key is known for") {
        Ok(Unknown)
    } else {
        Err(format!("ssh exited with {} for another reason: {stderr}", out.status))
    }
}

fn shell(host: &str, port: u16, file: &Path, server: &Sshd) -> SshHostShell {
    let target = HostTarget {
        user: server.user.clone(),
        host: host.to_string(),
        port,
        known_hosts: file.to_path_buf(),
        key_file: server.client_key.clone(),
    };
    SshHostShell::new(BTreeMap::from([("pve1".to_string(), target)]))
        .with_timeouts(Duration::from_secs(10), Duration::from_secs(30))
}

/// What driftless's `SshHostShell` decides with the same file.
async fn driftless_decision(host: &str, port: u16, file: &Path, server: &Sshd) -> Result<Decision, String> {
    match shell(host, port, file, server)
        .run("pve1", &["true".to_string()], &[])
        .await
    {
        Ok(out) if out.status == 0 => Ok(Accept),
        Err(ShellError::UnknownHost { .. }) => Ok(Unknown),
        Err(ShellError::HostKeyMismatch { .. }) => Ok(Changed),
        Err(ShellError::HostKeyRevoked { .. }) => Ok(Revoked),
        other => Err(format!("SshHostShell: {other:?}")),
    }
}

fn library_decision(verdict: &Verdict) -> Decision {
    match verdict {
        Verdict::Accepted { .. } => Accept,
        Verdict::Unknown => Unknown,
        Verdict::Changed { .. } => Changed,
        Verdict::Revoked { .. } => Revoked,
    }
}

/// The lines `ssh-keygen -l -F name -f file` lists.
fn keygen_lines(name: &str, file: &Path) -> Vec<usize> {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-F", name, "-f"])
        .arg(file)
        .output()
        .expect("run ssh-keygen");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" found: line ").map(|(_, rest)| rest))
        .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn known_hosts_verdicts_match_openssh() {
    let Some(server) = Sshd::start() else { return };
    let dir = server.dir.path();
    let ca = dir.join("host_ca");
    sshd::ssh_keygen(&ca, "driftless-test-ca");
    let cert_servers = [
        (
            Server::CertGood,
            start_cert_server(&server, &ca, "cert_good", "127.0.0.1", "always:forever"),
        ),
        (
            Server::CertOtherPrincipal,
            start_cert_server(&server, &ca, "cert_principal", "pve1.lan", "always:forever"),
        ),
        (
            Server::CertExpired,
            start_cert_server(&server, &ca, "cert_expired", "127.0.0.1", "20200101:20200102"),
        ),
    ];
    let host_key = PublicKey::from_openssh(&server.host_public_key).unwrap();
    let k_body = server.host_public_key.split(' ').nth(1).unwrap().to_string();
    let other = new_key_line(dir, "other_ed25519", "ed25519");
    let ecdsa = new_key_line(dir, "other_ecdsa", "ecdsa");
    let other_ca = new_key_line(dir, "other_ca", "ed25519");
    let ca_line = public_line(&ca.with_extension("pub"));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();

    let mut failures = Vec::new();
    let mut table = String::new();
    for (i, case) in CASES.iter().enumerate() {
        let (port, presented) = match case.server {
            Server::Plain => (server.port, Presented::Key(&host_key)),
            which => {
                let (_, s) = cert_servers.iter().find(|(w, _)| *w == which).unwrap();
                (s.port, Presented::Certificate(&s.certificate))
            }
        };
        let text = case
            .file
            .replace("{K_BODY}", &k_body)
            .replace("{P}", &port.to_string())
            .replace("{Q}", &port.wrapping_add(1).to_string())
            .replace("{K}", &server.host_public_key)
            .replace("{O}", &other)
            .replace("{E}", &ecdsa)
            .replace("{C}", &ca_line)
            .replace("{X}", &other_ca);
        let file = dir.join(format!("known_hosts.case{i}"));
        fs::write(&file, &text).unwrap();
        if case.hashed {
            run(Command::new("ssh-keygen").arg("-q").arg("-H").arg("-f").arg(&file));
            let hashed = fs::read_to_string(&file).unwrap();
            assert!(
                hashed.contains("|1|"),
                "{}: ssh-keygen -H hashed nothing: {hashed}",
                case.name
            );
        }
        let contents = fs::read_to_string(&file).unwrap();

        let openssh = openssh_decision(case.host, port, &file, &server);
        let driftless = driftless_decision(case.host, port, &file, &server).await;
        let known = KnownHosts::read(&file).unwrap();
        let verdict = known.verify(case.host, port, presented, now);
        let name = host_port(case.host, port);
        let (keygen, ours) = (keygen_lines(&name, &file), known.matching_lines(&name));

        table.push_str(&format!(
            "{:<70} expected {:<8} ssh {:<8} driftless {:<8} ({verdict:?})\n",
            case.name,
            case.expect.to_string(),
            openssh.as_ref().map_or("error".to_string(), |d| d.to_string()),
            driftless.as_ref().map_or("error".to_string(), |d| d.to_string()),
        ));
        let mut problems = Vec::new();
        if openssh != Ok(case.expect) {
            problems.push(format!("ssh decided {openssh:?}"));
        }
        if driftless != Ok(case.expect) {
            problems.push(format!("SshHostShell decided {driftless:?}"));
        }
        if library_decision(&verdict) != case.expect {
            problems.push(format!("KnownHosts::verify said {verdict:?}"));
        }
        if keygen != ours {
            problems.push(format!(
                "ssh-keygen -l -F {name} found lines {keygen:?}, driftless matches {ours:?}"
            ));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "case {i} `{}` (expected {}): {}\n--- file ---\n{contents}------------",
                case.name,
                case.expect,
                problems.join("; ")
            ));
        }
    }
    eprintln!("{table}");
    assert!(
        failures.is_empty(),
        "{} of {} cases disagree:\n{}\nsshd log:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n"),
        server.log()
    );
}

/// The refusal names the file and the `@revoked` line.
#[tokio::test]
async fn known_hosts_revoked_error_names_file_and_line() {
    let Some(server) = Sshd::start() else { return };
    let file = server.dir.path().join("known_hosts.revoked");
    fs::write(
        &file,
        format!(
            "# rotated\n[127.0.0.1]:{port} {key}\n@revoked * {key}\n",
            port = server.port,
            key = server.host_public_key
        ),
    )
    .unwrap();
    let marker = server.dir.path().join("ran");
    let touch = ["touch".to_string(), marker.to_str().unwrap().to_string()];
    let err = shell("127.0.0.1", server.port, &file, &server)
        .run("pve1", &touch, &[])
        .await
        .unwrap_err();
    match &err {
        ShellError::HostKeyRevoked { known_hosts, line, .. } => {
            assert_eq!((known_hosts.as_str(), *line), (file.to_str().unwrap(), 3));
        }
        other => panic!("expected HostKeyRevoked, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("@revoked") && text.contains(&format!("{} line 3", file.display())),
        "{text}"
    );
    assert!(!marker.exists(), "a command ran on a host whose key is revoked");
}
