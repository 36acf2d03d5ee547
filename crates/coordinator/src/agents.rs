//! Driving agents: a channel to each host and the calls the coordinator makes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ssp_model::Host;
use ssp_proto::agent_client::AgentClient;
use ssp_proto::{
    DeleteInstanceRequest, InstanceList, InstanceSpec, InstanceStatus, LabMembers,
    ListInstancesRequest,
};
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Long operations (image unpack, first start) may take this long.
const ENSURE_TIMEOUT: Duration = Duration::from_secs(180);
const QUICK_TIMEOUT: Duration = Duration::from_secs(5);
/// A move whose transfer reports nothing for this long is taken as hung.
const MIGRATE_SILENCE: Duration = Duration::from_secs(600);

/// A pool of channels, one per agent address (mutual TLS: the agent must show an
/// agent certificate of this cluster, and sees this coordinator's).
#[derive(Clone)]
pub struct Agents {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    tls: ssp_net::Tls,
}

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("host {host} is not registered")]
    UnknownHost { host: String },
    #[error("host {host} did not answer in {secs}s")]
    Timeout { host: String, secs: u64 },
    #[error("host {host} cannot be reached: {message}")]
    Unreachable { host: String, message: String },
    #[error("host {host}: {message}")]
    Call { host: String, message: String },
}

impl Agents {
    pub fn new(tls: ssp_net::Tls) -> Self {
        Agents {
            channels: Default::default(),
            tls,
        }
    }

    /// Keeps channels only to these agent addresses (registered hosts).
    pub async fn retain(&self, addrs: &[String]) {
        self.channels.lock().await.retain(|a, _| addrs.contains(a));
    }

    async fn client(&self, addr: &str) -> Result<AgentClient<Channel>, ssp_net::NetError> {
        let mut map = self.channels.lock().await;
        if let Some(c) = map.get(addr) {
            return Ok(AgentClient::new(c.clone()));
        }
        let ch = ssp_net::channel(addr, &self.tls, ssp_net::AGENT_NAME)?;
        map.insert(addr.to_string(), ch.clone());
        Ok(AgentClient::new(ch))
    }

    async fn for_host(
        &self,
        record: Option<&Host>,
        host: &str,
    ) -> Result<AgentClient<Channel>, AgentError> {
        let h = record.ok_or_else(|| AgentError::UnknownHost { host: host.into() })?;
        self.client(h.agent_address.as_str())
            .await
            .map_err(|e| AgentError::Call {
                host: host.into(),
                message: e.to_string(),
            })
    }

    /// Asks `host`'s agent to make `spec` true.
    pub async fn ensure(
        &self,
        record: Option<&Host>,
        host: &str,
        spec: InstanceSpec,
    ) -> Result<InstanceStatus, AgentError> {
        let mut c = self.for_host(record, host).await?;
        call(host, ENSURE_TIMEOUT, c.ensure_instance(spec)).await
    }

    /// Deletes `name` on `host`.
    pub async fn delete(
        &self,
        record: Option<&Host>,
        host: &str,
        name: &str,
    ) -> Result<bool, AgentError> {
        let mut c = self.for_host(record, host).await?;
        let r = call(
            host,
            ENSURE_TIMEOUT,
            c.delete_instance(DeleteInstanceRequest { name: name.into() }),
        )
        .await?;
        Ok(r.existed)
    }

    /// What `host` reports about its instances (only ssp's with `managed_only`),
    /// with each one's disk use (for people: `sspctl ls`).
    pub async fn observe(
        &self,
        record: Option<&Host>,
        host: &str,
        managed_only: bool,
        only: &str,
    ) -> Result<Vec<InstanceStatus>, AgentError> {
        let mut c = self.for_host(record, host).await?;
        Ok(call(
            host,
            QUICK_TIMEOUT,
            c.list_instances(ListInstancesRequest {
                managed_only,
                with_usage: true,
                name: only.to_string(),
            }),
        )
        .await?
        .instances)
    }

    /// `host`'s whole report: its instances and the hash of its members files.
    pub async fn report(
        &self,
        record: Option<&Host>,
        host: &str,
        managed_only: bool,
    ) -> Result<InstanceList, AgentError> {
        let mut c = self.for_host(record, host).await?;
        call(
            host,
            QUICK_TIMEOUT,
            c.list_instances(ListInstancesRequest {
                managed_only,
                with_usage: false,
                name: String::new(),
            }),
        )
        .await
    }

