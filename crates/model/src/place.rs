//! Placement: which host, which GPUs and which SSH port a new container gets.
//!
//! Pure and deterministic: every replica choosing from the same state makes
//! the same choice. The default policy packs GPUs onto as few hosts as
//! possible, keeping whole servers free for large jobs.

use std::collections::BTreeSet;

use crate::names::{ByteSize, HostName, PciAddress};
use crate::state::State;
use crate::types::{Constraints, Gpu, Host, Limits};

/// Where a new container goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: HostName,
    pub gpus: Vec<PciAddress>,
    pub ssh_port: u16,
}

/// Why nothing fits: per-host reasons, and the free GPU total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoFit {
    pub gpus_asked: u32,
    pub gpus_free: u32,
    pub only_gpus_short: bool,
    pub reasons: Vec<String>,
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reasons.is_empty() {
            return f.write_str("no hosts are registered; start an agent first");
        }
        if self.only_gpus_short {
            write!(
                f,
                "{} GPU{} asked but only {} free ",
                self.gpus_asked,
                if self.gpus_asked == 1 { "" } else { "s" },
                self.gpus_free
            )?;
            return write!(f, "({})", self.reasons.join("; "));
        }
        f.write_str(&self.reasons.join("; "))
    }
}

/// What moves in progress hold beyond the containers' own records.
fn reserved(state: &State) -> impl Iterator<Item = &crate::migration::Side> {
    state.migrations.values().filter_map(|m| m.reserved())
}

/// GPUs of `host` that no instance holds, in index order.
pub fn free_gpus(state: &State, host: &Host) -> Vec<PciAddress> {
    let mut gpus: Vec<_> = host.inventory.gpus.iter().collect();
    gpus.sort_by_key(|g| g.index);
    let free = |g: &&crate::types::Gpu| match state.usage() {
        Some(u) => !u
            .hosts
            .get(host.name.as_str())
            .is_some_and(|h| h.gpus.contains_key(&g.pci)),
        None => {
            !state
                .instances
                .values()
                .any(|i| i.host == host.name && i.gpus.contains(&g.pci))
                && !reserved(state).any(|side| side.host == host.name && side.gpus.contains(&g.pci))
        }
    };
    gpus.into_iter()
        .filter(free)
        .map(|g| g.pci.clone())
        .collect()
}

/// The lowest SSH port of `host`'s range that no instance on it uses and nothing
/// else on the host holds (its foreign ports).
pub fn free_port(state: &State, host: &Host) -> Option<u16> {
    let (first, last) = host.ssh_ports;
    if first > last {
        return None;
    }
    match state.usage() {
        Some(u) => match u.hosts.get(host.name.as_str()) {
            Some(h) => h
                .ports
                .lowest_free(first.into(), last.into())
                .and_then(|p| u16::try_from(p).ok()),
            None => Some(first),
        },
        None => {
            let used: BTreeSet<u16> = state
                .instances
                .values()
                .filter(|i| i.host == host.name)
                .map(|i| i.ssh_port)
                .chain(
                    reserved(state)
                        .filter(|side| side.host == host.name)
                        .map(|side| side.ssh_port),
                )
                .chain(host.foreign_ports.iter().copied())
                .collect();
            (first..=last).find(|p| !used.contains(p))
        }
    }
}

/// Free GPUs of `host` that meet the request's model and memory constraints, in index order.
pub fn eligible_gpus(state: &State, host: &Host, c: &Constraints) -> Vec<PciAddress> {
    let by_pci: std::collections::BTreeMap<&PciAddress, &Gpu> =
        host.inventory.gpus.iter().map(|g| (&g.pci, g)).collect();
    let model = c.gpu_model.as_ref().map(|m| m.to_lowercase());
    free_gpus(state, host)
        .into_iter()
        .filter(|pci| {
            by_pci.get(pci).is_some_and(|g| {
                model
                    .as_ref()
                    .is_none_or(|m| g.model.to_lowercase().contains(m.as_str()))
                    && c.gpu_memory.is_none_or(|m| g.memory_bytes >= m)
            })
        })
        .collect()
}

