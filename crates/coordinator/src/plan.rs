//! The leader's reconcile plan: a pure function from the desired state and what
//! the agents report to the steps that close the gap (per instance, plus the hosts
//! whose members files are stale), plus per-instance backoff.
//! The executor (`Core::reconcile`) runs the steps; each step is idempotent
//! (ensure makes a spec true, delete of a missing instance is a no-op).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ssp_model::{HostStatus, State};
use ssp_proto::InstanceList;
#[cfg(test)]
use ssp_proto::InstanceStatus;

use crate::convert;

/// One step towards the desired state, for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the instance's spec to its host's agent.
    Ensure { name: String, why: &'static str },
    /// Delete it on its host, then forget it.
    Delete { name: String },
}

impl Step {
    pub fn name(&self) -> &str {
        match self {
            Step::Ensure { name, .. } | Step::Delete { name } => name,
        }
    }
}

/// The steps, and what was found that ssp leaves alone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Per host: containers ssp did not create. Reported, never touched.
    pub unmanaged: BTreeMap<String, Vec<String>>,
    /// Per host: ssp containers the state does not place there (a leftover of a
    /// move or an earlier cluster). Reported, never deleted automatically.
    pub stray: BTreeMap<String, Vec<String>>,
    /// Containers the agent reports as failing (crash loop): it is backing off,
    /// so the coordinator does not push.
    pub failing: Vec<String>,
    /// Hosts whose members files do not hold the lab's member list (a user came or
    /// went, or the host missed the last list): they get it with `SetLabMembers`.
    pub members: Vec<String>,
}

/// Plans from `state` and `reports` (host → its agent's list of every container,
/// managed or not, and the hash of its members files). Instances on hosts without
/// a report (down, silent) get no step: they are unavailable, never deleted or
/// moved by the reconciler.
pub fn plan(state: &State, reports: &BTreeMap<String, InstanceList>) -> Plan {
    let mut p = Plan::default();
    let settings = state.settings();
    let members = ssp_wire::members_hash(&convert::lab_members(state.users.values(), &settings));
    for (host, report) in reports {
        let up = state
            .hosts
            .get(host.as_str())
            .is_some_and(|h| h.status != HostStatus::Down);
        if up && report.members_hash != members {
            p.members.push(host.clone());
        }
    }
    for inst in state.instances.values() {
        let Some(report) = reports.get(inst.host.as_str()).map(|r| &r.instances) else {
            continue;
        };
        if state
            .hosts
            .get(inst.host.as_str())
            .is_none_or(|h| h.status == HostStatus::Down)
        {
            continue;
        }
        // A moving container is its move's to act on.
        if state.moving(&inst.name).is_some() {
            continue;
        }
        if inst.deleting {
            p.steps.push(Step::Delete {
                name: inst.name.clone(),
            });
            continue;
        }
        let Some(spec) = convert::spec_of(state, inst) else {
            continue;
        };
        let seen = report.iter().find(|r| r.name == inst.name);
        let why = match seen {
            None => Some("missing"),
            // Someone else's container holds the name: reported below, left alone.
            Some(r) if !r.managed => None,
            Some(r) if !r.failing.is_empty() => {
                p.failing.push(inst.name.clone());
                None
            }
            Some(r) => {
                if r.spec_hash != ssp_wire::spec_hash(&spec) {
                    Some("spec changed")
                } else if r.state() != ssp_proto::RunState::Running {
                    Some("not running")
                } else {
                    None
                }
            }
        };
        if let Some(why) = why {
            p.steps.push(Step::Ensure {
                name: inst.name.clone(),
                why,
            });
        }
    }
    for (host, report) in reports {
        for r in &report.instances {
            let ours = state
                .instances
                .get(&r.name)
                .is_some_and(|i| i.host.as_str() == host)
                || state
                    .moving(&r.name)
                    .is_some_and(|m| m.from.host.as_str() == host || m.to.host.as_str() == host);
            let list = if !r.managed {
                &mut p.unmanaged
            } else if !ours {
                &mut p.stray
            } else {
                continue;
            };
            list.entry(host.clone()).or_default().push(r.name.clone());
        }
    }
    p
}

