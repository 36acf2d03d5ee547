//! Benchmark: placement decisions per second on a simulated cluster of 1,000 hosts
//! with 8 GPUs each and 10,000 existing instances (pure function, no IO), next to
//! the full scan over every host that it replaces.
//!
//! Run: cargo bench -p ssp-model --bench placement

use std::time::Instant;

use ssp_model::place::{choose, choose_by_scan};
use ssp_model::{
    ByteSize, Command, Constraints, Gpu, Host, HostName, Image, Inventory, Limits, NewUser,
    PciAddress, Pool, Role, Settings, SshKey, State, Username,
};

const HOSTS: u32 = 1000;
const INSTANCES: u32 = 10_000;
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M b";

fn host(i: u32) -> Host {
    Host {
        name: HostName::parse(&format!("gpu{i:04}")).expect("name"),
        agent_address: ssp_model::Endpoint::parse(&format!(
            "http://10.0.{}.{}:7401",
            i / 250,
            i % 250 + 1
        ))
        .expect("valid endpoint"),
        ssh_host: ssp_model::NetAddress::parse(&format!("10.0.{}.{}", i / 250, i % 250 + 1))
            .expect("valid address"),
        ssh_ports: (22000, 22999),
        status: Default::default(),
        labels: vec![],
        foreign_ports: vec![],
        lan: None,
        relay_key: None,
        rdp_ports: None,
        warnings: Vec::new(),
        inventory: Inventory {
            images: Some(vec![Image {
                fingerprint: "0123456789abcdef".repeat(4),
                aliases: vec!["debian-ssh".into()],
            }]),
            cpus: 128,
            memory_bytes: 1 << 40,
            pools: vec![Pool {
                name: "default".into(),
                driver: "btrfs".into(),
                total_bytes: 20 << 40,
                used_bytes: 0,
                ssp: true,
            }],
            gpus: (0..8)
                .map(|g| Gpu {
                    index: g,
                    uuid: format!("GPU-{i}-{g}"),
                    pci: PciAddress::parse(&format!("0000:{:02x}:00.0", 0x17 + g)).expect("pci"),
                    model: "NVIDIA H100 80GB HBM3".into(),
                    memory_bytes: 80 << 30,
                    minor: g,
                    device_node: format!("/dev/nvidia{g}"),
                })
                .collect(),
            ..Default::default()
        },
    }
}

fn limits() -> Limits {
    Limits {
        cpus: 4,
        memory: ByteSize(16 << 30),
        disk: ByteSize(50 << 30),
        processes: 4000,
    }
}

fn main() {
    let mut s = State::default();
    s.apply(&Command::Init(Settings {
        uid_first: 10_000,
        uid_last: 99_999,
    }))
    .expect("init");
    for i in 0..HOSTS {
        s.apply(&Command::RegisterHost(host(i))).expect("host");
    }
    let key = SshKey::parse(KEY).expect("key");
    let t = Instant::now();
    for i in 0..INSTANCES {
        let cmd = Command::AddUser(NewUser {
            name: Username::parse(&format!("u{i}")).expect("user"),
            role: Role::User,
            ssh_keys: vec![key.clone()],
            limits: limits(),
            // Half the instances hold a GPU: 5,000 of 8,000 in use.
            gpus: i % 2,
            image: "debian-ssh".into(),
            shares: vec![],
            placement: Constraints {
                spread: i % 3 == 0,
                ..Default::default()
            },
            kind: Default::default(),
            network: Default::default(),
            desktop: false,
        });
        s.apply(&cmd).expect("add");
    }
    let setup = t.elapsed();
    let asks: Vec<(u32, Constraints)> = (0..64)
        .map(|k| {
            (
                [1, 2, 4, 0][k % 4],
                Constraints {
                    spread: k % 3 == 0,
                    ..Default::default()
                },
            )
        })
        .collect();
    // A refusal explains itself host by host, so it scans; timed on its own.
    let too_big = Constraints::default();
    let l = limits();
    let rounds = 200_000;
    let t = Instant::now();
    let mut placed = 0u64;
    for r in 0..rounds {
        let (g, c) = &asks[r % asks.len()];
        placed += choose(&s, &l, *g, "debian-ssh", c).is_ok() as u64;
    }
    let fast = rounds as f64 / t.elapsed().as_secs_f64();
    let scan_rounds = 500;
    let t = Instant::now();
    for r in 0..scan_rounds {
        let (g, c) = &asks[r % asks.len()];
        placed += choose_by_scan(&s, &l, *g, "debian-ssh", c).is_ok() as u64;
    }
    let scan = scan_rounds as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let refusals = 200;
    for _ in 0..refusals {
        placed += choose(&s, &l, 9, "debian-ssh", &too_big).is_ok() as u64;
    }
    let refused = refusals as f64 / t.elapsed().as_secs_f64();
    println!(
        "placement: {HOSTS} hosts x 8 GPUs, {INSTANCES} instances (built by apply in {:.2}s): {fast:.0} decisions/s indexed (target >= 100000), {scan:.0}/s by scanning every host, ratio {:.0}x; refusals (9 GPUs, explained per host) {refused:.0}/s ({placed} placements found)",
        setup.as_secs_f64(),
        fast / scan
    );
}
