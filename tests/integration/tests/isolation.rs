//! Members' containers are apart from each other, and the lab's member list reaches
//! them without touching them.
//!
//! 1. Root in alice's container is none of the other members: her container maps
//!    only her uid (and group) and the lab group's gid, so bob's files in the
//!    shared folder are nobody's there. Root cannot change or delete them, nor make
//!    a file the host gives to bob; the folder's sticky bit keeps every member to
//!    their own files, while a file its writer made group-writable is the lab's to edit.
//! 2. A new member's name resolves in the other containers through the host's
//!    members files, and no other container sees a lifecycle event (no config
//!    change, no exec) when a member comes or goes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ssp_integration::monitor::instance_of;
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Monitor, Platform};

const LAB_GID: u32 = 19999;

fn uid_of(p: &Platform, name: &str) -> Result<u32> {
    let users = p.ctl_json(&["user", "list"])?;
    users
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == name))
        .and_then(|u| u["uid"].as_u64())
        .map(|u| u as u32)
        .with_context(|| format!("no uid for {name} in {users}"))
}

/// Runs `cmd` as root inside `instance` through the daemon; the exit status counts.
fn as_root(host: &Host, instance: &str, cmd: &str) -> Result<Output> {
    host.cli()
        .args(["exec", instance, "--", "sh", "-c", cmd])
        .output()
        .context("incus exec")
}

