//! `SshHostShell` and the host operations of `driftless::hostshell` against a real OpenSSH
//! server (tests/support/sshd.rs). Skipped only when sshd is not installed.

use testkit::sshd;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use driftless::adapters::ssh::{HostTarget, MAX_CHANNELS_PER_CONNECTION, SshHostShell};
use driftless::hostshell::{self, HostShellError};
use driftless::ports::{HostShell, ShellError};
use driftless::pve::conf::digest_bytes;
use sshd::Sshd;

const NODE: &str = "pve1";

fn shell_with(server: &Sshd, known_hosts: PathBuf, key_file: PathBuf) -> SshHostShell {
    let target = HostTarget {
        user: server.user.clone(),
        host: "127.0.0.1".into(),
        port: server.port,
        known_hosts,
        key_file,
    };
    SshHostShell::new(BTreeMap::from([(NODE.to_string(), target)]))
        .with_timeouts(Duration::from_secs(10), Duration::from_secs(60))
}

fn shell(server: &Sshd) -> SshHostShell {
    shell_with(server, server.known_hosts.clone(), server.client_key.clone())
}

fn argv(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 temp path").to_string()
}

const HOSTILE: &[&str] = &[
    "; rm -rf /",
    "$(id)",
    "`id`",
    "${HOME}",
    "a\nb\n",
    "'",
    "it's \"quoted\"",
    "\\",
    "",
    " ",
    "*",
    "~",
    "-n",
    "a|b&c>d",
    "#no comment",
    "grüße 日本語 🦀",
    "\x1b[31mred\x1b[0m\t",
];

#[tokio::test]
async fn runs_a_command_and_collects_output_and_status() {
    let Some(server) = Sshd::start() else { return };
    let sh = shell(&server);
    let out = sh
        .run(NODE, &argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let out = sh.run(NODE, &argv(&["true"]), &[]).await.unwrap();
    assert_eq!((out.status, out.stdout.len(), out.stderr.len()), (0, 0, 0));

    // stdin is fed and closed; big enough to need flow control in both directions
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = sh.run(NODE, &argv(&["cat"]), &input).await.unwrap();
    assert_eq!(out.status, 0);
    assert!(
        out.stdout == input,
        "cat returned {} bytes of {}",
        out.stdout.len(),
        input.len()
    );

    // a command that never reads its stdin still finishes
    let out = sh.run(NODE, &argv(&["sh", "-c", "echo done"]), &input).await.unwrap();
    assert_eq!(out.stdout, b"done\n");

    // unknown node, empty argv, NUL byte
    assert!(matches!(
        sh.run("other", &argv(&["true"]), &[]).await,
        Err(ShellError::Other(_))
    ));
    assert!(matches!(sh.run(NODE, &[], &[]).await, Err(ShellError::Other(_))));
    assert!(matches!(
        sh.run(NODE, &argv(&["echo", "a\0b"]), &[]).await,
        Err(ShellError::Other(_))
    ));
}

#[tokio::test]
async fn hostile_arguments_arrive_literally() {
    let Some(server) = Sshd::start() else { return };
    let sh = shell(&server);
    let dir = server.dir.path().join("hostile");
    fs::create_dir(&dir).unwrap();
    for (i, value) in HOSTILE.iter().enumerate() {
        let out = sh.run(NODE, &argv(&["printf", "%s", value]), &[]).await.unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), *value);

        // written into a file by the remote shell, then read back with read_file
        let file = path_str(&dir.join(format!("v{i}")));
        let out = sh
            .run(
                NODE,
                &argv(&["sh", "-c", "printf %s \"$1\" > \"$2\"", "sh", value, &file]),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sh.read_file(NODE, &file).await.unwrap(), value.as_bytes());
        assert_eq!(fs::read(&file).unwrap(), value.as_bytes());
    }
    // nothing else was created or removed by a value escaping its quotes
    assert_eq!(fs::read_dir(&dir).unwrap().count(), HOSTILE.len());

    // a hostile file name works for read and write too
    let name = dir.join("it's $(touch pwned); `id` \n-x");
    fs::write(&name, "before").unwrap();
    let path = path_str(&name);
    assert_eq!(sh.read_file(NODE, &path).await.unwrap(), b"before");
    sh.write_file_if_unchanged(NODE, &path, b"after", &digest_bytes(b"before"))
        .await
        .unwrap();
    assert_eq!(fs::read(&name).unwrap(), b"after");
    assert!(!dir.join("pwned").exists());
    assert!(!Path::new("pwned").exists());
}

