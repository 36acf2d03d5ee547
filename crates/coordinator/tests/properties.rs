//! Property tests of what reaches the coordinator from outside: client requests
//! (parsed into commands), raft messages and log entries from peers (JSON), and
//! the protobuf messages themselves.
//!
//! Bounded so they run as ordinary tests: a fixed number of cases per property and
//! a fixed seed, no failure files. `PROPTEST_CASES=100000` or `PROPTEST_RNG_SEED=N`
//! in the environment run longer or other cases locally.

use std::collections::BTreeSet;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    StoredMembership, Vote,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, RngSeed};
use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use ssp_coordinator::config::CoordinatorConfig;
use ssp_coordinator::raft::{Batch, Machine, NodeId, Request, TypeConfig};
use ssp_coordinator::request;
use ssp_model::{ByteSize, Command, InputError, ShareMode, State};
use ssp_proto as pb;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5350_0002),
        max_shrink_iters: 4096,
        ..Config::default()
    }
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M alice@lab";

// ---------- strings ----------

const TRICKY: &[char] = &[
    'a',
    'z',
    'A',
    'Z',
    '0',
    '9',
    '-',
    '_',
    '.',
    ':',
    '/',
    '[',
    ']',
    '@',
    '=',
    '%',
    ',',
    ';',
    '\'',
    '"',
    '\\',
    ' ',
    '\t',
    '\n',
    '\r',
    '\0',
    '\x1b',
    '\x7f',
    '\u{85}',
    '\u{2028}',
    '\u{202e}',
    '\u{212a}',
    'é',
    '\u{1f600}',
];

fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![3 => select(TRICKY), 1 => any::<char>()]
}

fn messy() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => vec(tricky_char(), 0..40).prop_map(|v| v.into_iter().collect()),
        2 => any::<String>(),
        1 => (vec(tricky_char(), 1..8), 1..3000usize)
            .prop_map(|(v, n)| v.into_iter().collect::<String>().repeat(n)),
    ]
}

/// A valid example with a few characters inserted, removed or replaced.
fn mutated(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        select(valid),
        vec((any::<Index>(), 0..3u8, tricky_char()), 0..4),
    )
        .prop_map(|(s, edits)| {
            let mut c: Vec<char> = s.chars().collect();
            for (i, op, ch) in edits {
                let n = c.len();
                match op {
                    0 => c.insert(i.index(n + 1), ch),
                    1 if n > 0 => {
                        c.remove(i.index(n));
                    }
                    _ if n > 0 => c[i.index(n)] = ch,
                    _ => {}
                }
            }
            c.into_iter().collect()
        })
}

/// Valid examples (often as they are), near misses, and anything.
fn text(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(valid).prop_map(String::from),
        2 => mutated(valid),
        1 => messy(),
    ]
}

/// A field of a request: valid in 19 of 20 cases, so that most requests pass and
/// a refused one usually has one thing wrong; else a known bad value, a near miss
/// or anything.
fn field(valid: &'static [&'static str], bad: &'static [&'static str]) -> BoxedStrategy<String> {
    let wrong = prop_oneof![select(bad).prop_map(String::from), mutated(valid), messy()];
    prop_oneof![19 => select(valid).prop_map(String::from), 1 => wrong].boxed()
}

/// A number field: mostly from `valid`, else an edge value.
fn num32(valid: std::ops::RangeInclusive<u32>) -> BoxedStrategy<u32> {
    prop_oneof![19 => valid, 1 => u32_edge()].boxed()
}

fn num64(valid: &'static [u64]) -> BoxedStrategy<u64> {
    prop_oneof![19 => select(valid), 1 => u64_edge()].boxed()
}

fn u32_edge() -> impl Strategy<Value = u32> {
    prop_oneof![
        select(&[0u32, 1, 2, 8, 64, 65, 22000, 65535, 65536, u32::MAX][..]),
        any::<u32>(),
    ]
}

fn u64_edge() -> impl Strategy<Value = u64> {
    prop_oneof![
        select(
            &[
                0u64,
                1,
                (64 << 20) - 1,
                64 << 20,
                256 << 20,
                4 << 30,
                (16 << 30) + 1,
                1 << 40,
                u64::MAX,
            ][..]
        ),
        any::<u64>(),
    ]
}

// ---------- requests ----------

fn cfg(quota: bool) -> CoordinatorConfig {
    let mut text = String::from(
        r#"shared_roots = ["/srv/ssp/shared", "/data"]
           default_shares = ["/srv/ssp/shared/team:/shared"]
        "#,
    );
    if quota {
        text.push_str("[quota]\ngpus = 4\ncpus = 16\nmemory = \"64GiB\"\ndisk = \"1TiB\"\n");
    }
    toml::from_str(&text).unwrap()
}

fn share() -> impl Strategy<Value = pb::SharedFolder> {
    (
        field(
            &[
                "/srv/ssp/shared/a",
                "/srv/ssp/shared/team",
                "/data/x/",
                "/data",
            ],
            &["/srv/ssp/shared/../../etc", "/etc", "relative", "/data/x\r"],
        ),
        field(
            &["/a", "/shared", "/home/x/y/", "/b"],
            &["/proc", "/", "/a/../b", "/etc/x", "/a:b"],
        ),
        field(&["", "rw", "ro", "owner"], &["RW", "write"]),
    )
        .prop_map(|(host_path, container_path, mode)| pb::SharedFolder {
            host_path,
            container_path,
            mode,
        })
}

