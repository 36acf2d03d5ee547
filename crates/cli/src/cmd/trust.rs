//! `sspctl login|token|cert|audit`: credentials and the audit log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use ssp_proto::trust_client::TrustClient;
use ssp_proto::*;

use crate::cmd::{bundle_path, load_bundle, Conn};
use crate::output;
use crate::Cli;

#[derive(clap::Args)]
pub struct LoginArgs {
    /// The bundle file (`NAME.bundle` from `sspctl user add`), or a user or admin
    /// join token (`sspctl token create --role user --name NAME`).
    file: PathBuf,
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// A single-use, expiring join token: an agent or coordinator started with
    /// `--token FILE` gets its certificate with it; a person runs `sspctl login FILE`.
    Create {
        /// agent, coordinator, user or admin.
        #[arg(long)]
        role: String,
        /// The holder's name (user and admin tokens).
        #[arg(long)]
        name: Option<String>,
        /// How long the token works, e.g. 30m, 1h, 2d (at most 7d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Where to write it (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum CertCmd {
    /// Certificates the cluster issued, and join tokens.
    List,
    /// A credential bundle for a user or admin.
    Issue {
        name: String,
        /// user or admin.
        #[arg(long, default_value = "user")]
        role: String,
        /// Validity, e.g. 90d (default: the coordinators' user_cert_ttl_secs).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Where to write the bundle (default: NAME.bundle in SSP_CREDENTIALS_DIR or here).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Refuse a certificate from now on, on every coordinator and agent: by serial,
    /// or every current certificate of a name.
    Revoke { serial_or_name: String },
}

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Only what this user did, or what was done to them.
    #[arg(long)]
    user: Option<String>,
    /// Only entries since this long ago (e.g. 1h, 7d) or this Unix time in seconds.
    #[arg(long)]
    since: Option<String>,
    /// At most this many entries (the newest).
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

/// `30s`, `10m`, `1h`, `2d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 30m, 1h, 2d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: expected a positive duration"))
}

fn when(secs: i64) -> String {
    if secs <= 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let d = secs - now;
    let (sign, a) = if d < 0 { ("-", -d) } else { ("", d) };
    match a {
        a if a < 120 => format!("{sign}{a}s"),
        a if a < 7200 => format!("{sign}{}m", a / 60),
        a if a < 172800 => format!("{sign}{}h", a / 3600),
        a => format!("{sign}{}d", a / 86400),
    }
}

/// Where `user add` and `cert issue` write bundles by default.
pub fn credentials_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("SSP_CREDENTIALS_DIR").unwrap_or_else(|| ".".into());
    Path::new(&dir).join(format!("{name}.bundle"))
}

/// Writes `c` as a bundle to `path` (mode 0600).
pub fn save_credentials(c: &Credentials, path: &Path) -> anyhow::Result<()> {
    ssp_net::join::bundle_of(c)
        .save(path)
        .with_context(|| format!("writing the credential bundle {}", path.display()))
}

/// Issues a bundle for `name` (admin only) and writes it.
pub async fn issue_to(
    c: &Conn,
    name: &str,
    role: &str,
    ttl: Option<Duration>,
    out: &Path,
) -> anyhow::Result<Credentials> {
    let body = IssueRequest {
        name: name.into(),
        role: role.into(),
        ttl_secs: ttl.map(|d| d.as_secs()).unwrap_or(0),
    };
    let creds = c
        .call(
            body,
            |ch, r| async move { TrustClient::new(ch).issue(r).await },
        )
        .await?
        .into_inner();
    save_credentials(&creds, out)?;
    Ok(creds)
}

