//! Getting and renewing a certificate from the coordinators: a join token is
//! exchanged once for credentials; any holder renews before its end.

use std::time::{Duration, SystemTime};

use ssp_proto::trust_client::TrustClient;
use ssp_proto::{Credentials, EnrollRequest, RenewRequest};
use tonic::Request;

use crate::{Bundle, Identity, Tls, COORDINATOR_NAME};

/// Exchanges a join token for credentials at the first coordinator that answers
/// (`extra` first, then the token's own list). `name`: an agent's host name, a
/// coordinator's advertise address.
pub async fn enroll(token: &Bundle, name: &str, extra: &[String]) -> anyhow::Result<Credentials> {
    let tls = token.tls()?;
    let mut last = anyhow::anyhow!("the token names no coordinator");
    for addr in extra.iter().chain(token.coordinators.iter()) {
        let ch = match crate::connect(addr, &tls, COORDINATOR_NAME).await {
            Ok(c) => c,
            Err(e) => {
                last = e.into();
                continue;
            }
        };
        let mut r = Request::new(EnrollRequest { name: name.into() });
        r.set_timeout(Duration::from_secs(10));
        match TrustClient::new(ch).enroll(r).await {
            Ok(c) => return Ok(c.into_inner()),
            Err(s) => {
                last = anyhow::anyhow!("coordinator {addr} refused the token: {}", s.message());
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::InvalidArgument
                ) {
                    break;
                }
            }
        }
    }
    Err(last)
}

/// A new certificate for the same name and role, from the first coordinator in
/// `addrs` that answers.
pub async fn renew(tls: &Tls, addrs: &[String]) -> anyhow::Result<Credentials> {
    let mut last = anyhow::anyhow!("no coordinator to renew with");
    for addr in addrs {
        let ch = match crate::connect(addr, tls, COORDINATOR_NAME).await {
            Ok(c) => c,
            Err(e) => {
                last = e.into();
                continue;
            }
        };
        let mut r = Request::new(RenewRequest {});
        r.set_timeout(Duration::from_secs(10));
        match TrustClient::new(ch).renew(r).await {
            Ok(c) => return Ok(c.into_inner()),
            Err(s) => last = anyhow::anyhow!("coordinator {addr}: {}", s.message()),
        }
    }
    Err(last)
}

/// Whether a certificate has used two thirds of its life since it was issued
/// (time to renew). Its validity starts [`crate::ca::SKEW`] before issue, which
/// does not count: a 30 s certificate is renewed after 20 s, not at once.
pub fn due(id: &Identity) -> bool {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    due_at(id, now)
}

fn due_at(id: &Identity, now: i64) -> bool {
    let issued = (id.not_before + crate::ca::SKEW.as_secs() as i64).min(id.not_after);
    let life = (id.not_after - issued).max(1);
    now >= issued + life * 2 / 3
}

/// Credentials as a bundle.
pub fn bundle_of(c: &Credentials) -> Bundle {
    Bundle {
        coordinators: c.coordinators.clone(),
        cert_pem: c.cert_pem.clone(),
        key_pem: c.key_pem.clone(),
        ca_pem: c.ca_pem.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssp_model::CertRole;

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_life_since_issue() {
        let ca = crate::Ca::generate("t").unwrap();
        let id = ca
            .issue("a", CertRole::Agent, false, Duration::from_secs(30))
            .unwrap()
            .identity;
        let issued = id.not_after - 30;
        assert!(!due_at(&id, issued));
        assert!(!due_at(&id, issued + 19));
        assert!(due_at(&id, issued + 20));
        assert!(due_at(&id, id.not_after + 1));
    }
}
