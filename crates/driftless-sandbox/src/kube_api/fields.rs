//! Field ownership and merges, as kube-apiserver does them (structured-merge-diff, simplified):
//!
//! * Server-side apply: the applied configuration's fields become its manager's set
//!   (`managedFields`, `FieldsV1`: `f:` fields, `k:` list items by key, `v:` set values,
//!   `.` the item itself); a field another manager owns with a different value is a conflict
//!   unless forced (then it changes hands); fields the manager applied before and no longer
//!   does are removed unless someone else owns them.
//! * Other writes (create, update, merge/strategic/JSON patches) make their manager own the
//!   fields they changed, taking them from everyone else.
//! * Lists merge by key where Kubernetes says so: the built-in kinds' merge keys
//!   (containers by name, ports by port and protocol, ...), a CRD's
//!   `x-kubernetes-list-type`/`x-kubernetes-list-map-keys`; other lists are atomic.
//!
//! Simplified: ownership is tracked for leaves and list items (not for empty-map
//! placeholders), and applied `null`s are ignored.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// How a list merges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListType {
    Map(Vec<String>),
    Set,
    Atomic,
}

/// Where in an object a walk is: the CRD schema node, if the kind has one.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    /// `Some` for a custom resource: its schema decides list types.
    schema: Option<&'a Value>,
    custom: bool,
}

static EMPTY: Value = Value::Null;

impl<'a> Ctx<'a> {
    pub fn builtin() -> Ctx<'static> {
        Ctx {
            schema: None,
            custom: false,
        }
    }

    pub fn custom(schema: Option<&'a Value>) -> Ctx<'a> {
        Ctx { schema, custom: true }
    }

    fn field(&self, name: &str) -> Ctx<'a> {
        let schema = self.schema.and_then(|s| {
            s.get("properties")
                .and_then(|p| p.get(name))
                .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
        });
        Ctx {
            schema: schema.or(if self.custom { Some(&EMPTY) } else { None }),
            custom: self.custom,
        }
    }

    fn items(&self) -> Ctx<'a> {
        Ctx {
            schema: self.schema.and_then(|s| s.get("items")),
            custom: self.custom,
        }
    }

    fn list_type(&self, field: &str, items: &[Value]) -> ListType {
        if self.custom {
            let s = self.schema.unwrap_or(&EMPTY);
            return match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("map") => ListType::Map(
                    s.get("x-kubernetes-list-map-keys")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(|k| k.as_str().map(String::from)).collect())
                        .unwrap_or_default(),
                ),
                Some("set") => ListType::Set,
                _ => ListType::Atomic,
            };
        }
        builtin_list_type(field, items)
    }
}

/// The built-in kinds' merge keys (`patchMergeKey`/`listMapKeys` in their Go types).
fn builtin_list_type(field: &str, items: &[Value]) -> ListType {
    let keys: &[&str] = match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => &["name"],
        "volumeMounts" => &["mountPath"],
        "volumeDevices" => &["devicePath"],
        "hostAliases" => &["ip"],
        "ownerReferences" => &["uid"],
        "conditions" => &["type"],
        "topologySpreadConstraints" => &["topologyKey", "whenUnsatisfiable"],
        "ports" if items.iter().all(|i| i.get("containerPort").is_some()) => &["containerPort", "protocol"],
        "ports" if items.iter().all(|i| i.get("port").is_some()) => &["port", "protocol"],
        "finalizers" => return ListType::Set,
        _ => return ListType::Atomic,
    };
    ListType::Map(keys.iter().map(|k| k.to_string()).collect())
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pe {
    Field(String),
    /// A list item by its keys: their canonical JSON object.
    Key(String),
    /// A set member: its JSON.
    Value(String),
}

pub type Path = Vec<Pe>;

/// The key of a list item (`protocol` defaults to TCP as in the API), or `None` when the
/// item lacks a key.
fn item_key(item: &Value, keys: &[String]) -> Option<String> {
    let mut m = BTreeMap::new();
    for k in keys {
        match item.get(k) {
            Some(v) if !v.is_null() => {
                m.insert(k.clone(), v.clone());
            }
            _ if k == "protocol" => {
                m.insert(k.clone(), json!("TCP"));
            }
            _ => return None,
        }
    }
    let obj: Map<String, Value> = m.into_iter().collect();
    Some(Value::Object(obj).to_string())
}

