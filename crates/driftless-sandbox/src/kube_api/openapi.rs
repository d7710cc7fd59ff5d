//! `/openapi/v3`: the index of group versions and, for each, a document with the operations
//! of its resources. kubectl reads it before `apply` to learn that the server validates fields
//! itself (the `fieldValidation` parameter of each kind's PATCH operation); without it kubectl
//! falls back to `/openapi/v2` for client-side validation. The documents carry no schemas:
//! the sandbox does not validate fields.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::resources::{Catalog, Resource};

fn gv_path(r: &Resource) -> String {
    if r.group.is_empty() {
        format!("api/{}", r.version)
    } else {
        format!("apis/{}/{}", r.group, r.version)
    }
}

/// `GET /openapi/v3`.
pub fn index(catalog: &Catalog) -> Value {
    let mut paths = Map::new();
    for r in &catalog.resources {
        let p = gv_path(r);
        if !paths.contains_key(&p) {
            let doc = document(catalog, &p).unwrap_or_default();
            let hash = Sha256::digest(doc.to_string().as_bytes());
            let hex: String = hash.iter().take(32).map(|b| format!("{b:02X}")).collect();
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hex}")}),
            );
        }
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/api/v1`, `/openapi/v3/apis/{group}/{version}`.
pub fn document(catalog: &Catalog, gv: &str) -> Option<Value> {
    let resources: Vec<&Resource> = catalog.resources.iter().filter(|r| gv_path(r) == gv).collect();
    if resources.is_empty() {
        return None;
    }
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let mut paths = Map::new();
    for r in resources {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let base = if r.namespaced {
            format!("/{gv}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("/{gv}/{}", r.plural)
        };
        let op = |verb: &str, params: Vec<Value>| {
            json!({
                "operationId": format!("{verb}{}", r.kind),
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
            })
        };
        let write_params = || vec![query("dryRun"), query("fieldManager"), query("fieldValidation")];
        paths.insert(
            base.clone(),
            json!({
                "get": op("list", vec![query("labelSelector"), query("fieldSelector"), query("watch")]),
                "post": op("post", write_params()),
                "delete": op("deletecollection", vec![query("labelSelector"), query("dryRun")]),
            }),
        );
        let mut patch_params = write_params();
        patch_params.push(query("force"));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": op("get", vec![]),
                "put": op("put", write_params()),
                "patch": op("patch", patch_params),
                "delete": op("delete", vec![query("dryRun"), query("propagationPolicy")]),
            }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "unversioned"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
