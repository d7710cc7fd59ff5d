//! The generic REST handlers: get, list (label and field selectors), create, replace, the
//! four patch types (server-side apply included), delete and delete-collection, for every
//! resource of the [`Catalog`] but nodes, with the status subresource; errors as
//! kube-apiserver's `Status` objects.

// The error of these functions is the HTTP answer itself, built once and returned as is.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::fields::{self, ApplyArgs, Ctx};
use super::objects::{Entry, Objects, now_ms, storable_name};
use super::resources::Resource;
use super::{Shared, json_response, now, status, table};
use crate::store;
use axum::response::Response;

/// What a request addresses.
#[derive(Debug, Clone)]
pub struct Target {
    pub res: Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

/// A request's query parameters, decoded.
#[derive(Debug, Default, Clone)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1" | ""))
    }

    fn dry_run(&self) -> bool {
        self.0.iter().any(|(k, v)| k == "dryRun" && v == "All")
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request to the object store.
pub struct Call<'a> {
    pub shared: &'a Shared,
    pub method: &'a str,
    pub target: Target,
    pub query: Query,
    pub content_type: String,
    pub accept: String,
    pub user_agent: String,
    pub body: Vec<u8>,
}

/// An answer that is not a success.
pub type Failure = Response;

pub fn not_found(res: &Resource, name: &str) -> Failure {
    status(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", res.qualified()),
        Some(json!({"name": name, "group": res.group, "kind": res.plural})),
    )
}

pub fn namespace_not_found(ns: &str) -> Failure {
    status(
        404,
        "NotFound",
        &format!("namespaces \"{ns}\" not found"),
        Some(json!({"name": ns, "kind": "namespaces"})),
    )
}

fn bad_request(message: &str) -> Failure {
    status(400, "BadRequest", message, None)
}

fn invalid(res: &Resource, name: &str, field: &str, message: &str) -> Failure {
    status(
        422,
        "Invalid",
        &format!("{} \"{name}\" is invalid: {field}: {message}", res.kind),
        Some(json!({
            "name": name, "group": res.group, "kind": res.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": message, "field": field}],
        })),
    )
}

fn conflict(res: &Resource, name: &str) -> Failure {
    status(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your \
             changes to the latest version and try again",
            res.qualified()
        ),
        Some(json!({"name": name, "group": res.group, "kind": res.plural})),
    )
}

fn internal(e: impl std::fmt::Display) -> Failure {
    status(500, "InternalError", &format!("Internal error occurred: {e}"), None)
}

fn method_not_allowed() -> Failure {
    status(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        None,
    )
}

/// Parse a request body: JSON, or YAML (what an apply patch may be).
fn parse_body(body: &[u8], yaml: bool) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(e) if !yaml => Err(format!("couldn't get version/kind; json parse error: {e}")),
        Err(_) => {
            let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
            let y: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| format!("error decoding YAML: {e}"))?;
            serde_json::to_value(y).map_err(|e| e.to_string())
        }
    }
}

/// `metadata.name` as kube-apiserver validates it for most kinds (a DNS subdomain); RBAC
/// names only need to be path segments.
fn name_problem(res: &Resource, name: &str) -> Option<String> {
    if res.group == "rbac.authorization.k8s.io" {
        return (!storable_name(name)).then(|| format!("Invalid value: \"{name}\": may not contain '/' or '%'"));
    }
    let b = name.as_bytes();
    let label = res.is("", "namespaces");
    let ok = !b.is_empty()
        && b.len() <= if label { 63 } else { 253 }
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || (*c == b'.' && !label))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    (!ok).then(|| {
        if label {
            format!(
                "Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric \
                 characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or \
                 '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
            )
        } else {
            format!(
                "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
                 characters, '-' or '.', and must start and end with an alphanumeric character (e.g. \
                 'example.com', regex used for validation is \
                 '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            )
        }
    })
}

/// The manager of a write: `fieldManager`, else the user agent's first word, as the API does.
fn manager(call: &Call<'_>) -> String {
    call.query
        .get("fieldManager")
        .map(String::from)
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| {
            let ua = call.user_agent.split('/').next().unwrap_or("").trim();
            if ua.is_empty() {
                "unknown".into()
            } else {
                ua.to_string()
            }
        })
}

