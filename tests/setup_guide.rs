//! docs/setup.md cannot rot: its ` ```sh ` blocks are run.
//!
//! Every block is marked on the line before its fence: `<!-- test -->` (run), or
//! `<!-- not tested: REASON -->` (not run, and the reason is said), optionally with a stand-in
//! the test runs in its place: `<!-- not tested, stand-in "NAME": REASON -->`. The tested
//! blocks run in order as one bash session (variables carry over, as in a terminal) against
//! the sandbox, with a real sshd on loopback as the Proxmox host's, and the sandbox's API
//! given the token and the ACLs the guide's own `pveum` commands create: a privilege missing
//! from the guide makes its apply fail.

use driftless_sandbox::{self as sandbox, Acl, AclEntry, SandboxOptions};
use std::collections::BTreeSet;
use std::process::{Command, Stdio};

/// One ` ```sh ` block of the guide.
#[derive(Debug)]
struct Block {
    /// The line of its fence (1-based).
    line: usize,
    text: String,
    marker: Marker,
}

#[derive(Debug, PartialEq)]
enum Marker {
    Test,
    NotTested { reason: String, stand_in: Option<String> },
}

fn guide() -> String {
    std::fs::read_to_string(testkit::root().join("docs/setup.md")).expect("docs/setup.md")
}

/// Every ` ```sh ` block with its marker; an unmarked block is an error naming its line.
fn blocks(text: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_start().starts_with("```sh") {
            let fence = i;
            let marker_line = lines[..fence]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .copied()
                .unwrap_or("");
            let marker = parse_marker(marker_line.trim()).ok_or_else(|| {
                format!(
                    "docs/setup.md:{}: a ```sh block without `<!-- test -->` or `<!-- not tested: REASON -->` before it",
                    fence + 1
                )
            })?;
            let mut body = String::new();
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                body.push_str(lines[i]);
                body.push('\n');
                i += 1;
            }
            out.push(Block {
                line: fence + 1,
                text: body,
                marker,
            });
        }
        i += 1;
    }
    Ok(out)
}

fn parse_marker(line: &str) -> Option<Marker> {
    let inner = line.strip_prefix("<!--")?.strip_suffix("-->")?.trim();
    if inner == "test" {
        return Some(Marker::Test);
    }
    let rest = inner.strip_prefix("not tested")?;
    let (stand_in, rest) = match rest.strip_prefix(", stand-in \"") {
        Some(r) => {
            let (name, after) = r.split_once('"')?;
            (Some(name.to_string()), after)
        }
        None => (None, rest),
    };
    let reason = rest.strip_prefix(':')?.trim();
    (!reason.is_empty()).then(|| Marker::NotTested {
        reason: reason.to_string(),
        stand_in,
    })
}

/// Shell words of one line, with '...' and "..." quoting (enough for the guide's pveum lines).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') if !in_word => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

fn flag<'a>(w: &'a [String], name: &str) -> Option<&'a str> {
    w.iter()
        .position(|x| x == name)
        .and_then(|i| w.get(i + 1))
        .map(String::as_str)
}

/// The roles, ACL entries and tokens the guide's `pveum` commands create.
fn pveum_acl(blocks: &[Block]) -> (Acl, Vec<String>) {
    let mut acl = Acl::default();
    let mut tokens = Vec::new();
    for b in blocks {
        for line in b.text.lines() {
            let w = words(line);
            match w.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                ["pveum", "role", "add", name, ..] => {
                    let privs = flag(&w, "--privs").expect("--privs");
                    acl.roles.insert(
                        name.to_string(),
                        privs
                            .split([' ', ','])
                            .filter(|p| !p.is_empty())
                            .map(str::to_string)
                            .collect(),
                    );
                }
                ["pveum", "acl", "modify", path, ..] => {
                    let subject = flag(&w, "--users")
                        .or(flag(&w, "--tokens"))
                        .expect("--users or --tokens");
                    let roles: Vec<&str> = flag(&w, "--roles").expect("--roles").split(',').collect();
                    let mut e = AclEntry::new(path, subject, &roles);
                    e.propagate = flag(&w, "--propagate") != Some("0");
                    acl.entries.push(e);
                }
                ["pveum", "user", "token", "add", user, token, ..] => {
                    let id = format!("{user}!{token}");
                    if flag(&w, "--privsep") != Some("0") {
                        acl.privsep.insert(id.clone());
                    }
                    tokens.push(id);
                }
                ["pveum", ..] => {}
                _ => {}
            }
        }
    }
    (acl, tokens)
}

