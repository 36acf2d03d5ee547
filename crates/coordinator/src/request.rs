//! Turning client requests into validated commands (pure; no IO).

use ssp_model::{
    ByteSize, Command, Constraints, Endpoint, Host, HostName, InputError, Limits, NetAddress,
    NewUser, Role, ShareMode, SharedFolder, SshKey, UserKind, Username,
};
use ssp_proto as pb;

use crate::config::CoordinatorConfig;

/// Most GPUs one request may ask for; a sanity bound, not a policy.
const MAX_GPUS: u32 = 64;

/// Most SSH keys one user may have.
pub const MAX_SSH_KEYS: usize = 32;

/// Parses a user's SSH public keys; at least one, at most [`MAX_SSH_KEYS`].
fn ssh_keys(keys: &[String]) -> Result<Vec<SshKey>, InputError> {
    if keys.len() > MAX_SSH_KEYS {
        return Err(InputError {
            what: "ssh keys",
            value: format!("{} keys", keys.len()),
            reason: format!("at most {MAX_SSH_KEYS} keys per user"),
        });
    }
    let keys = keys
        .iter()
        .map(|k| SshKey::parse(k))
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(InputError {
            what: "ssh keys",
            value: String::new(),
            reason: "give at least one public key (--ssh-key FILE)".into(),
        });
    }
    Ok(keys)
}

/// Builds the `SetSshKeys` command.
pub fn set_ssh_keys(req: &pb::SetSshKeysRequest) -> Result<Command, InputError> {
    let name = Username::parse(&req.name)?;
    Ok(Command::SetSshKeys {
        name: name.to_string(),
        keys: ssh_keys(&req.ssh_keys)?,
    })
}

/// Builds the `Resize` command (0: unchanged), within the per-user quota.
pub fn resize(req: &pb::ResizeUserRequest, cfg: &CoordinatorConfig) -> Result<Command, InputError> {
    let name = Username::parse(&req.name)?;
    if req.cpus == 0 && req.memory_bytes == 0 && req.disk_bytes == 0 {
        return Err(InputError {
            what: "resize",
            value: name.to_string(),
            reason: "give at least one of --cpus, --memory, --disk".into(),
        });
    }
    let memory = (req.memory_bytes > 0)
        .then(|| at_least("memory", req.memory_bytes, 64 << 20))
        .transpose()?;
    let disk = (req.disk_bytes > 0)
        .then(|| at_least("disk", req.disk_bytes, 256 << 20))
        .transpose()?;
    // Only what is asked is checked against the quota (0 is never over it).
    let asked = Limits {
        cpus: req.cpus,
        memory: memory.unwrap_or(ByteSize(0)),
        disk: disk.unwrap_or(ByteSize(0)),
        processes: 0,
    };
    check_quota(&asked, 0, cfg)?;
    Ok(Command::Resize {
        name: name.to_string(),
        cpus: (req.cpus > 0).then_some(req.cpus),
        memory,
        disk,
    })
}

/// Setting the relay (or removing it).
pub fn set_relay(req: &pb::SetRelayRequest) -> Result<Command, InputError> {
    if req.remove {
        return Ok(Command::SetRelay { relay: None });
    }
    let host = NetAddress::parse(req.host.trim())?;
    let kind = match req.kind.trim() {
        "" | "ssh" => ssp_model::RelayKind::Ssh,
        "frp" => ssp_model::RelayKind::Frp,
        k => return Err(InputError::new(
            "relay kind",
            k,
            "expected ssh (OpenSSH reverse tunnels) or frp (frpc on each host, frps on the relay)",
        )),
    };
    let port = |what: &'static str, p: u32| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| InputError::new(what, &p.to_string(), "expected a port, 1 to 65535"))
    };
    let server_port = match (req.port, kind) {
        (0, ssp_model::RelayKind::Ssh) => 22,
        (0, ssp_model::RelayKind::Frp) => 7000,
        (p, _) => port("relay port", p)?,
    };
    let (first, last) = (
        port("relay ports", req.ports_first)?,
        port("relay ports", req.ports_last)?,
    );
    if first > last || (first..=last).contains(&server_port) {
        return Err(InputError::new(
            "relay ports",
            &format!("{first}-{last}"),
            "expected FIRST-LAST with FIRST <= LAST, not including the relay's own port (sshd's or frps's)",
        ));
    }
    let token = req.token.trim();
    match kind {
        ssp_model::RelayKind::Frp
            if token.is_empty()
                || token.len() > 256
                || !token
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\') =>
        {
            return Err(InputError::new(
                "frp token",
                if token.is_empty() { "" } else { "(hidden)" },
                "expected frps's auth.token: 1 to 256 printable characters, no quotes or backslashes",
            ));
        }
        ssp_model::RelayKind::Ssh if !token.is_empty() => {
            return Err(InputError::new(
                "relay token",
                "(hidden)",
                "a token is for an frp relay (--frp)",
            ));
        }
        _ => {}
    }
    let user = req.user.trim();
    let unix_name = (kind == ssp_model::RelayKind::Frp && user.is_empty())
        || !user.is_empty()
            && user.len() <= 32
            && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && user
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !unix_name {
        return Err(InputError::new(
            "relay user",
            user,
            "expected the Unix account on the relay the agents log in as: lowercase letters, digits, '_' or '-', e.g. ssp-relay",
        ));
    }
    let user = user.to_string();
    Ok(Command::SetRelay {
        relay: Some(ssp_model::Relay {
            host,
            port: server_port,
            user,
            ports: (first, last),
            kind,
            token: token.to_string(),
        }),
    })
}