pub async fn login(cli: &Cli, a: &LoginArgs) -> anyhow::Result<()> {
    let b = ssp_net::Bundle::load(&a.file)?;
    let id = b.identity()?;
    let dest = bundle_path(cli);
    let installed = if id.token {
        // A join token for a person: exchange it for their own certificate.
        let extra: Vec<String> = cli
            .coordinator
            .as_deref()
            .map(|c| c.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default();
        let creds = ssp_net::join::enroll(&b, "", &extra).await?;
        ssp_net::join::bundle_of(&creds)
    } else {
        b
    };
    installed.save(&dest)?;
    let who = installed.identity()?;
    crate::outln!(
        "logged in as {} (certificate {}, valid {}) to {}; credentials in {}",
        who.label(),
        who.serial,
        when(who.not_after),
        installed.coordinators.join(", "),
        dest.display()
    );
    Ok(())
}

/// Renews the bundle in place when two thirds of its life are gone (quietly
/// does nothing without one; warns when renewal fails).
pub async fn renew_if_due(cli: &Cli) {
    let Ok(b) = load_bundle(cli) else { return };
    let Ok(id) = b.identity() else { return };
    if id.token || !ssp_net::join::due(&id) {
        return;
    }
    let res = async {
        let c = Conn::with_bundle(cli, &b)?;
        let creds = ssp_net::join::renew(c.tls(), c.addrs()).await?;
        save_credentials(&creds, &bundle_path(cli))
    }
    .await;
    if let Err(e) = res {
        eprintln!(
            "sspctl: warning: renewing your certificate (it ends in {}) failed: {e:#}",
            when(id.not_after)
        );
    }
}

pub async fn token(cli: &Cli, cmd: &TokenCmd) -> anyhow::Result<()> {
    let TokenCmd::Create {
        role,
        name,
        ttl,
        out,
    } = cmd;
    let c = Conn::new(cli)?;
    let body = CreateTokenRequest {
        role: role.clone(),
        name: name.clone().unwrap_or_default(),
        ttl_secs: ttl.as_secs(),
    };
    let creds = c
        .call(body, |ch, r| async move {
            TrustClient::new(ch).create_token(r).await
        })
        .await?
        .into_inner();
    let text = ssp_net::join::bundle_of(&creds).render();
    match out {
        Some(p) => {
            ssp_net::ca::write_private(p, &text)?;
            eprintln!(
                "sspctl: token {} for a {} written to {}; it works once, until {} from now",
                creds.name,
                creds.role,
                p.display(),
                when(creds.not_after)
            );
        }
        None => crate::outln!("{}", text.trim_end()),
    }
    Ok(())
}

pub async fn cert(cli: &Cli, cmd: &CertCmd) -> anyhow::Result<()> {
    let c = Conn::new(cli)?;
    match cmd {
        CertCmd::List => {
            let list = c
                .call(ListCertsRequest {}, |ch, r| async move {
                    TrustClient::new(ch).list_certs(r).await
                })
                .await?
                .into_inner();
            let mut rows: Vec<Vec<String>> = list
                .certs
                .iter()
                .map(|x| {
                    vec![
                        x.serial.clone(),
                        x.name.clone(),
                        x.role.clone(),
                        when(x.not_after),
                        if x.revoked_at > 0 {
                            "revoked".into()
                        } else {
                            "valid".into()
                        },
                    ]
                })
                .collect();
            rows.extend(list.tokens.iter().map(|t| {
                vec![
                    format!("token {}", t.id),
                    t.name.clone(),
                    t.role.clone(),
                    when(t.expires),
                    if t.used { "used" } else { "unused" }.into(),
                ]
            }));
            let js = json!({
                "certs": list.certs.iter().map(|x| json!({"serial": x.serial, "name": x.name, "role": x.role,
                    "not_after": x.not_after, "revoked_at": x.revoked_at})).collect::<Vec<_>>(),
                "tokens": list.tokens.iter().map(|t| json!({"id": t.id, "role": t.role, "name": t.name,
                    "expires": t.expires, "used": t.used})).collect::<Vec<_>>(),
            });
            output::print(
                cli.output,
                &["SERIAL", "NAME", "ROLE", "ENDS IN", "STATE"],
                rows,
                js,
            );
        }
        CertCmd::Issue {
            name,
            role,
            ttl,
            out,
        } => {
            let path = out.clone().unwrap_or_else(|| credentials_path(name));
            let creds = issue_to(&c, name, role, *ttl, &path).await?;
            crate::outln!(
                "credentials for {} ({}, serial {}) in {}; give them to {name}: `sspctl login {}`",
                name,
                creds.role,
                creds.serial,
                path.display(),
                path.file_name()
                    .map(|f| f.to_string_lossy())
                    .unwrap_or_default()
            );
        }
        CertCmd::Revoke { serial_or_name } => {
            let body = RevokeRequest {
                serial_or_name: serial_or_name.clone(),
            };
            let r = c
                .call(
                    body,
                    |ch, r| async move { TrustClient::new(ch).revoke(r).await },
                )
                .await?
                .into_inner();
            match cli.output {
                output::Format::Json => crate::outln!("{}", json!({"revoked": r.serials})),
                output::Format::Table => crate::outln!(
                    "revoked {} certificate(s): {}",
                    r.serials.len(),
                    r.serials.join(", ")
                ),
            }
        }
    }
    Ok(())
}

fn parse_since(s: &str) -> anyhow::Result<i64> {
    if let Ok(t) = s.parse::<i64>() {
        if t > 1_000_000_000 {
            return Ok(t);
        }
    }
    let d = parse_duration(s).map_err(|e| anyhow::anyhow!("--since {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    Ok(now - d.as_secs() as i64)
}

pub async fn audit(cli: &Cli, a: &AuditArgs) -> anyhow::Result<()> {
    let c = Conn::new(cli)?;
    let body = AuditRequest {
        user: a.user.clone().unwrap_or_default(),
        since: a
            .since
            .as_deref()
            .map(parse_since)
            .transpose()?
            .unwrap_or(0),
        limit: a.limit,
    };
    let list = c
        .call(
            body,
            |ch, r| async move { TrustClient::new(ch).audit(r).await },
        )
        .await?
        .into_inner();
    let rows = list
        .entries
        .iter()
        .map(|e| {
            vec![
                e.index.to_string(),
                format!("{:.3}", e.at_ms as f64 / 1000.0),
                e.actor.clone(),
                e.action.clone(),
                e.target.clone(),
                e.outcome.clone(),
            ]
        })
        .collect();
    let js = json!(list
        .entries
        .iter()
        .map(
            |e| json!({"index": e.index, "at_ms": e.at_ms, "actor": e.actor, "serial": e.serial,
                        "action": e.action, "target": e.target, "outcome": e.outcome})
        )
        .collect::<Vec<_>>());
    output::print(
        cli.output,
        &["INDEX", "AT (UNIX S)", "WHO", "ACTION", "TARGET", "OUTCOME"],
        rows,
        js,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_and_refuse_nonsense() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        for bad in ["", "h", "1w", "-1h", "0", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
