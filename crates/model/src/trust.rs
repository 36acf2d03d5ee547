//! The replicated record of trust: join tokens and the certificates the cluster
//! CA issued, with their revocation. Certificates themselves are made outside
//! the state machine (signing is not deterministic); what every replica must
//! agree on — a token used once, a serial refused — lives here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::CertRole;
use crate::Rejection;

/// Tokens and certificates, keyed by token id and serial (lower-case hex).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    pub tokens: BTreeMap<String, Token>,
    pub certs: BTreeMap<String, CertRecord>,
}

/// A join token: exchanged once, before `expires`, for a certificate in `role`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub role: CertRole,
    /// The name the certificate will carry, when the token fixes it (users, admins).
    pub name: Option<String>,
    /// Seconds since the Unix epoch.
    pub expires: i64,
    pub used: bool,
}

/// A certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub name: String,
    pub role: CertRole,
    pub not_after: i64,
    /// When it was revoked (seconds since the Unix epoch), if it was.
    pub revoked: Option<i64>,
}

/// Trust commands; `now` is the proposer's clock, so replicas agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrustCommand {
    CreateToken {
        id: String,
        role: CertRole,
        name: Option<String>,
        expires: i64,
        now: i64,
    },
    UseToken {
        id: String,
        now: i64,
    },
    RecordCert {
        serial: String,
        record: CertRecord,
        now: i64,
    },
    /// Revokes one certificate (by serial) or every current one of a name.
    Revoke {
        serial_or_name: String,
        now: i64,
    },
}

/// What a trust command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrustOutcome {
    TokenCreated,
    TokenUsed {
        role: CertRole,
        name: Option<String>,
    },
    CertRecorded,
    Revoked {
        serials: Vec<String>,
    },
}

impl Trust {
    /// Serials refused from now on (until they expire anyway).
    pub fn revoked(&self) -> impl Iterator<Item = &String> {
        self.certs
            .iter()
            .filter(|(_, c)| c.revoked.is_some())
            .map(|(s, _)| s)
    }

    /// Whether `serial` is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.certs.get(serial).is_some_and(|c| c.revoked.is_some())
    }

    /// Drops tokens and certificates past their end: they are refused anyway
    /// (the handshake checks validity), and the record stays bounded.
    fn prune(&mut self, now: i64) {
        self.tokens.retain(|_, t| t.expires > now);
        self.certs.retain(|_, c| c.not_after > now);
    }

    pub fn apply(&mut self, cmd: &TrustCommand) -> Result<TrustOutcome, Rejection> {
        match cmd {
            TrustCommand::CreateToken {
                id,
                role,
                name,
                expires,
                now,
            } => {
                self.prune(*now);
                if self.tokens.contains_key(id) {
                    return Err(Rejection::Trust(format!("token {id} exists already")));
                }
                self.tokens.insert(
                    id.clone(),
                    Token {
                        role: *role,
                        name: name.clone(),
                        expires: *expires,
                        used: false,
                    },
                );
                Ok(TrustOutcome::TokenCreated)
            }
            TrustCommand::UseToken { id, now } => {
                let t = self.tokens.get_mut(id).ok_or_else(|| {
                    Rejection::Trust(format!("token {id} is unknown to this cluster"))
                })?;
                if t.used {
                    return Err(Rejection::Trust(format!(
                        "token {id} was used already; a token works once"
                    )));
                }
                if t.expires <= *now {
                    return Err(Rejection::Trust(format!("token {id} has expired")));
                }
                t.used = true;
                Ok(TrustOutcome::TokenUsed {
                    role: t.role,
                    name: t.name.clone(),
                })
            }
            TrustCommand::RecordCert {
                serial,
                record,
                now,
            } => {
                self.prune(*now);
                // A serial is recorded once; recording it again changes nothing
                // (and never clears a revocation).
                self.certs
                    .entry(serial.clone())
                    .or_insert_with(|| record.clone());
                Ok(TrustOutcome::CertRecorded)
            }
            TrustCommand::Revoke {
                serial_or_name,
                now,
            } => {
                let mut serials = Vec::new();
                for (s, c) in self.certs.iter_mut() {
                    if (s == serial_or_name || c.name == *serial_or_name) && c.revoked.is_none() {
                        c.revoked = Some(*now);
                        serials.push(s.clone());
                    }
                }
                if serials.is_empty() && !self.certs.contains_key(serial_or_name) {
                    return Err(Rejection::Trust(format!(
                        "no current certificate has serial or name {serial_or_name:?}; `sspctl cert list` shows them"
                    )));
                }
                Ok(TrustOutcome::Revoked { serials })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, not_after: i64) -> CertRecord {
        CertRecord {
            name: name.into(),
            role: CertRole::User,
            not_after,
            revoked: None,
        }
    }

    #[test]
    fn a_token_works_once_and_not_after_it_expires() {
        let mut t = Trust::default();
        let create = |id: &str, expires| TrustCommand::CreateToken {
            id: id.into(),
            role: CertRole::Agent,
            name: None,
            expires,
            now: 0,
        };
        t.apply(&create("a", 100)).unwrap();
        t.apply(&create("b", 100)).unwrap();
        assert!(t.apply(&create("a", 100)).is_err());
        let used = t.apply(&TrustCommand::UseToken {
            id: "a".into(),
            now: 50,
        });
        assert_eq!(
            used,
            Ok(TrustOutcome::TokenUsed {
                role: CertRole::Agent,
                name: None
            })
        );
        let again = t.apply(&TrustCommand::UseToken {
            id: "a".into(),
            now: 51,
        });
        assert!(again.unwrap_err().to_string().contains("used already"));
        let late = t.apply(&TrustCommand::UseToken {
            id: "b".into(),
            now: 100,
        });
        assert!(late.unwrap_err().to_string().contains("expired"));
        let unknown = t.apply(&TrustCommand::UseToken {
            id: "z".into(),
            now: 1,
        });
        assert!(unknown.is_err());
    }

    #[test]
    fn revoking_a_name_revokes_its_current_certificates_and_expired_ones_go() {
        let mut t = Trust::default();
        for (serial, name, end) in [
            ("01", "alice", 100),
            ("02", "alice", 200),
            ("03", "bob", 200),
        ] {
            t.apply(&TrustCommand::RecordCert {
                serial: serial.into(),
                record: rec(name, end),
                now: 0,
            })
            .unwrap();
        }
        let r = t
            .apply(&TrustCommand::Revoke {
                serial_or_name: "alice".into(),
                now: 10,
            })
            .unwrap();
        assert_eq!(
            r,
            TrustOutcome::Revoked {
                serials: vec!["01".into(), "02".into()]
            }
        );
        assert!(t.is_revoked("01") && t.is_revoked("02") && !t.is_revoked("03"));
        // Recording the same serial again does not lift the revocation.
        t.apply(&TrustCommand::RecordCert {
            serial: "02".into(),
            record: rec("alice", 200),
            now: 20,
        })
        .unwrap();
        assert!(t.is_revoked("02"));
        assert!(t
            .apply(&TrustCommand::Revoke {
                serial_or_name: "nobody".into(),
                now: 10
            })
            .is_err());
        // Past its end a certificate is dropped from the record.
        t.apply(&TrustCommand::RecordCert {
            serial: "04".into(),
            record: rec("carol", 500),
            now: 150,
        })
        .unwrap();
        assert!(!t.certs.contains_key("01"));
        assert_eq!(t.revoked().count(), 1);
    }
}