/// A change of how `req.name`'s containers are reached.
pub fn set_network(req: &pb::SetNetworkRequest) -> Result<Command, InputError> {
    let name = Username::parse(&req.name)?;
    let network = match req.network.trim() {
        "" => {
            return Err(InputError::new(
                "network",
                "",
                "expected forward (SSH through a port of the host) or lan (its own address on the host's LAN)",
            ))
        }
        n => ssp_model::Network::parse(n)?,
    };
    let lan = match (network, req.lan.trim()) {
        (_, "") => None,
        (ssp_model::Network::Lan, l) => Some(lan_name(l)?),
        (ssp_model::Network::Forward, l) => {
            return Err(InputError::new(
                "LAN",
                l,
                "--lan names the LAN of a container with network lan",
            ))
        }
    };
    Ok(Command::SetNetwork {
        name: name.to_string(),
        network,
        lan,
    })
}

/// Setting a LAN's pool of static addresses (`FIRST-LAST/PREFIX`), or removing it.
pub fn set_lan(req: &pb::SetLanRequest) -> Result<Command, InputError> {
    let name = lan_name(req.name.trim())?;
    let pool = req.pool.trim();
    if req.dhcp {
        if !pool.is_empty() || !req.gateway.trim().is_empty() {
            return Err(InputError::new(
                "address pool",
                pool,
                "--dhcp removes the pool; give either --dhcp or --pool",
            ));
        }
        return Ok(Command::SetLan { name, pool: None });
    }
    let shape = "FIRST-LAST/PREFIX, e.g. 192.168.31.100-192.168.31.199/24";
    let bad = || InputError::new("address pool", pool, format!("expected {shape}"));
    let (range, prefix) = pool.split_once('/').ok_or_else(bad)?;
    let (first, last) = range.split_once('-').ok_or_else(bad)?;
    let ip = |s: &str| s.trim().parse::<std::net::Ipv4Addr>().map_err(|_| bad());
    let prefix: u8 = prefix.trim().parse().map_err(|_| bad())?;
    let gateway = match req.gateway.trim() {
        "" => None,
        g => Some(g.parse().map_err(|_| {
            InputError::new("gateway", g, "expected an IPv4 address, e.g. 192.168.31.1")
        })?),
    };
    let pool = ssp_model::LanPool::new(ip(first)?, ip(last)?, prefix, gateway)?;
    Ok(Command::SetLan {
        name,
        pool: Some(pool),
    })
}

