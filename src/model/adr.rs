//! Architecture Decision Records: status in every form real ADRs use, the optional
//! ` ```yaml driftless ` config block, and supersession.

use super::diag::{Diagnostic, Location};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "status")]
pub enum AdrStatus {
    Proposed,
    Accepted,
    Implemented,
    Rejected,
    Deprecated,
    Superseded { by: Option<u32> },
}

impl AdrStatus {
    /// Accepted and Implemented decisions carry config; nothing else does.
    pub fn applies(&self) -> bool {
        matches!(self, AdrStatus::Accepted | AdrStatus::Implemented)
    }

    pub fn label(&self) -> String {
        match self {
            AdrStatus::Proposed => "Proposed".into(),
            AdrStatus::Accepted => "Accepted".into(),
            AdrStatus::Implemented => "Implemented".into(),
            AdrStatus::Rejected => "Rejected".into(),
            AdrStatus::Deprecated => "Deprecated".into(),
            AdrStatus::Superseded { by: Some(n) } => format!("Superseded by {}", adr_id(*n)),
            AdrStatus::Superseded { by: None } => "Superseded".into(),
        }
    }
}

/// The config block of an ADR: its YAML text and where that text starts in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdrBlock {
    pub yaml: String,
    /// Lines before the block's first line, so YAML positions map back into the file.
    pub line_offset: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adr {
    pub number: u32,
    pub file: String,
    pub title: String,
    pub status: AdrStatus,
    pub status_line: u32,
    pub supersedes: Vec<u32>,
    pub block: Option<AdrBlock>,
}

impl Adr {
    pub fn id(&self) -> String {
        adr_id(self.number)
    }
}

/// The canonical id of ADR number `n`: `ADR-001`.
pub fn adr_id(n: u32) -> String {
    format!("ADR-{n:03}")
}

/// Reads `ADR-7`, `ADR 007`, `adr-0007`, `0007` as 7.
pub fn parse_adr_ref(s: &str) -> Option<u32> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("adr")
        .map(|r| r.trim_start_matches([' ', '-', '_']))
        .unwrap_or(&lower);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() || digits.len() != rest.len() {
        return None;
    }
    digits.parse().ok()
}

/// Whether a repository path is an ADR: markdown under adr/, adrs/, docs/adr/, docs/adrs/ or docs/decisions/.
pub fn is_adr_path(path: &str) -> bool {
    const DIRS: &[&str] = &["adr/", "adrs/", "docs/adr/", "docs/adrs/", "docs/decisions/"];
    path.ends_with(".md")
        && DIRS.iter().any(|d| path.starts_with(d))
        && !path
            .rsplit('/')
            .next()
            .is_some_and(|f| f.eq_ignore_ascii_case("README.md") || f.starts_with("template"))
}

/// Parse one ADR. Returns `Ok(None)` for markdown that is no ADR and holds no config
/// (an index page, a template), an error only where an ADR's config could be misread.
/// An ADR with config whose status word is unknown is left out with a warning in
/// `warnings`, naming the file and line: never applied, and not an error either.
pub fn parse(file: &str, text: &str, warnings: &mut Vec<Diagnostic>) -> Result<Option<Adr>, Vec<Diagnostic>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut errors = Vec::new();
    let block = match find_block(file, &lines) {
        Ok(b) => b,
        Err(d) => {
            errors.push(d);
            None
        }
    };
    let title = lines
        .iter()
        .find(|l| l.starts_with("# "))
        .map(|l| l[2..].trim().to_string())
        .unwrap_or_default();
    let number = number_from_file(file).or_else(|| number_from_title(&title));
    let status_seen = read_status(&lines);
    if let (Some(StatusSeen::Unknown(word, line)), Some(_)) = (&status_seen, &block) {
        if !errors.is_empty() {
            return Err(errors);
        }
        warnings.push(
            Diagnostic::new(
                Location::new(file, *line, 1),
                format!("status `{word}` is not one driftless knows: this ADR's config is not applied"),
            )
            .hint("Accepted (or Approved, Adopted, Decided, Implemented), Proposed (Draft, Pending), Rejected (Declined, Withdrawn), Deprecated, Superseded"),
        );
        return Ok(None);
    }
    let status = match status_seen {
        Some(StatusSeen::Known(s, line)) => Some((s, line)),
        _ => None,
    };
    let supersedes = find_supersedes(&lines);

    let (number, (status, status_line)) = match (number, status) {
        (Some(n), Some(s)) => (n, s),
        (n, s) => {
            if block.is_some() {
                if n.is_none() {
                    errors.push(
                        Diagnostic::new(Location::file_start(file), "cannot tell this ADR's number").hint(
                            "name the file like `ADR-001-title.md` or `0001-title.md`, or title it `# ADR-001: ...`",
                        ),
                    );
                }
                if s.is_none() {
                    errors.push(
                        Diagnostic::new(Location::file_start(file), "cannot read this ADR's status").hint(
                            "write `**Status:** Accepted`, a `## Status` section whose first word is the status, \
                             or front matter `status: accepted`",
                        ),
                    );
                }
            }
            return if errors.is_empty() { Ok(None) } else { Err(errors) };
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Some(Adr {
        number,
        file: file.to_string(),
        title,
        status,
        status_line,
        supersedes,
        block,
    }))
}

