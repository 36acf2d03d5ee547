//! Why a container did not come up, read from its console log: the units that
//! failed in its last boot, or why its init gave up.
//!
//! The daemon writes each container's console to `DAEMON_LOGS/NAME/console.log`
//! (a file of the daemon's, in a folder of root's; the container only writes text
//! into it). The file is read, not the daemon's console API: for a running
//! container that API hands out the console's ring buffer and empties it, taking
//! it from the admin's `incus console --show-log`. The text is the container's
//! own: what is taken from it is capped, stripped to plain characters, and
//! only ever shown, never acted on.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;

/// The most of a console log that is read: its end, where the last boot is.
pub const READ_CAP: u64 = 64 * 1024;
/// Units named at most; the rest are counted.
const MAX_UNITS: usize = 6;

/// What the last boot in `log` (a console log) says went wrong, if anything.
pub fn diagnose(log: &str) -> Option<String> {
    // The last boot begins at systemd's banner ("systemd 252... running in
    // system mode"); a log of another init is read whole.
    let lines: Vec<String> = log.lines().map(plain).collect();
    let start = lines
        .iter()
        .rposition(|l| l.starts_with("systemd ") && l.contains(" running in system mode"))
        .unwrap_or(0);
    let boot = &lines[start..];

    // init gave up: "Failed to allocate manager object: Too many open files", then
    // "Exiting PID 1..." or "Freezing execution."
    if boot
        .iter()
        .any(|l| l.starts_with("Exiting PID 1") || l.contains("Freezing execution"))
    {
        let why = boot
            .iter()
            .rev()
            .find(|l| l.starts_with("Failed to ") && l.contains(": "))
            .map(|l| clip(l, 160))
            .unwrap_or_else(|| "no reason given".into());
        return Some(format!("init gave up: {why}"));
    }

    // Units that failed and did not start later in the same boot, in order,
    // each with the first reason given for it.
    let mut failed: Vec<String> = Vec::new();
    let mut reasons: HashMap<String, String> = HashMap::new();
    for l in boot {
        if let Some(unit) = l
            .strip_prefix("See 'systemctl status ")
            .and_then(|r| r.strip_suffix("' for details."))
            .filter(|u| is_unit(u))
        {
            failed.retain(|f| f != unit);
            failed.push(unit.to_string());
        } else if let Some(rest) = l.strip_prefix("[  OK  ] ") {
            // "Started UNIT - Description." (long names are cut short with '…'
            // and then match nothing, which keeps the failure: the safe side).
            let unit = rest
                .split_whitespace()
                .find(|w| is_unit(w.trim_end_matches('.')))
                .map(|w| w.trim_end_matches('.'));
            if let Some(u) = unit {
                failed.retain(|f| f != u);
            }
        } else if let Some((unit, what)) = l.split_once(": Failed to ") {
            if is_unit(unit) {
                reasons
                    .entry(unit.to_string())
                    .or_insert_with(|| clip(&format!("Failed to {what}"), 100));
            }
        }
    }
    if failed.is_empty() {
        return None;
    }
    let mut named: Vec<String> = failed
        .iter()
        .take(MAX_UNITS)
        .map(|u| match reasons.get(u) {
            Some(r) => format!("{u} ({r})"),
            None => u.clone(),
        })
        .collect();
    if failed.len() > MAX_UNITS {
        named.push(format!("{} more", failed.len() - MAX_UNITS));
    }
    Some(format!("failed inside: {}", named.join(", ")))
}

/// True when the last boot in `log` ran out of inotify instances or watches (the
/// host's, which every container shares).
pub fn out_of_inotify(log: &str) -> bool {
    let boot = match log.rfind(" running in system mode") {
        Some(i) => &log[i..],
        None => log,
    };
    boot.lines()
        .any(|l| l.contains("inotify") && l.contains("Too many open files"))
}

/// A systemd unit name: `name.service`, `name@inst.path`, ... (no spaces, no
/// ellipsis of a cut-short name).
fn is_unit(s: &str) -> bool {
    const KINDS: &[&str] = &[
        ".service",
        ".socket",
        ".path",
        ".mount",
        ".automount",
        ".timer",
        ".target",
        ".swap",
        ".device",
        ".slice",
        ".scope",
    ];
    s.len() <= 120
        && KINDS.iter().any(|k| s.ends_with(k) && s.len() > k.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._:-\\".contains(c))
}

/// A console line as plain text: escape sequences (colours) and control
/// characters removed, surrounding space trimmed.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then one final letter.
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if !c.is_control() {
            out.push(c);
        }
    }
    out.trim().to_string()
}

