//! Errors: [`ApiError`] is what the HTTP side answers as a `Status`; [`Error`] is the library error.

use serde_json::json;

use crate::resource::ResourceInfo;

/// A Kubernetes API failure, rendered over HTTP as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({code}): {message}")]
pub struct ApiError {
    /// HTTP status code, e.g. 404.
    pub code: u16,
    /// Machine-readable reason, e.g. `NotFound`.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// `details.name` / `details.kind` when the error concerns one object.
    pub details: Option<(String, String)>,
}

impl ApiError {
    fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self { code, reason: reason.to_string(), message: message.into(), details: None }
    }

    fn about(mut self, info: &ResourceInfo, name: &str) -> Self {
        self.details = Some((name.to_string(), info.plural.clone()));
        self
    }

    /// 404 for a missing object.
    pub(crate) fn not_found(info: &ResourceInfo, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", qualified(info))).about(info, name)
    }

    /// 404 for an unknown URL.
    pub(crate) fn no_route(path: &str) -> Self {
        Self::new(404, "NotFound", format!("the server could not find the requested resource ({path})"))
    }

    /// 409 for a create of an existing object.
    pub(crate) fn already_exists(info: &ResourceInfo, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", qualified(info))).about(info, name)
    }

    /// 409 for a failed `metadata.resourceVersion` precondition.
    pub(crate) fn conflict(info: &ResourceInfo, name: &str) -> Self {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            qualified(info)
        );
        Self::new(409, "Conflict", msg).about(info, name)
    }

    /// 400 for a malformed request.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 422 for an object that fails validation.
    pub(crate) fn invalid(info: &ResourceInfo, name: &str, message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message).about(info, name)
    }

    /// 410 for history that has been compacted away.
    pub(crate) fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 405 for a verb the route does not serve.
    pub(crate) fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method ({method}) on the requested resource"),
        )
    }

    /// 415 for a patch type the server does not implement.
    pub(crate) fn unsupported_media_type(ct: &str) -> Self {
        Self::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format ({ct})"))
    }

    /// The `Status` object the apiserver sends for this error.
    pub fn status_json(&self) -> serde_json::Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((name, kind)) = &self.details {
            s["details"] = json!({"name": name, "kind": kind});
        }
        s
    }
}

/// `services` or `endpointslices.discovery.k8s.io`, as upstream messages spell resources.
fn qualified(info: &ResourceInfo) -> String {
    if info.group.is_empty() { info.plural.clone() } else { format!("{}.{}", info.plural, info.group) }
}

/// Library error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API rejected the operation (not found, conflict, invalid, ...).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// An object could not be converted to or from JSON.
    #[error("object JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An I/O operation (bind, runtime, kubeconfig file) failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The background server thread went away before reporting its address.
    #[error("server thread exited during startup")]
    Startup,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// Library result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