/// Builds the `AddUser` command, filling defaults from the config.
pub fn add_user(req: &pb::AddUserRequest, cfg: &CoordinatorConfig) -> Result<Command, InputError> {
    let name = Username::parse(&req.name)?;
    let kind = user_kind(req)?;
    let ssh_keys = if kind == UserKind::Common {
        vec![]
    } else {
        ssh_keys(&req.ssh_keys)?
    };
    let d = cfg.default_limits()?;
    let limits = Limits {
        cpus: match req.cpus {
            None => d.cpus,
            Some(0) => {
                return Err(InputError {
                    what: "CPU count",
                    value: "0".into(),
                    reason: "must be at least 1 (leave --cpus out for the default)".into(),
                })
            }
            Some(n) => n,
        },
        memory: if req.memory_bytes == 0 {
            d.memory
        } else {
            at_least("memory", req.memory_bytes, 64 << 20)?
        },
        disk: if req.disk_bytes == 0 {
            d.disk
        } else {
            at_least("disk", req.disk_bytes, 256 << 20)?
        },
        processes: d.processes,
    };
    // The per-user quota is for people; a Common-Server is the admin's to size.
    if kind != UserKind::Common {
        check_quota(&limits, req.gpus, cfg)?;
    }
    if req.gpus > MAX_GPUS {
        return Err(InputError {
            what: "GPU count",
            value: req.gpus.to_string(),
            reason: format!("at most {MAX_GPUS} GPUs per container"),
        });
    }
    if req.shares.len() > MAX_LIST {
        return Err(InputError {
            what: "shared folders",
            value: format!("{} folders", req.shares.len()),
            reason: format!("at most {MAX_LIST} per user"),
        });
    }
    let mut shares = if req.no_default_shares {
        vec![]
    } else {
        cfg.default_share_list()?
    };
    for s in &req.shares {
        shares.push(
            SharedFolder::new(&s.host_path, &s.container_path, &cfg.shared_roots)?
                .with_mode(ShareMode::parse(&s.mode)?),
        );
    }
    shares.sort();
    shares.dedup();
    let mut seen = std::collections::BTreeSet::new();
    for s in &shares {
        if !seen.insert(&s.container_path) {
            return Err(InputError::new(
                "shared folder",
                &s.container_path,
                "two shared folders cannot use the same container path",
            ));
        }
    }
    let image = if req.image.is_empty() && req.desktop {
        cfg.defaults.desktop_image.clone()
    } else if req.image.is_empty() {
        cfg.defaults.image.clone()
    } else {
        ssp_model::parse_image(&req.image)?
    };
    let gpu_model = match req.gpu_model.trim() {
        "" => None,
        m if m.len() <= 64
            && m.chars()
                .all(|c| c.is_ascii_alphanumeric() || " -_.".contains(c)) =>
        {
            Some(m.to_string())
        }
        m => {
            return Err(InputError::new(
                "GPU model",
                m,
                "use letters, digits, spaces, '-', '_' or '.' (at most 64), e.g. A100",
            ))
        }
    };
    let host = match req.host.as_str() {
        "" => None,
        h => Some(HostName::parse(h)?),
    };
    let constrained = gpu_model.is_some() || req.gpu_memory_bytes > 0;
    if constrained && req.gpus == 0 {
        return Err(InputError::new(
            "GPU constraint",
            &req.gpu_model,
            "--gpu-model and --gpu-memory need --gpus N (N >= 1)",
        ));
    }
    let network = ssp_model::Network::parse(req.network.trim())?;
    let lan = match (network, req.lan.trim()) {
        (ssp_model::Network::Lan, "") => Some(String::new()),
        (ssp_model::Network::Lan, l) => Some(lan_name(l)?),
        (ssp_model::Network::Forward, "") => None,
        (ssp_model::Network::Forward, l) => {
            return Err(InputError::new(
                "LAN",
                l,
                "--lan names the LAN of a container with --network lan",
            ))
        }
    };
    Ok(Command::AddUser(NewUser {
        name,
        role: Role::parse(&req.role)?,
        ssh_keys,
        limits,
        gpus: req.gpus,
        image,
        shares,
        placement: Constraints {
            gpu_model,
            gpu_memory: (req.gpu_memory_bytes > 0).then_some(req.gpu_memory_bytes),
            host,
            spread: req.spread,
            labels: labels(&req.labels)?,
            lan,
            desktop: req.desktop,
        },
        kind,
        network,
        desktop: req.desktop,
    }))
}