/// `s` cut to `max` characters.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(max).collect();
        c.push('…');
        c
    }
}

/// The console logs of this host's containers, each diagnosed once per change
/// of the file (its length and modification time), so a listing of hundreds of
/// containers costs a `stat` each.
pub struct Consoles {
    dir: PathBuf,
    seen: Mutex<HashMap<String, (FileKey, Option<Diagnosis>)>>,
}

/// What a console log says: why the last boot went wrong, and whether it ran out
/// of the host's inotify budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub problem: String,
    pub inotify: bool,
}

type FileKey = (u64, u64, i64, i64);

impl Consoles {
    /// The console logs under `dir` (the daemon's log folder).
    pub fn new(dir: PathBuf) -> Self {
        Consoles {
            dir,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// What `name`'s console log says went wrong in its last boot, if anything.
    /// A missing or unreadable log says nothing.
    pub fn diagnose(&self, name: &str) -> Option<Diagnosis> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        // Names come from the daemon's list; ssp's are plain, but never let one
        // lead out of the folder.
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        let path = self.dir.join(name).join("console.log");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        let m = f.metadata().ok()?;
        if !m.is_file() {
            return None;
        }
        let key = (m.ino(), m.len(), m.mtime(), m.mtime_nsec());
        if let Some((k, d)) = self.seen.lock().ok()?.get(name) {
            if *k == key {
                return d.clone();
            }
        }
        let from = m.len().saturating_sub(READ_CAP);
        f.seek(SeekFrom::Start(from)).ok()?;
        let mut bytes = Vec::new();
        f.take(READ_CAP).read_to_end(&mut bytes).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let d = diagnose(&text).map(|problem| Diagnosis {
            problem,
            inotify: out_of_inotify(&text),
        });
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(name.to_string(), (key, d.clone()));
        }
        d
    }

