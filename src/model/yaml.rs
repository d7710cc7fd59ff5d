//! YAML with positions. Every key and value keeps its line and column, so typing errors,
//! unknown keys and the provenance of every final value point at the exact place in a file.
//!
//! Parsing uses saphyr-parser's event stream; scalars are resolved with the YAML 1.2 core
//! schema (so `yes` stays a string and `"644"` stays a string), the way K3s and Talos read YAML.
//!
//! A pull request controls the YAML it brings, so what one document can cost is bounded: nesting
//! at most [`MAX_DEPTH`] levels (the tree is walked recursively later), and at most
//! [`MAX_COPIED_BYTES`] copied by anchors and aliases together. An alias is expanded into a copy of
//! its anchor's node, so without that limit a few hundred bytes of nested aliases (the "billion
//! laughs") expand to gigabytes. The size of a file is bounded where files are read
//! (`crate::model::load::limits`).

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde_json::Value as Json;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct YNode {
    pub pos: Pos,
    pub value: YValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum YValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<YNode>),
    Map(Vec<(YKey, YNode)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct YKey {
    pub name: String,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// The deepest nesting of lists and mappings a document may have. Repository files use a
/// handful of levels; the tree is walked recursively, so depth is what a stack overflow needs.
pub const MAX_DEPTH: usize = 64;

/// What anchors and aliases may copy, in total, in one document: each alias copies its anchor's
/// node, each anchor keeps a copy. Measured as the size of the copied nodes ([`weight`]), roughly
/// bytes of memory. Anchors that name a block of defaults reused by a few nodes copy kilobytes.
pub const MAX_COPIED_BYTES: u64 = 4 * 1024 * 1024;

/// The approximate memory of one node besides its text: the node, or a mapping entry.
const NODE_WEIGHT: u64 = 64;

fn pos_of(span: &Span, line_offset: u32) -> Pos {
    Pos {
        line: span.start.line() as u32 + line_offset,
        col: span.start.col() as u32 + 1,
    }
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<YNode>,
        /// The weight of the items so far.
        weight: u64,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(YKey, YNode)>,
        key: Option<YKey>,
        weight: u64,
    },
}

impl Frame {
    fn add_weight(&mut self, w: u64) {
        match self {
            Frame::Seq { weight, .. } | Frame::Map { weight, .. } => *weight += w,
        }
    }
}

fn too_deep(pos: Pos) -> YamlError {
    YamlError {
        pos,
        message: format!("YAML nested more than {MAX_DEPTH} levels deep"),
    }
}

/// Parse one YAML document. `line_offset` shifts reported lines, for YAML embedded in
/// another file (an ADR's config block). An empty document is `Null`.
pub fn parse(text: &str, line_offset: u32) -> Result<YNode, YamlError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    // Each anchored node, with its weight.
    let mut anchors: HashMap<usize, (YNode, u64)> = HashMap::new();
    let mut root: Option<YNode> = None;
    let mut documents = 0;
    // What anchors and aliases copied so far.
    let mut copied: u64 = 0;

    while let Some(ev) = parser.next_event() {
        let (event, span) = ev.map_err(|e| {
            let err = YamlError {
                pos: Pos {
                    line: e.marker().line() as u32 + line_offset,
                    col: e.marker().col() as u32 + 1,
                },
                message: format!("invalid YAML: {}", e.info()),
            };
            unclosed_flow(text, line_offset, &stack, &err).unwrap_or(err)
        })?;
        let pos = pos_of(&span, line_offset);
        let done: Option<(YNode, usize, u64)> = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(YamlError {
                        pos,
                        message: "expected one YAML document, found several (`---`)".into(),
                    });
                }
                None
            }
            Event::Scalar(text, style, anchor, tag) => {
                let is_str_tag = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let weight = NODE_WEIGHT + text.len() as u64;
                let value = if style == ScalarStyle::Plain && !is_str_tag {
                    resolve_plain(&text)
                } else {
                    YValue::Str(text.into_owned())
                };
                Some((YNode { pos, value }, anchor, weight))
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((n, weight)) => {
                    // Counted before the copy is made: the limit stops a bomb before it allocates.
                    copied += weight;
                    if copied > MAX_COPIED_BYTES {
                        return Err(alias_bomb(pos));
                    }
                    Some((
                        YNode {
                            pos,
                            value: n.value.clone(),
                        },
                        0,
                        *weight,
                    ))
                }
                None => {
                    return Err(YamlError {
                        pos,
                        message: "alias to an unknown anchor".into(),
                    });
                }
            },
            Event::SequenceStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(too_deep(pos));
                }
                stack.push(Frame::Seq {
                    pos,
                    anchor,
                    items: Vec::new(),
                    weight: NODE_WEIGHT,
                });
                None
            }
            Event::MappingStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(too_deep(pos));
                }
                stack.push(Frame::Map {
                    pos,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                    weight: NODE_WEIGHT,
                });
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq {
                    pos,
                    anchor,
                    items,
                    weight,
                }) => Some((
                    YNode {
                        pos,
                        value: YValue::Seq(items),
                    },
                    anchor,
                    weight,
                )),
                _ => unreachable!("parser balances sequences"),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    weight,
                    ..
                }) => Some((
                    YNode {
                        pos,
                        value: YValue::Map(entries),
                    },
                    anchor,
                    weight,
                )),
                _ => unreachable!("parser balances mappings"),
            },
            _ => None,
        };
        let Some((node, anchor, weight)) = done else { continue };
        if anchor != 0 {
            // The anchor's copy costs as much as an alias's: nested anchors copy their subtree
            // once per level.
            copied += weight;
            if copied > MAX_COPIED_BYTES {
                return Err(alias_bomb(node.pos));
            }
            anchors.insert(anchor, (node.clone(), weight));
        }
        if let Some(parent) = stack.last_mut() {
            parent.add_weight(weight);
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => {
                    let name = match &node.value {
                        YValue::Str(s) => s.clone(),
                        YValue::Int(i) => i.to_string(),
                        YValue::Bool(b) => b.to_string(),
                        YValue::Float(f) => f.to_string(),
                        YValue::Null => String::new(),
                        _ => {
                            return Err(YamlError {
                                pos: node.pos,
                                message: "a mapping key must be a plain value".into(),
                            });
                        }
                    };
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.name == name) {
                        return Err(YamlError {
                            pos: node.pos,
                            message: format!("duplicate key `{name}` (first at line {})", first.pos.line),
                        });
                    }
                    *key = Some(YKey { name, pos: node.pos });
                }
                Some(k) => entries.push((k, node)),
            },
        }
    }
    Ok(root.unwrap_or(YNode {
        pos: Pos {
            line: 1 + line_offset,
            col: 1,
        },
        value: YValue::Null,
    }))
}