fn number_from_file(file: &str) -> Option<u32> {
    let name = file.rsplit('/').next()?.trim_end_matches(".md");
    let lower = name.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("adr")
        .map(|r| r.trim_start_matches([' ', '-', '_']))
        .unwrap_or(&lower);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = &rest[digits.len()..];
    if digits.is_empty() || !(after.is_empty() || after.starts_with(['-', '_', ' ', '.'])) {
        return None;
    }
    digits.parse().ok()
}

fn number_from_title(title: &str) -> Option<u32> {
    let head = title.split(':').next()?;
    parse_adr_ref(head)
}

fn clean_word(s: &str) -> String {
    s.trim_matches(|c: char| {
        matches!(c, '*' | '_' | '[' | ']' | '`' | ':' | '.' | ',' | '(' | ')') || c.is_whitespace()
    })
    .to_ascii_lowercase()
}

/// Read a status phrase: `Accepted`, `**Accepted**`, `Superseded by [ADR-007](...)`.
fn status_from_phrase(phrase: &str) -> Option<AdrStatus> {
    let mut words = phrase.split_whitespace().map(clean_word).filter(|w| !w.is_empty());
    let first = words.next()?;
    Some(match first.as_str() {
        "accepted" | "approved" | "adopted" | "decided" => AdrStatus::Accepted,
        "implemented" | "done" => AdrStatus::Implemented,
        "proposed" | "draft" | "open" | "pending" => AdrStatus::Proposed,
        "rejected" | "declined" | "withdrawn" => AdrStatus::Rejected,
        "deprecated" => AdrStatus::Deprecated,
        "superseded" | "replaced" => {
            let rest: Vec<String> = words.collect();
            let by = rest.iter().skip_while(|w| *w == "by").find_map(|w| {
                let link_text = w.split(']').next().unwrap_or(w);
                parse_adr_ref(link_text)
            });
            AdrStatus::Superseded { by }
        }
        _ => return None,
    })
}

/// What an ADR says its status is: a status driftless knows, or a word it does not know (so
/// that the ADR is refused with that line, never silently applied or ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
enum StatusSeen {
    Known(AdrStatus, u32),
    Unknown(String, u32),
}

/// The status and its 1-based line, in any of the forms the ADR world uses.
#[cfg(test)]
fn find_status(lines: &[&str]) -> Option<(AdrStatus, u32)> {
    match read_status(lines)? {
        StatusSeen::Known(s, line) => Some((s, line)),
        StatusSeen::Unknown(..) => None,
    }
}

fn seen(phrase: &str, line: u32) -> Option<StatusSeen> {
    let word = phrase.split_whitespace().map(clean_word).find(|w| !w.is_empty())?;
    Some(match status_from_phrase(phrase) {
        Some(s) => StatusSeen::Known(s, line),
        None => StatusSeen::Unknown(word, line),
    })
}