fn effective_list_type(ctx: &Ctx<'_>, field: &str, items: &[Value]) -> ListType {
    match ctx.list_type(field, items) {
        ListType::Map(keys) if !keys.is_empty() && items.iter().all(|i| item_key(i, &keys).is_some()) => {
            ListType::Map(keys)
        }
        ListType::Set if items.iter().all(|i| !i.is_object() && !i.is_array()) => ListType::Set,
        _ => ListType::Atomic,
    }
}

/// The owned paths of a value: every leaf (scalar, atomic list, empty map), every keyed list
/// item (and its fields), every set member.
pub fn leaves(value: &Value, ctx: Ctx<'_>) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    walk(value, ctx, "", &mut Vec::new(), &mut out);
    out
}

fn walk(value: &Value, ctx: Ctx<'_>, field: &str, path: &mut Path, out: &mut BTreeSet<Path>) {
    match value {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                if v.is_null() {
                    continue;
                }
                path.push(Pe::Field(k.clone()));
                walk(v, ctx.field(k), k, path, out);
                path.pop();
            }
        }
        Value::Array(items) => match effective_list_type(&ctx, field, items) {
            ListType::Map(keys) => {
                if items.is_empty() {
                    out.insert(path.clone());
                }
                for item in items {
                    let key = item_key(item, &keys).expect("checked by effective_list_type");
                    path.push(Pe::Key(key));
                    out.insert(path.clone());
                    walk_item(item, ctx.items(), path, out);
                    path.pop();
                }
            }
            ListType::Set => {
                if items.is_empty() {
                    out.insert(path.clone());
                }
                for item in items {
                    path.push(Pe::Value(item.to_string()));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Atomic => {
                out.insert(path.clone());
            }
        },
        _ => {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        }
    }
}

fn walk_item(item: &Value, ctx: Ctx<'_>, path: &mut Path, out: &mut BTreeSet<Path>) {
    if let Value::Object(m) = item {
        for (k, v) in m {
            if v.is_null() {
                continue;
            }
            path.push(Pe::Field(k.clone()));
            walk(v, ctx.field(k), k, path, out);
            path.pop();
        }
    }
}

/// The value at a path.
pub fn value_at<'v>(value: &'v Value, path: &[Pe], ctx: Ctx<'_>) -> Option<&'v Value> {
    let mut cur = value;
    let mut ctx = ctx;
    let mut field = String::new();
    for pe in path {
        match pe {
            Pe::Field(f) => {
                cur = cur.get(f)?;
                ctx = ctx.field(f);
                field = f.clone();
            }
            Pe::Key(k) => {
                let items = cur.as_array()?;
                let ListType::Map(keys) = effective_list_type(&ctx, &field, items) else {
                    return None;
                };
                cur = items
                    .iter()
                    .find(|i| item_key(i, &keys).as_deref() == Some(k.as_str()))?;
                ctx = ctx.items();
            }
            Pe::Value(v) => {
                cur = cur.as_array()?.iter().find(|i| json_text(i) == *v)?;
            }
        }
    }
    Some(cur)
}