fn add_user_request() -> impl Strategy<Value = pb::AddUserRequest> {
    (
        (
            field(&["alice", "bob-2", "x"], &["root", "Alice", "a_b", ""]),
            prop_oneof![
                19 => vec(field(&[KEY], &["ssh-rsa AAAAB3NzaC1yc2E= x"]), 1..3),
                1 => Just(vec![]),
            ],
            num32(0..=4),
            prop::option::of(num32(1..=16)),
            num64(&[0, 1 << 30, 64 << 30]),
            num64(&[0, 10 << 30, 1 << 40]),
        ),
        (
            field(&["", "debian-ssh", "images/debian_12"], &["../x", "-x"]),
            prop_oneof![4 => Just(vec![]), 1 => vec(share(), 1..4)],
            any::<bool>(),
            field(&["", "user", "admin"], &["root"]),
            any::<bool>(),
        ),
        (
            field(
                &["", "", "", "A100", " a100 ", "H100 80GB"],
                &["A100; rm -rf /"],
            ),
            num64(&[0, 0, 0, 40 << 30]),
            field(&["", "", "h1", "gpu-1"], &["Host_1"]),
            any::<bool>(),
            vec(field(&["ib", " ib ", "rack=a3"], &["IB!", ""]), 0..3),
        ),
        (
            field(&["", "", "", "cs"], &["a;b", "Root"]),
            any::<bool>(),
            field(&["", "", "forward", "lan"], &["LAN", "bridge"]),
            field(&["", "", "lab"], &["Lab!", " "]),
        ),
    )
        .prop_map(
            |(
                (name, ssh_keys, gpus, cpus, memory_bytes, disk_bytes),
                (image, shares, no_default_shares, role, no_wait),
                (gpu_model, gpu_memory_bytes, host, spread, labels),
                (common, common_server, network, lan),
            )| pb::AddUserRequest {
                name,
                ssh_keys,
                gpus,
                cpus,
                memory_bytes,
                disk_bytes,
                image,
                shares,
                no_default_shares,
                role,
                no_wait,
                gpu_model,
                gpu_memory_bytes,
                host,
                spread,
                labels,
                common,
                common_server,
                network,
                lan,
                desktop: common_server,
            },
        )
}

fn inventory() -> impl Strategy<Value = pb::HostInventory> {
    (
        (messy(), num32(1..=64), num64(&[1 << 30, 1 << 40])),
        vec(
            (messy(), text(&["btrfs", "dir"]), u64_edge(), u64_edge()),
            0..3,
        ),
        vec(
            (
                u32_edge(),
                field(
                    &["0000:17:00.0", "3b:00.0", "00000000:AF:1F.7"],
                    &["0000:17:20.0", "1:2:3:4.0"],
                ),
                text(&["NVIDIA A100", "Test GPU"]),
                u64_edge(),
            ),
            0..4,
        ),
        vec(
            (
                text(&["A1B2C3D4E5F60718293A4B5C6D7E8F90", "ffff"]),
                vec(text(&["debian-ssh", "other"]), 0..3),
            ),
            0..3,
        ),
        any::<bool>(),
    )
        .prop_map(
            |((hostname, cpus, memory_bytes), pools, gpus, images, images_reported)| {
                pb::HostInventory {
                    hostname,
                    cpus,
                    memory_bytes,
                    pools: pools
                        .into_iter()
                        .map(|(name, driver, total_bytes, used_bytes)| pb::StoragePool {
                            name,
                            driver,
                            total_bytes,
                            used_bytes,
                            ssp: used_bytes % 2 == 0,
                        })
                        .collect(),
                    gpus: gpus
                        .into_iter()
                        .map(|(index, pci_address, model, memory_bytes)| pb::Gpu {
                            index,
                            uuid: format!("GPU-{index}"),
                            pci_address,
                            model,
                            memory_bytes,
                            minor: index,
                            device_node: format!("/dev/nvidia{index}"),
                        })
                        .collect(),
                    gpu_source: "static".into(),
                    daemon: "incus".into(),
                    daemon_version: "6.0".into(),
                    driver_version: String::new(),
                    images: images
                        .into_iter()
                        .map(|(fingerprint, aliases)| pb::Image {
                            fingerprint,
                            aliases,
                        })
                        .collect(),
                    images_reported,
                }
            },
        )
}