/// `cmd` as root in `instance` must fail.
fn refused(host: &Host, instance: &str, cmd: &str) -> Result<()> {
    let out = as_root(host, instance, cmd)?;
    ensure!(
        !out.status.success(),
        "root in {instance} could run `{cmd}`: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// `cmd` as root in `instance` must work.
fn allowed(host: &Host, instance: &str, cmd: &str) -> Result<String> {
    let out = as_root(host, instance, cmd)?;
    ensure!(
        out.status.success(),
        "root in {instance} could not run `{cmd}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The host ids an id map (`/proc/self/uid_map` format) gives the container.
fn host_ranges(map: &str) -> Vec<(u32, u32, u32)> {
    map.lines()
        .filter_map(|l| {
            let v: Vec<u32> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect()
}

fn maps_host_id(map: &str, id: u32) -> bool {
    host_ranges(map)
        .iter()
        .any(|&(_, host, n)| (host..host.saturating_add(n)).contains(&id))
}

fn owner_and_group(path: &Path) -> Result<(u32, u32)> {
    let m = std::fs::metadata(path).with_context(|| format!("{} on the host", path.display()))?;
    Ok((m.uid(), m.gid()))
}

#[test]
fn root_in_one_members_container_cannot_act_as_another() -> Result<()> {
    let host = Host::start("is1", Kind::Incus, 65)?;
    let mut p = Platform::start("isolation", &[AgentSpec::new(&host)])?;
    let dir = p.scratch.path().to_path_buf();
    let alice_key = ssh_keypair(&dir, "alice")?;
    let bob_key = ssh_keypair(&dir, "bob")?;
    for (name, key) in [("alice", &alice_key), ("bob", &bob_key)] {
        p.ctl_ok(&[
            "user",
            "add",
            name,
            "--ssh-key",
            &format!("{}.pub", key.display()),
        ])?;
    }
    let alice = p.ssh_login("alice", &alice_key)?;
    let bob = p.ssh_login("bob", &bob_key)?;
    let (a_uid, b_uid) = (uid_of(&p, "alice")?, uid_of(&p, "bob")?);
    let shared = p.shared_root.join("team");

    // The writable shared folder: root:lab, setgid and sticky.
    let m = std::fs::metadata(&shared)?;
    ensure!(
        (m.uid(), m.gid(), m.mode() & 0o7777) == (0, LAB_GID, 0o3775),
        "the shared folder is {}:{} {:o}, expected 0:{LAB_GID} 3775",
        m.uid(),
        m.gid(),
        m.mode() & 0o7777
    );

    // 1. alice's container maps her uid and group and the lab group 1:1, and no
    // range of it reaches bob's host uid.
    let uid_map = allowed(&host, "alice", "cat /proc/self/uid_map")?;
    let gid_map = allowed(&host, "alice", "cat /proc/self/gid_map")?;
    ensure!(
        host_ranges(&uid_map).contains(&(a_uid, a_uid, 1)),
        "alice's uid is not mapped 1:1: {uid_map}"
    );
    ensure!(
        host_ranges(&gid_map).contains(&(a_uid, a_uid, 1))
            && host_ranges(&gid_map).contains(&(LAB_GID, LAB_GID, 1)),
        "alice's group and the lab group are not mapped 1:1: {gid_map}"
    );
    ensure!(
        !maps_host_id(&uid_map, b_uid) && !maps_host_id(&gid_map, b_uid),
        "alice's container maps bob's host id {b_uid}:\n{uid_map}\n{gid_map}"
    );
    ensure!(
        !maps_host_id(&uid_map, 0) && !maps_host_id(&uid_map, 10000 + 5000),
        "alice's container maps a host id it should not:\n{uid_map}"
    );

    // 2. bob's files: one only he writes, one the lab may edit.
    bob.run("umask 022; echo bob > /shared/b644; echo bob > /shared/b664; chmod 664 /shared/b664")?;

    // 3. Root in alice's container, as itself: neither writes, removes, renames,
    // chmods nor chowns bob's file, and cannot even add a file (it is not in the
    // lab group, and the folder's owner is nobody there).
    for cmd in [
        "echo root >> /shared/b644",
        "echo root >> /shared/b664",
        "rm -f /shared/b644",
        "rm -f /shared/b664",
        "mv /shared/b644 /shared/moved",
        "chmod 666 /shared/b644",
        "chown 0 /shared/b644",
        "touch /shared/rootfile",
        "chmod 777 /shared",
    ] {
        refused(&host, "alice", cmd)?;
    }
    // Root taking the lab group: adds files and edits what is group-writable,
    // like any member; bob's other file stays his, and the sticky bit keeps both.
    let lab = format!("setpriv --regid {LAB_GID} --clear-groups sh -c");
    for cmd in [
        "'echo root >> /shared/b644'",
        "'rm -f /shared/b644'",
        "'rm -f /shared/b664'",
        "'mv /shared/b664 /shared/moved'",
    ] {
        refused(&host, "alice", &format!("{lab} {cmd}"))?;
    }
    allowed(
        &host,
        "alice",
        &format!("{lab} 'echo root-edit >> /shared/b664'"),
    )?;
    // Root taking bob's uid inside gets an id of alice's isolated map, not bob's:
    // it cannot change his file, and what it makes is not his on the host.
    let as_bob = format!("setpriv --reuid {b_uid} --regid {LAB_GID} --clear-groups sh -c");
    refused(
        &host,
        "alice",
        &format!("{as_bob} 'echo x >> /shared/b644'"),
    )?;
    allowed(
        &host,
        "alice",
        &format!("{as_bob} 'echo impostor > /shared/impostor'"),
    )?;
    // A chown to bob's uid inside gives the file the same stranger on the host.
    allowed(
        &host,
        "alice",
        &format!("{lab} 'echo r > /shared/chowned' && chown {b_uid} /shared/chowned"),
    )?;
    for f in ["impostor", "chowned"] {
        let (uid, _) = owner_and_group(&shared.join(f))?;
        ensure!(
            uid != b_uid && uid != a_uid && !(10000..=LAB_GID).contains(&uid),
            "{f}, made by root in alice's container as bob's uid, belongs to host uid {uid}"
        );
    }

    // 4. Both members write new files; alice edits bob's group-writable file but
    // neither his other file nor removes either.
    alice.run("echo alice > /shared/a.txt; echo alice-edit >> /shared/b664")?;
    bob.run("echo bob2 > /shared/b2.txt")?;
    ensure!(
        alice.run("echo x >> /shared/b644").is_err(),
        "alice wrote bob's 644 file"
    );
    for f in ["b644", "b664"] {
        ensure!(
            alice.run(&format!("rm -f /shared/{f}")).is_err(),
            "alice removed bob's {f}"
        );
    }
    ensure!(
        bob.run("rm -f /shared/a.txt").is_err(),
        "bob removed alice's file"
    );
    bob.run("cat /shared/a.txt /shared/impostor")?;

    // 5. On the host each file belongs to its writer and the lab group, and bob's
    // files are as he and the lab left them.
    for (f, uid) in [
        ("b644", b_uid),
        ("b664", b_uid),
        ("b2.txt", b_uid),
        ("a.txt", a_uid),
    ] {
        let got = owner_and_group(&shared.join(f))?;
        ensure!(
            got == (uid, LAB_GID),
            "{f} on the host is {got:?}, expected ({uid}, {LAB_GID})"
        );
    }
    ensure!(std::fs::read_to_string(shared.join("b644"))? == "bob\n");
    ensure!(std::fs::read_to_string(shared.join("b664"))? == "bob\nroot-edit\nalice-edit\n");

    // 6. Inside alice's container bob's files are nobody's (his uid is not mapped
    // there), while his name resolves from the host's members files.
    let owner = alice.run("stat -c %U:%G /shared/b644")?;
    ensure!(
        owner.trim() == "nobody:lab",
        "bob's file in alice's container: {owner}"
    );
    let own = alice.run("stat -c %U:%G /shared/a.txt")?;
    ensure!(own.trim() == "alice:lab", "alice's own file: {own}");
    let pw = alice.run("getent passwd bob")?;
    ensure!(
        pw.starts_with(&format!("bob:x:{b_uid}:")),
        "getent passwd bob in alice's container: {pw}"
    );
    let group = alice.run("getent group lab")?;
    let listed: Vec<&str> = group
        .trim()
        .rsplit(':')
        .next()
        .unwrap_or("")
        .split(',')
        .collect();
    ensure!(
        listed.contains(&"alice") && listed.contains(&"bob"),
        "getent group lab in alice's container: {group}"
    );

    // 7. A container that still runs with the whole-range map of earlier versions
    // (as after an upgrade of ssp) is restarted once with its new map, not made
    // again. The agent is stopped while the old map is put in place.
    p.agents[0].signal(libc::SIGKILL);
    host.cli_run(&[
        "config",
        "set",
        "alice",
        "raw.idmap",
        "both 10000-19999 10000-19999",
    ])?;
    host.cli_run(&["restart", "alice"])?;
    let wide = allowed(&host, "alice", "cat /proc/self/uid_map")?;
    ensure!(
        maps_host_id(&wide, b_uid),
        "the old map is not in effect: {wide}"
    );
    let uuid = host.uuid("alice")?;
    p.agents[0].start_again()?;
    wait_for(
        "alice's container to run with her own map again",
        Duration::from_secs(60),
        || {
            let m = as_root(&host, "alice", "cat /proc/self/uid_map").ok()?;
            let m = String::from_utf8_lossy(&m.stdout).to_string();
            (host_ranges(&m).contains(&(a_uid, a_uid, 1)) && !maps_host_id(&m, b_uid)).then_some(())
        },
    )?;
    ensure!(
        host.uuid("alice")? == uuid,
        "alice's container was made again"
    );
    wait_for(
        "alice's login after the restart",
        Duration::from_secs(60),
        || alice.run("test -w /shared").ok(),
    )?;
    Ok(())
}

/// The ssp keys of an instance whose change would mean it was touched.
fn marks(host: &Host, name: &str) -> Result<(String, String, String)> {
    let get = |k: &str| -> Result<String> {
        Ok(host
            .cli_run(&["config", "get", name, k])?
            .trim()
            .to_string())
    };
    Ok((
        get("user.ssp.spec-hash")?,
        get("user.ssp.account")?,
        get("volatile.uuid")?,
    ))
}

/// Lifecycle events since `mark` about any of `names`.
fn events_about(m: &Monitor, mark: usize, names: &[&str]) -> Result<Vec<serde_json::Value>> {
    Ok(m.events_since(mark)?
        .into_iter()
        .filter(|e| instance_of(e).is_some_and(|i| names.contains(&i)))
        .collect())
}

/// Long enough for the agent's resync (5 s here) and a reconcile pass (5 s) to
/// have run after a change, so what they would do to other containers shows.
const SETTLE: Duration = Duration::from_secs(7);

#[test]
fn members_come_and_go_without_touching_other_containers() -> Result<()> {
    let host = Host::start("is2", Kind::Incus, 66)?;
    let p = Platform::start("members", &[AgentSpec::new(&host)])?;
    let key = ssh_keypair(p.scratch.path(), "lab")?;
    let key_pub = format!("{}.pub", key.display());
    let add = |name: &str, image: &str| {
        p.ctl_ok(&[
            "user",
            "add",
            name,
            "--ssh-key",
            &key_pub,
            "--image",
            image,
            "--wait",
            "running",
        ])
    };
    // ann's container (Debian, with libnss-extrausers) is where names are looked up.
    add("ann", "debian-ssh")?;
    add("ben", "busybox")?;
    add("cal", "busybox")?;
    // Lookups in ann's container go over SSH: an exec would be an event on it.
    let ann = p.ssh_login("ann", &key)?;
    wait_for(
        "cal's name in ann's container",
        Duration::from_secs(30),
        || ann.run("getent passwd cal").ok(),
    )?;
    let others = ["ann", "ben", "cal"];
    let before: Vec<_> = others
        .iter()
        .map(|n| marks(&host, n))
        .collect::<Result<_>>()?;

    // Quiet first: with nothing changing, nothing happens to the containers.
    let monitor = Monitor::start(&host)?;
    let quiet = monitor.mark();
    std::thread::sleep(SETTLE);
    let noise = events_about(&monitor, quiet, &others)?;
    ensure!(noise.is_empty(), "events with nothing changing: {noise:?}");

    // dan joins: his name resolves in ann's container soon after, and nothing
    // happened to ann's, ben's or cal's containers.
    let mark = monitor.mark();
    let t = Instant::now();
    add("dan", "busybox")?;
    let pw = wait_for(
        "dan's name in ann's container",
        Duration::from_secs(20),
        || ann.run("getent passwd dan").ok(),
    )?;
    let dan_uid = uid_of(&p, "dan")?;
    ensure!(
        pw.starts_with(&format!("dan:x:{dan_uid}:{dan_uid}:")),
        "getent passwd dan in ann's container: {pw}"
    );
    println!(
        "dan resolves in ann's container {:?} after `user add` began",
        t.elapsed()
    );
    // The container's own lab entry (its owner) merged with the host's (everyone);
    // glibc's merge keeps the owner twice.
    let lab = ann.run("getent group lab")?;
    let mut listed: Vec<&str> = lab
        .trim()
        .rsplit(':')
        .next()
        .unwrap_or("")
        .split(',')
        .collect();
    listed.sort();
    listed.dedup();
    ensure!(
        lab.starts_with("lab:x:19999:") && listed == ["ann", "ben", "cal", "dan"],
        "the lab group in ann's container: {lab}"
    );
    std::thread::sleep(SETTLE);
    let touched = events_about(&monitor, mark, &others)?;
    ensure!(
        touched.is_empty(),
        "adding dan touched other containers: {touched:#?}"
    );
    ensure!(
        !events_about(&monitor, mark, &["dan"])?.is_empty(),
        "the monitor saw nothing of dan's container being made"
    );
    let after: Vec<_> = others
        .iter()
        .map(|n| marks(&host, n))
        .collect::<Result<_>>()?;
    ensure!(
        before == after,
        "specs or accounts changed: {before:?} → {after:?}"
    );

    // The host holds the list in one folder; each container mounts it read-only.
    let files = p.scratch.path().join("agent-is2/extrausers");
    let passwd = std::fs::read_to_string(files.join("passwd"))?;
    ensure!(passwd.lines().count() == 4, "members passwd file: {passwd}");
    let mounted = host.cli_run(&["config", "device", "get", "ben", "ssp-members", "readonly"])?;
    ensure!(
        mounted.trim() == "true",
        "ben's members folder readonly={mounted}"
    );
    ensure!(
        as_root(&host, "ann", "touch /var/lib/extrausers/passwd")?
            .status
            .code()
            != Some(0),
        "the members files are writable inside"
    );

    // ben leaves: his container goes, his name stops resolving, and ann's and
    // cal's containers see nothing.
    let mark = monitor.mark();
    p.ctl_ok(&["user", "remove", "ben"])?;
    wait_for(
        "ben's name to go from ann's container",
        Duration::from_secs(20),
        || ann.run("getent passwd ben").is_err().then_some(()),
    )?;
    std::thread::sleep(SETTLE);
    let touched = events_about(&monitor, mark, &["ann", "cal"])?;
    ensure!(
        touched.is_empty(),
        "removing ben touched other containers: {touched:#?}"
    );
    ensure!(
        !events_about(&monitor, mark, &["ben"])?.is_empty(),
        "the monitor saw nothing of ben's container being deleted"
    );
    Ok(())
}
