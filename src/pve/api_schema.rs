//! Parameter validation against the official Proxmox VE API schema.
//!
//! The schema is a trimmed copy of pve-docs' `apidata.js` (PVE 9.1.3) holding only the
//! endpoints driftless calls: `src/pve/pve-api-subset.json`, produced by
//! `tools/extract-pve-api-subset.py` and embedded with `include_str!`.
//!
//! The checks follow pve-common `PVE::JSONSchema` (`check_prop`, `check_object`,
//! `check_type`, `check_format`, `parse_property_string`) closely enough that the error
//! map is the one a real node answers with in its HTTP 400 body, messages included.
//! Two things are deliberately not the same:
//! * Formats registered by name whose definition is not in the schema and not
//!   reimplemented here (`pve-qm-boot`, `pve-vm-cpu-conf`, ...) are accepted.
//! * `pve-ct-timezone` / `timezone` cannot read `/usr/share/zoneinfo/zone.tab` (no I/O):
//!   any value is accepted.
//!
//! Values are strings, as in a form-encoded request. Like Proxmox, a top-level boolean
//! must be `0` or `1` (JSON `true`/`false` are booleans to Proxmox; turn a JSON body into
//! strings with [`json_params_to_strings`]). Inside property strings Proxmox itself
//! normalises `on|yes|true` / `off|no|false`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{OnceLock, RwLock};

use regex::Regex;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::pve::conf::PveKind;

/// The embedded schema subset (see `tools/extract-pve-api-subset.py`).
pub const SUBSET_JSON: &str = include_str!("pve-api-subset.json");

/// One schema node (a parameter, a property-string sub-key, or an object schema).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Property {
    #[serde(rename = "type", default)]
    pub ty: Option<String>,
    #[serde(default, deserialize_with = "de_perl_bool")]
    pub optional: bool,
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(rename = "enum", default)]
    pub enum_values: Option<Vec<Value>>,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub minimum: Option<Value>,
    #[serde(default)]
    pub maximum: Option<Value>,
    #[serde(rename = "maxLength", default)]
    pub max_length: Option<Value>,
    #[serde(rename = "minLength", default)]
    pub min_length: Option<Value>,
    #[serde(default)]
    pub default: Option<Value>,
    #[serde(default, deserialize_with = "de_perl_bool")]
    pub default_key: bool,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(rename = "keyAlias", default)]
    pub key_alias: Option<String>,
    #[serde(default)]
    pub requires: Option<Value>,
    #[serde(default)]
    pub items: Option<Box<Property>>,
    #[serde(default)]
    pub properties: Option<BTreeMap<String, Property>>,
    #[serde(rename = "additionalProperties", default)]
    pub additional_properties: Option<Value>,
}

/// A `format`: either a registered name (`pve-vmid`, `pve-tag-list`, ...) or a
/// property-string definition (sub-key -> schema).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Format {
    Named(String),
    Properties(BTreeMap<String, Property>),
}

impl Property {
    fn type_is(&self, ty: &str) -> bool {
        self.ty.as_deref() == Some(ty)
    }

    /// The property-string sub-keys, when the format is given inline.
    pub fn format_properties(&self) -> Option<&BTreeMap<String, Property>> {
        match &self.format {
            Some(Format::Properties(map)) => Some(map),
            _ => None,
        }
    }
}

fn de_perl_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(perl_truthy_json(&Value::deserialize(d)?))
}

fn perl_truthy_json(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => perl_truthy(s),
        _ => true,
    }
}

/// Perl's truth of a string: false for "" and "0".
fn perl_truthy(s: &str) -> bool {
    !(s.is_empty() || s == "0")
}

/// A schema value as Perl prints it in a message ("8192", "0").
fn perl_display(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn json_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// One API method on one path.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `GET`, `POST`, `PUT` or `DELETE`.
    pub method: String,
    /// Templated path, e.g. `/nodes/{node}/lxc/{vmid}/config`.
    pub path: String,
    /// The parameter object schema (`additionalProperties`, `properties`).
    pub parameters: Property,
    /// The `returns` schema, as in apidata (documentation strings removed).
    pub returns: Value,
    pub protected: bool,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param(String),
}

impl Endpoint {
    /// Parameter name -> schema (indexed options appear once, as `net[n]`).
    pub fn properties(&self) -> &BTreeMap<String, Property> {
        static EMPTY: BTreeMap<String, Property> = BTreeMap::new();
        self.parameters.properties.as_ref().unwrap_or(&EMPTY)
    }

    /// False when the schema says `additionalProperties: 0` (every endpoint here).
    pub fn allows_additional_properties(&self) -> bool {
        self.parameters
            .additional_properties
            .as_ref()
            .is_none_or(perl_truthy_json)
    }

    fn match_path(&self, segs: &[String]) -> Option<(usize, BTreeMap<String, String>)> {
        if segs.len() != self.segments.len() {
            return None;
        }
        let mut literal = 0;
        let mut params = BTreeMap::new();
        for (seg, want) in segs.iter().zip(&self.segments) {
            match want {
                Segment::Literal(l) if l == seg => literal += 1,
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    params.insert(name.clone(), seg.clone());
                }
            }
        }
        Some((literal, params))
    }
}

/// Validation errors, keyed by parameter (sub-keys as `net0.tag`), as Proxmox reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamErrors {
    pub errors: BTreeMap<String, String>,
}

impl ParamErrors {
    /// `add_error`: an empty path is `_root`; a second message for the same path is
    /// appended after a literal backslash-n (Perl `join('\n', ...)` in single quotes).
    fn add(&mut self, path: &str, msg: impl Into<String>) {
        let path = if path.is_empty() { "_root" } else { path };
        let msg = msg.into();
        self.errors
            .entry(path.to_string())
            .and_modify(|old| {
                old.push_str("\\n");
                old.push_str(&msg);
            })
            .or_insert(msg);
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The message for one parameter.
    pub fn get(&self, param: &str) -> Option<&str> {
        self.errors.get(param).map(String::as_str)
    }

    /// The body of Proxmox's HTTP 400 answer: `{"errors": {...}, "data": null}`.
    pub fn to_proxmox_json(&self) -> Value {
        let mut errors = serde_json::Map::new();
        for (k, v) in &self.errors {
            errors.insert(k.clone(), Value::String(v.clone()));
        }
        let mut body = serde_json::Map::new();
        body.insert("errors".into(), Value::Object(errors));
        body.insert("data".into(), Value::Null);
        Value::Object(body)
    }
}

impl fmt::Display for ParamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Parameter verification failed.")?;
        for (k, v) in &self.errors {
            write!(f, "\n{k}: {}", v.trim_end())?;
        }
        Ok(())
    }
}

impl std::error::Error for ParamErrors {}

