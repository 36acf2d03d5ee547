//! The NVIDIA driver's user-space in a GPU container, on a real Incus daemon:
//! the agent finds a (fake, but real ELF) driver on the host, mounts its files
//! read-only, the loader inside finds the libraries, `nvidia-smi` runs from PATH;
//! after a driver upgrade on the host, the running container gets the new files
//! at the next resync without being recreated.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{run, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform, Scratch};

const NVML: &str = "const char *ssp_fake_driver_version(void) { return \"VERSION\"; }\n";
const CUDA: &str = "int cuInit(unsigned int flags) { return (int)flags; }\n";
const SMI: &str = "#include <stdio.h>\nconst char *ssp_fake_driver_version(void);\nint main(void) { printf(\"NVIDIA-SMI (ssp test)  Driver Version: %s\\n\", ssp_fake_driver_version()); return 0; }\n";

fn cc(args: &[&str], dir: &Path) -> Result<()> {
    run(Command::new("cc").args(args).current_dir(dir)).map(|_| ())
}

/// Installs driver `version` into `root/{lib,bin}` as a driver package would:
/// versioned libraries (the old version's removed), nvidia-smi and the version file.
fn install_driver(root: &Path, version: &str) -> Result<()> {
    let (lib, bin, build) = (root.join("lib"), root.join("bin"), root.join("build"));
    for d in [&lib, &bin, &build] {
        std::fs::create_dir_all(d)?;
    }
    for e in std::fs::read_dir(&lib)? {
        std::fs::remove_file(e?.path())?;
    }
    std::fs::write(build.join("nvml.c"), NVML.replace("VERSION", version))?;
    std::fs::write(build.join("cuda.c"), CUDA)?;
    std::fs::write(build.join("smi.c"), SMI)?;
    let nvml = lib.join(format!("libnvidia-ml.so.{version}"));
    let cuda = lib.join(format!("libcuda.so.{version}"));
    cc(
        &[
            "-shared",
            "-fPIC",
            "-Wl,-soname,libnvidia-ml.so.1",
            "-o",
            nvml.to_str().unwrap_or_default(),
            "nvml.c",
        ],
        &build,
    )?;
    cc(
        &[
            "-shared",
            "-fPIC",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            cuda.to_str().unwrap_or_default(),
            "cuda.c",
        ],
        &build,
    )?;
    // nvidia-smi needs libnvidia-ml.so.1 (its soname) at run time, like the real one.
    let dev_link = build.join("libnvidia-ml.so");
    let _ = std::fs::remove_file(&dev_link);
    std::os::unix::fs::symlink(&nvml, &dev_link)?;
    let smi = bin.join("nvidia-smi");
    let _ = std::fs::remove_file(&smi);
    cc(
        &[
            "-o",
            smi.to_str().unwrap_or_default(),
            "smi.c",
            "-L.",
            "-lnvidia-ml",
        ],
        &build,
    )?;
    std::fs::write(
        root.join("version"),
        format!("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {version}  Release Build  (ssp test)\nGCC version:  gcc\n"),
    )?;
    Ok(())
}

/// Waits until the account script ran at boot (ssp's debian-ssh image runs it
/// in the `ssp-account` unit) and fails unless it succeeded.
fn account_script_succeeded(host: &Host, name: &str) -> Result<()> {
    let show = |p: &str| host.exec(name, &format!("systemctl show -p {p} --value ssp-account"));
    wait_for(
        &format!("{name}'s account script to run"),
        Duration::from_secs(90),
        || {
            show("ExecMainExitTimestampMonotonic")
                .ok()
                .filter(|t| !matches!(t.trim(), "" | "0"))
        },
    )?;
    let result = show("Result")?;
    ensure!(
        result.trim() == "success",
        "the account script in {name} ended with {result:?}: {}",
        host.exec(name, "journalctl -u ssp-account --no-pager | tail -20")
            .unwrap_or_default()
    );
    Ok(())
}

