//! Table tests of the state machine and placement.

use super::*;
use crate::migration::Phase;
use crate::names::{ByteSize, HostName, PciAddress, SshKey, Username};
use crate::types::{Constraints, Gpu, HostStatus, Inventory, Limits, Pool, Role};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M t";

fn host(name: &str, gpus: u32) -> Host {
    Host {
        name: HostName::parse(name).unwrap(),
        agent_address: crate::Endpoint::parse(&format!("http://{name}:7401")).unwrap(),
        ssh_host: crate::NetAddress::parse(name).unwrap(),
        ssh_ports: (22000, 22003),
        status: Default::default(),
        labels: vec![],
        foreign_ports: vec![],
        lan: None,
        relay_key: None,
        rdp_ports: None,
        warnings: Vec::new(),
        inventory: Inventory {
            images: Some(vec![image(
                "a1b2c3d4e5f60718293a4b5c6d7e8f90",
                &["debian-ssh"],
            )]),
            cpus: 8,
            memory_bytes: 32 << 30,
            pools: vec![Pool {
                name: "default".into(),
                driver: "btrfs".into(),
                total_bytes: 100 << 30,
                used_bytes: 0,
                ssp: true,
            }],
            gpus: (0..gpus)
                .map(|i| Gpu {
                    index: i,
                    uuid: format!("GPU-{name}-{i}"),
                    pci: PciAddress::parse(&format!("0000:{:02x}:00.0", 0x17 + i)).unwrap(),
                    model: "Test GPU".into(),
                    memory_bytes: 24 << 30,
                    minor: i,
                    device_node: format!("/dev/nvidia{i}"),
                })
                .collect(),
            ..Default::default()
        },
    }
}

fn image(fingerprint: &str, aliases: &[&str]) -> crate::types::Image {
    crate::types::Image {
        fingerprint: fingerprint.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
    }
}

fn user(name: &str, gpus: u32) -> Command {
    Command::AddUser(NewUser {
        name: Username::parse(name).unwrap(),
        role: Role::User,
        ssh_keys: vec![SshKey::parse(KEY).unwrap()],
        limits: Limits {
            cpus: 2,
            memory: ByteSize(4 << 30),
            disk: ByteSize(10 << 30),
            processes: 1000,
        },
        gpus,
        image: "debian-ssh".into(),
        shares: vec![],
        placement: Constraints::default(),
        kind: crate::types::UserKind::Personal,
        network: Default::default(),
        desktop: false,
    })
}

fn user_with(name: &str, gpus: u32, placement: Constraints) -> Command {
    let Command::AddUser(mut u) = user(name, gpus) else {
        unreachable!()
    };
    u.placement = placement;
    Command::AddUser(u)
}

fn state_with(hosts: &[(&str, u32)]) -> State {
    let mut s = State::default();
    s.apply(&Command::Init(Settings::default())).unwrap();
    for (h, g) in hosts {
        s.apply(&Command::RegisterHost(host(h, *g))).unwrap();
    }
    s
}

#[test]
fn add_user_allocates_lowest_free_gpus_port_and_uid() {
    let mut s = state_with(&[("host1", 4)]);
    let Outcome::UserAdded {
        user: u,
        instance: i,
    } = s.apply(&user("alice", 2)).unwrap()
    else {
        panic!()
    };
    assert_eq!(u.uid, 10000);
    assert_eq!(i.ssh_port, 22000);
    assert_eq!(
        i.gpus.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        ["0000:17:00.0", "0000:18:00.0"]
    );
    let Outcome::UserAdded {
        user: u,
        instance: i,
    } = s.apply(&user("bob", 1)).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (u.uid, i.ssh_port, i.gpus[0].as_str()),
        (10001, 22001, "0000:19:00.0")
    );
}

#[test]
fn rejections_change_nothing() {
    let mut s = state_with(&[("host1", 4)]);
    s.apply(&user("alice", 2)).unwrap();
    let before = s.clone();
    let cases: Vec<(Command, &str)> = vec![
        (user("alice", 0), "user alice already exists"),
        (
            user("carol", 3),
            "cannot place carol: 3 GPUs asked but only 2 free (host1: 2 free GPUs of 3 asked)",
        ),
        (
            Command::RemoveUser {
                name: "nobody2".into(),
            },
            "user nobody2 does not exist",
        ),
        (
            Command::SetSshKeys {
                name: "nobody2".into(),
                keys: vec![SshKey::parse(KEY).unwrap()],
            },
            "user nobody2 does not exist",
        ),
        (
            Command::SetSshKeys {
                name: "alice".into(),
                keys: vec![],
            },
            "user alice needs at least one ssh key",
        ),
    ];
    for (cmd, want) in cases {
        let err = s.apply(&cmd).unwrap_err().to_string();
        assert_eq!(err, want);
        assert_eq!(s, before, "state changed by a rejected {cmd:?}");
    }
}

#[test]
fn ssh_keys_are_replaced_but_not_for_a_user_being_removed() {
    let mut s = state_with(&[("host1", 4)]);
    s.apply(&user("alice", 1)).unwrap();
    let other = SshKey::parse(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLeYe5H8Ntev0/iPOEvN819Ao5p77eIsyp90LR8fDsY new",
    )
    .unwrap();
    let set = Command::SetSshKeys {
        name: "alice".into(),
        keys: vec![other.clone()],
    };
    assert_eq!(
        s.apply(&set).unwrap(),
        Outcome::SshKeysSet {
            instances: vec!["alice".into()]
        }
    );
    assert_eq!(s.users["alice"].ssh_keys, vec![other]);
    s.apply(&Command::RemoveUser {
        name: "alice".into(),
    })
    .unwrap();
    let before = s.clone();
    assert_eq!(
        s.apply(&set).unwrap_err().to_string(),
        "user alice is being removed"
    );
    assert_eq!(s, before);
}

