//! Proxmox VE guest config files: `/etc/pve/nodes/NODE/lxc/VMID.conf` (containers) and
//! `/etc/pve/nodes/NODE/qemu-server/VMID.conf` (virtual machines).
//!
//! The grammar is pve-container `parse_pct_config` / `write_pct_config` (Config.pm) and
//! qemu-server `parse_vm_config` / `write_vm_config` (QemuServer.pm), as summarised in
//! `lxc-conf-format.md`:
//!
//! * `#` lines are the description (percent-encoded with `encode_text`);
//! * `key: value` options, written sorted ASCII-betically;
//! * LXC only: raw `lxc.*` keys (`:` or ` =` on input, always `: ` on output), kept in
//!   order after the options, `lxc.environment.runtime` lines collected as `env`;
//! * a pending section (`[pve:pending]` for LXC, `[PENDING]` for QEMU) that may hold
//!   `delete: opt1,opt2`; QEMU `[special:cloudinit]`/`[special:fleecing]` sections;
//!   snapshot sections `[name]`, written sorted by name.
//!
//! `parse` is Proxmox's strict mode (first problem is an error); `parse_lenient` is what
//! pmxcfs readers do (warn, keep going, keep what Proxmox keeps).
//!
//! Known gaps: QEMU drive values are not re-printed through `parse_drive`/`print_drive`;
//! `unusedN` entries whose volume is still referenced are not dropped on write; a QEMU
//! pending section with a defined-but-empty description (written `#`) is not modelled.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use regex::Regex;
use sha1::{Digest, Sha1};

use crate::pve::api_schema::ApiSchema;
use crate::pve::lxc_keys::{RawKeyVerdict, check_raw_key};

/// Which kind of guest, as Proxmox names it in paths, listings and config directories. The
/// repository says `vm` where Proxmox says `qemu` (`model::schema::PveKind`); everything
/// that talks to Proxmox uses this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PveKind {
    /// LXC container (`lxc/VMID.conf`).
    Lxc,
    /// QEMU virtual machine (`qemu-server/VMID.conf`).
    Qemu,
}

impl PveKind {
    /// The path segment: `/nodes/{node}/lxc/...`, `/nodes/{node}/qemu/...`.
    pub fn path(self) -> &'static str {
        match self {
            PveKind::Lxc => "lxc",
            PveKind::Qemu => "qemu",
        }
    }

    /// The header of the pending section as Proxmox writes it.
    pub fn pending_header(self) -> &'static str {
        match self {
            PveKind::Lxc => "[pve:pending]",
            PveKind::Qemu => "[PENDING]",
        }
    }
}

/// One section of a config file: the current config, the pending changes, a special
/// section or a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Section {
    /// The description as Proxmox stores it: LXC keeps one `\n` after every `#` line,
    /// QEMU trims trailing whitespace. See [`normalize_description`].
    pub description: String,
    /// Every other `key: value` (values as Proxmox normalises them: booleans `0`/`1`,
    /// integers without leading zeros). Written sorted.
    pub options: BTreeMap<String, String>,
    /// LXC: values of `lxc.environment.runtime` lines (`VAR=value`), in file order.
    /// The API shows them NUL-joined as `env`.
    pub env: Vec<String>,
    /// LXC: raw `lxc.*` pairs in file order (duplicates allowed).
    pub raw_lxc: Vec<(String, String)>,
}

impl Section {
    /// True when nothing would be written for this section.
    pub fn is_empty(&self) -> bool {
        !perl_truthy(&self.description) && self.options.is_empty() && self.env.is_empty() && self.raw_lxc.is_empty()
    }

    /// The API's `env` value (entries NUL-separated), if any.
    pub fn env_api_value(&self) -> Option<String> {
        (!self.env.is_empty()).then(|| self.env.join("\0"))
    }
}

/// A parsed guest config file. Dereferences to the current section, so
/// `conf.options`, `conf.description`, `conf.raw_lxc` and `conf.env` work directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConf {
    pub kind: PveKind,
    /// The current config (everything before the first section header).
    pub current: Section,
    /// The pending section; empty means there is none.
    pub pending: Section,
    /// The pending section's `delete:` list (option names, `!name` = forced deletion).
    pub pending_delete: Vec<String>,
    /// QEMU `[special:NAME]` sections (`cloudinit`, `fleecing`), values not validated.
    pub special: BTreeMap<String, Section>,
    /// Snapshot sections by name.
    pub snapshots: BTreeMap<String, Section>,
}

impl Deref for GuestConf {
    type Target = Section;
    fn deref(&self) -> &Section {
        &self.current
    }
}

impl DerefMut for GuestConf {
    fn deref_mut(&mut self) -> &mut Section {
        &mut self.current
    }
}

/// A problem found while parsing (or, for [`ConfError::NotWritable`], before writing).
/// Line numbers are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfError {
    #[error("line {line}: unable to parse config: {text}")]
    Unparsable { line: usize, text: String },
    #[error("line {line}: {key}: {reason}")]
    RejectedLxcKey { line: usize, key: String, reason: String },
    /// Only a warning: Proxmox keeps the key. [`parse`] never returns it.
    #[error("line {line}: {key}: {note}")]
    DeprecatedLxcKey { line: usize, key: String, note: String },
    #[error("line {line}: property 'delete' is only allowed in {header}")]
    DeleteOutsidePending { line: usize, header: &'static str },
    #[error("line {line}: unable to parse value of '{key}' - {reason}")]
    InvalidValue { line: usize, key: String, reason: String },
    #[error("line {line}: duplicate section: {name}")]
    DuplicateSection { line: usize, name: String },
    #[error("line {line}: skipping unknown section: '{name}'")]
    UnknownSection { line: usize, name: String },
    #[error("section '{section}': {what}")]
    NotWritable { section: String, what: String },
}