/// Remove what a path names (a field, a list item, a set member); `true` when it was there.
fn remove_at(value: &mut Value, path: &[Pe], ctx: Ctx<'_>) -> bool {
    let Some((last, parent_path)) = path.split_last() else {
        return false;
    };
    // Walk to the parent with the context of the parent.
    let mut ctx_parent = ctx;
    let mut field = String::new();
    let mut cur: &mut Value = value;
    for pe in parent_path {
        match pe {
            Pe::Field(f) => {
                let Some(next) = cur.get_mut(f) else { return false };
                cur = next;
                ctx_parent = ctx_parent.field(f);
                field = f.clone();
            }
            Pe::Key(k) => {
                let Some(items) = cur.as_array_mut() else { return false };
                let ListType::Map(keys) = effective_list_type(&ctx_parent, &field, items) else {
                    return false;
                };
                let Some(next) = items
                    .iter_mut()
                    .find(|i| item_key(i, &keys).as_deref() == Some(k.as_str()))
                else {
                    return false;
                };
                cur = next;
                ctx_parent = ctx_parent.items();
            }
            Pe::Value(_) => return false,
        }
    }
    match last {
        Pe::Field(f) => cur.as_object_mut().and_then(|m| m.remove(f)).is_some(),
        Pe::Key(k) => {
            let Some(items) = cur.as_array().cloned() else {
                return false;
            };
            let ListType::Map(keys) = effective_list_type(&ctx_parent, &field, &items) else {
                return false;
            };
            let arr = cur.as_array_mut().expect("checked");
            let before = arr.len();
            arr.retain(|i| item_key(i, &keys).as_deref() != Some(k.as_str()));
            arr.len() != before
        }
        Pe::Value(v) => {
            let Some(arr) = cur.as_array_mut() else { return false };
            let before = arr.len();
            arr.retain(|i| json_text(i) != *v);
            arr.len() != before
        }
    }
}

/// Merge an applied configuration into the live object: maps field by field, keyed lists
/// item by item, sets by member, anything else replaced.
pub fn apply_merge(live: &mut Value, config: &Value, ctx: Ctx<'_>, field: &str) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, v) in c {
                if v.is_null() {
                    continue;
                }
                match l.get_mut(k) {
                    Some(existing) => apply_merge(existing, v, ctx.field(k), k),
                    None => {
                        l.insert(k.clone(), strip_nulls(v));
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(c)) => {
            let all: Vec<Value> = l.iter().chain(c.iter()).cloned().collect();
            match effective_list_type(&ctx, field, &all) {
                ListType::Map(keys) => {
                    for item in c {
                        let key = item_key(item, &keys);
                        match l.iter_mut().find(|i| item_key(i, &keys) == key) {
                            Some(existing) => apply_merge(existing, item, ctx.items(), ""),
                            None => l.push(strip_nulls(item)),
                        }
                    }
                }
                ListType::Set => {
                    for item in c {
                        if !l.contains(item) {
                            l.push(item.clone());
                        }
                    }
                }
                ListType::Atomic => *l = c.clone(),
            }
        }
        (l, c) => *l = strip_nulls(c),
    }
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

// ---- managedFields ------------------------------------------------------------------------------

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: BTreeSet<Path>,
}

impl Managed {
    fn same_owner(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager && self.operation == operation && self.subresource.as_deref() == subresource
    }

    /// `"kubectl"`, or `"kubectl-edit" using apps/v1` for an update (what conflicts say).
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            s.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }
}

/// The `managedFields` of an object.
pub fn read_managed(object: &Value) -> Vec<Managed> {
    let mut out = Vec::new();
    for e in object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let mut fields = BTreeSet::new();
        decode(e.get("fieldsV1").unwrap_or(&Value::Null), &mut Vec::new(), &mut fields);
        out.push(Managed {
            manager: s("manager"),
            operation: s("operation"),
            api_version: s("apiVersion"),
            time: s("time"),
            subresource: e.get("subresource").and_then(Value::as_str).map(String::from),
            fields,
        });
    }
    out
}

pub fn write_managed(object: &mut Value, managed: &[Managed]) {
    let entries: Vec<Value> = managed
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            let mut e = json!({
                "manager": m.manager, "operation": m.operation, "apiVersion": m.api_version,
                "time": m.time, "fieldsType": "FieldsV1", "fieldsV1": encode(&m.fields),
            });
            if let Some(sub) = &m.subresource {
                e["subresource"] = json!(sub);
            }
            e
        })
        .collect();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

fn pe_key(pe: &Pe) -> String {
    match pe {
        Pe::Field(f) => format!("f:{f}"),
        Pe::Key(k) => format!("k:{k}"),
        Pe::Value(v) => format!("v:{v}"),
    }
}

