//! The broken-repository corpus: every directory under tests/broken/ is one mistake, written
//! as an overlay on a copy of an example repository, and the places `validate` must report.
//!
//! A case directory holds:
//! * the files that differ from the base example, at the same relative paths;
//! * optionally `DELETE`: repository paths to remove, one a line;
//! * `expect`: what `validate` must say, one diagnostic a line, `FILE:LINE: substring of the
//!   message`, each optionally followed by `hint: substring` and `note: FILE:LINE` lines for
//!   that diagnostic. `base: homelab-talos` switches the base from examples/homelab-k3s.
//!   `#` lines are comments.
//!
//! Each case must fail `validate` with exit code 1, nothing on stdout, and exactly the
//! expected diagnostics (one expect line per reported error, so one mistake does not
//! cascade into noise), and `--output json` must report the same files and lines.
//! All failing cases are reported together.

use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
struct Expected {
    file: String,
    line: u32,
    message: String,
    hint: Option<String>,
    note: Option<(String, u32)>,
}

#[derive(Debug)]
struct Case {
    name: String,
    dir: PathBuf,
    base: String,
    expected: Vec<Expected>,
}

/// One diagnostic as printed on stderr.
#[derive(Debug, Default)]
struct Printed {
    file: String,
    line: u32,
    message: String,
    hints: Vec<String>,
    notes: Vec<(String, u32)>,
}

fn parse_place(s: &str) -> Option<(String, u32, &str)> {
    // FILE:LINE:rest, where FILE has no ':' (repository paths never do here).
    let (file, rest) = s.split_once(':')?;
    let (line, rest) = rest.split_once(':')?;
    Some((file.trim().to_string(), line.trim().parse().ok()?, rest))
}

fn read_case(dir: &Path) -> Result<Case, String> {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(dir.join("expect")).map_err(|e| format!("{name}: no expect file: {e}"))?;
    let mut base = "homelab-k3s".to_string();
    let mut expected: Vec<Expected> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("{name}/expect:{}: cannot read `{raw}`", i + 1);
        if let Some(b) = line.strip_prefix("base:") {
            base = b.trim().to_string();
        } else if let Some(h) = line.strip_prefix("hint:") {
            expected.last_mut().ok_or_else(bad)?.hint = Some(h.trim().to_string());
        } else if let Some(n) = line.strip_prefix("note:") {
            let (file, l, _) = parse_place(&format!("{}:", n.trim())).ok_or_else(bad)?;
            expected.last_mut().ok_or_else(bad)?.note = Some((file, l));
        } else {
            let (file, l, rest) = parse_place(line).ok_or_else(bad)?;
            expected.push(Expected {
                file,
                line: l,
                message: rest.trim().to_string(),
                ..Default::default()
            });
        }
    }
    if expected.is_empty() {
        return Err(format!("{name}/expect names no diagnostic"));
    }
    Ok(Case {
        name,
        dir: dir.to_path_buf(),
        base,
        expected,
    })
}

/// Read `file:line:col: error: message` blocks with their `  ...: note:` and `  hint:` lines.
fn parse_stderr(stderr: &str) -> (Vec<Printed>, Option<usize>) {
    let mut out: Vec<Printed> = Vec::new();
    let mut count = None;
    for line in stderr.lines() {
        if let Some(rest) = line.strip_prefix("  hint: ") {
            if let Some(p) = out.last_mut() {
                p.hints.push(rest.to_string());
            }
        } else if line.starts_with("  ") && line.contains(": note: ") {
            if let (Some(p), Some((file, l, _))) = (out.last_mut(), parse_place(line.trim_start())) {
                p.notes.push((file, l));
            }
        } else if let Some((place, message)) = line.split_once(": error: ") {
            if let Some((file, l, _)) = parse_place(place) {
                out.push(Printed {
                    file,
                    line: l,
                    message: message.to_string(),
                    ..Default::default()
                });
            }
        } else if let Some(n) = line.strip_suffix(" errors").or_else(|| line.strip_suffix(" error")) {
            count = n.parse().ok();
        }
    }
    (out, count)
}

fn matches(e: &Expected, p: &Printed) -> bool {
    p.file == e.file
        && p.line == e.line
        && p.message.contains(&e.message)
        && e.hint
            .as_ref()
            .is_none_or(|h| p.hints.iter().any(|x| x.contains(h.as_str())))
        && e.note.as_ref().is_none_or(|n| p.notes.contains(n))
}