fn why_not(
    state: &State,
    host: &Host,
    limits: &Limits,
    gpus: u32,
    image: Option<&str>,
    c: &Constraints,
) -> Result<Placement, (String, bool)> {
    let inv = &host.inventory;
    let name = host.name.as_str();
    if host.status != crate::types::HostStatus::Ready {
        return Err((format!("{name}: {}", host.status.as_str()), false));
    }
    if let Some(image) = image.filter(|i| !inv.has_image(i)) {
        return Err((format!("{name}: no image {image}"), false));
    }
    if let Some(l) = c.labels.iter().find(|l| !host.labels.contains(l)) {
        return Err((format!("{name}: no label {l}"), false));
    }
    if c.desktop && host.rdp_ports.is_none() {
        return Err((
            format!("{name}: no RDP ports (its agent reports none)"),
            false,
        ));
    }
    if let Some(want) = &c.lan {
        match &host.lan {
            None => return Err((format!("{name}: on no LAN (its agent has no [lan])"), false)),
            Some(l) if !want.is_empty() && l != want => {
                return Err((format!("{name}: on LAN {l}, not {want}"), false))
            }
            Some(_) => {}
        }
    }
    let free = eligible_gpus(state, host, c);
    if (free.len() as u32) < gpus {
        let model = c
            .gpu_model
            .as_ref()
            .map(|m| format!(" {m}"))
            .unwrap_or_default();
        let memory = c
            .gpu_memory
            .map(|m| format!(" ({} or more)", ByteSize(m)))
            .unwrap_or_default();
        return Err((
            format!(
                "{name}: {} free{model} GPU{}{memory} of {gpus} asked",
                free.len(),
                if free.len() == 1 { "" } else { "s" }
            ),
            true,
        ));
    }
    if limits.cpus > inv.cpus {
        return Err((
            format!("{name}: {} CPUs asked, host has {}", limits.cpus, inv.cpus),
            false,
        ));
    }
    if limits.memory.0 > inv.memory_bytes {
        return Err((
            format!(
                "{name}: {} memory asked, host has {}",
                limits.memory,
                ByteSize(inv.memory_bytes)
            ),
            false,
        ));
    }
    if let Some(pool) = inv.ssp_pool().filter(|p| p.total_bytes > 0) {
        if limits.disk.0 > pool.total_bytes {
            return Err((
                format!(
                    "{name}: {} disk asked, storage pool {} is {}",
                    limits.disk,
                    pool.name,
                    ByteSize(pool.total_bytes)
                ),
                false,
            ));
        }
        // A new container (it comes from an image) must fit in what the pool has
        // free now; a move is refused by the target's daemon itself, and rolls back.
        let free = pool.total_bytes.saturating_sub(pool.used_bytes);
        if image.is_some() && limits.disk.0 > free {
            return Err((
                format!(
                    "{name}: {} disk asked, storage pool {} has {} free of {}",
                    limits.disk,
                    pool.name,
                    ByteSize(free),
                    ByteSize(pool.total_bytes)
                ),
                false,
            ));
        }
    }
    let Some(port) = free_port(state, host) else {
        return Err((
            format!(
                "{name}: all SSH ports {}-{} are taken",
                host.ssh_ports.0, host.ssh_ports.1
            ),
            false,
        ));
    };
    Ok(Placement {
        host: host.name.clone(),
        gpus: free.into_iter().take(gpus as usize).collect(),
        ssh_port: port,
    })
}

/// Chooses a host for a container with `limits` and `gpus` GPUs from `image`
/// (an alias or fingerprint the host's daemon has) under `c`:
/// by default the fullest host that fits (pack), with `c.spread` the emptiest.
/// Ties go to the first host by name, so every replica chooses alike.
///
/// Without GPU model, memory or host constraints, hosts are tried in preference
/// order from the usage index and the first that fits wins, which is what the full
/// scan (`choose_by_scan`) picks; the scan still explains a refusal host by host.
pub fn choose(
    state: &State,
    limits: &Limits,
    gpus: u32,
    image: &str,
    c: &Constraints,
) -> Result<Placement, NoFit> {
    let plain = c.gpu_model.is_none() && c.gpu_memory.is_none() && c.host.is_none();
    if let (true, Some(usage)) = (plain, state.usage()) {
        let fits = |name: &String| {
            state
                .hosts
                .get(name)
                .and_then(|h| why_not(state, h, limits, gpus, Some(image), c).ok())
        };
        let candidates = usage.by_free.range((gpus, String::new())..);
        if !c.spread {
            if let Some(p) = candidates.clone().find_map(|(_, name)| fits(name)) {
                return Ok(p);
            }
        } else {
            // Most free GPUs first; among equals, the first by name.
            let mut it = candidates.rev().peekable();
            while let Some(&&(free, _)) = it.peek() {
                let mut group = Vec::new();
                while let Some((f, name)) = it.peek() {
                    if *f != free {
                        break;
                    }
                    group.push(name);
                    it.next();
                }
                if let Some(p) = group.into_iter().rev().find_map(fits) {
                    return Ok(p);
                }
            }
        }
    }
    choose_by_scan(state, limits, gpus, image, c)
}

