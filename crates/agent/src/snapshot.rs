//! Snapshots of ssp's containers, through the daemon's own snapshot API: made,
//! listed, restored and deleted on request, and taken on the owner's schedule by
//! the agent itself (from the stored specs, so also while no coordinator answers).
//!
//! A restore brings back the snapshot's files and also its config; ssp's config
//! (GPUs, port, address, shares, account) is then ensured again, so a snapshot
//! taken before a move or a change of GPUs restores onto what the container holds
//! now.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use ssp_lxd::Client;
use ssp_model::{MOVE_SNAPSHOT_PREFIX, SCHEDULED_SNAPSHOT_PREFIX};
use ssp_proto::Snapshot;

use crate::ensure::EnsureError;
use crate::host::HostState;

/// How often the scheduler looks at the stored specs.
const TICK: Duration = Duration::from_secs(1);

fn not_found(name: &str) -> EnsureError {
    EnsureError::Daemon(ssp_lxd::Error::Api {
        method: "GET".into(),
        path: format!("/1.0/instances/{name}"),
        code: 404,
        message: format!("container {name} does not exist on this host"),
    })
}

/// Fails unless `name` exists here and is ssp's.
async fn check_managed(client: &Client, name: &str) -> Result<(), EnsureError> {
    let Some((inst, _)) = client.instance(name).await? else {
        return Err(not_found(name));
    };
    if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
        return Err(EnsureError::Foreign(name.into()));
    }
    Ok(())
}

/// Milliseconds since the epoch of an RFC 3339 time as the daemons write it.
fn millis(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// A name from a prefix and the time now (UTC): `PREFIXYYYYmmdd-HHMMSS`.
pub fn stamped(prefix: &str) -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{prefix}{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The container's snapshots, oldest first, without a move's transient ones.
pub async fn list(client: &Client, name: &str) -> Result<Vec<Snapshot>, EnsureError> {
    check_managed(client, name).await?;
    let v = client
        .get(&format!("/1.0/instances/{name}/snapshots?recursion=1"))
        .await?;
    let mut out: Vec<Snapshot> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|s: &Value| {
            let n = s["name"].as_str()?;
            // Older daemons answer with "instance/snapshot".
            let n = n.rsplit('/').next().unwrap_or(n);
            (!n.starts_with(MOVE_SNAPSHOT_PREFIX)).then(|| Snapshot {
                name: n.to_string(),
                created_ms: millis(s["created_at"].as_str().unwrap_or_default()),
                scheduled: n.starts_with(SCHEDULED_SNAPSHOT_PREFIX),
            })
        })
        .collect();
    out.sort_by(|a, b| (a.created_ms, &a.name).cmp(&(b.created_ms, &b.name)));
    Ok(out)
}

/// Takes snapshot `snap` of `name` (its files; a running container keeps running).
pub async fn create(client: &Client, name: &str, snap: &str) -> Result<(), EnsureError> {
    check_managed(client, name).await?;
    client
        .post(
            &format!("/1.0/instances/{name}/snapshots"),
            json!({"name": snap, "stateful": false}),
        )
        .await?;
    Ok(())
}

/// Deletes snapshot `snap`; false when there was none.
pub async fn delete(client: &Client, name: &str, snap: &str) -> Result<bool, EnsureError> {
    check_managed(client, name).await?;
    match client
        .delete(&format!("/1.0/instances/{name}/snapshots/{snap}"))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Restores `name` to snapshot `snap`, then puts ssp's config back. The caller
/// holds the instance's lock, so healing waits until the container is whole.
pub async fn restore(host: &Arc<HostState>, name: &str, snap: &str) -> Result<(), EnsureError> {
    let client = &host.client;
    check_managed(client, name).await?;
    // The daemon stops a running container, brings back the snapshot's files and
    // config, and starts it again.
    let restored = client
        .put(&format!("/1.0/instances/{name}"), json!({"restore": snap}))
        .await;
    // Whatever the daemon did, the container gets ssp's config and state back.
    let ensured = match host.specs.get(name) {
        Some(spec) => match host.facts().await {
            Ok(f) => host.ensure(&f.context, &spec).await.map(|_| ()),
            Err(e) => Err(EnsureError::Host(format!("{e:#}"))),
        },
        None => Ok(()),
    };
    restored?;
    ensured
}

/// Takes the scheduled snapshots of every stored spec that has a schedule, and
/// removes the oldest scheduled ones beyond its `keep`. Runs for ever.
pub async fn schedule_loop(host: Arc<HostState>) {
    // When each container's next scheduled snapshot is due (learnt from its
    // newest scheduled snapshot the first time).
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        let names = host.specs.names();
        due.retain(|n, _| names.contains(n));
        for name in names {
            let Some(spec) = host.specs.get(&name) else {
                continue;
            };
            if spec.snapshot_every_secs == 0 {
                due.remove(&name);
                continue;
            }
            let now = Instant::now();
            if due.get(&name).is_some_and(|t| now < *t) {
                continue;
            }
            let every = Duration::from_secs(spec.snapshot_every_secs);
            let next = match scheduled_pass(&host, &name, every, spec.snapshot_keep).await {
                Ok(wait) => now + wait,
                Err(e) => {
                    tracing::warn!(instance = %name, "scheduled snapshot: {e}");
                    now + Duration::from_secs(10).min(every)
                }
            };
            due.insert(name, next);
        }
    }
}

/// One look at `name`: a snapshot when the newest scheduled one is `every` old
/// (or there is none), then pruning to `keep`. Returns how long until the next.
async fn scheduled_pass(
    host: &Arc<HostState>,
    name: &str,
    every: Duration,
    keep: u32,
) -> Result<Duration, EnsureError> {
    let _guard = host.lock(name).await;
    let client = &host.client;
    if client.instance(name).await?.is_none() {
        // Not made yet, or gone: look again soon.
        return Ok(Duration::from_secs(5).min(every));
    }
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut scheduled: Vec<Snapshot> = list(client, name)
        .await?
        .into_iter()
        .filter(|s| s.scheduled)
        .collect();
    let age = scheduled
        .last()
        .map(|s| Duration::from_millis(now_ms.saturating_sub(s.created_ms).max(0) as u64));
    let wait = match age {
        Some(a) if a < every => every - a,
        _ => {
            let snap = stamped(SCHEDULED_SNAPSHOT_PREFIX);
            // Two within one second would share a name: the newer one waits.
            if scheduled.iter().any(|s| s.name == snap) {
                return Ok(Duration::from_secs(1));
            }
            create(client, name, &snap).await?;
            tracing::info!(instance = %name, snapshot = %snap, "scheduled snapshot taken");
            scheduled.push(Snapshot {
                name: snap,
                created_ms: now_ms,
                scheduled: true,
            });
            every
        }
    };
    let extra = scheduled.len().saturating_sub(keep.max(1) as usize);
    for old in &scheduled[..extra] {
        delete(client, name, &old.name).await?;
        tracing::info!(instance = %name, snapshot = %old.name, keep, "scheduled snapshot expired");
    }
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_times_and_stamped_names() {
        assert_eq!(millis("2026-12-01T10:45:00.250Z"), 1_796_121_900_250);
        assert_eq!(
            millis("2026-12-01T10:45:00.250000123+00:00"),
            1_796_121_900_250
        );
        assert_eq!(millis("not a time"), 0);
        let n = stamped("auto-");
        assert_eq!(n.len(), "auto-20261201-104500".len(), "{n}");
        assert!(ssp_model::parse_snapshot_name(&n, false).is_ok());
    }
}