    /// Freezes `name` on `host` for a move's final pass (its spec there says
    /// stopped; the agent stops it when it cannot freeze it).
    pub async fn freeze(
        &self,
        record: Option<&Host>,
        host: &str,
        name: &str,
    ) -> Result<InstanceStatus, AgentError> {
        let mut c = self.for_host(record, host).await?;
        call(
            host,
            ENSURE_TIMEOUT,
            c.instance_action(ssp_proto::InstanceActionRequest {
                name: name.into(),
                action: ssp_proto::Action::Freeze as i32,
            }),
        )
        .await
    }

    /// Has `host`'s daemon open the operation a target pulls `name` from.
    pub async fn migrate_out(
        &self,
        record: Option<&Host>,
        host: &str,
        name: &str,
        snapshot: &str,
    ) -> Result<ssp_proto::MigrateOutReply, AgentError> {
        let mut c = self.for_host(record, host).await?;
        call(
            host,
            ENSURE_TIMEOUT,
            c.migrate_out(ssp_proto::MigrateOutRequest {
                name: name.into(),
                snapshot: snapshot.into(),
                check_live: false,
            }),
        )
        .await
    }

    /// Whether `host`'s daemon can move `name` live: `Err` with its words when not.
    pub async fn check_live(
        &self,
        record: Option<&Host>,
        host: &str,
        name: &str,
    ) -> Result<Result<(), String>, AgentError> {
        let mut c = self.for_host(record, host).await?;
        let r = call(
            host,
            QUICK_TIMEOUT,
            c.migrate_out(ssp_proto::MigrateOutRequest {
                name: name.into(),
                snapshot: String::new(),
                check_live: true,
            }),
        )
        .await?;
        Ok(match r.live_available {
            true => Ok(()),
            false => Err(r.live_reason),
        })
    }

    /// Deletes snapshot `snapshot` of `name` on `host`.
    pub async fn delete_snapshot(
        &self,
        record: Option<&Host>,
        host: &str,
        name: &str,
        snapshot: &str,
    ) -> Result<bool, AgentError> {
        let mut c = self.for_host(record, host).await?;
        Ok(call(
            host,
            ENSURE_TIMEOUT,
            c.delete_snapshot(ssp_proto::DeleteSnapshotRequest {
                name: name.into(),
                snapshot: snapshot.into(),
            }),
        )
        .await?
        .existed)
    }

    /// Publishes `req.name`'s container on `host` as an image.
    pub async fn publish_image(
        &self,
        record: Option<&Host>,
        host: &str,
        req: ssp_proto::PublishImageRequest,
    ) -> Result<ssp_proto::ImageReply, AgentError> {
        let mut c = self.for_host(record, host).await?;
        call(host, ENSURE_TIMEOUT, c.publish_image(req)).await
    }

    /// Copies image `fingerprint` (named `aliases`) from `from` to `to`, daemon to daemon.
    pub async fn copy_image(
        &self,
        from: (Option<&Host>, &str),
        to: (Option<&Host>, &str),
        fingerprint: &str,
        aliases: Vec<String>,
    ) -> Result<(), AgentError> {
        let mut src = self.for_host(from.0, from.1).await?;
        let share = call(
            from.1,
            QUICK_TIMEOUT,
            src.share_image(ssp_proto::ShareImageRequest {
                image: fingerprint.into(),
            }),
        )
        .await?;
        let mut dst = self.for_host(to.0, to.1).await?;
        call(
            to.1,
            ENSURE_TIMEOUT,
            dst.fetch_image(ssp_proto::FetchImageRequest {
                server: share.server,
                certificate: share.certificate,
                secret: share.secret,
                fingerprint: share.fingerprint,
                aliases,
            }),
        )
        .await?;
        Ok(())
    }

    /// Deletes image `image` on `host`; false when it had none.
    pub async fn delete_image(
        &self,
        record: Option<&Host>,
        host: &str,
        image: &str,
    ) -> Result<bool, AgentError> {
        let mut c = self.for_host(record, host).await?;
        Ok(call(
            host,
            ENSURE_TIMEOUT,
            c.delete_image(ssp_proto::DeleteImageRequest {
                image: image.into(),
            }),
        )
        .await?
        .existed)
    }