fn ctx(res: &Resource) -> Ctx<'_> {
    if res.custom {
        Ctx::custom(res.schema.as_ref())
    } else {
        Ctx::builtin()
    }
}

/// The object as served for the requested version.
pub fn served(res: &Resource, object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        // apiVersion and kind first, as the API server writes them.
        let mut out = Map::new();
        out.insert("apiVersion".into(), json!(res.api_version()));
        out.insert("kind".into(), json!(res.kind));
        for (k, v) in std::mem::take(m) {
            if k != "apiVersion" && k != "kind" {
                out.insert(k, v);
            }
        }
        *m = out;
    }
    o
}

// ---- selectors ----------------------------------------------------------------------------------

/// One requirement of a label selector.
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Split on commas outside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c);
            }
            ')' => {
                depth -= 1;
                cur.push(c);
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<Req>, String> {
    let mut out = Vec::new();
    for part in split_top(s) {
        let set = |rest: &str| -> Vec<String> {
            rest.trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split(',')
                .map(|v| v.trim().to_string())
                .collect()
        };
        if let Some(k) = part.strip_prefix('!') {
            out.push(Req::NotExists(k.trim().to_string()));
        } else if let Some((k, v)) = part.split_once("!=") {
            out.push(Req::NotEq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = part.split_once("==") {
            out.push(Req::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = part.split_once('=') {
            out.push(Req::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = part.split_once(" notin ") {
            out.push(Req::NotIn(k.trim().into(), set(v)));
        } else if let Some((k, v)) = part.split_once(" in ") {
            out.push(Req::In(k.trim().into(), set(v)));
        } else if part.contains(' ') || part.contains('(') {
            return Err(format!("unable to parse requirement: {part}"));
        } else {
            out.push(Req::Exists(part));
        }
    }
    Ok(out)
}

fn labels_match(reqs: &[Req], labels: &Map<String, Value>) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        Req::Eq(k, v) => get(k) == Some(v.as_str()),
        Req::NotEq(k, v) => get(k) != Some(v.as_str()),
        Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        Req::Exists(k) => get(k).is_some(),
        Req::NotExists(k) => get(k).is_none(),
    })
}

/// Does the object pass `labelSelector` and `fieldSelector`?
pub struct Selector {
    labels: Vec<Req>,
    fields: Vec<(String, bool, String)>,
}

impl Selector {
    pub fn from_query(q: &Query) -> Result<Selector, String> {
        let labels = parse_label_selector(q.get("labelSelector").unwrap_or(""))?;
        let mut fields = Vec::new();
        for part in split_top(q.get("fieldSelector").unwrap_or("")) {
            let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{part}'; can't understand '{part}'"));
            };
            fields.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(Selector { labels, fields })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let empty = Map::new();
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        labels_match(&self.labels, labels)
            && self.fields.iter().all(|(path, eq, want)| {
                let pointer = format!("/{}", path.replace('.', "/"));
                let have = match object.pointer(&pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (have == *want) == *eq
            })
    }
}

// ---- reads ----------------------------------------------------------------------------------------

/// A list of objects as the API answers it (or a Table when the client asked for one).
pub fn list_response(res: &Resource, items: Vec<Value>, rv: u64, accept: &str, shared: &Shared) -> Response {
    let items: Vec<Value> = items.iter().map(|o| served(res, o)).collect();
    if wants_table(accept) {
        return json_response(200, &table::table(res, &items, rv, shared));
    }
    json_response(
        200,
        &json!({
            "kind": res.list_kind(), "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": rv.to_string()}, "items": items,
        }),
    )
}

pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table"))
}

pub fn object_response(code: u16, res: &Resource, object: &Value, accept: &str, shared: &Shared) -> Response {
    let o = served(res, object);
    if wants_table(accept) {
        let rv = o
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        return json_response(code, &table::table(res, &[o], rv, shared));
    }
    json_response(code, &o)
}

fn namespace_state(objects: &Objects, ns: &str) -> Option<Value> {
    objects.get("", "namespaces", None, ns).map(|e| e.object)
}

fn terminating(ns: &Value) -> bool {
    ns.pointer("/metadata/deletionTimestamp").is_some()
}

/// Handle a request for a stored resource.
pub async fn handle(call: Call<'_>) -> Response {
    let res = call.target.res.clone();
    let objects = Objects::new(&call.shared.state_dir);
    if res.namespaced != call.target.namespace.is_some() && !(res.namespaced && call.target.name.is_none()) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    }
    match (call.method, call.target.name.clone(), call.target.sub.clone()) {
        ("GET", None, None) => {
            if call.query.flag("watch") {
                return super::watch::watch(call.shared, res, call.target.namespace.clone(), call.query.clone()).await;
            }
            let sel = match Selector::from_query(&call.query) {
                Ok(s) => s,
                Err(e) => return bad_request(&e),
            };
            let items: Vec<Value> = objects
                .list(&res.group, &res.plural, call.target.namespace.as_deref())
                .into_iter()
                .map(|e| e.object)
                .filter(|o| sel.matches(o))
                .collect();
            list_response(&res, items, objects.current_rv(), &call.accept, call.shared)
        }
        ("GET", Some(name), sub) => {
            if sub.as_deref().is_some_and(|s| s != "status" || !res.status) {
                return status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                    None,
                );
            }
            match objects.get(&res.group, &res.plural, call.target.namespace.as_deref(), &name) {
                Some(e) => object_response(200, &res, &e.object, &call.accept, call.shared),
                None => not_found(&res, &name),
            }
        }
        ("POST", None, None) => {
            let _guard = call.shared.patch_lock.lock().await;
            create(&call, &objects)
        }
        ("PUT", Some(name), sub) => {
            if sub.as_deref().is_some_and(|s| s != "status" || !res.status) {
                return method_not_allowed();
            }
            let _guard = call.shared.patch_lock.lock().await;
            replace(&call, &objects, &name, sub.as_deref())
        }
        ("PATCH", Some(name), sub) => {
            if sub.as_deref().is_some_and(|s| s != "status" || !res.status) {
                return method_not_allowed();
            }
            let _guard = call.shared.patch_lock.lock().await;
            patch(&call, &objects, &name, sub.as_deref())
        }
        ("DELETE", Some(name), None) => {
            let _guard = call.shared.patch_lock.lock().await;
            delete(&call, &objects, &name)
        }
        ("DELETE", None, None) => {
            let _guard = call.shared.patch_lock.lock().await;
            delete_collection(&call, &objects)
        }
        _ => method_not_allowed(),
    }
}

// ---- writes ------------------------------------------------------------------------------------

/// The parts of an object that make a new generation: everything but metadata and status.
fn spec_of(o: &Value) -> Value {
    let mut v = o.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    v
}

fn has_generation(res: &Resource) -> bool {
    res.status || res.custom
}

/// Check the body against the URL: apiVersion and kind, name, namespace.
fn check_identity(call: &Call<'_>, body: &mut Value, name: Option<&str>) -> Result<(), Failure> {
    let res = &call.target.res;
    if !body.is_object() {
        return Err(bad_request("the body of the request was not a JSON object"));
    }
    if let Some(av) = body.get("apiVersion").and_then(Value::as_str)
        && av != res.api_version()
    {
        // Another served version of the same group is fine (the sandbox does no conversion).
        let same_group = av.rsplit_once('/').map(|(g, _)| g).unwrap_or("") == res.group;
        if !same_group {
            return Err(bad_request(&format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                res.api_version()
            )));
        }
    }
    if let Some(kind) = body.get("kind").and_then(Value::as_str)
        && kind != res.kind
    {
        return Err(bad_request(&format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            res.kind
        )));
    }
    let meta = body
        .as_object_mut()
        .expect("checked")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if !meta.is_object() {
        return Err(bad_request("metadata must be an object"));
    }
    if let Some(name) = name {
        match meta.get("name").and_then(Value::as_str) {
            Some(n) if n != name => {
                return Err(bad_request(&format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => meta["name"] = json!(name),
        }
    }
    match (&call.target.namespace, meta.get("namespace").and_then(Value::as_str)) {
        (Some(ns), Some(given)) if given != ns => {
            return Err(bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        (Some(ns), _) => meta["namespace"] = json!(ns),
        (None, _) => {
            if let Some(m) = meta.as_object_mut() {
                m.remove("namespace");
            }
        }
    }
    Ok(())
}

/// The namespace must exist and not be terminating, for new objects in it.
fn check_namespace(call: &Call<'_>, objects: &Objects, name: &str) -> Result<(), Failure> {
    let Some(ns) = &call.target.namespace else {
        return Ok(());
    };
    match namespace_state(objects, ns) {
        None => Err(namespace_not_found(ns)),
        Some(n) if terminating(&n) => {
            let res = &call.target.res;
            Err(status(
                403,
                "Forbidden",
                &format!(
                    "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being \
                     terminated",
                    res.qualified()
                ),
                Some(json!({
                    "name": name, "group": res.group, "kind": res.plural,
                    "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}],
                })),
            ))
        }
        Some(_) => Ok(()),
    }
}

/// Server-set metadata and defaults of a new object.
pub fn initialise(shared: &Shared, res: &Resource, object: &mut Value, rv: u64) {
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let ns = object["metadata"]["namespace"].as_str().unwrap_or("").to_string();
    let meta = object["metadata"].as_object_mut().expect("checked");
    meta.insert(
        "uid".into(),
        json!(store::uuid_from(
            shared.seed ^ rv.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            &format!("{}/{ns}/{name}", res.qualified())
        )),
    );
    meta.insert("creationTimestamp".into(), json!(now()));
    for k in ["deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
        meta.remove(k);
    }
    if has_generation(res) {
        meta.insert("generation".into(), json!(1));
    } else {
        meta.remove("generation");
    }
    if res.status
        && let Some(m) = object.as_object_mut()
    {
        m.remove("status");
    }
    defaults(shared, res, object);
}

/// The defaults the API server fills in that the sandbox's clients look at.
fn defaults(shared: &Shared, res: &Resource, object: &mut Value) {
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    if res.is("", "namespaces") {
        object["metadata"]
            .as_object_mut()
            .expect("checked")
            .entry("labels")
            .or_insert_with(|| json!({}))["kubernetes.io/metadata.name"] = json!(name);
        object["spec"] = json!({"finalizers": ["kubernetes"]});
        object["status"] = json!({"phase": "Active"});
    }
    if res.is("", "services") {
        let spec = object
            .as_object_mut()
            .expect("checked")
            .entry("spec")
            .or_insert_with(|| json!({}));
        if spec.get("type").is_none() {
            spec["type"] = json!("ClusterIP");
        }
        if spec["type"] != "ExternalName" && spec.get("clusterIP").is_none() {
            // The service CIDR K3s uses (10.43.0.0/16): an address inside the simulated
            // cluster, never dialled.
            let d = store::splitmix64(shared.seed ^ name.len() as u64 ^ hash(&name));
            let ip = format!("10.43.{}.{}", (d >> 8) % 256, d % 254 + 1);
            spec["clusterIP"] = json!(ip);
            spec["clusterIPs"] = json!([ip]);
        }
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for p in ports {
                if p.get("protocol").is_none() {
                    p["protocol"] = json!("TCP");
                }
            }
        }
    }
}

fn hash(s: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(s.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The fields a write may not change: identity and server-set metadata.
fn keep_server_fields(old: &Value, new: &mut Value, res: &Resource, status_write: bool) {
    let old_meta = old["metadata"].clone();
    let meta = new["metadata"].as_object_mut().expect("checked");
    for k in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "generation",
        "namespace",
        "name",
    ] {
        match old_meta.get(k) {
            Some(v) => {
                meta.insert(k.into(), v.clone());
            }
            None => {
                meta.remove(k);
            }
        }
    }
    if res.status && !status_write {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                new.as_object_mut().expect("checked").remove("status");
            }
        }
    }
    if status_write {
        // A status write changes status only.
        let status = new.get("status").cloned();
        let managed = new.pointer("/metadata/managedFields").cloned();
        *new = old.clone();
        match status {
            Some(s) => new["status"] = s,
            None => {
                new.as_object_mut().expect("checked").remove("status");
            }
        }
        if let Some(m) = managed {
            new["metadata"]["managedFields"] = m;
        }
    }
    if res.is("", "namespaces") && !status_write {
        new["spec"] = old["spec"].clone();
    }
}

/// Store a written object: resourceVersion, generation, when its spec changed. A deleted
/// object whose last finalizer went is removed instead. Returns what the API answers.
fn commit(call: &Call<'_>, objects: &Objects, old: Option<&Entry>, mut object: Value) -> Result<Value, Failure> {
    let res = &call.target.res;
    let spec_changed = old.is_none_or(|o| spec_of(&o.object) != spec_of(&object));
    if let Some(o) = old
        && has_generation(res)
    {
        let g = o
            .object
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        object["metadata"]["generation"] = json!(if spec_changed { g + 1 } else { g });
    }
    object = served(res, &object);
    if let Some(o) = old
        && same_content(&served(res, &o.object), &object)
    {
        // Nothing changed: no new resourceVersion.
        return Ok(o.object.clone());
    }
    if call.query.dry_run() {
        return Ok(object);
    }
    let rv = objects.next_rv().map_err(internal)?;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let finalizers_done = object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(|f| f.is_empty());
    if object.pointer("/metadata/deletionTimestamp").is_some() && finalizers_done && !res.is("", "namespaces") {
        let meta = &object["metadata"];
        objects
            .remove(
                &res.group,
                &res.plural,
                meta["namespace"].as_str(),
                meta["name"].as_str().unwrap_or_default(),
            )
            .map_err(internal)?;
        return Ok(object);
    }
    let changed_ms = match old {
        Some(o) if !spec_changed => o.changed_ms,
        _ => now_ms(),
    };
    objects
        .put(
            &res.group,
            &res.plural,
            &Entry {
                changed_ms,
                object: object.clone(),
            },
        )
        .map_err(internal)?;
    Ok(object)
}

/// Equal but for resourceVersion and the times in managedFields.
fn same_content(a: &Value, b: &Value) -> bool {
    fn norm(v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(m) = v["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            if let Some(Value::Array(entries)) = m.get_mut("managedFields") {
                for e in entries {
                    if let Some(e) = e.as_object_mut() {
                        e.remove("time");
                    }
                }
            }
        }
        v
    }
    norm(a) == norm(b)
}

fn create(call: &Call<'_>, objects: &Objects) -> Response {
    let res = &call.target.res;
    let mut body = match parse_body(&call.body, false) {
        Ok(b) => b,
        Err(e) => return bad_request(&e),
    };
    if let Err(f) = check_identity(call, &mut body, None) {
        return f;
    }
    let meta = &mut body["metadata"];
    let name = match meta.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) => {
                let suffix = super::pod_suffix(call.shared.seed ^ now_ms(), prefix, 5);
                let n = format!("{prefix}{suffix}");
                meta["name"] = json!(n);
                n
            }
            None => {
                return invalid(
                    res,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                );
            }
        },
    };
    if let Some(problem) = name_problem(res, &name) {
        return invalid(res, &name, "metadata.name", &problem);
    }
    if let Err(f) = check_namespace(call, objects, &name) {
        return f;
    }
    let ns = call.target.namespace.as_deref();
    if objects.get(&res.group, &res.plural, ns, &name).is_some() {
        return status(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", res.qualified()),
            Some(json!({"name": name, "group": res.group, "kind": res.plural})),
        );
    }
    if let Some(m) = body["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    initialise(call.shared, res, &mut body, objects.current_rv() + 1);
    fields::record_update(
        None,
        &mut body,
        &manager(call),
        &res.api_version(),
        &now(),
        None,
        ctx(res),
    );
    match commit(call, objects, None, body) {
        Ok(o) => object_response(201, res, &o, &call.accept, call.shared),
        Err(f) => f,
    }
}