/// Adopting container `req.container` on `req.host` as `req.user`'s: the user is
/// the container's name (ssp names a person's container after them); keys are the
/// request's, else the ones found inside; limits are the container's where it has
/// them, else the defaults; GPUs and the SSH port are what it uses.
pub fn adopt(
    req: &pb::AdoptRequest,
    found: &pb::SurveyReply,
    cfg: &CoordinatorConfig,
) -> Result<Command, InputError> {
    let name = Username::parse(&req.container)?;
    if !req.user.is_empty() && req.user != req.container {
        return Err(InputError::new(
            "user",
            &req.user,
            format!(
                "ssp names a person's container after them; rename it first (`incus rename {} {}` while it is stopped), then adopt {}",
                req.container, req.user, req.user
            ),
        ));
    }
    let host = HostName::parse(&req.host)?;
    let keys = if req.ssh_keys.is_empty() {
        &found.ssh_keys
    } else {
        &req.ssh_keys
    };
    let ssh_keys = ssh_keys(keys).map_err(|e| InputError {
        reason: format!(
            "{}; none were found in {name}'s ~/.ssh/authorized_keys inside (it must run), so give them with --ssh-key FILE",
            e.reason
        ),
        ..e
    })?;
    let d = cfg.default_limits()?;
    let limits = Limits {
        cpus: if found.cpus > 0 { found.cpus } else { d.cpus },
        memory: if found.memory_bytes > 0 {
            ssp_model::ByteSize(found.memory_bytes)
        } else {
            d.memory
        },
        disk: if found.disk_bytes > 0 {
            ssp_model::ByteSize(found.disk_bytes)
        } else {
            d.disk
        },
        processes: d.processes,
    };
    let gpus = found
        .gpu_pci
        .iter()
        .map(|p| ssp_model::PciAddress::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let ssh_port = found.ssh_ports.first().map(|&p| p as u16);
    Ok(Command::Adopt {
        user: NewUser {
            name,
            role: Role::parse(&req.role)?,
            ssh_keys,
            limits,
            gpus: gpus.len() as u32,
            // A missing container is made again from the image it came from.
            image: if found.image.is_empty() {
                cfg.defaults.image.clone()
            } else {
                found.image.clone()
            },
            shares: vec![],
            placement: Constraints::default(),
            kind: UserKind::Personal,
            network: Default::default(),
            desktop: false,
        },
        host: host.to_string(),
        gpus,
        ssh_port,
    })
}

/// A person with a container, a Common-Server, or an account in one; what does not
/// fit the kind is refused (an account has what its Common-Server has).
fn user_kind(req: &pb::AddUserRequest) -> Result<UserKind, InputError> {
    if req.common_server {
        if !req.common.is_empty() {
            return Err(InputError::new(
                "Common-Server",
                &req.common,
                "a Common-Server cannot have an account in another one",
            ));
        }
        if !req.ssh_keys.is_empty() {
            return Err(InputError::new(
                "ssh keys",
                &format!("{} keys", req.ssh_keys.len()),
                "a Common-Server has no keys of its own; give people accounts in it with `sspctl user add NAME --common SERVER --ssh-key FILE`",
            ));
        }
        return Ok(UserKind::Common);
    }
    if req.common.is_empty() {
        return Ok(UserKind::Personal);
    }
    let server = Username::parse(&req.common)?;
    let given: Vec<&str> = [
        (req.gpus > 0, "--gpus"),
        (req.cpus.is_some(), "--cpus"),
        (req.memory_bytes > 0, "--memory"),
        (req.disk_bytes > 0, "--disk"),
        (!req.image.is_empty(), "--image"),
        (!req.shares.is_empty() || req.no_default_shares, "--share"),
        (
            !req.gpu_model.is_empty() || req.gpu_memory_bytes > 0,
            "--gpu-model/--gpu-memory",
        ),
        (
            !req.host.is_empty() || req.spread || !req.labels.is_empty(),
            "--host/--spread/--label",
        ),
        (
            !req.network.is_empty() || !req.lan.is_empty(),
            "--network/--lan",
        ),
        (req.desktop, "--desktop"),
    ]
    .into_iter()
    .filter_map(|(set, flag)| set.then_some(flag))
    .collect();
    if !given.is_empty() {
        return Err(InputError::new(
            "account in a Common-Server",
            &given.join(" "),
            format!("an account uses what the Common-Server {server} has (its GPUs, limits, image, shared folders and host); leave these out"),
        ));
    }
    Ok(UserKind::Account { server })
}

/// Refuses what is over the per-user quota of the coordinator config.
fn check_quota(limits: &Limits, gpus: u32, cfg: &CoordinatorConfig) -> Result<(), InputError> {
    let q = &cfg.quota;
    let (memory, disk) = cfg.quota_limits()?;
    let over = |what: &'static str, asked: String, max: String, key: &str| InputError {
        what,
        value: asked,
        reason: format!("the per-user quota is {max} ([quota] {key} in the coordinator config)"),
    };
    if let Some(max) = q.gpus.filter(|m| gpus > *m) {
        return Err(over("GPU count", gpus.to_string(), max.to_string(), "gpus"));
    }
    if let Some(max) = q.cpus.filter(|m| limits.cpus > *m) {
        return Err(over(
            "CPU count",
            limits.cpus.to_string(),
            max.to_string(),
            "cpus",
        ));
    }
    if let Some(max) = memory.filter(|m| limits.memory.0 > m.0) {
        return Err(over(
            "memory",
            exact(limits.memory),
            max.to_string(),
            "memory",
        ));
    }
    if let Some(max) = disk.filter(|m| limits.disk.0 > m.0) {
        return Err(over("disk", exact(limits.disk), max.to_string(), "disk"));
    }
    Ok(())
}

