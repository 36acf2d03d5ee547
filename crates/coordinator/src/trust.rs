//! The cluster CA on the coordinators: forming it, joining with a token,
//! issuing and renewing certificates, revoking them, and the audit log.
//!
//! Files, under `data_dir/tls/` (mode 0600): `node.bundle` (this coordinator's
//! certificate and key, and the CA certificate), `ca.key` (the CA's key: every
//! coordinator can issue), and on the coordinator that formed the cluster
//! `admin.bundle`, the first admin credential (`sspctl login` installs it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use ssp_model::trust::{CertRecord, TrustCommand, TrustOutcome};
use ssp_model::{CertRole, Command, Outcome};
use ssp_net::{Bundle, Ca, Identity, Issued, Tls};
use ssp_proto::trust_client::TrustClient;
use ssp_proto::*;
use tonic::{Request, Response, Status};

use crate::cluster::{forwarded, Route};
use crate::config::CoordinatorConfig;
use crate::core::{Applied, Core};
use crate::raft::Actor;
use ssp_net::auth::{self, caller, require};

/// The longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// This coordinator's credentials.
pub struct NodeTrust {
    pub tls: Tls,
    pub ca: Ca,
    /// Certificates made before the cluster existed (its first coordinator and
    /// admin), recorded once it has a leader.
    pub unrecorded: Vec<ssp_net::Identity>,
}

pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Loads this coordinator's credentials; without them, joins with `token`, or
/// (with `bootstrap`) forms a new CA. A coordinator with neither does not start:
/// it could not prove to anyone that it belongs.
pub async fn establish(
    cfg: &CoordinatorConfig,
    address: &str,
    token: Option<&Path>,
) -> anyhow::Result<NodeTrust> {
    let dir = tls_dir(&cfg.data_dir);
    let node = dir.join("node.bundle");
    let ca_key = dir.join("ca.key");
    if node.exists() {
        let b = Bundle::load(&node)?;
        let key = std::fs::read_to_string(&ca_key)
            .with_context(|| format!("reading {}", ca_key.display()))?;
        let ca = Ca::load(&b.ca_pem, &key)?;
        let tls = b.tls()?;
        return Ok(NodeTrust {
            tls,
            ca,
            unrecorded: vec![],
        });
    }
    if let Some(token) = token {
        let t = Bundle::load(token)?;
        let creds = ssp_net::join::enroll(&t, address, &[]).await?;
        let ca_key_pem = creds.ca_key_pem.clone();
        if ca_key_pem.is_empty() {
            anyhow::bail!(
                "the token {} is not a coordinator token (it gave a {} certificate); make one with `sspctl token create --role coordinator`",
                token.display(),
                creds.role
            );
        }
        let b = Bundle {
            coordinators: creds.coordinators.clone(),
            cert_pem: creds.cert_pem,
            key_pem: creds.key_pem,
            ca_pem: creds.ca_pem,
        };
        ssp_net::ca::write_private(&ca_key, &ca_key_pem)?;
        b.save(&node)?;
        let ca = Ca::load(&b.ca_pem, &ca_key_pem)?;
        tracing::info!(%address, "joined the cluster's CA with a token");
        return Ok(NodeTrust {
            tls: b.tls()?,
            ca,
            unrecorded: vec![],
        });
    }
    if !cfg.bootstrap {
        anyhow::bail!(
            "no certificate in {}: start this coordinator with `--token FILE` (from `sspctl token create --role coordinator` on the cluster) to join a cluster, or set bootstrap = true to form a new one",
            dir.display()
        );
    }
    let ca = Ca::generate(address)?;
    let me = ca.issue(
        address,
        CertRole::Coordinator,
        false,
        Duration::from_secs(cfg.cert_ttl_secs),
    )?;
    let admin = ca.issue(
        "root",
        CertRole::Admin,
        false,
        Duration::from_secs(cfg.user_cert_ttl_secs),
    )?;
    let coordinators = vec![address.to_string()];
    ssp_net::ca::write_private(&ca_key, &ca.key_pem)?;
    Bundle {
        coordinators: coordinators.clone(),
        cert_pem: admin.cert_pem.clone(),
        key_pem: admin.key_pem.clone(),
        ca_pem: ca.cert_pem.clone(),
    }
    .save(&dir.join("admin.bundle"))?;
    let b = Bundle {
        coordinators,
        cert_pem: me.cert_pem.clone(),
        key_pem: me.key_pem.clone(),
        ca_pem: ca.cert_pem.clone(),
    };
    b.save(&node)?;
    tracing::info!(
        "formed a new cluster CA; the first admin credential is {}",
        dir.join("admin.bundle").display()
    );
    Ok(NodeTrust {
        tls: b.tls()?,
        ca,
        unrecorded: vec![me.identity, admin.identity],
    })
}