impl ConfError {
    /// The line the problem is on (none for write-time problems).
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfError::Unparsable { line, .. }
            | ConfError::RejectedLxcKey { line, .. }
            | ConfError::DeprecatedLxcKey { line, .. }
            | ConfError::DeleteOutsidePending { line, .. }
            | ConfError::InvalidValue { line, .. }
            | ConfError::DuplicateSection { line, .. }
            | ConfError::UnknownSection { line, .. } => Some(*line),
            ConfError::NotWritable { .. } => None,
        }
    }

    /// Warnings do not stop Proxmox even in strict mode.
    pub fn is_warning(&self) -> bool {
        matches!(self, ConfError::DeprecatedLxcKey { .. })
    }
}

const WS: &str = r"[ \t\n\x0B\x0C\r]";

/// The section header patterns of the grammar. Every line of a file goes through the line
/// patterns, which are hand-written below (a regex with captures costs microseconds a line,
/// most of the time of rendering a config); headers are rare and keep Proxmox's regexes
/// (case-insensitive matching the way Perl does it), compiled when the first `[` line
/// comes.
struct Grammar {
    pending_lxc: Regex,
    pending_qemu: Regex,
    special: Regex,
    snapshot: Regex,
    any_section: Regex,
}

fn grammar() -> &'static Grammar {
    static G: OnceLock<Grammar> = OnceLock::new();
    G.get_or_init(|| {
        let r = |p: String| Regex::new(&p).expect("static config grammar regex");
        Grammar {
            pending_lxc: r(format!(r"^\[(?i:pve:pending)\]{WS}*$")),
            pending_qemu: r(format!(r"^\[(?i:PENDING)\]{WS}*$")),
            special: r(format!(r"^\[(?i:special:(cloudinit|fleecing))\]{WS}*$")),
            snapshot: r(format!(r"^\[((?i:[a-z][a-z0-9_\-]+))\]{WS}*$")),
            any_section: r(format!(r"^\[([^\]]*)\]{WS}*$")),
        }
    })
}

// The line patterns of Proxmox's parsers, matched by hand. Each function is exactly its
// regex (WS is `[ \t\n\x0B\x0C\r]`, NWS its complement) on a line without `\n`; the
// tests check them against the regexes on generated lines.

/// `^(lxc\.[a-z0-9_\-.]+)(:|WS*=)WS*(.*?)WS*$`: a raw key and its value.
fn match_raw_lxc(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("lxc.")?;
    let n = rest
        .bytes()
        .take_while(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.'))
        .count();
    if n == 0 {
        return None;
    }
    let after = &rest[n..];
    let value = match after.strip_prefix(':') {
        Some(value) => value,
        None => after.trim_start_matches(is_perl_space).strip_prefix('=')?,
    };
    Some((&line[..4 + n], value.trim_matches(is_perl_space)))
}

/// `^KEYWORDWS*(.*NWS)WS*$` (`description:`, `args:`, `delete:`): the value without the
/// whitespace around it, which must not be empty.
fn match_keyword<'a>(line: &'a str, keyword: &str) -> Option<&'a str> {
    let value = line.strip_prefix(keyword)?.trim_matches(is_perl_space);
    (!value.is_empty()).then_some(value)
}

/// `snapstate:WS*(prepare|delete)WS*$`, anywhere in the line.
fn match_snapstate(line: &str) -> Option<&'static str> {
    line.match_indices("snapstate:").find_map(|(at, _)| {
        match line[at + "snapstate:".len()..].trim_matches(is_perl_space) {
            "prepare" => Some("prepare"),
            "delete" => Some("delete"),
            _ => None,
        }
    })
}

/// `^([a-z][a-z_]*[0-9]*):WS*(.+?)WS*$` (QEMU keys may hold `-` too): a key and its value.
fn match_option(line: &str, kind: PveKind) -> Option<(&str, &str)> {
    let b = line.as_bytes();
    if !b.first()?.is_ascii_lowercase() {
        return None;
    }
    let mut i = 1;
    while i < b.len() && (b[i].is_ascii_lowercase() || b[i] == b'_' || (kind == PveKind::Qemu && b[i] == b'-')) {
        i += 1;
    }
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if b.get(i) != Some(&b':') {
        return None;
    }
    let rest = &line[i + 1..];
    let trimmed = rest.trim_matches(is_perl_space);
    let value = if trimmed.is_empty() {
        // Only whitespace after the colon: `.+?` still takes one character, the last.
        let last = rest.chars().next_back()?;
        &rest[rest.len() - last.len_utf8()..]
    } else {
        trimmed
    };
    Some((&line[..i], value))
}

fn is_perl_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C')
}

/// Perl truth of a string (false for "" and "0").
fn perl_truthy(s: &str) -> bool {
    !(s.is_empty() || s == "0")
}

#[derive(Clone, PartialEq, Eq)]
enum Target {
    Current,
    Pending,
    Special(String),
    Snapshot(String),
    /// QEMU: lines after an unknown section header are ignored.
    Skip,
}

struct Parser {
    kind: PveKind,
    conf: GuestConf,
    target: Target,
    descr: Option<String>,
    /// Section headers seen so far (QEMU reports duplicates).
    seen: Vec<String>,
    problems: Vec<ConfError>,
}

impl Parser {
    fn section(&mut self) -> &mut Section {
        match &self.target {
            Target::Current | Target::Skip => &mut self.conf.current,
            Target::Pending => &mut self.conf.pending,
            Target::Special(n) => self.conf.special.entry(n.clone()).or_default(),
            Target::Snapshot(n) => self.conf.snapshots.entry(n.clone()).or_default(),
        }
    }

    fn finish_description(&mut self) {
        let Some(descr) = self.descr.take() else {
            return;
        };
        match self.kind {
            PveKind::Lxc => {
                if perl_truthy(&descr) {
                    self.section().description = descr;
                }
            }
            PveKind::Qemu => {
                self.section().description = descr.trim_end().to_string();
            }
        }
    }

