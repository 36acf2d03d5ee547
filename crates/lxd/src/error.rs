//! The one error type of the daemon client.

use std::path::PathBuf;

/// Everything that can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("cannot reach the daemon at {socket}: {reason}")]
    Unreachable { socket: PathBuf, reason: String },
    /// The daemon answered with an API error.
    #[error("{method} {path}: daemon said {code}: {message}")]
    Api {
        method: String,
        path: String,
        code: u16,
        message: String,
    },
    /// An operation finished in failure.
    #[error("operation {id} failed: {message}")]
    Operation { id: String, message: String },
    /// The entity's ETag changed between read and write.
    #[error("{path} changed while it was being updated (etag mismatch)")]
    Conflict { path: String },
    /// A reply could not be understood.
    #[error("unexpected reply to {path}: {reason}")]
    Protocol { path: String, reason: String },
}

impl Error {
    /// True when the daemon said the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api { code: 404, .. })
    }

    /// True when the daemon refused because another operation on the instance
    /// runs (e.g. its own stop after the container's init died).
    pub fn is_busy(&self) -> bool {
        match self {
            Error::Api { message, .. } => message.contains("is busy running"),
            _ => false,
        }
    }
}
