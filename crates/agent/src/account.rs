//! The owner's account inside a container: same uid as on the host, their SSH
//! keys, and sudo. One generated script does it. It lives in the instance config
//! ([`SCRIPT_KEY`]); images that carry ssp's `ssp-account` unit read it through
//! the guest API socket and run it at boot, before sshd. For other images, and
//! for changes to a running container, the agent runs it through exec.

use sha2::{Digest, Sha256};
use ssp_lxd::{Client, Instance};
use ssp_proto::InstanceSpec;

/// Instance config key recording which account setup was done.
pub const CONFIG_KEY: &str = "user.ssp.account";
/// Image property (seen as `image.ssp.account` on instances) saying the image
/// runs /etc/ssp/account.sh at boot, before sshd.
const BOOT_PROPERTY: &str = "image.ssp.account";
/// Instance config key holding the script (readable inside through the guest API).
pub const SCRIPT_KEY: &str = "user.ssp.account-script";

/// A hash of what the account should be.
pub fn hash(spec: &InstanceSpec) -> String {
    let mut h = Sha256::new();
    h.update(script(spec));
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// True when the instance's image creates the account at boot.
pub fn created_at_boot(inst: &Instance) -> bool {
    inst.config.get(BOOT_PROPERTY).map(String::as_str) == Some("boot")
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script with the owner's name, uid and keys filled in.
/// Works on full distributions (useradd) and on busybox (adduser). The lab's other
/// members are not in it: they come from the host's members files
/// ([`crate::members`]), so a new member changes no container's script.
pub fn script(spec: &InstanceSpec) -> String {
    if spec.common {
        return common_script(spec);
    }
    format!(
        "#!/bin/sh\n# Written by ssp: the account of this container's owner.\nu={}\nuid={}\nkeys={}\nname={}\nlabgid={}\n{NSSWITCH}{HEAD}{OWNER}{TAIL}{}",
        quote(&spec.owner),
        spec.owner_uid,
        quote(&spec.ssh_keys.join("\n")),
        quote(&spec.name),
        spec.lab_gid,
        lan_network(spec),
    )
}

/// systemd-networkd's file for a static address from the LAN's pool. It matches
/// the LAN NIC's MAC address, so it applies on the LAN only: a container put back
/// on a forwarded port gets a NIC with another MAC, which the image's own eth0 file
/// (DHCP) configures.
pub const LAN_NETWORK_FILE: &str = "/etc/systemd/network/05-ssp-lan.network";

/// For a container on the LAN: its static address (written, and networkd told
/// when it runs), or, by DHCP, no such file. Nothing for other containers, so
/// their scripts are what they were.
fn lan_network(spec: &InstanceSpec) -> String {
    if spec.network != "lan" {
        return String::new();
    }
    let content = if spec.lan_address.is_empty() {
        String::new()
    } else {
        let mut c = format!(
            "# Written by ssp: this container's static address on the LAN.\n[Match]\nName=eth0\nMACAddress={}\n\n[Network]\nAddress={}\n",
            spec.hwaddr, spec.lan_address
        );
        if !spec.lan_gateway.is_empty() {
            c.push_str(&format!("Gateway={}\n", spec.lan_gateway));
        }
        c
    };
    format!(
        "lanfile={}\nlancfg={}\n{LAN_NETWORK}",
        quote(LAN_NETWORK_FILE),
        quote(content.trim_end())
    )
}

const LAN_NETWORK: &str = r#"# The LAN address: static from the pool, or by DHCP (no file).
if [ -d /etc/systemd/network ] && [ "$(cat "$lanfile" 2>/dev/null)" != "$lancfg" ]; then
  if [ -n "$lancfg" ]; then
    printf '%s\n' "$lancfg" > "$lanfile.new" && mv "$lanfile.new" "$lanfile"
  else
    rm -f "$lanfile"
  fi
  if command -v networkctl >/dev/null 2>&1 && networkctl status eth0 >/dev/null 2>&1; then
    networkctl reload && networkctl reconfigure eth0 || true
  fi
fi
"#;

/// GECOS of the accounts ssp makes in a Common-Server; the ones no longer listed go.
pub const COMMON_GECOS: &str = "ssp common account";
/// Where a Common-Server keeps the homes of accounts that were removed.
pub const ARCHIVE_DIR: &str = "/var/lib/ssp-archive";

/// A Common-Server's script: one account per person of `spec.accounts` (uid from the
/// lab range, own group, home readable by them only, their keys, the lab group, no
/// sudo); accounts ssp made that are no longer listed are removed, their homes kept
/// under [`ARCHIVE_DIR`].
fn common_script(spec: &InstanceSpec) -> String {
    let mut calls = String::new();
    for a in &spec.accounts {
        calls.push_str(&format!(
            "ssp_account {} {} {}\n",
            quote(&a.name),
            a.uid,
            quote(&a.ssh_keys.join("\n"))
        ));
    }
    let keep: Vec<&str> = spec.accounts.iter().map(|a| a.name.as_str()).collect();
    format!(
        "#!/bin/sh\n# Written by ssp: the accounts of this Common-Server.\nname={}\nlabgid={}\ngecos={}\narchive={}\nkeep={}\n{NSSWITCH}{HEAD}{COMMON}{calls}{COMMON_CLEANUP}{TAIL}{}",
        quote(&spec.name),
        spec.lab_gid,
        quote(COMMON_GECOS),
        quote(ARCHIVE_DIR),
        quote(&format!(" {} ", keep.join(" "))),
        lan_network(spec),
    )
}

/// `ssp_account NAME UID KEYS`: a person's account in a Common-Server.
const COMMON: &str = r#"if has useradd; then sh=/bin/bash; else sh=/bin/sh; fi
if [ "$labgid" -gt 0 ]; then
  getent group "$labgid" >/dev/null 2>&1 || ssp_group lab "$labgid" 2>/dev/null || ssp_group ssp-lab "$labgid"
  lab=$(getent group "$labgid" | cut -d: -f1)
fi
ssp_account() {
  a=$1; auid=$2
  # The members files (extrausers) already know every person; useradd would
  # refuse, so they are left out of nsswitch.conf until the accounts are made.
  if ! grep -q "^$a:" /etc/passwd 2>/dev/null; then
    if [ -f /etc/nsswitch.conf ] && grep -q extrausers /etc/nsswitch.conf; then
      sed -i -e 's/ \[SUCCESS=merge\]//g' -e 's/[[:space:]]extrausers//g' /etc/nsswitch.conf
    fi
    ssp_group "$a" "$auid"
    ssp_user "$a" "$auid" "$gecos" "$sh" "/home/$a"
  fi
  if [ -n "${lab:-}" ] && ! id -nG "$a" | tr ' ' '
' | grep -qx "$lab"; then
    ssp_join "$a" "$lab"
  fi
  ssp_keyonly "$a"
  rm -f "/etc/sudoers.d/ssp-$a"
  h=$(getent passwd "$a" 2>/dev/null | cut -d: -f6)
  [ -n "$h" ] || h="/home/$a"
  mkdir -p "$h/.ssh"
  chown "$auid:$auid" "$h"
  chmod 0700 "$h"
  printf '%s
' "$3" > "$h/.ssh/authorized_keys.new"
  mv "$h/.ssh/authorized_keys.new" "$h/.ssh/authorized_keys"
  chmod 700 "$h/.ssh"; chmod 600 "$h/.ssh/authorized_keys"
  chown -R "$auid:$auid" "$h/.ssh"
}
"#;

/// Accounts ssp made that are no longer listed: their processes end, the account
/// goes, the home is kept (root only) under the archive folder.
const COMMON_CLEANUP: &str = r#"awk -F: -v g="$gecos" '$5 == g {print $1}' /etc/passwd | while read -r a; do
  case "$keep" in *" $a "*) continue ;; esac
  h=$(awk -F: -v a="$a" '$1 == a {print $6}' /etc/passwd)
  pkill -KILL -u "$a" 2>/dev/null || true
  ssp_deluser "$a" || { sleep 1; pkill -KILL -u "$a" 2>/dev/null || true; ssp_deluser "$a"; }
  rm -f "/etc/sudoers.d/ssp-$a"
  if [ -n "$h" ] && [ -d "$h" ] && [ "$h" != / ]; then
    mkdir -p "$archive"; chmod 0700 "$archive"
    mv "$h" "$archive/$a-$(date +%Y%m%d-%H%M%S)"
  fi
done
"#;

/// `ssp_nsswitch FILE`: adds `extrausers` to the `passwd:` and `group:` lines of an
/// nsswitch.conf (a line is added when missing). In `group:` every service before
/// it gets `[SUCCESS=merge]`, so the lab group's members from the host's file join
/// the container's own `lab` entry (which lists its owner) instead of being hidden
/// by it. Idempotent; other lines are left as they are.
const NSSWITCH: &str = r#"ssp_nsswitch() {
  for db in passwd group; do
    grep -q "^$db:" "$1" || printf '%s:\tfiles\n' "$db" >> "$1"
  done
  awk '
    ($1 == "passwd:" || $1 == "group:") && !/[[:space:]]extrausers([[:space:]]|$)/ {
      line = $1 "\t"
      for (i = 2; i <= NF; i++) {
        line = line (i > 2 ? " " : "") $i
        if ($1 == "group:" && $i !~ /^\[/ && (i == NF || $(i + 1) !~ /^\[/))
          line = line " [SUCCESS=merge]"
      }
      print line " extrausers"
      next
    }
    { print }' "$1" > "$1.ssp-new"
  cmp -s "$1" "$1.ssp-new" || cat "$1.ssp-new" > "$1"
  rm -f "$1.ssp-new"
}
"#;

/// Helpers every account script starts with: the hostname, and accounts through the
/// distribution's tools, busybox's or the files themselves.
const HEAD: &str = r#"set -e
PATH=/usr/sbin:/usr/bin:/sbin:/bin
# One run at a time: the image's boot unit and the agent's exec can overlap (a
# change right after a start), and two runs would both make the same account.
if [ -d /run ] && [ -w /run ] && command -v flock >/dev/null 2>&1; then
  exec 9>/run/ssp-account.lock
  flock 9
fi
# The container's name is its hostname, and it resolves (sudo looks it up).
if [ -n "$name" ]; then
  [ "$(cat /etc/hostname 2>/dev/null)" = "$name" ] || echo "$name" > /etc/hostname
  [ "$(hostname 2>/dev/null)" = "$name" ] || hostname "$name" 2>/dev/null || true
  grep -Eq "^[^#]*[[:space:]]$name([[:space:]]|\$)" /etc/hosts 2>/dev/null ||
    printf '127.0.1.1\t%s\n' "$name" >> /etc/hosts
fi
# Accounts through the distribution's tools, busybox's, or (images with neither,
# such as a bare busybox) the files themselves.
has() { command -v "$1" >/dev/null 2>&1; }
if ! has getent; then
  getent() {
    [ -n "${2:-}" ] || { cat "/etc/$1"; return; }
    awk -F: -v k="$2" '$1 == k || $3 == k { print; f = 1 } END { exit !f }' "/etc/$1"
  }
fi
ssp_group() { # NAME GID: the group, unless that gid exists
  getent group "$2" >/dev/null 2>&1 && return 0
  if has groupadd; then groupadd -g "$2" "$1"
  elif has addgroup; then addgroup -g "$2" "$1"
  else printf '%s:x:%s:\n' "$1" "$2" >> /etc/group; fi
}
ssp_user() { # NAME UID GECOS SHELL HOME (HOME empty: none), primary group = UID
  if has useradd; then
    if [ -n "$5" ]; then useradd -m -u "$2" -g "$2" -c "$3" -s "$4" "$1"
    else useradd -M -N -u "$2" -g "$2" -c "$3" -s "$4" "$1"; fi
  elif has adduser; then
    g=$(getent group "$2" | cut -d: -f1)
    if [ -n "$5" ]; then adduser -D -u "$2" -G "$g" -g "$3" -s "$4" "$1"
    else adduser -H -D -u "$2" -G "$g" -g "$3" -s "$4" "$1"; fi
  else
    printf '%s:x:%s:%s:%s:%s:%s\n' "$1" "$2" "$2" "$3" "${5:-/nonexistent}" "$4" >> /etc/passwd
    if [ -n "$5" ]; then mkdir -p "$5" && chown "$2:$2" "$5"; fi
  fi
}
ssp_join() { # USER GROUP
  if has usermod; then usermod -aG "$2" "$1"
  elif has addgroup && has adduser; then addgroup "$1" "$2"
  else
    sed -i -e "/^$2:/ s/\$/,$1/" -e "/^$2:/ s/:,/:/" /etc/group
  fi
}
# A locked account refuses even key logins in OpenSSH: a new account (locked, or
# without a password) becomes key-only. A password the person set (xrdp logs in
# with one) stays as it is, across restarts and moves.
ssp_keyonly() { # NAME
  has usermod || return 0
  case "$(getent shadow "$1" 2>/dev/null | cut -d: -f2)" in
    ''|'!'|'!!'|'!*') usermod -p '*' "$1" ;;
  esac
}
ssp_deluser() { # NAME
  if has userdel; then userdel "$1"
  elif has deluser; then deluser "$1"
  else sed -i "/^$1:/d" /etc/passwd; sed -i "/^$1:x:[0-9]*:\$/d" /etc/group; fi
}
"#;

/// The owner of a personal container: account, lab group, sudo, keys.
const OWNER: &str = r#"# Made in /etc/passwd unless it is there. In a container whose image came from a
# member's container the lab's members files (extrausers) already know the owner,
# and useradd would refuse: they are left out of nsswitch.conf until the account
# is made (ssp_nsswitch below puts them back).
if ! grep -q "^$u:" /etc/passwd 2>/dev/null; then
  if [ -f /etc/nsswitch.conf ] && grep -q extrausers /etc/nsswitch.conf; then
    sed -i -e 's/ \[SUCCESS=merge\]//g' -e 's/[[:space:]]extrausers//g' /etc/nsswitch.conf
  fi
  if has useradd; then sh=/bin/bash; else sh=/bin/sh; fi
  ssp_group "$u" "$uid"
  ssp_user "$u" "$uid" "" "$sh" "/home/$u"
fi
# The lab group owns the shared folders; the owner is a member, so they can write there.
if [ "$labgid" -gt 0 ]; then
  getent group "$labgid" >/dev/null 2>&1 || ssp_group lab "$labgid" 2>/dev/null || ssp_group ssp-lab "$labgid"
  lab=$(getent group "$labgid" | cut -d: -f1)
  if ! id -nG "$u" | tr ' ' '\n' | grep -qx "$lab"; then
    ssp_join "$u" "$lab"
  fi
fi
ssp_keyonly "$u"
if [ -d /etc/sudoers.d ]; then
  printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$u" > "/etc/sudoers.d/ssp-$u"
  chmod 0440 "/etc/sudoers.d/ssp-$u"
fi
home=$(getent passwd "$u" 2>/dev/null | cut -d: -f6)
[ -n "$home" ] || home="/home/$u"
mkdir -p "$home/.ssh"
printf '%s\n' "$keys" > "$home/.ssh/authorized_keys.new"
mv "$home/.ssh/authorized_keys.new" "$home/.ssh/authorized_keys"
chmod 700 "$home/.ssh"; chmod 600 "$home/.ssh/authorized_keys"
# The account's own uid: an adopted container's owner may have one from before ssp.
chown -R "$(id -u "$u"):$(id -g "$u")" "$home/.ssh"
"#;

/// What every container gets last: the members files through nsswitch and the
/// NVIDIA driver files.
const TAIL: &str = r#"# The lab's members resolve through the host's members files, mounted read-only at
# /var/lib/extrausers, where the image has libnss-extrausers (busybox images do
# without). Entries earlier versions of ssp wrote into /etc/passwd for them go.
for f in /lib/libnss_extrausers.so.2 /usr/lib/libnss_extrausers.so.2 \
         /lib/*/libnss_extrausers.so.2 /usr/lib/*/libnss_extrausers.so.2; do
  if [ -e "$f" ] && [ -f /etc/nsswitch.conf ]; then
    ssp_nsswitch /etc/nsswitch.conf
    break
  fi
done
awk -F: '$5 == "ssp lab member" {print $1}' /etc/passwd | while read -r m; do
  ssp_deluser "$m" 2>/dev/null || true
done
# The host's NVIDIA driver files, which ssp mounts read-only on GPU containers:
# the loader finds the libraries and the binaries are on PATH. Without the
# mount, what this made before goes.
nv=/usr/local/lib/ssp-nvidia
nvconf=/etc/ld.so.conf.d/ssp-nvidia.conf
nvldconfig=
if [ -d "$nv/lib" ]; then
  mkdir -p /etc/ld.so.conf.d /usr/local/bin
  printf '%s\n' "$nv/lib" > "$nvconf"
  for f in "$nv"/bin/*; do
    [ -f "$f" ] && ln -sfn "$f" "/usr/local/bin/${f##*/}"
  done
  nvldconfig=1
