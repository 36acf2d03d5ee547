//! Who is calling, from their certificate, and what they may do.
//!
//! The handshake has already refused certificates that are missing, from
//! another CA, expired or revoked (`ssp-net`); here the caller's identity is
//! read from the connection and checked against the revoked serials again (a
//! connection opened before a revocation stays open), and each RPC names the
//! roles it admits. A follower forwarding a request to the leader speaks with
//! its own coordinator certificate and names the original caller in
//! `ssp-on-behalf-of`, which is believed only from a coordinator.

use std::sync::Arc;

use crate::{Identity, Peer, Tls};
use ssp_model::CertRole;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

/// The original caller of a forwarded request.
pub const ON_BEHALF: &str = "ssp-on-behalf-of";

/// `serial:role:t|c:name` (name last: it may contain colons).
pub fn encode(id: &Identity) -> String {
    format!(
        "{}:{}:{}:{}:{}",
        id.serial,
        id.role,
        if id.token { "t" } else { "c" },
        id.not_after,
        id.name
    )
}

/// Reads what [`encode`] wrote; `None` for anything else.
pub fn decode(s: &str) -> Option<Identity> {
    let mut it = s.splitn(5, ':');
    let serial = it.next()?.to_string();
    let role = CertRole::parse(it.next()?).ok()?;
    let token = match it.next()? {
        "t" => true,
        "c" => false,
        _ => return None,
    };
    let not_after = it.next()?.parse().ok()?;
    let name = it.next()?.to_string();
    if serial.is_empty() || name.is_empty() {
        return None;
    }
    Some(Identity {
        name,
        role,
        token,
        serial,
        not_before: 0,
        not_after,
    })
}

/// The caller of a request: from the connection's certificate, or, when a
/// coordinator forwarded it, the identity it names.
pub fn caller_of(
    tls: &Tls,
    ext: &tonic::Extensions,
    md: &MetadataMap,
) -> Result<Arc<Identity>, Status> {
    let peer = ext
        .get::<Peer>()
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    let mut id = peer.identity.clone();
    if id.role == CertRole::Coordinator && !id.token {
        if let Some(v) = md.get(ON_BEHALF) {
            let named = v
                .to_str()
                .ok()
                .and_then(decode)
                .ok_or_else(|| Status::invalid_argument(format!("malformed {ON_BEHALF}")))?;
            id = Arc::new(named);
        }
    }
    if tls.is_revoked(&peer.identity.serial) || tls.is_revoked(&id.serial) {
        return Err(Status::unauthenticated(format!(
            "certificate {} ({}) is revoked",
            id.serial,
            id.label()
        )));
    }
    Ok(id)
}

/// The caller of `req`.
pub fn caller<T>(tls: &Tls, req: &Request<T>) -> Result<Arc<Identity>, Status> {
    caller_of(tls, req.extensions(), req.metadata())
}

/// Refuses a caller whose role is not in `roles` (and every join token).
pub fn require(id: &Identity, roles: &[CertRole], what: &str) -> Result<(), Status> {
    if !id.token && roles.contains(&id.role) {
        return Ok(());
    }
    Err(denied(id, what))
}

/// The refusal for `id` doing `what`.
pub fn denied(id: &Identity, what: &str) -> Status {
    Status::permission_denied(format!(
        "{} may not {what}",
        if id.token {
            format!("a join token ({})", id.name)
        } else {
            id.label()
        }
    ))
}

/// An interceptor admitting only `roles` (for services where every call needs the
/// same role: raft between coordinators, agents driven by coordinators).
pub fn only(
    tls: Tls,
    roles: &'static [CertRole],
    what: &'static str,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let id = caller(&tls, &req)?;
        require(&id, roles, what)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_survives_forwarding_and_garbage_does_not_pass() {
        let id = Identity {
            name: "http://10.0.0.1:7400".into(),
            role: CertRole::Coordinator,
            token: false,
            serial: "0abc".into(),
            not_before: 0,
            not_after: 99,
        };
        assert_eq!(decode(&encode(&id)), Some(id));
        for bad in [
            "",
            "x",
            "01:root:c:1:n",
            "01:user:x:1:n",
            "01:user:c:1:",
            ":user:c:1:n",
        ] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
