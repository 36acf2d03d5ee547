//! Newtypes that reject bad input at the edge with a message naming what is allowed.

use std::fmt;
use std::path::{Component, Path};

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Why an input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct InputError {
    pub what: &'static str,
    pub value: String,
    pub reason: String,
}

impl InputError {
    /// Most characters of the input an error repeats: it reaches terminals and
    /// gRPC status headers, where a long input would bury (or break) the message.
    pub const MAX_ECHO: usize = 80;

    /// A refusal of `value` (its first [`Self::MAX_ECHO`] characters are kept).
    pub fn new(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        InputError {
            what,
            value: value.chars().take(Self::MAX_ECHO).collect(),
            reason: reason.into(),
        }
    }
}

pub(crate) fn bad(what: &'static str, value: &str, reason: impl Into<String>) -> InputError {
    InputError::new(what, value, reason)
}

/// Names that already exist in a Debian system and must not become ssp users.
const RESERVED: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    "messagebus",
    "sshd",
    "systemd-network",
    "systemd-resolve",
    "systemd-timesync",
    "sudo",
    "admin",
    "ssp",
    "default",
];

/// A user name that is both a valid Unix login and a valid instance name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Username(String);

impl Username {
    /// Allowed: 1-31 characters of a-z, 0-9 and '-', starting with a letter, not ending with '-'.
    pub fn parse(s: &str) -> Result<Self, InputError> {
        const RULE: &str =
            "use 1-31 characters a-z, 0-9 and '-', starting with a letter and not ending with '-'";
        let ok_chars = s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if s.is_empty() || s.len() > 31 || !ok_chars {
            return Err(bad("user name", s, RULE));
        }
        if !s.starts_with(|c: char| c.is_ascii_lowercase()) || s.ends_with('-') {
            return Err(bad("user name", s, RULE));
        }
        if RESERVED.contains(&s) {
            return Err(bad(
                "user name",
                s,
                "it is reserved for the system; choose another",
            ));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A host name: same alphabet as user names, up to 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

impl HostName {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && !s.ends_with('-');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(bad(
                "host name",
                s,
                "use 1-63 characters a-z, 0-9 and '-', not starting or ending with '-'",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An address people and programs connect to: an IPv4 or IPv6 address, or a DNS
/// name (labels of letters, digits and '-'). It reaches ssh_config files and URLs,
/// so nothing else (spaces, newlines, quotes, '%') can be in it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NetAddress(String);

impl NetAddress {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        if s.parse::<std::net::IpAddr>().is_ok() {
            return Ok(Self(s.to_string()));
        }
        let label = |l: &str| {
            (1..=63).contains(&l.len())
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let name = s.strip_suffix('.').unwrap_or(s);
        if !name.is_empty() && s.len() <= 253 && name.split('.').all(label) {
            Ok(Self(s.to_string()))
        } else {
            Err(bad(
                "address",
                s,
                "expected an IP address or a DNS name (letters, digits, '-' and '.')",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A gRPC endpoint, `http://HOST:PORT` (an IPv6 address in brackets).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint(String);

impl Endpoint {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        let fail = || {
            bad(
                "endpoint",
                s,
                "expected http://HOST:PORT, e.g. http://10.0.0.5:7401",
            )
        };
        let rest = s.strip_prefix("http://").ok_or_else(fail)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(fail)?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            Some(_) => return Err(fail()),
            None if host.contains(':') => return Err(fail()),
            None => host,
        };
        NetAddress::parse(host).map_err(|_| fail())?;
        match port.parse::<u16>() {
            Ok(p) if p > 0 && port.chars().all(|c| c.is_ascii_digit()) => Ok(Self(s.to_string())),
            _ => Err(fail()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A PCI address in the daemon's form `dddd:bb:dd.f`, lower case.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PciAddress(String);

impl PciAddress {
    /// Accepts `dddd:bb:dd.f`, NVML's `dddddddd:bb:dd.f` and `bb:dd.f`, in any case.
    pub fn parse(s: &str) -> Result<Self, InputError> {
        const RULE: &str = "expected DOMAIN:BUS:DEVICE.FUNCTION in hex, e.g. 0000:17:00.0";
        let lower = s.trim().to_ascii_lowercase();
        let parts: Vec<&str> = lower.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (*d, *b, *df),
            [b, df] => ("0000", *b, *df),
            _ => return Err(bad("PCI address", s, RULE)),
        };
        let (dev, func) = devfn
            .split_once('.')
            .ok_or_else(|| bad("PCI address", s, RULE))?;
        let hex = |x: &str, max: usize| {
            !x.is_empty() && x.len() <= max && x.chars().all(|c| c.is_ascii_hexdigit())
        };
        if !(hex(domain, 8) && hex(bus, 2) && hex(dev, 2) && hex(func, 1)) {
            return Err(bad("PCI address", s, RULE));
        }
        let domain = u32::from_str_radix(domain, 16).map_err(|_| bad("PCI address", s, RULE))?;
        if domain > 0xffff {
            return Err(bad("PCI address", s, "the domain must fit in 16 bits"));
        }
        let bus = u8::from_str_radix(bus, 16).map_err(|_| bad("PCI address", s, RULE))?;
        let dev = u8::from_str_radix(dev, 16).map_err(|_| bad("PCI address", s, RULE))?;
        let func = u8::from_str_radix(func, 16).map_err(|_| bad("PCI address", s, RULE))?;
        if dev > 0x1f || func > 7 {
            return Err(bad(
                "PCI address",
                s,
                "device must be at most 1f and function at most 7",
            ));
        }
        Ok(Self(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An OpenSSH public key line: `TYPE BASE64 [COMMENT]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SshKey(String);

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Longest public key line taken (a 16384-bit RSA key is about 2,800 bytes).
pub const MAX_SSH_KEY_LEN: usize = 8192;
/// Longest comment after a key.
pub const MAX_SSH_KEY_COMMENT: usize = 256;

impl SshKey {
    /// Checks the key type, that the base64 blob decodes, and that the blob names the same type.
    pub fn parse(s: &str) -> Result<Self, InputError> {
        let line = s.trim();
        if line.len() > MAX_SSH_KEY_LEN {
            let head: String = line.chars().take(40).collect();
            return Err(bad(
                "ssh key",
                &format!("{head}..."),
                format!(
                    "{} bytes is too long: at most {MAX_SSH_KEY_LEN}",
                    line.len()
                ),
            ));
        }
        if line.contains(['\n', '\r', '\0']) {
            return Err(bad("ssh key", s, "give one key per line"));
        }
        // Whitespace separates the fields (and is normalised to one space); any other
        // control character would reach authorized_keys and terminals that list keys.
        if line.chars().any(|c| c.is_control() && !c.is_whitespace()) {
            return Err(bad(
                "ssh key",
                s,
                "control characters are not allowed in a key line",
            ));
        }
        let mut it = line.split_whitespace();
        let (Some(kind), Some(blob)) = (it.next(), it.next()) else {
            return Err(bad(
                "ssh key",
                s,
                "expected 'TYPE BASE64 [COMMENT]' as in id_ed25519.pub",
            ));
        };
        if !KEY_TYPES.contains(&kind) {
            return Err(bad(
                "ssh key",
                s,
                format!("key type {kind:?} is not one of {}", KEY_TYPES.join(", ")),
            ));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .map_err(|_| bad("ssh key", s, "the key data is not valid base64"))?;
        let inner = raw
            .get(0..4)
            .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .and_then(|n| raw.get(4..4 + n));
        if inner != Some(kind.as_bytes()) {
            return Err(bad(
                "ssh key",
                s,
                format!("the key data is not a {kind} key"),
            ));
        }
        let comment: Vec<&str> = it.collect();
        let joined = comment.join(" ");
        if joined.len() > MAX_SSH_KEY_COMMENT || joined.chars().any(char::is_control) {
            return Err(bad(
                "ssh key",
                s,
                format!("the comment must be printable and at most {MAX_SSH_KEY_COMMENT} bytes"),
            ));
        }
        let mut out = format!("{kind} {blob}");
        if !comment.is_empty() {
            out.push(' ');
            out.push_str(&comment.join(" "));
        }
        Ok(Self(out))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A size in bytes, parsed from forms like `8GiB`, `512MiB`, `50GB` or `1073741824`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        const RULE: &str = "expected a number with a unit such as 512MiB, 8GiB, 50GB or 2TiB";
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad("size", s, RULE))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "MB" => 1000u64.pow(2),
            "GB" => 1000u64.pow(3),
            "TB" => 1000u64.pow(4),
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            _ => return Err(bad("size", s, RULE)),
        };
        let v = n
            .checked_mul(mult)
            .ok_or_else(|| bad("size", s, "too large"))?;
        if v == 0 {
            return Err(bad("size", s, "must be more than zero"));
        }
        Ok(Self(v))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, m) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if b >= m && b.is_multiple_of(m) {
                return write!(f, "{}{unit}", b / m);
            }
        }
        if b >= 1 << 30 {
            return write!(f, "{:.1}GiB", b as f64 / (1u64 << 30) as f64);
        }
        write!(f, "{b}B")
    }
}

/// How the lab's members may use a shared folder.
///
/// A writable folder belongs to root and the lab group with mode 3775: every member
/// adds files (setgid: they join the lab group), edits files their writer made
/// group-writable, and renames or removes only their own (the sticky bit, as on
/// /tmp). Root in one member's container is none of the others (its idmap holds only
/// the owner's uid and the lab's gid), so it cannot touch their files either.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// Writable by every lab member; each file keeps its writer as owner and only
    /// they rename or remove it. `owner`, the name of this behaviour before every
    /// writable folder had the sticky bit, still parses (and loads from old state) as `rw`.
    #[default]
    #[serde(alias = "owner")]
    Rw,
    /// Read-only inside every container.
    Ro,
}

impl ShareMode {
    /// Parses `rw`, `ro` or the older `owner` (the same as `rw`); empty: `rw`.
    pub fn parse(s: &str) -> Result<Self, InputError> {
        match s {
            "" | "rw" | "owner" => Ok(ShareMode::Rw),
            "ro" => Ok(ShareMode::Ro),
            _ => Err(bad(
                "shared folder mode",
                s,
                "allowed modes are rw (every member adds files; only a file's writer renames or removes it) and ro (read-only)",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ShareMode::Rw => "rw",
            ShareMode::Ro => "ro",
        }
    }
}

/// A host folder shared into a container at `container_path`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SharedFolder {
    pub host_path: String,
    pub container_path: String,
    #[serde(default)]
    pub mode: ShareMode,
}

impl SharedFolder {
    /// Splits `HOST[:CONTAINER[:MODE]]` into its parts, unchecked (CONTAINER
    /// defaults to HOST, MODE to empty).
    pub fn split(s: &str) -> (&str, &str, &str) {
        let mut parts = s.splitn(3, ':');
        let host = parts.next().unwrap_or_default();
        let cont = parts.next().unwrap_or(host);
        (host, cont, parts.next().unwrap_or_default())
    }

    /// Parses `HOST[:CONTAINER[:MODE]]`; the host path must lie under one of `roots`.
    pub fn parse(s: &str, roots: &[String]) -> Result<Self, InputError> {
        let (host, cont, mode) = Self::split(s);
        let with_value = |e: InputError| InputError::new(e.what, s, e.reason);
        Ok(Self::new(host, cont, roots)
            .map_err(with_value)?
            .with_mode(ShareMode::parse(mode).map_err(with_value)?))
    }

    /// The same folder with `mode`.
    pub fn with_mode(mut self, mode: ShareMode) -> Self {
        self.mode = mode;
        self
    }

    /// Checks both paths; the host path must be under one of `roots`.
    pub fn new(host: &str, container: &str, roots: &[String]) -> Result<Self, InputError> {
        for (p, which) in [(host, "host"), (container, "container")] {
            if !p.starts_with('/') {
                return Err(bad(
                    "shared folder",
                    p,
                    format!("the {which} path must be absolute"),
                ));
            }
            if Path::new(p)
                .components()
                .any(|c| matches!(c, Component::ParentDir))
                || p.contains("/../")
            {
                return Err(bad(
                    "shared folder",
                    p,
                    "'..' is not allowed in a shared folder path",
                ));
            }
            if p.contains([',', ':']) || p.chars().any(char::is_control) {
                return Err(bad(
                    "shared folder",
                    p,
                    "paths may not contain ',', ':' or control characters",
                ));
            }
        }
        let under = |root: &str| {
            let root = root.trim_end_matches('/');
            host == root || host.starts_with(&format!("{root}/"))
        };
        if !roots.iter().any(|r| under(r)) {
            return Err(bad(
                "shared folder",
                host,
                if roots.is_empty() {
                    "no shared-folder roots are configured on the coordinator".to_string()
                } else {
                    format!(
                        "it must lie under one of the configured roots: {}",
                        roots.join(", ")
                    )
                },
            ));
        }
        let container = container.trim_end_matches('/');
        for forbidden in [
            "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/boot", "/run",
        ] {
            if container.is_empty()
                || container == forbidden
                || container.starts_with(&format!("{forbidden}/"))
            {
                return Err(bad(
                    "shared folder",
                    if container.is_empty() { "/" } else { container },
                    "the container path may not be / or a system folder (/proc, /sys, /dev, /etc, /usr, /bin, /sbin, /lib, /boot, /run)",
                ));
            }
        }
        Ok(Self {
            host_path: host.trim_end_matches('/').to_string(),
            container_path: container.to_string(),
            mode: ShareMode::default(),
        })
    }
}

macro_rules! string_newtype {
    ($($t:ident),*) => {$(
        impl TryFrom<String> for $t {
            type Error = InputError;
            fn try_from(s: String) -> Result<Self, InputError> { Self::parse(&s) }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String { v.0 }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.0) }
        }
    )*};
}
string_newtype!(Username, HostName, PciAddress, SshKey, NetAddress, Endpoint);

/// An image on the hosts, by alias or fingerprint: 1-128 letters, digits and
/// `- _ . /`, not starting with `-`, `/` or `.`.
pub fn parse_image(s: &str) -> Result<String, InputError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && !s.starts_with(['-', '/', '.']);
    if ok {
        Ok(s.to_string())
    } else {
        Err(bad(
            "image alias",
            s,
            "use letters, digits and - _ . / (an alias of an image on the hosts)",
        ))
    }
}

/// A host label: 1-63 of lowercase letters, digits, `-`, `_`, `.` and `=`, starting
/// with a letter or digit (e.g. `ib`, `nvlink`, `rack=a3`).
pub fn parse_label(s: &str) -> Result<String, InputError> {
    let ok = (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.=".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(bad(
            "host label",
            s,
            "use 1-63 lowercase letters, digits, '-', '_', '.' or '=', starting with a letter or digit, e.g. ib or rack=a3",
        ))
    }
}

/// Prefix of the snapshots a schedule takes (and prunes).
pub const SCHEDULED_SNAPSHOT_PREFIX: &str = "auto-";
/// Prefix of the snapshots a move takes as its common base (removed afterwards).
pub const MOVE_SNAPSHOT_PREFIX: &str = "ssp-";

/// A snapshot's name: 1-63 letters, digits, `-`, `_` and `.`, starting with a
/// letter or digit. With `for_create`, the prefixes ssp keeps for its own
/// snapshots (`auto-`, `ssp-`) are refused; any other name may be restored or
/// deleted except a move's.
pub fn parse_snapshot_name(s: &str, for_create: bool) -> Result<String, InputError> {
    let ok = (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(bad(
            "snapshot name",
            s,
            "use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit, e.g. before-upgrade",
        ));
    }
    if s.starts_with(MOVE_SNAPSHOT_PREFIX) {
        return Err(bad(
            "snapshot name",
            s,
            "names starting with 'ssp-' belong to moves between hosts",
        ));
    }
    if for_create && s.starts_with(SCHEDULED_SNAPSHOT_PREFIX) {
        return Err(bad(
            "snapshot name",
            s,
            "names starting with 'auto-' belong to the snapshot schedule; pick another",
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names() {
        for ok in ["before-upgrade", "snap-20261201-104500", "v1.2", "A_b"] {
            assert_eq!(parse_snapshot_name(ok, true).as_deref(), Ok(ok));
        }
        assert!(parse_snapshot_name("auto-20261201-000000", false).is_ok());
        for no in ["", "-x", ".x", "a/b", "a b", "ssp-move-3", &"x".repeat(64)] {
            let e = parse_snapshot_name(no, false).unwrap_err();
            assert_eq!(e.what, "snapshot name", "{no:?}");
        }
        let e = parse_snapshot_name("auto-1", true).unwrap_err();
        assert!(e.reason.contains("schedule"), "{e}");
    }

    #[test]
    fn addresses_and_endpoints() {
        for ok in [
            "10.0.0.5",
            "fd00::5",
            "gpu1",
            "gpu1.lab.example",
            "gpu1.lab.example.",
        ] {
            assert!(NetAddress::parse(ok).is_ok(), "{ok}");
        }
        for no in [
            "",
            "10.0.0.5\n    ProxyCommand touch /tmp/x",
            "a b",
            "-gpu",
            "gpu_1",
            "host%x",
            "x..y",
            "[fd00::5]",
        ] {
            assert!(NetAddress::parse(no).is_err(), "{no:?}");
        }
        for ok in [
            "http://10.0.0.5:7401",
            "http://[fd00::5]:7401",
            "http://gpu1:1",
        ] {
            assert!(Endpoint::parse(ok).is_ok(), "{ok}");
        }
        for no in [
            "10.0.0.5:7401",
            "http://10.0.0.5",
            "http://10.0.0.5:0",
            "http://10.0.0.5:7401/x",
            "http://fd00::5:7401",
            "http://a b:1",
            "https://10.0.0.5:7401",
        ] {
            assert!(Endpoint::parse(no).is_err(), "{no}");
        }
    }

    #[test]
    fn usernames() {
        for ok in ["alice", "gdw", "a", "bob-2", "x1"] {
            assert!(Username::parse(ok).is_ok(), "{ok}");
        }
        for no in [
            "",
            "Alice",
            "1abc",
            "a_b",
            "bob-",
            "a.b",
            "root",
            "x/y",
            &"a".repeat(32),
            "al ice",
        ] {
            assert!(Username::parse(no).is_err(), "{no}");
        }
        let e = Username::parse("Bob").unwrap_err().to_string();
        assert!(e.contains("user name \"Bob\"") && e.contains("a-z"), "{e}");
    }

    #[test]
    fn pci_addresses_normalise() {
        assert_eq!(
            PciAddress::parse("00000000:17:00.0").unwrap().as_str(),
            "0000:17:00.0"
        );
        assert_eq!(
            PciAddress::parse("0000:AF:1F.7").unwrap().as_str(),
            "0000:af:1f.7"
        );
        assert_eq!(
            PciAddress::parse("3b:00.0").unwrap().as_str(),
            "0000:3b:00.0"
        );
        for no in [
            "",
            "17:00",
            "0000:17:00.8",
            "zz:00.0",
            "0000:17:20.0",
            "1:2:3:4.0",
        ] {
            assert!(PciAddress::parse(no).is_err(), "{no}");
        }
    }

    #[test]
    fn ssh_keys() {
        let good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M alice@lab";
        assert_eq!(SshKey::parse(good).unwrap().as_str(), good);
        assert!(SshKey::parse(
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M"
        )
        .is_err());
        assert!(SshKey::parse("ssh-ed25519 !!!notbase64").is_err());
        assert!(SshKey::parse("ssh-dss AAAA").is_err());
        assert!(SshKey::parse("hello").is_err());
        assert!(SshKey::parse(&format!("{good}\nssh-ed25519 x")).is_err());
        // Tabs separate fields like spaces; other control characters are refused
        // (an escape sequence in a comment would reach every terminal listing keys).
        assert_eq!(
            SshKey::parse(&good.replace(' ', "\t")).unwrap().as_str(),
            good
        );
        for c in ['\x1b', '\x7f', '\x08', '\u{9b}'] {
            let e = SshKey::parse(&format!("{good}{c}[2J")).unwrap_err();
            assert!(e.reason.contains("control characters"), "{c:?}: {e}");
        }
    }

    #[test]
    fn refusals_echo_at_most_80_characters_of_the_input() {
        let long = "x".repeat(10_000);
        let roots = vec!["/srv/ssp/shared".to_string()];
        for e in [
            SharedFolder::parse(&format!("/srv/ssp/shared/a:/b:{long}"), &roots).unwrap_err(),
            SharedFolder::parse(&format!("relative{long}"), &roots).unwrap_err(),
            crate::Role::parse(&long).unwrap_err(),
            crate::HostStatus::parse(&long).unwrap_err(),
            Username::parse(&long).unwrap_err(),
        ] {
            assert_eq!(e.value.chars().count(), InputError::MAX_ECHO, "{}", e.what);
        }
        // Cut by characters, never inside one.
        let e = Username::parse(&"é".repeat(100)).unwrap_err();
        assert_eq!(e.value, "é".repeat(80));
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("8GiB").unwrap().0, 8 << 30);
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("50GB").unwrap().0, 50_000_000_000);
        assert_eq!(ByteSize::parse("1024").unwrap().0, 1024);
        for no in ["", "GiB", "8 parsecs", "-1GiB", "0", "99999999999999TiB"] {
            assert!(ByteSize::parse(no).is_err(), "{no}");
        }
        assert_eq!(ByteSize(8 << 30).to_string(), "8GiB");
    }

    #[test]
    fn shared_folders() {
        let roots = vec!["/srv/ssp/shared".to_string()];
        let s = SharedFolder::parse("/srv/ssp/shared/team:/shared", &roots).unwrap();
        assert_eq!(s.host_path, "/srv/ssp/shared/team");
        assert_eq!(s.container_path, "/shared");
        assert!(SharedFolder::parse("/srv/ssp/shared", &roots).is_ok());
        for no in [
            "/srv/ssp/shared/../etc:/x",
            "/etc:/shared",
            "/srv/ssp/sharedx:/x",
            "relative:/x",
            "/srv/ssp/shared/t:/proc/x",
            "/srv/ssp/shared/t:/",
            "/srv/ssp/shared/t:/data/..",
            "/srv/ssp/shared/t\r:/x",
            "/srv/ssp/shared/t:/x\ty",
            "/srv/ssp/shared/t:/x\x1b[2J",
        ] {
            assert!(SharedFolder::parse(no, &roots).is_err(), "{no}");
        }
        assert_eq!(s.mode, ShareMode::Rw);
        let ro = SharedFolder::parse("/srv/ssp/shared/papers:/papers:ro", &roots).unwrap();
        assert_eq!(
            (ro.container_path.as_str(), ro.mode),
            ("/papers", ShareMode::Ro)
        );
        // `owner` is the older name of what `rw` now is, from specs and state stored
        // before; it parses and loads as `rw`.
        let own = SharedFolder::parse("/srv/ssp/shared/drop:/drop:owner", &roots).unwrap();
        assert_eq!(own.mode, ShareMode::Rw);
        let old: SharedFolder = serde_json::from_str(
            r#"{"host_path":"/srv/ssp/shared/drop","container_path":"/drop","mode":"owner"}"#,
        )
        .unwrap();
        assert_eq!(old.mode, ShareMode::Rw);
        assert_eq!(
            serde_json::to_string(&old.mode).unwrap(),
            r#""rw""#,
            "written back under its current name"
        );
        let e = SharedFolder::parse("/srv/ssp/shared/x:/x:rwx", &roots)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rwx") && e.contains("rw (") && e.contains("ro ("),
            "{e}"
        );
        let e = SharedFolder::parse("/srv/ssp/shared/../etc:/x", &roots)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'..'"), "{e}");
    }
}