    /// Switch to a new section: Proxmox replaces any earlier section of the same name.
    fn enter(&mut self, line: usize, target: Target) {
        self.finish_description();
        let name = match &target {
            Target::Pending => "pending".to_string(),
            Target::Special(n) => format!("special:{n}"),
            Target::Snapshot(n) => n.clone(),
            Target::Current | Target::Skip => String::new(),
        };
        if self.seen.contains(&name) {
            if self.kind == PveKind::Qemu {
                let name = name.trim_start_matches("special:").to_string();
                self.problems.push(ConfError::DuplicateSection { line, name });
            }
        } else {
            self.seen.push(name);
        }
        match &target {
            Target::Pending => {
                self.conf.pending = Section::default();
                self.conf.pending_delete.clear();
            }
            Target::Special(n) => {
                self.conf.special.insert(n.clone(), Section::default());
            }
            Target::Snapshot(n) => {
                self.conf.snapshots.insert(n.clone(), Section::default());
            }
            Target::Current | Target::Skip => {}
        }
        self.target = target;
    }

    /// A section header: true when `line` is one (and the section was entered or skipped).
    fn header(&mut self, lineno: usize, line: &str) -> bool {
        let g = grammar();
        let pending_re = match self.kind {
            PveKind::Lxc => &g.pending_lxc,
            PveKind::Qemu => &g.pending_qemu,
        };
        if pending_re.is_match(line) {
            self.enter(lineno, Target::Pending);
            return true;
        }
        if self.kind == PveKind::Qemu
            && let Some(c) = g.special.captures(line)
        {
            self.enter(lineno, Target::Special(c[1].to_string()));
            return true;
        }
        if let Some(c) = g.snapshot.captures(line) {
            self.enter(lineno, Target::Snapshot(c[1].to_string()));
            return true;
        }
        if self.kind == PveKind::Qemu
            && let Some(c) = g.any_section.captures(line)
        {
            self.finish_description();
            self.problems.push(ConfError::UnknownSection {
                line: lineno,
                name: c[1].to_string(),
            });
            self.target = Target::Skip;
            return true;
        }
        false
    }

    /// One line (without its `\n`).
    fn line(&mut self, lineno: usize, line: &str) {
        if line.chars().all(is_perl_space) {
            return;
        }
        // Every header pattern starts with `^\[`.
        if line.starts_with('[') && self.header(lineno, line) {
            return;
        }
        if self.target == Target::Skip {
            return;
        }

        if let Some(text) = line.strip_prefix('#') {
            let descr = self.descr.get_or_insert_with(String::new);
            descr.push_str(&decode_text(text));
            descr.push('\n');
            return;
        }

        if self.kind == PveKind::Lxc
            && let Some((key, value)) = match_raw_lxc(line)
        {
            let key = key.to_string();
            let value = value.to_string();
            if key == "lxc.environment.runtime" {
                self.section().env.push(value);
                return;
            }
            match check_raw_key(&key) {
                RawKeyVerdict::Allowed => self.section().raw_lxc.push((key, value)),
                RawKeyVerdict::Deprecated { note } => {
                    self.problems.push(ConfError::DeprecatedLxcKey {
                        line: lineno,
                        key: key.clone(),
                        note,
                    });
                    self.section().raw_lxc.push((key, value));
                }
                RawKeyVerdict::Rejected { reason } => self.problems.push(ConfError::RejectedLxcKey {
                    line: lineno,
                    key,
                    reason,
                }),
                RawKeyVerdict::Unknown => self.problems.push(ConfError::Unparsable {
                    line: lineno,
                    text: line.to_string(),
                }),
            }
            return;
        }

        if let Some(value) = match_keyword(line, "description:") {
            let descr = self.descr.get_or_insert_with(String::new);
            descr.push_str(&decode_text(value));
        } else if let Some(value) = match_snapstate(line) {
            // Proxmox drops it from the current config; other sections keep it.
            if self.target != Target::Current {
                self.section().options.insert("snapstate".into(), value.to_string());
            }
        } else if self.kind == PveKind::Qemu
            && let Some(value) = match_keyword(line, "args:")
        {
            let value = value.to_string();
            self.section().options.insert("args".into(), value);
        } else if let Some(value) = match_keyword(line, "delete:") {
            if self.target == Target::Pending {
                self.conf.pending_delete = parse_pending_delete(value);
            } else {
                self.problems.push(ConfError::DeleteOutsidePending {
                    line: lineno,
                    header: self.kind.pending_header(),
                });
            }
        } else if let Some((key, raw)) = match_option(line, self.kind) {
            let mut key = key.to_string();
            let raw = raw.to_string();
            if matches!(self.target, Target::Special(_)) {
                self.section().options.insert(key, raw);
                return;
            }
            match check_type(self.kind, &key, &raw) {
                Ok(value) => {
                    if self.kind == PveKind::Qemu && key == "cdrom" {
                        key = "ide2".into();
                    }
                    self.section().options.insert(key, value);
                }
                Err(reason) => {
                    self.problems.push(ConfError::InvalidValue {
                        line: lineno,
                        key: key.clone(),
                        reason: reason.trim_end().to_string(),
                    });
                    // pve-container stores the value anyway; qemu-server does not.
                    if self.kind == PveKind::Lxc {
                        self.section().options.insert(key, raw);
                    }
                }
            }
        } else {
            self.problems.push(ConfError::Unparsable {
                line: lineno,
                text: line.to_string(),
            });
        }
    }
}

