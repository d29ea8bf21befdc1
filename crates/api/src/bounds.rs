//! The size bounds of the CRD schema (`maxItems`, `maxLength`, `maxProperties`, `minimum`,
//! `maximum`), checked in Rust against the very schema the types generate.
//!
//! An API server enforces these before any CEL rule runs, and its CEL cost estimate relies on
//! them. The operator checks them too, so a spec written past the API server (or rendered
//! offline) is refused with the same field path, and a bound is declared once: on the type.

use kube::CustomResourceExt;
use serde_json::Value;

use crate::NixBuilderPool;

/// Every bound `pool` exceeds, one message per field (`spec.systems: must have at most 16
/// items`). Empty when all are met.
pub fn check(pool: &NixBuilderPool) -> Vec<String> {
    // Generated once per process: the operator checks every pool at every reconcile.
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(|| {
        NixBuilderPool::crd().spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .map(|s| serde_json::to_value(s).expect("the schema serializes"))
            .expect("the derived CRD has an openAPIV3Schema")
    });
    let value = serde_json::to_value(pool).expect("the pool serializes");
    let mut problems = Vec::new();
    if let Some(spec) = value.get("spec") {
        walk(&schema["properties"]["spec"], spec, "spec", &mut problems);
    }
    problems
}

/// Checks `value` against the bounds of `schema` and descends into properties, items and
/// map values.
fn walk(schema: &Value, value: &Value, path: &str, problems: &mut Vec<String>) {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    match value {
        Value::String(s) => {
            if let Some(max) = bound("maxLength")
                && s.chars().count() as f64 > max
            {
                problems.push(format!("{path}: may not be longer than {max} characters"));
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(max) = bound("maximum")
                && n > max
            {
                problems.push(format!("{path}: must be less than or equal to {max}"));
            }
            if let Some(min) = bound("minimum")
                && n < min
            {
                problems.push(format!("{path}: must be greater than or equal to {min}"));
            }
        }
        Value::Array(items) => {
            if let Some(max) = bound("maxItems")
                && items.len() as f64 > max
            {
                problems.push(format!("{path}: must have at most {max} items"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item_schema, item, &format!("{path}[{i}]"), problems);
                }
            }
        }
        Value::Object(fields) => {
            if let Some(max) = bound("maxProperties")
                && fields.len() as f64 > max
            {
                problems.push(format!("{path}: must have at most {max} properties"));
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (name, field) in fields {
                let field_schema = properties.and_then(|p| p.get(name)).or(additional);
                if let Some(field_schema) = field_schema {
                    // A map's values too: the API server spells them `spec.nixConfig.<key>`.
                    walk(field_schema, field, &format!("{path}.{name}"), problems);
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(spec: Value) -> NixBuilderPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
            "metadata": {"name": "builders", "namespace": "ci"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn the_defaults_are_within_bounds() {
        assert_eq!(check(&pool(serde_json::json!({}))), Vec::<String>::new());
    }

    #[test]
    fn each_kind_of_bound_names_the_field() {
        let p = pool(serde_json::json!({
            "systems": vec!["x86_64-linux"; 17],
            "supportedFeatures": ["f".repeat(65)],
            "nixConfig": (0..65).map(|i| (format!("k{i}"), "v".to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            "maxJobs": 257,
        }));
        let problems = check(&p);
        for expected in [
            "spec.systems: must have at most 16 items",
            "spec.supportedFeatures[0]: may not be longer than 64 characters",
            "spec.nixConfig: must have at most 64 properties",
            "spec.maxJobs: must be less than or equal to 256",
        ] {
            assert!(
                problems.iter().any(|m| m == expected),
                "{expected:?} not in {problems:?}"
            );
        }
    }

    #[test]
    fn map_values_are_checked_under_their_key_as_the_api_server_names_them() {
        let p = pool(serde_json::json!({"nixConfig": {"keep-outputs": "x".repeat(4097)}}));
        assert_eq!(
            check(&p),
            ["spec.nixConfig.keep-outputs: may not be longer than 4096 characters"]
        );
    }
}
