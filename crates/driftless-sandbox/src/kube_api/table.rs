//! `Table` answers (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`): what `kubectl
//! get` prints, with the columns kube-apiserver's printers give the common kinds, a CRD's
//! `additionalPrinterColumns`, and NAME/AGE otherwise.

use serde_json::{Value, json};

use super::Shared;
use super::resources::Resource;

/// kubectl's short durations (`apimachinery/pkg/util/duration.HumanDuration`).
pub fn human_duration(secs: i64) -> String {
    if secs < 0 {
        return "<invalid>".into();
    }
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        let s = secs % 60;
        if s == 0 { format!("{m}m") } else { format!("{m}m{s}s") }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        let mm = m % 60;
        if mm == 0 { format!("{h}h") } else { format!("{h}h{mm}m") }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        let hh = h % 24;
        if hh == 0 { format!("{d}d") } else { format!("{d}d{hh}h") }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn age(o: &Value) -> String {
    let Some(ts) = o.pointer("/metadata/creationTimestamp").and_then(Value::as_str) else {
        return "<unknown>".into();
    };
    match chrono::DateTime::parse_from_rfc3339(ts) {
        Ok(t) => human_duration((chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()),
        Err(_) => "<unknown>".into(),
    }
}

fn col(name: &str, ty: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
}

fn s(o: &Value, pointer: &str) -> String {
    match o.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

fn n(o: &Value, pointer: &str) -> i64 {
    o.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

/// A CRD printer column's JSONPath (`.spec.x`, `.status.conditions[?(@.type=="Ready")].status`).
fn json_path(o: &Value, path: &str) -> Value {
    let mut cur = o.clone();
    let path = path.trim_start_matches('.');
    for part in split_path(path) {
        if let Some(filter) = part.strip_prefix("[?(@.").and_then(|p| p.strip_suffix(")]")) {
            let Some((k, v)) = filter.split_once("==") else {
                return Value::Null;
            };
            let want = v.trim_matches(|c| c == '"' || c == '\'');
            cur = cur
                .as_array()
                .and_then(|a| a.iter().find(|i| i[k] == want).cloned())
                .unwrap_or(Value::Null);
        } else if let Some(idx) = part.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
            cur = idx
                .parse::<usize>()
                .ok()
                .and_then(|i| cur.get(i).cloned())
                .unwrap_or(Value::Null);
        } else {
            cur = cur.get(&part).cloned().unwrap_or(Value::Null);
        }
    }
    cur
}

fn split_path(p: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0;
    for c in p.chars() {
        match c {
            '[' => {
                if depth == 0 && !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                depth += 1;
                cur.push(c);
            }
            ']' => {
                depth -= 1;
                cur.push(c);
                if depth == 0 {
                    out.push(std::mem::take(&mut cur));
                }
            }
            '.' if depth == 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn ready_condition(o: &Value) -> String {
    o.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"].as_str().unwrap_or("Unknown").to_string())
        .unwrap_or_else(|| "Unknown".into())
}

/// The columns and cells of one kind.
fn columns(res: &Resource, items: &[Value]) -> (Vec<Value>, Vec<Vec<Value>>) {
    let name = |o: &Value| json!(s(o, "/metadata/name"));
    let rows = |f: &dyn Fn(&Value) -> Vec<Value>| items.iter().map(f).collect::<Vec<_>>();
    match (res.group.as_str(), res.plural.as_str()) {
        ("", "nodes") => (
            vec![
                col("Name", "string", 0),
                col("Status", "string", 0),
                col("Roles", "string", 0),
                col("Age", "string", 0),
                col("Version", "string", 0),
                col("Internal-IP", "string", 1),
                col("External-IP", "string", 1),
                col("OS-Image", "string", 1),
                col("Kernel-Version", "string", 1),
                col("Container-Runtime", "string", 1),
            ],
            rows(&|o| {
                let status = match ready_condition(o).as_str() {
                    "True" => "Ready",
                    "False" => "NotReady",
                    _ => "Unknown",
                };
                let mut roles: Vec<String> = o["metadata"]["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/").map(String::from))
                    .collect();
                roles.sort();
                let ip = o["status"]["addresses"]
                    .as_array()
                    .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
                    .map(|a| s(a, "/address"))
                    .unwrap_or_default();
                vec![
                    name(o),
                    json!(status),
                    json!(or_none(roles.join(","))),
                    json!(age(o)),
                    json!(s(o, "/status/nodeInfo/kubeletVersion")),
                    json!(or_none(ip)),
                    json!("<none>"),
                    json!(s(o, "/status/nodeInfo/osImage")),
                    json!(s(o, "/status/nodeInfo/kernelVersion")),
                    json!(s(o, "/status/nodeInfo/containerRuntimeVersion")),
                ]
            }),
        ),
        ("", "pods") => (
            vec![
                col("Name", "string", 0),
                col("Ready", "string", 0),
                col("Status", "string", 0),
                col("Restarts", "string", 0),
                col("Age", "string", 0),
                col("IP", "string", 1),
                col("Node", "string", 1),
            ],
            rows(&|o| {
                let statuses = o["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
                let total = o["spec"]["containers"]
                    .as_array()
                    .map(Vec::len)
                    .unwrap_or(statuses.len());
                let ready = statuses.iter().filter(|c| c["ready"] == true).count();
                let phase = s(o, "/status/phase");
                let waiting = statuses
                    .iter()
                    .find_map(|c| c.pointer("/state/waiting/reason").and_then(Value::as_str));
                let shown = match (phase.as_str(), waiting) {
                    ("Succeeded", _) => "Completed".to_string(),
                    (_, Some(w)) => w.to_string(),
                    (p, _) => p.to_string(),
                };
                vec![
                    name(o),
                    json!(format!("{ready}/{total}")),
                    json!(shown),
                    json!("0"),
                    json!(age(o)),
                    json!(or_none(s(o, "/status/podIP"))),
                    json!(or_none(s(o, "/spec/nodeName"))),
                ]
            }),
        ),
        ("apps", "deployments") => (
            vec![
                col("Name", "string", 0),
                col("Ready", "string", 0),
                col("Up-to-date", "integer", 0),
                col("Available", "integer", 0),
                col("Age", "string", 0),
            ],
            rows(&|o| {
                let want = o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
                vec![
                    name(o),
                    json!(format!("{}/{want}", n(o, "/status/readyReplicas"))),
                    json!(n(o, "/status/updatedReplicas")),
                    json!(n(o, "/status/availableReplicas")),
                    json!(age(o)),
                ]
            }),
        ),
        ("apps", "statefulsets") | ("apps", "replicasets") => (
            vec![
                col("Name", "string", 0),
                col("Ready", "string", 0),
                col("Age", "string", 0),
            ],
            rows(&|o| {
                let want = o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
                vec![
                    name(o),
                    json!(format!("{}/{want}", n(o, "/status/readyReplicas"))),
                    json!(age(o)),
                ]
            }),
        ),
        ("apps", "daemonsets") => (
            vec![
                col("Name", "string", 0),
                col("Desired", "integer", 0),
                col("Current", "integer", 0),
                col("Ready", "integer", 0),
                col("Up-to-date", "integer", 0),
                col("Available", "integer", 0),
                col("Node Selector", "string", 0),
                col("Age", "string", 0),
            ],
            rows(&|o| {
                let selector: Vec<String> = o
                    .pointer("/spec/template/spec/nodeSelector")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect();
                vec![
                    name(o),
                    json!(n(o, "/status/desiredNumberScheduled")),
                    json!(n(o, "/status/currentNumberScheduled")),
                    json!(n(o, "/status/numberReady")),
                    json!(n(o, "/status/updatedNumberScheduled")),
                    json!(n(o, "/status/numberAvailable")),
                    json!(or_none(selector.join(","))),
                    json!(age(o)),
                ]
            }),
        ),
        ("batch", "jobs") => (
            vec![
                col("Name", "string", 0),
                col("Status", "string", 0),
                col("Completions", "string", 0),
                col("Age", "string", 0),
            ],
            rows(&|o| {
                let want = o.pointer("/spec/completions").and_then(Value::as_i64).unwrap_or(1);
                let done = n(o, "/status/succeeded");
                let complete = o["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Complete" && c["status"] == "True"));
                vec![
                    name(o),
                    json!(if complete { "Complete" } else { "Running" }),
                    json!(format!("{done}/{want}")),
                    json!(age(o)),
                ]
            }),
        ),
        ("", "namespaces") => (
            vec![
                col("Name", "string", 0),
                col("Status", "string", 0),
                col("Age", "string", 0),
            ],
            rows(&|o| vec![name(o), json!(s(o, "/status/phase")), json!(age(o))]),
        ),
        ("", "services") => (
            vec![
                col("Name", "string", 0),
                col("Type", "string", 0),
                col("Cluster-IP", "string", 0),
                col("External-IP", "string", 0),
                col("Port(s)", "string", 0),
                col("Age", "string", 0),
            ],
            rows(&|o| {
                let ports: Vec<String> = o["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", s(p, "/port"), s(p, "/protocol")))
                    .collect();
                let external = o["status"]["loadBalancer"]["ingress"]
                    .as_array()
                    .and_then(|a| a.first())
                    .map(|i| s(i, "/ip"))
                    .unwrap_or_default();
                vec![
                    name(o),
                    json!(s(o, "/spec/type")),
                    json!(or_none(s(o, "/spec/clusterIP"))),
                    json!(or_none(external)),
                    json!(or_none(ports.join(","))),
                    json!(age(o)),
                ]
            }),
        ),
        ("", "configmaps") => (
            vec![
                col("Name", "string", 0),
                col("Data", "integer", 0),
                col("Age", "string", 0),
            ],
            rows(&|o| {
                let data = o["data"].as_object().map(|m| m.len()).unwrap_or(0)
                    + o["binaryData"].as_object().map(|m| m.len()).unwrap_or(0);
                vec![name(o), json!(data), json!(age(o))]
            }),
        ),
        ("", "secrets") => (
            vec![
                col("Name", "string", 0),
                col("Type", "string", 0),
                col("Data", "integer", 0),
                col("Age", "string", 0),
            ],
            rows(&|o| {
                let data = o["data"].as_object().map(|m| m.len()).unwrap_or(0);
                vec![name(o), json!(s(o, "/type")), json!(data), json!(age(o))]
            }),
        ),
        ("apiextensions.k8s.io", "customresourcedefinitions") => (
            vec![col("Name", "string", 0), col("Created At", "date", 0)],
            rows(&|o| vec![name(o), json!(s(o, "/metadata/creationTimestamp"))]),
        ),
        _ if !res.printer_columns.is_empty() => {
            let mut cols = vec![col("Name", "string", 0)];
            let mut has_age = false;
            for c in &res.printer_columns {
                let title = c["name"].as_str().unwrap_or_default();
                has_age |= title.eq_ignore_ascii_case("age");
                cols.push(col(
                    title,
                    c["type"].as_str().unwrap_or("string"),
                    c["priority"].as_u64().unwrap_or(0) as u8,
                ));
            }
            if !has_age {
                cols.push(col("Age", "date", 0));
            }
            let pcs = res.printer_columns.clone();
            let cells = rows(&|o| {
                let mut row = vec![name(o)];
                for c in &pcs {
                    let v = json_path(o, c["jsonPath"].as_str().unwrap_or_default());
                    if c["type"] == "date" {
                        row.push(json!(match v.as_str() {
                            Some(ts) => chrono::DateTime::parse_from_rfc3339(ts)
                                .map(|t| human_duration(
                                    (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()
                                ))
                                .unwrap_or_default(),
                            None => "<unknown>".into(),
                        }));
                    } else {
                        row.push(if v.is_null() { json!("") } else { v });
                    }
                }
                if !has_age {
                    row.push(json!(age(o)));
                }
                row
            });
            (cols, cells)
        }
        _ => (
            vec![col("Name", "string", 0), col("Age", "string", 0)],
            rows(&|o| vec![name(o), json!(age(o))]),
        ),
    }
}

/// A `meta.k8s.io/v1` Table of `items`; each row carries the object's metadata.
pub fn table(res: &Resource, items: &[Value], rv: u64, _shared: &Shared) -> Value {
    let (column_definitions, cells) = columns(res, items);
    let rows: Vec<Value> = items
        .iter()
        .zip(cells)
        .map(|(o, cells)| {
            json!({
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"].clone(),
                },
            })
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": column_definitions,
        "rows": rows,
    })
}