elif [ -e "$nvconf" ]; then
  rm -f "$nvconf"
  nvldconfig=1
fi
for l in /usr/local/bin/*; do
  [ -L "$l" ] && [ ! -e "$l" ] || continue
  case "$(readlink "$l")" in "$nv"/bin/*) rm -f "$l" ;; esac
done
if [ -n "$nvldconfig" ] && command -v ldconfig >/dev/null 2>&1; then
  ldconfig || echo "ssp: ldconfig failed" >&2
fi
"#;

/// Runs the script inside the running container now.
pub async fn exec(client: &Client, spec: &InstanceSpec) -> Result<(), String> {
    let out = client
        .exec(&spec.name, &["/bin/sh", "-c", &script(spec)], &[])
        .await
        .map_err(|e| e.to_string())?;
    if out.code != 0 {
        return Err(format!("exit {}: {}", out.code, out.stderr.trim()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_for_the_shell() {
        let spec = InstanceSpec {
            owner: "alice".into(),
            owner_uid: 10000,
            ssh_keys: vec![
                "ssh-ed25519 AAAA it's mine".into(),
                "ssh-ed25519 BBBB".into(),
            ],
            ..Default::default()
        };
        let s = script(&spec);
        assert!(
            s.contains(
                "u='alice'\nuid=10000\nkeys='ssh-ed25519 AAAA it'\\''s mine\nssh-ed25519 BBBB'\n"
            ),
            "{s}"
        );
        assert_ne!(
            hash(&spec),
            hash(&InstanceSpec {
                owner_uid: 10001,
                ..spec.clone()
            })
        );
    }

    #[test]
    fn a_common_server_gets_one_call_per_account_and_no_owner() {
        let spec = InstanceSpec {
            name: "cs".into(),
            owner: "cs".into(),
            owner_uid: 10000,
            lab_gid: 19999,
            common: true,
            accounts: vec![
                ssp_proto::Account {
                    name: "alice".into(),
                    uid: 10001,
                    ssh_keys: vec!["ssh-ed25519 AAAA it's alice".into()],
                },
                ssp_proto::Account {
                    name: "bob".into(),
                    uid: 10002,
                    ssh_keys: vec!["ssh-ed25519 BBBB".into(), "ssh-ed25519 CCCC".into()],
                },
            ],
            ..Default::default()
        };
        let s = script(&spec);
        assert!(
            s.contains("ssp_account 'alice' 10001 'ssh-ed25519 AAAA it'\\''s alice'\n"),
            "{s}"
        );
        assert!(s.contains("ssp_account 'bob' 10002 'ssh-ed25519 BBBB\nssh-ed25519 CCCC'\n"));
        assert!(s.contains("keep=' alice bob '\n"));
        // No owner account, no sudo for anyone.
        assert!(!s.contains("u='cs'") && !s.contains("ALL=(ALL)"), "{s}");
        let mut fewer = spec.clone();
        fewer.accounts.pop();
        assert_ne!(hash(&spec), hash(&fewer));
        // The script parses.
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &s])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn nothing_of_the_other_members_is_in_the_script() {
        let s = script(&InstanceSpec {
            owner: "alice".into(),
            owner_uid: 10000,
            lab_gid: 19999,
            ..Default::default()
        });
        assert!(!s.contains("members="), "{s}");
        // Entries earlier versions wrote for them go; the names come from the
        // host's files through nsswitch.
        assert!(s.contains(r#"awk -F: '$5 == "ssp lab member" {print $1}' /etc/passwd"#));
        assert!(s.contains("ssp_nsswitch /etc/nsswitch.conf"));
    }

    fn nsswitch(before: &str) -> String {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("nsswitch.conf");
        std::fs::write(&f, before).unwrap();
        for _ in 0..2 {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("set -e\n{NSSWITCH}ssp_nsswitch \"$0\""))
                .arg(&f)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        std::fs::read_to_string(&f).unwrap()
    }

    #[test]
    fn nsswitch_gets_extrausers_for_passwd_and_group_once() {
        // Debian 12's file, with the trailing spaces some editors leave.
        let debian = "passwd:         files\ngroup:          files systemd  \nshadow:         files\nhosts:          files dns\n";
        assert_eq!(
            nsswitch(debian),
            "passwd:\tfiles extrausers\ngroup:\tfiles [SUCCESS=merge] systemd [SUCCESS=merge] extrausers\nshadow:         files\nhosts:          files dns\n"
        );
        // Lines already naming it are left alone; missing lines are added; an
        // action already given is kept.
        assert_eq!(
            nsswitch("group: extrausers files\nhosts: files\n"),
            "group: extrausers files\nhosts: files\npasswd:\tfiles extrausers\n"
        );
        assert_eq!(
            nsswitch("passwd: files notextrausers\ngroup: files [NOTFOUND=return] db\n"),
            "passwd:\tfiles notextrausers extrausers\ngroup:\tfiles [NOTFOUND=return] db [SUCCESS=merge] extrausers\n"
        );
    }
}
