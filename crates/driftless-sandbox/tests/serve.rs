//! `driftless-sandbox serve` as a user starts it: it prints where it listens and leaves an env
//! file that points driftless at it, and every endpoint in that file is on loopback (nothing a
//! user sources from the sandbox may send a token to a homelab address).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serve_prints_its_endpoints_and_its_connection_file_points_only_at_loopback() {
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftless-sandbox"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("driftless-sandbox starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let done = line.starts_with("Press Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let printed = printed.join("\n");
    assert!(
        printed.contains("Sandbox Proxmox VE API at https://127.0.0.1:"),
        "{printed}"
    );
    assert!(printed.contains("certificate fingerprint (SHA-256): "), "{printed}");

    let env = std::fs::read_to_string(state.path().join(".sandbox/connection.env")).expect("the connection file");
    for key in ["DRIFTLESS_PROXMOX_URL", "DRIFTLESS_KUBE_SERVER"] {
        let line = env
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in\n{env}"));
        assert!(line.contains("=https://127.0.0.1:"), "{line}");
    }
    let talos = env
        .lines()
        .find(|l| l.starts_with("DRIFTLESS_TALOS_ENDPOINT="))
        .expect("a Talos endpoint");
    assert!(talos.starts_with("DRIFTLESS_TALOS_ENDPOINT=127.0.0.1:"), "{talos}");
    assert!(env.contains("DRIFTLESS_PCT_COMMAND=\""), "{env}");
    assert!(env.contains(" pct --state "), "the pct command is this binary's: {env}");
    for homelab in ["192.168.", "10.0.0."] {
        assert!(!env.contains(homelab), "{homelab} in the connection file:\n{env}");
    }
}