#[test]
fn every_block_is_marked_and_every_untested_one_says_why() {
    let all = blocks(&guide()).unwrap_or_else(|e| panic!("{e}"));
    let tested = all.iter().filter(|b| b.marker == Marker::Test).count();
    assert!(tested >= 10, "only {tested} blocks of the guide are tested");
    let commands: BTreeSet<String> = all
        .iter()
        .filter(|b| b.marker == Marker::Test)
        .flat_map(|b| b.text.lines().map(|l| l.trim().to_string()).collect::<Vec<_>>())
        .collect();
    for must in [
        "driftless --repo homelab doctor",
        "driftless --repo homelab apply --auto-approve",
        "driftless --repo homelab plan --detailed-exitcode",
    ] {
        assert!(commands.contains(must), "the guide's tested blocks never run `{must}`");
    }
    // The marker parser refuses what is not a marker.
    assert!(blocks("text\n```sh\nls\n```\n").is_err());
    assert!(blocks("<!-- not tested: -->\n```sh\nls\n```\n").is_err());
    assert_eq!(
        parse_marker("<!-- not tested, stand-in \"x\": on the host -->"),
        Some(Marker::NotTested {
            reason: "on the host".into(),
            stand_in: Some("x".into())
        })
    );
}

#[test]
fn the_guides_roles_hold_exactly_the_privileges_and_the_plan_token_is_read_only() {
    let blocks = blocks(&guide()).unwrap();
    let (acl, tokens) = pveum_acl(&blocks);
    acl.check()
        .unwrap_or_else(|e| panic!("pveum would refuse the guide: {e}"));
    assert_eq!(tokens, ["driftless@pve!apply", "driftless@pve!plan"]);
    // The plan token reads every guest and holds no write privilege anywhere.
    let plan = acl.permissions("driftless@pve!plan", "/vms/100");
    assert!(plan.contains_key("VM.Audit"), "{plan:?}");
    for (path, privs) in acl.effective("driftless@pve!plan") {
        for p in privs.keys() {
            assert!(
                !driftless::doctor::WRITE_PRIVILEGES.contains(&p.as_str()),
                "the plan token holds {p} on {path}"
            );
        }
    }
    // No privilege in the role that nothing needs: every one is named in the guide's table.
    let text = guide();
    for privs in acl.roles.values() {
        for p in privs {
            assert!(
                text.contains(&format!("`{p}`")),
                "{p} is not explained in the guide's table"
            );
        }
    }
}