/// `parse_pending_delete`: entries separated by `,`, `;` or whitespace.
fn parse_pending_delete(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c == ';' || is_perl_space(c))
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// `check_type` of pve-container / qemu-server: unknown keys, line feeds, boolean /
/// integer / number syntax, and `format` of strings. Returns the normalised value, or
/// Perl's message (ending in a newline).
fn check_type(kind: PveKind, key: &str, value: &str) -> Result<String, String> {
    let schema = ApiSchema::embedded();
    let lookup = if kind == PveKind::Qemu && key == "cdrom" {
        "ide2"
    } else {
        key
    };
    let Some(prop) = schema.config_property(kind, lookup) else {
        return Err(format!("unknown setting '{key}'\n"));
    };
    if value.contains(['\n', '\r']) {
        return Err("property contains a line feed\n".into());
    }
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match prop.ty.as_deref() {
        Some("boolean") => match value.to_ascii_lowercase().as_str() {
            "1" | "on" | "yes" | "true" => Ok("1".into()),
            "0" | "off" | "no" | "false" => Ok("0".into()),
            _ => Err(format!("type check ('boolean') failed - got '{value}'\n")),
        },
        Some("integer") if all_digits(value) => Ok(value
            .parse::<u64>()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| value.to_string())),
        Some("integer") => Err(format!("type check ('integer') failed - got '{value}'\n")),
        Some("number") => {
            let ok = match value.split_once('.') {
                Some((i, f)) => all_digits(i) && all_digits(f),
                None => all_digits(value),
            };
            if ok {
                Ok(value.to_string())
            } else {
                Err(format!("type check ('number') failed - got '{value}'\n"))
            }
        }
        Some("string") => {
            if let Some(format) = &prop.format {
                schema.check_format(format, value, "")?;
                return Ok(value.to_string());
            }
            if kind == PveKind::Qemu
                && let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'))
            {
                return Ok(inner.to_string());
            }
            Ok(value.to_string())
        }
        _ => Err("internal error\n".into()),
    }
}

fn parse_impl(text: &str, kind: PveKind) -> (GuestConf, Vec<ConfError>) {
    let mut p = Parser {
        kind,
        conf: GuestConf::new(kind),
        target: Target::Current,
        descr: None,
        seen: Vec::new(),
        problems: Vec::new(),
    };
    for (i, line) in text.split('\n').enumerate() {
        p.line(i + 1, line);
    }
    p.finish_description();
    (p.conf, p.problems)
}

/// Parse a config file strictly: the first problem (other than a deprecation warning)
/// is returned as an error, as Proxmox does in strict mode.
pub fn parse(text: &str, kind: PveKind) -> Result<GuestConf, ConfError> {
    let (conf, problems) = parse_impl(text, kind);
    match problems.into_iter().find(|p| !p.is_warning()) {
        Some(err) => Err(err),
        None => Ok(conf),
    }
}

/// Parse like pmxcfs readers do: every problem is reported, nothing stops parsing, and
/// what Proxmox keeps is kept (LXC keeps invalid option values; QEMU drops them).
pub fn parse_lenient(text: &str, kind: PveKind) -> (GuestConf, Vec<ConfError>) {
    parse_impl(text, kind)
}

impl GuestConf {
    /// An empty config.
    pub fn new(kind: PveKind) -> GuestConf {
        GuestConf {
            kind,
            current: Section::default(),
            pending: Section::default(),
            pending_delete: Vec::new(),
            special: BTreeMap::new(),
            snapshots: BTreeMap::new(),
        }
    }

    /// Parse (strict); same as [`parse`].
    pub fn parse(text: &str, kind: PveKind) -> Result<GuestConf, ConfError> {
        parse(text, kind)
    }

    /// The file text, byte for byte as Proxmox writes it.
    pub fn write(&self) -> String {
        let mut out = String::new();
        self.write_section(&mut out, &self.current, None);
        if !self.pending.is_empty() || !self.pending_delete.is_empty() {
            out.push('\n');
            out.push_str(self.kind.pending_header());
            out.push('\n');
            self.write_section(&mut out, &self.pending, Some(&self.pending_delete));
        }
        if self.kind == PveKind::Qemu {
            for (name, section) in &self.special {
                let _ = write!(out, "\n[special:{name}]\n");
                self.write_section(&mut out, section, None);
            }
        }
        for (name, section) in &self.snapshots {
            let _ = write!(out, "\n[{name}]\n");
            self.write_section(&mut out, section, None);
        }
        out
    }

    fn write_section(&self, out: &mut String, s: &Section, delete: Option<&Vec<String>>) {
        if perl_truthy(&s.description) {
            for line in perl_lines(&s.description) {
                out.push('#');
                out.push_str(&encode_text(line));
                out.push('\n');
            }
        }
        let delete_value = delete.filter(|d| !d.is_empty()).map(|d| d.join(","));
        let mut entries: Vec<(&str, &str)> = s
            .options
            .iter()
            .filter(|(k, _)| !(delete_value.is_some() && k.as_str() == "delete"))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(d) = &delete_value {
            entries.push(("delete", d.as_str()));
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        }
        for (k, v) in entries {
            let _ = writeln!(out, "{k}: {v}");
        }
        if self.kind == PveKind::Lxc {
            for v in &s.env {
                let _ = writeln!(out, "lxc.environment.runtime: {v}");
            }
            for (k, v) in &s.raw_lxc {
                let _ = writeln!(out, "{k}: {v}");
            }
        }
    }

    /// Things that would make [`write`](Self::write) produce a file that does not parse
    /// back to `self`: newlines inside keys or values (Proxmox dies on those), and env /
    /// raw `lxc.*` entries on a QEMU config (they are not written).
    pub fn check_writable(&self) -> Result<(), ConfError> {
        let mut sections: Vec<(String, &Section)> =
            vec![("current".into(), &self.current), ("pending".into(), &self.pending)];
        sections.extend(self.special.iter().map(|(n, s)| (format!("special:{n}"), s)));
        sections.extend(self.snapshots.iter().map(|(n, s)| (n.clone(), s)));
        let bad = |section: &str, what: String| ConfError::NotWritable {
            section: section.to_string(),
            what,
        };
        for (name, s) in sections {
            for (k, v) in &s.options {
                if k.contains('\n') || v.contains('\n') {
                    return Err(bad(&name, format!("detected invalid newline inside property '{k}'")));
                }
            }
            for v in &s.env {
                if v.contains('\n') {
                    return Err(bad(&name, "newline inside lxc.environment.runtime".into()));
                }
            }
            for (k, v) in &s.raw_lxc {
                if k.contains('\n') || v.contains('\n') {
                    return Err(bad(&name, format!("newline inside raw key '{k}'")));
                }
            }
            if self.kind == PveKind::Qemu && (!s.env.is_empty() || !s.raw_lxc.is_empty()) {
                return Err(bad(&name, "raw lxc.* entries in a QEMU config".into()));
            }
        }
        if self.pending_delete.iter().any(|d| d.contains(['\n', ','])) {
            return Err(bad("pending", "invalid entry in delete list".into()));
        }
        Ok(())
    }

