//! Parsed files and the typed view of them: every serde complaint becomes a diagnostic at its key.

use crate::model::diag::{Diagnostic, Diagnostics, Location, did_you_mean};
use crate::model::yaml::{self, Seg, YNode};
use serde::de::DeserializeOwned;
use serde_json::Value as Json;

/// A parsed YAML file or block and the file it belongs to.
pub(crate) struct Doc {
    pub file: String,
    pub root: YNode,
}

impl Doc {
    pub fn loc(&self, path: &[Seg]) -> Location {
        let p = self.root.pos_at(path);
        Location::new(&self.file, p.line, p.col)
    }

    pub fn value_loc(&self, path: &[Seg]) -> Location {
        let p = self.root.value_pos_at(path);
        Location::new(&self.file, p.line, p.col)
    }
}

pub(super) fn keys(path: &[&str]) -> Vec<Seg> {
    path.iter().map(|k| Seg::Key(k.to_string())).collect()
}

pub(super) fn parse_doc(file: &str, bytes: &[u8], line_offset: u32, diags: &mut Diagnostics) -> Option<Doc> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            diags.push(Diagnostic::new(
                Location::file_start(file),
                format!("not UTF-8 text: {e}"),
            ));
            return None;
        }
    };
    match yaml::parse(text, line_offset) {
        Ok(root) => Some(Doc {
            file: file.to_string(),
            root,
        }),
        Err(e) => {
            diags.push(Diagnostic::new(Location::new(file, e.pos.line, e.pos.col), e.message));
            None
        }
    }
}

/// Human words for serde's type names.
fn humanize(msg: &str) -> String {
    let mut m = msg.to_string();
    // A whole number out of range (`vlan: 70000`, `vmid: -1`) is still a whole number: say the range.
    if m.starts_with("invalid value: integer") {
        for (from, to) in [
            ("expected u16", "expected a whole number from 0 to 65535"),
            ("expected u32", "expected a whole number from 0 to 4294967295"),
            ("expected u64", "expected a whole number from 0 up"),
        ] {
            m = m.replace(from, to);
        }
    }
    for (from, to) in [
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a mapping"),
        ("invalid type: map", "invalid type: mapping"),
        ("invalid type: sequence", "invalid type: list"),
    ] {
        m = m.replace(from, to);
    }
    m
}

fn backticked(msg: &str) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).collect()
}

/// Deserialize `json` (found at `base` inside `doc`) into `T`, turning serde's complaint
/// into a diagnostic at the exact key. `extra` adds names to "did you mean" candidates.
pub(crate) fn typed<T: DeserializeOwned>(json: Json, doc: &Doc, base: &[Seg], extra: &[&str]) -> Result<T, Diagnostic> {
    serde_path_to_error::deserialize::<_, T>(json).map_err(|e| {
        let mut path: Vec<Seg> = base.to_vec();
        for seg in e.path().iter() {
            match seg {
                serde_path_to_error::Segment::Map { key } => path.push(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
                _ => {}
            }
        }
        let msg = e.into_inner().to_string();
        let mut shown = display_path(&path);
        if let Some(rest) = msg.strip_prefix("unknown field ") {
            let words = backticked(rest);
            let field = words.first().copied().unwrap_or("");
            // serde_path_to_error's path ends with the unknown key itself: say where it is.
            if path.len() > base.len() && path.last() == Some(&Seg::Key(field.to_string())) {
                path.pop();
                shown = display_path(&path);
            }
            let mut candidates: Vec<&str> = words.iter().skip(1).copied().collect();
            candidates.extend_from_slice(extra);
            path.push(Seg::Key(field.to_string()));
            let place = if shown.is_empty() {
                String::new()
            } else {
                format!(" in `{shown}`")
            };
            Diagnostic::new(doc.loc(&path), format!("unknown key `{field}`{place}")).maybe_hint(
                did_you_mean(field, candidates).or_else(|| {
                    let known: Vec<&str> = words.iter().skip(1).copied().collect();
                    (!known.is_empty()).then(|| format!("known keys here: {}", known.join(", ")))
                }),
            )
        } else if let Some(rest) = msg.strip_prefix("missing field ") {
            let field = backticked(rest).first().copied().unwrap_or("").to_string();
            let loc = if path.len() == base.len() && base.is_empty() {
                Location::file_start(&doc.file)
            } else {
                doc.loc(&path)
            };
            let place = if shown.is_empty() {
                String::new()
            } else {
                format!(" under `{shown}`")
            };
            Diagnostic::new(loc, format!("missing required key `{field}`{place}"))
        } else if let Some(rest) = msg.strip_prefix("unknown variant ") {
            let words = backticked(rest);
            let got = words.first().copied().unwrap_or("");
            Diagnostic::new(doc.value_loc(&path), format!("`{shown}`: unknown value `{got}`")).maybe_hint(
                did_you_mean(got, words.iter().skip(1).copied()).or_else(|| {
                    Some(format!(
                        "one of: {}",
                        words.iter().skip(1).copied().collect::<Vec<_>>().join(", ")
                    ))
                }),
            )
        } else if msg.starts_with("data did not match any variant") {
            Diagnostic::new(doc.value_loc(&path), format!("`{shown}`: wrong type of value"))
        } else {
            Diagnostic::new(doc.value_loc(&path), format!("`{shown}`: {}", humanize(&msg)))
        }
    })
}

fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Split a mapping into the keys named in `take` and the rest.
pub(super) fn split(json: &Json, take: &[&str]) -> (Json, Json) {
    let mut taken = serde_json::Map::new();
    let mut rest = serde_json::Map::new();
    if let Json::Object(m) = json {
        for (k, v) in m {
            if take.contains(&k.as_str()) {
                taken.insert(k.clone(), v.clone());
            } else {
                rest.insert(k.clone(), v.clone());
            }
        }
    }
    (Json::Object(taken), Json::Object(rest))
}