    /// Forgets the containers not in `names` (deleted ones).
    pub fn retain(&self, names: &[&str]) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.retain(|n, _| names.contains(&n.as_str()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start of a boot, as systemd 252 prints it on a container's console.
    const BANNER: &str = "Failed to find module 'autofs4'\r\r\nsystemd 252.39-1~deb12u2 running in system mode (+PAM +AUDIT default-hierarchy=unified)\r\r\nDetected virtualization lxc.\r\r\n\r\nWelcome to \x1b[1mDebian GNU/Linux 12 (bookworm)\x1b[0m!\r\n\r\r\nHostname set to <ssp>.\r\r\n";

    /// A boot with one inotify instance left on the host (seen for real).
    const ONE_LEFT: &str = "Queued start job for default target graphical.target.\r\r
[\x1b[0;32m  OK  \x1b[0m] Created slice \x1b[0;1;39msystem-getty.slice\x1b[0m - Slice /system/getty.\r\r
Failed to allocate inotify fd: Too many open files\r\r
systemd-ask-password-console.path: Failed to enter waiting state: Too many open files\r\r
systemd-ask-password-console.path: Failed with result 'resources'.\r\r
[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39msystemd-ask-passwor\u{2026}quests to Console Directory Watch.\r\r
See 'systemctl status systemd-ask-password-console.path' for details.\r\r
[\x1b[0;1;31mFAILED\x1b[0m] Failed to listen on \x1b[0;1;39msystemd-networkd.socket\x1b[0m - Network Service Netlink Socket.\r\r
See 'systemctl status systemd-networkd.socket' for details.\r\r
         Starting \x1b[0;1;39msystemd-networkd.service\x1b[0m - Network Configuration...\r\r
[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39msystemd-networkd.service\x1b[0m - Network Configuration.\r\r
See 'systemctl status systemd-networkd.service' for details.\r\r
[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\r\r
";

    #[test]
    fn failed_units_are_named_with_their_reasons() {
        let log = format!("{BANNER}{ONE_LEFT}");
        assert_eq!(
            diagnose(&log).as_deref(),
            Some("failed inside: systemd-ask-password-console.path (Failed to enter waiting state: Too many open files), systemd-networkd.socket, systemd-networkd.service")
        );
        assert!(out_of_inotify(&log));
    }

    #[test]
    fn a_unit_that_started_later_in_the_same_boot_is_not_named() {
        let log = format!(
            "{BANNER}{ONE_LEFT}[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39msystemd-networkd.service\x1b[0m - Network Configuration.\r\r\n"
        );
        assert_eq!(
            diagnose(&log).as_deref(),
            Some("failed inside: systemd-ask-password-console.path (Failed to enter waiting state: Too many open files), systemd-networkd.socket")
        );
    }

    #[test]
    fn only_the_last_boot_counts() {
        let clean = "[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh.service\x1b[0m - OpenBSD Secure Shell server.\r\r\n";
        let log = format!("{BANNER}{ONE_LEFT}{BANNER}{clean}");
        assert_eq!(diagnose(&log), None);
        assert!(!out_of_inotify(&log));
        let log = format!("{BANNER}{clean}{BANNER}{ONE_LEFT}");
        assert!(diagnose(&log).unwrap().starts_with("failed inside: "));
    }

    #[test]
    fn init_that_gave_up_is_named_with_its_reason() {
        let log = format!(
            "{BANNER}Failed to create control group inotify object: Too many open files\r\r\nFailed to allocate manager object: Too many open files\r\r\n[\x1b[0;1;31m!!!!!!\x1b[0m] Failed to allocate manager object.\r\r\nExiting PID 1...\r\r\n"
        );
        assert_eq!(
            diagnose(&log).as_deref(),
            Some("init gave up: Failed to allocate manager object: Too many open files")
        );
        assert!(out_of_inotify(&log));
    }

    #[test]
    fn a_quiet_log_or_another_init_says_nothing() {
        assert_eq!(diagnose(""), None);
        assert_eq!(diagnose(BANNER), None);
        assert_eq!(diagnose("busybox init\nsh: can't access tty\n"), None);
    }

    #[test]
    fn what_the_container_wrote_is_capped_and_plain() {
        // Root inside may write anything to its console: names that are no unit
        // names are not taken, reasons are cut short, control bytes dropped.
        let mut log = String::from(BANNER);
        log.push_str("See 'systemctl status a b; rm -rf /' for details.\n");
        log.push_str(&format!(
            "x.service: Failed to {}\x07\nSee 'systemctl status x.service' for details.\n",
            "y".repeat(500)
        ));
        for i in 0..10 {
            log.push_str(&format!(
                "See 'systemctl status u{i}.service' for details.\n"
            ));
        }
        let d = diagnose(&log).unwrap();
        assert!(!d.contains("rm -rf") && !d.contains('\x07'), "{d}");
        assert!(
            d.starts_with("failed inside: x.service (Failed to yyy"),
            "{d}"
        );
        assert!(d.contains("…), u0.service"), "{d}");
        assert!(d.ends_with(", u4.service, 5 more"), "{d}");
    }

    #[test]
    fn the_log_is_read_once_per_change_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let c = Consoles::new(dir.path().to_path_buf());
        assert_eq!(c.diagnose("gdw"), None);
        std::fs::create_dir(dir.path().join("gdw")).unwrap();
        let log = dir.path().join("gdw/console.log");
        std::fs::write(&log, format!("{BANNER}{ONE_LEFT}")).unwrap();
        let d = c.diagnose("gdw").unwrap();
        assert!(d.problem.starts_with("failed inside: ") && d.inotify);
        // Only its end is read: a long log with the failure at its start.
        let mut long = format!("{BANNER}{ONE_LEFT}");
        long.push_str(&"x\n".repeat(READ_CAP as usize));
        std::fs::write(&log, long).unwrap();
        assert_eq!(c.diagnose("gdw"), None);
        // A link in the log's place is not followed; nor is a name with a slash.
        std::fs::remove_file(&log).unwrap();
        let elsewhere = dir.path().join("elsewhere.log");
        std::fs::write(&elsewhere, format!("{BANNER}{ONE_LEFT}")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &log).unwrap();
        assert_eq!(c.diagnose("gdw"), None);
        assert_eq!(c.diagnose("../gdw"), None);
        c.retain(&[]);
        assert!(c.seen.lock().unwrap().is_empty());
    }
}
