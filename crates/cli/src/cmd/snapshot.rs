//! `sspctl snapshot`: a user's snapshots (they may snapshot and restore their own
//! container), and the schedule an admin gives them.

use clap::Subcommand;
use serde_json::json;
use ssp_proto::coordinator_client::CoordinatorClient;
use ssp_proto::*;

use crate::cmd::migrate::when;
use crate::cmd::Conn;
use crate::output;
use crate::Cli;

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of USER's container (running containers keep running).
    Create {
        user: String,
        /// Default: snap-YYYYmmdd-HHMMSS (UTC).
        name: Option<String>,
    },
    /// List USER's snapshots, oldest first, and their schedule.
    List { user: String },
    /// Bring USER's container back to snapshot NAME (its files; it keeps its GPUs,
    /// SSH port and address). A running container is restarted.
    Restore { user: String, name: String },
    /// Delete snapshot NAME of USER's container.
    Delete { user: String, name: String },
    /// Admin: take a snapshot of USER's container every interval and keep the
    /// newest N (taken by the host's agent, also while no coordinator answers).
    Schedule {
        user: String,
        /// hourly, daily, weekly, or a number with s, m, h or d (e.g. 6h).
        #[arg(long, required_unless_present = "off")]
        every: Option<String>,
        /// How many scheduled snapshots to keep.
        #[arg(long, default_value_t = 7)]
        keep: u32,
        /// No scheduled snapshots any more (those taken stay until deleted).
        #[arg(long, conflicts_with = "every")]
        off: bool,
    },
}

/// Seconds of a schedule interval as people write it.
fn every_secs(s: &str) -> anyhow::Result<u64> {
    Ok(match s {
        "hourly" => 3600,
        "daily" => 86400,
        "weekly" => 7 * 86400,
        _ => crate::cmd::trust::parse_duration(s)
            .map_err(|e| anyhow::anyhow!("--every {e}; or hourly, daily, weekly"))?
            .as_secs(),
    })
}

pub async fn run(cli: &Cli, c: &SnapshotCmd) -> anyhow::Result<()> {
    let conn = Conn::new(cli)?;
    let (user, op, snapshot) = match c {
        SnapshotCmd::Create { user, name } => {
            (user, SnapshotOp::Create, name.clone().unwrap_or_default())
        }
        SnapshotCmd::List { user } => (user, SnapshotOp::List, String::new()),
        SnapshotCmd::Restore { user, name } => (user, SnapshotOp::Restore, name.clone()),
        SnapshotCmd::Delete { user, name } => (user, SnapshotOp::Delete, name.clone()),
        SnapshotCmd::Schedule {
            user,
            every,
            keep,
            off,
        } => {
            let every_secs = match (off, every) {
                (true, _) => 0,
                (false, Some(e)) => every_secs(e)?,
                (false, None) => anyhow::bail!("give --every INTERVAL or --off"),
            };
            let reply = conn
                .call(
                    SetSnapshotScheduleRequest {
                        name: user.clone(),
                        every_secs,
                        keep: *keep,
                    },
                    |ch, r| async move { CoordinatorClient::new(ch).set_snapshot_schedule(r).await },
                )
                .await?
                .into_inner();
            return print(cli, &reply);
        }
    };
    let reply = conn
        .call(
            SnapshotRequest {
                name: user.clone(),
                op: op as i32,
                snapshot,
            },
            |ch, r| async move { CoordinatorClient::new(ch).snapshots(r).await },
        )
        .await?
        .into_inner();
    print(cli, &reply)
}

fn schedule(l: &SnapshotList) -> String {
    if l.every_secs == 0 {
        "none".into()
    } else {
        format!("every {}s, newest {} kept", l.every_secs, l.keep)
    }
}

fn print(cli: &Cli, l: &SnapshotList) -> anyhow::Result<()> {
    if matches!(cli.output, output::Format::Table) {
        if !l.done.is_empty() {
            crate::outln!("{}", l.done);
        }
        if l.host.is_empty() {
            return Ok(());
        }
        crate::outln!("{} on {}; schedule: {}", l.instance, l.host, schedule(l));
    }
    let rows = l
        .snapshots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                when(s.created_ms),
                if s.scheduled { "schedule" } else { "by hand" }.into(),
            ]
        })
        .collect();
    let js = json!({
        "instance": l.instance,
        "host": l.host,
        "done": l.done,
        "schedule": {"every_secs": l.every_secs, "keep": l.keep},
        "snapshots": l.snapshots.iter().map(|s| json!({
            "name": s.name, "created_ms": s.created_ms, "scheduled": s.scheduled,
        })).collect::<Vec<_>>(),
    });
    output::print(cli.output, &["SNAPSHOT", "TAKEN", "BY"], rows, js);
    Ok(())
}