fn alias_bomb(pos: Pos) -> YamlError {
    YamlError {
        pos,
        message: format!(
            "YAML anchors and aliases expand to more than {} MiB (each alias copies its anchor's \
             node: nested aliases multiply)",
            MAX_COPIED_BYTES / (1024 * 1024)
        ),
    }
}

/// A `[` or `{` left open on its line (`tags: [a, b` and the next key below) makes the parser
/// stumble lines later; the place to look is where the list or mapping was opened. Flow
/// collections meant to span lines end their lines with `[`, `{` or `,` and are left alone.
fn unclosed_flow(text: &str, line_offset: u32, stack: &[Frame], err: &YamlError) -> Option<YamlError> {
    let open = match stack.last()? {
        Frame::Seq { pos, .. } | Frame::Map { pos, .. } => *pos,
    };
    if open.line >= err.pos.line {
        return None;
    }
    let line = text.lines().nth(open.line.checked_sub(line_offset + 1)? as usize)?;
    let from_bracket: String = line.chars().skip(open.col as usize - 1).collect();
    let bracket = from_bracket.chars().next().filter(|c| matches!(c, '[' | '{'))?;
    let code = from_bracket.split(" #").next().unwrap_or("").trim_end();
    if code.ends_with(['[', '{', ',']) {
        return None;
    }
    let closer = if bracket == '[' { ']' } else { '}' };
    Some(YamlError {
        pos: open,
        message: format!(
            "invalid YAML: `{bracket}` is never closed (add `{closer}` at the end of the line; \
             the parser stopped at line {}: {})",
            err.pos.line,
            err.message.trim_start_matches("invalid YAML: ")
        ),
    })
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(s: &str) -> YValue {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return YValue::Null,
        "true" | "True" | "TRUE" => return YValue::Bool(true),
        "false" | "False" | "FALSE" => return YValue::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(i) = s.parse::<i64>()
    {
        return YValue::Int(i);
    }
    if let Some(hex) = s.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return YValue::Int(i);
    }
    if let Some(oct) = s.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return YValue::Int(i);
    }
    let looks_float = digits.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_float && let Ok(f) = s.parse::<f64>() {
        return YValue::Float(f);
    }
    match s {
        ".inf" | "+.inf" | ".Inf" => YValue::Float(f64::INFINITY),
        "-.inf" | "-.Inf" => YValue::Float(f64::NEG_INFINITY),
        _ => YValue::Str(s.to_string()),
    }
}

