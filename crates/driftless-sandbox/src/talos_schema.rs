//! Talos's own machine-config JSON schemas (data/, copied from siderolabs/talos), compiled once.
//! The simulated Talos API validates every config it receives with them, and the integration
//! tests validate what driftless renders with the same code.
//!
//! Both schemas are Draft 2020-12 documents whose root is a `oneOf` of `$ref`s into `$defs`,
//! one definition per document kind. A document is validated against the definition of its own
//! kind (precise errors) and against the root (the `oneOf` Talos's tooling uses), with format
//! checking on.

use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// One Talos version's schema: a validator per document kind and one for the root.
pub struct Schema {
    /// Which schema this is, for messages: `v1.13.9`, `main-branch (v1.14+)`.
    pub name: &'static str,
    validators: jsonschema::ValidatorMap,
    /// Document kind (`v1alpha1` for the `version: v1alpha1` document) -> `#/$defs/...`.
    kinds: BTreeMap<String, String>,
}

static V1_13: LazyLock<Schema> =
    LazyLock::new(|| Schema::load("v1.13.9", include_str!("../data/talos-config.v1.13.9.schema.json")));
static MAIN: LazyLock<Schema> =
    LazyLock::new(|| Schema::load("main-branch (v1.14+)", include_str!("../data/talos-config.schema.json")));

/// The schema of Talos v1.13.x.
pub fn v1_13() -> &'static Schema {
    &V1_13
}

/// The schema of Talos's main branch: v1.14 and later.
pub fn main_branch() -> &'static Schema {
    &MAIN
}

/// The schema a config that installs Talos `major.minor` is checked against.
pub fn for_version(minor: Option<(u32, u32)>) -> &'static Schema {
    match minor {
        Some((1, 13)) => v1_13(),
        _ => main_branch(),
    }
}

impl Schema {
    /// Panics on a broken embedded schema: a build defect, caught by the tests.
    fn load(name: &'static str, text: &str) -> Schema {
        let schema: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("Talos schema {name}: {e}"));
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "Talos schema {name}: unexpected draft"
        );
        let validators = jsonschema::options()
            .should_validate_formats(true)
            .build_map(&schema)
            .unwrap_or_else(|e| panic!("Talos schema {name} does not compile: {e}"));
        assert!(validators.contains_key("#"), "Talos schema {name}: no root validator");
        let mut kinds = BTreeMap::new();
        for entry in schema["oneOf"]
            .as_array()
            .unwrap_or_else(|| panic!("Talos schema {name}: no top-level oneOf"))
        {
            let pointer = entry["$ref"]
                .as_str()
                .unwrap_or_else(|| panic!("Talos schema {name}: oneOf entry without $ref: {entry}"));
            let def_name = pointer
                .strip_prefix("#/$defs/")
                .unwrap_or_else(|| panic!("Talos schema {name}: unexpected $ref {pointer}"));
            let def = &schema["$defs"][def_name];
            let kind = match def["properties"]["kind"]["enum"].as_array() {
                Some(values) if values.len() == 1 => values[0].as_str().expect("kind is a string").to_string(),
                Some(values) => panic!("Talos schema {name}: {def_name} allows several kinds: {values:?}"),
                None => {
                    assert_eq!(
                        def["properties"]["version"]["enum"],
                        serde_json::json!(["v1alpha1"]),
                        "Talos schema {name}: {def_name} has neither kind nor version"
                    );
                    "v1alpha1".to_string()
                }
            };
            // build_map silently leaves out subschemas that fail to compile: insist on every kind.
            assert!(
                validators.contains_key(pointer),
                "Talos schema {name}: {pointer} did not compile"
            );
            assert!(
                kinds.insert(kind.clone(), pointer.to_string()).is_none(),
                "Talos schema {name}: two definitions for kind {kind}"
            );
        }
        Schema {
            name,
            validators,
            kinds,
        }
    }

    /// Whether the schema has a definition for this document kind.
    pub fn knows_kind(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// Every schema violation of one document; empty when it is valid.
    pub fn errors(&self, doc: &Value) -> Vec<String> {
        let kind = kind_of(doc);
        let Some(pointer) = self.kinds.get(&kind) else {
            return vec![format!("unknown document kind `{kind}`")];
        };
        let validator = self.validators.get(pointer).expect("checked in load");
        let mut errors: Vec<String> = validator
            .iter_errors(doc)
            .map(|e| format!("{kind} at `{}`: {e}", e.instance_path()))
            .collect();
        if errors.is_empty() && !self.validators.get("#").expect("checked in load").is_valid(doc) {
            errors.push(format!(
                "{kind}: valid against {pointer} but not against the schema root (oneOf)"
            ));
        }
        errors
    }
}

/// A document's kind: its `kind`, or `v1alpha1` for the `version: v1alpha1` document.
pub fn kind_of(doc: &Value) -> String {
    match (
        doc.get("kind").and_then(Value::as_str),
        doc.get("version").and_then(Value::as_str),
    ) {
        (Some(kind), _) => kind.to_string(),
        (None, Some("v1alpha1")) => "v1alpha1".to_string(),
        _ => "<no kind>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_schemas_compile_and_know_the_kinds() {
        for (schema, kinds) in [
            (v1_13(), &["v1alpha1", "HostnameConfig", "LinkConfig"][..]),
            (main_branch(), &["v1alpha1", "KubeletConfig", "UnattendedInstall"][..]),
        ] {
            for kind in kinds {
                assert!(schema.knows_kind(kind), "{}: {kind}", schema.name);
            }
        }
        assert_eq!(for_version(Some((1, 13))).name, "v1.13.9");
        assert_eq!(for_version(Some((1, 14))).name, main_branch().name);
    }
}
