//! The resource types the server knows, and how URLs and `apiVersion`/`kind` map onto them.

use std::any::TypeId;

/// Static description of one served resource type (one REST collection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceInfo {
    /// API group; empty for the core group.
    pub group: String,
    /// API version inside the group, e.g. `v1`.
    pub version: String,
    /// Plural lowercase name used in URLs, e.g. `services`.
    pub plural: String,
    /// Kind of a single object, e.g. `Service`.
    pub kind: String,
    /// Whether objects live inside a namespace.
    pub namespaced: bool,
}

impl ResourceInfo {
    /// Builds the description from a k8s-openapi resource type.
    pub fn of<K: k8s_openapi::Resource>() -> Self
    where
        K::Scope: 'static,
    {
        Self {
            group: K::GROUP.to_string(),
            version: K::VERSION.to_string(),
            plural: K::URL_PATH_SEGMENT.to_string(),
            kind: K::KIND.to_string(),
            namespaced: TypeId::of::<K::Scope>() == TypeId::of::<k8s_openapi::NamespaceResourceScope>(),
        }
    }

    /// `apiVersion` as written in objects: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// Kind of the list object, e.g. `ServiceList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// URL prefix of the group version: `/api/v1` or `/apis/group/version`.
    pub fn group_version_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }
}

/// The resources registered when a server starts: what kube-proxy watches or writes.
pub(crate) fn builtin() -> Vec<ResourceInfo> {
    use k8s_openapi::api::{core::v1, discovery::v1 as discovery, events::v1 as events};
    vec![
        ResourceInfo::of::<v1::Service>(),
        ResourceInfo::of::<v1::Endpoints>(),
        ResourceInfo::of::<v1::Node>(),
        ResourceInfo::of::<v1::Namespace>(),
        ResourceInfo::of::<v1::Event>(),
        ResourceInfo::of::<discovery::EndpointSlice>(),
        ResourceInfo::of::<events::Event>(),
    ]
}