impl YNode {
    pub fn to_json(&self) -> Json {
        match &self.value {
            YValue::Null => Json::Null,
            YValue::Bool(b) => Json::Bool(*b),
            YValue::Int(i) => Json::from(*i),
            YValue::Float(f) => serde_json::Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
            YValue::Str(s) => Json::String(s.clone()),
            YValue::Seq(items) => Json::Array(items.iter().map(YNode::to_json).collect()),
            YValue::Map(entries) => Json::Object(entries.iter().map(|(k, v)| (k.name.clone(), v.to_json())).collect()),
        }
    }

    /// The position of what `path` names: the key, for a mapping entry (that is where a
    /// reader looks), the item for a sequence element. Falls back to the deepest part found.
    pub fn pos_at(&self, path: &[Seg]) -> Pos {
        let mut node = self;
        let mut pos = self.pos;
        for seg in path {
            match (seg, &node.value) {
                (Seg::Key(k), YValue::Map(entries)) => match entries.iter().find(|(key, _)| &key.name == k) {
                    Some((key, v)) => {
                        pos = key.pos;
                        node = v;
                    }
                    None => return pos,
                },
                (Seg::Index(i), YValue::Seq(items)) => match items.get(*i) {
                    Some(v) => {
                        pos = v.pos;
                        node = v;
                    }
                    None => return pos,
                },
                _ => return pos,
            }
        }
        pos
    }

