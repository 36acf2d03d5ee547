//! ssp's domain model: types that parse their input, and the deterministic
//! state machine every coordinator change goes through. No IO, no async.

pub mod migration;
pub mod names;
pub mod place;
pub mod state;
pub mod trust;
pub mod types;

pub use migration::{Migration, MigrationCommand, Phase as MigrationPhase, Side};
pub use names::{
    parse_image, parse_label, parse_snapshot_name, ByteSize, Endpoint, HostName, InputError,
    NetAddress, PciAddress, ShareMode, SharedFolder, SshKey, Username, MOVE_SNAPSHOT_PREFIX,
    SCHEDULED_SNAPSHOT_PREFIX,
};
pub use state::{Command, Outcome, Rejection, Settings, State};
pub use types::{
    CertRole, Constraints, Gpu, Host, HostStatus, Image, Instance, Inventory, LanPool, Limits,
    Network, NewUser, Pool, Relay, RelayKind, Role, SnapshotSchedule, User, UserKind,
};