#[test]
fn limits_beyond_every_host_are_refused_with_the_host_figure() {
    let mut s = state_with(&[("host1", 4)]);
    let Command::AddUser(mut req) = user("alice", 0) else {
        unreachable!()
    };
    req.limits.cpus = 64;
    let err = s.apply(&Command::AddUser(req)).unwrap_err().to_string();
    assert_eq!(err, "cannot place alice: host1: 64 CPUs asked, host has 8");
}

#[test]
fn ports_run_out() {
    let mut s = state_with(&[("host1", 0)]);
    for n in ["a", "b", "c", "d"] {
        s.apply(&user(n, 0)).unwrap();
    }
    let err = s.apply(&user("e", 0)).unwrap_err().to_string();
    assert!(err.contains("all SSH ports 22000-22003 are taken"), "{err}");
}

#[test]
fn pack_prefers_the_fullest_host_that_fits() {
    let mut s = state_with(&[("host1", 4), ("host2", 8)]);
    s.apply(&user("a", 3)).unwrap();
    let Outcome::UserAdded { instance, .. } = s.apply(&user("b", 1)).unwrap() else {
        panic!()
    };
    assert_eq!(instance.host.as_str(), "host1");
    let Outcome::UserAdded { instance, .. } = s.apply(&user("c", 2)).unwrap() else {
        panic!()
    };
    assert_eq!(instance.host.as_str(), "host2");
}

#[test]
fn removal_is_a_state_and_frees_resources_only_when_forgotten() {
    let mut s = state_with(&[("host1", 2)]);
    s.apply(&user("alice", 2)).unwrap();
    let remove = Command::RemoveUser {
        name: "alice".into(),
    };
    s.apply(&remove).unwrap();
    assert!(s.instances["alice"].deleting && s.users.contains_key("alice"));
    // While the container is being deleted its GPUs stay held.
    let err = s.apply(&user("bob", 1)).unwrap_err().to_string();
    assert!(err.contains("only 0 free"), "{err}");
    // Marking twice is harmless; forgetting a live container is refused.
    s.apply(&remove).unwrap();
    let mut t = state_with(&[("host1", 2)]);
    t.apply(&user("carol", 0)).unwrap();
    let forget_carol = Command::ForgetInstance {
        name: "carol".into(),
    };
    assert_eq!(
        t.apply(&forget_carol).unwrap_err().to_string(),
        "container carol is not marked for removal"
    );
    let out = s
        .apply(&Command::ForgetInstance {
            name: "alice".into(),
        })
        .unwrap();
    assert_eq!(out, Outcome::InstanceForgotten { user_removed: true });
    assert!(s.instances.is_empty() && s.users.is_empty());
    let Outcome::UserAdded {
        user: u,
        instance: i,
    } = s.apply(&user("bob", 2)).unwrap()
    else {
        panic!()
    };
    assert_eq!((u.uid, i.ssh_port, i.gpus.len()), (10000, 22000, 2));
}

#[test]
fn apply_is_deterministic() {
    let cmds: Vec<Command> = (0..6).map(|i| user(&format!("u{i}"), i % 3)).collect();
    let run = || {
        let mut s = state_with(&[("host1", 4), ("host2", 4)]);
        let out: Vec<_> = cmds
            .iter()
            .map(|c| s.apply(c).map_err(|e| e.to_string()))
            .collect();
        (s, out)
    };
    assert_eq!(run(), run());
}

#[test]
fn no_hosts() {
    let mut s = state_with(&[]);
    let err = s.apply(&user("alice", 0)).unwrap_err().to_string();
    assert_eq!(
        err,
        "cannot place alice: no hosts are registered; start an agent first"
    );
}

#[test]
fn numbers_find_the_lowest_free_in_a_range() {
    let mut n = Numbers::default();
    assert_eq!(n.lowest_free(10, 12), Some(10));
    for x in [10, 11] {
        n.insert(x);
    }
    assert_eq!(n.lowest_free(10, 12), Some(12));
    n.insert(12);
    assert_eq!(n.lowest_free(10, 12), None);
    assert_eq!(n.lowest_free(5, 12), Some(5));
    n.remove(11);
    assert_eq!(n.lowest_free(10, 12), Some(11));
    n.remove(12);
    n.remove(10);
    assert_eq!(n.lowest_free(10, 12), Some(10));
    // Against a plain scan, over a pseudo-random mix of inserts and removes.
    let mut plain = BTreeSet::new();
    let mut x: u64 = 7;
    for _ in 0..5000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = 100 + (x % 200) as u32;
        if x.is_multiple_of(3) {
            n.remove(v);
            plain.remove(&v);
        } else {
            n.insert(v);
            plain.insert(v);
        }
        let (a, b) = (100 + (x % 50) as u32, 150 + (x % 200) as u32);
        assert_eq!(n.lowest_free(a, b), (a..=b).find(|p| !plain.contains(p)));
    }
}

#[test]
fn the_usage_index_matches_a_rebuild_and_survives_serialization() {
    let mut s = state_with(&[("host1", 4), ("host2", 8)]);
    for (i, g) in [2, 1, 0, 3, 4, 1].iter().enumerate() {
        s.apply(&user(&format!("u{i}"), *g)).unwrap();
    }
    s.apply(&Command::RemoveUser { name: "u1".into() }).unwrap();
    s.apply(&Command::ForgetInstance { name: "u1".into() })
        .unwrap();
    s.apply(&Command::RemoveUser { name: "u3".into() }).unwrap();
    let live = s.usage().cloned().expect("index is current after apply");
    // A replica restored from a snapshot has no index until its next apply,
    // and then places exactly as the live one does.
    let mut restored: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(restored, s);
    assert!(restored.usage().is_none());
    let next = user("late", 1);
    let a = s.apply(&next).unwrap();
    let b = restored.apply(&next).unwrap();
    assert_eq!(a, b);
    let rebuilt = Usage::build(&s.users, &s.instances, &s.hosts, &s.migrations);
    assert_eq!(s.usage(), Some(&rebuilt));
    assert_ne!(Some(&live), s.usage());
    // GPU holders come from the index.
    let Outcome::UserAdded { instance, .. } = a else {
        panic!()
    };
    for g in &instance.gpus {
        assert_eq!(
            s.gpu_holder(instance.host.as_str(), g)
                .map(|i| i.name.as_str()),
            Some("late")
        );
    }
}