#[tokio::test]
async fn read_file_of_a_missing_file_is_a_command_error() {
    let Some(server) = Sshd::start() else { return };
    let sh = shell(&server);
    let missing = path_str(&server.dir.path().join("missing"));
    match sh.read_file(NODE, &missing).await {
        Err(ShellError::Command { status, stderr, .. }) => {
            assert_ne!(status, 0);
            assert!(stderr.contains("No such file"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn write_file_if_unchanged_replaces_atomically_or_refuses() {
    let Some(server) = Sshd::start() else { return };
    let sh = shell(&server);
    let dir = server.dir.path().join("cas");
    fs::create_dir(&dir).unwrap();
    let file = dir.join("100.conf");
    fs::write(&file, "hostname: old\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    let path = path_str(&file);
    let old_digest = digest_bytes(b"hostname: old\n");

    sh.write_file_if_unchanged(NODE, &path, b"hostname: new\n", &old_digest)
        .await
        .unwrap();
    assert_eq!(fs::read(&file).unwrap(), b"hostname: new\n");
    assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o7777, 0o640);
    // no temporary file left behind
    let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["100.conf"]);

    // stale expected digest: refused, file untouched
    let before = fs::metadata(&file).unwrap().modified().unwrap();
    let err = sh
        .write_file_if_unchanged(NODE, &path, b"hostname: clobbered\n", &old_digest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ShellError::Changed { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert_eq!(fs::read(&file).unwrap(), b"hostname: new\n");
    assert_eq!(fs::metadata(&file).unwrap().modified().unwrap(), before);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

    // binary contents round-trip
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    sh.write_file_if_unchanged(NODE, &path, &bytes, &digest_bytes(b"hostname: new\n"))
        .await
        .unwrap();
    assert!(fs::read(&file).unwrap() == bytes);

    // an absent file has the empty digest: "" creates it, anything else is Changed
    let new_file = path_str(&dir.join("new.conf"));
    let err = sh
        .write_file_if_unchanged(NODE, &new_file, b"x", &old_digest)
        .await
        .unwrap_err();
    assert!(matches!(err, ShellError::Changed { .. }), "{err:?}");
    sh.write_file_if_unchanged(NODE, &new_file, b"x\n", "").await.unwrap();
    assert_eq!(fs::read(&new_file).unwrap(), b"x\n");

    // a directory that does not exist is an error, not Changed
    let nowhere = path_str(&dir.join("no/such/dir/file"));
    let err = sh.write_file_if_unchanged(NODE, &nowhere, b"x", "").await.unwrap_err();
    assert!(matches!(err, ShellError::Command { .. }), "{err:?}");
}

#[tokio::test]
async fn wrong_host_key_is_refused_and_nothing_runs() {
    let Some(server) = Sshd::start() else { return };
    let marker = server.dir.path().join("ran");
    let touch = argv(&["touch", &path_str(&marker)]);

    let sh = shell_with(&server, server.known_hosts_with_wrong_key(), server.client_key.clone());
    let err = sh.run(NODE, &touch, &[]).await.unwrap_err();
    assert!(matches!(err, ShellError::HostKeyMismatch { .. }), "{err:?}");
    // refused again on the next attempt (nothing was remembered)
    let err = sh.read_file(NODE, "/etc/hostname").await.unwrap_err();
    assert!(matches!(err, ShellError::HostKeyMismatch { .. }), "{err:?}");

    let sh = shell_with(
        &server,
        server.known_hosts_without_this_host(),
        server.client_key.clone(),
    );
    let err = sh.run(NODE, &touch, &[]).await.unwrap_err();
    assert!(matches!(err, ShellError::UnknownHost { .. }), "{err:?}");

    let sh = shell_with(
        &server,
        server.dir.path().join("no-known-hosts"),
        server.client_key.clone(),
    );
    let err = sh.run(NODE, &touch, &[]).await.unwrap_err();
    assert!(matches!(err, ShellError::UnknownHost { .. }), "{err:?}");

    assert!(!marker.exists(), "a command ran on a host that was not trusted");
    // the known_hosts file was not changed to trust the key either
    assert_eq!(
        fs::read_to_string(server.known_hosts_without_this_host()).unwrap(),
        format!(
            "[127.0.0.1]:{} {}\n",
            server.port.wrapping_add(1),
            server.host_public_key
        )
    );

    // the right known_hosts works
    shell(&server).run(NODE, &touch, &[]).await.unwrap();
    assert!(marker.exists());
}

#[tokio::test]
async fn commands_waiting_for_one_connection_share_its_failure() {
    let Some(server) = Sshd::start() else { return };
    let sh = Arc::new(shell_with(
        &server,
        server.known_hosts_with_wrong_key(),
        server.client_key.clone(),
    ));
    // TCP connections the server accepted, ours and the one Sshd::start probes it with
    // (counted once logged, so it is not mistaken for one of ours).
    let connections = || server.log().matches("Connection from 127.0.0.1").count();
    let probe = testkit::wait_until(Duration::from_secs(10), || (connections() >= 1).then_some(()));
    assert!(probe.is_some(), "{}", server.log());
    // Callers that arrive together wait for one connection attempt; when it fails, they
    // all get its answer instead of trying one after the other (each paying the connect
    // timeout when a host does not answer).
    let runs = (0..MAX_CHANNELS_PER_CONNECTION).map(|_| {
        let sh = sh.clone();
        tokio::spawn(async move { sh.run(NODE, &argv(&["true"]), &[]).await })
    });
    for r in futures_util::future::join_all(runs).await {
        let err = r.unwrap().unwrap_err();
        assert!(matches!(err, ShellError::HostKeyMismatch { .. }), "{err:?}");
    }
    assert_eq!(connections(), 1 + 1, "{}", server.log());
    // A command that comes later tries again.
    let err = sh.run(NODE, &argv(&["true"]), &[]).await.unwrap_err();
    assert!(matches!(err, ShellError::HostKeyMismatch { .. }), "{err:?}");
    assert_eq!(connections(), 1 + 2, "{}", server.log());
}

#[tokio::test]
async fn a_key_the_server_does_not_accept_is_an_auth_error() {
    let Some(server) = Sshd::start() else { return };
    let other = server.dir.path().join("other_client_key");
    sshd::ssh_keygen(&other, "not-authorized");
    let sh = shell_with(&server, server.known_hosts.clone(), other);
    let err = sh.run(NODE, &argv(&["true"]), &[]).await.unwrap_err();
    assert!(matches!(err, ShellError::Auth { .. }), "{err:?}");

    // an unreadable key file is reported without its contents
    let garbage = server.dir.path().join("garbage_key");
    fs::write(
        &garbage,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let sh = shell_with(&server, server.known_hosts.clone(), garbage);
    let err = sh.run(NODE, &argv(&["true"]), &[]).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ShellError::Connect { .. }), "{err:?}");
    assert!(!text.contains("c2VjcmV0"), "{text}");
}

/// The PID of the sshd process serving this connection (the first `sshd` ancestor).
async fn session_pid(sh: &SshHostShell) -> Result<String, ShellError> {
    let script = r#"pid=$$
while [ "$pid" -gt 1 ]; do
  if [ "$(cat /proc/$pid/comm)" = sshd ]; then echo "$pid"; exit 0; fi
  pid=$(cut -d' ' -f4 /proc/$pid/stat)
done
exit 1"#;
    let out = sh.run(NODE, &argv(&["sh", "-c", script]), &[]).await?;
    assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout).unwrap().trim().to_string())
}

/// Connections the server accepted so far: one `Accepted publickey` line per authenticated
/// TCP connection in sshd's log (`LogLevel VERBOSE`).
fn logins(server: &Sshd) -> usize {
    server.log().matches("Accepted publickey").count()
}

#[tokio::test]
async fn commands_in_a_row_and_at_once_share_one_connection() {
    let Some(server) = Sshd::start() else { return };
    let sh = Arc::new(shell(&server));
    // Ten callers arrive together before any connection exists: they wait for one.
    let runs = (0..10).map(|i| {
        let sh = sh.clone();
        tokio::spawn(async move {
            let out = sh
                .run(
                    NODE,
                    &argv(&["sh", "-c", "sleep 0.1; echo $1", "sh", &i.to_string()]),
                    &[],
                )
                .await;
            (i, out)
        })
    });
    for r in futures_util::future::join_all(runs).await {
        let (i, out) = r.unwrap();
        let out = out.unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
    }
    for i in 0..20 {
        let out = sh.run(NODE, &argv(&["echo", &i.to_string()]), &[]).await.unwrap();
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
    }
    // File writes ride on the same connection.
    let file = path_str(&server.dir.path().join("100.conf"));
    sh.write_file_if_unchanged(NODE, &file, b"cores: 2\n", "")
        .await
        .unwrap();
    assert_eq!(sh.read_file(NODE, &file).await.unwrap(), b"cores: 2\n");
    assert_eq!(
        logins(&server),
        1,
        "31 commands and 2 file operations opened more than one connection:\n{}",
        server.log()
    );
}

#[tokio::test]
async fn more_commands_than_the_server_allows_sessions_wait_for_a_free_channel() {
    // OpenSSH's default: at most 10 session channels on one connection.
    let Some(server) = Sshd::start_with("Match Address 127.0.0.1\n  MaxSessions 10") else {
        return;
    };
    let sh = Arc::new(shell(&server));
    let trace = path_str(&server.dir.path().join("trace"));
    let script = "echo start >> \"$1\"; sleep 0.4; echo end >> \"$1\"";
    let runs = (0..14).map(|_| {
        let sh = sh.clone();
        let trace = trace.clone();
        tokio::spawn(async move { sh.run(NODE, &argv(&["sh", "-c", script, "sh", &trace]), &[]).await })
    });
    for r in futures_util::future::join_all(runs).await {
        let out = r.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
        assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
    }
    // How many commands were running at once, as the server saw them.
    let (mut running, mut most) = (0usize, 0usize);
    for line in fs::read_to_string(&trace).unwrap().lines() {
        if line == "start" {
            running += 1;
            most = most.max(running);
        } else {
            running -= 1;
        }
    }
    assert!(
        (2..=MAX_CHANNELS_PER_CONNECTION).contains(&most),
        "{most} commands ran at once"
    );
    assert_eq!(logins(&server), 1, "{}", server.log());
}

#[tokio::test]
async fn a_killed_connection_is_opened_again_for_the_next_command() {
    let Some(server) = Sshd::start() else { return };
    let sh = shell(&server);
    let first = session_pid(&sh).await.unwrap();
    assert_eq!(logins(&server), 1);
    // The server side of the connection goes away; the next command follows at once, before
    // or after the client noticed: either way it runs, on a new connection.
    kill(&first);
    let again = session_pid(&sh)
        .await
        .unwrap_or_else(|e| panic!("no reconnect: {e}\n{}", server.log()));
    assert_ne!(again, first);
    assert_eq!(logins(&server), 2, "{}", server.log());
    // And that connection is kept in turn.
    for _ in 0..3 {
        assert_eq!(session_pid(&sh).await.unwrap(), again);
    }
    assert_eq!(logins(&server), 2, "{}", server.log());
}

#[tokio::test]
async fn a_command_running_when_the_connection_drops_fails_and_is_not_run_again() {
    let Some(server) = Sshd::start() else { return };
    let sh = Arc::new(shell(&server));
    let dir = server.dir.path().to_path_buf();
    let (marker, pids) = (path_str(&dir.join("ran")), path_str(&dir.join("pids")));
    // Records that it ran, then the sshd process serving it and its own pid; a second run
    // would find the marker and succeed at once.
    let script = r#"[ -e "$1" ] && exit 0
echo ran > "$1"
pid=$$
while [ "$(cat /proc/$pid/comm)" != sshd ]; do pid=$(cut -d' ' -f4 /proc/$pid/stat); done
echo "$pid $$" > "$2.tmp" && mv "$2.tmp" "$2"
exec sleep 30"#;
    let running = {
        let sh = sh.clone();
        let command = argv(&["sh", "-c", script, "sh", &marker, &pids]);
        tokio::spawn(async move { sh.run(NODE, &command, &[]).await })
    };
    let (session, command) = loop {
        if let Ok(text) = fs::read_to_string(&pids) {
            let (a, b) = text.trim().split_once(' ').unwrap();
            break (a.to_string(), b.to_string());
        }
        assert!(!running.is_finished(), "the command ended early: {:?}", running.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    kill(&session);
    let result = running.await.unwrap();
    kill(&command);
    let err = result.expect_err("a command whose connection dropped cannot have succeeded");
    assert!(
        matches!(&err, ShellError::Connect { message, .. } if message.contains("dropped while") && message.contains("not run again")),
        "{err:?}"
    );
    assert_eq!(fs::read_to_string(&marker).unwrap(), "ran\n");
    // The next command gets a new connection.
    assert_eq!(sh.run(NODE, &argv(&["true"]), &[]).await.unwrap().status, 0);
    assert_eq!(logins(&server), 2, "{}", server.log());
}

fn kill(pid: &str) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {pid}");
}

const FRESH_CT: &str = "\
#K3s server%3A managed by driftless
arch: amd64
cores: 2
features: nesting=1
hostname: k3s-server-1
memory: 4096
net0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:5E:7D:01,ip=192.168.2.20/24,gw=192.168.2.1,type=veth
onboot: 1
ostype: debian
rootfs: local-lvm:vm-100-disk-0,size=32G
swap: 512
tags: driftless;k3s
unprivileged: 0
lxc.prlimit.nofile: 4096
";

const SEED_RAW: &str = "\
lxc.mount.entry: /dev/kmsg dev/kmsg none bind,rw,optional,create=file
lxc.apparmor.profile: unconfined
lxc.cap.drop: 
lxc.cgroup2.devices.allow: a
lxc.mount.auto: proc:rw sys:rw
";

fn seed_keys() -> Vec<(String, String)> {
    SEED_RAW
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[tokio::test]
async fn apply_raw_lxc_keys_over_ssh() {
    let Some(server) = Sshd::start() else { return };
    let sh = shell(&server);
    let pve_root = server.dir.path().join("pve");
    let conf_dir = pve_root.join("nodes").join(NODE).join("lxc");
    fs::create_dir_all(&conf_dir).unwrap();
    let conf_file = conf_dir.join("100.conf");
    fs::write(&conf_file, FRESH_CT).unwrap();
    fs::set_permissions(&conf_file, fs::Permissions::from_mode(0o640)).unwrap();
    let root = path_str(&pve_root);
    assert_eq!(hostshell::lxc_conf_path(&root, NODE, 100), path_str(&conf_file));
    let digest = digest_bytes(FRESH_CT.as_bytes());

    // a stale digest (the API saw another version): refused, file untouched
    let stale = digest_bytes(b"arch: amd64\n");
    let err = hostshell::apply_raw_lxc_keys(&sh, &root, NODE, 100, &seed_keys(), &[], &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HostShellError::Shell(ShellError::Changed { .. })),
        "{err:?}"
    );
    assert_eq!(fs::read_to_string(&conf_file).unwrap(), FRESH_CT);

    let new_digest = hostshell::apply_raw_lxc_keys(&sh, &root, NODE, 100, &seed_keys(), &[], &digest)
        .await
        .unwrap()
        .expect("file changed");
    let written = fs::read_to_string(&conf_file).unwrap();
    // the seed's raw keys come after the options, the foreign raw key is kept
    assert_eq!(written, format!("{FRESH_CT}{SEED_RAW}"));
    assert_eq!(new_digest, digest_bytes(written.as_bytes()));
    assert_eq!(fs::metadata(&conf_file).unwrap().permissions().mode() & 0o7777, 0o640);

    // again with the new digest: nothing to do, nothing written
    let again = hostshell::apply_raw_lxc_keys(&sh, &root, NODE, 100, &seed_keys(), &[], &new_digest)
        .await
        .unwrap();
    assert_eq!(again, None);
    // the old digest is stale now
    let err = hostshell::apply_raw_lxc_keys(&sh, &root, NODE, 100, &seed_keys(), &[], &digest)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HostShellError::Shell(ShellError::Changed { .. })),
        "{err:?}"
    );

    // drop one owned key: it goes, the others and the foreign key stay
    let owned: Vec<String> = seed_keys().into_iter().map(|(k, _)| k).collect();
    let fewer: Vec<_> = seed_keys().into_iter().filter(|(k, _)| k != "lxc.cap.drop").collect();
    hostshell::apply_raw_lxc_keys(&sh, &root, NODE, 100, &fewer, &owned, &new_digest)
        .await
        .unwrap()
        .expect("file changed");
    assert_eq!(
        fs::read_to_string(&conf_file).unwrap(),
        format!("{FRESH_CT}{}", SEED_RAW.replace("lxc.cap.drop: \n", ""))
    );

    // a missing config file is a command error
    let err = hostshell::apply_raw_lxc_keys(&sh, &root, NODE, 999, &seed_keys(), &[], &digest)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HostShellError::Shell(ShellError::Command { .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn pct_set_runs_pct_with_quoted_options() {
    let Some(server) = Sshd::start() else { return };
    let sh = shell(&server);
    let out_file = path_str(&server.dir.path().join("pct-args"));
    // a stand-in for pct that records its arguments, one per line
    let pct = argv(&["sh", "-c", "printf '%s\\n' \"$@\" > \"$0\"", &out_file]);
    let options = vec![
        ("features".to_string(), "fuse=1,keyctl=1,nesting=1".to_string()),
        ("description".to_string(), "a b; $(id)".to_string()),
    ];
    hostshell::pct_set(&sh, NODE, &pct, 100, &options).await.unwrap();
    assert_eq!(
        fs::read_to_string(&out_file).unwrap(),
        "set\n100\n--features\nfuse=1,keyctl=1,nesting=1\n--description\na b; $(id)\n"
    );

    let failing = argv(&["sh", "-c", "echo 'unable to parse' >&2; exit 2"]);
    let err = hostshell::pct_set(&sh, NODE, &failing, 100, &options)
        .await
        .unwrap_err();
    match err {
        HostShellError::Shell(ShellError::Command { status, stderr, .. }) => {
            assert_eq!(status, 2);
            assert_eq!(stderr, "unable to parse");
        }
        other => panic!("{other:?}"),
    }
}
