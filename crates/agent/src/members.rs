//! The lab's member list on this host: `passwd` and `group` in the format of
//! libnss-extrausers, in one host folder that every managed container gets
//! read-only at [`MOUNT_PATH`]. Adding or removing a user rewrites these two files
//! and touches no container: no config change, no exec inside.
//!
//! The files are replaced by rename inside the folder, and the folder (not the
//! files) is what the containers mount, so they see each new version at once. The
//! list itself is kept next to it (`lab-members`, protobuf) so the agent reports
//! what it has after a restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message;
use ssp_proto::LabMembers;

/// Where containers see the members files.
pub const MOUNT_PATH: &str = "/var/lib/extrausers";
/// The disk device that mounts them.
pub const DEVICE: &str = "ssp-members";
/// GECOS of every entry, so they are told apart from accounts made inside.
pub const GECOS: &str = "ssp lab member";
/// The list the files were written from, in the agent's state dir.
const STORE: &str = "lab-members";

/// The host's members files and the list they were written from.
pub struct Members {
    dir: PathBuf,
    state_dir: PathBuf,
    current: Mutex<Option<LabMembers>>,
}

/// The lab group's name: `lab`, unless a member is called that.
fn lab_name(m: &LabMembers) -> &'static str {
    if m.members.iter().any(|u| u.name == "lab") {
        "ssp-lab"
    } else {
        "lab"
    }
}

/// `passwd` in extrausers (= /etc/passwd) format: every member, no login, no home.
pub fn passwd(m: &LabMembers) -> String {
    m.members
        .iter()
        .map(|u| {
            format!(
                "{n}:x:{id}:{id}:{GECOS}:/nonexistent:/usr/sbin/nologin\n",
                n = u.name,
                id = u.uid
            )
        })
        .collect()
}

/// `group`: each member's own group (gid = uid, as the account script makes it)
/// and the lab group listing every member.
pub fn group(m: &LabMembers) -> String {
    let lab = lab_name(m);
    let mut out: String = m
        .members
        .iter()
        .filter(|u| u.name != lab)
        .map(|u| format!("{n}:x:{id}:\n", n = u.name, id = u.uid))
        .collect();
    if m.lab_gid != 0 {
        let names: Vec<&str> = m.members.iter().map(|u| u.name.as_str()).collect();
        out.push_str(&format!("{lab}:x:{}:{}\n", m.lab_gid, names.join(",")));
    }
    out
}

/// Sorted by name, as the coordinator sends it; the files do not depend on the order.
fn normalized(m: &LabMembers) -> LabMembers {
    let mut m = m.clone();
    m.members
        .sort_by(|a, b| (&a.name, a.uid).cmp(&(&b.name, b.uid)));
    m
}

/// Writes `data` to `dir/name` by a temporary file in `dir` and a rename, so a
/// reader sees the old file or the new one, never a part.
fn replace(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))
}