fn register_host_request() -> impl Strategy<Value = pb::RegisterHostRequest> {
    (
        field(&["h1", "gpu-1"], &["Host_1", "-h"]),
        field(
            &[
                "http://10.0.0.5:7401",
                "http://[fd00::5]:7401",
                "http://gpu1:7401",
            ],
            &["http://10.0.0.5:7401/x", "10.0.0.5:7401"],
        ),
        field(
            &["10.0.0.5", "fd00::5", "gpu1.lab.example"],
            &["10.0.0.5\n ProxyCommand x", "a b"],
        ),
        (num32(22000..=22010), num32(22005..=22020)),
        prop::option::of(inventory()),
        vec(field(&["ib", "rack=a3"], &["IB!"]), 0..3),
        vec(prop_oneof![3 => 21990u32..22030, 1 => u32_edge()], 0..6),
    )
        .prop_map(
            |(name, agent_address, ssh_host, (first, last), inventory, labels, foreign_ports)| {
                pb::RegisterHostRequest {
                    name,
                    agent_address,
                    ssh_host,
                    ssh_port_first: first,
                    ssh_port_last: last,
                    inventory,
                    labels,
                    foreign_ports,
                    lan: String::new(),
                    relay_key: String::new(),
                    rdp_port_first: 0,
                    rdp_port_last: 0,
                    warnings: vec![],
                }
            },
        )
}

/// What every refusal must be: it names what was wrong, and its echo of the input
/// is bounded (it becomes a gRPC status message).
fn check_error(e: &InputError) -> Result<(), TestCaseError> {
    prop_assert!(!e.what.is_empty() && !e.reason.is_empty(), "{:?}", e);
    prop_assert!(
        e.value.chars().count() <= InputError::MAX_ECHO,
        "unbounded echo in {:?}",
        e
    );
    prop_assert!(e.to_string().len() < 4096);
    Ok(())
}

/// A command survives the trip through the raft log: JSON out and back.
fn survives_the_log(cmd: &Command) -> Result<(), TestCaseError> {
    let req = Request {
        id: Some("c1-1".into()),
        cmd: cmd.clone(),
        actor: Some(ssp_coordinator::raft::Actor {
            label: "admin:root".into(),
            serial: "0a1b".into(),
            at_ms: 1,
        }),
    };
    let bytes = serde_json::to_vec(&Batch(vec![req.clone()])).unwrap();
    let back: Batch = serde_json::from_slice(&bytes).unwrap();
    prop_assert_eq!(back, Batch(vec![req]));
    Ok(())
}