#[test]
fn driver_userspace_in_gpu_containers_follows_the_host_driver() -> Result<()> {
    let mut host = Host::start("nv", Kind::Incus, 71)?;
    let inv = host.fake_gpus(&[71])?;
    let drv = Scratch::new("nv-driver")?;
    let root = drv.path();
    install_driver(root, "999.1.0")?;
    // A real loader cache of the fake driver, made without touching the system's
    // (-X: no links; -C and -f: this cache and this config only).
    std::fs::write(
        root.join("ld.so.conf"),
        format!("{}\n", root.join("lib").display()),
    )?;
    run(Command::new("ldconfig")
        .arg("-X")
        .arg("-C")
        .arg(root.join("ld.so.cache"))
        .arg("-f")
        .arg(root.join("ld.so.conf")))?;
    let extra = format!(
        "[nvidia]\nmode = \"bind\"\nversion_file = \"{v}\"\nld_cache = \"{c}\"\nlib_dirs = []\nbin_dirs = [\"{b}\"]\n",
        v = root.join("version").display(),
        c = root.join("ld.so.cache").display(),
        b = root.join("bin").display(),
    );
    let p = Platform::start(
        "nv",
        &[AgentSpec {
            gpu_inventory: Some(inv),
            extra_config: &extra,
            ..AgentSpec::new(&host)
        }],
    )?;
    let agent_log = || p.agents[0].log_tail();
    let key = ssh_keypair(p.scratch.path(), "nvuser")?;
    p.ctl_ok(&[
        "user",
        "add",
        "nvuser",
        "--ssh-key",
        &format!("{}.pub", key.display()),
        "--gpus",
        "1",
    ])?;
    let uuid = host.uuid("nvuser")?;

    // The driver's files are mounted read-only from the agent's versioned directory.
    let source = host.cli_run(&["config", "device", "get", "nvuser", "ssp-nvidia", "source"])?;
    ensure!(
        source.trim().ends_with("/nvidia/999.1.0"),
        "ssp-nvidia source is {source:?}\nagent log:\n{}",
        agent_log()
    );
    let smi = |who: &str| host.exec("nvuser", &format!("su - {who} -c nvidia-smi 2>&1"));
    // The account script (run at boot, before sshd) sets up the loader and PATH.
    let out = wait_for(
        "nvidia-smi to run inside as the user",
        Duration::from_secs(90),
        || smi("nvuser").ok().filter(|o| o.contains("Driver Version")),
    )
    .with_context(|| format!("agent log:\n{}", agent_log()))?;
    ensure!(
        out.contains("Driver Version: 999.1.0"),
        "nvidia-smi printed {out:?}"
    );
    account_script_succeeded(&host, "nvuser")?;
    let which = host.exec("nvuser", "su - nvuser -c 'command -v nvidia-smi'")?;
    ensure!(
        which.trim() == "/usr/local/bin/nvidia-smi",
        "nvidia-smi is at {which:?}"
    );
    let mounts = host.exec("nvuser", "grep ' /usr/local/lib/ssp-nvidia ' /proc/mounts")?;
    ensure!(
        mounts
            .split_whitespace()
            .nth(3)
            .is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "/usr/local/lib/ssp-nvidia is not mounted read-only: {mounts:?}"
    );
    let write = host.exec(
        "nvuser",
        "touch /usr/local/lib/ssp-nvidia/lib/x 2>&1 && echo written || echo refused",
    )?;
    ensure!(
        write.trim().ends_with("refused"),
        "writing into the driver files: {write:?}"
    );
    let cache = host.exec("nvuser", "ldconfig -p")?;
    for so in ["libnvidia-ml.so.1", "libcuda.so.1"] {
        let want = format!("=> /usr/local/lib/ssp-nvidia/lib/{so}");
        ensure!(
            cache
                .lines()
                .any(|l| l.trim_start().starts_with(so) && l.trim_end().ends_with(&want)),
            "ldconfig -p inside lacks {so} {want}:\n{}",
            cache
                .lines()
                .filter(|l| l.contains("nvidia") || l.contains("cuda"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    // A container without GPUs gets none of it, and its account script still succeeds.
    p.ctl_ok(&[
        "user",
        "add",
        "nvplain",
        "--ssh-key",
        &format!("{}.pub", key.display()),
    ])?;
    let devices = host.cli_run(&["config", "device", "show", "nvplain"])?;
    ensure!(
        !devices.contains("ssp-nvidia"),
        "a container without GPUs got the driver files:\n{devices}"
    );
    account_script_succeeded(&host, "nvplain")?;
    let none = host.exec(
        "nvplain",
        "command -v nvidia-smi || test -e /etc/ld.so.conf.d/ssp-nvidia.conf && echo found || echo none",
    )?;
    ensure!(
        none.trim() == "none",
        "nvidia files in a container without GPUs: {none:?}"
    );

    // The host's driver is upgraded: the next resync gives the running container
    // the new files, and it is not recreated.
    install_driver(root, "999.2.0")?;
    let out = wait_for(
        "nvidia-smi inside to print the new driver version",
        Duration::from_secs(60),
        || smi("nvuser").ok().filter(|o| o.contains("999.2.0")),
    )
    .with_context(|| {
        format!(
            "nvidia-smi prints {:?}\nagent log:\n{}",
            smi("nvuser"),
            agent_log()
        )
    })?;
    ensure!(
        out.contains("Driver Version: 999.2.0"),
        "nvidia-smi printed {out:?}"
    );
    let source = host.cli_run(&["config", "device", "get", "nvuser", "ssp-nvidia", "source"])?;
    ensure!(
        source.trim().ends_with("/nvidia/999.2.0"),
        "ssp-nvidia source is {source:?}"
    );
    ensure!(
        host.uuid("nvuser")? == uuid,
        "the container was recreated (volatile.uuid changed) for a driver upgrade"
    );
    Ok(())
}
