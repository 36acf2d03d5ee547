//! The replicated coordinator under faults: three (or four) real ssp-coordinator
//! processes, each in its own network namespace, killed with real signals, cut
//! off by taking their links down, paused with SIGSTOP.
//!
//! Replay one fault schedule: `SSP_FAULT_SEEDS=7 cargo test -p ssp-integration --test cluster fault`.

use std::time::{Duration, Instant};

use ssp_integration::cluster::{check, paper_host, workload, Coordinators, Event, Outcome, Rng};

fn seeds() -> Vec<u64> {
    std::env::var("SSP_FAULT_SEEDS")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn register_hosts(c: &Coordinators) {
    let client = c.client().expect("client");
    for (name, gpus) in [("gpu1", 64), ("gpu2", 64), ("gpu3", 64)] {
        let o = c.rt.block_on(client.register_host(paper_host(name, gpus)));
        assert_eq!(o, Outcome::Ok, "registering {name}\n{}", c.logs());
    }
}

/// Runs the workload on its own thread while `during` runs here; returns the history.
fn under_load(
    c: &mut Coordinators,
    prefix: &str,
    ops: usize,
    seed: u64,
    pace: Duration,
    during: impl FnOnce(&mut Coordinators, &dyn Fn() -> bool),
) -> Vec<Event> {
    let client = c.client().expect("client");
    let prefix = prefix.to_string();
    let handle = std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(workload(client, &prefix, ops, 12, seed, pace))
    });
    let done = || handle.is_finished();
    during(c, &done);
    handle.join().expect("workload thread")
}