    /// SHA-1 of the text [`write`](Self::write) produces (what the API calls `digest`).
    pub fn digest(&self) -> String {
        digest(&self.write())
    }
}

/// Perl `split(/\n/, $s)`: trailing empty fields are dropped.
fn perl_lines(s: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = s.split('\n').collect();
    while lines.last() == Some(&"") {
        lines.pop();
    }
    lines
}

/// The description Proxmox hands back after writing `description` and reading it again.
pub fn normalize_description(description: &str, kind: PveKind) -> String {
    if !perl_truthy(description) {
        return String::new();
    }
    let lines = perl_lines(description);
    match kind {
        PveKind::Lxc => {
            let out: String = lines.iter().map(|l| format!("{l}\n")).collect();
            if perl_truthy(&out) { out } else { String::new() }
        }
        PveKind::Qemu => lines.join("\n").trim_end().to_string(),
    }
}

/// `PVE::Tools::encode_text`: percent-escape (upper-case hex) every UTF-8 byte outside
/// `\x20-\x24\x26-\x39\x3b-\x7e`: control characters, non-ASCII, `%` and `:`.
pub fn encode_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if matches!(b, 0x20..=0x24 | 0x26..=0x39 | 0x3b..=0x7e) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `PVE::Tools::decode_text`: `%XX` unescaped, then UTF-8 decoded (invalid sequences
/// become U+FFFD). A `%` not followed by two hex digits stays as it is.
pub fn decode_text(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16)),
                bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// SHA-1 hex of the raw file text: the `digest` the API returns and accepts.
pub fn digest(text: &str) -> String {
    digest_bytes(text.as_bytes())
}

/// SHA-1 hex of raw file bytes.
pub fn digest_bytes(bytes: &[u8]) -> String {
    let hash = Sha1::digest(bytes);
    let mut out = String::with_capacity(40);
    for b in hash.iter() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Split a property string (`local-lvm:vm-100-disk-0,size=32G`) into pairs, in order.
/// An item without `=` is the default key's value and comes back with the key `""`.
/// Blank items are skipped. The value is everything after the first `=`.
/// (Schema-aware parsing with Proxmox's errors: `ApiSchema::parse_property_string`.)
pub fn parse_property_string(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter(|part| !part.chars().all(is_perl_space))
        .map(|part| match part.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (String::new(), part.to_string()),
        })
        .collect()
}

/// Print a property string the way Proxmox orders it: the default key's value first
/// (without `key=`), then the pairs sorted by key. A `("", value)` pair is used as the
/// default value when `default_key_value` is `None`, and ignored otherwise.
///
/// Proxmox also puts required (non-optional) sub-keys before the optional ones (e.g.
/// LXC `name=` in `net0`, `mp=` in `mp0`); use [`print_property_string_ordered`] or
/// `ApiSchema::print_property_string` for that.
pub fn print_property_string(default_key_value: Option<&str>, pairs: &[(String, String)]) -> String {
    print_property_string_ordered(default_key_value, &[], pairs)
}