#[test]
fn the_guide_runs_from_a_fresh_host_to_a_reconciling_daemon() {
    let Some(sshd) = testkit::sshd::Sshd::start() else {
        return;
    };
    let blocks = blocks(&guide()).unwrap();
    let (acl, tokens) = pveum_acl(&blocks);
    let apply = format!("{}=4b8f0e2a-6c1d-4f3a-9e5b-7d2c1a0f9e8d", tokens[0]);
    let plan = format!("{}=9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d", tokens[1]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let sb = rt
        .block_on(sandbox::start(SandboxOptions {
            token: apply.clone(),
            extra_tokens: vec![plan.clone()],
            acl: Some(acl),
            ..SandboxOptions::new(state.path())
        }))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::symlink(testkit::root(), work.join("driftless")).unwrap();

    let mut script = String::from("set -euo pipefail\n");
    for b in &blocks {
        match &b.marker {
            Marker::Test => {
                script.push_str(&format!("echo '>>> docs/setup.md:{}'\n{}", b.line, b.text));
            }
            Marker::NotTested {
                stand_in: Some(name), ..
            } => {
                let stand_in = match name.as_str() {
                    // What the operator does on the host: here, this test's sshd stands for it.
                    "authorized-keys" => "cat authorized_keys.line >> \"$SSHD_AUTHORIZED_KEYS\"\n",
                    other => panic!("docs/setup.md:{}: unknown stand-in `{other}`", b.line),
                };
                script.push_str(&format!("echo '>>> stand-in for docs/setup.md:{}'\n{stand_in}", b.line));
            }
            Marker::NotTested { .. } => {}
        }
    }
    let script_file = dir.path().join("guide.sh");
    std::fs::write(&script_file, &script).unwrap();

    let bin_dir = testkit::driftless_bin().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let listen = format!("127.0.0.1:{}", testkit::free_port());
    let api = sb.url.trim_start_matches("https://").to_string();
    let env: Vec<(&str, String)> = vec![
        ("PATH", path),
        ("HOME", home.display().to_string()),
        ("LANG", "C.UTF-8".into()),
        // Step 1's variables, pointing at the sandbox and the sshd.
        ("PVE_HOST", "127.0.0.1".into()),
        ("PVE_NODE", "pve".into()),
        ("PVE_SSH_PORT", sshd.port.to_string()),
        ("PVE_API", api),
        ("DRIFTLESS_IP", "127.0.0.1".into()),
        ("DAEMON_URL", format!("http://{listen}")),
        ("PVE_TOKEN", apply.clone()),
        ("PVE_PLAN_TOKEN", plan.clone()),
        (
            "SSHD_AUTHORIZED_KEYS",
            sshd.dir.path().join("authorized_keys").display().to_string(),
        ),
        // What the sandbox needs beyond the guide: the API's port (the guide's cluster.yaml
        // says 8006), the sshd's user (not root when the test is not run as root), the
        // sandbox's /etc/pve and pct, its Kubernetes API, and the daemon's port.
        ("DRIFTLESS_PROXMOX_URL", sb.url.clone()),
        ("DRIFTLESS_SSH_USER", sshd.user.clone()),
        ("DRIFTLESS_PVE_ROOT", state.path().display().to_string()),
        ("DRIFTLESS_PCT_COMMAND", testkit::pct_command(state.path())),
        ("DRIFTLESS_KUBE_SERVER", sb.kube.url.clone()),
        ("DRIFTLESS_TALOS_ENDPOINT", sb.talos.endpoint.clone()),
        ("DRIFTLESS_GATE_TIMEOUT", "20s".into()),
        ("DRIFTLESS_LISTEN", listen.clone()),
        ("GIT_AUTHOR_NAME", "homelab operator".into()),
        ("GIT_AUTHOR_EMAIL", "operator@homelab.invalid".into()),
        ("GIT_COMMITTER_NAME", "homelab operator".into()),
        ("GIT_COMMITTER_EMAIL", "operator@homelab.invalid".into()),
        ("GIT_CONFIG_NOSYSTEM", "1".into()),
        ("GIT_CONFIG_GLOBAL", "/dev/null".into()),
    ];
    let mut cmd = Command::new("bash");
    cmd.arg(&script_file)
        .current_dir(&work)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    // Its own process group: a daemon left behind by a failing block goes with it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().expect("bash runs");
    let group = child.id();
    let out = child.wait_with_output().unwrap();
    let _ = Command::new("kill")
        .arg("--")
        .arg(format!("-{group}"))
        .stderr(Stdio::null())
        .status();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let daemon_log = std::fs::read_to_string(work.join("daemon.log")).unwrap_or_default();
    rt.block_on(sb.shutdown());
    assert!(
        out.status.success(),
        "the guide failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- daemon.log\n{daemon_log}\n--- sshd\n{}",
        out.status,
        sshd.log()
    );
    // Both doctor runs passed, the plan after the apply was empty, the daemon reconciled.
    assert_eq!(stdout.matches("0 errors").count(), 2, "{stdout}");
    assert!(stdout.contains("Applied 9 of 9 steps."), "{stdout}");
    assert!(stdout.contains("No changes"), "{stdout}");
    assert_eq!(
        stdout.matches("accepted").count(),
        2,
        "both webhook deliveries: {stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.contains("plan token") && l.starts_with("ok")),
        "the read-only token passed: {stdout}"
    );
    // The secrets never show.
    for secret in [&apply, &plan] {
        let value = secret.split_once('=').unwrap().1;
        assert!(!stdout.contains(value) && !stderr.contains(value) && !daemon_log.contains(value));
    }
}
