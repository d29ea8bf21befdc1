//! Reconcile errors. Each has a category used as a metric label and an Event reason.

use nixpool_api::conditions::{REASON_APPLY_FAILED, REASON_BAD_HOST_KEY, REASON_NAME_TAKEN, REASON_READ_FAILED};

/// What went wrong in one reconcile of one pool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server did not answer a read.
    #[error("reading {kind} {name}: {}", said(.source))]
    Read {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Applying a child failed.
    #[error("applying {kind} {name}: {}", said(.source))]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Writing the pool's status failed.
    #[error("writing the status of {name}: {}", said(.source))]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The host-key Secret exists but holds no usable key.
    #[error("{0}")]
    HostKey(String),
    /// An object with a child's name exists and is not this pool's: it is left alone.
    #[error(
        "{kind} {name} already exists and does not belong to this pool, so nixpool leaves it alone; delete or rename it, or give the pool another name"
    )]
    NotOwned { kind: String, name: String },
}

/// Shorthand for a reconcile result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable name of the kind of failure: a metric label and an Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Read { .. } => REASON_READ_FAILED,
            Error::Apply { .. } => REASON_APPLY_FAILED,
            Error::Status { .. } => "StatusFailed",
            Error::HostKey(_) => REASON_BAD_HOST_KEY,
            Error::NotOwned { .. } => REASON_NAME_TAKEN,
        }
    }

    /// Whether retrying cannot help until a person changes something: the API server refused
    /// the request (RBAC, admission, quota, an invalid object), the host key is unusable, or a
    /// name is taken. A timeout, a conflict or a server error is worth retrying.
    pub fn needs_a_person(&self) -> bool {
        match self {
            Error::Read { source, .. } | Error::Apply { source, .. } | Error::Status { source, .. } => refused(source),
            Error::HostKey(_) | Error::NotOwned { .. } => true,
        }
    }
}

/// Whether the API server refused a request for good: 400 (bad request), 401/403 (RBAC,
/// admission), 404 (no such API), 422 (invalid); not 409 (conflict) or 429 (throttled).
pub fn refused(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if matches!(s.code, 400 | 401 | 403 | 404 | 405 | 422))
}

/// What a person reads about a client error: the API server's own message (`pods "x" is
/// forbidden: exceeded quota: ...`), not the Rust form of its Status; other errors as they
/// display.
pub fn said(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        kube::Error::Api(s) => format!("the API server answered {} {}", s.code, s.reason),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": code, "reason": reason, "message": message,
        }))
        .unwrap();
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn an_api_error_reads_as_the_servers_message() {
        let e = Error::Apply {
            kind: "Deployment".into(),
            name: "b".into(),
            source: api(
                403,
                "Forbidden",
                r#"deployments.apps "b" is forbidden: User "x" cannot patch resource "deployments""#,
            ),
        };
        assert_eq!(
            e.to_string(),
            r#"applying Deployment b: deployments.apps "b" is forbidden: User "x" cannot patch resource "deployments""#
        );
        assert!(!e.to_string().contains("Status {"), "{e}");
        assert!(e.needs_a_person());
        let empty = said(&api(500, "InternalError", ""));
        assert_eq!(empty, "the API server answered 500 InternalError");
    }

    #[test]
    fn only_refusals_need_a_person() {
        let apply = |code| Error::Apply {
            kind: "Service".into(),
            name: "b".into(),
            source: api(code, "x", "m"),
        };
        for code in [400, 403, 404, 422] {
            assert!(apply(code).needs_a_person(), "{code}");
        }
        for code in [409, 429, 500, 503] {
            assert!(!apply(code).needs_a_person(), "{code}");
        }
        assert!(
            Error::NotOwned {
                kind: "Service".into(),
                name: "b".into()
            }
            .needs_a_person()
        );
        assert!(Error::HostKey("no key".into()).needs_a_person());
    }
}