fn replace(call: &Call<'_>, objects: &Objects, name: &str, sub: Option<&str>) -> Response {
    let res = &call.target.res;
    let mut body = match parse_body(&call.body, false) {
        Ok(b) => b,
        Err(e) => return bad_request(&e),
    };
    if let Err(f) = check_identity(call, &mut body, Some(name)) {
        return f;
    }
    let ns = call.target.namespace.as_deref();
    let Some(old) = objects.get(&res.group, &res.plural, ns, name) else {
        return not_found(res, name);
    };
    if let Some(rv) = body.pointer("/metadata/resourceVersion").and_then(Value::as_str)
        && Some(rv) != old.object.pointer("/metadata/resourceVersion").and_then(Value::as_str)
    {
        return conflict(res, name);
    }
    if body.pointer("/metadata/managedFields").is_none() {
        body["metadata"]["managedFields"] = old.object["metadata"]["managedFields"].clone();
    }
    keep_server_fields(&old.object, &mut body, res, sub == Some("status"));
    fields::record_update(
        Some(&old.object),
        &mut body,
        &manager(call),
        &res.api_version(),
        &now(),
        sub,
        ctx(res),
    );
    match commit(call, objects, Some(&old), body) {
        Ok(o) => object_response(200, res, &o, &call.accept, call.shared),
        Err(f) => f,
    }
}