fn placed(s: &mut State, cmd: &Command) -> (String, usize) {
    match s.apply(cmd) {
        Ok(Outcome::UserAdded { instance, .. }) => (instance.host.to_string(), instance.gpus.len()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn constraints_pick_model_memory_host_and_spread() {
    let mut s = state_with(&[("host1", 4), ("host2", 4), ("host3", 8)]);
    // host3 has the big GPUs.
    let mut h3 = s.hosts["host3"].clone();
    for g in &mut h3.inventory.gpus {
        g.model = "NVIDIA A100-SXM4-80GB".into();
        g.memory_bytes = 80 << 30;
    }
    s.apply(&Command::RegisterHost(h3)).unwrap();
    let model = |m: &str| Constraints {
        gpu_model: Some(m.into()),
        ..Default::default()
    };
    assert_eq!(
        placed(&mut s, &user_with("a", 2, model("a100"))),
        ("host3".into(), 2)
    );
    let big = Constraints {
        gpu_memory: Some(40 << 30),
        ..Default::default()
    };
    assert_eq!(
        placed(&mut s, &user_with("b", 1, big.clone())),
        ("host3".into(), 1)
    );
    // Pack goes to the fullest host that fits; spread to the emptiest.
    assert_eq!(placed(&mut s, &user("c", 1)), ("host1".into(), 1));
    assert_eq!(placed(&mut s, &user("d", 1)), ("host1".into(), 1));
    let spread = Constraints {
        spread: true,
        ..Default::default()
    };
    assert_eq!(
        placed(&mut s, &user_with("e", 1, spread)),
        ("host3".into(), 1)
    );
    let pin = Constraints {
        host: Some(HostName::parse("host2").unwrap()),
        ..Default::default()
    };
    assert_eq!(placed(&mut s, &user_with("f", 3, pin)), ("host2".into(), 3));
    // Refusals say why, host by host, and change nothing.
    let before = s.clone();
    let e = s.apply(&user_with("g", 5, big)).unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot place g: 5 GPUs asked but only 4 free (host1: 0 free GPUs (40GiB or more) of 5 asked; host2: 0 free GPUs (40GiB or more) of 5 asked; host3: 4 free GPUs (40GiB or more) of 5 asked)"
    );
    let nohost = Constraints {
        host: Some(HostName::parse("host9").unwrap()),
        ..Default::default()
    };
    let e = s.apply(&user_with("h", 1, nohost)).unwrap_err().to_string();
    assert!(
        e.contains("host9: no such host (registered: host1, host2, host3)"),
        "{e}"
    );
    assert_eq!(s, before);
}

#[test]
fn lan_containers_go_to_hosts_on_a_lan_and_keep_it() {
    let mut s = state_with(&[("host1", 4), ("host2", 4), ("host3", 4)]);
    for (h, lan) in [("host2", "annex"), ("host3", "lab")] {
        let mut r = s.hosts[h].clone();
        r.lan = Some(lan.into());
        s.apply(&Command::RegisterHost(r)).unwrap();
    }
    let lan_user = |name: &str, lan: &str| {
        let Command::AddUser(mut u) = user(name, 1) else {
            unreachable!()
        };
        u.network = crate::types::Network::Lan;
        u.placement.lan = Some(lan.into());
        Command::AddUser(u)
    };
    // Any LAN: host1 has none, so host2 (first by name of the rest).
    assert_eq!(placed(&mut s, &lan_user("a", "")), ("host2".into(), 1));
    let a = &s.instances["a"];
    assert_eq!(a.network, crate::types::Network::Lan);
    assert_eq!(
        a.placement.lan.as_deref(),
        Some("annex"),
        "its LAN is recorded"
    );
    assert_eq!(placed(&mut s, &lan_user("b", "lab")), ("host3".into(), 1));
    // A forward container goes anywhere and records no LAN.
    let on_host1 = Constraints {
        host: Some(crate::HostName::parse("host1").unwrap()),
        ..Default::default()
    };
    assert_eq!(placed(&mut s, &user_with("c", 1, on_host1)).0, "host1");
    assert_eq!(s.instances["c"].placement.lan, None);
    assert_eq!(s.instances["c"].network, crate::types::Network::Forward);
    // Changed later: onto host1's LAN refused (it has none), off the LAN and back.
    let before = s.clone();
    let to = |name: &str, network, lan: Option<&str>| Command::SetNetwork {
        name: name.into(),
        network,
        lan: lan.map(String::from),
    };
    let e = s
        .apply(&to("c", crate::types::Network::Lan, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("on no LAN"), "{e}");
    assert_eq!(s, before);
    let e = s
        .apply(&to("b", crate::types::Network::Lan, Some("annex")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("on LAN lab, not annex"), "{e}");
    assert_eq!(s, before);
    s.apply(&to("b", crate::types::Network::Forward, None))
        .unwrap();
    assert_eq!(
        (
            s.instances["b"].network,
            s.instances["b"].placement.lan.clone()
        ),
        (crate::types::Network::Forward, None)
    );
    s.apply(&to("b", crate::types::Network::Lan, Some("lab")))
        .unwrap();
    assert_eq!(s.instances["b"].placement.lan.as_deref(), Some("lab"));
    let before = s.clone();
    let e = s.apply(&lan_user("d", "basement")).unwrap_err().to_string();
    assert!(
        e.contains("host1: on no LAN")
            && e.contains("host2: on LAN annex, not basement")
            && e.contains("host3: on LAN lab, not basement"),
        "{e}"
    );
    assert_eq!(s, before);
}

#[test]
fn labels_restrict_hosts_and_a_refusal_names_the_missing_label() {
    let mut s = state_with(&[("host1", 4), ("host2", 4)]);
    let mut h2 = s.hosts["host2"].clone();
    h2.labels = vec!["ib".into(), "rack=a3".into()];
    s.apply(&Command::RegisterHost(h2)).unwrap();
    let want = |labels: &[&str]| Constraints {
        labels: labels.iter().map(|l| l.to_string()).collect(),
        ..Default::default()
    };
    // Pack alone would pick host1 (first by name); the label sends it to host2.
    assert_eq!(
        placed(&mut s, &user_with("a", 1, want(&["ib"]))),
        ("host2".into(), 1)
    );
    assert_eq!(
        placed(&mut s, &user_with("b", 1, want(&["ib", "rack=a3"]))),
        ("host2".into(), 1)
    );
    let before = s.clone();
    let e = s
        .apply(&user_with("c", 1, want(&["nvlink"])))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("host1: no label nvlink") && e.contains("host2: no label nvlink"),
        "{e}"
    );
    assert_eq!(s, before);
    // The fast path and the full scan agree with labels too.
    let c = want(&["ib"]);
    let limits = Limits {
        cpus: 1,
        memory: ByteSize(1 << 30),
        disk: ByteSize(1 << 30),
        processes: 100,
    };
    assert_eq!(
        crate::place::choose(&s, &limits, 1, "debian-ssh", &c),
        crate::place::choose_by_scan(&s, &limits, 1, "debian-ssh", &c)
    );
}

#[test]
fn draining_and_down_hosts_take_no_new_containers_and_registration_keeps_the_status() {
    let mut s = state_with(&[("host1", 4), ("host2", 4)]);
    let set = |name: &str, st: HostStatus| Command::SetHostStatus {
        name: name.into(),
        status: st,
    };
    s.apply(&set("host1", HostStatus::Draining)).unwrap();
    s.apply(&set("host2", HostStatus::Down)).unwrap();
    // A heartbeat (re-registration) does not undo an admin's or the monitor's status.
    s.apply(&Command::RegisterHost(host("host1", 4))).unwrap();
    assert_eq!(s.hosts["host1"].status, HostStatus::Draining);
    let e = s.apply(&user("a", 1)).unwrap_err().to_string();
    assert_eq!(e, "cannot place a: host1: draining; host2: down");
    s.apply(&set("host2", HostStatus::Ready)).unwrap();
    assert_eq!(placed(&mut s, &user("a", 1)), ("host2".into(), 1));
    assert!(matches!(
        s.apply(&set("host9", HostStatus::Ready)),
        Err(Rejection::UnknownHost(_))
    ));
}

#[test]
fn the_indexed_choice_is_the_scans_choice() {
    let mut x: u64 = 0x5eed;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let hosts: Vec<(String, u32)> = (0..30)
        .map(|i| (format!("h{i:02}"), rnd(9) as u32))
        .collect();
    let refs: Vec<(&str, u32)> = hosts.iter().map(|(n, g)| (n.as_str(), *g)).collect();
    let mut s = state_with(&refs);
    // Some hosts lack the image asked for half the time.
    for (n, _) in hosts.iter().skip(20) {
        let mut h = s.hosts[n].clone();
        h.inventory.images = Some(vec![image(
            "fedcba9876543210fedcba9876543210",
            &["busybox"],
        )]);
        s.apply(&Command::RegisterHost(h)).unwrap();
    }
    for (n, _) in hosts.iter().take(6) {
        let status = [HostStatus::Draining, HostStatus::Down][rnd(2) as usize];
        s.apply(&Command::SetHostStatus {
            name: n.clone(),
            status,
        })
        .unwrap();
    }
    let limits = |cpus: u32| Limits {
        cpus,
        memory: ByteSize(4 << 30),
        disk: ByteSize(10 << 30),
        processes: 1000,
    };
    let mut names: Vec<String> = Vec::new();
    for step in 0..400 {
        for gpus in 0..5 {
            for spread in [false, true] {
                let c = Constraints {
                    spread,
                    ..Default::default()
                };
                let l = limits(1 + rnd(10) as u32);
                let img = ["debian-ssh", "busybox"][rnd(2) as usize];
                assert_eq!(
                    place::choose(&s, &l, gpus, img, &c),
                    place::choose_by_scan(&s, &l, gpus, img, &c),
                    "step {step}, {gpus} GPUs, spread {spread}, image {img}"
                );
            }
        }
        // A host's agent reports other ports in use (hand-made forwards come and go).
        if rnd(4) == 0 {
            let (n, _) = &hosts[rnd(hosts.len() as u64) as usize];
            let mut h = s.hosts[n].clone();
            h.foreign_ports = (22000..=22003).filter(|_| rnd(3) == 0).collect();
            s.apply(&Command::RegisterHost(h)).unwrap();
        }
        match rnd(3) {
            0 if !names.is_empty() => {
                let n = names.swap_remove(rnd(names.len() as u64) as usize);
                s.apply(&Command::RemoveUser { name: n.clone() }).unwrap();
                s.apply(&Command::ForgetInstance { name: n }).unwrap();
            }
            _ => {
                let n = format!("u{step}");
                let mut cmd = user(&n, rnd(4) as u32);
                if let Command::AddUser(u) = &mut cmd {
                    u.placement.spread = rnd(2) == 0;
                }
                if s.apply(&cmd).is_ok() {
                    names.push(n);
                }
            }
        }
    }
}

fn user_image(name: &str, image: &str) -> Command {
    let Command::AddUser(mut u) = user(name, 0) else {
        unreachable!()
    };
    u.image = image.into();
    Command::AddUser(u)
}

#[test]
fn only_hosts_with_the_image_are_chosen_and_a_refusal_names_every_hosts_images() {
    let mut s = State::default();
    s.apply(&Command::Init(Settings::default())).unwrap();
    let mut h1 = host("h1", 0);
    h1.inventory.images = Some(vec![
        image("0123456789abcdef0123456789abcdef", &["debian-ssh"]),
        image("fedcba9876543210fedcba9876543210", &["busybox"]),
    ]);
    let mut h2 = host("h2", 0);
    h2.inventory.images = Some(vec![image(
        "0123456789abcdef0123456789abcdef",
        &["debian-ssh"],
    )]);
    s.apply(&Command::RegisterHost(h1)).unwrap();
    s.apply(&Command::RegisterHost(h2.clone())).unwrap();
    let before = s.clone();
    let e = s
        .apply(&user_image("carol", "no-such-image"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "cannot place carol: no host has image no-such-image (h1: busybox, debian-ssh; h2: debian-ssh)"
    );
    assert_eq!(s, before);
    // Only h1 has busybox: by alias, full fingerprint or a prefix of 12 or more.
    for (n, img) in [
        ("a", "busybox"),
        ("b", "fedcba9876543210fedcba9876543210"),
        ("c", "FEDCBA987654"),
    ] {
        let (h, _) = placed(&mut s, &user_image(n, img));
        assert_eq!(h, "h1", "{img}");
    }
    // A prefix shorter than 12 hex digits names no image.
    let e = s
        .apply(&user_image("d", "fedcba98765"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no host has image fedcba98765"), "{e}");
    assert_eq!(placed(&mut s, &user_image("d", "busybox")).0, "h1");
    // h1 full: the others' reasons say what they lack.
    let e = s
        .apply(&user_image("e", "busybox"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "cannot place e: h1: all SSH ports 22000-22003 are taken; h2: no image busybox"
    );
    // A host that gets the image (a heartbeat with its new image set) takes it.
    h2.inventory
        .images
        .get_or_insert_default()
        .push(image("fedcba9876543210fedcba9876543210", &["busybox"]));
    s.apply(&Command::RegisterHost(h2)).unwrap();
    assert_eq!(placed(&mut s, &user_image("e", "busybox")).0, "h2");
    // --host names a host without it.
    let mut c = user_image("f", "nope-image");
    if let Command::AddUser(u) = &mut c {
        u.placement.host = Some(HostName::parse("h2").unwrap());
    }
    let e = s.apply(&c).unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot place f: no host has image nope-image (h2: busybox, debian-ssh)"
    );
}

#[test]
fn foreign_ports_are_skipped_and_released_when_they_go() {
    let mut s = state_with(&[("host1", 0)]);
    let mut h = host("host1", 0);
    h.foreign_ports = vec![22000, 22002];
    s.apply(&Command::RegisterHost(h.clone())).unwrap();
    let port = |s: &mut State, n: &str| match s.apply(&user(n, 0)).unwrap() {
        Outcome::UserAdded { instance, .. } => instance.ssh_port,
        o => panic!("{o:?}"),
    };
    assert_eq!(port(&mut s, "a"), 22001);
    assert_eq!(port(&mut s, "b"), 22003);
    let e = s.apply(&user("c", 0)).unwrap_err().to_string();
    assert!(e.contains("all SSH ports 22000-22003 are taken"), "{e}");
    // 22000 is free again; 22001, a's, also shows up as foreign (seen in a race):
    // it stays taken while a holds it, and after that while it is foreign.
    h.foreign_ports = vec![22001, 22002];
    s.apply(&Command::RegisterHost(h.clone())).unwrap();
    assert_eq!(
        s.usage(),
        Some(&Usage::build(
            &s.users,
            &s.instances,
            &s.hosts,
            &s.migrations
        ))
    );
    assert_eq!(port(&mut s, "c"), 22000);
    s.apply(&Command::RemoveUser { name: "a".into() }).unwrap();
    s.apply(&Command::ForgetInstance { name: "a".into() })
        .unwrap();
    assert!(s.apply(&user("d", 0)).is_err());
    h.foreign_ports = vec![22002];
    s.apply(&Command::RegisterHost(h.clone())).unwrap();
    assert_eq!(
        s.usage(),
        Some(&Usage::build(
            &s.users,
            &s.instances,
            &s.hosts,
            &s.migrations
        ))
    );
    assert_eq!(port(&mut s, "d"), 22001);
    // A restored replica allocates the same.
    let mut restored: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    h.foreign_ports = vec![];
    s.apply(&Command::RegisterHost(h.clone())).unwrap();
    restored.apply(&Command::RegisterHost(h)).unwrap();
    assert_eq!(port(&mut s, "e"), 22002);
    assert_eq!(port(&mut restored, "e"), 22002);
}

#[test]
fn a_host_record_from_before_images_and_foreign_ports_still_loads() {
    let mut v = serde_json::to_value(host("host1", 1)).unwrap();
    v.as_object_mut().unwrap().remove("foreign_ports");
    v["inventory"].as_object_mut().unwrap().remove("images");
    let h: Host = serde_json::from_value(v).unwrap();
    assert!(h.foreign_ports.is_empty() && h.inventory.images.is_none());
}

#[test]
fn a_host_that_never_reported_images_is_not_checked_so_old_log_entries_replay_the_same() {
    // A log written before agents reported images: replaying its AddUser with
    // today's code must place the user as the code of the time did.
    let mut s = State::default();
    s.apply(&Command::Init(Settings::default())).unwrap();
    let mut old = host("h1", 1);
    old.inventory.images = None;
    s.apply(&Command::RegisterHost(old)).unwrap();
    assert_eq!(placed(&mut s, &user_image("ann", "anything")).0, "h1");
}

fn begin(s: &mut State, name: &str, to: Option<&str>) -> Result<Migration, Rejection> {
    match s.apply(&Command::Migrate(MigrationCommand::Begin {
        instance: name.into(),
        to: to.map(|t| HostName::parse(t).unwrap()),
        at_ms: 1,
    }))? {
        Outcome::Migration(m) => Ok(m),
        o => panic!("unexpected {o:?}"),
    }
}

fn advance(s: &mut State, id: u64, phase: Phase) -> Result<Outcome, Rejection> {
    s.apply(&Command::Migrate(MigrationCommand::Advance {
        id,
        phase,
        note: String::new(),
        at_ms: 2,
        ssh: None,
    }))
}

fn rebuilt(s: &State) -> State {
    serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
}

#[test]
fn a_move_holds_both_sides_until_it_finishes() {
    let mut s = State::default();
    s.apply(&Command::RegisterHost(host("h1", 2))).unwrap();
    s.apply(&Command::RegisterHost(host("h2", 2))).unwrap();
    s.apply(&user("gdw", 2)).unwrap();
    let from = s.instances["gdw"].clone();
    let m = begin(&mut s, "gdw", None).unwrap();
    assert_ne!(m.to.host, from.host, "auto placement picks another host");
    assert_eq!(m.to.gpus.len(), 2);
    // The target's GPUs are held for the move: nobody else gets them.
    let refused = s.apply(&user("bob", 1)).unwrap_err();
    assert!(matches!(refused, Rejection::NoFit { .. }), "{refused}");
    // Replicas rebuilt from a snapshot hold the same.
    assert_eq!(
        place::free_gpus(&rebuilt(&s), &s.hosts[m.to.host.as_str()]),
        vec![]
    );
    // The user cannot be removed mid-move, and a second move is refused.
    assert!(s
        .apply(&Command::RemoveUser { name: "gdw".into() })
        .is_err());
    assert!(begin(&mut s, "gdw", None).is_err());
    // Forward only: no switch before starting, no rollback once started.
    assert!(s
        .apply(&Command::Migrate(MigrationCommand::Switch {
            id: m.id,
            downtime_ms: 1,
            at_ms: 3
        }))
        .is_err());
    advance(&mut s, m.id, Phase::Syncing).unwrap();
    advance(&mut s, m.id, Phase::Starting).unwrap();
    assert!(advance(&mut s, m.id, Phase::RollingBack).is_err());
    s.apply(&Command::Migrate(MigrationCommand::Switch {
        id: m.id,
        downtime_ms: 900,
        at_ms: 3,
    }))
    .unwrap();
    let moved = &s.instances["gdw"];
    assert_eq!(moved.host, m.to.host);
    assert_eq!(moved.gpus, m.to.gpus);
    assert_eq!(moved.ssh_port, m.to.ssh_port);
    // The source copy still exists: its GPUs stay held until it is deleted.
    assert!(place::free_gpus(&s, &s.hosts[from.host.as_str()]).is_empty());
    assert!(place::free_gpus(&rebuilt(&s), &s.hosts[from.host.as_str()]).is_empty());
    s.apply(&Command::Migrate(MigrationCommand::Finish {
        id: m.id,
        at_ms: 4,
    }))
    .unwrap();
    assert_eq!(s.migrations[&m.id].phase, Phase::Done);
    assert_eq!(place::free_gpus(&s, &s.hosts[from.host.as_str()]).len(), 2);
    assert_eq!(rebuilt(&s), s);
    // Bob now fits on the old host.
    s.apply(&user("bob", 1)).unwrap();
    assert_eq!(s.instances["bob"].host, from.host);
}

#[test]
fn a_rolled_back_move_releases_the_target_and_leaves_the_container() {
    let mut s = State::default();
    s.apply(&Command::RegisterHost(host("h1", 1))).unwrap();
    s.apply(&Command::RegisterHost(host("h2", 1))).unwrap();
    s.apply(&user("gdw", 1)).unwrap();
    let before = s.instances["gdw"].clone();
    let m = begin(
        &mut s,
        "gdw",
        Some(if before.host.as_str() == "h1" {
            "h2"
        } else {
            "h1"
        }),
    )
    .unwrap();
    advance(&mut s, m.id, Phase::Syncing).unwrap();
    advance(&mut s, m.id, Phase::RollingBack).unwrap();
    assert!(advance(&mut s, m.id, Phase::Starting).is_err());
    s.apply(&Command::Migrate(MigrationCommand::Finish {
        id: m.id,
        at_ms: 5,
    }))
    .unwrap();
    assert_eq!(s.migrations[&m.id].phase, Phase::Failed);
    assert_eq!(s.instances["gdw"], before);
    assert_eq!(place::free_gpus(&s, &s.hosts[m.to.host.as_str()]).len(), 1);
    // A finished move may be followed by another.
    assert!(begin(&mut s, "gdw", None).is_ok());
}

#[test]
fn a_move_is_refused_with_reasons() {
    let mut s = State::default();
    s.apply(&Command::RegisterHost(host("h1", 2))).unwrap();
    s.apply(&user("gdw", 2)).unwrap();
    let e = begin(&mut s, "gdw", None).unwrap_err().to_string();
    assert!(e.contains("no host other than h1"), "{e}");
    let e = begin(&mut s, "gdw", Some("h1")).unwrap_err().to_string();
    assert!(e.contains("already on h1"), "{e}");
    let e = begin(&mut s, "gdw", Some("nope")).unwrap_err().to_string();
    assert!(e.contains("not registered"), "{e}");
    s.apply(&Command::RegisterHost(host("h2", 1))).unwrap();
    let e = begin(&mut s, "gdw", Some("h2")).unwrap_err().to_string();
    assert!(e.contains("h2: 1 free GPU of 2 asked"), "{e}");
    s.apply(&Command::RegisterHost(host("h3", 2))).unwrap();
    s.apply(&Command::SetHostStatus {
        name: "h3".into(),
        status: HostStatus::Draining,
    })
    .unwrap();
    let e = begin(&mut s, "gdw", None).unwrap_err().to_string();
    assert!(e.contains("h3: draining"), "{e}");
    assert!(s.migrations.is_empty());
}

#[test]
fn resize_changes_user_and_containers_or_nothing() {
    // host1's pool: 100 GiB, 70 GiB used (30 GiB free).
    let mut s = State::default();
    s.apply(&Command::Init(Settings::default())).unwrap();
    let mut h = host("host1", 2);
    h.inventory.pools[0].used_bytes = 70 << 30;
    s.apply(&Command::RegisterHost(h)).unwrap();
    s.apply(&user("alice", 1)).unwrap();
    let resize = |cpus, memory: Option<u64>, disk: Option<u64>| Command::Resize {
        name: "alice".into(),
        cpus,
        memory: memory.map(ByteSize),
        disk: disk.map(ByteSize),
    };
    let before = s.clone();
    for (cmd, says) in [
        (
            resize(Some(9), None, None),
            "9 CPUs asked, host host1 has 8",
        ),
        (
            resize(None, Some(64 << 30), None),
            "memory of 64GiB asked, host host1 has 32GiB",
        ),
        (
            resize(None, None, Some(50 << 30)),
            "a disk of 50GiB asked (40GiB more), pool default on host1 has 30GiB free of 100GiB",
        ),
    ] {
        let err = s.apply(&cmd).unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
        assert_eq!(s, before, "a refused resize changes nothing");
    }
    let unknown = Command::Resize {
        name: "zed".into(),
        cpus: Some(1),
        memory: None,
        disk: None,
    };
    assert_eq!(s.apply(&unknown), Err(Rejection::UnknownUser("zed".into())));
    // 40 GiB (30 more) fits; what is not asked stays.
    let out = s.apply(&resize(Some(4), None, Some(40 << 30))).unwrap();
    assert_eq!(
        out,
        Outcome::Resized {
            instances: vec!["alice".into()]
        }
    );
    let want = Limits {
        cpus: 4,
        memory: ByteSize(4 << 30),
        disk: ByteSize(40 << 30),
        processes: 1000,
    };
    assert_eq!(s.users["alice"].limits, want);
    assert_eq!(s.instances["alice"].limits, want);
    // Shrinking needs no free space.
    s.apply(&resize(None, None, Some(5 << 30))).unwrap();
    assert_eq!(s.instances["alice"].limits.disk, ByteSize(5 << 30));
}

fn with_kind(cmd: Command, kind: crate::types::UserKind) -> Command {
    let Command::AddUser(mut u) = cmd else {
        unreachable!()
    };
    u.kind = kind;
    Command::AddUser(u)
}

fn account(name: &str, server: &str) -> Command {
    with_kind(
        user(name, 0),
        crate::types::UserKind::Account {
            server: Username::parse(server).unwrap(),
        },
    )
}

#[test]
fn a_common_server_holds_gpus_and_its_accounts_hold_only_a_uid() {
    use crate::types::UserKind;
    let mut s = state_with(&[("host1", 4)]);
    let mut common = with_kind(user("cs", 2), UserKind::Common);
    if let Command::AddUser(u) = &mut common {
        u.ssh_keys.clear(); // a Common-Server has no keys of its own
    }
    let Outcome::UserAdded { instance: cs, .. } = s.apply(&common).unwrap() else {
        panic!()
    };
    assert_eq!(cs.gpus.len(), 2);
    let Outcome::UserAdded { user, instance } = s.apply(&account("alice", "cs")).unwrap() else {
        panic!()
    };
    // The account's outcome names the Common-Server's container; no container of its own.
    assert_eq!((user.uid, instance.name.as_str()), (10001, "cs"));
    assert!(!s.instances.contains_key("alice"));
    s.apply(&account("bob", "cs")).unwrap();
    assert_eq!(
        s.accounts_of("cs")
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    assert_eq!(
        s.homes_of("alice")
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["cs"]
    );
    // New keys of an account reach the Common-Server's container.
    let keys = vec![SshKey::parse(KEY).unwrap()];
    assert_eq!(
        s.apply(&Command::SetSshKeys {
            name: "alice".into(),
            keys: keys.clone()
        })
        .unwrap(),
        Outcome::SshKeysSet {
            instances: vec!["cs".into()]
        }
    );

    let before = s.clone();
    let refused: Vec<(Command, &str)> = vec![
        (
            account("carol", "alice"),
            "alice is not a Common-Server; make one with `sspctl common create alice`",
        ),
        (
            Command::RemoveUser { name: "cs".into() },
            "the Common-Server cs still has accounts (alice, bob); remove them first",
        ),
        (
            Command::Resize {
                name: "alice".into(),
                cpus: Some(4),
                memory: None,
                disk: None,
            },
            "alice has an account in the Common-Server cs, not a container of their own; resize cs instead",
        ),
        (
            Command::SetSshKeys {
                name: "cs".into(),
                keys,
            },
            "cs is a Common-Server: it has no keys of its own, its accounts do",
        ),
    ];
    for (cmd, msg) in refused {
        assert_eq!(s.apply(&cmd).unwrap_err().to_string(), msg);
        assert_eq!(s, before);
    }

    // Removing an account is immediate: its uid is free again, and the outcome names
    // the container its account (and home) goes from.
    assert_eq!(
        s.apply(&Command::RemoveUser {
            name: "alice".into()
        })
        .unwrap(),
        Outcome::UserRemoving {
            instances: vec!["cs".into()]
        }
    );
    assert!(!s.users.contains_key("alice"));
    let Outcome::UserAdded { user, .. } = s.apply(&account("dave", "cs")).unwrap() else {
        panic!()
    };
    assert_eq!(user.uid, 10001);
    s.apply(&Command::RemoveUser { name: "bob".into() })
        .unwrap();
    s.apply(&Command::RemoveUser {
        name: "dave".into(),
    })
    .unwrap();
    assert!(matches!(
        s.apply(&Command::RemoveUser { name: "cs".into() }),
        Ok(Outcome::UserRemoving { .. })
    ));
    assert_eq!(
        s.apply(&account("erin", "cs")).unwrap_err(),
        Rejection::UserRemoving("cs".into())
    );
}

fn adopt(name: &str, host: &str, gpus: &[&str], port: Option<u16>) -> Command {
    let Command::AddUser(u) = user(name, 0) else {
        unreachable!()
    };
    Command::Adopt {
        user: u,
        host: host.into(),
        gpus: gpus.iter().map(|g| PciAddress::parse(g).unwrap()).collect(),
        ssh_port: port,
    }
}

#[test]
fn an_adopted_container_holds_what_it_uses_or_is_refused_with_the_conflict() {
    let mut s = state_with(&[("host1", 4)]);
    s.apply(&user("alice", 1)).unwrap(); // 0000:17:00.0, port 22000
    let before = s.clone();
    for (cmd, msg) in [
        (
            adopt("gdw", "host1", &["0000:17:00.0"], Some(22003)),
            "cannot adopt gdw: its GPU 0000:17:00.0 is held by alice",
        ),
        (
            adopt("gdw", "host1", &["0000:99:00.0"], Some(22003)),
            "cannot adopt gdw: GPU 0000:99:00.0 is not in host host1's inventory",
        ),
        (
            adopt("gdw", "host1", &[], Some(22000)),
            "cannot adopt gdw: its SSH port 22000 is held by alice",
        ),
        (
            adopt("gdw", "host1", &[], Some(60601)),
            "cannot adopt gdw: its SSH port 60601 is outside host host1's ssh_ports 22000-22003 (widen ssh_ports in the agent's config, or remove its proxy device and ssp gives it a port)",
        ),
        (adopt("gdw", "nohost", &[], None), "host nohost is not registered"),
        (adopt("alice", "host1", &[], None), "user alice already exists"),
    ] {
        assert_eq!(s.apply(&cmd).unwrap_err().to_string(), msg);
        assert_eq!(s, before);
    }
    let Outcome::UserAdded {
        user: gdw,
        instance,
    } = s
        .apply(&adopt("gdw", "host1", &["0000:19:00.0"], Some(22003)))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!((gdw.uid, gdw.gpus), (10001, 1));
    assert_eq!(
        (
            instance.host.as_str(),
            instance.ssh_port,
            instance.gpus[0].as_str()
        ),
        ("host1", 22003, "0000:19:00.0")
    );
    // What it holds is nobody else's now.
    let Outcome::UserAdded { instance: bob, .. } = s.apply(&user("bob", 2)).unwrap() else {
        panic!()
    };
    assert_eq!(
        bob.gpus.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
        ["0000:18:00.0", "0000:1a:00.0"]
    );
    // Without a proxy of its own, it gets a free port.
    let Outcome::UserAdded { instance: eve, .. } =
        s.apply(&adopt("eve", "host1", &[], None)).unwrap()
    else {
        panic!()
    };
    assert_eq!(eve.ssh_port, 22002);
}

#[test]
fn the_relay_gives_every_container_a_port_of_its_own() {
    let mut s = state_with(&[("host1", 4)]);
    placed(&mut s, &user("a", 0));
    placed(&mut s, &user("b", 0));
    let relay = |first: u16, last: u16| Command::SetRelay {
        relay: Some(crate::types::Relay {
            host: crate::NetAddress::parse("relay.example.org").unwrap(),
            port: 22,
            user: "ssp-relay".into(),
            ports: (first, last),
            kind: Default::default(),
            token: String::new(),
        }),
    };
    // Too small for the containers there are: refused, nothing changes.
    let before = s.clone();
    let e = s.apply(&relay(30000, 30000)).unwrap_err().to_string();
    assert!(e.contains("2 containers need a relay port"), "{e}");
    assert_eq!(s, before);
    s.apply(&relay(30000, 30002)).unwrap();
    assert_eq!(s.instances["a"].relay_port, Some(30000));
    assert_eq!(s.instances["b"].relay_port, Some(30001));
    placed(&mut s, &user("c", 0));
    assert_eq!(s.instances["c"].relay_port, Some(30002));
    // Full: a new user is refused with the reason.
    let e = s.apply(&user("d", 0)).unwrap_err().to_string();
    assert!(e.contains("no free relay port left in 30000-30002"), "{e}");
    // A range that leaves out held ports is refused; a removed user's port is reused.
    let e = s.apply(&relay(30001, 30010)).unwrap_err().to_string();
    assert!(e.contains("a holds 30000"), "{e}");
    s.apply(&Command::RemoveUser { name: "a".into() }).unwrap();
    s.apply(&Command::ForgetInstance { name: "a".into() })
        .unwrap();
    placed(&mut s, &user("d", 0));
    assert_eq!(s.instances["d"].relay_port, Some(30000));
    // No relay, no ports.
    s.apply(&Command::SetRelay { relay: None }).unwrap();
    assert!(s.instances.values().all(|i| i.relay_port.is_none()));
    assert_eq!(s.relay, None);
}

#[test]
fn desktops_go_to_hosts_with_rdp_ports_at_their_ssh_ports_place() {
    let mut s = state_with(&[("host1", 4), ("host2", 4)]);
    let mut h2 = s.hosts["host2"].clone();
    h2.rdp_ports = Some((23000, 23999));
    s.apply(&Command::RegisterHost(h2)).unwrap();
    let Command::AddUser(mut u) = user("a", 0) else {
        unreachable!()
    };
    u.desktop = true;
    u.placement.desktop = true;
    assert_eq!(placed(&mut s, &Command::AddUser(u.clone())).0, "host2");
    let a = &s.instances["a"];
    assert!(a.desktop);
    let h = &s.hosts["host2"];
    assert_eq!(
        h.rdp_port(a.ssh_port),
        Some(23000 + (a.ssh_port - h.ssh_ports.0))
    );
    assert_eq!(h.rdp_port(h.ssh_ports.0.wrapping_sub(1)), None);
    assert_eq!(s.hosts["host1"].rdp_port(a.ssh_port), None);
    // Only host1 is left for one pinned there: refused with the reason.
    u.name = crate::Username::parse("b").unwrap();
    u.placement.host = Some(crate::HostName::parse("host1").unwrap());
    let e = s.apply(&Command::AddUser(u)).unwrap_err().to_string();
    assert!(e.contains("host1: no RDP ports"), "{e}");
}