/// A field set as `FieldsV1` JSON.
pub fn encode(fields: &BTreeSet<Path>) -> Value {
    #[derive(Default)]
    struct Node {
        member: bool,
        children: BTreeMap<String, Node>,
    }
    let mut root = Node::default();
    for path in fields {
        let mut cur = &mut root;
        for pe in path {
            cur = cur.children.entry(pe_key(pe)).or_default();
        }
        cur.member = true;
    }
    fn to_json(n: &Node) -> Value {
        let mut m = Map::new();
        if n.member && !n.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &n.children {
            m.insert(k.clone(), to_json(c));
        }
        Value::Object(m)
    }
    to_json(&root)
}

fn decode(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
    let Some(m) = v.as_object() else { return };
    if m.is_empty() && !path.is_empty() {
        out.insert(path.clone());
        return;
    }
    for (k, child) in m {
        if k == "." {
            out.insert(path.clone());
            continue;
        }
        let pe = if let Some(f) = k.strip_prefix("f:") {
            Pe::Field(f.to_string())
        } else if let Some(key) = k.strip_prefix("k:") {
            // Canonical form: keys sorted.
            match serde_json::from_str::<BTreeMap<String, Value>>(key) {
                Ok(m) => Pe::Key(Value::Object(m.into_iter().collect()).to_string()),
                Err(_) => continue,
            }
        } else if let Some(val) = k.strip_prefix("v:") {
            match serde_json::from_str::<Value>(val) {
                Ok(v) => Pe::Value(v.to_string()),
                Err(_) => continue,
            }
        } else {
            continue;
        };
        path.push(pe);
        decode(child, path, out);
        path.pop();
    }
}

/// `.spec.template.spec.containers[name="web"].image`: how conflicts name a field.
pub fn path_string(path: &[Pe]) -> String {
    let mut s = String::new();
    for pe in path {
        match pe {
            Pe::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Pe::Key(k) => {
                let m: BTreeMap<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
            Pe::Value(v) => s.push_str(&format!("[={v}]")),
        }
    }
    s
}

/// The parts of an object nobody owns: identity and server-set metadata (and `status` or
/// everything but `status`, depending on which the write may change).
pub fn strip_for_ownership(object: &Value, status_only: Option<bool>) -> Value {
    let mut v = object.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        match status_only {
            Some(true) => m.retain(|k, _| k == "status"),
            Some(false) => {
                m.remove("status");
            }
            None => {}
        }
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            for k in [
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
                "selfLink",
            ] {
                meta.remove(k);
            }
            if meta.is_empty() {
                m.remove("metadata");
            }
        }
    }
    v
}

/// One field in the way of an apply.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
}

/// An apply's outcome: the new object (without server-set metadata changes) or the conflicts.
pub struct ApplyArgs<'a> {
    pub live: Option<&'a Value>,
    pub config: &'a Value,
    pub manager: &'a str,
    pub force: bool,
    pub api_version: &'a str,
    pub now: &'a str,
    pub ctx: Ctx<'a>,
    /// The resource has a status subresource: an apply to it does not touch `status`.
    pub status_subresource: bool,
}

