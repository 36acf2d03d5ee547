//! ssh_config blocks that OpenSSH, PyCharm and VS Code read as they are.

use ssp_model::{Host, Instance};

/// Where a login to a container goes.
pub enum Route<'a> {
    /// Its host's forwarded port.
    Forward(&'a Host),
    /// Its own address on the LAN, port 22.
    Lan(&'a str),
    /// Its port on the relay, through its host's reverse tunnel (from outside the
    /// LAN): the block is named `ssp-USER-outside`.
    Relay { host: &'a str, port: u16 },
}

/// An ssh_config `Host` block named `ssp-USER` for `user`'s login to `inst`: their
/// own container, or the Common-Server they have an account in.
pub fn render(inst: &Instance, user: &str, route: Route, identity_file: &str) -> String {
    let (addr, port, suffix) = match route {
        Route::Forward(host) => (host.ssh_host.to_string(), inst.ssh_port, ""),
        Route::Lan(a) => (a.to_string(), 22, ""),
        Route::Relay { host, port } => (host.to_string(), port, "-outside"),
    };
    let mut out =
        format!("Host ssp-{user}{suffix}\n    HostName {addr}\n    Port {port}\n    User {user}\n");
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