    /// A snapshot operation on `host`; the agent's own status (its code and words)
    /// comes back, with the host named.
    pub async fn snapshots(
        &self,
        record: Option<&Host>,
        host: &str,
        req: ssp_proto::SnapshotRequest,
    ) -> Result<ssp_proto::SnapshotList, tonic::Status> {
        let unavailable = |e: AgentError| tonic::Status::unavailable(e.to_string());
        let mut c = self.for_host(record, host).await.map_err(unavailable)?;
        match tokio::time::timeout(ENSURE_TIMEOUT, c.snapshots(req)).await {
            Err(_) => Err(unavailable(AgentError::Timeout {
                host: host.into(),
                secs: ENSURE_TIMEOUT.as_secs(),
            })),
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                Err(unavailable(AgentError::Unreachable {
                    host: host.into(),
                    message: s.message().to_string(),
                }))
            }
            Ok(Err(s)) => Err(tonic::Status::new(
                s.code(),
                format!("host {host}: {}", s.message()),
            )),
            Ok(Ok(r)) => {
                let mut list = r.into_inner();
                list.host = host.into();
                Ok(list)
            }
        }
    }

    /// What container `name` on `host` uses (for adoption), and `user`'s keys inside.
    pub async fn survey(
        &self,
        record: Option<&Host>,
        host: &str,
        name: &str,
        user: &str,
    ) -> Result<ssp_proto::SurveyReply, AgentError> {
        let mut c = self.for_host(record, host).await?;
        call(
            host,
            ENSURE_TIMEOUT,
            c.survey(ssp_proto::SurveyRequest {
                name: name.into(),
                user: user.into(),
            }),
        )
        .await
    }

    /// Marks container `name` on `host` as ssp's, if it is still the one surveyed.
    pub async fn take_over(
        &self,
        record: Option<&Host>,
        host: &str,
        name: &str,
        uuid: &str,
    ) -> Result<(), AgentError> {
        let mut c = self.for_host(record, host).await?;
        call(
            host,
            QUICK_TIMEOUT,
            c.take_over(ssp_proto::TakeOverRequest {
                name: name.into(),
                uuid: uuid.into(),
            }),
        )
        .await?;
        Ok(())
    }

    /// Has `host` pull `spec`'s container from `source`; `progress` sees the
    /// daemon's progress. Returns whether only what changed was sent.
    pub async fn migrate_in(
        &self,
        record: Option<&Host>,
        host: &str,
        spec: InstanceSpec,
        source: ssp_proto::MigrateOutReply,
        mut progress: impl FnMut(&ssp_proto::MigrateProgress),
    ) -> Result<bool, AgentError> {
        let mut c = self.for_host(record, host).await?;
        let mut stream = call(
            host,
            QUICK_TIMEOUT,
            c.migrate_in(ssp_proto::MigrateInRequest {
                spec: Some(spec),
                source: Some(source),
            }),
        )
        .await?;
        loop {
            // A transfer that shows no progress for this long is taken as hung.
            let next = call(host, MIGRATE_SILENCE, async {
                stream.message().await.map(tonic::Response::new)
            })
            .await?;
            match next {
                Some(p) if p.done => return Ok(p.refresh),
                Some(p) => progress(&p),
                None => {
                    return Err(AgentError::Unreachable {
                        host: host.into(),
                        message: "the agent ended the transfer without a result".into(),
                    })
                }
            }
        }
    }

    /// Whether `name`'s SSH server on `host` greets within `timeout`.
    pub async fn probe_ssh(
        &self,
        record: Option<&Host>,
        host: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<ssp_proto::ProbeSshReply, AgentError> {
        let mut c = self.for_host(record, host).await?;
        call(
            host,
            timeout + QUICK_TIMEOUT,
            c.probe_ssh(ssp_proto::ProbeSshRequest {
                name: name.into(),
                timeout_ms: timeout.as_millis() as u32,
            }),
        )
        .await
    }

    /// Has `host` write the lab's member list into its members files; returns the
    /// hash of what it then holds.
    pub async fn set_members(
        &self,
        record: Option<&Host>,
        host: &str,
        members: LabMembers,
    ) -> Result<String, AgentError> {
        let mut c = self.for_host(record, host).await?;
        Ok(call(host, QUICK_TIMEOUT, c.set_lab_members(members))
            .await?
            .hash)
    }
}

async fn call<T>(
    host: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(AgentError::Timeout {
            host: host.into(),
            secs: limit.as_secs(),
        }),
        Ok(Err(s)) if s.code() == tonic::Code::Unavailable => Err(AgentError::Unreachable {
            host: host.into(),
            message: s.message().to_string(),
        }),
        Ok(Err(s)) => Err(AgentError::Call {
            host: host.into(),
            message: s.message().to_string(),
        }),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}