/// Like [`print_property_string`], with the `required` keys (sorted) before the rest.
pub fn print_property_string_ordered(
    default_key_value: Option<&str>,
    required: &[&str],
    pairs: &[(String, String)],
) -> String {
    let default = default_key_value.or_else(|| pairs.iter().find(|(k, _)| k.is_empty()).map(|(_, v)| v.as_str()));
    let mut keyed: Vec<&(String, String)> = pairs.iter().filter(|(k, _)| !k.is_empty()).collect();
    keyed.sort_by(|a, b| {
        let ra = !required.contains(&a.0.as_str());
        let rb = !required.contains(&b.0.as_str());
        ra.cmp(&rb).then_with(|| a.0.cmp(&b.0))
    });
    let mut out: Vec<String> = Vec::with_capacity(pairs.len() + 1);
    if let Some(d) = default {
        out.push(d.to_string());
    }
    out.extend(keyed.iter().map(|(k, v)| format!("{k}={v}")));
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pve-container src/test/snapshot-expected/create/lxc/102.conf (as in
    /// lxc-conf-format.md, snapshot section completed).
    const UPSTREAM_EXAMPLE: &str = "\
arch: amd64
hostname: test
memory: 2048
net0: bridge=vmbr0,hwaddr=12:34:56:78:90:12,ip=dhcp,ip6=dhcp,name=eth0,type=veth
ostype: redhat
parent: test2
rootfs: local:snapshotable-disk-1
swap: 512

[test]
#test comment
arch: amd64
hostname: test
memory: 2048
net0: bridge=vmbr0,hwaddr=12:34:56:78:90:12,ip=dhcp,ip6=dhcp,name=eth0,type=veth
ostype: redhat
rootfs: local:snapshotable-disk-1
snaptime: 1234567890
swap: 512
";

    /// A K3s-in-LXC container as Proxmox writes it (note `lxc.cap.drop: ` keeps the
    /// space before its empty value).
    const K3S_CT: &str = "\
#K3s server%3A managed by driftless
#
#see https%3A//example.org/k3s 100%25
arch: amd64
cores: 2
features: fuse=1,keyctl=1,nesting=1
hostname: k3s-server-1
memory: 4096
net0: name=eth0,bridge=vmbr0,gw=192.168.2.1,hwaddr=BC:24:11:5E:7D:01,ip=192.168.2.20/24,type=veth
onboot: 1
ostype: debian
rootfs: local-lvm:vm-100-disk-0,size=32G
swap: 512
tags: driftless;k3s
unprivileged: 0
lxc.environment.runtime: K3S_TOKEN=abc
lxc.apparmor.profile: unconfined
lxc.cgroup2.devices.allow: a
lxc.cap.drop: 
lxc.mount.auto: proc:rw sys:rw
lxc.mount.entry: /dev/kmsg dev/kmsg none bind,rw,optional,create=file
";

    #[test]
    fn upstream_example_round_trips() {
        let conf = parse(UPSTREAM_EXAMPLE, PveKind::Lxc).unwrap();
        assert_eq!(conf.options["parent"], "test2");
        assert_eq!(conf.options.len(), 8);
        let snap = &conf.snapshots["test"];
        assert_eq!(snap.description, "test comment\n");
        assert_eq!(snap.options["snaptime"], "1234567890");
        assert!(conf.pending.is_empty());
        assert_eq!(conf.write(), UPSTREAM_EXAMPLE);
        assert_eq!(parse(&conf.write(), PveKind::Lxc).unwrap(), conf);
    }

    #[test]
    fn k3s_raw_keys_round_trip() {
        let conf = parse(K3S_CT, PveKind::Lxc).unwrap();
        assert_eq!(
            conf.description,
            "K3s server: managed by driftless\n\nsee https://example.org/k3s 100%\n"
        );
        assert_eq!(conf.env, ["K3S_TOKEN=abc"]);
        assert_eq!(conf.env_api_value().as_deref(), Some("K3S_TOKEN=abc"));
        let raw: Vec<(&str, &str)> = conf.raw_lxc.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            raw,
            [
                ("lxc.apparmor.profile", "unconfined"),
                ("lxc.cgroup2.devices.allow", "a"),
                ("lxc.cap.drop", ""),
                ("lxc.mount.auto", "proc:rw sys:rw"),
                (
                    "lxc.mount.entry",
                    "/dev/kmsg dev/kmsg none bind,rw,optional,create=file"
                ),
            ]
        );
        assert_eq!(conf.write(), K3S_CT);
        assert_eq!(parse(&conf.write(), PveKind::Lxc).unwrap(), conf);
        assert_eq!(digest(K3S_CT), conf.digest());
    }

    #[test]
    fn raw_key_forms_are_normalised_on_write() {
        let text = "\
hostname: ct
lxc.apparmor.profile = unconfined
lxc.cap.drop:
lxc.mount.auto:proc:rw sys:rw   
lxc.cgroup2.devices.allow  =  a
";
        let conf = parse(text, PveKind::Lxc).unwrap();
        assert_eq!(
            conf.write(),
            "\
hostname: ct
lxc.apparmor.profile: unconfined
lxc.cap.drop: 
lxc.mount.auto: proc:rw sys:rw
lxc.cgroup2.devices.allow: a
"
        );
    }

    #[test]
    fn env_lines_come_before_other_raw_keys() {
        let text = "\
hostname: ct
lxc.mount.entry: /a b none bind 0 0
lxc.environment.runtime: A=1
lxc.environment.runtime: B=2
";
        let conf = parse(text, PveKind::Lxc).unwrap();
        assert_eq!(
            conf.write(),
            "\
hostname: ct
lxc.environment.runtime: A=1
lxc.environment.runtime: B=2
lxc.mount.entry: /a b none bind 0 0
"
        );
    }

    #[test]
    fn pending_section_with_delete() {
        let text = "\
cores: 2
hostname: ct
memory: 1024
ostype: debian
rootfs: local-lvm:vm-101-disk-0,size=8G

[pve:pending]
cores: 4
delete: swap,!mp0
memory: 2048
";
        let conf = parse(text, PveKind::Lxc).unwrap();
        assert_eq!(conf.pending.options["cores"], "4");
        assert_eq!(conf.pending_delete, ["swap", "!mp0"]);
        assert!(!conf.pending.options.contains_key("delete"));
        assert_eq!(conf.write(), text);

        // only a delete list still writes the section
        let mut c = parse("hostname: ct\n", PveKind::Lxc).unwrap();
        c.pending_delete.push("swap".into());
        assert_eq!(c.write(), "hostname: ct\n\n[pve:pending]\ndelete: swap\n");
        assert_eq!(parse(&c.write(), PveKind::Lxc).unwrap(), c);

        // header is case-insensitive on input
        let c = parse("hostname: a\n[PVE:Pending]\nhostname: b\n", PveKind::Lxc).unwrap();
        assert_eq!(c.pending.options["hostname"], "b");
    }

    #[test]
    fn delete_outside_pending_is_an_error() {
        let err = parse("hostname: ct\ndelete: swap\n", PveKind::Lxc).unwrap_err();
        assert_eq!(
            err,
            ConfError::DeleteOutsidePending {
                line: 2,
                header: "[pve:pending]"
            }
        );
        assert_eq!(
            err.to_string(),
            "line 2: property 'delete' is only allowed in [pve:pending]"
        );
    }

    #[test]
    fn description_encoding() {
        let mut conf = GuestConf::new(PveKind::Lxc);
        conf.description = "Managed by driftless: k3s\n100% Über\ttab\n".into();
        conf.options.insert("hostname".into(), "ct".into());
        let text = conf.write();
        assert_eq!(
            text,
            "#Managed by driftless%3A k3s\n#100%25 %C3%9Cber%09tab\nhostname: ct\n"
        );
        assert_eq!(parse(&text, PveKind::Lxc).unwrap(), conf);
        // `description:` lines are accepted and decoded (without adding a newline)
        let c = parse("description: a%3Ab\nhostname: x\n", PveKind::Lxc).unwrap();
        assert_eq!(c.description, "a:b");
        assert_eq!(c.write(), "#a%3Ab\nhostname: x\n");
        assert_eq!(decode_text("50%"), "50%");
        assert_eq!(normalize_description("a\n\n", PveKind::Lxc), "a\n");
        assert_eq!(normalize_description("a\n\n", PveKind::Qemu), "a");
        assert_eq!(normalize_description("", PveKind::Lxc), "");
    }

    #[test]
    fn digest_of_known_text() {
        // printf 'arch: amd64\nhostname: test\n' | sha1sum
        assert_eq!(
            digest("arch: amd64\nhostname: test\n"),
            "aeb5d46a1fc02f42739f4129f696f5d1574cd807"
        );
        // printf '' | sha1sum
        assert_eq!(digest(""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    }

    #[test]
    fn rejected_and_unknown_raw_keys() {
        let err = parse("hostname: ct\nlxc.rootfs.path: /x\n", PveKind::Lxc).unwrap_err();
        assert_eq!(
            err,
            ConfError::RejectedLxcKey {
                line: 2,
                key: "lxc.rootfs.path".into(),
                reason: "lxc.rootfs.path is auto generated from rootfs".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "line 2: lxc.rootfs.path: lxc.rootfs.path is auto generated from rootfs"
        );
        let err = parse("lxc.bogus.key: 1\n", PveKind::Lxc).unwrap_err();
        assert_eq!(err.line(), Some(1));
        assert!(matches!(err, ConfError::Unparsable { .. }));
        // deprecated keys only warn and are kept
        let (conf, problems) = parse_lenient("lxc.aa_profile: unconfined\n", PveKind::Lxc);
        assert_eq!(conf.raw_lxc.len(), 1);
        assert!(problems[0].is_warning());
        assert!(parse("lxc.aa_profile: unconfined\n", PveKind::Lxc).is_ok());
    }

    #[test]
    fn invalid_lines_report_line_numbers() {
        let err = parse("hostname: ct\n\ngarbage here\n", PveKind::Lxc).unwrap_err();
        assert_eq!(
            err,
            ConfError::Unparsable {
                line: 3,
                text: "garbage here".into()
            }
        );
        let err = parse("cores: abc\n", PveKind::Lxc).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 1: unable to parse value of 'cores' - type check ('integer') failed - got 'abc'"
        );
        let err = parse("hostname: a\nfoo: bar\n", PveKind::Lxc).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: unable to parse value of 'foo' - unknown setting 'foo'"
        );
        let err = parse("net0: name=eth0,bogus=1\n", PveKind::Lxc).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 1: unable to parse value of 'net0' - invalid key in comma-separated list property: bogus"
        );
        // keys with '-' are not config keys in LXC files
        assert!(matches!(
            parse("ha-managed: 1\n", PveKind::Lxc).unwrap_err(),
            ConfError::Unparsable { line: 1, .. }
        ));
        // lenient mode keeps going and (LXC) keeps the value
        let (conf, problems) = parse_lenient("cores: abc\nhostname: x\n", PveKind::Lxc);
        assert_eq!(problems.len(), 1);
        assert_eq!(conf.options["cores"], "abc");
        assert_eq!(conf.options["hostname"], "x");
    }

    #[test]
    fn values_are_normalised_like_proxmox() {
        let conf = parse("onboot: yes\ncores:   007  \nunprivileged: FALSE\n", PveKind::Lxc).unwrap();
        assert_eq!(conf.options["onboot"], "1");
        assert_eq!(conf.options["cores"], "7");
        assert_eq!(conf.options["unprivileged"], "0");
        assert_eq!(conf.write(), "cores: 7\nonboot: 1\nunprivileged: 0\n");
    }

    #[test]
    fn snapstate_is_dropped_from_current_only() {
        let conf = parse(
            "hostname: a\nsnapstate: prepare\n\n[snap1]\nhostname: a\nsnapstate: delete\n",
            PveKind::Lxc,
        )
        .unwrap();
        assert!(!conf.options.contains_key("snapstate"));
        assert_eq!(conf.snapshots["snap1"].options["snapstate"], "delete");
    }

    #[test]
    fn snapshots_are_written_sorted() {
        let text = "hostname: a\n\n[zeta]\nhostname: z\n\n[alpha]\nhostname: y\n";
        let conf = parse(text, PveKind::Lxc).unwrap();
        assert_eq!(
            conf.write(),
            "hostname: a\n\n[alpha]\nhostname: y\n\n[zeta]\nhostname: z\n"
        );
    }

    const TALOS_VM: &str = "\
#Talos control plane
agent: 1
boot: order=scsi0;ide2
cores: 4
cpu: x86-64-v2-AES
ide2: none,media=cdrom
ipconfig0: ip=192.168.2.30/24,gw=192.168.2.1
memory: 4096
meta: creation-qemu=9.0.2,ctime=1718000000
name: talos-cp-1
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1
numa: 0
ostype: l26
scsi0: local-lvm:vm-200-disk-0,iothread=1,size=32G
scsihw: virtio-scsi-single
sockets: 1
vmgenid: 3c1fd1e8-6d9b-4b0a-9a8e-2f5d2c1e0a11

[PENDING]
memory: 8192

[special:cloudinit]
ipconfig0: ip=192.168.2.30/24,gw=192.168.2.1
name: talos-cp-1
";

    #[test]
    fn qemu_config_round_trips() {
        let conf = parse(TALOS_VM, PveKind::Qemu).unwrap();
        assert_eq!(conf.description, "Talos control plane");
        assert_eq!(conf.pending.options["memory"], "8192");
        assert_eq!(conf.special["cloudinit"].options.len(), 2);
        assert_eq!(conf.write(), TALOS_VM);
        assert_eq!(parse(&conf.write(), PveKind::Qemu).unwrap(), conf);

        // QEMU keys may contain '-'; raw lxc keys are not part of the grammar
        let c = parse("allow-ksm: 0\nname: vm\n", PveKind::Qemu).unwrap();
        assert_eq!(c.options["allow-ksm"], "0");
        assert!(matches!(
            parse("lxc.apparmor.profile: unconfined\n", PveKind::Qemu).unwrap_err(),
            ConfError::Unparsable { line: 1, .. }
        ));
        assert_eq!(
            parse("name: a\ndelete: net1\n", PveKind::Qemu).unwrap_err().to_string(),
            "line 2: property 'delete' is only allowed in [PENDING]"
        );
        assert!(matches!(
            parse("name: a\n[special:bogus]\nname: b\n", PveKind::Qemu).unwrap_err(),
            ConfError::UnknownSection { line: 2, .. }
        ));
        assert!(matches!(
            parse("name: a\n[PENDING]\n[PENDING]\nname: c\n", PveKind::Qemu).unwrap_err(),
            ConfError::DuplicateSection { line: 3, .. }
        ));
        // `args` is taken verbatim, cdrom becomes ide2
        let c = parse("args: -no-reboot -smbios 'type=0'\ncdrom: none\n", PveKind::Qemu).unwrap();
        assert_eq!(c.options["args"], "-no-reboot -smbios 'type=0'");
        assert_eq!(c.options["ide2"], "none");
    }

    #[test]
    fn check_writable_catches_newlines() {
        let mut c = GuestConf::new(PveKind::Lxc);
        c.options.insert("hostname".into(), "a\nb".into());
        assert!(c.check_writable().is_err());
        let mut q = GuestConf::new(PveKind::Qemu);
        q.raw_lxc.push(("lxc.apparmor.profile".into(), "x".into()));
        assert!(q.check_writable().is_err());
        assert!(parse(K3S_CT, PveKind::Lxc).unwrap().check_writable().is_ok());
    }

    /// The hand-written line patterns against Proxmox's regexes (as this module compiled
    /// them before), on lines generated from the pieces that matter to them.
    #[test]
    fn line_patterns_match_like_the_regexes() {
        const NWS: &str = r"[^ \t\n\x0B\x0C\r]";
        let re = |p: String| Regex::new(&p).unwrap();
        let raw_lxc = re(format!(r"^(lxc\.[a-z0-9_\-.]+)(:|{WS}*=){WS}*(.*?){WS}*$"));
        let keyword = |k: &str| re(format!(r"^{k}:{WS}*(.*{NWS}){WS}*$"));
        let keywords = [
            ("description:", keyword("description")),
            ("args:", keyword("args")),
            ("delete:", keyword("delete")),
        ];
        let snapstate = re(format!(r"snapstate:{WS}*(prepare|delete){WS}*$"));
        let option_lxc = re(format!(r"^([a-z][a-z_]*[0-9]*):{WS}*(.+?){WS}*$"));
        let option_qemu = re(format!(r"^([a-z][a-z_\-]*[0-9]*):{WS}*(.+?){WS}*$"));
        // A line is a head (what the patterns look for first) and up to 8 pieces.
        const HEADS: &[&str] = &[
            "",
            "",
            "lxc.",
            "lxc.cap.drop",
            "lxc.net.0.type",
            "description:",
            "args:",
            "delete:",
            "snapstate:",
            "x snapstate:",
            "net0:",
            "cores:",
            "a-b:",
        ];
        const PIECES: &[&str] = &[
            "lxc.",
            "lxc",
            ".",
            "snapstate:",
            "prepare",
            "delete",
            ":",
            "=",
            "a",
            "z",
            "net",
            "0",
            "9",
            "_",
            "-",
            " ",
            " ",
            "\t",
            "\r",
            "\x0b",
            "\x0c",
            "A",
            "é",
            "ſ",
            "#",
            "[",
            "]",
            "%3A",
            "\u{a0}",
        ];
        // xorshift64: the same lines on every run.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut pick = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let group = |c: &regex::Captures<'_>, i: usize| c.get(i).map_or("", |m| m.as_str()).to_string();
        for _ in 0..40_000 {
            let mut line = HEADS[pick(HEADS.len())].to_string();
            for _ in 0..pick(9) {
                line.push_str(PIECES[pick(PIECES.len())]);
            }
            let own = |r: Option<(&str, &str)>| r.map(|(a, b)| (a.to_string(), b.to_string()));
            assert_eq!(
                own(match_raw_lxc(&line)),
                raw_lxc.captures(&line).map(|c| (group(&c, 1), group(&c, 3))),
                "raw lxc {line:?}"
            );
            for (word, regex) in &keywords {
                assert_eq!(
                    match_keyword(&line, word).map(str::to_string),
                    regex.captures(&line).map(|c| group(&c, 1)),
                    "{word} {line:?}"
                );
            }
            assert_eq!(
                match_snapstate(&line).map(str::to_string),
                snapstate.captures(&line).map(|c| group(&c, 1)),
                "snapstate {line:?}"
            );
            for (kind, regex) in [(PveKind::Lxc, &option_lxc), (PveKind::Qemu, &option_qemu)] {
                assert_eq!(
                    own(match_option(&line, kind)),
                    regex.captures(&line).map(|c| (group(&c, 1), group(&c, 2))),
                    "{kind:?} option {line:?}"
                );
            }
        }
    }

    #[test]
    fn property_string_helpers() {
        let pairs = parse_property_string("local-lvm:vm-100-disk-0,size=32G");
        assert_eq!(
            pairs,
            [
                ("".to_string(), "local-lvm:vm-100-disk-0".to_string()),
                ("size".to_string(), "32G".to_string())
            ]
        );
        assert_eq!(print_property_string(None, &pairs), "local-lvm:vm-100-disk-0,size=32G");
        let pairs = parse_property_string("size=8G,mount=nfs;cifs,,ro=1");
        assert_eq!(pairs[1], ("mount".into(), "nfs;cifs".into()));
        assert_eq!(
            print_property_string(Some("local:8"), &pairs),
            "local:8,mount=nfs;cifs,ro=1,size=8G"
        );
        let net = parse_property_string("type=veth,ip=dhcp,bridge=vmbr0,name=eth0");
        assert_eq!(
            print_property_string(None, &net),
            "bridge=vmbr0,ip=dhcp,name=eth0,type=veth"
        );
        assert_eq!(
            print_property_string_ordered(None, &["name"], &net),
            "name=eth0,bridge=vmbr0,ip=dhcp,type=veth"
        );
    }
}
