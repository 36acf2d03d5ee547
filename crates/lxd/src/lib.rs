//! A client for the Incus and LXD REST API over the daemon's unix socket.
//!
//! It knows nothing of ssp: it speaks the daemon's API (sync and async
//! responses, operations, ETags, exec and lifecycle events) and maps every
//! failure into [`Error`].

mod client;
mod error;
mod events;
mod types;

pub use client::{Client, ExecOutput};
pub use error::Error;
pub use events::{lifecycle_events, LifecycleEvent};
pub use types::{DaemonKind, Image, ImageAlias, Instance, ServerInfo};

/// Default unix socket paths, tried in order when none is configured.
pub const DEFAULT_SOCKETS: &[&str] = &[
    "/var/lib/incus/unix.socket",
    "/var/snap/lxd/common/lxd/unix.socket",
    "/var/lib/lxd/unix.socket",
];

/// Picks the first default socket that exists.
pub fn default_socket() -> Option<std::path::PathBuf> {
    DEFAULT_SOCKETS
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}