/// The cells of a markdown table row, or `None` for a line that is not one.
fn table_cells(line: &str) -> Option<Vec<String>> {
    let t = line.trim();
    if !t.starts_with('|') {
        return None;
    }
    Some(t.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
}

fn read_status(lines: &[&str]) -> Option<StatusSeen> {
    // MADR front matter: `---` / `status: accepted` / `---`.
    if lines.first().is_some_and(|l| l.trim() == "---") {
        for (i, l) in lines.iter().enumerate().skip(1) {
            if l.trim() == "---" {
                break;
            }
            if let Some(v) = l.strip_prefix("status:") {
                return seen(v.trim().trim_matches(['"', '\'']), i as u32 + 1);
            }
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim().trim_start_matches(['-', '*', '>', ' ']).trim_start();
        // `## Status` section: the status is the first word of the first non-empty line.
        if t.starts_with('#') && t.trim_start_matches('#').trim().eq_ignore_ascii_case("status") {
            let (j, next) = lines
                .iter()
                .enumerate()
                .skip(i + 1)
                .find(|(_, l)| !l.trim().is_empty())?;
            return seen(next, j as u32 + 1);
        }
        // Tables: a `| Status | Accepted |` row, or a `Status` column whose value is in the
        // first row under the header's separator.
        if let Some(cells) = table_cells(line) {
            let is_status = |c: &String| clean_word(c) == "status";
            let separator = lines.get(i + 1).and_then(|l| table_cells(l)).filter(|sep| {
                sep.iter()
                    .all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':' | ' ')))
            });
            if let (Some(col), Some(_)) = (cells.iter().position(is_status), separator) {
                // A header row: the value is in the first row under the separator.
                if let Some(value) = lines
                    .get(i + 2)
                    .and_then(|l| table_cells(l))
                    .and_then(|r| r.get(col).cloned())
                {
                    return seen(&value, i as u32 + 3);
                }
            } else if cells.len() >= 2
                && is_status(&cells[0])
                && let Some(found) = seen(&cells[1], i as u32 + 1)
            {
                return Some(found);
            }
        }
        // `**Status:** Accepted`, `**Status**: Accepted`, `Status: Accepted`.
        let unbold = t.replace("**", "").replace("__", "");
        let unbold = unbold.trim_start();
        if unbold.len() > 7
            && unbold.is_char_boundary(7)
            && unbold[..7].eq_ignore_ascii_case("status:")
            && let Some(found) = seen(&unbold[7..], i as u32 + 1)
        {
            return Some(found);
        }
    }
    None
}

