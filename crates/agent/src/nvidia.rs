//! The NVIDIA driver's user-space inside GPU containers: libcuda, NVML and
//! nvidia-smi must match the host's kernel module exactly, so they come from the
//! host, never from the image.
//!
//! Two ways, chosen at start ([`Mode`]):
//! - `runtime`: the NVIDIA container toolkit's LXC hook injects them
//!   (`nvidia.runtime=true`), where `nvidia-container-cli` is installed.
//! - `bind`: the agent copies the files the toolkit would inject for
//!   `compute,utility` into `state_dir/nvidia/<driver version>/{lib,bin}` and every
//!   GPU container gets that directory as a read-only disk device at
//!   [`MOUNT_PATH`]; the account script makes the loader find the libraries and puts
//!   the binaries on PATH. The directory is versioned, so after a driver upgrade
//!   the next resync points running containers at the new one without recreating
//!   them; the soname links inside keep their names, so the loader cache inside
//!   stays valid.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde::Deserialize;

/// Where the driver directory appears inside containers.
pub const MOUNT_PATH: &str = "/usr/local/lib/ssp-nvidia";
/// The disk device that carries it.
pub const DEVICE: &str = "ssp-nvidia";

/// Libraries (`lib<name>.so.<version>`) the toolkit injects for compute and utility.
pub const LIBS: &[&str] = &[
    "cuda",
    "nvidia-ml",
    "nvidia-ptxjitcompiler",
    "nvidia-nvvm",
    "nvidia-cfg",
    "nvidia-opencl",
    "cudadebugger",
    "nvidia-gpucomp",
    "nvidia-allocator",
    "nvidia-pkcs11",
    "nvidia-pkcs11-openssl3",
    "nvidia-fatbinaryloader",
    "nvidia-compiler",
];
/// Without these nothing CUDA-related works.
const REQUIRED_LIBS: &[&str] = &["cuda", "nvidia-ml"];
/// Binaries the toolkit injects for utility and compute.
pub const BINS: &[&str] = &[
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
];

/// How containers get the driver's user-space (`[nvidia] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `runtime` where `nvidia-container-cli` is on PATH, else `bind` where a
    /// driver is loaded, else `off`.
    #[default]
    Auto,
    Runtime,
    Bind,
    Off,
}

/// The agent config's `[nvidia]` table; every key is optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NvidiaConfig {
    pub mode: Mode,
    /// The loaded kernel module's version line.
    pub version_file: PathBuf,
    /// The dynamic loader's cache, read with `ldconfig -p -C`.
    pub ld_cache: PathBuf,
    /// Searched for libraries after the loader's cache.
    pub lib_dirs: Vec<PathBuf>,
    /// Searched for the binaries, in order.
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for NvidiaConfig {
    fn default() -> Self {
        NvidiaConfig {
            mode: Mode::Auto,
            version_file: "/proc/driver/nvidia/version".into(),
            ld_cache: "/etc/ld.so.cache".into(),
            lib_dirs: [
                "/usr/local/nvidia/lib64",
                "/usr/lib/x86_64-linux-gnu",
                "/usr/lib64",
            ]
            .map(PathBuf::from)
            .to_vec(),
            bin_dirs: ["/usr/local/nvidia/bin", "/usr/bin"]
                .map(PathBuf::from)
                .to_vec(),
        }
    }
}