/// Keeps the TLS layer's revoked serials equal to the replicated record.
pub async fn follow_revocations(core: Core) {
    let mut last: Vec<String> = Vec::new();
    loop {
        let now: Vec<String> = core.read(|s| s.trust.revoked().cloned().collect());
        if now != last {
            tracing::info!(revoked = now.len(), "revoked certificates updated");
            core.tls.set_revoked(now.iter().cloned());
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Records the certificates made before the cluster had a leader.
pub async fn record_unrecorded(core: &Core, ids: &[Identity]) {
    for id in ids {
        let cmd = record_cmd(id);
        if let Err(e) = core.apply(cmd, Some(format!("record-{}", id.serial))).await {
            tracing::warn!(serial = %id.serial, "recording a certificate failed: {}", e.message());
        }
    }
}

fn record_cmd(id: &Identity) -> Command {
    Command::Trust(TrustCommand::RecordCert {
        serial: id.serial.clone(),
        record: CertRecord {
            name: id.name.clone(),
            role: id.role,
            not_after: id.not_after,
            revoked: None,
        },
        now: now_secs(),
    })
}

/// Renews this coordinator's own certificate when two thirds of its life are
/// gone: a new certificate from the leader (recorded there), swapped in for new
/// connections and saved, with no restart and no dropped connection.
pub async fn renew_loop(core: Core) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let id = core.tls.identity();
        if !ssp_net::join::due(&id) {
            continue;
        }
        match renew_self(&core).await {
            Ok(serial) => tracing::info!(old = %id.serial, new = %serial, "certificate renewed"),
            Err(e) => tracing::warn!("renewing this coordinator's certificate failed: {e:#}"),
        }
    }
}

async fn renew_self(core: &Core) -> anyhow::Result<String> {
    let (_, leader) = core
        .leader()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let c = ssp_net::join::renew(&core.tls, &[leader]).await?;
    let dir = tls_dir(&core.cfg.data_dir);
    let b = Bundle {
        coordinators: vec![core.replica.address.clone()],
        cert_pem: c.cert_pem,
        key_pem: c.key_pem,
        ca_pem: c.ca_pem,
    };
    b.save(&dir.join("node.bundle"))?;
    core.tls.replace_own(&b.cert_pem, &b.key_pem)?;
    Ok(c.serial)
}

/// The Trust service.
#[derive(Clone)]
pub struct TrustService {
    pub core: Core,
    pub ca: Arc<Ca>,
}

fn actor(id: &Identity) -> Actor {
    Actor {
        label: id.label(),
        serial: id.serial.clone(),
        at_ms: now_ms(),
    }
}

impl Core {
    /// Refuses `id` doing `action` to `target`, and writes the refusal in the
    /// audit log (best effort: a refusal is answered even without a leader).
    pub async fn deny(&self, id: &Identity, action: &str, target: &str) -> Status {
        let status = auth::denied(id, format!("{action} {target}").trim());
        let cmd = Command::Audit {
            action: action.into(),
            target: target.into(),
            outcome: format!("permission denied: {}", status.message()),
        };
        let res = match self.route(&Default::default()).await {
            Ok(Route::Here) => self.apply_as(cmd, None, Some(actor(id))).await.map(|_| ()),
            Ok(Route::Leader(addr)) => {
                let entry = AuditEntry {
                    at_ms: now_ms(),
                    actor: id.label(),
                    serial: id.serial.clone(),
                    action: action.into(),
                    target: target.into(),
                    outcome: format!("permission denied: {}", status.message()),
                    index: 0,
                };
                match ssp_net::channel(&addr, &self.tls, ssp_net::COORDINATOR_NAME) {
                    Ok(ch) => TrustClient::new(ch).record_denial(entry).await.map(|_| ()),
                    Err(e) => Err(Status::unavailable(e.to_string())),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            tracing::warn!(who = %id.label(), action, target, "audit of a refusal failed: {}", e.message());
        }
        tracing::info!(who = %id.label(), action, target, "permission denied");
        status
    }

    /// The caller of `req`, if their role is one of `roles`; otherwise
    /// PermissionDenied, written to the audit log as `action` on `target`.
    pub async fn admit<T>(
        &self,
        req: &Request<T>,
        roles: &[CertRole],
        action: &str,
        target: &str,
    ) -> Result<Arc<Identity>, Status> {
        let id = caller(&self.tls, req)?;
        if require(&id, roles, action).is_err() {
            return Err(self.deny(&id, action, target).await);
        }
        Ok(id)
    }

    /// Applies `cmd` for `id`, recorded in the audit log.
    pub async fn apply_for(
        &self,
        id: &Identity,
        cmd: Command,
        request_id: Option<String>,
    ) -> Result<Applied, Status> {
        self.apply_as(cmd, request_id, Some(actor(id))).await
    }

    /// Every coordinator's address, this one first.
    pub fn coordinator_addresses(&self) -> Vec<String> {
        let mut v = vec![self.replica.address.clone()];
        for (_, n) in self.replica.membership().membership().nodes() {
            if !v.contains(&n.addr) {
                v.push(n.addr.clone());
            }
        }
        v
    }
}

fn ttl_of(secs: u64, default: Duration, max: Duration, what: &str) -> Result<Duration, Status> {
    let d = if secs == 0 {
        default
    } else {
        Duration::from_secs(secs)
    };
    if d > max {
        return Err(Status::invalid_argument(format!(
            "{what} of {}s: at most {}s ({} days) is allowed",
            d.as_secs(),
            max.as_secs(),
            max.as_secs() / 86400
        )));
    }
    Ok(d)
}

fn random_id() -> String {
    // 16 hex digits from the kernel's random source.
    let mut buf = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl TrustService {
    fn ttl_for(&self, role: CertRole) -> Duration {
        match role {
            CertRole::Coordinator | CertRole::Agent => {
                Duration::from_secs(self.core.cfg.cert_ttl_secs)
            }
            CertRole::User | CertRole::Admin => {
                Duration::from_secs(self.core.cfg.user_cert_ttl_secs)
            }
        }
    }

    /// Issues and records a certificate (on the leader).
    async fn issue(
        &self,
        by: &Identity,
        name: &str,
        role: CertRole,
        ttl: Duration,
    ) -> Result<Credentials, Status> {
        let issued: Issued = self
            .ca
            .issue(name, role, false, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.core
            .apply_for(by, record_cmd(&issued.identity), None)
            .await?;
        Ok(self.credentials(issued, role == CertRole::Coordinator))
    }

    fn credentials(&self, i: Issued, with_ca_key: bool) -> Credentials {
        Credentials {
            cert_pem: i.cert_pem,
            key_pem: i.key_pem,
            ca_pem: self.ca.cert_pem.clone(),
            ca_key_pem: if with_ca_key {
                self.ca.key_pem.clone()
            } else {
                String::new()
            },
            coordinators: self.core.coordinator_addresses(),
            name: i.identity.name,
            role: i.identity.role.to_string(),
            serial: i.identity.serial,
            not_after: i.identity.not_after,
        }
    }
}

macro_rules! to_leader {
    ($self:ident, $req:ident, $method:ident) => {
        if let Route::Leader(a) = $self.core.route($req.metadata()).await? {
            let ch = ssp_net::channel(&a, &$self.core.tls, ssp_net::COORDINATOR_NAME)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            return TrustClient::new(ch).$method(forwarded($req)).await;
        }
    };
}

#[tonic::async_trait]
impl ssp_proto::trust_server::Trust for TrustService {
    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<Credentials>, Status> {
        let id = caller(&self.core.tls, &req)?;
        if !id.token {
            return Err(Status::permission_denied(format!(
                "{} already has a certificate; enrolling needs a join token (`sspctl token create`)",
                id.label()
            )));
        }
        to_leader!(self, req, enroll);
        let used = self
            .core
            .apply_for(
                &id,
                Command::Trust(TrustCommand::UseToken {
                    id: id.name.clone(),
                    now: now_secs(),
                }),
                None,
            )
            .await?;
        let Applied::Now(Outcome::Trust(TrustOutcome::TokenUsed { role, name })) = used else {
            return Err(Status::internal(format!("unexpected outcome {used:?}")));
        };
        if role != id.role {
            return Err(Status::permission_denied(format!(
                "token {} is for {role}, its certificate says {}",
                id.name, id.role
            )));
        }
        let asked = req.into_inner().name;
        let name = match role {
            CertRole::Agent => ssp_model::HostName::parse(&asked)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
                .to_string(),
            CertRole::Coordinator => ssp_model::Endpoint::parse(&asked)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
                .to_string(),
            CertRole::User | CertRole::Admin => name.unwrap_or(asked),
        };
        tracing::info!(token = %id.name, %role, %name, "token exchanged for a certificate");
        self.issue(&id, &name, role, self.ttl_for(role))
            .await
            .map(Response::new)
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<Credentials>, Status> {
        let id = caller(&self.core.tls, &req)?;
        require(&id, &CertRole::ALL, "renew a certificate")?;
        to_leader!(self, req, renew);
        self.issue(&id, &id.name, id.role, self.ttl_for(id.role))
            .await
            .map(Response::new)
    }

    async fn issue(&self, req: Request<IssueRequest>) -> Result<Response<Credentials>, Status> {
        let target = req.get_ref().name.clone();
        let id = self
            .core
            .admit(&req, &[CertRole::Admin], "issue-cert", &target)
            .await?;
        to_leader!(self, req, issue);
        let r = req.into_inner();
        let role = CertRole::parse(&r.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !matches!(role, CertRole::User | CertRole::Admin) {
            return Err(Status::invalid_argument(format!(
                "role {role}: certificates for coordinators and agents come with a join token (`sspctl token create --role {role}`)"
            )));
        }
        let name = ssp_model::Username::parse(&r.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ttl = ttl_of(
            r.ttl_secs,
            self.ttl_for(role),
            ssp_net::ca::MAX_TTL,
            "validity",
        )?;
        self.issue(&id, name.as_str(), role, ttl)
            .await
            .map(Response::new)
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<Credentials>, Status> {
        let target = req.get_ref().role.clone();
        let id = self
            .core
            .admit(&req, &[CertRole::Admin], "create-token", &target)
            .await?;
        to_leader!(self, req, create_token);
        let r = req.into_inner();
        let role = CertRole::parse(&r.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = match role {
            CertRole::User | CertRole::Admin => Some(
                ssp_model::Username::parse(&r.name)
                    .map_err(|e| {
                        Status::invalid_argument(format!(
                            "a {role} token names its holder (--name): {e}"
                        ))
                    })?
                    .to_string(),
            ),
            _ if !r.name.is_empty() => {
                return Err(Status::invalid_argument(format!(
                    "--name is for user and admin tokens; a {role} names itself when it enrolls"
                )))
            }
            _ => None,
        };
        let ttl = ttl_of(r.ttl_secs, DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL, "token TTL")?;
        let token_id = random_id();
        let issued = self
            .ca
            .issue(&token_id, role, true, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.core
            .apply_for(
                &id,
                Command::Trust(TrustCommand::CreateToken {
                    id: token_id.clone(),
                    role,
                    name,
                    expires: issued.identity.not_after,
                    now: now_secs(),
                }),
                None,
            )
            .await?;
        tracing::info!(token = %token_id, %role, ttl_secs = ttl.as_secs(), "join token created");
        Ok(Response::new(self.credentials(issued, false)))
    }

    async fn revoke(&self, req: Request<RevokeRequest>) -> Result<Response<RevokeReply>, Status> {
        let target = req.get_ref().serial_or_name.clone();
        let id = self
            .core
            .admit(&req, &[CertRole::Admin], "revoke", &target)
            .await?;
        to_leader!(self, req, revoke);
        let target = req.into_inner().serial_or_name;
        if target.is_empty() || target.len() > 128 {
            return Err(Status::invalid_argument(
                "give a certificate's serial (hex) or a name, 1 to 128 characters",
            ));
        }
        let out = self
            .core
            .apply_for(
                &id,
                Command::Trust(TrustCommand::Revoke {
                    serial_or_name: target,
                    now: now_secs(),
                }),
                None,
            )
            .await?;
        let serials = match out {
            Applied::Now(Outcome::Trust(TrustOutcome::Revoked { serials })) => serials,
            _ => vec![],
        };
        // This node refuses them at once; the others within a moment.
        let all: Vec<String> = self.core.read(|s| s.trust.revoked().cloned().collect());
        self.core.tls.set_revoked(all);
        Ok(Response::new(RevokeReply { serials }))
    }

    async fn list_certs(
        &self,
        req: Request<ListCertsRequest>,
    ) -> Result<Response<CertList>, Status> {
        self.core
            .admit(&req, &[CertRole::Admin], "list-certs", "")
            .await?;
        self.core.prepare_read(req.metadata()).await?;
        let list = self.core.read(|s| CertList {
            certs: s
                .trust
                .certs
                .iter()
                .map(|(serial, c)| CertInfo {
                    serial: serial.clone(),
                    name: c.name.clone(),
                    role: c.role.to_string(),
                    not_after: c.not_after,
                    revoked_at: c.revoked.unwrap_or(0),
                })
                .collect(),
            tokens: s
                .trust
                .tokens
                .iter()
                .map(|(tid, t)| TokenInfo {
                    id: tid.clone(),
                    role: t.role.to_string(),
                    name: t.name.clone().unwrap_or_default(),
                    expires: t.expires,
                    used: t.used,
                })
                .collect(),
        });
        Ok(Response::new(list))
    }

    async fn audit(&self, req: Request<AuditRequest>) -> Result<Response<AuditList>, Status> {
        let id = caller(&self.core.tls, &req)?;
        require(
            &id,
            &[CertRole::Admin, CertRole::User],
            "read the audit log",
        )?;
        self.core.prepare_read(req.metadata()).await?;
        let r = req.into_inner();
        // A user sees what they did; an admin sees everything (or one user's).
        let who = if id.role == CertRole::Admin {
            (!r.user.is_empty()).then(|| r.user.clone())
        } else {
            Some(id.name.clone())
        };
        let limit = if r.limit == 0 {
            1000
        } else {
            r.limit.min(20_000)
        } as usize;
        let entries = self.core.replica.read(|m| {
            let mut v: Vec<AuditEntry> = m
                .audit
                .iter()
                .rev()
                .filter(|a| a.at_ms >= r.since.saturating_mul(1000))
                .filter(|a| match &who {
                    None => true,
                    Some(u) => {
                        a.actor.rsplit_once(':').map(|(_, n)| n) == Some(u.as_str())
                            || a.target == *u
                    }
                })
                .take(limit)
                .map(|a| AuditEntry {
                    at_ms: a.at_ms,
                    actor: a.actor.clone(),
                    serial: a.serial.clone(),
                    action: a.action.clone(),
                    target: a.target.clone(),
                    outcome: a.outcome.clone(),
                    index: a.index,
                })
                .collect();
            v.reverse();
            v
        });
        Ok(Response::new(AuditList { entries }))
    }

    async fn record_denial(
        &self,
        req: Request<AuditEntry>,
    ) -> Result<Response<RecordDenialReply>, Status> {
        let id = caller(&self.core.tls, &req)?;
        require(&id, &[CertRole::Coordinator], "write the audit log")?;
        let e = req.into_inner();
        let cap = |s: String| s.chars().take(512).collect::<String>();
        let cmd = Command::Audit {
            action: cap(e.action),
            target: cap(e.target),
            outcome: cap(e.outcome),
        };
        let actor = Actor {
            label: cap(e.actor),
            serial: cap(e.serial),
            at_ms: e.at_ms,
        };
        self.core.apply_as(cmd, None, Some(actor)).await?;
        Ok(Response::new(RecordDenialReply {}))
    }
}