/// [`ApiSchema::validate_request`] failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No endpoint with that path; Proxmox answers 501 "Method 'GET /x' not implemented".
    #[error("Method '{method} {path}' not implemented")]
    NotImplemented { method: String, path: String },
    /// HTTP 400 "Parameter verification failed."
    #[error("{0}")]
    Params(ParamErrors),
}

/// All of the subset's endpoints (`index_bounds` is read with the config keys).
#[derive(Deserialize)]
struct RawSubset {
    endpoints: Vec<RawEndpoint>,
}

/// The part of the subset a guest config check needs: every endpoint's `returns` (the
/// config keys are in GET .../config's), their parameters skipped without being built.
#[derive(Deserialize)]
struct RawConfigSubset {
    #[serde(default)]
    index_bounds: BTreeMap<String, u32>,
    endpoints: Vec<RawEndpointReturns>,
}

#[derive(Deserialize)]
struct RawEndpointReturns {
    method: String,
    path: String,
    #[serde(default)]
    returns: Value,
}

#[derive(Deserialize)]
struct RawEndpoint {
    method: String,
    path: String,
    #[serde(default)]
    parameters: Property,
    #[serde(default)]
    returns: Value,
    #[serde(default, deserialize_with = "de_perl_bool")]
    protected: bool,
}

/// The API schema, loaded once. What most runs never use is built on first use: the
/// endpoints (their parameter schemas are most of the subset; rendering and planning only
/// check guest config keys) and the compiled patterns. Building all of it up front was
/// most of a command's start-up, paid by every run of the daemon's worker.
pub struct ApiSchema {
    /// The subset's text, kept to build [`ApiSchema::endpoints`] from.
    source: Cow<'static, str>,
    endpoints: OnceLock<Vec<Endpoint>>,
    index_bounds: BTreeMap<String, u32>,
    /// Perl pattern -> compiled anchored regex (None if it cannot be translated), filled
    /// the first time a value is checked against a pattern.
    patterns: RwLock<HashMap<String, Option<Regex>>>,
    /// Guest config keys (confdesc, from GET .../config `returns`), per kind.
    lxc_config: BTreeMap<String, Property>,
    qemu_config: BTreeMap<String, Property>,
    /// Hash-based formats registered by name that the schema only names.
    named_hash_formats: BTreeMap<String, BTreeMap<String, Property>>,
}

/// `pve-qm-ipconfig` (qemu-server `$ipconfig_fmt`), which apidata only names.
const IPCONFIG_FORMAT: &str = r#"{
  "ip": {"type": "string", "format": "pve-ipv4-config", "optional": 1},
  "gw": {"type": "string", "format": "ipv4", "optional": 1},
  "ip6": {"type": "string", "format": "pve-ipv6-config", "optional": 1},
  "gw6": {"type": "string", "format": "ipv6", "optional": 1}
}"#;

/// LXC keys that only exist in the file (confdesc `parent`, `snaptime`).
const LXC_FILE_ONLY_KEYS: &str = r#"{
  "parent": {"type": "string", "format": "pve-configid", "maxLength": 40, "optional": 1},
  "snaptime": {"type": "integer", "minimum": 0, "optional": 1}
}"#;

impl fmt::Debug for ApiSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSchema")
            .field("endpoints", &self.endpoints.get().map(Vec::len))
            .field("index_bounds", &self.index_bounds)
            .field("lxc_config", &self.lxc_config.len())
            .field("qemu_config", &self.qemu_config.len())
            .finish_non_exhaustive()
    }
}

