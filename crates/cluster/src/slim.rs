//! The store's compact form of an EndpointSlice ("slim" types, as Cilium keeps its informer
//! caches). k8s-openapi's `Endpoint` is 352 bytes before its strings, ten or a hundred to a
//! slice, and most of it is fields nothing here reads; at 50,000 Services the store's slices
//! were half of the agent's memory. This one keeps every field the API defines except the
//! deprecated `deprecatedTopology`, under the same names and in the same JSON form, with the
//! rarely set ones boxed and short strings inline (an endpoint's one address and its node's
//! name are no heap allocations of their own): 5.3 KiB → ~1.6 KiB per ten-endpoint slice.

use compact_str::CompactString;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1 as api;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// `discovery.k8s.io/v1` EndpointSlice, as the store holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<Endpoint>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<api::EndpointPort>>,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// One address in all but exotic slices: held inline.
    pub addresses: SmallVec<[CompactString; 1]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<api::EndpointConditions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<CompactString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<CompactString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<CompactString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<Box<ObjectReference>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<Box<api::EndpointHints>>,
}

impl From<api::EndpointSlice> for EndpointSlice {
    fn from(s: api::EndpointSlice) -> EndpointSlice {
        EndpointSlice {
            metadata: s.metadata,
            address_type: s.address_type,
            endpoints: s
                .endpoints
                .map(|eps| eps.into_iter().map(Endpoint::from).collect()),
            ports: s.ports,
        }
    }
}

impl From<api::Endpoint> for Endpoint {
    fn from(e: api::Endpoint) -> Endpoint {
        Endpoint {
            addresses: e.addresses.into_iter().map(CompactString::from).collect(),
            conditions: e.conditions,
            hostname: e.hostname.map(CompactString::from),
            node_name: e.node_name.map(CompactString::from),
            zone: e.zone.map(CompactString::from),
            target_ref: e.target_ref.map(Box::new),
            hints: e.hints.map(Box::new),
        }
    }
}

impl From<EndpointSlice> for api::EndpointSlice {
    fn from(s: EndpointSlice) -> api::EndpointSlice {
        api::EndpointSlice {
            metadata: s.metadata,
            address_type: s.address_type,
            endpoints: s.endpoints.map(|eps| {
                eps.into_iter()
                    .map(|e| api::Endpoint {
                        addresses: e.addresses.into_iter().map(String::from).collect(),
                        conditions: e.conditions,
                        deprecated_topology: None,
                        hints: e.hints.map(|h| *h),
                        hostname: e.hostname.map(String::from),
                        node_name: e.node_name.map(String::from),
                        target_ref: e.target_ref.map(|t| *t),
                        zone: e.zone.map(String::from),
                    })
                    .collect()
            }),
            ports: s.ports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The same JSON reads into both forms, and each converts into the other unchanged.
    #[test]
    fn reads_the_api_form_and_converts_both_ways() {
        let v = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
                           "hostname": "web-0", "nodeName": "node-1", "zone": "a",
                           "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-0"},
                           "hints": {"forZones": [{"name": "a"}]}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]});
        let slim: EndpointSlice = serde_json::from_value(v.clone()).unwrap();
        let full: api::EndpointSlice = serde_json::from_value(v).unwrap();
        assert_eq!(EndpointSlice::from(full.clone()), slim);
        assert_eq!(api::EndpointSlice::from(slim.clone()), full);
        // Written back, it is the API's form less apiVersion and kind (the writer adds them).
        let mut again = serde_json::to_value(&slim).unwrap();
        again["apiVersion"] = "discovery.k8s.io/v1".into();
        again["kind"] = "EndpointSlice".into();
        assert_eq!(serde_json::to_value(&full).unwrap(), again);
        // The usual endpoint's address and node name live inside it.
        let e = &slim.endpoints.as_ref().unwrap()[0];
        assert!(!e.addresses.spilled());
        assert!(!e.addresses[0].is_heap_allocated());
        assert!(!e.node_name.as_ref().unwrap().is_heap_allocated());
        assert!(
            std::mem::size_of::<Endpoint>() * 2 < std::mem::size_of::<api::Endpoint>(),
            "{} bytes",
            std::mem::size_of::<Endpoint>()
        );
    }
}
