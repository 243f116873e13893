//! What routing reads of an object's metadata: its namespace (`default` when unset, as the API
//! server fills it in), its name, and its creation time (RFC 3339, which sorts as time).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub fn ns_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

pub fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

/// The creation timestamp as RFC 3339 (empty when unset: such objects count as oldest).
pub fn created(meta: &ObjectMeta) -> String {
    meta.creation_timestamp
        .as_ref()
        .and_then(|t| serde_json::to_value(t).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