impl ApiSchema {
    /// The embedded subset, parsed on first use (its endpoints when first asked for).
    pub fn embedded() -> &'static ApiSchema {
        static SCHEMA: OnceLock<ApiSchema> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            ApiSchema::with_lazy_endpoints(Cow::Borrowed(SUBSET_JSON)).expect("embedded pve-api-subset.json is valid")
        })
    }

    /// Load a schema in the format written by `tools/extract-pve-api-subset.py`; all of it
    /// is checked now.
    pub fn from_json(text: &str) -> Result<ApiSchema, serde_json::Error> {
        let schema = ApiSchema::with_lazy_endpoints(Cow::Owned(text.to_string()))?;
        schema.try_endpoints()?;
        Ok(schema)
    }

    /// The config keys now, the endpoints when [`ApiSchema::endpoints`] is first called.
    fn with_lazy_endpoints(source: Cow<'static, str>) -> Result<ApiSchema, serde_json::Error> {
        let raw: RawConfigSubset = serde_json::from_str(&source)?;
        let config_props = |kind: &str| -> Result<BTreeMap<String, Property>, serde_json::Error> {
            let path = format!("/nodes/{{node}}/{kind}/{{vmid}}/config");
            let Some(ep) = raw
                .endpoints
                .iter()
                .find(|e| e.method.eq_ignore_ascii_case("GET") && e.path == path)
            else {
                return Ok(BTreeMap::new());
            };
            let mut map: BTreeMap<String, Property> = match ep.returns.get("properties") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(props) => BTreeMap::<String, Property>::deserialize(props)?,
            };
            map.remove("digest");
            map.remove("lxc");
            Ok(map)
        };
        let mut lxc_config = config_props("lxc")?;
        let lxc_extra: BTreeMap<String, Property> = serde_json::from_str(LXC_FILE_ONLY_KEYS)?;
        for (k, v) in lxc_extra {
            lxc_config.entry(k).or_insert(v);
        }
        let qemu_config = config_props("qemu")?;

        let mut named_hash_formats = BTreeMap::new();
        named_hash_formats.insert("pve-qm-ipconfig".to_string(), serde_json::from_str(IPCONFIG_FORMAT)?);

        Ok(ApiSchema {
            source,
            endpoints: OnceLock::new(),
            index_bounds: raw.index_bounds,
            patterns: RwLock::default(),
            lxc_config,
            qemu_config,
            named_hash_formats,
        })
    }

    fn try_endpoints(&self) -> Result<&[Endpoint], serde_json::Error> {
        if let Some(endpoints) = self.endpoints.get() {
            return Ok(endpoints);
        }
        let raw: RawSubset = serde_json::from_str(&self.source)?;
        let endpoints = raw
            .endpoints
            .into_iter()
            .map(|e| {
                let segments = split_path(&e.path)
                    .into_iter()
                    .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => Segment::Param(name.to_string()),
                        None => Segment::Literal(s),
                    })
                    .collect();
                Endpoint {
                    method: e.method.to_ascii_uppercase(),
                    path: e.path,
                    parameters: e.parameters,
                    returns: e.returns,
                    protected: e.protected,
                    segments,
                }
            })
            .collect();
        // Two threads may both build them; one copy is kept.
        Ok(self.endpoints.get_or_init(|| endpoints))
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        // from_json checked them; the embedded subset's are checked by a unit test.
        self.try_endpoints().expect("the schema's endpoints are valid")
    }

    /// Last valid index of an indexed option (`net` -> 31), if known.
    pub fn index_bound(&self, prefix: &str) -> Option<u32> {
        self.index_bounds.get(prefix).copied()
    }

    /// The endpoint for `method` and a concrete `path` (with or without `/api2/json`,
    /// query string ignored), plus the path parameters (percent-decoded).
    pub fn find(&self, method: &str, path: &str) -> Option<(&Endpoint, BTreeMap<String, String>)> {
        let segs = concrete_segments(path);
        let method = method.to_ascii_uppercase();
        self.endpoints()
            .iter()
            .filter(|e| e.method == method)
            .filter_map(|e| e.match_path(&segs).map(|(lit, params)| (lit, e, params)))
            .max_by_key(|(lit, _, _)| *lit)
            .map(|(_, e, params)| (e, params))
    }

    /// Methods available on a concrete path (empty when the path is unknown).
    pub fn methods_at(&self, path: &str) -> Vec<&str> {
        let segs = concrete_segments(path);
        self.endpoints()
            .iter()
            .filter(|e| e.match_path(&segs).is_some())
            .map(|e| e.method.as_str())
            .collect()
    }

    /// The schema of parameter `name` (`net3` resolves to `net[n]` within its bound).
    pub fn property<'a>(&'a self, endpoint: &'a Endpoint, name: &str) -> Option<&'a Property> {
        self.resolve(endpoint.properties(), name).map(|(_, p)| p)
    }

    /// The file schema (Proxmox `$confdesc`) of a guest config key, e.g. `net0`, `cores`.
    pub fn config_property(&self, kind: PveKind, key: &str) -> Option<&Property> {
        let map = match kind {
            PveKind::Lxc => &self.lxc_config,
            PveKind::Qemu => &self.qemu_config,
        };
        self.resolve(map, key).map(|(_, p)| p)
    }

    /// Validate request parameters (path parameters included) against an endpoint.
    pub fn validate(&self, endpoint: &Endpoint, params: &BTreeMap<String, String>) -> Result<(), ParamErrors> {
        let mut errors = ParamErrors::default();
        self.check_object(
            "",
            endpoint.properties(),
            params,
            endpoint.allows_additional_properties(),
            &mut errors,
        );
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// Find the endpoint, merge the path parameters into `params` (the path wins, as in
    /// Proxmox), and validate. Returns the endpoint and the merged parameters.
    pub fn validate_request(
        &self,
        method: &str,
        path: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<(&Endpoint, BTreeMap<String, String>), RequestError> {
        let Some((endpoint, path_params)) = self.find(method, path) else {
            return Err(RequestError::NotImplemented {
                method: method.to_ascii_uppercase(),
                path: path.to_string(),
            });
        };
        let mut merged = params.clone();
        merged.extend(path_params);
        self.validate(endpoint, &merged).map_err(RequestError::Params)?;
        Ok((endpoint, merged))
    }

    /// Check one value against one schema node, reporting under `name`.
    pub fn check_value(&self, prop: &Property, name: &str, value: &str) -> Result<(), ParamErrors> {
        let mut errors = ParamErrors::default();
        self.check_prop(Some(value), prop, name, &mut errors);
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// `PVE::JSONSchema::check_format`: Ok, or the text Perl's `$@` would hold (ending in
    /// a newline), which callers prefix with "invalid format - ".
    pub fn check_format(&self, format: &Format, value: &str, path: &str) -> Result<(), String> {
        match format {
            Format::Properties(map) => self.parse_property_string(map, value, path).map(|_| ()),
            Format::Named(name) => self.check_named_format(name, value, path),
        }
    }

    /// `PVE::JSONSchema::parse_property_string`: split, resolve default key and aliases,
    /// normalise booleans, then check every sub-key. `path` prefixes sub-key errors
    /// (`net0` gives `net0.tag`).
    pub fn parse_property_string(
        &self,
        format: &BTreeMap<String, Property>,
        data: &str,
        path: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut res: BTreeMap<String, String> = BTreeMap::new();
        let mut default_key: Option<&str> = None;
        for part in data.split(',') {
            if part.chars().all(is_perl_space) {
                continue;
            }
            if let Some((k, v)) = split_key_value(part) {
                if res.contains_key(k) {
                    return Err(format!("duplicate key in comma-separated list property: {k}\n"));
                }
                let mut key = k.to_string();
                let mut schema = format.get(k);
                if let Some(alias) = schema.and_then(|s| s.alias.clone()) {
                    if let Some(key_alias) = schema.and_then(|s| s.key_alias.clone()) {
                        if res.contains_key(&key_alias) {
                            return Err(format!("key alias '{key_alias}' is already defined\n"));
                        }
                        res.insert(key_alias, key.clone());
                    }
                    schema = format.get(&alias);
                    key = alias;
                }
                let Some(schema) = schema else {
                    return Err(format!("invalid key in comma-separated list property: {key}\n"));
                };
                let value = if schema.type_is("boolean") {
                    parse_boolean(v).unwrap_or(v).to_string()
                } else {
                    v.to_string()
                };
                res.insert(key, value);
            } else if !part.contains('=') {
                if let Some(dk) = default_key {
                    return Err(format!("duplicate key in comma-separated list property: {dk}\n"));
                }
                let Some((dk, _)) = format.iter().find(|(_, p)| p.default_key) else {
                    return Err("value without key, but schema does not define a default key\n".into());
                };
                default_key = Some(dk);
                if res.get(dk).is_some_and(|v| perl_truthy(v)) {
                    return Err(format!("duplicate key in comma-separated list property: {dk}\n"));
                }
                res.insert(dk.clone(), part.to_string());
            } else {
                return Err("missing key in comma-separated list property\n".into());
            }
        }
        let mut errors = ParamErrors::default();
        self.check_object(path, format, &res, false, &mut errors);
        if errors.is_empty() {
            Ok(res)
        } else {
            let mut msg = String::from("format error\n");
            for (k, v) in &errors.errors {
                msg.push_str(&format!("{k}: {v}\n"));
            }
            Err(msg)
        }
    }

    /// `PVE::JSONSchema::print_property_string` order: the default key's value first
    /// (without `key=`), then required sub-keys sorted, then the others sorted.
    pub fn print_property_string(
        &self,
        format: &BTreeMap<String, Property>,
        values: &BTreeMap<String, String>,
    ) -> String {
        let default_key = format.iter().find(|(_, p)| p.default_key).map(|(k, _)| k);
        let mut out: Vec<String> = Vec::new();
        let mut done: Vec<&str> = Vec::new();
        if let Some(dk) = default_key
            && let Some(v) = values.get(dk)
        {
            out.push(v.clone());
            done.push(dk);
        }
        for required in [true, false] {
            for (k, v) in values {
                if done.contains(&k.as_str()) {
                    continue;
                }
                let is_required = format.get(k).is_some_and(|p| !p.optional);
                if required && !is_required {
                    continue;
                }
                out.push(format!("{k}={v}"));
                done.push(k);
            }
        }
        out.join(",")
    }

    // ---- internals -------------------------------------------------------------------

    /// Exact name, else `prefixN` -> `prefix[n]` when N is within the known bound.
    fn resolve<'a>(&self, props: &'a BTreeMap<String, Property>, name: &str) -> Option<(&'a str, &'a Property)> {
        if let Some((k, p)) = props.get_key_value(name) {
            return Some((k.as_str(), p));
        }
        let prefix = name.trim_end_matches(|c: char| c.is_ascii_digit());
        let index = &name[prefix.len()..];
        if prefix.is_empty() || index.is_empty() || (index.len() > 1 && index.starts_with('0')) {
            return None;
        }
        let (k, p) = props.get_key_value(&format!("{prefix}[n]"))?;
        let idx: u64 = index.parse().ok()?;
        if let Some(bound) = self.index_bound(prefix)
            && idx > u64::from(bound)
        {
            return None;
        }
        Some((k.as_str(), p))
    }

    fn check_object(
        &self,
        path: &str,
        props: &BTreeMap<String, Property>,
        values: &BTreeMap<String, String>,
        additional_properties: bool,
        errors: &mut ParamErrors,
    ) {
        let join = |k: &str| {
            if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            }
        };
        // Paths are built only for what is checked: most properties of a format are optional
        // and absent, and this runs for every property string of every rendered guest.
        for (name, prop) in props {
            if name.ends_with("[n]") {
                continue; // expanded names are all optional; present ones are checked below
            }
            let value = values.get(name).map(String::as_str);
            if value.is_none() && (prop.optional || prop.alias.is_some()) {
                continue; // what check_prop would find: nothing to check
            }
            self.check_prop(value, prop, &join(name), errors);
        }
        for (k, v) in values {
            match self.resolve(props, k) {
                Some((name, prop)) => {
                    if name.ends_with("[n]") {
                        self.check_prop(Some(v), prop, &join(k), errors);
                    }
                    if let Some(Value::String(req)) = &prop.requires
                        && !values.contains_key(req)
                    {
                        errors.add(
                            &join(req),
                            format!("missing property - '{}' requires this property", join(k)),
                        );
                    }
                }
                None if !additional_properties => errors.add(
                    &join(k),
                    "property is not defined in schema and the schema does not allow additional properties",
                ),
                None => {}
            }
        }
    }

    fn check_prop(&self, value: Option<&str>, prop: &Property, path: &str, errors: &mut ParamErrors) {
        let Some(value) = value else {
            if !prop.optional && prop.alias.is_none() {
                errors.add(path, "property is missing and it is not optional");
            }
            return;
        };
        if let Err(msg) = check_type(prop.ty.as_deref(), value) {
            errors.add(path, msg);
            return;
        }
        if let Some(format) = &prop.format
            && let Err(msg) = self.check_format(format, value, path)
        {
            errors.add(path, format!("invalid format - {msg}"));
            return;
        }
        if let Some(pattern) = &prop.pattern
            && !self.pattern_matches(pattern, value)
        {
            errors.add(path, "value does not match the regex pattern");
            return;
        }
        if let Some(max) = prop.max_length.as_ref()
            && let Some(n) = json_f64(max)
            && value.chars().count() as f64 > n
        {
            errors.add(path, format!("value may only be {} characters long", perl_display(max)));
            return;
        }
        if let Some(min) = prop.min_length.as_ref()
            && let Some(n) = json_f64(min)
            && (value.chars().count() as f64) < n
        {
            errors.add(
                path,
                format!("value must be at least {} characters long", perl_display(min)),
            );
            return;
        }
        if (prop.maximum.is_some() || prop.minimum.is_some()) && is_number(value) {
            let x: f64 = value.parse().unwrap_or(f64::NAN);
            if let Some(max) = prop.maximum.as_ref()
                && let Some(m) = json_f64(max)
                && x > m
            {
                errors.add(
                    path,
                    format!("value must have a maximum value of {}", perl_display(max)),
                );
                return;
            }
            if let Some(min) = prop.minimum.as_ref()
                && let Some(m) = json_f64(min)
                && x < m
            {
                errors.add(
                    path,
                    format!("value must have a minimum value of {}", perl_display(min)),
                );
                return;
            }
        }
        if let Some(values) = &prop.enum_values
            && !values.iter().any(|ev| match ev {
                Value::String(s) => s == value,
                other => perl_display(other) == value,
            })
        {
            let list: Vec<String> = values.iter().map(perl_display).collect();
            errors.add(
                path,
                format!(
                    "value '{value}' does not have a value in the enumeration '{}'",
                    list.join(", ")
                ),
            );
        }
    }

    fn pattern_matches(&self, pattern: &str, value: &str) -> bool {
        // An untranslatable Perl construct is not checked. The regex is used where it is
        // stored, never cloned: a clone starts with an empty match cache, costlier than
        // the match itself.
        let check = |re: &Option<Regex>| re.as_ref().is_none_or(|re| re.is_match(value));
        if let Some(re) = self.patterns.read().unwrap_or_else(|e| e.into_inner()).get(pattern) {
            return check(re);
        }
        let re = compile_perl_pattern(pattern);
        let matched = check(&re);
        self.patterns
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pattern.to_string(), re);
        matched
    }

    fn check_named_format(&self, name: &str, value: &str, path: &str) -> Result<(), String> {
        if name == "regex" {
            return Ok(());
        }
        if let Some(map) = self.named_hash_formats.get(name) {
            return self.parse_property_string(map, value, path).map(|_| ());
        }
        if let Some(base) = name.strip_suffix("-list") {
            for item in split_list(value) {
                check_named_code_format(base, item).unwrap_or(Ok(()))?;
            }
            return Ok(());
        }
        if let Some(base) = name.strip_suffix("-opt") {
            if perl_truthy(value) {
                check_named_code_format(base, value).unwrap_or(Ok(()))?;
            }
            return Ok(());
        }
        check_named_code_format(name, value).unwrap_or(Ok(()))
    }
}