/// `Supersedes ADR-001`, `**Supersedes:** [ADR-001](...), ADR-002`, front matter `supersedes: ADR-001`.
/// Every ADR id after the word on that line counts; link targets and other words do not.
fn find_supersedes(lines: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for line in lines {
        let lower = line.to_ascii_lowercase();
        let Some(idx) = lower.find("supersedes") else { continue };
        let rest = &lower[idx + "supersedes".len()..];
        for w in rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
            if w.starts_with("adr")
                && let Some(n) = parse_adr_ref(w)
            {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn fence_info(line: &str) -> Option<(&str, &str)> {
    let t = line.trim_start();
    let fence = if t.starts_with("```") {
        "```"
    } else if t.starts_with("~~~") {
        "~~~"
    } else {
        return None;
    };
    Some((fence, t.trim_start_matches(fence.chars().next().unwrap()).trim()))
}

fn find_block(file: &str, lines: &[&str]) -> Result<Option<AdrBlock>, Diagnostic> {
    let mut found: Option<(usize, AdrBlock)> = None;
    let mut i = 0;
    while i < lines.len() {
        let Some((fence, info)) = fence_info(lines[i]) else {
            i += 1;
            continue;
        };
        let mut words = info.split_whitespace();
        let is_ours = words.next() == Some("yaml") && words.any(|w| w == "driftless");
        let start = i;
        let end = lines[i + 1..]
            .iter()
            .position(|l| l.trim_start().starts_with(fence))
            .map(|p| p + i + 1);
        let Some(end) = end else {
            return if is_ours {
                Err(Diagnostic::new(
                    Location::new(file, start as u32 + 1, 1),
                    "the ```yaml driftless block is never closed",
                )
                .hint("end it with a line of ```"))
            } else {
                Ok(found.map(|(_, b)| b))
            };
        };
        if is_ours {
            if let Some((first, _)) = &found {
                return Err(Diagnostic::new(
                    Location::new(file, start as u32 + 1, 1),
                    "an ADR may hold one ```yaml driftless block; this is the second",
                )
                .related(Location::new(file, *first as u32 + 1, 1), "the first block")
                .hint("merge the two blocks into one"));
            }
            let yaml = lines[start + 1..end].join("\n") + "\n";
            found = Some((
                start,
                AdrBlock {
                    yaml,
                    line_offset: start as u32 + 1,
                },
            ));
        }
        i = end + 1;
    }
    Ok(found.map(|(_, b)| b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_seed_status_forms() {
        let bold = "# ADR-001: LXC\n\n**Status:** Accepted\n**Date:** 2026-01-05\n";
        let a = parse("adr/ADR-001-lxc.md", bold, &mut Vec::new())
            .unwrap()
            .expect("an ADR without config is still listed");
        assert_eq!((a.number, a.block.is_none()), (1, true));
        let lines: Vec<&str> = bold.lines().collect();
        assert_eq!(find_status(&lines), Some((AdrStatus::Accepted, 3)));

        let section = "# ADR 003: k3s\n\n## Status\n\nImplemented\n\n## Context\n";
        let lines: Vec<&str> = section.lines().collect();
        assert_eq!(find_status(&lines), Some((AdrStatus::Implemented, 5)));

        let bold_section = "# ADR-002\n\n## Status\n**Accepted**\n";
        let lines: Vec<&str> = bold_section.lines().collect();
        assert_eq!(find_status(&lines), Some((AdrStatus::Accepted, 4)));

        let madr = "---\nstatus: proposed\ndate: 2026-01-01\n---\n# Use X\n";
        let lines: Vec<&str> = madr.lines().collect();
        assert_eq!(find_status(&lines), Some((AdrStatus::Proposed, 2)));

        let sup = "# ADR-4\n\n**Status:** Superseded by [ADR-007](ADR-007.md)\n";
        let lines: Vec<&str> = sup.lines().collect();
        assert_eq!(find_status(&lines).unwrap().0, AdrStatus::Superseded { by: Some(7) });
    }

    #[test]
    fn reads_status_tables_and_the_synonyms_public_adr_repositories_use() {
        let row = "# ADR-5\n\n| | |\n|---|---|\n| Status | Decided |\n| Date | 2024-02-01 |\n";
        let lines: Vec<&str> = row.lines().collect();
        assert_eq!(find_status(&lines), Some((AdrStatus::Accepted, 5)));
        let column = "# ADR-6\n\n| Status | Date | Deciders |\n|:--|---|---|\n| Pending | 2024-02-01 | ops |\n";
        let lines: Vec<&str> = column.lines().collect();
        assert_eq!(find_status(&lines), Some((AdrStatus::Proposed, 5)));
        let withdrawn = "# ADR-7\n\nStatus: Withdrawn\n";
        let lines: Vec<&str> = withdrawn.lines().collect();
        assert_eq!(find_status(&lines), Some((AdrStatus::Rejected, 3)));
    }

    #[test]
    fn an_unknown_status_word_leaves_the_adr_out_with_a_warning_at_its_line() {
        let text = "# ADR-008: x\n\n**Status:** Ratified\n\n```yaml driftless\ncores: 8\n```\n";
        let mut warnings = Vec::new();
        assert_eq!(parse("adr/ADR-008-x.md", text, &mut warnings).unwrap(), None);
        assert_eq!(warnings.len(), 1);
        let w = crate::model::diag::Warning(&warnings[0]).to_string();
        assert!(
            w.starts_with("adr/ADR-008-x.md:3:1: warning: status `ratified` is not one driftless knows: this ADR's config is not applied"),
            "{w}"
        );
        // Without config it is only a document: listed nowhere, warned about nowhere.
        let mut none = Vec::new();
        assert_eq!(
            parse("adr/ADR-009-y.md", "# ADR-009: y\n\n**Status:** Ratified\n", &mut none).unwrap(),
            None
        );
        assert!(none.is_empty());
    }

    #[test]
    fn reads_numbers_from_file_or_title() {
        assert_eq!(number_from_file("adr/ADR-001-lxc.md"), Some(1));
        assert_eq!(number_from_file("docs/decisions/0007-use-talos.md"), Some(7));
        assert_eq!(number_from_file("adr/lxc.md"), None);
        assert_eq!(number_from_title("ADR 003: k3s as Container Runtime"), Some(3));
        assert_eq!(parse_adr_ref("adr-0007"), Some(7));
        assert_eq!(parse_adr_ref("ADR-7x"), None);
    }

    #[test]
    fn finds_the_block_and_its_offset() {
        let text = "# ADR-001: x\n**Status:** Accepted\n\n```yaml driftless\ncores: 2\n```\n";
        let adr = parse("adr/ADR-001.md", text, &mut Vec::new()).unwrap().unwrap();
        let block = adr.block.unwrap();
        assert_eq!(block.yaml, "cores: 2\n");
        assert_eq!(block.line_offset, 4, "cores is on line 5 of the file");
    }

    #[test]
    fn refuses_two_blocks_and_unclosed_blocks() {
        let two = "# ADR-001\n**Status:** Accepted\n```yaml driftless\na: 1\n```\n```yaml driftless\nb: 1\n```\n";
        let err = parse("adr/ADR-001.md", two, &mut Vec::new()).unwrap_err();
        assert_eq!(err[0].location.line, 6);
        let open = "# ADR-001\n**Status:** Accepted\n```yaml driftless\na: 1\n";
        assert!(
            parse("adr/ADR-001.md", open, &mut Vec::new()).unwrap_err()[0]
                .message
                .contains("never closed")
        );
    }

    #[test]
    fn reads_supersedes() {
        let lines = ["**Supersedes:** [ADR-001](x.md), ADR-002"];
        assert_eq!(find_supersedes(&lines), vec![1, 2]);
        assert_eq!(find_supersedes(&["supersedes: ADR-0004"]), vec![4]);
        assert!(find_supersedes(&["This ADR supersedes nothing"]).is_empty());
        assert_eq!(find_supersedes(&["Status: Accepted, supersedes ADR-3"]), vec![3]);
    }
}
