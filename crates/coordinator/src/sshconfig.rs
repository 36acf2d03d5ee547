//! ssh_config blocks that OpenSSH, PyCharm and VS Code read as they are.

use ssp_model::{Host, Instance};

/// An ssh_config `Host` block named `ssp-USER` for `user`'s login to `inst`: their
/// own container, or the Common-Server they have an account in. `lan_address`: the
/// container's own address on the LAN (port 22), instead of its host's forward.
pub fn render(
    inst: &Instance,
    user: &str,
    host: &Host,
    lan_address: Option<&str>,
    identity_file: &str,
) -> String {
    let (addr, port) = match lan_address {
        Some(a) => (a.to_string(), 22),
        None => (host.ssh_host.to_string(), inst.ssh_port),
    };
    let mut out =
        format!("Host ssp-{user}\n    HostName {addr}\n    Port {port}\n    User {user}\n");
    if !identity_file.is_empty() {
        out.push_str(&format!(
            "    IdentityFile {identity_file}\n    IdentitiesOnly yes\n"
        ));
    }
    // The container's host key is new when it is created; accept it once, then pin
    // it under the container's name, not its host and port: the container keeps its
    // keys when it moves to another host, and the pinned key still matches there.
    out.push_str(&format!(
        "    HostKeyAlias ssp-{}\n    StrictHostKeyChecking accept-new\n    ServerAliveInterval 30\n",
        inst.name
    ));
    out
}