/// Turn a JSON request body into the string map [`ApiSchema::validate`] takes:
/// booleans become `1`/`0` (Proxmox accepts JSON booleans), numbers their decimal text,
/// arrays of scalars are joined with `,` (Proxmox's legacy `-list` handling), nulls dropped.
pub fn json_params_to_strings(body: &serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::Null => None,
            Value::Bool(b) => Some(if *b { "1" } else { "0" }.to_string()),
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) => Some(s.clone()),
            Value::Array(items) => Some(items.iter().filter_map(scalar).collect::<Vec<_>>().join(",")),
            Value::Object(_) => Some(v.to_string()),
        }
    }
    body.iter()
        .filter_map(|(k, v)| scalar(v).map(|s| (k.clone(), s)))
        .collect()
}

/// Every pattern in a schema node (the test that all of them translate).
#[cfg(test)]
fn collect_patterns(p: &Property, out: &mut Vec<String>) {
    if let Some(pat) = &p.pattern {
        out.push(pat.clone());
    }
    if let Some(Format::Properties(map)) = &p.format {
        for sub in map.values() {
            collect_patterns(sub, out);
        }
    }
    if let Some(props) = &p.properties {
        for sub in props.values() {
            collect_patterns(sub, out);
        }
    }
    if let Some(items) = &p.items {
        collect_patterns(items, out);
    }
}