/// Server-side apply: the merged object with its new `managedFields`, or the conflicts.
pub fn apply(args: ApplyArgs<'_>) -> Result<Value, Vec<Conflict>> {
    let scope = if args.status_subresource { Some(false) } else { None };
    let applied_set = leaves(&strip_for_ownership(args.config, scope), args.ctx);
    let empty = json!({});
    let live = args.live.unwrap_or(&empty);
    let mut managed = read_managed(live);

    // Conflicts: a field someone else owns whose value the apply would change.
    let mut conflicts = Vec::new();
    let mut taken: Vec<(usize, Path)> = Vec::new();
    for (i, m) in managed.iter().enumerate() {
        if m.same_owner(args.manager, "Apply", None) {
            continue;
        }
        for path in applied_set.intersection(&m.fields) {
            let live_value = value_at(live, path, args.ctx);
            let new_value = value_at(args.config, path, args.ctx);
            let differs = match (live_value, new_value) {
                (Some(a), Some(b)) => !is_item(path) && a != b,
                _ => false,
            };
            if differs {
                conflicts.push(Conflict {
                    manager: m.describe(),
                    field: path_string(path),
                });
                taken.push((i, path.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !args.force {
        return Err(conflicts);
    }
    for (i, path) in taken {
        managed[i].fields.remove(&path);
    }

    let mut merged = live.clone();
    if merged.is_null() || !merged.is_object() {
        merged = json!({});
    }
    let mut config = args.config.clone();
    if args.status_subresource
        && let Some(m) = config.as_object_mut()
    {
        m.remove("status");
    }
    apply_merge(&mut merged, &config, args.ctx, "");

    // What the manager applied before and no longer does goes, unless someone else owns it.
    let previous = managed
        .iter()
        .find(|m| m.same_owner(args.manager, "Apply", None))
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    let others: BTreeSet<Path> = managed
        .iter()
        .filter(|m| !m.same_owner(args.manager, "Apply", None))
        .flat_map(|m| m.fields.iter().cloned())
        .collect();
    let mut dropped: Vec<&Path> = previous
        .iter()
        .filter(|p| !applied_set.contains(*p) && !others.contains(*p))
        .filter(|p| !applied_set.iter().any(|a| a.starts_with(p)))
        .collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in dropped {
        if remove_at(&mut merged, path, args.ctx) {
            prune_empty_parents(&mut merged, path, &others, &applied_set, args.ctx);
        }
    }

    match managed.iter_mut().find(|m| m.same_owner(args.manager, "Apply", None)) {
        Some(m) => {
            m.fields = applied_set;
            m.time = args.now.to_string();
            m.api_version = args.api_version.to_string();
        }
        None => managed.push(Managed {
            manager: args.manager.to_string(),
            operation: "Apply".into(),
            api_version: args.api_version.to_string(),
            time: args.now.to_string(),
            subresource: None,
            fields: applied_set,
        }),
    }
    forget_missing(&mut managed, &merged, args.ctx);
    write_managed(&mut merged, &managed);
    Ok(merged)
}

fn is_item(path: &[Pe]) -> bool {
    matches!(path.last(), Some(Pe::Key(_)))
}

/// After removing a field, remove the maps it leaves empty (unless owned or applied).
fn prune_empty_parents(
    value: &mut Value,
    path: &[Pe],
    others: &BTreeSet<Path>,
    applied: &BTreeSet<Path>,
    ctx: Ctx<'_>,
) {
    let mut p = path.to_vec();
    while p.len() > 1 {
        p.pop();
        if !matches!(p.last(), Some(Pe::Field(_))) || others.contains(&p) || applied.contains(&p) {
            return;
        }
        let empty = value_at(value, &p, ctx).is_some_and(|v| v.as_object().is_some_and(|m| m.is_empty()));
        if !empty || !remove_at(value, &p, ctx) {
            return;
        }
    }
}

/// Drop owned paths the object no longer has.
fn forget_missing(managed: &mut Vec<Managed>, object: &Value, ctx: Ctx<'_>) {
    for m in managed.iter_mut() {
        m.fields.retain(|p| value_at(object, p, ctx).is_some());
    }
    managed.retain(|m| !m.fields.is_empty());
}

/// After a write that is not an apply: `manager` owns what changed, nobody owns what is gone.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    now: &str,
    subresource: Option<&str>,
    ctx: Ctx<'_>,
) {
    let scope = Some(subresource == Some("status"));
    let status_scoped = |v: &Value| strip_for_ownership(v, if subresource.is_some() { scope } else { None });
    let new_stripped = status_scoped(new);
    let new_leaves = leaves(&new_stripped, ctx);
    // A write that sets managedFields itself (kubectl moving client-side ownership to
    // server-side apply) replaces them.
    let client_set = old.is_some_and(|o| {
        new.pointer("/metadata/managedFields").is_some()
            && o.pointer("/metadata/managedFields") != new.pointer("/metadata/managedFields")
    });
    let mut managed = if client_set {
        read_managed(new)
    } else {
        old.map(read_managed).unwrap_or_default()
    };
    let (old_leaves, old_stripped) = match old {
        Some(o) => {
            let s = status_scoped(o);
            (leaves(&s, ctx), s)
        }
        None => (BTreeSet::new(), json!({})),
    };
    let changed: BTreeSet<Path> = new_leaves
        .iter()
        .filter(|p| value_at(&old_stripped, p, ctx) != value_at(&new_stripped, p, ctx) || !old_leaves.contains(*p))
        .filter(|p| !is_item(p) || !old_leaves.contains(*p))
        .cloned()
        .collect();
    if !changed.is_empty() {
        for m in managed.iter_mut() {
            if !m.same_owner(manager, "Update", subresource) {
                m.fields.retain(|p| !changed.contains(p));
            }
        }
        match managed
            .iter_mut()
            .find(|m| m.same_owner(manager, "Update", subresource))
        {
            Some(m) => {
                m.fields.extend(changed);
                m.time = now.to_string();
                m.api_version = api_version.to_string();
            }
            None => managed.push(Managed {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                time: now.to_string(),
                subresource: subresource.map(String::from),
                fields: changed,
            }),
        }
    }
    forget_missing(&mut managed, new, ctx);
    write_managed(new, &managed);
}

// ---- patches ----------------------------------------------------------------------------------------

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A strategic merge patch, for what kubectl sends: keyed lists merge by key, `$patch:
/// delete`/`replace` and `$deleteFromPrimitiveList/` are honoured, `$setElementOrder/` and
/// `$retainKeys` are ignored.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value, ctx: Ctx<'_>, field: &str) {
    match (target, patch) {
        (t @ Value::Object(_), Value::Object(p)) => {
            if p.get("$patch").and_then(Value::as_str) == Some("replace") {
                *t = without_directives(patch);
                return;
            }
            let t = t.as_object_mut().expect("matched");
            for (k, v) in p {
                if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
                    continue;
                }
                if let Some(list) = k.strip_prefix("$deleteFromPrimitiveList/") {
                    if let (Some(Value::Array(items)), Value::Array(del)) = (t.get_mut(list), v) {
                        items.retain(|i| !del.contains(i));
                    }
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                    continue;
                }
                match t.get_mut(k) {
                    Some(existing) => strategic_merge_patch(existing, v, ctx.field(k), k),
                    None => {
                        t.insert(k.clone(), without_directives(v));
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(p)) => {
            let all: Vec<Value> = t
                .iter()
                .chain(p.iter())
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect();
            match effective_list_type(&ctx, field, &all) {
                ListType::Map(keys) => {
                    for item in p {
                        let key = item_key(item, &keys);
                        match item.get("$patch").and_then(Value::as_str) {
                            Some("delete") => t.retain(|i| item_key(i, &keys) != key),
                            _ => match t.iter_mut().find(|i| item_key(i, &keys) == key) {
                                Some(existing) => strategic_merge_patch(existing, item, ctx.items(), ""),
                                None => t.push(without_directives(item)),
                            },
                        }
                    }
                }
                _ => *t = p.iter().map(without_directives).collect(),
            }
        }
        (t, p) => *t = without_directives(p),
    }
}

fn without_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
                .map(|(k, v)| (k.clone(), without_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_directives).collect()),
        other => other.clone(),
    }
}

/// RFC 6902 JSON patch; the error is what kube-apiserver says.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch.as_array().ok_or("the JSON patch must be a list of operations")?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("an operation has no path")?;
        match kind {
            "add" => add(target, path, op.get("value").cloned().unwrap_or(Value::Null))?,
            "remove" => {
                remove(target, path)?;
            }
            "replace" => {
                remove(target, path)?;
                add(target, path, op.get("value").cloned().unwrap_or(Value::Null))?;
            }
            "move" | "copy" => {
                let from = op
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or("an operation has no from")?;
                let v = target
                    .pointer(from)
                    .cloned()
                    .ok_or_else(|| format!("doc is missing from path: {from}"))?;
                if kind == "move" {
                    remove(target, from)?;
                }
                add(target, path, v)?;
            }
            "test" => {
                if target.pointer(path) != op.get("value") {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("Unexpected kind: {other}")),
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    let (parent, last) = path.rsplit_once('/').ok_or_else(|| format!("invalid path {path}"))?;
    Ok((parent.to_string(), last.replace("~1", "/").replace("~0", "~")))
}

fn add(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match target.pointer_mut(&parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>().map_err(|_| format!("invalid index {last}"))?
            };
            if i > a.len() {
                return Err(format!("add operation does not apply: doc is missing path: {path}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("add operation does not apply: doc is missing path: \"{path}\"")),
    }
}

fn remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let missing = || format!("remove operation does not apply: doc is missing path: \"{path}\"");
    match target.pointer_mut(&parent) {
        Some(Value::Object(m)) => m.remove(&last).ok_or_else(missing),
        Some(Value::Array(a)) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() { Ok(a.remove(i)) } else { Err(missing()) }
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(image: &str, replicas: Option<u32>) -> Value {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": image}]}}},
        });
        if let Some(r) = replicas {
            d["spec"]["replicas"] = json!(r);
        }
        d
    }

    fn args<'a>(live: Option<&'a Value>, config: &'a Value, manager: &'a str, force: bool) -> ApplyArgs<'a> {
        ApplyArgs {
            live,
            config,
            manager,
            force,
            api_version: "apps/v1",
            now: "2025-01-01T00:00:00Z",
            ctx: Ctx::builtin(),
            status_subresource: true,
        }
    }

    #[test]
    fn managed_fields_encode_items_by_key_and_round_trip() {
        let d = deployment("nginx:1", Some(2));
        let set = leaves(&strip_for_ownership(&d, Some(false)), Ctx::builtin());
        let enc = encode(&set);
        assert_eq!(
            enc["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"],
            json!({".": {}, "f:image": {}, "f:name": {}})
        );
        assert_eq!(enc["f:metadata"]["f:labels"]["f:app"], json!({}));
        let mut back = BTreeSet::new();
        decode(&enc, &mut Vec::new(), &mut back);
        assert_eq!(back, set);
    }

    #[test]
    fn apply_conflicts_with_another_manager_unless_forced_and_drops_what_it_no_longer_applies() {
        let first = apply(args(None, &deployment("nginx:1", Some(2)), "a", false)).unwrap();
        // The same values from another manager: shared, no conflict.
        let shared = apply(args(Some(&first), &deployment("nginx:1", Some(2)), "b", false)).unwrap();
        assert_eq!(read_managed(&shared).len(), 2);
        // A different replica count: conflict with a.
        let err = apply(args(Some(&first), &deployment("nginx:1", Some(3)), "b", false))
            .err()
            .unwrap();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].field, ".spec.replicas");
        assert_eq!(err[0].manager, "\"a\"");
        let mut b_config = deployment("nginx:1", Some(3));
        b_config["metadata"].as_object_mut().unwrap().remove("labels");
        let forced = apply(args(Some(&first), &b_config, "b", true)).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let a = read_managed(&forced).into_iter().find(|m| m.manager == "a").unwrap();
        assert!(
            !a.fields
                .contains(&vec![Pe::Field("spec".into()), Pe::Field("replicas".into())])
        );
        // a stops applying its labels: they go.
        let mut less = deployment("nginx:1", None);
        less["metadata"].as_object_mut().unwrap().remove("labels");
        let after = apply(args(Some(&forced), &less, "a", false)).unwrap();
        assert!(after["metadata"].get("labels").is_none(), "{after}");
        assert_eq!(after["spec"]["replicas"], 3, "b still owns replicas");
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut d = deployment("nginx:1", None);
        strategic_merge_patch(
            &mut d,
            &json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "web"}, {"name": "side"}],
                "containers": [{"name": "side", "image": "busybox"}, {"name": "web", "image": "nginx:2"}]}}}}),
            Ctx::builtin(),
            "",
        );
        let c = &d["spec"]["template"]["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_eq!(c[0]["image"], "nginx:2");
        let mut p = json!({"a": [1, 2], "b": {"c": 1}});
        json_patch(
            &mut p,
            &json!([{"op": "add", "path": "/a/-", "value": 3}, {"op": "remove", "path": "/b/c"}]),
        )
        .unwrap();
        assert_eq!(p, json!({"a": [1, 2, 3], "b": {}}));
    }
}