fn show(e: &Expected) -> String {
    let mut s = format!("{}:{}: {}", e.file, e.line, e.message);
    if let Some(h) = &e.hint {
        s.push_str(&format!(" [hint: {h}]"));
    }
    if let Some((f, l)) = &e.note {
        s.push_str(&format!(" [note: {f}:{l}]"));
    }
    s
}

/// Check one case; the problems found, empty when it passes.
fn check(case: &Case) -> Vec<String> {
    let mut problems = Vec::new();
    let repo = tempfile::tempdir().expect("temp dir");
    testkit::copy_dir(&testkit::example(&case.base), repo.path());
    testkit::apply_overlay(&case.dir, repo.path());

    // text output
    let run = testkit::run_repo(repo.path(), ["validate"]);
    if run.code != 1 {
        problems.push(format!("exit code {} (wanted 1)", run.code));
    }
    if !run.stdout.is_empty() {
        problems.push(format!("stdout is not empty: {:?}", run.stdout));
    }
    let (printed, count) = parse_stderr(&run.stderr);
    let mut used = vec![false; printed.len()];
    for e in &case.expected {
        match printed.iter().enumerate().find(|(i, p)| !used[*i] && matches(e, p)) {
            Some((i, _)) => used[i] = true,
            None => problems.push(format!("missing diagnostic {}", show(e))),
        }
    }
    for (p, _) in printed.iter().zip(&used).filter(|(_, u)| !**u) {
        problems.push(format!("unexpected diagnostic {}:{}: {}", p.file, p.line, p.message));
    }
    if count != Some(printed.len()) {
        problems.push(format!(
            "the summary line says {count:?} errors, {} were printed",
            printed.len()
        ));
    }

    // JSON output: the same places
    let json = testkit::run_repo(repo.path(), ["--output", "json", "validate"]);
    if json.code != 1 {
        problems.push(format!("--output json: exit code {} (wanted 1)", json.code));
    }
    match serde_json::from_str::<serde_json::Value>(&json.stdout) {
        Err(e) => problems.push(format!("--output json: stdout is not JSON ({e}): {:?}", json.stdout)),
        Ok(v) => {
            if v["valid"] != serde_json::Value::Bool(false) {
                problems.push("--output json: `valid` is not false".into());
            }
            let errors = v["errors"].as_array().cloned().unwrap_or_default();
            let places: Vec<(String, u64, String)> = errors
                .iter()
                .map(|e| {
                    (
                        e["location"]["file"].as_str().unwrap_or("").to_string(),
                        e["location"]["line"].as_u64().unwrap_or(0),
                        e["message"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            if places.len() != printed.len() {
                problems.push(format!(
                    "--output json: {} errors, the text output has {}",
                    places.len(),
                    printed.len()
                ));
            }
            for e in &case.expected {
                if !places
                    .iter()
                    .any(|(f, l, m)| *f == e.file && *l == u64::from(e.line) && m.contains(&e.message))
                {
                    problems.push(format!("--output json: missing {}", show(e)));
                }
            }
        }
    }
    if !problems.is_empty() {
        problems.push(format!("stderr was:\n{}", run.stderr.trim_end()));
    }
    problems
}

#[test]
fn every_broken_repository_is_reported_at_the_right_place() {
    let corpus = testkit::root().join("tests/broken");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .expect("tests/broken exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 28,
        "the corpus has {} cases, wanted at least 28",
        dirs.len()
    );

    let mut failures = Vec::new();
    for dir in &dirs {
        let case = match read_case(dir) {
            Ok(c) => c,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let problems = check(&case);
        if !problems.is_empty() {
            failures.push(format!(
                "case `{}` ({}):\n  {}",
                case.name,
                case.base,
                problems.join("\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} broken cases failed:\n\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n\n")
    );
}

/// The corpus is only worth something if its bases are valid: a case then fails for its own
/// mistake alone.
#[test]
fn the_bases_of_the_corpus_are_valid() {
    for base in ["homelab-k3s", "homelab-talos"] {
        testkit::run_repo(&testkit::example(base), ["validate"]).expect_code(0, base);
    }
}