fn split_path(path: &str) -> Vec<String> {
    path.split('/').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

fn concrete_segments(path: &str) -> Vec<String> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = ["/api2/json", "/api2/extjs"]
        .iter()
        .find_map(|p| path.strip_prefix(p))
        .unwrap_or(path);
    split_path(path).iter().map(|s| percent_decode(s)).collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex_val(bytes[i + 1]), hex_val(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn is_perl_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C')
}

/// `^([^=]+)=(.+)$`: key up to the first `=`, non-empty value without a newline.
fn split_key_value(part: &str) -> Option<(&str, &str)> {
    let (k, v) = part.split_once('=')?;
    if k.is_empty() || v.is_empty() || v.contains('\n') {
        return None;
    }
    Some((k, v))
}

/// `PVE::JSONSchema::parse_boolean`.
pub fn parse_boolean(v: &str) -> Option<&'static str> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Some("1"),
        "0" | "off" | "no" | "false" => Some("0"),
        _ => None,
    }
}

/// `PVE::Tools::split_list`.
fn split_list(s: &str) -> Vec<&str> {
    if s.contains('\0') {
        let mut v: Vec<&str> = s.split('\0').collect();
        while v.last() == Some(&"") {
            v.pop();
        }
        return v;
    }
    s.split(|c: char| c == ',' || c == ';' || is_perl_space(c))
        .filter(|x| !x.is_empty())
        .collect()
}

fn is_integer(v: &str) -> bool {
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `PVE::JSONSchema::is_number`: `^[+-]?(\d+\.\d+|\d+\.|\.\d+|\d+)([eE][+-]?\d+)?$`.
fn is_number(v: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"\A[+-]?(?:[0-9]+\.[0-9]+|[0-9]+\.|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?\z").expect("static regex")
    })
    .is_match(v)
}

/// `PVE::JSONSchema::check_type` for a scalar (string) value.
fn check_type(ty: Option<&str>, value: &str) -> Result<(), String> {
    match ty {
        None | Some("any") | Some("string") => Ok(()),
        Some("boolean") if value == "1" || value == "0" => Ok(()),
        Some("integer") if is_integer(value) => Ok(()),
        Some("number") if is_number(value) => Ok(()),
        Some(t @ ("boolean" | "integer" | "number")) => Err(format!("type check ('{t}') failed - got '{value}'")),
        Some("null") => Err("type check ('null') failed - value is not null".into()),
        Some(t @ ("array" | "object")) => Err(format!("type check ('{t}') failed")),
        Some(_) => Ok(()),
    }
}

/// Translate a Perl pattern and anchor it as `m/^$pattern$/` does: plain concatenation
/// (so `a|b` becomes `^a|b$`, exactly like Perl), `$` allowing one trailing newline.
pub fn compile_perl_pattern(pattern: &str) -> Option<Regex> {
    let translated = translate_perl_regex(pattern);
    Regex::new(&format!("^{translated}(?:\\n?\\z)")).ok()
}