impl Members {
    /// Opens the members files under `state_dir` (made when missing, 0755, so
    /// every container can read them), writing them again from the stored list
    /// (empty files before the first list) so they match this agent's format.
    pub fn open(state_dir: &Path) -> anyhow::Result<Members> {
        use anyhow::Context;
        use std::os::unix::fs::PermissionsExt;
        let dir = state_dir.join("extrausers");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let store = state_dir.join(STORE);
        let current = match std::fs::read(&store) {
            Ok(b) => match LabMembers::decode(b.as_slice()) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(file = %store.display(), "ignoring an unreadable member list: {e}");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", store.display())),
        };
        let m = Members {
            dir,
            state_dir: state_dir.to_path_buf(),
            current: Mutex::new(None),
        };
        m.write_files(&current.clone().unwrap_or_default())
            .with_context(|| format!("writing the members files in {}", m.dir.display()))?;
        *m.lock() = current;
        Ok(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<LabMembers>> {
        // The data is a plain value replaced whole: a panic elsewhere left it valid.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The folder containers mount.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// [`ssp_wire::members_hash`] of the list the files hold; empty before any.
    pub fn hash(&self) -> String {
        self.lock()
            .as_ref()
            .map(ssp_wire::members_hash)
            .unwrap_or_default()
    }

    fn write_files(&self, m: &LabMembers) -> std::io::Result<()> {
        replace(&self.dir, "passwd", passwd(m).as_bytes())?;
        replace(&self.dir, "group", group(m).as_bytes())?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Makes the files hold `m` (checked by the caller against the host policy)
    /// and stores it; returns its hash. Nothing is written when it is what they hold.
    pub fn set(&self, m: &LabMembers) -> std::io::Result<String> {
        let m = normalized(m);
        let mut current = self.lock();
        if current.as_ref() != Some(&m) {
            self.write_files(&m)?;
            replace(&self.state_dir, STORE, &m.encode_to_vec())?;
            std::fs::File::open(&self.state_dir)?.sync_all()?;
            *current = Some(m.clone());
        }
        Ok(ssp_wire::members_hash(&m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssp_proto::LabMember;

    fn lab(names: &[(&str, u32)]) -> LabMembers {
        LabMembers {
            members: names
                .iter()
                .map(|(n, u)| LabMember {
                    name: n.to_string(),
                    uid: *u,
                })
                .collect(),
            lab_gid: 19999,
        }
    }

    #[test]
    fn files_in_extrausers_format_with_the_lab_group_listing_everyone() {
        let m = lab(&[("ann", 10000), ("bob", 10001)]);
        assert_eq!(
            passwd(&m),
            "ann:x:10000:10000:ssp lab member:/nonexistent:/usr/sbin/nologin\n\
             bob:x:10001:10001:ssp lab member:/nonexistent:/usr/sbin/nologin\n"
        );
        assert_eq!(
            group(&m),
            "ann:x:10000:\nbob:x:10001:\nlab:x:19999:ann,bob\n"
        );
        // A member called lab keeps their name and group; the lab group takes another.
        let m = lab(&[("lab", 10000), ("zoe", 10001)]);
        assert_eq!(
            group(&m),
            "lab:x:10000:\nzoe:x:10001:\nssp-lab:x:19999:lab,zoe\n"
        );
        // Nobody yet, or no lab group: no lines for them.
        assert_eq!(passwd(&LabMembers::default()), "");
        assert_eq!(group(&LabMembers::default()), "");
    }

    #[test]
    fn set_replaces_the_files_by_rename_and_survives_reopening() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let m = Members::open(t.path()).unwrap();
        assert_eq!(m.hash(), "");
        let dir = t.path().join("extrausers");
        assert_eq!(m.dir(), dir);
        assert_eq!(std::fs::read_to_string(dir.join("passwd")).unwrap(), "");
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let ino = std::fs::metadata(dir.join("passwd")).unwrap().ino();
        let h = m.set(&lab(&[("bob", 10001), ("ann", 10000)])).unwrap();
        assert_eq!(
            h,
            ssp_wire::members_hash(&lab(&[("ann", 10000), ("bob", 10001)]))
        );
        assert_eq!(m.hash(), h);
        let passwd_now = std::fs::read_to_string(dir.join("passwd")).unwrap();
        assert!(passwd_now.starts_with("ann:"), "sorted: {passwd_now}");
        assert_ne!(
            std::fs::metadata(dir.join("passwd")).unwrap().ino(),
            ino,
            "a new file renamed into place, not the old one rewritten"
        );
        let meta = std::fs::metadata(dir.join("group")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        // Only the two files: no temporary left behind.
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["group", "passwd"]);
        // The same list again writes nothing.
        let ino = std::fs::metadata(dir.join("passwd")).unwrap().ino();
        m.set(&lab(&[("ann", 10000), ("bob", 10001)])).unwrap();
        assert_eq!(std::fs::metadata(dir.join("passwd")).unwrap().ino(), ino);
        drop(m);
        let again = Members::open(t.path()).unwrap();
        assert_eq!(again.hash(), h);
        assert_eq!(
            std::fs::read_to_string(dir.join("passwd")).unwrap(),
            passwd_now
        );
    }
}
