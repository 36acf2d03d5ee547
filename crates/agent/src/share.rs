//! A shared folder's top directory on the host: made when missing, and given the
//! lab group and the mode its share mode wants.
//!
//! Members write in shared folders, so a path that leads through one can be changed
//! by them: a folder renamed away and replaced by a symbolic link to `/etc` would
//! have the agent (root) give `/etc` to the lab group. So a symbolic link in a
//! folder that anyone but root may write to is refused, never followed, and the
//! directory itself is opened without following links before it is changed.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ssp_model::ShareMode;
use ssp_proto::SharedFolder;

/// The mode of a writable share's top directory: group-writable with setgid, so
/// every member adds files and each file joins the lab group, and the sticky bit, so
/// only a file's owner renames or removes it (as on /tmp). A member edits another's
/// file only where its writer made it group-writable.
pub const WRITABLE_MODE: u32 = 0o3775;

/// Owner, group and mode for a share's top directory: root:lab [`WRITABLE_MODE`]
/// for `rw` (and `owner`, its older name; a folder an earlier version made 2775
/// gets the sticky bit). `None` for `ro`, and for a spec without a lab group (from a
/// coordinator older than lab groups): the folder keeps the owner and mode it has.
fn want(s: &SharedFolder, lab_gid: u32) -> io::Result<Option<(u32, u32, u32)>> {
    let mode = ShareMode::parse(&s.mode).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(match mode {
        _ if lab_gid == 0 => None,
        ShareMode::Ro => None,
        ShareMode::Rw => Some((0, lab_gid, WRITABLE_MODE)),
    })
}

/// True when `m` (not followed) is a directory with what `w` wants.
fn matches(m: &Metadata, w: Option<(u32, u32, u32)>) -> bool {
    m.is_dir()
        && w.is_none_or(|(uid, gid, mode)| {
            m.uid() == uid && m.gid() == gid && m.mode() & 0o7777 == mode
        })
}

/// True when the shared folder is there, is no symbolic link, and has the owner and
/// mode its share mode wants.
pub fn ok(s: &SharedFolder, lab_gid: u32) -> bool {
    match (std::fs::symlink_metadata(&s.host_path), want(s, lab_gid)) {
        (Ok(m), Ok(w)) => matches(&m, w),
        _ => false,
    }
}

/// Refuses a path that leads through a symbolic link in a folder someone other than
/// root may write to (its owner is not root, or it is group- or world-writable).
/// Links in folders only root changes (an admin's `/srv -> /data/srv`) are followed.
fn check_links(path: &Path) -> io::Result<()> {
    let mut at = PathBuf::from("/");
    for c in path.components().skip(1) {
        let parent = at.clone();
        at.push(c);
        let m = match std::fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if m.file_type().is_symlink() {
            let p = std::fs::metadata(&parent)?;
            if p.uid() != 0 || p.mode() & 0o022 != 0 {
                return Err(io::Error::other(format!(
                    "{} is a symbolic link in {}, a folder others than root can write to; ssp does not follow it",
                    at.display(),
                    parent.display()
                )));
            }
        }
    }
    Ok(())
}

/// Makes the shared folder when it is missing, and gives a writable one the lab
/// group and its mode (see [`want`]). Refuses a path through a symbolic link that
/// members could have put there.
pub fn ensure(s: &SharedFolder, lab_gid: u32) -> io::Result<()> {
    if ok(s, lab_gid) {
        return Ok(());
    }
    let path = Path::new(&s.host_path);
    let w = want(s, lab_gid)?;
    check_links(path)?;
    if std::fs::symlink_metadata(path).is_err() {
        std::fs::create_dir_all(path)?;
        check_links(path)?;
    }
    // The directory itself, not what a link in its place points to.
    let dir: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)?;
    if let Some((uid, gid, mode)) = w {
        if !matches(&dir.metadata()?, Some((uid, gid, mode))) {
            std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))?;
            dir.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(path: &Path, mode: &str) -> SharedFolder {
        SharedFolder {
            host_path: path.display().to_string(),
            container_path: "/shared".into(),
            mode: mode.into(),
        }
    }

    fn mode_of(p: &Path) -> (u32, u32) {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.gid(), m.mode() & 0o7777)
    }

    #[test]
    fn writable_shares_get_the_lab_group_setgid_and_sticky() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("lab/shared");
        ensure(&share(&dir, "rw"), 19999).unwrap();
        assert_eq!(mode_of(&dir), (19999, 0o3775));
        // `owner` is the older name of the same thing.
        assert!(ok(&share(&dir, "owner"), 19999));
        // A folder an earlier version left 2775 gets the sticky bit.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2775)).unwrap();
        assert!(!ok(&share(&dir, "rw"), 19999));
        ensure(&share(&dir, "owner"), 19999).unwrap();
        assert_eq!(mode_of(&dir), (19999, 0o3775));
        // Read-only shares and specs without a lab group leave it as it is.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        ensure(&share(&dir, "ro"), 19999).unwrap();
        ensure(&share(&dir, "rw"), 0).unwrap();
        assert_eq!(mode_of(&dir), (19999, 0o750));
        assert!(ensure(&share(&dir, "rwx"), 19999).is_err());
    }

    #[test]
    fn a_link_members_could_have_made_is_refused_and_its_target_untouched() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("shared");
        ensure(&share(&root, "rw"), 19999).unwrap();
        let target = t.path().join("etc");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        // In the group-writable shared folder, a member replaced "team" by a link.
        let team = root.join("team");
        std::os::unix::fs::symlink(&target, &team).unwrap();
        let e = ensure(&share(&team, "rw"), 19999).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(!ok(&share(&team, "rw"), 19999));
        assert_eq!(mode_of(&target).1, 0o755);
        // Below it too.
        let e = ensure(&share(&team.join("x"), "rw"), 19999).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!target.join("x").exists());
    }

    #[test]
    fn a_link_only_root_could_make_is_followed() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("admin");
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let real = t.path().join("data");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, base.join("srv")).unwrap();
        let dir = base.join("srv/shared");
        ensure(&share(&dir, "rw"), 19999).unwrap();
        assert_eq!(mode_of(&real.join("shared")), (19999, 0o3775));
    }
}