/// `(?^flags:` -> `(?flags:`, `(?>` -> `(?:`, `\0` -> `\x00`, `{,n}` -> `{0,n}`.
fn translate_perl_regex(p: &str) -> String {
    let chars: Vec<char> = p.chars().collect();
    let mut out = String::with_capacity(p.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && i + 1 < chars.len() {
            if chars[i + 1] == '0' {
                out.push_str("\\x00");
            } else {
                out.push(c);
                out.push(chars[i + 1]);
            }
            i += 2;
            continue;
        }
        if c == '(' && chars.get(i + 1) == Some(&'?') {
            if chars.get(i + 2) == Some(&'^') {
                out.push_str("(?");
                i += 3;
                continue;
            }
            if chars.get(i + 2) == Some(&'>') {
                out.push_str("(?:");
                i += 3;
                continue;
            }
        }
        if c == '{' && chars.get(i + 1) == Some(&',') {
            // `{,n}`: Perl >= 5.34 reads it as {0,n}
            let mut j = i + 2;
            while j < chars.len() && chars[j].is_ascii_digit() {
                j += 1;
            }
            if j > i + 2 && chars.get(j) == Some(&'}') {
                out.push_str("{0,");
                i += 2;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    // `(?^:` became `(?:`; `(?^i:` became `(?i:` -- both valid Rust syntax.
    out
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("static regex"))
}

fn is_ipv4(v: &str) -> bool {
    v.parse::<Ipv4Addr>().is_ok()
}

fn is_ipv6(v: &str) -> bool {
    v.parse::<Ipv6Addr>().is_ok()
}

fn cidr(v: &str, is_addr: fn(&str) -> bool, max: u32) -> bool {
    let Some((addr, bits)) = v.split_once('/') else {
        return false;
    };
    if bits.is_empty() || !bits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let bits: u32 = bits.parse().unwrap_or(u32::MAX);
    is_addr(addr) && bits > 7 && bits <= max
}

fn is_dns_name(v: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    re(
        &RE,
        r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?$",
    )
    .is_match(v)
}

fn is_volume_id(v: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    re(&RE, r"(?s)^(?i:[a-z][a-z0-9\-_.]*[a-z0-9]):.+$").is_match(v)
}

fn is_iface(v: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    re(&RE, r"^(?i:[a-z][a-z0-9_]{1,20}(?:[:.][0-9]+)?)$").is_match(v)
}

/// Validators registered with code refs (pve-common JSONSchema.pm, pve-container,
/// qemu-server, pve-storage, pve-access-control). `None`: not implemented here.
fn check_named_code_format(name: &str, v: &str) -> Option<Result<(), String>> {
    let ok = |cond: bool, msg: String| if cond { Ok(()) } else { Err(msg) };
    Some(match name {
        "string" => Ok(()),
        "urlencoded" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^[-%a-zA-Z0-9_.!~*'()]*$").is_match(v),
                format!("invalid urlencoded string: {v}\n"),
            )
        }
        "pve-configid" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^(?i:[a-z][a-z0-9_-]+)$").is_match(v),
                format!("invalid configuration ID '{v}'\n"),
            )
        }
        "pve-storage-id" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^(?i:[a-z][a-z0-9\-_.]*[a-z0-9])$").is_match(v),
                format!("storage ID '{v}' contains illegal characters\n"),
            )
        }
        "pve-bridge-id" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^[-_.\w\d]+$").is_match(v),
                format!("invalid bridge ID '{v}'\n"),
            )
        }
        "pve-vmid" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^[1-9][0-9]{2,8}$").is_match(v),
                "value does not look like a valid VM ID\n".into(),
            )
        }
        "pve-node" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?$").is_match(v),
                "value does not look like a valid node name\n".into(),
            )
        }
        "mac-addr" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^(?i:[a-f0-9][02468ace](?::[a-f0-9]{2}){5})$").is_match(v),
                "value does not look like a valid unicast MAC address\n".into(),
            )
        }
        "ipv4" => ok(is_ipv4(v), "value does not look like a valid IPv4 address\n".into()),
        "ipv6" => ok(is_ipv6(v), "value does not look like a valid IPv6 address\n".into()),
        "ip" => ok(
            is_ipv4(v) || is_ipv6(v),
            "value does not look like a valid IP address\n".into(),
        ),
        "CIDRv4" => ok(
            cidr(v, is_ipv4, 32),
            "value does not look like a valid IPv4 CIDR network\n".into(),
        ),
        "CIDRv6" => ok(
            cidr(v, is_ipv6, 128),
            "value does not look like a valid IPv6 CIDR network\n".into(),
        ),
        "CIDR" => ok(
            cidr(v, is_ipv4, 32) || cidr(v, is_ipv6, 128),
            "value does not look like a valid CIDR network\n".into(),
        ),
        "pve-ipv4-config" => ok(
            v == "dhcp" || v == "manual" || cidr(v, is_ipv4, 32),
            "value does not look like a valid ipv4 network configuration\n".into(),
        ),
        "pve-ipv6-config" => ok(
            v == "auto" || v == "dhcp" || v == "manual" || cidr(v, is_ipv6, 128),
            "value does not look like a valid ipv6 network configuration\n".into(),
        ),
        "dns-name" => ok(is_dns_name(v), "value does not look like a valid DNS name\n".into()),
        "address" => ok(
            is_ipv4(v) || is_ipv6(v) || is_dns_name(v),
            format!("value does not look like a valid address: {v}\n"),
        ),
        "lxc-ip-with-ll-iface" => {
            let ll_ok = v
                .split_once('%')
                .filter(|(addr, _)| addr.starts_with("fe80:"))
                .is_some_and(|(addr, iface)| is_ipv6(addr) && is_iface(iface));
            ok(
                ll_ok || is_ipv4(v) || is_ipv6(v),
                "value does not look like a valid IP address\n".into(),
            )
        }
        "pve-iface" => ok(is_iface(v), format!("invalid network interface name '{v}'\n")),
        "disk-size" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^[0-9]+(?:\.[0-9]+)?[KMGT]?$").is_match(v),
                format!("value does not look like a valid disk size: {v}\n"),
            )
        }
        "pve-startup-order" => ok(
            perl_truthy(v)
                && v.split(',').all(|p| {
                    static RE: OnceLock<Regex> = OnceLock::new();
                    p.chars().all(is_perl_space)
                        || re(&RE, r"^(?:(?:order=)?[0-9]+|up=[0-9]+|down=[0-9]+)$").is_match(p)
                }),
            "unable to parse startup options\n".into(),
        ),
        "pve-tag" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^(?i:[a-z0-9_][a-z0-9_\-+.]*)$").is_match(v),
                "invalid characters in tag\n".into(),
            )
        }
        "pve-poolid" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                re(&RE, r"^[A-Za-z0-9.\-_]+(?:/[A-Za-z0-9.\-_]+){0,2}$").is_match(v),
                format!("pool name '{v}' contains invalid characters\n"),
            )
        }
        "pve-volume-id" => ok(is_volume_id(v), format!("unable to parse volume ID '{v}'\n")),
        "pve-volume-id-or-qm-path" => ok(
            v == "none" || v == "cdrom" || v.starts_with('/') || is_volume_id(v),
            format!("unable to parse volume ID '{v}'\n"),
        ),
        "pve-volume-id-or-absolute-path" => ok(
            v.starts_with('/') || is_volume_id(v),
            format!("unable to parse volume ID '{v}'\n"),
        ),
        "pve-lxc-mp-string" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                !re(&RE, r"/\.\.?/|/\.\.?$|^\.\./").is_match(v),
                format!("{v} contains illegal character sequences\n"),
            )
        }
        "pve-lxc-dev-string" => {
            static RE: OnceLock<Regex> = OnceLock::new();
            ok(
                !re(&RE, r"/\.\.?(?:/|$)").is_match(v) && v.starts_with("/dev/"),
                format!("{v} is not a valid device path\n"),
            )
        }
        "pve-ct-timezone" | "timezone" => Ok(()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn create_ct() -> BTreeMap<String, String> {
        params(&[
            ("vmid", "100"),
            ("ostemplate", "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"),
            ("hostname", "k3s-server-1"),
            ("cores", "2"),
            ("memory", "4096"),
            ("net0", "name=eth0,bridge=vmbr0,ip=192.168.2.20/24,gw=192.168.2.1"),
            ("features", "nesting=1,keyctl=1,fuse=1"),
            ("tags", "driftless"),
        ])
    }

    fn post_lxc(extra: &[(&str, &str)]) -> Result<(), RequestError> {
        let mut p = create_ct();
        for (k, v) in extra {
            p.insert(k.to_string(), v.to_string());
        }
        ApiSchema::embedded()
            .validate_request("POST", "/api2/json/nodes/pve/lxc", &p)
            .map(|_| ())
    }

    fn err_of(extra: &[(&str, &str)], param: &str) -> String {
        match post_lxc(extra) {
            Err(RequestError::Params(e)) => e
                .get(param)
                .unwrap_or_else(|| panic!("no error for {param}: {e:?}"))
                .to_string(),
            other => panic!("expected parameter errors, got {other:?}"),
        }
    }

    #[test]
    fn config_keys_are_ready_before_the_endpoints_are_built() {
        let s = ApiSchema::with_lazy_endpoints(Cow::Borrowed(SUBSET_JSON)).unwrap();
        assert!(s.config_property(PveKind::Lxc, "net7").is_some());
        assert!(s.config_property(PveKind::Qemu, "scsi3").is_some());
        assert!(s.endpoints.get().is_none(), "checking config keys built the endpoints");
        assert_eq!(s.endpoints().len(), 32);
        // from_json checks the endpoints at once: a bad one is an error there, not a panic later.
        let bad = r#"{"endpoints": [{"method": "GET", "path": "/x", "parameters": 5}]}"#;
        assert!(ApiSchema::from_json(bad).is_err());
        assert!(ApiSchema::with_lazy_endpoints(Cow::Borrowed(bad)).is_ok());
    }

    #[test]
    fn embedded_schema_has_all_endpoints() {
        let s = ApiSchema::embedded();
        assert_eq!(s.endpoints().len(), 32);
        for (m, p) in [
            ("GET", "/version"),
            ("GET", "/nodes"),
            ("GET", "/access/permissions"),
            ("GET", "/nodes/pve/network"),
            ("GET", "/nodes/pve/storage"),
            ("GET", "/nodes/pve/storage/local-lvm/status"),
            ("GET", "/nodes/pve/storage/local/content"),
            ("GET", "/cluster/resources"),
            (
                "GET",
                "/nodes/pve/tasks/UPID:pve:00001234:00005678:65000000:vzcreate:100:root@pam:/status",
            ),
            ("POST", "/nodes/pve/lxc"),
            ("PUT", "/nodes/pve/lxc/100/config"),
            ("GET", "/nodes/pve/lxc/100/pending"),
            ("POST", "/nodes/pve/lxc/100/status/shutdown"),
            ("DELETE", "/nodes/pve/lxc/100"),
            ("POST", "/nodes/pve/qemu/101/config"),
            ("POST", "/nodes/pve/qemu/101/status/reboot"),
        ] {
            assert!(s.find(m, p).is_some(), "{m} {p}");
        }
        assert!(s.find("PATCH", "/nodes/pve/lxc").is_none());
        assert!(s.find("GET", "/nodes/pve/lxc/100/snapshot").is_none());
        assert_eq!(s.methods_at("/nodes/pve/qemu/100/config"), ["GET", "PUT", "POST"]);
        // every pattern in the subset translates to a Rust regex
        let mut patterns = Vec::new();
        for e in s.endpoints() {
            collect_patterns(&e.parameters, &mut patterns);
        }
        for p in s.lxc_config.values().chain(s.qemu_config.values()) {
            collect_patterns(p, &mut patterns);
        }
        for f in s.named_hash_formats.values() {
            for p in f.values() {
                collect_patterns(p, &mut patterns);
            }
        }
        assert!(patterns.len() > 10, "{patterns:?}");
        for p in &patterns {
            assert!(compile_perl_pattern(p).is_some(), "pattern {p:?} did not compile");
        }
    }

    #[test]
    fn find_extracts_decoded_path_params() {
        let s = ApiSchema::embedded();
        let (ep, pp) = s
            .find(
                "get",
                "/api2/json/nodes/pve1/tasks/UPID%3Apve1%3A0000AB%3Aroot%40pam%3A/status?x=1",
            )
            .unwrap();
        assert_eq!(ep.path, "/nodes/{node}/tasks/{upid}/status");
        assert_eq!(pp["node"], "pve1");
        assert_eq!(pp["upid"], "UPID:pve1:0000AB:root@pam:");
        let (ep, pp) = s.find("PUT", "/nodes/pve/lxc/105/config").unwrap();
        assert_eq!(ep.method, "PUT");
        assert_eq!(pp["vmid"], "105");
    }

    #[test]
    fn k3s_container_create_passes() {
        post_lxc(&[]).unwrap();
        // path parameters are validated too
        let err = ApiSchema::embedded()
            .validate_request("POST", "/nodes/bad_node!/lxc", &create_ct())
            .unwrap_err();
        let RequestError::Params(e) = err else { panic!() };
        assert_eq!(
            e.get("node"),
            Some("invalid format - value does not look like a valid node name\n")
        );
    }

    #[test]
    fn unknown_parameter_rejected() {
        assert_eq!(
            err_of(&[("lxc.apparmor.profile", "unconfined")], "lxc.apparmor.profile"),
            "property is not defined in schema and the schema does not allow additional properties"
        );
        // net32 is beyond MAX_LXC_NETWORKS
        assert_eq!(
            err_of(&[("net32", "name=eth1,bridge=vmbr0")], "net32"),
            "property is not defined in schema and the schema does not allow additional properties"
        );
        post_lxc(&[("net31", "name=eth1,bridge=vmbr0")]).unwrap();
    }

    #[test]
    fn integer_range_and_type() {
        assert_eq!(
            err_of(&[("cores", "0")], "cores"),
            "value must have a minimum value of 1"
        );
        assert_eq!(
            err_of(&[("cores", "8193")], "cores"),
            "value must have a maximum value of 8192"
        );
        assert_eq!(
            err_of(&[("cores", "abc")], "cores"),
            "type check ('integer') failed - got 'abc'"
        );
        assert_eq!(
            err_of(&[("vmid", "99")], "vmid"),
            "invalid format - value does not look like a valid VM ID\n"
        );
    }

    #[test]
    fn missing_required() {
        let mut p = create_ct();
        p.remove("ostemplate");
        let err = ApiSchema::embedded()
            .validate_request("POST", "/nodes/pve/lxc", &p)
            .unwrap_err();
        let RequestError::Params(e) = err else { panic!() };
        assert_eq!(e.get("ostemplate"), Some("property is missing and it is not optional"));
        assert_eq!(e.errors.len(), 1);
    }

    #[test]
    fn property_string_errors() {
        assert_eq!(
            err_of(&[("net0", "name=eth0,bridge=vmbr0,bogus=1")], "net0"),
            "invalid format - invalid key in comma-separated list property: bogus\n"
        );
        assert_eq!(
            err_of(&[("net0", "name=eth0,tag=5000")], "net0"),
            "invalid format - format error\nnet0.tag: value must have a maximum value of 4094\n"
        );
        assert_eq!(
            err_of(&[("net0", "bridge=vmbr0")], "net0"),
            "invalid format - format error\nnet0.name: property is missing and it is not optional\n"
        );
        assert_eq!(
            err_of(&[("net0", "name=eth0,ip=192.168.2.300/24")], "net0"),
            "invalid format - format error\nnet0.ip: invalid format - value does not look like a valid ipv4 network configuration\n\n"
        );
        assert_eq!(
            err_of(&[("features", "nesting=maybe")], "features"),
            "invalid format - format error\nfeatures.nesting: type check ('boolean') failed - got 'maybe'\n"
        );
        assert_eq!(
            err_of(&[("net0", "name=eth0,name=eth1")], "net0"),
            "invalid format - duplicate key in comma-separated list property: name\n"
        );
        // booleans inside property strings accept on/yes/true
        post_lxc(&[("features", "nesting=true,keyctl=on")]).unwrap();
        // default key
        post_lxc(&[("rootfs", "local-lvm:8"), ("mp0", "local-lvm:vm-100-disk-1,mp=/data")]).unwrap();
        assert_eq!(
            err_of(&[("rootfs", "local-lvm:8,local-lvm:9")], "rootfs"),
            "invalid format - duplicate key in comma-separated list property: volume\n"
        );
        assert_eq!(
            err_of(&[("features", "nesting")], "features"),
            "invalid format - value without key, but schema does not define a default key\n"
        );
    }

    #[test]
    fn enum_and_pattern() {
        assert_eq!(
            err_of(&[("arch", "sparc")], "arch"),
            "value 'sparc' does not have a value in the enumeration 'amd64, i386, arm64, armhf, riscv32, riscv64'"
        );
        assert_eq!(
            err_of(&[("net0", "name=eth 0")], "net0"),
            "invalid format - format error\nnet0.name: value does not match the regex pattern\n"
        );
        assert_eq!(
            err_of(&[("tags", "ok;bad tag!")], "tags"),
            "invalid format - invalid characters in tag\n"
        );
        post_lxc(&[("tags", "a;b,c")]).unwrap();
    }

    #[test]
    fn booleans_at_top_level_are_0_or_1() {
        post_lxc(&[("onboot", "1"), ("unprivileged", "0")]).unwrap();
        assert_eq!(
            err_of(&[("onboot", "true")], "onboot"),
            "type check ('boolean') failed - got 'true'"
        );
        let mut body = serde_json::Map::new();
        body.insert("onboot".into(), Value::Bool(true));
        body.insert("cores".into(), serde_json::json!(2));
        body.insert("tags".into(), serde_json::json!(["a", "b"]));
        let p = json_params_to_strings(&body);
        assert_eq!(p["onboot"], "1");
        assert_eq!(p["cores"], "2");
        assert_eq!(p["tags"], "a,b");
    }

    #[test]
    fn requires_and_qemu() {
        let s = ApiSchema::embedded();
        let p = params(&[("force", "1"), ("cores", "2")]);
        let err = s.validate_request("PUT", "/nodes/pve/qemu/100/config", &p).unwrap_err();
        let RequestError::Params(e) = err else { panic!() };
        assert_eq!(
            e.get("delete"),
            Some("missing property - 'force' requires this property")
        );
        // qemu net with a model alias and ipconfig (named hash format)
        let p = params(&[
            ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0"),
            ("ipconfig0", "ip=10.0.0.5/24,gw=10.0.0.1"),
            ("scsi0", "local-lvm:32,iothread=1"),
            ("delete", "ide2,unused0"),
        ]);
        s.validate_request("PUT", "/nodes/pve/qemu/100/config", &p).unwrap();
        let p = params(&[("ipconfig0", "ip=10.0.0.5/24,foo=1")]);
        let RequestError::Params(e) = s
            .validate_request("POST", "/nodes/pve/qemu/100/config", &p)
            .unwrap_err()
        else {
            panic!()
        };
        assert_eq!(
            e.get("ipconfig0"),
            Some("invalid format - invalid key in comma-separated list property: foo\n")
        );
    }

    #[test]
    fn talos_vm_create_passes() {
        let s = ApiSchema::embedded();
        let mut p = params(&[
            ("vmid", "200"),
            ("name", "talos-cp-1"),
            ("memory", "4096"),
            ("cores", "4"),
            ("sockets", "1"),
            ("cpu", "host"),
            ("machine", "q35"),
            ("scsihw", "virtio-scsi-single"),
            ("scsi0", "local-lvm:32,iothread=1,discard=on,ssd=1"),
            ("ide2", "local:iso/talos-v1.10.iso,media=cdrom"),
            ("net0", "virtio,bridge=vmbr0,firewall=0"),
            ("boot", "order=scsi0;ide2"),
            ("ostype", "l26"),
            ("agent", "1"),
            ("tags", "driftless;talos"),
            ("onboot", "1"),
        ]);
        s.validate_request("POST", "/nodes/pve/qemu", &p).unwrap();
        p.insert("memory".into(), "8".into());
        p.insert("agent".into(), "yes".into()); // default-key values are not normalised
        let RequestError::Params(e) = s.validate_request("POST", "/nodes/pve/qemu", &p).unwrap_err() else {
            panic!()
        };
        assert_eq!(
            e.get("memory"),
            Some("invalid format - format error\nmemory.current: value must have a minimum value of 16\n")
        );
        assert_eq!(
            e.get("agent"),
            Some("invalid format - format error\nagent.enabled: type check ('boolean') failed - got 'yes'\n")
        );
    }

    #[test]
    fn proxmox_json_body() {
        let e = match post_lxc(&[("cores", "0"), ("bogus", "1")]) {
            Err(RequestError::Params(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            e.to_proxmox_json().to_string(),
            r#"{"errors":{"bogus":"property is not defined in schema and the schema does not allow additional properties","cores":"value must have a minimum value of 1"},"data":null}"#
        );
        assert!(e.to_string().starts_with("Parameter verification failed.\n"));
    }

    #[test]
    fn perl_pattern_translation() {
        // (?^: groups, \0, {,n}
        let env = compile_perl_pattern(r"(?^:(?:\w+=[^\x00-\x08\x10-\x1F\x7F]*)(?:\0\w+=[^\x00-\x08\x10-\x1F\x7F]*)*)")
            .unwrap();
        assert!(env.is_match("A=1\0B=2"));
        assert!(!env.is_match("A=1\0=2"));
        let serial = compile_perl_pattern(r"[A-Za-z0-9\-_\s]{,16}").unwrap();
        assert!(serial.is_match("abc"));
        assert!(!serial.is_match("abcdefghijklmnopq"));
        // anchored like m/^$p$/ (a trailing newline is tolerated, as by Perl's $)
        let p = compile_perl_pattern("0[0-7]{3}").unwrap();
        assert!(p.is_match("0644") && p.is_match("0644\n") && !p.is_match("10644"));
        let atomic = compile_perl_pattern(r"(?^:^((?>[+-]?[\w\-\._=]+,?)+)$)").unwrap();
        assert!(atomic.is_match("host,+kvm_pv_eoi"));
    }

    #[test]
    fn config_properties_and_printing() {
        let s = ApiSchema::embedded();
        assert!(s.config_property(PveKind::Lxc, "net31").is_some());
        assert!(s.config_property(PveKind::Lxc, "net32").is_none());
        assert!(s.config_property(PveKind::Lxc, "parent").is_some());
        assert!(s.config_property(PveKind::Lxc, "digest").is_none());
        assert!(s.config_property(PveKind::Qemu, "scsi30").is_some());
        assert!(s.config_property(PveKind::Qemu, "scsi31").is_none());
        assert!(s.config_property(PveKind::Qemu, "vmstate").is_some());
        let net = s
            .config_property(PveKind::Lxc, "net0")
            .and_then(Property::format_properties)
            .unwrap();
        let parsed = s
            .parse_property_string(net, "type=veth,ip=dhcp,bridge=vmbr0,name=eth0,firewall=yes", "")
            .unwrap();
        assert_eq!(parsed["firewall"], "1");
        assert_eq!(
            s.print_property_string(net, &parsed),
            "name=eth0,bridge=vmbr0,firewall=1,ip=dhcp,type=veth"
        );
        let rootfs = s
            .config_property(PveKind::Lxc, "rootfs")
            .and_then(Property::format_properties)
            .unwrap();
        let parsed = s
            .parse_property_string(rootfs, "size=8G,local-lvm:vm-100-disk-0", "")
            .unwrap();
        assert_eq!(
            s.print_property_string(rootfs, &parsed),
            "local-lvm:vm-100-disk-0,size=8G"
        );
    }
}