/// [`choose`] by looking at every host.
pub fn choose_by_scan(
    state: &State,
    limits: &Limits,
    gpus: u32,
    image: &str,
    c: &Constraints,
) -> Result<Placement, NoFit> {
    if let Some(h) = &c.host {
        if !state.hosts.contains_key(h.as_str()) {
            return Err(NoFit {
                gpus_asked: gpus,
                gpus_free: 0,
                only_gpus_short: false,
                reasons: vec![format!(
                    "{h}: no such host (registered: {})",
                    state.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
                )],
            });
        }
    }
    let considered = || {
        state
            .hosts
            .values()
            .filter(|h| c.host.as_ref().is_none_or(|n| *n == h.name))
    };
    if considered().next().is_some() && !considered().any(|h| h.inventory.has_image(image)) {
        let have: Vec<String> = considered()
            .map(|h| {
                let mut names: Vec<String> = h
                    .inventory
                    .images
                    .iter()
                    .flatten()
                    .map(|i| i.label())
                    .collect();
                names.sort();
                match names.is_empty() {
                    true => format!("{}: none", h.name),
                    false => format!("{}: {}", h.name, names.join(", ")),
                }
            })
            .collect();
        return Err(NoFit {
            gpus_asked: gpus,
            gpus_free: 0,
            only_gpus_short: false,
            reasons: vec![format!("no host has image {image} ({})", have.join("; "))],
        });
    }
    best_of(state, considered(), limits, gpus, Some(image), c)
}

/// The host of `hosts` placement prefers (pack: fewest free GPUs that fit;
/// spread: most; ties to the first), or every host's reason.
fn best_of<'a>(
    state: &State,
    hosts: impl Iterator<Item = &'a Host>,
    limits: &Limits,
    gpus: u32,
    image: Option<&str>,
    c: &Constraints,
) -> Result<Placement, NoFit> {
    let mut best: Option<(usize, Placement)> = None;
    let mut reasons = Vec::new();
    let mut only_gpus_short = true;
    let mut gpus_free = 0u32;
    for host in hosts {
        let free = eligible_gpus(state, host, c).len();
        gpus_free += free as u32;
        match why_not(state, host, limits, gpus, image, c) {
            Ok(p) => {
                let better = match &best {
                    None => true,
                    Some((f, _)) if c.spread => free > *f,
                    Some((f, _)) => free < *f,
                };
                if better {
                    best = Some((free, p));
                }
            }
            Err((reason, gpu_short)) => {
                only_gpus_short &= gpu_short;
                reasons.push(reason);
            }
        }
    }
    match best {
        Some((_, p)) => Ok(p),
        None => Err(NoFit {
            gpus_asked: gpus,
            gpus_free,
            only_gpus_short: only_gpus_short && !reasons.is_empty(),
            reasons,
        }),
    }
}

/// Where a move of `inst` goes: `to`, or (when `None`) the host placement
/// prefers among the others, with the same number of GPUs under the same model
/// and memory constraints and labels it was made with. The image is not needed
/// there (the daemons copy the container).
pub fn choose_for_move(
    state: &State,
    inst: &crate::types::Instance,
    to: Option<&HostName>,
) -> Result<Placement, NoFit> {
    let hosts = state
        .hosts
        .values()
        .filter(|h| h.name != inst.host && to.is_none_or(|t| *t == h.name));
    best_of(
        state,
        hosts,
        &inst.limits,
        inst.gpus.len() as u32,
        None,
        &inst.placement,
    )
    .map_err(|mut e| {
        if e.reasons.is_empty() {
            e.reasons
                .push(format!("no host other than {} is registered", inst.host));
        }
        e
    })
}
