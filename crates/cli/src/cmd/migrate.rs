//! `sspctl migrate`, `sspctl migrations` and `sspctl host evacuate`: moving
//! containers between hosts, with the daemon's progress as it goes.

use std::time::Duration;

use serde_json::json;
use ssp_proto::coordinator_client::CoordinatorClient;
use ssp_proto::{
    ControlMigrationRequest, EvacuateHostRequest, ListMigrationsRequest, MigrateRequest,
    MigrationView,
};

use crate::cmd::Conn;
use crate::output;
use crate::Cli;

/// `sspctl migrate USER HOST | USER --auto | --resume ID | --abort ID`.
#[derive(clap::Args)]
pub struct Args {
    /// Whose container moves.
    user: Option<String>,
    /// The host it moves to.
    host: Option<String>,
    /// Let placement choose the host (same GPU count, model and memory constraints).
    #[arg(long)]
    auto: bool,
    /// Go on with an interrupted move.
    #[arg(long, value_name = "ID", conflicts_with_all = ["user", "host", "auto", "abort"])]
    resume: Option<u64>,
    /// Roll back a move whose target has not been started yet.
    #[arg(long, value_name = "ID", conflicts_with_all = ["user", "host", "auto", "resume"])]
    abort: Option<u64>,
    /// Answer once the move has begun, without following it.
    #[arg(long)]
    no_wait: bool,
    /// Keep it running throughout (CRIU): only where the source's daemon can;
    /// otherwise sspctl says why and moves nothing.
    #[arg(long)]
    live: bool,
}

/// `sspctl migrations [ID]`.
#[derive(clap::Args)]
pub struct ListArgs {
    /// Only this move, with its events.
    id: Option<u64>,
}

/// `sspctl host evacuate HOST`.
#[derive(clap::Args)]
pub struct EvacuateArgs {
    pub host: String,
    /// Answer once the moves have begun, without following them.
    #[arg(long)]
    pub no_wait: bool,
}

pub async fn migrate(cli: &Cli, a: &Args) -> anyhow::Result<()> {
    let conn = Conn::new(cli)?;
    let begun = if let Some(id) = a.resume.or(a.abort) {
        let action = if a.resume.is_some() {
            "resume"
        } else {
            "abort"
        };
        conn.call(
            ControlMigrationRequest {
                id,
                action: action.into(),
            },
            |ch, r| async move { CoordinatorClient::new(ch).control_migration(r).await },
        )
        .await?
        .into_inner()
    } else {
        let Some(user) = &a.user else {
            anyhow::bail!(
                "say whose container moves: sspctl migrate USER HOST, USER --auto, --resume ID or --abort ID"
            );
        };
        if a.host.is_none() && !a.auto {
            anyhow::bail!("name the target host (sspctl migrate {user} HOST) or let placement choose with --auto");
        }
        if a.host.is_some() && a.auto {
            anyhow::bail!("name a target host or ask for --auto, not both");
        }
        conn.call(
            MigrateRequest {
                name: user.clone(),
                host: a.host.clone().unwrap_or_default(),
                auto: a.auto,
                live: a.live,
            },
            |ch, r| async move { CoordinatorClient::new(ch).migrate(r).await },
        )
        .await?
        .into_inner()
    };
    if a.no_wait {
        print_views(cli, &[begun]);
        return Ok(());
    }
    let end = follow(&conn, &[begun.id]).await?;
    print_views(cli, &end);
    fail_unless_done(&end)
}

pub async fn list(cli: &Cli, a: &ListArgs) -> anyhow::Result<()> {
    let conn = Conn::new(cli)?;
    let list = fetch(&conn, a.id.unwrap_or(0)).await?;
    if a.id.is_some() && matches!(cli.output, output::Format::Table) {
        for m in &list {
            print_views(cli, std::slice::from_ref(m));
            for e in &m.events {
                crate::outln!("  {}  {}", when(e.at_ms), e.what);
            }
        }
        return Ok(());
    }
    print_views(cli, &list);
    Ok(())
}

pub async fn evacuate(cli: &Cli, a: &EvacuateArgs) -> anyhow::Result<()> {
    let conn = Conn::new(cli)?;
    let reply = conn
        .call(
            EvacuateHostRequest {
                host: a.host.clone(),
            },
            |ch, r| async move { CoordinatorClient::new(ch).evacuate_host(r).await },
        )
        .await?
        .into_inner();
    for r in &reply.refused {
        eprintln!("sspctl: not moved: {r}");
    }
    let ids: Vec<u64> = reply.migrations.iter().map(|m| m.id).collect();
    let end = if a.no_wait || ids.is_empty() {
        reply.migrations
    } else {
        follow(&conn, &ids).await?
    };
    if matches!(cli.output, output::Format::Table) && end.is_empty() {
        crate::outln!("{}: draining; nothing to move", a.host);
    }
    print_views(cli, &end);
    if !reply.refused.is_empty() {
        anyhow::bail!(
            "{} of {} containers could not be placed elsewhere; {} stays draining",
            reply.refused.len(),
            reply.refused.len() + ids.len(),
            a.host
        );
    }
    fail_unless_done(&end)
}

