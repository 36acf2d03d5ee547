//! GPU host check at agent start: CUDA needs `/dev/nvidia-uvm` (and
//! `nvidia-uvm-tools`), but the driver creates those nodes only when something
//! on the host loads the module through `nvidia-modprobe`. On a headless server
//! nothing may have, and containers then fail with "no CUDA-capable device". When
//! the NVIDIA driver is loaded and the nodes are missing, the agent loads the
//! module and makes the nodes, with the major number the kernel gave the module.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the check did.
#[derive(Debug, PartialEq, Eq)]
pub enum Uvm {
    /// No NVIDIA driver on this host: nothing to do.
    NoDriver,
    /// The nodes were there already.
    Present,
    /// These nodes were made.
    Created(Vec<PathBuf>),
}

/// The character-device major the kernel gave `name`, from `/proc/devices` text.
pub fn char_major(proc_devices: &str, name: &str) -> Option<u32> {
    proc_devices
        .lines()
        .skip_while(|l| !l.starts_with("Character devices:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("Block devices:"))
        .find_map(|l| {
            let (major, dev) = l.trim().split_once(' ')?;
            (dev.trim() == name).then(|| major.parse().ok())?
        })
}

/// Checks and repairs the nvidia-uvm nodes. `proc` and `dev` are `/proc` and
/// `/dev` (other roots in tests).
pub fn ensure_nodes(proc: &Path, dev: &Path) -> Result<Uvm, String> {
    if !proc.join("driver/nvidia/version").exists() {
        return Ok(Uvm::NoDriver);
    }
    let nodes = [
        (dev.join("nvidia-uvm"), 0),
        (dev.join("nvidia-uvm-tools"), 1),
    ];
    if nodes.iter().all(|(p, _)| p.exists()) {
        return Ok(Uvm::Present);
    }
    let read = || std::fs::read_to_string(proc.join("devices")).unwrap_or_default();
    let major = match char_major(&read(), "nvidia-uvm") {
        Some(m) => m,
        None => {
            // The module is not loaded yet.
            let out = Command::new("modprobe").arg("nvidia-uvm").output();
            char_major(&read(), "nvidia-uvm").ok_or_else(|| {
                format!(
                    "the NVIDIA driver is loaded but nvidia-uvm is not, and `modprobe nvidia-uvm` did not load it ({}); CUDA in containers needs it",
                    match out {
                        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                        Err(e) => e.to_string(),
                    }
                )
            })?
        }
    };
    let mut created = Vec::new();
    for (path, minor) in nodes {
        if path.exists() {
            continue;
        }
        let out = Command::new("mknod")
            .args(["-m", "0666"])
            .arg(&path)
            .args(["c", &major.to_string(), &minor.to_string()])
            .output()
            .map_err(|e| format!("running mknod: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mknod {} c {major} {minor}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        created.push(path);
    }
    Ok(Uvm::Created(created))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    const DEVICES: &str = "Character devices:\n  1 mem\n195 nvidia-frontend\n236 nvidia-uvm\n240 nvidia-caps\n\nBlock devices:\n  7 loop\n236 nvidia-uvm-fake-block\n";

    #[test]
    fn majors_come_from_the_character_section_only() {
        assert_eq!(char_major(DEVICES, "nvidia-uvm"), Some(236));
        assert_eq!(char_major(DEVICES, "nvidia-frontend"), Some(195));
        assert_eq!(char_major(DEVICES, "nvidia-uvm-fake-block"), None);
        assert_eq!(char_major(DEVICES, "loop"), None);
        assert_eq!(char_major("", "nvidia-uvm"), None);
    }

    #[test]
    fn without_the_driver_nothing_is_done() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(ensure_nodes(root.path(), root.path()), Ok(Uvm::NoDriver));
    }

    /// Makes real device nodes (needs root, as the agent does).
    #[test]
    fn missing_nodes_are_made_with_the_module_major() {
        let proc = tempfile::tempdir().unwrap();
        let dev = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(proc.path().join("driver/nvidia")).unwrap();
        std::fs::write(proc.path().join("driver/nvidia/version"), "NVRM 560.35.03").unwrap();
        std::fs::write(proc.path().join("devices"), DEVICES).unwrap();
        let made = ensure_nodes(proc.path(), dev.path()).unwrap();
        let uvm = dev.path().join("nvidia-uvm");
        let tools = dev.path().join("nvidia-uvm-tools");
        assert_eq!(made, Uvm::Created(vec![uvm.clone(), tools.clone()]));
        for (p, minor) in [(&uvm, 0), (&tools, 1)] {
            let m = std::fs::metadata(p).unwrap();
            assert!(m.file_type().is_char_device());
            let rdev = m.rdev();
            let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
            let min = (rdev & 0xff) | ((rdev >> 12) & !0xff);
            assert_eq!((major, min), (236, minor));
            assert_eq!(m.permissions().mode() & 0o777, 0o666);
        }
        assert_eq!(ensure_nodes(proc.path(), dev.path()), Ok(Uvm::Present));
    }
}