/// Per-instance retry backoff: after a failed step the instance waits 1 s, then
/// 2, 4, … up to [`Backoff::MAX`], so one broken container does not slow every pass.
#[derive(Default)]
pub struct Backoff {
    map: HashMap<String, (u32, Instant)>,
}

impl Backoff {
    pub const MAX: Duration = Duration::from_secs(60);

    /// True when `name` may be tried at `now`.
    pub fn ready(&self, name: &str, now: Instant) -> bool {
        self.map.get(name).is_none_or(|(_, next)| *next <= now)
    }

    /// Keeps only the names `keep` says yes to.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.map.retain(|n, _| keep(n));
    }

    /// Records a failure; returns how long `name` now waits.
    pub fn failed(&mut self, name: &str, now: Instant) -> Duration {
        let e = self.map.entry(name.to_string()).or_insert((0, now));
        let wait = Duration::from_secs(1u64 << e.0.min(6)).min(Self::MAX);
        e.0 += 1;
        e.1 = now + wait;
        wait
    }

    pub fn succeeded(&mut self, name: &str) {
        self.map.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssp_model::{
        ByteSize, Command, Constraints, Host, HostName, Inventory, Limits, NewUser, Outcome, Pool,
        Role, SshKey, Username,
    };

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M t";

    fn state_with(users: &[&str]) -> State {
        let mut s = State::default();
        s.apply(&Command::Init(ssp_model::Settings {
            uid_first: 10000,
            uid_last: 19999,
        }))
        .unwrap();
        s.apply(&Command::RegisterHost(Host {
            name: HostName::parse("h1").unwrap(),
            agent_address: ssp_model::Endpoint::parse("http://h1:7401").unwrap(),
            ssh_host: ssp_model::NetAddress::parse("h1").unwrap(),
            ssh_ports: (22000, 22099),
            status: Default::default(),
            labels: vec![],
            foreign_ports: vec![],
            lan: None,
            relay_key: None,
            rdp_ports: None,
            warnings: Vec::new(),
            inventory: Inventory {
                images: Some(vec![ssp_model::Image {
                    fingerprint: "0123456789abcdef".repeat(4),
                    aliases: vec!["debian-ssh".into()],
                }]),
                cpus: 64,
                memory_bytes: 512 << 30,
                pools: vec![Pool {
                    name: "default".into(),
                    driver: "btrfs".into(),
                    total_bytes: 1 << 40,
                    used_bytes: 0,
                    ssp: true,
                }],
                ..Default::default()
            },
        }))
        .unwrap();
        for u in users {
            add(&mut s, u, ssp_model::UserKind::Personal);
        }
        s
    }

    fn report(s: &State, name: &str, status: &str) -> InstanceStatus {
        let inst = &s.instances[name];
        let owner = &s.users[inst.owner.as_str()];
        let spec = convert::spec_of(s, inst).unwrap();
        InstanceStatus {
            name: name.into(),
            owner: owner.name.to_string(),
            status: status.into(),
            state: match status {
                "Running" => ssp_proto::RunState::Running,
                "Stopped" => ssp_proto::RunState::Stopped,
                _ => ssp_proto::RunState::Other,
            } as i32,
            managed: true,
            spec_hash: ssp_wire::spec_hash(&spec),
            ..Default::default()
        }
    }

    /// A host's report: `instances`, and members files that match the state.
    fn listed(s: &State, instances: Vec<InstanceStatus>) -> InstanceList {
        InstanceList {
            instances,
            members_hash: ssp_wire::members_hash(&convert::lab_members(
                s.users.values(),
                &s.settings(),
            )),
        }
    }

    #[test]
    fn in_sync_needs_nothing_and_gaps_get_the_right_step() {
        let s = state_with(&["ann", "bob", "cat", "dan"]);
        let mut stale = report(&s, "bob", "Running");
        stale.spec_hash = "0000".into();
        let reports = BTreeMap::from([(
            "h1".to_string(),
            listed(
                &s,
                vec![
                    report(&s, "ann", "Running"),
                    stale,
                    report(&s, "cat", "Stopped"),
                    // dan is missing
                    InstanceStatus {
                        name: "hand-made".into(),
                        managed: false,
                        ..Default::default()
                    },
                    InstanceStatus {
                        name: "old-ssp".into(),
                        managed: true,
                        ..Default::default()
                    },
                ],
            ),
        )]);
        let p = plan(&s, &reports);
        assert_eq!(
            p.steps,
            vec![
                Step::Ensure {
                    name: "bob".into(),
                    why: "spec changed"
                },
                Step::Ensure {
                    name: "cat".into(),
                    why: "not running"
                },
                Step::Ensure {
                    name: "dan".into(),
                    why: "missing"
                },
            ]
        );
        assert_eq!(p.unmanaged["h1"], vec!["hand-made".to_string()]);
        assert_eq!(p.stray["h1"], vec!["old-ssp".to_string()]);
        assert!(p.members.is_empty());
    }

    #[test]
    fn a_new_member_touches_only_their_container_and_every_hosts_members_files() {
        let mut s = state_with(&["ann", "bob"]);
        let before = listed(
            &s,
            vec![report(&s, "ann", "Running"), report(&s, "bob", "Running")],
        );
        let p = plan(&s, &BTreeMap::from([("h1".to_string(), before.clone())]));
        assert_eq!((p.steps.len(), p.members.len()), (0, 0), "{p:?}");
        // cat joins: the others' specs (and hashes) stay as they were; only cat's
        // container is to be made, and the host's members files are stale.
        let more = state_with(&["ann", "bob", "cat"]);
        let p = plan(&more, &BTreeMap::from([("h1".to_string(), before.clone())]));
        assert_eq!(
            p.steps,
            vec![Step::Ensure {
                name: "cat".into(),
                why: "missing"
            }]
        );
        assert_eq!(p.members, vec!["h1".to_string()]);
        // A host that never got a list (or an older agent) reports none.
        let mut none = before.clone();
        none.members_hash.clear();
        let p = plan(&s, &BTreeMap::from([("h1".to_string(), none.clone())]));
        assert_eq!((p.steps.len(), p.members), (0, vec!["h1".to_string()]));
        // A down host gets nothing, not even the list.
        s.apply(&Command::SetHostStatus {
            name: "h1".into(),
            status: HostStatus::Down,
        })
        .unwrap();
        assert_eq!(
            plan(&s, &BTreeMap::from([("h1".to_string(), none)])),
            Plan::default()
        );
    }

    /// Adds `name` of `kind` (a Common-Server without keys).
    fn add(s: &mut State, name: &str, kind: ssp_model::UserKind) {
        let keys = if kind == ssp_model::UserKind::Common {
            vec![]
        } else {
            vec![SshKey::parse(KEY).unwrap()]
        };
        let out = s
            .apply(&Command::AddUser(NewUser {
                name: Username::parse(name).unwrap(),
                role: Role::User,
                ssh_keys: keys,
                limits: Limits {
                    cpus: 1,
                    memory: ByteSize(1 << 30),
                    disk: ByteSize(1 << 30),
                    processes: 100,
                },
                gpus: 0,
                image: "debian-ssh".into(),
                shares: vec![],
                placement: Constraints::default(),
                kind,
                network: Default::default(),
                desktop: false,
            }))
            .unwrap();
        assert!(matches!(out, Outcome::UserAdded { .. }), "{out:?}");
    }

    #[test]
    fn a_new_account_changes_only_its_common_servers_spec() {
        use ssp_model::UserKind;
        let account = || UserKind::Account {
            server: Username::parse("cs").unwrap(),
        };
        let mut s = state_with(&["ann"]);
        add(&mut s, "cs", UserKind::Common);
        add(&mut s, "bob", account());
        let spec = convert::spec_of(&s, &s.instances["cs"]).unwrap();
        assert!(spec.common && spec.ssh_keys.is_empty());
        assert_eq!(
            spec.accounts
                .iter()
                .map(|a| (a.name.as_str(), a.uid))
                .collect::<Vec<_>>(),
            [("bob", 10002)]
        );
        let before = listed(
            &s,
            vec![report(&s, "ann", "Running"), report(&s, "cs", "Running")],
        );
        add(&mut s, "cat", account());
        let p = plan(&s, &BTreeMap::from([("h1".to_string(), before)]));
        assert_eq!(
            p.steps,
            vec![Step::Ensure {
                name: "cs".into(),
                why: "spec changed"
            }]
        );
        assert_eq!(p.members, vec!["h1".to_string()]);
    }

    #[test]
    fn silent_or_down_hosts_get_no_steps_and_failing_is_left_to_the_agent() {
        let mut s = state_with(&["ann", "bob"]);
        // No report from h1: nothing is planned, nothing deleted.
        assert_eq!(plan(&s, &BTreeMap::new()), Plan::default());
        let reports = BTreeMap::from([(
            "h1".to_string(),
            listed(
                &s,
                vec![InstanceStatus {
                    failing: "failing: started 6 times within 60s; next try in 4s".into(),
                    ..report(&s, "ann", "Stopped")
                }],
            ),
        )]);
        let p = plan(&s, &reports);
        assert_eq!(p.failing, vec!["ann".to_string()]);
        assert_eq!(p.steps.len(), 1, "bob is missing: {:?}", p.steps);
        s.apply(&Command::SetHostStatus {
            name: "h1".into(),
            status: HostStatus::Down,
        })
        .unwrap();
        assert!(plan(&s, &reports).steps.is_empty());
    }

    #[test]
    fn a_moving_container_is_left_to_its_move_and_neither_copy_is_stray() {
        let mut s = state_with(&["ann"]);
        let mut h2 = s.hosts["h1"].clone();
        h2.name = HostName::parse("h2").unwrap();
        h2.agent_address = ssp_model::Endpoint::parse("http://h2:7401").unwrap();
        s.apply(&Command::RegisterHost(h2)).unwrap();
        s.apply(&Command::Migrate(ssp_model::MigrationCommand::Begin {
            instance: "ann".into(),
            to: Some(HostName::parse("h2").unwrap()),
            at_ms: 1,
        }))
        .unwrap();
        // Stopped on the source (the move stopped it), a copy on the target: no
        // step would start or delete either, and neither is stray.
        let reports = BTreeMap::from([
            (
                "h1".to_string(),
                listed(&s, vec![report(&s, "ann", "Stopped")]),
            ),
            (
                "h2".to_string(),
                listed(&s, vec![report(&s, "ann", "Stopped")]),
            ),
        ]);
        let p = plan(&s, &reports);
        assert!(p.steps.is_empty(), "{:?}", p.steps);
        assert!(p.stray.is_empty(), "{:?}", p.stray);
    }

    #[test]
    fn a_name_held_by_a_foreign_container_is_left_alone() {
        let s = state_with(&["ann"]);
        let reports = BTreeMap::from([(
            "h1".to_string(),
            listed(
                &s,
                vec![InstanceStatus {
                    name: "ann".into(),
                    managed: false,
                    status: "Running".into(),
                    ..Default::default()
                }],
            ),
        )]);
        let p = plan(&s, &reports);
        assert!(p.steps.is_empty());
        assert_eq!(p.unmanaged["h1"], vec!["ann".to_string()]);
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let t = Instant::now();
        assert!(b.ready("x", t));
        assert_eq!(b.failed("x", t), Duration::from_secs(1));
        assert!(!b.ready("x", t) && b.ready("x", t + Duration::from_secs(1)));
        assert_eq!(b.failed("x", t), Duration::from_secs(2));
        for _ in 0..10 {
            b.failed("x", t);
        }
        assert_eq!(b.failed("x", t), Backoff::MAX);
        assert!(b.ready("y", t));
        b.succeeded("x");
        assert!(b.ready("x", t));
    }
}