    /// The position of the value (not the key) at `path`.
    pub fn value_pos_at(&self, path: &[Seg]) -> Pos {
        let mut node = self;
        for seg in path {
            let next = match (seg, &node.value) {
                (Seg::Key(k), YValue::Map(entries)) => entries.iter().find(|(key, _)| &key.name == k).map(|(_, v)| v),
                (Seg::Index(i), YValue::Seq(items)) => items.get(*i),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => return self.pos_at(path),
            }
        }
        node.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_positions_of_keys_and_values() {
        let doc = parse(
            "name: a\nlxc:\n  features: {nesting: true}\n  raw:\n    - lxc.cap.drop: \"\"\n",
            0,
        )
        .unwrap();
        assert_eq!(doc.pos_at(&[Seg::Key("name".into())]), Pos { line: 1, col: 1 });
        let nesting = [
            Seg::Key("lxc".into()),
            Seg::Key("features".into()),
            Seg::Key("nesting".into()),
        ];
        assert_eq!(doc.pos_at(&nesting), Pos { line: 3, col: 14 });
        assert_eq!(
            doc.pos_at(&[Seg::Key("lxc".into()), Seg::Key("raw".into()), Seg::Index(0)])
                .line,
            5
        );
    }

    #[test]
    fn resolves_scalars_with_the_core_schema() {
        let doc = parse("a: \"644\"\nb: 644\nc: yes\nd: true\ne: ~\nf: 1.5\n", 0)
            .unwrap()
            .to_json();
        assert_eq!(
            doc,
            serde_json::json!({"a": "644", "b": 644, "c": "yes", "d": true, "e": null, "f": 1.5})
        );
    }

    #[test]
    fn reports_syntax_errors_and_duplicate_keys_with_line() {
        let err = parse("a: 1\nb: [1, 2\n", 10).unwrap_err();
        assert!(err.pos.line >= 12, "{err:?}");
        let err = parse("a: 1\nb: 2\na: 3\n", 0).unwrap_err();
        assert_eq!(err.pos.line, 3);
        assert!(err.message.contains("duplicate key `a`"));
    }

    #[test]
    fn an_unclosed_flow_list_is_reported_where_it_opens() {
        let err = parse("a: 1\ntags: [x, y\nb: 2\n", 0).unwrap_err();
        assert_eq!(err.pos, Pos { line: 2, col: 7 }, "{err:?}");
        assert!(err.message.contains("`[` is never closed"), "{err:?}");
        // a list meant to span lines keeps the parser's own place
        let err = parse("tags: [x,\n  y\nb: 2\n", 0).unwrap_err();
        assert_eq!(err.pos.line, 3, "{err:?}");
    }

    /// The classic "billion laughs": nine levels of nine aliases each, 9^9 strings once expanded.
    fn billion_laughs() -> String {
        let mut text = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for (prev, name) in "abcdefgh".chars().zip("bcdefghi".chars()) {
            let refs = vec![format!("*{prev}"); 9].join(", ");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        text
    }

    #[test]
    fn an_alias_bomb_is_refused_where_it_explodes() {
        let text = billion_laughs();
        assert!(text.len() < 600, "{}", text.len());
        let started = std::time::Instant::now();
        let err = parse(&text, 0).unwrap_err();
        assert!(
            err.message.contains("anchors and aliases expand to more than 4 MiB"),
            "{err:?}"
        );
        // Level e holds 9^4 copies of a: the budget runs out there or at the next level, long
        // before the 9^9 strings of level i.
        assert!((5..=7).contains(&err.pos.line), "{err:?}");
        // Generous: the point is that nothing near gigabytes was built (that takes minutes).
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn ordinary_anchors_and_aliases_still_work() {
        let doc = parse(
            "defaults: &d {cores: 2, memory: 2048}\nnodes:\n  - *d\n  - *d\nname: &n web\nalso: *n\n",
            0,
        )
        .unwrap()
        .to_json();
        assert_eq!(doc["nodes"][1], serde_json::json!({"cores": 2, "memory": 2048}));
        assert_eq!(doc["also"], "web");
        // Hundreds of aliases of a small block are far below the budget.
        let many = format!(
            "d: &d {{cores: 2, memory: 2048, tags: [a, b, c]}}\nnodes: [{}]\n",
            vec!["*d"; 500].join(", ")
        );
        assert!(parse(&many, 0).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_at_the_level_past_the_limit() {
        let flow = format!("a: {}{}\n", "[".repeat(MAX_DEPTH + 10), "]".repeat(MAX_DEPTH + 10));
        let err = parse(&flow, 3).unwrap_err();
        assert!(err.message.contains("nested more than 64 levels deep"), "{err:?}");
        // The mapping is level 1, so the 64th `[` (column 4 + 63) is one too many.
        assert_eq!(err.pos, Pos { line: 4, col: 4 + 63 }, "{err:?}");
        let mut block = String::new();
        for depth in 0..MAX_DEPTH + 1 {
            block.push_str(&format!("{}k{depth}:\n", "  ".repeat(depth)));
        }
        let err = parse(&block, 0).unwrap_err();
        assert!(err.message.contains("nested more than 64 levels deep"), "{err:?}");
        let ok = format!("a: {}{}\n", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert!(parse(&ok, 0).is_ok());
    }

    #[test]
    fn line_offset_shifts_positions() {
        let doc = parse("cores: 2\n", 40).unwrap();
        assert_eq!(doc.pos_at(&[Seg::Key("cores".into())]).line, 41);
    }
}