/// The driver version from `/proc/driver/nvidia/version` text, e.g. `580.159.04`
/// from `NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build ...`.
pub fn parse_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("NVRM version:"))?;
    line.split_whitespace()
        .find(|t| {
            t.starts_with(|c: char| c.is_ascii_digit())
                && t.contains('.')
                && t.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .map(String::from)
}

/// `(soname, path)` pairs from `ldconfig -p` output.
pub fn parse_ld_cache(text: &str) -> Vec<(String, PathBuf)> {
    text.lines()
        .filter_map(|l| {
            let (left, path) = l.split_once(" => ")?;
            let name = left.split_whitespace().next()?;
            Some((name.to_string(), PathBuf::from(path.trim())))
        })
        .collect()
}

/// Reads the loader's cache at `cache` with `ldconfig -p -C`.
pub fn read_ld_cache(cache: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let mut last = String::new();
    for ldconfig in ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"] {
        match Command::new(ldconfig)
            .arg("-p")
            .arg("-C")
            .arg(cache)
            .output()
        {
            Ok(o) if o.status.success() => {
                return Ok(parse_ld_cache(&String::from_utf8_lossy(&o.stdout)))
            }
            Ok(o) => {
                return Err(format!(
                    "ldconfig -p -C {}: {}",
                    cache.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("cannot run ldconfig: {last}"))
}

/// The driver's files found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub version: String,
    /// `(name as in LIBS, path of lib<name>.so.<version>)`.
    pub libs: Vec<(String, PathBuf)>,
    pub bins: Vec<PathBuf>,
}

impl Found {
    /// The directories the files came from, for the log.
    pub fn dirs(&self) -> BTreeSet<PathBuf> {
        self.libs
            .iter()
            .map(|(_, p)| p)
            .chain(&self.bins)
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect()
    }
}

/// Finds the driver's libraries for `version`: for each library, the directories
/// the loader's cache names for it, then `lib_dirs`; the first that holds
/// `lib<name>.so.<version>` as a 64-bit ELF file wins. Files of another version
/// (a stale libcuda left by an old driver) never count. Binaries are the first of
/// each in `bin_dirs`.
pub fn discover(
    cfg: &NvidiaConfig,
    version: &str,
    ld_cache: &[(String, PathBuf)],
) -> Result<Found, String> {
    let mut libs = Vec::new();
    for name in LIBS {
        let file = format!("lib{name}.so.{version}");
        let prefix = format!("lib{name}.so");
        let cached = ld_cache
            .iter()
            .filter(|(soname, _)| soname == &prefix || soname.starts_with(&format!("{prefix}.")))
            .filter_map(|(_, p)| p.parent().map(Path::to_path_buf));
        let mut dirs: Vec<PathBuf> = Vec::new();
        for d in cached.chain(cfg.lib_dirs.iter().cloned()) {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        if let Some(p) = dirs
            .iter()
            .map(|d| d.join(&file))
            .find(|p| p.is_file() && is_elf64(p))
        {
            libs.push((name.to_string(), p));
        }
    }
    let missing: Vec<String> = REQUIRED_LIBS
        .iter()
        .filter(|n| !libs.iter().any(|(l, _)| l == *n))
        .map(|n| format!("lib{n}.so.{version}"))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "driver {version}: {} not found in the loader's cache or in {}",
            missing.join(", "),
            cfg.lib_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let bins = BINS
        .iter()
        .filter_map(|b| cfg.bin_dirs.iter().map(|d| d.join(b)).find(|p| p.is_file()))
        .collect();
    Ok(Found {
        version: version.to_string(),
        libs,
        bins,
    })
}

fn is_elf64(path: &Path) -> bool {
    let mut head = [0u8; 5];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == [0x7f, b'E', b'L', b'F', 2]
}

/// The `DT_SONAME` of a 64-bit little-endian ELF shared object, read through its
/// section headers (`.dynamic` and the string table it links to). Reads only
/// those parts: a driver's libraries are up to hundreds of megabytes.
pub fn soname(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let read = |offset: u64, len: usize| {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).ok().map(|_| buf)
    };
    let u16_at = |b: &[u8], o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |b: &[u8], o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let header = read(0, 64)?;
    // ELF64, little-endian.
    if header[0..6] != [0x7f, b'E', b'L', b'F', 2, 1] {
        return None;
    }
    let shoff = u64_at(&header, 0x28)?;
    let shentsize = usize::from(u16_at(&header, 0x3a)?);
    let shnum = usize::from(u16_at(&header, 0x3c)?);
    if shentsize < 0x40 || shnum > 1 << 14 {
        return None;
    }
    let table = read(shoff, shnum * shentsize)?;
    // (type, offset, size, link) of section i.
    let section = |i: usize| {
        let o = i * shentsize;
        Some((
            u32_at(&table, o + 4)?,
            u64_at(&table, o + 0x18)?,
            usize::try_from(u64_at(&table, o + 0x20)?).ok()?,
            usize::try_from(u32_at(&table, o + 0x28)?).ok()?,
        ))
    };
    const SHT_DYNAMIC: u32 = 6;
    const DT_NULL: u64 = 0;
    const DT_SONAME: u64 = 14;
    let (_, dyn_off, dyn_size, link) = (0..shnum)
        .filter_map(section)
        .find(|(t, ..)| *t == SHT_DYNAMIC)?;
    let (_, str_off, str_size, _) = section(link)?;
    // Both are small (kilobytes) in any real library.
    if dyn_size > 1 << 20 || str_size > 16 << 20 {
        return None;
    }
    let dynamic = read(dyn_off, dyn_size)?;
    let val = dynamic
        .chunks_exact(16)
        .map(|e| (u64_at(e, 0), u64_at(e, 8)))
        .take_while(|(tag, _)| *tag != Some(DT_NULL))
        .find(|(tag, _)| *tag == Some(DT_SONAME))?
        .1?;
    let strtab = read(str_off, str_size)?;
    let name = strtab.get(usize::try_from(val).ok()?..)?;
    let end = name.iter().position(|b| *b == 0)?;
    String::from_utf8(name[..end].to_vec()).ok()
}

/// Hard-links `from` to `to`, or copies it (and syncs the copy) where the two are
/// on different filesystems.
fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()
}

/// The versioned directory for `version` under `state_dir`.
pub fn version_dir(state_dir: &Path, version: &str) -> PathBuf {
    state_dir.join("nvidia").join(version)
}

/// Makes `state_dir/nvidia/<version>/{lib,bin}` from `found`, unless it exists:
/// the files (hard links or copies), and in lib/ relative links from each
/// library's soname (and `libcuda.so`) to it. Built in a temporary directory and
/// renamed into place, so a crash never leaves a half directory under the final name.
pub fn assemble(state_dir: &Path, found: &Found) -> std::io::Result<PathBuf> {
    let dir = version_dir(state_dir, &found.version);
    if dir.is_dir() {
        return Ok(dir);
    }
    let parent = state_dir.join("nvidia");
    std::fs::create_dir_all(&parent)?;
    let tmp = parent.join(format!(".{}.tmp", found.version));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let (lib, bin) = (tmp.join("lib"), tmp.join("bin"));
    std::fs::create_dir_all(&lib)?;
    std::fs::create_dir_all(&bin)?;
    for (name, path) in &found.libs {
        let file = format!("lib{name}.so.{}", found.version);
        link_or_copy(path, &lib.join(&file))?;
        let so = soname(path)
            .filter(|s| !s.contains('/'))
            .unwrap_or_else(|| format!("lib{name}.so.1"));
        if so != file {
            std::os::unix::fs::symlink(&file, lib.join(&so))?;
        }
        if name == "cuda" && so != "libcuda.so" {
            std::os::unix::fs::symlink(&so, lib.join("libcuda.so"))?;
        }
    }
    for path in &found.bins {
        if let Some(name) = path.file_name() {
            link_or_copy(path, &bin.join(name))?;
        }
    }
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &dir)?;
    std::fs::File::open(&parent)?.sync_all()?;
    Ok(dir)
}

/// Removes every version directory (and leftover temporary one) under
/// `state_dir/nvidia` whose name is not in `keep`.
pub fn prune(state_dir: &Path, keep: &BTreeSet<String>) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(state_dir.join("nvidia")) else {
        return Ok(removed);
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if !keep.contains(&name) {
            std::fs::remove_dir_all(e.path())?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// How render gives GPU containers the driver's user-space.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Userspace {
    /// Nothing: no driver, or `mode = "off"`.
    #[default]
    Off,
    /// The NVIDIA container toolkit's hook (`nvidia.runtime=true`).
    Runtime,
    /// The assembled directory, mounted read-only at [`MOUNT_PATH`].
    Bind { dir: String },
}

/// What was chosen at start, and the current driver directory in bind mode.
pub struct Nvidia {
    cfg: NvidiaConfig,
    state_dir: PathBuf,
    bind: bool,
    runtime: bool,
    current: Mutex<Current>,
}

#[derive(Default)]
struct Current {
    /// The driver version `dir` holds.
    version: Option<String>,
    dir: Option<PathBuf>,
    /// The last failure, logged once rather than at every resync.
    error: Option<String>,
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

impl Nvidia {
    /// Gives containers nothing (tools and benchmarks).
    pub fn off() -> Nvidia {
        Nvidia {
            cfg: NvidiaConfig::default(),
            state_dir: PathBuf::new(),
            bind: false,
            runtime: false,
            current: Mutex::new(Current::default()),
        }
    }

    /// Resolves the mode, logs the choice and why, and in bind mode assembles the
    /// current driver's directory.
    pub fn start(cfg: &NvidiaConfig, state_dir: &Path) -> Nvidia {
        let driver = cfg.version_file.exists();
        let (runtime, bind) = match cfg.mode {
            Mode::Off => {
                tracing::info!("nvidia: off (mode = \"off\")");
                (false, false)
            }
            Mode::Runtime => {
                tracing::info!(
                    "nvidia: runtime (mode = \"runtime\"): GPU containers get nvidia.runtime=true"
                );
                (true, false)
            }
            Mode::Bind => (false, true),
            Mode::Auto if on_path("nvidia-container-cli") => {
                tracing::info!("nvidia: runtime: nvidia-container-cli is on PATH; GPU containers get nvidia.runtime=true");
                (true, false)
            }
            Mode::Auto if driver => {
                tracing::info!(
                    "nvidia: no nvidia-container-cli on PATH and a driver is loaded: binding its files"
                );
                (false, true)
            }
            Mode::Auto => {
                // Checked again at every resync: a driver loaded after the agent
                // started (a module loaded late at boot) is followed as an upgrade is.
                tracing::info!(
                    "nvidia: off for now: no {} (no NVIDIA driver loaded) and no nvidia-container-cli; a driver loaded later is bound at the next resync",
                    cfg.version_file.display()
                );
                (false, true)
            }
        };
        let me = Nvidia {
            cfg: cfg.clone(),
            state_dir: state_dir.to_path_buf(),
            bind,
            runtime,
            current: Mutex::new(Current::default()),
        };
        if bind {
            me.refresh();
        }
        me
    }

    /// Removes every driver directory but the current one and those in `in_use`
    /// (the `ssp-nvidia` sources of the daemon's instances, from the same listing a
    /// resync compares against): a container still on an older driver's files,
    /// because its ensure failed or is backing off, keeps them.
    pub fn prune_old(&self, in_use: &BTreeSet<String>) {
        let Some(v) = self
            .current
            .lock()
            .ok()
            .and_then(|c| c.dir.as_ref().and(c.version.clone()))
        else {
            return;
        };
        let base = self.state_dir.join("nvidia");
        let mut keep: BTreeSet<String> = in_use
            .iter()
            .filter_map(|src| Path::new(src).strip_prefix(&base).ok())
            .filter_map(|rest| rest.components().next())
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .collect();
        keep.insert(v);
        match prune(&self.state_dir, &keep) {
            Ok(r) if !r.is_empty() => {
                tracing::info!(removed = ?r, "nvidia: removed old driver directories")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("nvidia: removing old driver directories: {e}"),
        }
    }

    fn dir(&self) -> Option<PathBuf> {
        self.current.lock().ok()?.dir.clone()
    }

    /// What render should do now.
    pub fn userspace(&self) -> Userspace {
        if self.runtime {
            return Userspace::Runtime;
        }
        match self.dir() {
            Some(d) if self.bind => Userspace::Bind {
                dir: d.display().to_string(),
            },
            _ => Userspace::Off,
        }
    }

    /// Reads the driver version again (cheap) and, when it changed (or the last
    /// try failed), finds the new driver's files and assembles their directory.
    /// Returns true when the directory containers should get changed. Blocking:
    /// assembling copies files.
    pub fn refresh(&self) -> bool {
        if !self.bind {
            return false;
        }
        // The lock is held only to read and to swap `current`, never while files are
        // found and copied (hundreds of MB on a real host): heartbeats and ensures
        // read `userspace()` meanwhile.
        let known = match self.current.lock() {
            Ok(cur) => cur.version.clone(),
            Err(_) => return false,
        };
        // The version the files are for; retried until a directory is built for it.
        let version = match std::fs::read_to_string(&self.cfg.version_file) {
            Ok(text) => parse_version(&text)
                .ok_or_else(|| format!("no driver version in {}", self.cfg.version_file.display())),
            Err(e) => Err(format!("{}: {e}", self.cfg.version_file.display())),
        };
        let version = match version {
            Ok(v) => v,
            Err(why) => {
                // Keep what containers have: a driver being reloaded comes back. No
                // driver yet at all (a host without one) is no news.
                if known.is_some() {
                    self.note_error(why, false);
                }
                return false;
            }
        };
        if known.as_ref() == Some(&version) {
            return false;
        }
        let ld = match read_ld_cache(&self.cfg.ld_cache) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("nvidia: {e}; searching lib_dirs only");
                Vec::new()
            }
        };
        let result = discover(&self.cfg, &version, &ld).and_then(|found| {
            assemble(&self.state_dir, &found)
                .map(|dir| (found, dir))
                .map_err(|e| format!("assembling the driver {version} directory: {e}"))
        });
        match result {
            Ok((found, dir)) => {
                let dirs: Vec<String> = found
                    .dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                tracing::info!(
                    "nvidia: bind, driver {version}, {} files from {}: mounted read-only at {MOUNT_PATH} from {}",
                    found.libs.len() + found.bins.len(),
                    dirs.join(", "),
                    dir.display()
                );
                let Ok(mut cur) = self.current.lock() else {
                    return false;
                };
                let changed = cur.dir.as_ref() != Some(&dir);
                *cur = Current {
                    version: Some(version),
                    dir: Some(dir),
                    error: None,
                };
                changed
            }
            Err(why) => {
                // Tried again at every resync (the files may still be arriving).
                self.note_error(why, true);
                false
            }
        }
    }

    /// Records why the driver files could not be refreshed, logging it once.
    fn note_error(&self, why: String, error: bool) {
        let Ok(mut cur) = self.current.lock() else {
            return;
        };
        if cur.error.as_ref() == Some(&why) {
            return;
        }
        let keep = match &cur.version {
            Some(v) => format!("GPU containers keep the files of driver {v}"),
            None => "GPU containers get no driver files until a driver is loaded".to_string(),
        };
        if error {
            tracing::error!("nvidia: bind: {why}; {keep}");
        } else {
            tracing::warn!("nvidia: bind: {why}; {keep}");
        }
        cur.error = Some(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200: &str = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U16-I3-B03-4-3)  Thu Oct 30 20:17:58 UTC 2025\nGCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)\n";

    #[test]
    fn the_version_is_the_first_version_token() {
        assert_eq!(parse_version(H200).as_deref(), Some("580.159.04"));
        assert_eq!(
            parse_version("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n").as_deref(),
            Some("550.54.15")
        );
        assert_eq!(parse_version("GCC version: 12.2\n"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn ld_cache_lines_give_name_and_path() {
        let text = "3 libs found in cache `/etc/ld.so.cache'\n\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6\nCache generated by: ldconfig\n";
        assert_eq!(
            parse_ld_cache(text),
            vec![
                (
                    "libcuda.so.1".to_string(),
                    PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1")
                ),
                (
                    "libc.so.6".to_string(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
                ),
            ]
        );
    }

    /// Compiles a real shared object with `soname` (gcc is on every build host).
    fn shared_object(path: &Path, soname: &str) {
        let src = path.with_extension("c");
        std::fs::write(&src, "int ssp_fake(void) { return 1; }\n").unwrap();
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", &format!("-Wl,-soname,{soname}"), "-o"])
            .arg(path)
            .arg(&src)
            .output()
            .expect("cc runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(src).unwrap();
    }

    struct Tree {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        cfg: NvidiaConfig,
    }

    /// A driver 999.1.0 split over a cached dir and a lib_dir, with a stale
    /// libcuda of an older driver in front, and two binaries.
    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let (cached, extra, old, bin) = (
            root.join("cached"),
            root.join("extra"),
            root.join("old"),
            root.join("bin"),
        );
        for d in [&cached, &extra, &old, &bin] {
            std::fs::create_dir_all(d).unwrap();
        }
        shared_object(&cached.join("libnvidia-ml.so.999.1.0"), "libnvidia-ml.so.1");
        shared_object(&extra.join("libcuda.so.999.1.0"), "libcuda.so.1");
        shared_object(
            &extra.join("libnvidia-nvvm.so.999.1.0"),
            "libnvidia-nvvm.so.4",
        );
        shared_object(&old.join("libcuda.so.998.0.0"), "libcuda.so.1");
        // Not an ELF file: never taken.
        std::fs::write(extra.join("libnvidia-cfg.so.999.1.0"), "text").unwrap();
        std::fs::write(bin.join("nvidia-smi"), "#!/bin/sh\n").unwrap();
        std::fs::write(bin.join("nvidia-debugdump"), "#!/bin/sh\n").unwrap();
        let cfg = NvidiaConfig {
            mode: Mode::Bind,
            version_file: root.join("version"),
            ld_cache: root.join("ld.so.cache"),
            lib_dirs: vec![old.clone(), extra.clone()],
            bin_dirs: vec![root.join("nobin"), bin.clone()],
        };
        Tree {
            _tmp: tmp,
            root,
            cfg,
        }
    }

    #[test]
    fn discovery_takes_only_the_driver_version_from_cache_then_lib_dirs() {
        let t = tree();
        // A real loader cache of the fake tree, made without touching the system's
        // (-X: no links are made anywhere; -C/-f: our cache and config only).
        std::fs::write(
            t.root.join("ld.conf"),
            format!("{}\n", t.root.join("cached").display()),
        )
        .unwrap();
        let out = Command::new("ldconfig")
            .arg("-X")
            .arg("-C")
            .arg(&t.cfg.ld_cache)
            .arg("-f")
            .arg(t.root.join("ld.conf"))
            .output()
            .expect("ldconfig runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ld = read_ld_cache(&t.cfg.ld_cache).unwrap();
        assert!(ld.iter().any(|(n, _)| n == "libnvidia-ml.so.1"), "{ld:?}");
        let f = discover(&t.cfg, "999.1.0", &ld).unwrap();
        let names: Vec<&str> = f.libs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["cuda", "nvidia-ml", "nvidia-nvvm"]);
        assert_eq!(f.libs[0].1, t.root.join("extra/libcuda.so.999.1.0"));
        assert_eq!(f.libs[1].1, t.root.join("cached/libnvidia-ml.so.999.1.0"));
        assert_eq!(
            f.bins,
            vec![
                t.root.join("bin/nvidia-smi"),
                t.root.join("bin/nvidia-debugdump")
            ]
        );
        // Without the cache, libnvidia-ml is not found and it is required.
        let e = discover(&t.cfg, "999.1.0", &[]).unwrap_err();
        assert!(
            e.contains("libnvidia-ml.so.999.1.0") && !e.contains("libcuda"),
            "{e}"
        );
        // The old driver's libcuda does not count for it.
        let e = discover(&t.cfg, "998.0.0", &ld).unwrap_err();
        assert!(e.contains("libnvidia-ml.so.998.0.0"), "{e}");
    }

    #[test]
    fn assembly_links_sonames_and_is_idempotent() {
        let t = tree();
        let mut cfg = t.cfg.clone();
        cfg.lib_dirs.push(t.root.join("cached"));
        let found = discover(&cfg, "999.1.0", &[]).unwrap();
        assert_eq!(
            soname(&t.root.join("extra/libnvidia-nvvm.so.999.1.0")).as_deref(),
            Some("libnvidia-nvvm.so.4")
        );
        assert_eq!(soname(&t.root.join("bin/nvidia-smi")), None);
        let state = t.root.join("state");
        let dir = assemble(&state, &found).unwrap();
        assert_eq!(dir, state.join("nvidia/999.1.0"));
        let link = |n: &str| std::fs::read_link(dir.join("lib").join(n)).unwrap();
        assert_eq!(link("libcuda.so.1"), PathBuf::from("libcuda.so.999.1.0"));
        assert_eq!(link("libcuda.so"), PathBuf::from("libcuda.so.1"));
        assert_eq!(
            link("libnvidia-ml.so.1"),
            PathBuf::from("libnvidia-ml.so.999.1.0")
        );
        assert_eq!(
            link("libnvidia-nvvm.so.4"),
            PathBuf::from("libnvidia-nvvm.so.999.1.0")
        );
        // Same filesystem: hard links, the same inode.
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(&dir.join("lib/libcuda.so.999.1.0")),
            ino(&t.root.join("extra/libcuda.so.999.1.0"))
        );
        assert!(dir.join("bin/nvidia-smi").is_file() && dir.join("bin/nvidia-debugdump").is_file());
        // Again: nothing changes, no temporary directory is left.
        assert_eq!(assemble(&state, &found).unwrap(), dir);
        let names: Vec<String> = std::fs::read_dir(state.join("nvidia"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["999.1.0"]);
        // A half-built leftover and an old version go at the next start.
        std::fs::create_dir_all(state.join("nvidia/.999.2.0.tmp/lib")).unwrap();
        std::fs::create_dir_all(state.join("nvidia/998.0.0/lib")).unwrap();
        let mut removed = prune(&state, &["999.1.0".to_string()].into()).unwrap();
        removed.sort();
        assert_eq!(removed, [".999.2.0.tmp", "998.0.0"]);
        assert!(dir.is_dir());
    }

    #[test]
    fn copies_where_a_hard_link_is_impossible() {
        let t = tree();
        let mut cfg = t.cfg.clone();
        cfg.lib_dirs.push(t.root.join("cached"));
        let found = discover(&cfg, "999.1.0", &[]).unwrap();
        // /dev/shm is another filesystem than the temp dir on these hosts; where
        // it is not, the hard link is taken and the content is the same anyway.
        let state = tempfile::tempdir_in("/dev/shm").unwrap();
        let dir = assemble(state.path(), &found).unwrap();
        assert_eq!(
            std::fs::read(dir.join("lib/libcuda.so.999.1.0")).unwrap(),
            std::fs::read(t.root.join("extra/libcuda.so.999.1.0")).unwrap()
        );
    }

    #[test]
    fn follows_a_driver_upgrade_and_keeps_files_while_the_driver_is_away() {
        let t = tree();
        let mut cfg = t.cfg.clone();
        cfg.lib_dirs.push(t.root.join("cached"));
        cfg.ld_cache = t.root.join("no-cache");
        let state = t.root.join("state");
        std::fs::create_dir_all(state.join("nvidia/990.0.0")).unwrap();
        std::fs::write(&cfg.version_file, H200.replace("580.159.04", "999.1.0")).unwrap();
        let nv = Nvidia::start(&cfg, &state);
        let first = version_dir(&state, "999.1.0").display().to_string();
        assert_eq!(nv.userspace(), Userspace::Bind { dir: first.clone() });
        assert!(state.join("nvidia/990.0.0").exists());
        std::fs::create_dir_all(state.join("nvidia/991.0.0")).unwrap();
        let used = version_dir(&state, "991.0.0").display().to_string();
        nv.prune_old(&[used].into());
        assert!(
            !state.join("nvidia/990.0.0").exists(),
            "old versions no container uses go"
        );
        assert!(
            state.join("nvidia/991.0.0").exists(),
            "a version a container still mounts stays"
        );
        assert!(Path::new(&first).is_dir());
        assert!(!nv.refresh(), "same version: nothing to do");
        // The driver is unloaded for an upgrade: containers keep what they have.
        std::fs::remove_file(&cfg.version_file).unwrap();
        assert!(!nv.refresh());
        assert_eq!(nv.userspace(), Userspace::Bind { dir: first.clone() });
        // The new module is loaded before its libraries are installed: the old
        // files stay until the new ones are complete.
        std::fs::write(&cfg.version_file, H200.replace("580.159.04", "999.2.0")).unwrap();
        assert!(!nv.refresh());
        assert_eq!(nv.userspace(), Userspace::Bind { dir: first.clone() });
        // The new driver is there.
        shared_object(
            &t.root.join("cached/libnvidia-ml.so.999.2.0"),
            "libnvidia-ml.so.1",
        );
        shared_object(&t.root.join("extra/libcuda.so.999.2.0"), "libcuda.so.1");
        std::fs::write(&cfg.version_file, H200.replace("580.159.04", "999.2.0")).unwrap();
        assert!(nv.refresh());
        assert_eq!(
            nv.userspace(),
            Userspace::Bind {
                dir: version_dir(&state, "999.2.0").display().to_string()
            }
        );
    }

    #[test]
    fn modes_without_a_driver() {
        let t = tree();
        let state = t.root.join("state");
        let auto = NvidiaConfig {
            mode: Mode::Auto,
            ..t.cfg.clone()
        };
        // No version file and (on build hosts) no nvidia-container-cli: off, until a
        // driver is loaded after the agent started; the next refresh binds it.
        if !on_path("nvidia-container-cli") {
            let mut late = auto.clone();
            late.lib_dirs.push(t.root.join("cached"));
            late.ld_cache = t.root.join("no-cache");
            let nv = Nvidia::start(&late, &state);
            assert_eq!(nv.userspace(), Userspace::Off);
            assert!(!nv.refresh());
            std::fs::write(&late.version_file, H200.replace("580.159.04", "999.1.0")).unwrap();
            assert!(nv.refresh(), "a driver loaded later is bound");
            assert_eq!(
                nv.userspace(),
                Userspace::Bind {
                    dir: version_dir(&state, "999.1.0").display().to_string()
                }
            );
            std::fs::remove_file(&late.version_file).unwrap();
        }
        let runtime = NvidiaConfig {
            mode: Mode::Runtime,
            ..t.cfg.clone()
        };
        assert_eq!(
            Nvidia::start(&runtime, &state).userspace(),
            Userspace::Runtime
        );
        // Bind without a driver mounts nothing.
        assert_eq!(Nvidia::start(&t.cfg, &state).userspace(), Userspace::Off);
        let off = NvidiaConfig {
            mode: Mode::Off,
            ..t.cfg.clone()
        };
        std::fs::write(&off.version_file, H200).unwrap();
        assert_eq!(Nvidia::start(&off, &state).userspace(), Userspace::Off);
    }
}
