//! Turning client requests into validated commands (pure; no IO).

use ssp_model::{
    ByteSize, Command, Constraints, Host, HostName, InputError, Limits, NewUser, Role,
    SharedFolder, SshKey, Username,
};
use ssp_proto as pb;

use crate::config::CoordinatorConfig;

/// Most GPUs one request may ask for; a sanity bound, not a policy.
const MAX_GPUS: u32 = 64;

/// Builds the `AddUser` command, filling defaults from the config.
pub fn add_user(req: &pb::AddUserRequest, cfg: &CoordinatorConfig) -> Result<Command, InputError> {
    let name = Username::parse(&req.name)?;
    let ssh_keys = req
        .ssh_keys
        .iter()
        .map(|k| SshKey::parse(k))
        .collect::<Result<Vec<_>, _>>()?;
    if ssh_keys.is_empty() {
        return Err(InputError {
            what: "ssh keys",
            value: String::new(),
            reason: "give at least one public key (--ssh-key FILE)".into(),
        });
    }
    let d = cfg.default_limits()?;
    let limits = Limits {
        cpus: if req.cpus == 0 { d.cpus } else { req.cpus },
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
    if req.gpus > MAX_GPUS {
        return Err(InputError {
            what: "GPU count",
            value: req.gpus.to_string(),
            reason: format!("at most {MAX_GPUS} GPUs per container"),
        });
    }
    let mut shares = if req.no_default_shares {
        vec![]
    } else {
        cfg.default_share_list()?
    };
    for s in &req.shares {
        shares.push(SharedFolder::new(
            &s.host_path,
            &s.container_path,
            &cfg.shared_roots,
        )?);
    }
    shares.sort();
    shares.dedup();
    let mut seen = std::collections::BTreeSet::new();
    for s in &shares {
        if !seen.insert(&s.container_path) {
            return Err(InputError {
                what: "shared folder",
                value: s.container_path.clone(),
                reason: "two shared folders cannot use the same container path".into(),
            });
        }
    }
    let image = if req.image.is_empty() {
        cfg.defaults.image.clone()
    } else {
        image_alias(&req.image)?
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
            return Err(InputError {
                what: "GPU model",
                value: m.into(),
                reason: "use letters, digits, spaces, '-', '_' or '.' (at most 64), e.g. A100"
                    .into(),
            })
        }
    };
    let host = match req.host.as_str() {
        "" => None,
        h => Some(HostName::parse(h)?),
    };
    let constrained = gpu_model.is_some() || req.gpu_memory_bytes > 0;
    if constrained && req.gpus == 0 {
        return Err(InputError {
            what: "GPU constraint",
            value: req.gpu_model.clone(),
            reason: "--gpu-model and --gpu-memory need --gpus N (N >= 1)".into(),
        });
    }
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
        },
    }))
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

fn image_alias(s: &str) -> Result<String, InputError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && !s.starts_with(['-', '/', '.']);
    if ok {
        Ok(s.to_string())
    } else {
        Err(InputError {
            what: "image alias",
            value: s.into(),
            reason: "use letters, digits and - _ . / (an alias of an image on the hosts)".into(),
        })
    }
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
    // Live usage changes every heartbeat; the replicated record keeps capacity only.
    for p in &mut inventory.pools {
        p.used_bytes = 0;
    }
    Ok(Command::RegisterHost(Host {
        name,
        agent_address: req.agent_address.clone(),
        ssh_host: req.ssh_host.clone(),
        ssh_ports: (first, last),
        inventory,
        status: Default::default(),
    }))
}

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
        }];
        cases.push((r, "configured roots"));
        let mut r = req("bob");
        r.shares = vec![pb::SharedFolder {
            host_path: "/srv/ssp/shared/../../etc".into(),
            container_path: "/x".into(),
        }];
        cases.push((r, "'..'"));
        let mut r = req("bob");
        r.memory_bytes = 1000;
        cases.push((r, "at least 64MiB"));
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
        for (r, want) in cases {
            let e = add_user(&r, &c).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }
}