fn patch(call: &Call<'_>, objects: &Objects, name: &str, sub: Option<&str>) -> Response {
    let res = &call.target.res;
    let ct = call.content_type.as_str();
    let apply = ct == "application/apply-patch+yaml" || ct == "application/apply-patch+cbor";
    let known = [
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ];
    if !known.contains(&ct) {
        return status(
            415,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                known.join(", ")
            ),
            None,
        );
    }
    if ct == "application/strategic-merge-patch+json" && res.custom {
        return status(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            None,
        );
    }
    let patch = match parse_body(&call.body, apply) {
        Ok(b) => b,
        Err(e) => return bad_request(&e),
    };
    let ns = call.target.namespace.as_deref();
    let old = objects.get(&res.group, &res.plural, ns, name);
    let now = now();
    if apply {
        let Some(mgr) = call.query.get("fieldManager").filter(|m| !m.is_empty()) else {
            return status(
                422,
                "Invalid",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                Some(json!({"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [
                    {"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]})),
            );
        };
        let mut config = patch;
        if let Err(f) = check_identity(call, &mut config, Some(name)) {
            return f;
        }
        if config.get("apiVersion").is_none() || config.get("kind").is_none() {
            return bad_request("apiVersion and kind must be set in an apply patch");
        }
        if old.is_none() {
            if let Some(p) = name_problem(res, name) {
                return invalid(res, name, "metadata.name", &p);
            }
            if let Err(f) = check_namespace(call, objects, name) {
                return f;
            }
        }
        if let Some(rv) = config.pointer("/metadata/resourceVersion").and_then(Value::as_str)
            && Some(rv)
                != old
                    .as_ref()
                    .and_then(|o| o.object.pointer("/metadata/resourceVersion"))
                    .and_then(Value::as_str)
        {
            return conflict(res, name);
        }
        let api_version = config["apiVersion"].as_str().unwrap_or_default().to_string();
        let result = fields::apply(ApplyArgs {
            live: old.as_ref().map(|o| &o.object),
            config: &config,
            manager: mgr,
            force: call.query.flag("force"),
            api_version: &api_version,
            now: &now,
            ctx: ctx(res),
            status_subresource: res.status && sub != Some("status"),
        });
        let mut merged = match result {
            Ok(m) => m,
            Err(conflicts) => return apply_conflict(&conflicts),
        };
        match &old {
            None => {
                initialise(call.shared, res, &mut merged, objects.current_rv() + 1);
                match commit(call, objects, None, merged) {
                    Ok(o) => object_response(201, res, &o, &call.accept, call.shared),
                    Err(f) => f,
                }
            }
            Some(old) => {
                keep_server_fields(&old.object, &mut merged, res, sub == Some("status"));
                match commit(call, objects, Some(old), merged) {
                    Ok(o) => object_response(200, res, &o, &call.accept, call.shared),
                    Err(f) => f,
                }
            }
        }
    } else {
        let Some(old) = old else {
            return not_found(res, name);
        };
        let mut new = old.object.clone();
        match ct {
            "application/merge-patch+json" => fields::merge_patch(&mut new, &patch),
            "application/strategic-merge-patch+json" => fields::strategic_merge_patch(&mut new, &patch, ctx(res), ""),
            _ => {
                if let Err(e) = fields::json_patch(&mut new, &patch) {
                    return status(422, "Invalid", &e, None);
                }
            }
        }
        if let Some(rv) = patch.pointer("/metadata/resourceVersion").and_then(Value::as_str)
            && Some(rv) != old.object.pointer("/metadata/resourceVersion").and_then(Value::as_str)
        {
            return conflict(res, name);
        }
        if !new.is_object() || !new["metadata"].is_object() {
            return bad_request("the patch leaves no object");
        }
        keep_server_fields(&old.object, &mut new, res, sub == Some("status"));
        fields::record_update(
            Some(&old.object),
            &mut new,
            &manager(call),
            &res.api_version(),
            &now,
            sub,
            ctx(res),
        );
        match commit(call, objects, Some(&old), new) {
            Ok(o) => object_response(200, res, &o, &call.accept, call.shared),
            Err(f) => f,
        }
    }
}

/// 409 with one cause per conflicting field, as kube-apiserver answers an apply.
fn apply_conflict(conflicts: &[fields::Conflict]) -> Response {
    let message = if conflicts.len() == 1 {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            conflicts[0].manager, conflicts[0].field
        )
    } else {
        let mut by_manager: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for c in conflicts {
            by_manager.entry(&c.manager).or_default().push(&c.field);
        }
        let mut lines = Vec::new();
        for (m, fields) in by_manager {
            lines.push(format!("conflicts with {m}:"));
            for f in fields {
                lines.push(format!("- {f}"));
            }
        }
        format!("Apply failed with {} conflicts: {}", conflicts.len(), lines.join("\n"))
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with {}", c.manager), "field": c.field}))
        .collect();
    status(409, "Conflict", &message, Some(json!({"causes": causes})))
}

/// The propagation policy of a delete (query or DeleteOptions body).
fn propagation(call: &Call<'_>) -> String {
    call.query
        .get("propagationPolicy")
        .map(String::from)
        .or_else(|| {
            serde_json::from_slice::<Value>(&call.body)
                .ok()
                .and_then(|b| b.get("propagationPolicy").and_then(Value::as_str).map(String::from))
        })
        .unwrap_or_else(|| "Background".into())
}

fn dry_run_body(call: &Call<'_>) -> bool {
    call.query.dry_run()
        || serde_json::from_slice::<Value>(&call.body)
            .ok()
            .and_then(|b| b.get("dryRun").cloned())
            .and_then(|d| d.as_array().cloned())
            .is_some_and(|d| d.iter().any(|v| v == "All"))
}

/// Delete one object: at once, or marked (deletionTimestamp) while finalizers remain and
/// for a namespace, whose content the namespace controller removes first.
pub fn delete_object(
    shared: &Shared,
    objects: &Objects,
    res: &Resource,
    entry: Entry,
    dry_run: bool,
    orphan: bool,
) -> Result<(bool, Value), Failure> {
    let mut object = entry.object.clone();
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let ns = object["metadata"]["namespace"].as_str().map(String::from);
    if res.is("", "namespaces") && ["default", "kube-system", "kube-public"].contains(&name.as_str()) {
        return Err(status(
            403,
            "Forbidden",
            &format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
            Some(json!({"name": name, "kind": "namespaces"})),
        ));
    }
    let finalizers = object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let graceful = res.is("", "namespaces") || finalizers;
    if dry_run {
        return Ok((graceful, object));
    }
    if orphan {
        super::controllers::orphan_dependents(objects, &object);
    }
    if graceful {
        if object.pointer("/metadata/deletionTimestamp").is_none() {
            let rv = objects.next_rv().map_err(internal)?;
            object["metadata"]["deletionTimestamp"] = json!(now());
            object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            if res.is("", "namespaces") {
                object["status"] = json!({"phase": "Terminating"});
            }
            objects
                .put(
                    &res.group,
                    &res.plural,
                    &Entry {
                        changed_ms: entry.changed_ms,
                        object: object.clone(),
                    },
                )
                .map_err(internal)?;
        }
        return Ok((true, object));
    }
    objects
        .remove(&res.group, &res.plural, ns.as_deref(), &name)
        .map_err(internal)?;
    objects.next_rv().map_err(internal)?;
    super::controllers::on_deleted(shared, objects, res, &object);
    Ok((false, object))
}

fn delete(call: &Call<'_>, objects: &Objects, name: &str) -> Response {
    let res = &call.target.res;
    let ns = call.target.namespace.as_deref();
    let Some(entry) = objects.get(&res.group, &res.plural, ns, name) else {
        return not_found(res, name);
    };
    let uid = entry.object["metadata"]["uid"].clone();
    match delete_object(
        call.shared,
        objects,
        res,
        entry,
        dry_run_body(call),
        propagation(call) == "Orphan",
    ) {
        Err(f) => f,
        // Still there (finalizers, a namespace emptying): the object, 200.
        Ok((true, object)) => object_response(200, res, &object, "", call.shared),
        // Gone: a Status, as the registry answers (pods answer with the object).
        Ok((false, object)) if res.is("", "pods") => object_response(200, res, &object, "", call.shared),
        Ok((false, _)) => json_response(
            200,
            &json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": res.group, "kind": res.plural, "uid": uid},
            }),
        ),
    }
}

fn delete_collection(call: &Call<'_>, objects: &Objects) -> Response {
    let res = &call.target.res;
    if res.is("", "namespaces") {
        return method_not_allowed();
    }
    let sel = match Selector::from_query(&call.query) {
        Ok(s) => s,
        Err(e) => return bad_request(&e),
    };
    let mut deleted = Vec::new();
    for entry in objects.list(&res.group, &res.plural, call.target.namespace.as_deref()) {
        if !sel.matches(&entry.object) {
            continue;
        }
        match delete_object(
            call.shared,
            objects,
            res,
            entry,
            dry_run_body(call),
            propagation(call) == "Orphan",
        ) {
            Ok((_, o)) => deleted.push(o),
            Err(f) => return f,
        }
    }
    list_response(res, deleted, objects.current_rv(), "", call.shared)
}
