//! ssh_config blocks that OpenSSH, PyCharm and VS Code read as they are.

use ssp_model::{Host, Instance};

/// An ssh_config `Host` block for `inst`, named `ssp-NAME`.
pub fn render(inst: &Instance, host: &Host, identity_file: &str) -> String {
    let mut out = format!(
        "Host ssp-{name}\n    HostName {addr}\n    Port {port}\n    User {user}\n",
        name = inst.name,
        addr = host.ssh_host,
        port = inst.ssh_port,
        user = inst.owner,
    );
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