async fn fetch(conn: &Conn, id: u64) -> anyhow::Result<Vec<MigrationView>> {
    Ok(conn
        .call(ListMigrationsRequest { id }, |ch, r| async move {
            CoordinatorClient::new(ch).list_migrations(r).await
        })
        .await?
        .into_inner()
        .migrations)
}

/// Follows the moves `ids` until each is done or failed, with a progress line
/// per move on stderr (when it is a terminal).
async fn follow(conn: &Conn, ids: &[u64]) -> anyhow::Result<Vec<MigrationView>> {
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{spinner} {prefix} {wide_msg} {elapsed}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    let bars: Vec<indicatif::ProgressBar> = ids
        .iter()
        .map(|_| {
            let b = multi.add(indicatif::ProgressBar::new_spinner());
            b.set_style(style.clone());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        })
        .collect();
    loop {
        let all = fetch(conn, 0).await?;
        let mut views = Vec::new();
        for (id, bar) in ids.iter().zip(&bars) {
            let Some(m) = all.iter().find(|m| m.id == *id) else {
                anyhow::bail!("migration {id} is no longer recorded");
            };
            bar.set_prefix(format!(
                "migration {} {} {}→{}",
                m.id, m.instance, m.from_host, m.to_host
            ));
            bar.set_message(progress_words(m));
            views.push(m.clone());
        }
        if views
            .iter()
            .all(|m| m.phase == "done" || m.phase == "failed")
        {
            for b in &bars {
                b.finish_and_clear();
            }
            return Ok(views);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// "copying: rootfs: 512.00MB (150.12MB/s)" and the like.
fn progress_words(m: &MigrationView) -> String {
    let mut s = m.phase.clone();
    if !m.progress.is_empty() && (m.phase == "copying" || m.phase == "syncing") {
        s.push_str(": ");
        s.push_str(&m.progress);
    }
    if !m.note.is_empty() {
        s.push_str(&format!(" ({})", m.note));
    }
    s
}

fn fail_unless_done(end: &[MigrationView]) -> anyhow::Result<()> {
    let failed: Vec<String> = end
        .iter()
        .filter(|m| m.phase != "done")
        .map(|m| {
            format!(
                "migration {} of {} {}: {}; it runs on {} as before",
                m.id,
                m.instance,
                m.phase,
                if m.note.is_empty() {
                    "rolled back"
                } else {
                    &m.note
                },
                m.from_host
            )
        })
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    anyhow::bail!("{}", failed.join("; "))
}

pub(crate) fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    let ago = std::time::SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match ago {
        0..=119 => format!("{ago}s ago"),
        120..=7199 => format!("{}m ago", ago / 60),
        _ => format!("{}h ago", ago / 3600),
    }
}

fn print_views(cli: &Cli, list: &[MigrationView]) {
    let rows = list
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.instance.clone(),
                format!("{} → {}", m.from_host, m.to_host),
                m.phase.clone(),
                if m.downtime_ms == 0 {
                    "-".into()
                } else {
                    format!("{:.2}s", m.downtime_ms as f64 / 1000.0)
                },
                when(m.started_ms),
                if m.note.is_empty() {
                    if m.progress.is_empty() {
                        "-".into()
                    } else {
                        m.progress.clone()
                    }
                } else {
                    m.note.clone()
                },
            ]
        })
        .collect();
    let js = json!(list
        .iter()
        .map(|m| json!({
            "id": m.id, "instance": m.instance, "phase": m.phase,
            "from": {"host": m.from_host, "gpus": m.from_gpus, "ssh_port": m.from_port},
            "to": {"host": m.to_host, "gpus": m.to_gpus, "ssh_port": m.to_port},
            "started_ms": m.started_ms, "updated_ms": m.updated_ms,
            "downtime_ms": (m.downtime_ms > 0).then_some(m.downtime_ms),
            "note": m.note,
            "events": m.events.iter().map(|e| json!({"at_ms": e.at_ms, "what": e.what})).collect::<Vec<_>>(),
            "bytes": m.bytes, "bytes_per_sec": m.bytes_per_sec, "progress": m.progress,
        }))
        .collect::<Vec<_>>());
    output::print(
        cli.output,
        &[
            "ID",
            "CONTAINER",
            "MOVE",
            "PHASE",
            "DOWNTIME",
            "STARTED",
            "NOTE",
        ],
        rows,
        js,
    );
}