/// Most shared folders per user, and most labels per host or request.
const MAX_LIST: usize = 32;
/// `b` as people write it when that is exact (`16GiB`), else in bytes: a request
/// just over a quota of 16GiB is not shown as "16.0GiB".
fn exact(b: ByteSize) -> String {
    let s = b.to_string();
    if ByteSize::parse(&s) == Ok(b) {
        s
    } else {
        format!("{}B", b.0)
    }
}

/// A LAN's name: written like a host label.
fn lan_name(l: &str) -> Result<String, InputError> {
    ssp_model::parse_label(l).map_err(|e| InputError { what: "LAN", ..e })
}

/// Validated labels, sorted and without repeats.
fn labels(given: &[String]) -> Result<Vec<String>, InputError> {
    if given.len() > MAX_LIST {
        return Err(InputError {
            what: "labels",
            value: format!("{} labels", given.len()),
            reason: format!("at most {MAX_LIST}"),
        });
    }
    let mut out = given
        .iter()
        .map(|l| ssp_model::parse_label(l.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

fn at_least(what: &'static str, v: u64, min: u64) -> Result<ByteSize, InputError> {
    if v < min {
        return Err(InputError {
            what,
            value: ByteSize(v).to_string(),
            reason: format!("must be at least {}", ByteSize(min)),
        });
    }
    Ok(ByteSize(v))
}

/// Builds the `RegisterHost` command from an agent's report.
pub fn register_host(req: &pb::RegisterHostRequest) -> Result<Command, InputError> {
    let name = HostName::parse(&req.name)?;
    let port = |p: u32| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| InputError {
                what: "ssh port",
                value: p.to_string(),
                reason: "must be 1-65535".into(),
            })
    };
    let (first, last) = (port(req.ssh_port_first)?, port(req.ssh_port_last)?);
    if first > last {
        return Err(InputError {
            what: "ssh port range",
            value: format!("{first}-{last}"),
            reason: "first port must not be above last".into(),
        });
    }
    let mut inventory = ssp_wire::inventory_from_wire(
        req.inventory
            .as_ref()
            .unwrap_or(&pb::HostInventory::default()),
    )?;
    // Live use changes at every heartbeat; the replicated record keeps it in
    // steps, enough for placement to refuse a container the pool cannot hold.
    inventory.pools = std::mem::take(&mut inventory.pools)
        .into_iter()
        .map(ssp_model::Pool::with_rounded_use)
        .collect();
    if let Some(images) = &mut inventory.images {
        for i in images.iter_mut() {
            i.fingerprint.make_ascii_lowercase();
            i.aliases.sort();
            i.aliases.dedup();
        }
        images.sort();
        images.dedup();
    }
    // Only ports of the range matter; the record stays small and in one order.
    let mut foreign_ports: Vec<u16> = req
        .foreign_ports
        .iter()
        .filter_map(|&p| u16::try_from(p).ok())
        .filter(|p| (first..=last).contains(p))
        .collect();
    foreign_ports.sort_unstable();
    foreign_ports.dedup();
    Ok(Command::RegisterHost(Host {
        name,
        agent_address: Endpoint::parse(&req.agent_address)?,
        ssh_host: NetAddress::parse(&req.ssh_host)?,
        ssh_ports: (first, last),
        inventory,
        status: Default::default(),
        labels: labels(&req.labels)?,
        foreign_ports,
        lan: match req.lan.trim() {
            "" => None,
            l => Some(lan_name(l)?),
        },
        relay_key: match req.relay_key.trim() {
            "" => None,
            k => Some(ssp_model::SshKey::parse(k)?.to_string()),
        },
        rdp_ports: match (req.rdp_port_first, req.rdp_port_last) {
            (0, _) | (_, 0) => None,
            (a, b) => {
                let bad = || {
                    InputError::new(
                        "RDP ports",
                        &format!("{a}-{b}"),
                        "expected FIRST-LAST ports, at least as many as SSH ports, not overlapping them",
                    )
                };
                let (a, b) = (
                    u16::try_from(a).map_err(|_| bad())?,
                    u16::try_from(b).map_err(|_| bad())?,
                );
                if a > b || b - a < last - first || (a <= last && first <= b) {
                    return Err(bad());
                }
                Some((a, b))
            }
        },
        warnings: host_warnings(&req.warnings),
    }))
}

/// Warnings an agent reports about its host, as the replicated record keeps them:
/// at most [`MAX_HOST_WARNINGS`] of at most [`MAX_HOST_WARNING_CHARS`] characters,
/// control characters dropped.
fn host_warnings(given: &[String]) -> Vec<String> {
    given
        .iter()
        .map(|w| {
            let plain: String = w.chars().filter(|c| !c.is_control()).collect();
            let plain = plain.trim();
            match plain.char_indices().nth(MAX_HOST_WARNING_CHARS) {
                Some((i, _)) => format!("{}…", &plain[..i]),
                None => plain.to_string(),
            }
        })
        .filter(|w| !w.is_empty())
        .take(MAX_HOST_WARNINGS)
        .collect()
}

/// See [`host_warnings`].
pub const MAX_HOST_WARNINGS: usize = 16;
pub const MAX_HOST_WARNING_CHARS: usize = 600;

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M t";

    fn cfg() -> CoordinatorConfig {
        toml::from_str(
            r#"shared_roots = ["/srv/ssp/shared"]
               default_shares = ["/srv/ssp/shared/team:/shared"]"#,
        )
        .unwrap()
    }

    fn req(name: &str) -> pb::AddUserRequest {
        pb::AddUserRequest {
            name: name.into(),
            ssh_keys: vec![KEY.into()],
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_in() {
        let Command::AddUser(u) = add_user(&req("alice"), &cfg()).unwrap() else {
            panic!()
        };
        assert_eq!(u.limits.cpus, 2);
        assert_eq!(u.image, "debian-ssh");
        assert_eq!(u.shares.len(), 1);
    }

    #[test]
    fn bad_inputs_name_what_is_wrong() {
        let c = cfg();
        let mut cases: Vec<(pb::AddUserRequest, &str)> = vec![(req("Alice"), "user name")];
        let mut r = req("bob");
        r.ssh_keys = vec!["not a key".into()];
        cases.push((r, "ssh key"));
        let mut r = req("bob");
        r.ssh_keys.clear();
        cases.push((r, "at least one public key"));
        let mut r = req("bob");
        r.shares = vec![pb::SharedFolder {
            host_path: "/etc".into(),
            container_path: "/x".into(),
            mode: String::new(),
        }];
        cases.push((r, "configured roots"));
        let mut r = req("bob");
        r.shares = vec![pb::SharedFolder {
            host_path: "/srv/ssp/shared/x".into(),
            container_path: "/x".into(),
            mode: "write".into(),
        }];
        cases.push((r, "allowed modes are rw"));
        let mut r = req("bob");
        r.shares = vec![pb::SharedFolder {
            host_path: "/srv/ssp/shared/../../etc".into(),
            container_path: "/x".into(),
            mode: String::new(),
        }];
        cases.push((r, "'..'"));
        let mut r = req("bob");
        r.memory_bytes = 1000;
        cases.push((r, "at least 64MiB"));
        let mut r = req("bob");
        r.cpus = Some(0);
        cases.push((
            r,
            "invalid CPU count \"0\": must be at least 1 (leave --cpus out for the default)",
        ));
        let mut r = req("bob");
        r.gpus = 65;
        cases.push((r, "at most 64 GPUs per container"));
        let mut r = req("bob");
        r.image = "../x".into();
        cases.push((r, "image alias"));
        let mut r = req("bob");
        r.gpus = 1;
        r.gpu_model = "A100; rm -rf".into();
        cases.push((r, "GPU model"));
        let mut r = req("bob");
        r.gpu_model = "A100".into();
        cases.push((r, "need --gpus"));
        let mut r = req("bob");
        r.host = "Host_1".into();
        cases.push((r, "host name"));
        let mut r = req("bob");
        r.labels = vec!["IB!".into()];
        cases.push((r, "host label"));
        for (r, want) in cases {
            let e = add_user(&r, &c).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn quotas_refuse_what_is_over_and_name_the_setting() {
        let mut c = cfg();
        c.quota =
            toml::from_str("gpus = 2\ncpus = 8\nmemory = \"16GiB\"\ndisk = \"100GiB\"").unwrap();
        let mut ok = req("ann");
        ok.gpus = 2;
        ok.cpus = Some(8);
        ok.memory_bytes = 16 << 30;
        assert!(add_user(&ok, &c).is_ok());
        type Case = (fn(&mut pb::AddUserRequest), &'static str);
        let cases: Vec<Case> = vec![
            (
                |r| r.gpus = 3,
                "invalid GPU count \"3\": the per-user quota is 2 ([quota] gpus",
            ),
            (
                |r| r.cpus = Some(9),
                "invalid CPU count \"9\": the per-user quota is 8 ([quota] cpus",
            ),
            (
                |r| r.memory_bytes = 17 << 30,
                "the per-user quota is 16GiB ([quota] memory",
            ),
            (
                |r| r.disk_bytes = 200 << 30,
                "the per-user quota is 100GiB ([quota] disk",
            ),
            // Just over: the figure asked is exact, not a rounded "16.0GiB".
            (
                |r| r.memory_bytes = (16 << 30) + 1,
                "invalid memory \"17179869185B\": the per-user quota is 16GiB",
            ),
        ];
        for (f, want) in cases {
            let mut r = req("bob");
            f(&mut r);
            let e = add_user(&r, &c).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should say {want}");
        }
    }

    #[test]
    fn cpus_left_out_take_the_default_and_a_number_is_kept() {
        let mut r = req("ann");
        let cpus = |r: &pb::AddUserRequest| match add_user(r, &cfg()).unwrap() {
            Command::AddUser(u) => u.limits.cpus,
            _ => unreachable!(),
        };
        assert_eq!(cpus(&r), 2);
        r.cpus = Some(3);
        assert_eq!(cpus(&r), 3);
    }

    #[test]
    fn registration_values_are_parsed_at_the_edge() {
        let ok = pb::RegisterHostRequest {
            name: "h1".into(),
            agent_address: "http://10.0.0.5:7401".into(),
            ssh_host: "10.0.0.5".into(),
            ssh_port_first: 22000,
            ssh_port_last: 22009,
            ..Default::default()
        };
        assert!(register_host(&ok).is_ok());
        // A newline and an ssh_config keyword would reach every user's ssh_config.
        let e = register_host(&pb::RegisterHostRequest {
            ssh_host: "10.0.0.5\n    ProxyCommand touch /tmp/owned".into(),
            ..ok.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("IP address or a DNS name"), "{e}");
        let e = register_host(&pb::RegisterHostRequest {
            agent_address: "http://10.0.0.5:7401/../x".into(),
            ..ok.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("http://HOST:PORT"), "{e}");
    }

    #[test]
    fn registration_keeps_only_foreign_ports_of_the_range_in_order() {
        let r = pb::RegisterHostRequest {
            name: "h1".into(),
            agent_address: "http://10.0.0.5:7401".into(),
            ssh_host: "10.0.0.5".into(),
            ssh_port_first: 22000,
            ssh_port_last: 22009,
            foreign_ports: vec![22005, 80, 22000, 22005, 70000, 22010],
            inventory: Some(pb::HostInventory {
                images: vec![
                    pb::Image {
                        fingerprint: "BB".repeat(32),
                        aliases: vec!["z".into(), "a".into()],
                    },
                    pb::Image {
                        fingerprint: "aa".repeat(32),
                        aliases: vec![],
                    },
                ],
                images_reported: true,
                ..Default::default()
            }),
            warnings: std::iter::once("limit \u{1b}[31mlow\n".to_string())
                .chain(std::iter::once("  ".to_string()))
                .chain(std::iter::once("x".repeat(5000)))
                .chain((0..40).map(|i| format!("w{i}")))
                .collect(),
            ..Default::default()
        };
        let Command::RegisterHost(h) = register_host(&r).unwrap() else {
            panic!()
        };
        assert_eq!(h.foreign_ports, vec![22000, 22005]);
        // An agent's warnings are kept small and plain: a bounded number, each cut short.
        assert_eq!(h.warnings.len(), MAX_HOST_WARNINGS);
        assert_eq!(h.warnings[0], "limit [31mlow");
        assert_eq!(h.warnings[1].chars().count(), MAX_HOST_WARNING_CHARS + 1);
        assert_eq!(h.warnings[2], "w0");
        let images: Vec<_> = h
            .inventory
            .images
            .iter()
            .flatten()
            .map(|i| (i.fingerprint.as_str(), i.aliases.join(",")))
            .collect();
        assert_eq!(
            images,
            vec![
                ("aa".repeat(32).as_str(), String::new()),
                ("bb".repeat(32).as_str(), "a,z".into())
            ]
        );
    }

    #[test]
    fn refusals_echo_a_bounded_part_of_the_input() {
        // A megabyte of GPU model would otherwise come back whole in the gRPC status.
        let mut r = req("ann");
        r.gpus = 1;
        r.gpu_model = "!".repeat(1 << 20);
        let e = add_user(&r, &cfg()).unwrap_err();
        assert_eq!((e.what, e.value.len()), ("GPU model", InputError::MAX_ECHO));
        let mut r = req("ann");
        r.gpu_model = format!("{}A100", " ".repeat(1 << 20));
        let e = add_user(&r, &cfg()).unwrap_err();
        assert_eq!(
            (e.what, e.value.len()),
            ("GPU constraint", InputError::MAX_ECHO)
        );
        let mut r = req("ann");
        let long = format!("/data/{}", "x".repeat(1 << 20));
        r.shares = ["/srv/ssp/shared/a", "/srv/ssp/shared/b"]
            .map(|host| pb::SharedFolder {
                host_path: host.into(),
                container_path: long.clone(),
                mode: String::new(),
            })
            .to_vec();
        let e = add_user(&r, &cfg()).unwrap_err();
        assert_eq!(
            (e.what, e.value.len()),
            ("shared folder", InputError::MAX_ECHO)
        );
    }

    #[test]
    fn the_network_mode_and_lan_are_checked() {
        let mut r = req("ann");
        r.network = "lan".into();
        let Command::AddUser(u) = add_user(&r, &cfg()).unwrap() else {
            panic!()
        };
        assert_eq!(u.network, ssp_model::Network::Lan);
        assert_eq!(u.placement.lan.as_deref(), Some(""), "any LAN");
        r.lan = "lab".into();
        let Command::AddUser(u) = add_user(&r, &cfg()).unwrap() else {
            panic!()
        };
        assert_eq!(u.placement.lan.as_deref(), Some("lab"));
        let Command::AddUser(u) = add_user(&req("bob"), &cfg()).unwrap() else {
            panic!()
        };
        assert_eq!(
            (u.network, u.placement.lan),
            (ssp_model::Network::Forward, None)
        );
        for (network, lan, says) in [
            ("wifi", "", "expected forward"),
            ("", "lab", "--network lan"),
            ("lan", "Lab!", "LAN"),
        ] {
            let mut r = req("ann");
            r.network = network.into();
            r.lan = lan.into();
            let e = add_user(&r, &cfg()).unwrap_err().to_string();
            assert!(e.contains(says), "{network:?} {lan:?}: {e}");
        }
    }

    #[test]
    fn labels_are_checked_sorted_and_deduplicated() {
        let mut r = req("ann");
        r.labels = vec!["rack=a3".into(), "ib".into(), "ib".into()];
        let Command::AddUser(u) = add_user(&r, &cfg()).unwrap() else {
            panic!()
        };
        assert_eq!(
            u.placement.labels,
            vec!["ib".to_string(), "rack=a3".to_string()]
        );
    }
}