/// A state with one host that takes anything ordinary.
fn a_state() -> State {
    let mut s = State::default();
    let r = pb::RegisterHostRequest {
        name: "h1".into(),
        agent_address: "http://10.0.0.5:7401".into(),
        ssh_host: "10.0.0.5".into(),
        ssh_port_first: 22000,
        ssh_port_last: 22009,
        inventory: Some(pb::HostInventory {
            cpus: 64,
            memory_bytes: 1 << 40,
            gpus: (0..4)
                .map(|i| pb::Gpu {
                    index: i,
                    pci_address: format!("0000:{:02x}:00.0", 0x17 + i),
                    model: "NVIDIA A100".into(),
                    memory_bytes: 80 << 30,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        labels: vec!["ib".into()],
        ..Default::default()
    };
    s.apply(&request::register_host(&r).unwrap()).unwrap();
    s
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn add_user_requests_give_a_checked_command_or_a_clear_error(
        req in add_user_request(),
        quota in any::<bool>(),
    ) {
        let c = cfg(quota);
        match request::add_user(&req, &c) {
            Ok(cmd) => {
                let Command::AddUser(u) = &cmd else {
                    return Err(TestCaseError::fail(format!("not AddUser: {cmd:?}")));
                };
                prop_assert_eq!(u.name.as_str(), req.name.as_str());
                match &u.kind {
                    // A Common-Server has no keys; an account names its server and
                    // asks for nothing of its own.
                    ssp_model::UserKind::Common => {
                        prop_assert!(req.common_server && req.common.is_empty() && u.ssh_keys.is_empty());
                    }
                    ssp_model::UserKind::Account { server } => {
                        prop_assert!(!req.common_server && server.as_str() == req.common);
                        prop_assert!(req.gpus == 0 && req.cpus.is_none() && req.image.is_empty());
                        prop_assert!(!u.ssh_keys.is_empty());
                    }
                    ssp_model::UserKind::Personal => {
                        prop_assert!(!req.common_server && req.common.is_empty());
                        prop_assert!(!u.ssh_keys.is_empty() && u.ssh_keys.len() == req.ssh_keys.len());
                    }
                }
                prop_assert_eq!(u.limits.cpus, req.cpus.unwrap_or(2));
                prop_assert!(u.limits.cpus >= 1);
                let (mem, disk) = (u.limits.memory.0, u.limits.disk.0);
                prop_assert_eq!(mem, if req.memory_bytes == 0 { 4 << 30 } else { req.memory_bytes });
                prop_assert_eq!(disk, if req.disk_bytes == 0 { 20 << 30 } else { req.disk_bytes });
                prop_assert!(mem >= 64 << 20 && disk >= 256 << 20);
                prop_assert!(u.gpus == req.gpus && u.gpus <= 64);
                if quota && u.kind != ssp_model::UserKind::Common {
                    prop_assert!(u.gpus <= 4 && u.limits.cpus <= 16 && mem <= 64 << 30 && disk <= 1 << 40);
                }
                let paths: BTreeSet<&str> = u.shares.iter().map(|s| s.container_path.as_str()).collect();
                prop_assert_eq!(paths.len(), u.shares.len(), "two shares at one path");
                prop_assert!(u.shares.windows(2).all(|w| w[0] < w[1]));
                for s in &u.shares {
                    prop_assert!(s.host_path.starts_with("/srv/ssp/shared") || s.host_path.starts_with("/data"));
                    prop_assert!(!s.host_path.chars().chain(s.container_path.chars()).any(char::is_control));
                }
                if !req.no_default_shares {
                    prop_assert!(u.shares.iter().any(|s| s.host_path == "/srv/ssp/shared/team" && s.container_path == "/shared"));
                }
                match req.image.as_str() {
                    "" if req.desktop => prop_assert_eq!(u.image.as_str(), "debian-desktop"),
                    "" => prop_assert_eq!(u.image.as_str(), "debian-ssh"),
                    i => prop_assert_eq!(u.image.as_str(), i),
                }
                if u.placement.gpu_model.is_some() || u.placement.gpu_memory.is_some() {
                    prop_assert!(u.gpus >= 1);
                }
                let l = &u.placement.labels;
                prop_assert!(l.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(l.iter().all(|l| ssp_model::parse_label(l).is_ok()));
                survives_the_log(&cmd)?;
                let _ = a_state().apply(&cmd);
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn registrations_give_a_checked_host_or_a_clear_error(req in register_host_request()) {
        match request::register_host(&req) {
            Ok(cmd) => {
                let Command::RegisterHost(h) = &cmd else {
                    return Err(TestCaseError::fail(format!("not RegisterHost: {cmd:?}")));
                };
                prop_assert_eq!(h.name.as_str(), req.name.as_str());
                let (first, last) = h.ssh_ports;
                prop_assert!(first >= 1 && first <= last);
                prop_assert_eq!((u32::from(first), u32::from(last)), (req.ssh_port_first, req.ssh_port_last));
                let fp = &h.foreign_ports;
                prop_assert!(fp.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(fp.iter().all(|p| (first..=last).contains(p)));
                // Use is kept in steps: a few writes in a container change no record.
                let wire = req.inventory.as_ref().map(|i| i.pools.clone()).unwrap_or_default();
                prop_assert_eq!(h.inventory.pools.len(), wire.len());
                for (p, w) in h.inventory.pools.iter().zip(&wire) {
                    let step = ssp_model::Pool::USE_STEP.max(p.total_bytes / 256);
                    prop_assert!(p.used_bytes >= w.used_bytes);
                    prop_assert!(p.used_bytes % step == 0 || p.used_bytes == p.total_bytes || p.used_bytes == w.used_bytes);
                    prop_assert!(p.used_bytes - w.used_bytes < step);
                }
                if let Some(images) = &h.inventory.images {
                    prop_assert!(images.windows(2).all(|w| w[0] < w[1]));
                    for i in images {
                        prop_assert!(!i.fingerprint.chars().any(|c| c.is_ascii_uppercase()));
                        prop_assert!(i.aliases.windows(2).all(|w| w[0] < w[1]));
                    }
                }
                // What reaches users' ssh_config and the coordinator's dialer.
                for s in [h.ssh_host.as_str(), h.agent_address.as_str()] {
                    prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || ".:-/[]".contains(c)), "{:?}", s);
                }
                survives_the_log(&cmd)?;
                let mut s = a_state();
                let _ = s.apply(&cmd);
                // Placement on what was registered does not panic either.
                let add = request::add_user(&pb::AddUserRequest {
                    name: "zed".into(),
                    ssh_keys: vec![KEY.into()],
                    gpus: 1,
                    host: h.name.to_string(),
                    ..Default::default()
                }, &cfg(false)).unwrap();
                let _ = s.apply(&add);
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn key_replacements_give_a_checked_command_or_a_clear_error(
        name in text(&["alice", "root", "Alice"]),
        keys in vec(text(&[KEY]), 0..4),
    ) {
        let req = pb::SetSshKeysRequest { name, ssh_keys: keys };
        match request::set_ssh_keys(&req) {
            Ok(cmd) => {
                let Command::SetSshKeys { name, keys } = &cmd else {
                    return Err(TestCaseError::fail(format!("not SetSshKeys: {cmd:?}")));
                };
                prop_assert_eq!(name, &req.name);
                prop_assert!(!keys.is_empty() && keys.len() == req.ssh_keys.len());
                prop_assert!(keys.iter().all(|k| !k.as_str().chars().any(char::is_control)));
                survives_the_log(&cmd)?;
                let _ = a_state().apply(&cmd);
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn host_status_words_parse_or_are_refused(s in text(&["ready", "draining", "down", "Ready"])) {
        // SetHostStatus takes its status through this parser.
        match ssp_model::HostStatus::parse(&s) {
            Ok(st) => prop_assert_eq!(st.as_str(), s.as_str()),
            Err(e) => check_error(&e)?,
        }
        let _ = ShareMode::parse(&s);
    }
}

// ---------- JSON from peers and the log ----------

/// A request the parser accepts (mostly; the rest are filtered out).
fn valid_add_user() -> impl Strategy<Value = Command> {
    (
        select(&["alice", "bob-2", "x"][..]),
        vec(Just(KEY.to_string()), 1..3),
        0u32..3,
        prop::option::of(1u32..9),
        select(&[0u64, 1 << 30, 8 << 30][..]),
        select(&["", "debian-ssh", "a1b2c3d4e5f6"][..]),
        any::<bool>(),
        vec(select(&["ib", "rack=a3"][..]), 0..2),
    )
        .prop_map(
            |(name, ssh_keys, gpus, cpus, memory_bytes, image, spread, labels)| {
                pb::AddUserRequest {
                    name: name.into(),
                    ssh_keys,
                    gpus,
                    cpus,
                    memory_bytes,
                    image: image.into(),
                    spread,
                    labels: labels.into_iter().map(String::from).collect(),
                    shares: vec![pb::SharedFolder {
                        host_path: "/data/x".into(),
                        container_path: "/x".into(),
                        mode: "ro".into(),
                    }],
                    ..Default::default()
                }
            },
        )
        .prop_filter_map("refused", |r| request::add_user(&r, &cfg(false)).ok())
}

fn valid_register_host() -> impl Strategy<Value = Command> {
    (
        select(&["h1", "h2"][..]),
        (1u32..=65535, 0u32..10),
        prop::option::of(inventory()),
        vec(select(&["ib", "rack=a3"][..]), 0..2),
        vec(u32_edge(), 0..4),
    )
        .prop_map(
            |(name, (first, n), inventory, labels, foreign_ports)| pb::RegisterHostRequest {
                name: name.into(),
                agent_address: format!("http://{name}:7401"),
                ssh_host: format!("{name}.lab.example"),
                ssh_port_first: first,
                ssh_port_last: (first + n).min(65535),
                inventory,
                labels: labels.into_iter().map(String::from).collect(),
                foreign_ports,
                lan: String::new(),
                relay_key: String::new(),
                rdp_port_first: 0,
                rdp_port_last: 0,
                warnings: vec![],
            },
        )
        .prop_filter_map("refused", |r| request::register_host(&r).ok())
}

/// Valid commands, as the request parsers make them, plus the others.
fn command() -> impl Strategy<Value = Command> {
    let ok_user = valid_add_user();
    let ok_host = valid_register_host();
    let name = || text(&["alice", "bob-2", "x"]);
    prop_oneof![
        3 => ok_user,
        2 => ok_host,
        1 => (1000u32..20000, 1000u32..20000).prop_map(|(uid_first, uid_last)| {
            Command::Init(ssp_model::Settings { uid_first, uid_last })
        }),
        1 => name().prop_map(|name| Command::RemoveUser { name }),
        1 => name().prop_map(|name| Command::ForgetInstance { name }),
        1 => (name(), select(&["ready", "draining", "down"][..])).prop_map(|(name, st)| {
            Command::SetHostStatus { name, status: ssp_model::HostStatus::parse(st).unwrap() }
        }),
    ]
}

fn batch() -> impl Strategy<Value = Batch> {
    vec(
        (
            prop::option::of("[a-z0-9-]{1,20}"),
            command(),
            prop::option::of(("[a-z]{1,8}:[a-z0-9-]{1,20}", "[0-9a-f]{1,32}", any::<i64>())),
        )
            .prop_map(|(id, cmd, actor)| Request {
                id,
                cmd,
                actor: actor.map(|(label, serial, at_ms)| ssp_coordinator::raft::Actor {
                    label,
                    serial,
                    at_ms,
                }),
            }),
        0..4,
    )
    .prop_map(Batch)
}

fn log_id(term: u64, node: NodeId, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn membership() -> Membership<NodeId, BasicNode> {
    Membership::new(
        vec![BTreeSet::from([1, 2, 3])],
        [1u64, 2, 3, 4]
            .into_iter()
            .map(|n| {
                (
                    n,
                    BasicNode {
                        addr: format!("http://10.0.0.{n}:7400"),
                    },
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
}

fn entries() -> impl Strategy<Value = Vec<Entry<TypeConfig>>> {
    vec(
        prop_oneof![
            3 => batch().prop_map(EntryPayload::Normal),
            1 => Just(EntryPayload::Blank),
            1 => Just(EntryPayload::Membership(membership())),
        ],
        0..4,
    )
    .prop_map(|payloads| {
        payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| Entry {
                log_id: log_id(3, 1, 10 + i as u64),
                payload,
            })
            .collect()
    })
}

fn append_entries() -> impl Strategy<Value = AppendEntriesRequest<TypeConfig>> {
    entries().prop_map(|entries| AppendEntriesRequest {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(log_id(3, 1, 9)),
        entries,
        leader_commit: Some(log_id(2, 2, 8)),
    })
}

/// A snapshot: a machine that applied `cmds`, as the leader sends it.
fn snapshot() -> impl Strategy<Value = Vec<u8>> {
    vec(batch(), 0..3).prop_map(|batches| {
        let mut m = Machine::default();
        for (i, b) in batches.iter().enumerate() {
            for r in &b.0 {
                m.apply_request(i as u64 + 1, r);
            }
        }
        serde_json::to_vec(&m).unwrap()
    })
}

fn install_snapshot() -> impl Strategy<Value = InstallSnapshotRequest<TypeConfig>> {
    (snapshot(), any::<bool>()).prop_map(|(data, done)| InstallSnapshotRequest {
        vote: Vote::new_committed(3, 1),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(3, 1, 40)),
            last_membership: StoredMembership::new(Some(log_id(1, 1, 1)), membership()),
            snapshot_id: "40-1".into(),
        },
        offset: 0,
        data,
        done,
    })
}

/// JSON values that deserializers must judge: edge numbers, wrong types, names
/// that are almost valid, and structures where a scalar is expected.
fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        select(
            &[
                "0",
                "-1",
                "1",
                "65535",
                "65536",
                "4294967295",
                "4294967296",
                "18446744073709551615",
                "18446744073709551616",
                "-9223372036854775808",
                "1.5",
                "1e300",
                "\"\"",
                "\"alice\"",
                "\"root\"",
                "\"h1\"",
                "\"Ready\"",
                "\"ready\"",
                "\"AddUser\"",
                "\"0000:17:00.0\"",
                "\"http://10.0.0.5:7401\"",
                "[]",
                "{}",
                "[1,2]",
                "{\"Init\":{\"uid_first\":0,\"uid_last\":0}}",
                "{\"RemoveUser\":{\"name\":\"alice\"}}",
            ][..]
        )
        .prop_map(|s| serde_json::from_str(s).unwrap()),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        messy().prop_map(Value::String),
    ]
}

/// One change somewhere in a JSON document.
#[derive(Debug, Clone)]
enum JsonEdit {
    Replace(Index, Value),
    Remove(Index),
    Rename(Index, String),
    Duplicate(Index),
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        4 => (any::<Index>(), json_leaf()).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        1 => any::<Index>().prop_map(JsonEdit::Remove),
        1 => (any::<Index>(), text(&["id", "cmd", "name", "Normal", "entries", "x"]))
            .prop_map(|(i, k)| JsonEdit::Rename(i, k)),
        1 => any::<Index>().prop_map(JsonEdit::Duplicate),
    ]
}

/// Every path in `v`, parents before children (the root is the empty path).
fn paths(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                paths(c, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                paths(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn edit_json(mut v: Value, edits: &[JsonEdit]) -> Value {
    for e in edits {
        let mut all = Vec::new();
        paths(&v, String::new(), &mut all);
        let pick = |i: &Index| all[i.index(all.len())].clone();
        match e {
            JsonEdit::Replace(i, new) => {
                if let Some(slot) = v.pointer_mut(&pick(i)) {
                    *slot = new.clone();
                }
            }
            JsonEdit::Remove(i) | JsonEdit::Rename(i, _) | JsonEdit::Duplicate(i) => {
                let p = pick(i);
                let Some((parent, key)) = p.rsplit_once('/') else {
                    continue;
                };
                let key = key.replace("~1", "/").replace("~0", "~");
                match (v.pointer_mut(parent), e) {
                    (Some(Value::Object(m)), JsonEdit::Remove(_)) => {
                        m.remove(&key);
                    }
                    (Some(Value::Object(m)), JsonEdit::Rename(_, to)) => {
                        if let Some(x) = m.remove(&key) {
                            m.insert(to.clone(), x);
                        }
                    }
                    (Some(Value::Array(a)), JsonEdit::Remove(_)) => {
                        if let Ok(k) = key.parse::<usize>() {
                            a.remove(k);
                        }
                    }
                    (Some(Value::Array(a)), JsonEdit::Duplicate(_)) => {
                        if let Ok(k) = key.parse::<usize>() {
                            let x = a[k].clone();
                            a.insert(k, x);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    v
}

/// Edits of raw bytes: what a corrupted or hostile message looks like.
fn edit_bytes(mut b: Vec<u8>, edits: &[(Index, u8, u8)]) -> Vec<u8> {
    for (i, op, byte) in edits {
        let n = b.len();
        match op % 4 {
            0 => b.insert(i.index(n + 1), *byte),
            1 if n > 0 => {
                b.remove(i.index(n));
            }
            2 if n > 0 => b[i.index(n)] = *byte,
            3 => b.truncate(i.index(n + 1)),
            _ => {}
        }
    }
    b
}

fn byte_edits() -> impl Strategy<Value = Vec<(Index, u8, u8)>> {
    vec((any::<Index>(), any::<u8>(), any::<u8>()), 1..6)
}

/// Decoding `bytes` as `T` never panics, and what decodes encodes to itself.
fn decodes<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<Option<T>, TestCaseError> {
    let Ok(v) = serde_json::from_slice::<T>(bytes) else {
        return Ok(None);
    };
    let once = serde_json::to_vec(&v).unwrap();
    let again: T = serde_json::from_slice(&once)
        .map_err(|e| TestCaseError::fail(format!("re-encoding does not decode: {e}")))?;
    prop_assert_eq!(serde_json::to_vec(&again).unwrap(), once);
    Ok(Some(v))
}

/// Applies what a peer's entries carry, as a follower does.
fn apply_entries(entries: &[Entry<TypeConfig>]) -> Result<(), TestCaseError> {
    let mut m = Machine::default();
    for e in entries {
        if let EntryPayload::Normal(b) = &e.payload {
            for r in &b.0 {
                let before = serde_json::to_vec(&m.state).unwrap();
                let reply = m.apply_request(e.log_id.index, r);
                if let ssp_coordinator::raft::Reply::Rejected(_) = reply {
                    prop_assert_eq!(serde_json::to_vec(&m.state).unwrap(), before);
                }
            }
        }
    }
    Ok(())
}

/// Checks every decoder of peer and log data on `bytes`, and applies what decodes.
fn judge(bytes: &[u8]) -> Result<(), TestCaseError> {
    decodes::<Request>(bytes)?;
    if let Some(b) = decodes::<Batch>(bytes)? {
        let e = Entry {
            log_id: log_id(1, 1, 1),
            payload: EntryPayload::Normal(b),
        };
        apply_entries(std::slice::from_ref(&e))?;
    }
    if let Some(e) = decodes::<Entry<TypeConfig>>(bytes)? {
        apply_entries(std::slice::from_ref(&e))?;
    }
    if let Some(a) = decodes::<AppendEntriesRequest<TypeConfig>>(bytes)? {
        apply_entries(&a.entries)?;
    }
    decodes::<VoteRequest<NodeId>>(bytes)?;
    if let Some(s) = decodes::<InstallSnapshotRequest<TypeConfig>>(bytes)? {
        judge_snapshot(&s.data)?;
    }
    judge_snapshot(bytes)
}

/// A snapshot that decodes is a machine that takes the next entry.
fn judge_snapshot(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Some(mut m) = decodes::<Machine>(bytes)? {
        let cmd = Command::RemoveUser {
            name: "alice".into(),
        };
        let before = serde_json::to_vec(&m.state).unwrap();
        if m.state.apply(&cmd).is_err() {
            prop_assert_eq!(serde_json::to_vec(&m.state).unwrap(), before);
        }
    }
    Ok(())
}

fn valid_json() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => batch().prop_map(|b| serde_json::to_vec(&b).unwrap()),
        1 => batch().prop_map(|b| serde_json::to_vec(&b.0.first()).unwrap()),
        2 => append_entries().prop_map(|a| serde_json::to_vec(&a).unwrap()),
        1 => entries().prop_map(|e| serde_json::to_vec(&e.first()).unwrap()),
        1 => install_snapshot().prop_map(|s| serde_json::to_vec(&s).unwrap()),
        1 => snapshot(),
        1 => Just(serde_json::to_vec(&VoteRequest { vote: Vote::new(4, 2), last_log_id: Some(log_id(3, 1, 12)) }).unwrap()),
    ]
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn valid_log_data_decodes_to_itself(bytes in valid_json()) {
        // The unmutated encodings decode: the mutations below start from real data.
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert!(v.is_object() || v.is_array() || v.is_null());
        judge(&bytes)?;
    }

    #[test]
    fn edited_log_data_never_panics_a_decoder(bytes in valid_json(), edits in vec(json_edit(), 1..3)) {
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let edited = serde_json::to_vec(&edit_json(v, &edits)).unwrap();
        judge(&edited)?;
    }

    #[test]
    fn corrupted_log_data_never_panics_a_decoder(bytes in valid_json(), edits in byte_edits()) {
        judge(&edit_bytes(bytes, &edits))?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in prop_oneof![
        vec(any::<u8>(), 0..256),
        messy().prop_map(String::into_bytes),
        // Deep nesting: the decoder's recursion limit, not the stack, must stop it.
        (1..1000usize, select(&["[", "{\"a\":", "{\"Normal\":"][..])).prop_map(|(n, open)| open.repeat(n).into_bytes()),
    ]) {
        judge(&bytes)?;
    }
}

// ---------- protobuf ----------

/// Decoding never panics, and a message that decodes encodes to one that decodes
/// the same.
fn proto_decodes<M: Message + Default + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
) -> Result<Option<M>, TestCaseError> {
    let Ok(m) = M::decode(bytes) else {
        return Ok(None);
    };
    let back = M::decode(m.encode_to_vec().as_slice()).ok();
    prop_assert_eq!(back.as_ref(), Some(&m));
    Ok(Some(m))
}

/// Every message that crosses the network, and the commands made from them.
fn judge_proto(bytes: &[u8]) -> Result<(), TestCaseError> {
    proto_decodes::<pb::RaftMessage>(bytes)?;
    proto_decodes::<pb::InstanceSpec>(bytes)?;
    proto_decodes::<pb::HostInventory>(bytes)?;
    if let Some(r) = proto_decodes::<pb::RegisterHostRequest>(bytes)? {
        match request::register_host(&r) {
            Ok(cmd) => survives_the_log(&cmd)?,
            Err(e) => check_error(&e)?,
        }
    }
    if let Some(r) = proto_decodes::<pb::AddUserRequest>(bytes)? {
        match request::add_user(&r, &cfg(true)) {
            Ok(cmd) => survives_the_log(&cmd)?,
            Err(e) => check_error(&e)?,
        }
    }
    if let Some(r) = proto_decodes::<pb::SetSshKeysRequest>(bytes)? {
        if let Err(e) = request::set_ssh_keys(&r) {
            check_error(&e)?;
        }
    }
    Ok(())
}

fn instance_spec() -> impl Strategy<Value = pb::InstanceSpec> {
    (
        text(&["alice", "x"]),
        u32_edge(),
        vec(text(&[KEY]), 0..3),
        (u32_edge(), u64_edge(), u64_edge(), u32_edge()),
        vec(text(&["0000:17:00.0"]), 0..3),
        vec(share(), 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(
                name,
                uid,
                ssh_keys,
                (cpus, memory_bytes, disk_bytes, processes),
                gpu_pci,
                shares,
                running,
            )| {
                pb::InstanceSpec {
                    name: name.clone(),
                    owner: name,
                    owner_uid: uid,
                    ssh_keys,
                    image: "debian-ssh".into(),
                    cpus,
                    memory_bytes,
                    disk_bytes,
                    processes,
                    gpu_pci,
                    ssh_port: uid % 70000,
                    shares,
                    running,
                    uid_range: "10000-19999".into(),
                    lab_gid: 19999,
                    snapshot_every_secs: u64::from(uid % 3) * 3600,
                    snapshot_keep: uid % 8,
                    common: uid % 4 == 0,
                    accounts: (0..uid % 3)
                        .map(|i| pb::Account {
                            name: format!("a{i}"),
                            uid: 10000 + i,
                            ssh_keys: vec![],
                        })
                        .collect(),
                    network: if uid % 5 == 0 {
                        "lan".into()
                    } else {
                        String::new()
                    },
                    lan_address: if uid % 10 == 0 {
                        format!("192.168.31.{}/24", uid % 200 + 2)
                    } else {
                        String::new()
                    },
                    lan_gateway: String::new(),
                    relay_host: if uid % 3 == 0 {
                        "relay.example.org".into()
                    } else {
                        String::new()
                    },
                    relay_server_port: if uid % 3 == 0 { 22 } else { 0 },
                    desktop: uid % 7 == 0,
                    rdp_port: if uid % 7 == 0 { 23000 + uid % 1000 } else { 0 },
                    relay_kind: if uid % 6 == 0 {
                        "frp".into()
                    } else {
                        String::new()
                    },
                    relay_token: if uid % 6 == 0 {
                        "t0ken".into()
                    } else {
                        String::new()
                    },
                    relay_user: if uid % 3 == 0 {
                        "ssp-relay".into()
                    } else {
                        String::new()
                    },
                    relay_port: if uid % 3 == 0 { 30000 + uid % 1000 } else { 0 },
                    hwaddr: if uid % 5 == 0 {
                        format!("02:73:00:00:{:02x}:{:02x}", uid >> 8 & 0xff, uid & 0xff)
                    } else {
                        String::new()
                    },
                }
            },
        )
}

fn valid_proto() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        add_user_request().prop_map(|m| m.encode_to_vec()),
        register_host_request().prop_map(|m| m.encode_to_vec()),
        instance_spec().prop_map(|m| m.encode_to_vec()),
        (any::<u64>(), vec(any::<u8>(), 0..64)).prop_map(|(target, payload)| pb::RaftMessage {
            target,
            payload
        }
        .encode_to_vec()),
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_a_protobuf_decoder(bytes in prop_oneof![
        vec(any::<u8>(), 0..512),
        // Field headers with every wire type and huge lengths.
        vec(prop_oneof![
            select(&[0x0au8, 0x12, 0x1a, 0x22, 0x2a, 0x32, 0x42, 0x08, 0x10, 0x18, 0x20, 0x0d, 0x09, 0x0b, 0x0c, 0x0f][..]),
            select(&[0xffu8, 0x80, 0x7f, 0x00, 0x01][..]),
            any::<u8>(),
        ], 0..128),
    ]) {
        judge_proto(&bytes)?;
    }

    #[test]
    fn corrupted_protobuf_messages_never_panic_a_decoder(bytes in valid_proto(), edits in byte_edits()) {
        judge_proto(&bytes)?;
        judge_proto(&edit_bytes(bytes, &edits))?;
    }
}

/// `ByteSize` shown to people never names a size other than the one it is.
#[test]
fn a_quota_refusal_shows_the_size_asked_exactly() {
    let mut r = pb::AddUserRequest {
        name: "ann".into(),
        ssh_keys: vec![KEY.into()],
        memory_bytes: (64 << 30) + 1,
        ..Default::default()
    };
    let e = request::add_user(&r, &cfg(true)).unwrap_err();
    assert_eq!(e.value, format!("{}B", (64u64 << 30) + 1), "{e}");
    assert_eq!(ByteSize::parse(&e.value), Ok(ByteSize((64 << 30) + 1)));
    r.memory_bytes = 65 << 30;
    let e = request::add_user(&r, &cfg(true)).unwrap_err();
    assert_eq!(e.value, "65GiB");
}
