//! Reconcile errors. Each has a category used as a metric label and an Event reason.

/// What went wrong in one reconcile of one pool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server did not answer a read.
    #[error("reading {kind} {name}: {source}")]
    Read {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Applying a child failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Writing the pool's status failed.
    #[error("writing the status of {name}: {source}")]
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
            Error::Read { .. } => "ReadFailed",
            Error::Apply { .. } => "ApplyFailed",
            Error::Status { .. } => "StatusFailed",
            Error::HostKey(_) => "BadHostKey",
            Error::NotOwned { .. } => "NameTaken",
        }
    }
}