#[test]
fn fault_schedule_loses_nothing() {
    for seed in seeds() {
        let mut c = Coordinators::start(&format!("fault{seed}"), 60 + (seed % 60) as u8, 3, 200)
            .expect("three coordinators");
        register_hosts(&c);
        let started = Instant::now();
        let mut faults: Vec<String> = Vec::new();
        let history = under_load(
            &mut c,
            &format!("s{seed}"),
            300,
            seed,
            Duration::from_millis(600),
            |c, done| {
                let mut rng = Rng::new(seed);
                while !done() {
                    std::thread::sleep(Duration::from_millis(rng.range(200, 700)));
                    let t = started.elapsed().as_secs_f64();
                    let Some(leader) = c.leader() else { continue };
                    let follower = (leader + 1 + rng.range(0, 2) as usize) % 3;
                    let hold = Duration::from_millis(rng.range(300, 1500));
                    match rng.range(0, 4) {
                        0 => {
                            faults.push(format!(
                                "{t:.1}s kill -9 leader n{} for {hold:?}",
                                leader + 1
                            ));
                            c.kill(leader);
                            std::thread::sleep(hold);
                            c.start_node(leader).expect("restart");
                        }
                        1 => {
                            faults.push(format!(
                                "{t:.1}s cut leader n{}'s link for {hold:?}",
                                leader + 1
                            ));
                            c.cut(leader).expect("cut");
                            std::thread::sleep(hold);
                            c.heal(leader).expect("heal");
                        }
                        2 => {
                            faults.push(format!("{t:.1}s restart follower n{}", follower + 1));
                            c.kill(follower);
                            c.start_node(follower).expect("restart");
                        }
                        _ => {
                            let who = rng.range(0, 3) as usize;
                            faults.push(format!("{t:.1}s SIGSTOP n{} for {hold:?}", who + 1));
                            c.pause(who);
                            std::thread::sleep(hold);
                            c.resume(who);
                        }
                    }
                }
            },
        );
        c.heal_all().expect("heal");
        let machine = c
            .wait_identical(&[0, 1, 2], Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\nfaults: {faults:#?}"));
        let report = check(&history, &machine)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\nfaults: {faults:#?}"));
        println!(
            "seed {seed}: {} ops in {:.1}s: {} acknowledged, {} refused, {} without answer; {} users in the end; identical on 3 replicas; {} faults:\n  {}",
            history.len(),
            started.elapsed().as_secs_f64(),
            report.acked,
            report.rejected,
            report.unknown,
            report.users,
            faults.len(),
            faults.join("\n  ")
        );
        assert!(
            report.acked > history.len() / 2,
            "seed {seed}: too few writes succeeded: {report:?}"
        );
        assert!(!faults.is_empty(), "seed {seed}: no fault ran");
    }
}

#[test]
fn writes_resume_after_the_leader_is_killed() {
    let mut c = Coordinators::start("failover", 121, 3, 1000).expect("three coordinators");
    register_hosts(&c);
    let mut client = c.client().expect("client");
    client.attempt_timeout = Duration::from_millis(300);
    let (o, _) = c.rt.block_on(client.add_user("before", "before", 0));
    assert_eq!(o, Outcome::Ok);
    let leader = c.wait_leader(Duration::from_secs(10)).expect("leader");
    let t = Instant::now();
    c.kill(leader);
    let (o, _) = c.rt.block_on(client.add_user("after", "after", 1));
    let took = t.elapsed();
    assert_eq!(o, Outcome::Ok, "{}", c.logs());
    println!(
        "failover: a write was acknowledged {:.0} ms after kill -9 of the leader",
        took.as_secs_f64() * 1000.0
    );
    c.start_node(leader).expect("restart");
    let m = c
        .wait_identical(&[0, 1, 2], Duration::from_secs(30))
        .expect("replicas agree");
    let users = m["state"]["users"].as_object().expect("users");
    assert!(users.contains_key("before") && users.contains_key("after"));
}

#[test]
fn wiped_member_rejoins_and_membership_changes_under_load_lose_nothing() {
    let mut c = Coordinators::start("members", 122, 3, 10).expect("three coordinators");
    register_hosts(&c);
    // Enough log entries (writes are paced, so batches stay small) that the log is
    // compacted: a wiped node must catch up from a snapshot.
    let first = under_load(&mut c, "a", 150, 11, Duration::from_millis(50), |_, _| {});
    let leader = c.wait_leader(Duration::from_secs(10)).expect("leader");
    let victim = (leader + 1) % 3;
    c.wipe(victim).expect("wipe");
    c.start_node(victim).expect("start empty");
    c.join(victim).expect("rejoin the wiped coordinator");
    c.wait_identical(&[0, 1, 2], Duration::from_secs(60))
        .expect("the wiped coordinator caught up");
    let log = std::fs::read_to_string(&c.nodes[victim].log).unwrap_or_default();
    assert!(
        log.contains("installed snapshot"),
        "the wiped coordinator should catch up from a snapshot:\n{}",
        c.logs()
    );
    let status = c.ctl(&["-o", "json", "cluster", "status"]).expect("status");
    let st: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(
        st["members"].as_array().map(|m| m.len()),
        Some(3),
        "the wiped node's old identity is replaced: {status}"
    );

    // A fourth coordinator joins, and a follower leaves, while clients write.
    let mut leaving = 0;
    let second = under_load(&mut c, "b", 300, 12, Duration::from_millis(200), |c, _| {
        std::thread::sleep(Duration::from_millis(300));
        let fourth = c.add_node(false).expect("fourth node");
        c.join(fourth).expect("join under load");
        let leader = c.wait_leader(Duration::from_secs(10)).expect("leader");
        leaving = (0..3).find(|i| *i != leader).expect("a follower");
        c.leave(leaving).expect("leave under load");
    });
    let remaining: Vec<usize> = (0..4).filter(|i| *i != leaving).collect();
    let machine = c
        .wait_identical(&remaining, Duration::from_secs(60))
        .expect("remaining replicas agree");
    let mut history = first;
    history.extend(second);
    let report = check(&history, &machine).expect("nothing lost");
    println!("membership: {report:?}");
    let status = c.ctl(&["-o", "json", "cluster", "status"]).expect("status");
    let st: serde_json::Value = serde_json::from_str(&status).expect("json");
    let addrs: Vec<&str> = st["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["address"].as_str())
        .collect();
    assert_eq!(addrs.len(), 3, "{status}");
    assert!(!addrs.contains(&c.nodes[leaving].addr.as_str()), "{status}");
}

#[test]
fn killing_all_at_once_loses_no_acknowledged_write() {
    let mut c = Coordinators::start("allkill", 123, 3, 100).expect("three coordinators");
    register_hosts(&c);
    let history = under_load(
        &mut c,
        "k",
        200,
        5,
        Duration::from_millis(100),
        |c, done| {
            // Kill all three in the middle of the stream, then start all three.
            std::thread::sleep(Duration::from_millis(800));
            if !done() {
                for i in 0..3 {
                    c.kill(i);
                }
                for i in 0..3 {
                    c.start_node(i).expect("start");
                }
            }
        },
    );
    let machine = c
        .wait_identical(&[0, 1, 2], Duration::from_secs(60))
        .expect("replicas agree after restart");
    let report = check(&history, &machine).expect("nothing lost");
    println!("kill all: {report:?}");
    assert!(report.acked > 0);
}

#[test]
fn a_follower_serves_current_reads_and_says_when_a_read_is_local() {
    let mut c = Coordinators::start("reads", 125, 3, 1000).expect("three coordinators");
    register_hosts(&c);
    let leader = c.wait_leader(Duration::from_secs(10)).expect("leader");
    let follower = (leader + 1) % 3;
    let ssp = c.ssp.clone();
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
    let ctl_at =
        move |node: usize, args: &[&str]| ssp_integration::sspctl(&ssp, &addrs[node], args);
    let key = c.scratch_file("k.pub", ssp_integration::cluster::TEST_KEY);
    let out = ctl_at(
        follower,
        &["user", "add", "rita", "--ssh-key", &key, "--no-wait"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Straight after the write, a read at the follower already sees it (read index).
    let out = ctl_at(follower, &["-o", "json", "user", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let users: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        users
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["name"] == "rita")),
        "{users}"
    );
    assert!(
        !stderr.contains("served locally"),
        "a current read should not be marked local: {stderr}"
    );
    // A stale read is answered locally and says so.
    let out = ctl_at(follower, &["--stale", "user", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("served locally by coordinator"), "{stderr}");
    // With the other two down there is no quorum: current reads fail with a reason,
    // local reads still answer.
    for i in 0..3 {
        if i != follower {
            c.kill(i);
        }
    }
    let out = ctl_at(follower, &["--stale", "-o", "json", "user", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = ctl_at(follower, &["--stale", "-o", "json", "cluster", "status"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status json");
    assert_eq!(st["members"].as_array().map(|m| m.len()), Some(3), "{st}");
    for k in ["term", "commit_index", "applied_index", "last_log_index"] {
        assert!(st[k].as_u64().is_some(), "status lacks {k}: {st}");
    }
}
