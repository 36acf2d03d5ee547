//! Property tests of the input parsers and the state machine.
//!
//! Bounded so they run as ordinary tests: a fixed number of cases per property and
//! a fixed seed, no failure files. `PROPTEST_CASES=100000` or `PROPTEST_RNG_SEED=N`
//! in the environment run longer or other cases locally.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, RngSeed};

use ssp_model::state::Numbers;
use ssp_model::{
    parse_image, parse_label, ByteSize, Command, Constraints, Endpoint, Gpu, Host, HostName,
    HostStatus, Image, InputError, Inventory, Limits, MigrationCommand, MigrationPhase, NetAddress,
    NewUser, Outcome, PciAddress, Pool, Role, Settings, ShareMode, SharedFolder, SshKey, State,
    UserKind, Username,
};

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5350_0001),
        max_shrink_iters: 4096,
        ..Config::default()
    }
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M alice@lab";
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

// ---------- strings ----------

/// Characters that parsers treat specially, that look like others, or that break
/// lines, terminals and configuration files.
const TRICKY: &[char] = &[
    'a',
    'z',
    'A',
    'Z',
    'f',
    'F',
    'g',
    '0',
    '1',
    '7',
    '9',
    '-',
    '_',
    '.',
    ':',
    '/',
    '[',
    ']',
    '@',
    '=',
    '%',
    ',',
    ';',
    '\'',
    '"',
    '\\',
    '+',
    '!',
    '*',
    '?',
    '~',
    '$',
    ' ',
    '\t',
    '\n',
    '\r',
    '\0',
    '\x0b',
    '\x0c',
    '\x1b',
    '\x7f',
    '\u{85}',
    '\u{a0}',
    '\u{2028}',
    '\u{200b}',
    '\u{202e}',
    '\u{feff}',
    '\u{212a}',
    '\u{130}',
    '\u{131}',
    'é',
    'ß',
    '\u{ff10}',
    '\u{1f600}',
];

fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![3 => select(TRICKY), 1 => any::<char>()]
}

/// Any string: arbitrary unicode, runs of tricky characters, and very long inputs.
fn messy() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => vec(tricky_char(), 0..40).prop_map(|v| v.into_iter().collect()),
        2 => any::<String>(),
        1 => vec(any::<char>(), 0..300).prop_map(|v| v.into_iter().collect()),
        1 => (vec(tricky_char(), 1..8), 1..3000usize)
            .prop_map(|(v, n)| v.into_iter().collect::<String>().repeat(n)),
    ]
}

/// One edit of a string, at positions chosen relative to its length.
#[derive(Debug, Clone)]
enum Edit {
    Insert(Index, char),
    Delete(Index),
    Replace(Index, char),
    Truncate(Index),
    Repeat(Index, Index),
    Upper,
    Append(String),
    Prepend(String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), tricky_char()).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<Index>().prop_map(Edit::Delete),
        (any::<Index>(), tricky_char()).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::Repeat(a, b)),
        Just(Edit::Upper),
        vec(tricky_char(), 1..6).prop_map(|v| Edit::Append(v.into_iter().collect())),
        vec(tricky_char(), 1..6).prop_map(|v| Edit::Prepend(v.into_iter().collect())),
    ]
}

fn apply_edits(s: &str, edits: &[Edit]) -> String {
    let mut c: Vec<char> = s.chars().collect();
    for e in edits {
        let n = c.len();
        match e {
            Edit::Insert(i, ch) => c.insert(i.index(n + 1), *ch),
            Edit::Delete(i) if n > 0 => {
                c.remove(i.index(n));
            }
            Edit::Replace(i, ch) if n > 0 => c[i.index(n)] = *ch,
            Edit::Truncate(i) => c.truncate(i.index(n + 1)),
            Edit::Repeat(a, b) if n > 0 => {
                let (a, b) = (a.index(n), b.index(n));
                let (a, b) = (a.min(b), a.max(b));
                let part: Vec<char> = c[a..=b].to_vec();
                c.splice(b + 1..b + 1, part);
            }
            Edit::Upper => {
                c = c
                    .iter()
                    .collect::<String>()
                    .to_uppercase()
                    .chars()
                    .collect()
            }
            Edit::Append(t) => c.extend(t.chars()),
            Edit::Prepend(t) => c.splice(0..0, t.chars()).for_each(drop),
            _ => {}
        }
    }
    c.into_iter().collect()
}

/// Valid examples with a few edits: the near misses a parser must still judge.
fn mutated(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    (select(valid), vec(edit(), 0..5)).prop_map(|(s, e)| apply_edits(s, &e))
}

/// Arbitrary strings and mutations of `valid`.
fn input(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![mutated(valid), messy()]
}

/// What every refusal must be: a message that names what was wrong, whose echo of
/// the input is bounded and escaped (it reaches terminals and gRPC status headers).
fn check_error(e: &InputError) -> Result<(), TestCaseError> {
    prop_assert!(!e.what.is_empty() && !e.reason.is_empty(), "{:?}", e);
    prop_assert!(
        e.value.chars().count() <= InputError::MAX_ECHO,
        "unbounded echo in {:?}",
        e
    );
    let shown = e.to_string();
    prop_assert!(!shown.contains(['\n', '\r', '\0', '\x1b']), "{:?}", shown);
    Ok(())
}

fn no_controls(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// Display and serde both give back the same value.
fn round_trips<T>(v: &T, parse: impl Fn(&str) -> Result<T, InputError>) -> Result<(), TestCaseError>
where
    T: std::fmt::Display + std::fmt::Debug + PartialEq + serde::Serialize,
    T: serde::de::DeserializeOwned,
{
    let back = parse(&v.to_string());
    prop_assert_eq!(back.as_ref(), Ok(v));
    let json = serde_json::to_string(v).unwrap();
    prop_assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), v);
    Ok(())
}

const USERNAMES: &[&str] = &["alice", "bob-2", "x1", "a", "gdw", "root", "a-b-c"];
const HOSTNAMES: &[&str] = &["gpu1", "h-1", "0node", "a"];
const ADDRESSES: &[&str] = &[
    "10.0.0.5",
    "fd00::5",
    "::ffff:1.2.3.4",
    "gpu1",
    "gpu1.lab.example",
    "gpu1.lab.example.",
];
const ENDPOINTS: &[&str] = &[
    "http://10.0.0.5:7401",
    "http://[fd00::5]:7401",
    "http://gpu1:1",
    "http://gpu1.lab.example:65535",
];
const PCIS: &[&str] = &[
    "0000:17:00.0",
    "00000000:17:00.0",
    "3b:00.0",
    "0000:AF:1F.7",
];
const SIZES: &[&str] = &[
    "8GiB",
    "512MiB",
    "50GB",
    "1024",
    "1 TiB",
    " 5k ",
    "18446744073709551615",
];
const SHARES: &[&str] = &[
    "/srv/ssp/shared/team:/shared",
    "/srv/ssp/shared/x:/x:ro",
    "/srv/ssp/shared:/data:owner",
    "/srv/ssp/shared/a/b",
    "/srv/ssp/shared/t:/home/x/",
];
const WORDS: &[&str] = &[
    "rw", "ro", "owner", "user", "admin", "ready", "draining", "down", "",
];

fn roots() -> Vec<String> {
    vec!["/srv/ssp/shared".into(), "/data/".into()]
}

// ---------- valid values by construction ----------

fn valid_username() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,29}[a-z0-9])?"
}

fn valid_hostname() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
}

fn dns_name() -> impl Strategy<Value = String> {
    (
        vec("[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", 1..5),
        any::<bool>(),
    )
        .prop_map(|(labels, dot)| labels.join(".") + if dot { "." } else { "" })
}

/// A structurally valid public key: the blob names the key type.
fn valid_key() -> impl Strategy<Value = (String, String)> {
    (
        select(KEY_TYPES),
        vec(any::<u8>(), 0..80),
        vec("[!-~]{1,12}", 0..3),
    )
        .prop_map(|(kind, rest, comment)| {
            let mut blob = (kind.len() as u32).to_be_bytes().to_vec();
            blob.extend(kind.as_bytes());
            blob.extend(rest);
            let b64 = base64::engine::general_purpose::STANDARD.encode(blob);
            let line = std::iter::once(kind.to_string())
                .chain(std::iter::once(b64))
                .chain(comment)
                .collect::<Vec<_>>()
                .join(" ");
            (kind.to_string(), line)
        })
}

// ---------- parsers ----------

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn usernames_never_panic_and_what_they_accept_is_a_login(s in input(USERNAMES)) {
        match Username::parse(&s) {
            Ok(u) => {
                prop_assert_eq!(u.as_str(), s.as_str());
                prop_assert!((1..=31).contains(&s.len()));
                prop_assert!(s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
                prop_assert!(s.starts_with(|c: char| c.is_ascii_lowercase()) && !s.ends_with('-'));
                round_trips(&u, Username::parse)?;
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn host_names_never_panic_and_round_trip(s in input(HOSTNAMES)) {
        match HostName::parse(&s) {
            Ok(h) => {
                prop_assert!((1..=63).contains(&s.len()) && h.as_str() == s);
                prop_assert!(s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
                round_trips(&h, HostName::parse)?;
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn net_addresses_accept_nothing_that_could_break_an_ssh_config(s in input(ADDRESSES)) {
        match NetAddress::parse(&s) {
            Ok(a) => {
                prop_assert_eq!(a.as_str(), s.as_str());
                prop_assert!(s.len() <= 253);
                prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || ".:-".contains(c)), "{:?}", s);
                round_trips(&a, NetAddress::parse)?;
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn endpoints_are_http_host_port_and_nothing_else(s in input(ENDPOINTS)) {
        match Endpoint::parse(&s) {
            Ok(e) => {
                prop_assert!(s.starts_with("http://"));
                prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || ".:-/[]".contains(c)), "{:?}", s);
                prop_assert_eq!(s.matches('/').count(), 2);
                let (host, port) = s["http://".len()..].rsplit_once(':').unwrap();
                prop_assert!(port.parse::<u16>().is_ok_and(|p| p > 0));
                let host = host.trim_start_matches('[').trim_end_matches(']');
                prop_assert!(NetAddress::parse(host).is_ok());
                round_trips(&e, Endpoint::parse)?;
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn pci_addresses_normalise_to_one_form(s in input(PCIS)) {
        match PciAddress::parse(&s) {
            Ok(p) => {
                let c: Vec<char> = p.as_str().chars().collect();
                prop_assert_eq!(c.len(), 12, "{}", p);
                prop_assert!(c.iter().enumerate().all(|(i, ch)| match i {
                    4 | 7 => *ch == ':',
                    10 => *ch == '.',
                    _ => ch.is_ascii_digit() || ('a'..='f').contains(ch),
                }), "{}", p);
                prop_assert!(c[8] <= '1' && c[11] <= '7', "{}", p);
                round_trips(&p, PciAddress::parse)?;
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn ssh_keys_accepted_are_one_clean_line(s in prop_oneof![
        input(&[KEY, "ssh-rsa AAAAB3NzaC1yc2E= x", "  ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 a b  c \n"]),
        valid_key().prop_map(|(_, k)| k),
        (valid_key(), vec(edit(), 1..4)).prop_map(|((_, k), e)| apply_edits(&k, &e)),
    ]) {
        match SshKey::parse(&s) {
            Ok(k) => {
                let line = k.as_str();
                prop_assert!(no_controls(line), "control character in {:?}", line);
                prop_assert!(!line.chars().any(|c| c.is_whitespace() && c != ' '), "{:?}", line);
                prop_assert!(!line.starts_with(' ') && !line.ends_with(' ') && !line.contains("  "));
                let kind = line.split(' ').next().unwrap();
                prop_assert!(KEY_TYPES.contains(&kind));
                round_trips(&k, SshKey::parse)?;
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn well_formed_keys_are_accepted_as_given((kind, line) in valid_key()) {
        let k = SshKey::parse(&line);
        prop_assert!(k.is_ok(), "{:?}: {:?}", line, k);
        let k = k.unwrap();
        prop_assert_eq!(k.as_str(), line.as_str());
        prop_assert!(k.as_str().starts_with(&kind));
        // Surrounding whitespace and a trailing newline (a .pub file) are fine too.
        prop_assert_eq!(SshKey::parse(&format!("  {line}\n")), Ok(k));
    }

    #[test]
    fn sizes_are_positive_and_never_print_as_another_size(s in input(SIZES)) {
        match ByteSize::parse(&s) {
            Ok(b) => {
                prop_assert!(b.0 > 0);
                // People read the figure; a figure that parses must be this size.
                let shown = b.to_string();
                match ByteSize::parse(&shown) {
                    Ok(back) => prop_assert_eq!(back, b),
                    Err(_) => prop_assert!(shown.contains('.'), "{} shows as {}", b.0, shown),
                }
            }
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn sizes_with_units_multiply_exactly(
        n in prop_oneof![0u64..5000, any::<u64>(), Just(u64::MAX)],
        (unit, mult) in select(vec![
            ("", 1u64), ("B", 1), ("KB", 1000), ("kB", 1000), ("MB", 1_000_000),
            ("GB", 1_000_000_000), ("TB", 1_000_000_000_000), ("K", 1 << 10), ("KiB", 1 << 10),
            ("M", 1 << 20), ("MiB", 1 << 20), ("G", 1 << 30), ("GiB", 1 << 30),
            ("T", 1 << 40), ("TiB", 1 << 40),
        ]),
        space in any::<bool>(),
    ) {
        let s = format!("{n}{}{unit}", if space { " " } else { "" });
        match n.checked_mul(mult).filter(|v| *v > 0) {
            Some(v) => {
                prop_assert_eq!(ByteSize::parse(&s), Ok(ByteSize(v)));
                let shown = ByteSize(v).to_string();
                if !shown.contains('.') {
                    prop_assert_eq!(ByteSize::parse(&shown), Ok(ByteSize(v)));
                }
            }
            None => prop_assert!(ByteSize::parse(&s).is_err()),
        }
    }

    #[test]
    fn words_parse_to_what_they_name(s in input(WORDS)) {
        match ShareMode::parse(&s) {
            Ok(m) => {
                prop_assert!(["", "rw", "ro", "owner"].contains(&s.as_str()));
                prop_assert_eq!(ShareMode::parse(m.as_str()), Ok(m));
                let json = serde_json::to_string(&m).unwrap();
                prop_assert_eq!(serde_json::from_str::<ShareMode>(&json).unwrap(), m);
            }
            Err(e) => check_error(&e)?,
        }
        match Role::parse(&s) {
            Ok(r) => {
                prop_assert!(["", "user", "admin"].contains(&s.as_str()));
                prop_assert_eq!(Role::parse(r.as_str()).ok(), Some(r));
            }
            Err(e) => check_error(&e)?,
        }
        match HostStatus::parse(&s) {
            Ok(h) => prop_assert_eq!(h.as_str(), s.as_str()),
            Err(e) => check_error(&e)?,
        }
    }

    #[test]
    fn images_and_labels_are_plain_names(s in input(&["debian-ssh", "images/debian_12.1", "a1b2c3d4e5f6", "ib", "rack=a3"])) {
        match parse_image(&s) {
            Ok(i) => {
                prop_assert_eq!(&i, &s);
                prop_assert!((1..=128).contains(&s.len()));
                prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)), "{:?}", s);
                prop_assert!(!s.starts_with(['-', '/', '.']));
                prop_assert_eq!(parse_image(&i), Ok(i.clone()));
            }
            Err(e) => check_error(&e)?,
        }
        match parse_label(&s) {
            Ok(l) => {
                prop_assert!((1..=63).contains(&l.len()));
                prop_assert!(l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.=".contains(c)));
                prop_assert_eq!(parse_label(&l), Ok(l.clone()));
            }
            Err(e) => check_error(&e)?,
        }
        // Image names from requests are matched against hosts' images.
        let img = Image { fingerprint: "a1b2c3d4e5f60718293a4b5c6d7e8f90".into(), aliases: vec!["debian-ssh".into()] };
        let _ = img.matches(&s);
    }

    #[test]
    fn shared_folders_split_losslessly(s in input(SHARES)) {
        let (host, cont, mode) = SharedFolder::split(&s);
        let joined = match s.matches(':').count() {
            0 => { prop_assert_eq!((cont, mode), (host, "")); host.to_string() }
            1 => { prop_assert_eq!(mode, ""); format!("{host}:{cont}") }
            _ => format!("{host}:{cont}:{mode}"),
        };
        prop_assert_eq!(joined, s.clone());
        prop_assert!(!host.contains(':') && !cont.contains(':'));
    }

    #[test]
    fn shared_folders_accepted_are_clean_paths_under_a_root(s in input(SHARES)) {
        match SharedFolder::parse(&s, &roots()) {
            Ok(f) => {
                for p in [&f.host_path, &f.container_path] {
                    prop_assert!(p.starts_with('/'), "{:?}", f);
                    prop_assert!(no_controls(p), "control character in {:?}", p);
                    prop_assert!(!p.contains([',', ':']), "{:?}", p);
                    prop_assert!(!p.split('/').any(|c| c == ".."), "{:?}", p);
                }
                prop_assert!(f.host_path == "/srv/ssp/shared" || f.host_path.starts_with("/srv/ssp/shared/")
                    || f.host_path == "/data" || f.host_path.starts_with("/data/"), "{:?}", f);
                prop_assert!(!f.container_path.is_empty() && !f.container_path.ends_with('/'));
                for sys in ["/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/boot", "/run"] {
                    let inside = f.container_path == sys || f.container_path.starts_with(&format!("{sys}/"));
                    prop_assert!(!inside, "{:?}", f);
                }
                // The folder written out again parses to itself.
                let again = format!("{}:{}:{}", f.host_path, f.container_path, f.mode.as_str());
                prop_assert_eq!(SharedFolder::parse(&again, &roots()), Ok(f.clone()));
                let json = serde_json::to_string(&f).unwrap();
                prop_assert_eq!(serde_json::from_str::<SharedFolder>(&json).unwrap(), f);
            }
            Err(e) => check_error(&e)?,
        }
        // No roots: nothing is accepted.
        prop_assert!(SharedFolder::parse(&s, &[]).is_err());
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn valid_names_are_accepted(u in valid_username(), h in valid_hostname(), d in dns_name()) {
        let reserved = ["root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail",
            "news", "uucp", "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody",
            "messagebus", "sshd", "systemd-network", "systemd-resolve", "systemd-timesync",
            "sudo", "admin", "ssp", "default"];
        prop_assert_eq!(Username::parse(&u).is_ok(), !reserved.contains(&u.as_str()), "{}", u);
        prop_assert!(HostName::parse(&h).is_ok(), "{}", h);
        prop_assert!(NetAddress::parse(&d).is_ok(), "{}", d);
        let e = format!("http://{}:7401", d.trim_end_matches('.'));
        prop_assert!(Endpoint::parse(&e).is_ok(), "{}", e);
    }

    #[test]
    fn ip_addresses_and_ports_make_addresses_and_endpoints(ip in any::<std::net::IpAddr>(), port in 1u16..) {
        let a = NetAddress::parse(&ip.to_string());
        prop_assert!(a.is_ok(), "{}", ip);
        let e = match ip {
            std::net::IpAddr::V4(v4) => format!("http://{v4}:{port}"),
            std::net::IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
        };
        prop_assert!(Endpoint::parse(&e).is_ok(), "{}", e);
        let zero = e.replace(&format!(":{port}"), ":0");
        prop_assert!(Endpoint::parse(&zero).is_err(), "{}", zero);
    }

    #[test]
    fn pci_addresses_in_every_accepted_form_give_the_canonical_one(
        domain in prop_oneof![Just(0u32), 0u32..=0xffff, 0x10000u32..],
        bus in any::<u8>(), dev in 0u8..0x40, func in 0u8..16,
        form in 0..3u8, upper in any::<bool>(),
    ) {
        let s = match form {
            0 => format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"),
            1 => format!("{domain:08x}:{bus:02x}:{dev:02x}.{func:x}"),
            _ => format!("{bus:02x}:{dev:02x}.{func:x}"),
        };
        let s = if upper { s.to_uppercase() } else { s };
        let domain = if form == 2 { 0 } else { domain };
        let want = (domain <= 0xffff && dev <= 0x1f && func <= 7)
            .then(|| format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"));
        prop_assert_eq!(PciAddress::parse(&s).ok().map(|p| p.to_string()), want);
    }

    #[test]
    fn input_errors_echo_a_bounded_escaped_value(s in messy()) {
        // Every parser: its refusal (if any) keeps the echo short and printable.
        let errs = [
            Username::parse(&s).err(),
            HostName::parse(&s).err(),
            NetAddress::parse(&s).err(),
            Endpoint::parse(&s).err(),
            PciAddress::parse(&s).err(),
            SshKey::parse(&s).err(),
            ByteSize::parse(&s).err(),
            ShareMode::parse(&s).err(),
            SharedFolder::parse(&s, &roots()).err(),
            SharedFolder::new(&s, &s, &roots()).err(),
            parse_image(&s).err(),
            parse_label(&s).err(),
            Role::parse(&s).err(),
            HostStatus::parse(&s).err(),
        ];
        for e in errs.iter().flatten() {
            check_error(e)?;
        }
    }
}

// ---------- the usage index's number sets ----------

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn numbers_agree_with_a_plain_set(
        // Small numbers, or the top of the range (where `x + 1` overflows).
        base in prop_oneof![Just(0u32), Just(u32::MAX - 63)],
        ops in vec((any::<bool>(), 0u32..64), 0..60),
        queries in vec((0u32..64, 0u32..64), 1..8),
    ) {
        let mut n = Numbers::default();
        let mut plain = BTreeSet::new();
        for &(insert, x) in &ops {
            let x = base + x;
            if insert {
                n.insert(x);
                plain.insert(x);
            } else {
                n.remove(x);
                plain.remove(&x);
            }
            prop_assert_eq!(n.len(), plain.len());
            for &(a, b) in &queries {
                let (a, b) = (base + a, base + b);
                let want = (a..=b).find(|c| !plain.contains(c));
                prop_assert_eq!(n.lowest_free(a, b), want, "{:?} in {}..={}", plain, a, b);
            }
        }
    }
}

// ---------- the state machine ----------

const HOSTS: &[&str] = &["h0", "h1", "h2"];
const USERS: &[&str] = &["u0", "u1", "u2", "u3", "u4", "u5"];
const GPU_PCIS: &[&str] = &[
    "0000:17:00.0",
    "0000:18:00.0",
    "0000:19:00.0",
    "0000:1a:00.0",
    "0000:1b:00.0",
];
const FINGERPRINT: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";

/// Mostly `usual`, sometimes one of `rare` (edge values that are refused or odd).
fn mostly<T: Clone + std::fmt::Debug + 'static>(usual: T, rare: &[T]) -> BoxedStrategy<T> {
    prop_oneof![4 => Just(usual), 1 => select(rare.to_vec())].boxed()
}

fn gpu() -> impl Strategy<Value = Gpu> {
    (
        0u32..8,
        select(GPU_PCIS),
        select(&["Test GPU", "NVIDIA A100", "H100"][..]),
        mostly(24u64 << 30, &[0, 80 << 30, u64::MAX]),
    )
        .prop_map(|(index, pci, model, memory_bytes)| Gpu {
            index,
            uuid: format!("GPU-{index}"),
            pci: PciAddress::parse(pci).unwrap(),
            model: model.into(),
            memory_bytes,
            minor: index,
            device_node: format!("/dev/nvidia{index}"),
        })
}

/// A host's SSH port range and foreign ports: h0 and h1 low, h2 at the top of
/// the port space (where `port + 1` overflows). Each host stays in its own region so
/// that no test spends its time on a gap of tens of thousands of ports.
fn ports(name: &'static str) -> BoxedStrategy<((u16, u16), Vec<u16>)> {
    let (range, near) = if name == "h2" {
        (
            prop_oneof![
                (65530u16..=65535).prop_map(|f| (f, 65535)),
                Just((65535, 65535)),
                Just((65535, 65530)),
            ]
            .boxed(),
            65525u16..=65535,
        )
    } else {
        (
            prop_oneof![
                4 => (0u16..8).prop_map(|n| (22000, 22000 + n)),
                1 => Just((22003, 22000)),
            ]
            .boxed(),
            21995u16..=22009,
        )
    };
    let foreign = prop_oneof![3 => Just(vec![]), 1 => vec(near, 1..4)];
    (range, foreign).boxed()
}

fn host() -> impl Strategy<Value = Host> {
    select(HOSTS)
        .prop_flat_map(|name| (Just(name), ports(name)))
        .prop_flat_map(|(name, ports)| {
            (
                Just(name),
                Just(ports),
                (
                    mostly(16u32, &[0, 1, u32::MAX]),
                    mostly(64u64 << 30, &[0, 1 << 30, u64::MAX]),
                    vec(mostly(100u64 << 30, &[0, 10 << 30, u64::MAX]), 0..3),
                    prop_oneof![
                        // Distinct GPUs, or any (the same PCI address twice is refused).
                        4 => (prop::sample::subsequence(GPU_PCIS, 0..=GPU_PCIS.len()), vec(gpu(), 5))
                            .prop_map(|(pcis, mut gpus)| {
                                gpus.truncate(pcis.len());
                                for (g, p) in gpus.iter_mut().zip(pcis) {
                                    g.pci = PciAddress::parse(p).unwrap();
                                }
                                gpus
                            }),
                        1 => vec(gpu(), 0..5),
                    ],
                    prop_oneof![
                        3 => Just(Some(vec![(FINGERPRINT, vec!["debian-ssh"])])),
                        1 => Just(None),
                        1 => vec(
                            (
                                mostly(FINGERPRINT, &["ffff0000ffff0000"]),
                                vec(mostly("debian-ssh", &["other"]), 0..2),
                            ),
                            0..3,
                        )
                        .prop_map(Some),
                    ],
                ),
                mostly(HostStatus::Ready, &[HostStatus::Down, HostStatus::Draining]),
                vec(select(&["ib", "nvlink"][..]), 0..3),
            )
        })
        .prop_map(
            |(name, (ssh_ports, fp), (cpus, memory_bytes, pools, gpus, images), status, labels)| {
                Host {
                    name: HostName::parse(name).unwrap(),
                    agent_address: Endpoint::parse(&format!("http://{name}:7401")).unwrap(),
                    ssh_host: NetAddress::parse(name).unwrap(),
                    ssh_ports,
                    inventory: Inventory {
                        cpus,
                        memory_bytes,
                        pools: pools
                            .into_iter()
                            .map(|total_bytes| Pool {
                                name: "default".into(),
                                driver: "dir".into(),
                                total_bytes,
                                used_bytes: 0,
                            ssp: true,
                            })
                            .collect(),
                        gpus,
                        images: images.map(|l| {
                            l.into_iter()
                                .map(|(f, a)| Image {
                                    fingerprint: f.into(),
                                    aliases: a.into_iter().map(String::from).collect(),
                                })
                                .collect()
                        }),
                        ..Default::default()
                    },
                    status,
                    labels: labels.into_iter().map(String::from).collect(),
                    foreign_ports: fp,
                    // Two hosts on one LAN, one on another, the rest on none.
                    lan: match name.bytes().last().map(|b| b % 4) {
                        Some(0) | Some(1) => Some("lab".into()),
                        Some(2) => Some("annex".into()),
                        _ => None,
                    },
                    relay_key: None,
                    rdp_ports: (name.len() % 3 != 0).then_some((23000, 23999)),
                    warnings: Vec::new(),
                }
            },
        )
}

fn keys() -> impl Strategy<Value = Vec<SshKey>> {
    vec(Just(SshKey::parse(KEY).unwrap()), 0..3)
}

fn new_user() -> impl Strategy<Value = NewUser> {
    (
        select(USERS),
        mostly(Role::User, &[Role::Admin]),
        prop_oneof![9 => vec(Just(SshKey::parse(KEY).unwrap()), 1..3), 1 => keys()],
        (
            mostly(2u32, &[0, 1, 8, 17, u32::MAX]),
            mostly(4u64 << 30, &[1, 65 << 30, u64::MAX]),
            mostly(10u64 << 30, &[1, 101 << 30, u64::MAX]),
        ),
        prop_oneof![8 => 0u32..3, 1 => 3u32..6, 1 => Just(u32::MAX)],
        mostly(
            "debian-ssh",
            &["other", "a1b2c3d4e5f6", "A1B2C3D4E5F6", "missing"],
        ),
        (
            prop::option::weighted(0.1, select(&["a100", "test", ""][..])),
            prop::option::weighted(0.1, select(&[1u64, 40 << 30, u64::MAX][..])),
            prop::option::weighted(0.1, select(&["h0", "h1", "h2", "nohost"][..])),
            any::<bool>(),
            prop_oneof![4 => Just(vec![]), 1 => vec(select(&["ib", "nvlink"][..]), 0..2)],
            prop::option::weighted(0.2, select(&["", "lab", "annex", "elsewhere"][..])),
        ),
        prop_oneof![
            8 => Just(UserKind::Personal),
            1 => Just(UserKind::Common),
            2 => select(USERS).prop_map(|s| UserKind::Account {
                server: Username::parse(s).unwrap()
            }),
        ],
    )
        .prop_map(
            |(name, role, ssh_keys, (cpus, memory, disk), gpus, image, c, kind)| NewUser {
                name: Username::parse(name).unwrap(),
                role,
                ssh_keys,
                limits: Limits {
                    cpus,
                    memory: ByteSize(memory),
                    disk: ByteSize(disk),
                    processes: 100,
                },
                gpus,
                image: image.into(),
                shares: vec![],
                placement: Constraints {
                    gpu_model: c.0.map(String::from),
                    gpu_memory: c.1,
                    host: c.2.map(|h| HostName::parse(h).unwrap()),
                    spread: c.3,
                    labels: c.4.into_iter().map(String::from).collect(),
                    lan: c.5.map(String::from),
                    desktop: c.3,
                },
                kind,
                network: match c.5 {
                    Some(_) => ssp_model::Network::Lan,
                    None => ssp_model::Network::Forward,
                },
                desktop: c.3,
            },
        )
}

fn settings() -> impl Strategy<Value = Settings> {
    prop_oneof![
        4 => Just((10000, 19999)),
        2 => Just((10000, 10003)),
        1 => Just((10000, 10001)),
        1 => Just((10000, 10000)),
        1 => Just((5, 3)),
        1 => Just((u32::MAX - 2, u32::MAX)),
        1 => Just((u32::MAX, u32::MAX)),
    ]
    .prop_map(|(uid_first, uid_last)| Settings {
        uid_first,
        uid_last,
    })
}

fn command() -> impl Strategy<Value = Command> {
    let name = || prop_oneof![4 => select(USERS), 1 => Just("ghost")].prop_map(String::from);
    prop_oneof![
        1 => settings().prop_map(Command::Init),
        3 => host().prop_map(Command::RegisterHost),
        8 => new_user().prop_map(Command::AddUser),
        // Adoption: GPUs of any host (held, free or absent), ports in and out of range.
        2 => (
            new_user(),
            prop_oneof![select(HOSTS), Just("nohost")],
            vec(select(GPU_PCIS), 0..3),
            proptest::option::of(prop_oneof![22000u16..22010, Just(1u16), Just(u16::MAX)]),
        )
            .prop_map(|(user, host, gpus, ssh_port)| Command::Adopt {
                user,
                host: host.into(),
                gpus: gpus.into_iter().map(|p| PciAddress::parse(p).unwrap()).collect(),
                ssh_port,
            }),
        3 => name().prop_map(|name| Command::RemoveUser { name }),
        3 => name().prop_map(|name| Command::ForgetInstance { name }),
        1 => (name(), keys()).prop_map(|(name, keys)| Command::SetSshKeys { name, keys }),
        2 => (name(), proptest::option::of(1u32..16), proptest::option::of(1u64..64), proptest::option::of(1u64..2048))
            .prop_map(|(name, cpus, memory, disk)| Command::Resize {
                name,
                cpus,
                memory: memory.map(|g| ByteSize(g << 30)),
                disk: disk.map(|g| ByteSize(g << 30)),
            }),
        2 => (
            name(),
            mostly(ssp_model::Network::Forward, &[ssp_model::Network::Lan]),
            prop::option::weighted(0.3, select(&["", "lab", "annex"][..])),
        )
            .prop_map(|(name, network, lan)| Command::SetNetwork {
                name,
                network,
                lan: lan.map(String::from),
            }),
        // A small range, so it fills up; sometimes one that leaves out held ports.
        2 => prop::option::weighted(0.8, (30000u16..30003, 0u16..3)).prop_map(|r| {
            Command::SetRelay {
                relay: r.map(|(first, n)| ssp_model::Relay {
                    host: ssp_model::NetAddress::parse("relay.example.org").unwrap(),
                    port: 22,
                    user: "ssp-relay".into(),
                    ports: (first, first + n),
                    kind: Default::default(),
                    token: String::new(),
                }),
            }
        }),
        // Small pools, so they fill up; sometimes one that leaves out held addresses.
        2 => (
            select(&["lab", "annex"][..]),
            prop::option::weighted(0.8, (0u8..4, 0u8..3)),
        )
            .prop_map(|(name, pool)| Command::SetLan {
                name: name.into(),
                pool: pool.map(|(first, n)| {
                    ssp_model::LanPool::new(
                        std::net::Ipv4Addr::new(10, 0, 0, 10 + first),
                        std::net::Ipv4Addr::new(10, 0, 0, 10 + first + n),
                        24,
                        Some(std::net::Ipv4Addr::new(10, 0, 0, 1)),
                    )
                    .unwrap()
                }),
            }),
        1 => (name(), 0u64..100_000, 1u32..10).prop_map(|(name, every_secs, keep)| {
            Command::SetSnapshotSchedule {
                name,
                schedule: ssp_model::SnapshotSchedule::new(every_secs, keep).unwrap_or_default(),
            }
        }),
        2 => (
            prop_oneof![select(HOSTS), Just("nohost")],
            mostly(HostStatus::Ready, &[HostStatus::Draining, HostStatus::Down]),
        )
            .prop_map(|(name, status)| Command::SetHostStatus { name: name.into(), status }),
        4 => (name(), prop_oneof![2 => Just(None), 3 => select(HOSTS).prop_map(Some)])
            .prop_map(|(instance, to)| Command::Migrate(MigrationCommand::Begin {
                instance,
                to: to.map(|h| HostName::parse(h).unwrap()),
                at_ms: 1,
            })),
        4 => (0u64..4, select(&[
                MigrationPhase::Copying,
                MigrationPhase::Syncing,
                MigrationPhase::Starting,
                MigrationPhase::Cleaning,
                MigrationPhase::Done,
                MigrationPhase::RollingBack,
                MigrationPhase::Failed,
            ][..]))
            .prop_map(|(id, phase)| Command::Migrate(MigrationCommand::Advance {
                id,
                phase,
                note: String::new(),
                at_ms: 2,
                ssh: None,
            })),
        2 => (0u64..4).prop_map(|id| Command::Migrate(MigrationCommand::Switch { id, downtime_ms: 7, at_ms: 3 })),
        2 => (0u64..4).prop_map(|id| Command::Migrate(MigrationCommand::Finish { id, at_ms: 4 })),
    ]
}

/// What must hold of every state the machine reaches.
fn check_invariants(s: &State) -> Result<(), TestCaseError> {
    let mut uids = BTreeSet::new();
    for (name, u) in &s.users {
        prop_assert_eq!(name.as_str(), u.name.as_str());
        prop_assert!(uids.insert(u.uid), "uid {} twice", u.uid);
    }
    let mut ports: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
    let mut gpus: BTreeMap<&str, BTreeSet<&PciAddress>> = BTreeMap::new();
    let mut lan_addrs = BTreeSet::new();
    let mut relay_ports = BTreeSet::new();
    for (name, i) in &s.instances {
        // A relay port: only with a relay, inside its range, nobody else's.
        if let Some(p) = i.relay_port {
            let r = s.relay.as_ref();
            prop_assert!(
                r.is_some_and(|r| (r.ports.0..=r.ports.1).contains(&p)),
                "{} holds relay port {} outside the relay's range",
                name,
                p
            );
            prop_assert!(relay_ports.insert(p), "relay port {} twice", p);
        }
        prop_assert_eq!(name, &i.name);
        prop_assert!(
            s.users.contains_key(i.owner.as_str()),
            "{} has no owner",
            name
        );
        prop_assert!(s.hosts.contains_key(i.host.as_str()), "{} on no host", name);
        prop_assert!(
            ports.entry(i.host.as_str()).or_default().insert(i.ssh_port),
            "port {} twice",
            i.ssh_port
        );
        for g in &i.gpus {
            prop_assert!(
                gpus.entry(i.host.as_str()).or_default().insert(g),
                "GPU {} twice",
                g
            );
        }
        // A static LAN address: on a LAN container, inside its LAN's pool, and
        // nobody else's there.
        if let Some(a) = i.lan_address {
            prop_assert!(
                i.network == ssp_model::Network::Lan,
                "{} holds {} off the LAN",
                name,
                a
            );
            let lan = i.placement.lan.clone().unwrap_or_default();
            prop_assert!(
                s.lans.get(&lan).is_some_and(|p| p.contains(a)),
                "{} holds {} outside LAN {}'s pool",
                name,
                a,
                lan
            );
            prop_assert!(lan_addrs.insert((lan, a)), "LAN address {} twice", a);
        }
    }
    // What unfinished moves hold is nobody else's either, and a moving container's
    // record places it on the side the phase says.
    for m in s.migrations.values().filter(|m| !m.phase.finished()) {
        let i = s.instances.get(&m.instance);
        prop_assert!(i.is_some(), "migration {} of a gone container", m.id);
        let i = i.unwrap();
        let (on, held) = if m.phase.switched() {
            (&m.to, &m.from)
        } else {
            (&m.from, &m.to)
        };
        prop_assert_eq!(&i.host, &on.host);
        prop_assert_eq!(&i.gpus, &on.gpus);
        prop_assert_ne!(&m.from.host, &m.to.host);
        prop_assert!(
            ports
                .entry(held.host.as_str())
                .or_default()
                .insert(held.ssh_port),
            "port {} held twice",
            held.ssh_port
        );
        for g in &held.gpus {
            prop_assert!(
                gpus.entry(held.host.as_str()).or_default().insert(g),
                "GPU {} held twice",
                g
            );
        }
        prop_assert_eq!(
            s.migrations
                .values()
                .filter(|o| o.instance == m.instance && !o.phase.finished())
                .count(),
            1
        );
    }
    for (name, u) in &s.users {
        match u.server() {
            // An account's Common-Server is there, is one, and keeps its container
            // while it has accounts.
            Some(server) => {
                let common = s.users.get(server.as_str());
                prop_assert!(
                    common.is_some_and(|c| c.kind == UserKind::Common),
                    "account {} in {}, which is no Common-Server",
                    name,
                    server
                );
                prop_assert!(
                    s.instances.contains_key(server.as_str()),
                    "account {} in {}, which has no container",
                    name,
                    server
                );
                prop_assert!(
                    !s.instances.contains_key(name),
                    "account {} has a container",
                    name
                );
            }
            // A user goes with their last container (or at once when they have none).
            None => prop_assert!(
                s.instances.contains_key(name),
                "user {} without a container",
                name
            ),
        }
    }
    prop_assert!(s.usage().is_some(), "the usage index is stale after apply");
    Ok(())
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn apply_never_panics_and_a_rejection_changes_nothing(
        hosts in vec(host(), 1..4),
        cmds in vec(command(), 1..40),
    ) {
        let mut s = State::default();
        let hosts = hosts.into_iter().map(Command::RegisterHost);
        for cmd in &hosts.chain(cmds).collect::<Vec<_>>() {
            let before = serde_json::to_string(&s).unwrap();
            let copy = s.clone();
            // A replica restored from a snapshot (no usage index) must decide alike.
            let mut restored: State = serde_json::from_str(&before).unwrap();
            if let Command::AddUser(req) = cmd {
                if s.usage().is_some() {
                    let indexed = ssp_model::place::choose(&s, &req.limits, req.gpus, &req.image, &req.placement);
                    let scanned = ssp_model::place::choose_by_scan(&s, &req.limits, req.gpus, &req.image, &req.placement);
                    prop_assert_eq!(indexed.is_ok(), scanned.is_ok());
                    if let (Ok(a), Ok(b)) = (indexed, scanned) {
                        prop_assert_eq!(a, b);
                    }
                }
            }
            let res = s.apply(cmd);
            prop_assert_eq!(&restored.apply(cmd), &res);
            prop_assert_eq!(&restored, &s);
            prop_assert_eq!(restored.usage(), s.usage(), "the live index differs from a rebuilt one");
            match &res {
                Err(r) => {
                    prop_assert!(!r.to_string().is_empty());
                    prop_assert_eq!(&s, &copy);
                    prop_assert_eq!(serde_json::to_string(&s).unwrap(), before, "rejected {:?} changed the state", cmd);
                }
                Ok(Outcome::UserAdded { user, instance }) => {
                    prop_assert_eq!(&s.users[user.name.as_str()], user);
                    prop_assert_eq!(&s.instances[instance.name.as_str()], instance);
                    // The last uid of the range is the lab group's, never a user's.
                    let set = copy.settings();
                    prop_assert!(user.uid >= set.uid_first && user.uid < set.uid_last, "uid {} in {:?}", user.uid, set);
                    let h = &copy.hosts[instance.host.as_str()];
                    let placed = match cmd {
                        // An account's outcome is its Common-Server's container, as it was.
                        Command::AddUser(req) if matches!(req.kind, UserKind::Account { .. }) => {
                            prop_assert_eq!(user.server(), Some(&instance.owner));
                            prop_assert_eq!(&copy.instances[instance.name.as_str()], instance);
                            false
                        }
                        Command::AddUser(req) => {
                            prop_assert_eq!(instance.gpus.len() as u32, req.gpus);
                            true
                        }
                        // An adopted container holds exactly what it uses, on a host that is up.
                        Command::Adopt { gpus, ssh_port, .. } => {
                            prop_assert_eq!(&instance.gpus, gpus);
                            if let Some(p) = ssh_port {
                                prop_assert_eq!(instance.ssh_port, *p);
                            }
                            prop_assert_ne!(h.status, HostStatus::Down);
                            prop_assert!((h.ssh_ports.0..=h.ssh_ports.1).contains(&instance.ssh_port));
                            for g in &instance.gpus {
                                prop_assert!(h.inventory.gpus.iter().any(|x| &x.pci == g));
                            }
                            false
                        }
                        other => return Err(TestCaseError::fail(format!("UserAdded from {other:?}"))),
                    };
                    if placed {
                        prop_assert_eq!(h.status, HostStatus::Ready);
                        prop_assert!((h.ssh_ports.0..=h.ssh_ports.1).contains(&instance.ssh_port));
                        prop_assert!(!h.foreign_ports.contains(&instance.ssh_port));
                        for g in &instance.gpus {
                            prop_assert!(h.inventory.gpus.iter().any(|x| &x.pci == g));
                        }
                    }
                }
                Ok(_) => {}
            }
            check_invariants(&s)?;
        }
    }
}

// ---------- regressions found by the properties above ----------

fn one_host() -> Command {
    Command::RegisterHost(Host {
        name: HostName::parse("h0").unwrap(),
        agent_address: Endpoint::parse("http://h0:7401").unwrap(),
        ssh_host: NetAddress::parse("h0").unwrap(),
        ssh_ports: (22000, 22009),
        inventory: Inventory {
            cpus: 8,
            memory_bytes: 32 << 30,
            ..Default::default()
        },
        status: HostStatus::Ready,
        labels: vec![],
        foreign_ports: vec![],
        lan: None,
        relay_key: None,
        rdp_ports: None,
        warnings: Vec::new(),
    })
}

fn plain_user(name: &str) -> Command {
    Command::AddUser(NewUser {
        name: Username::parse(name).unwrap(),
        role: Role::User,
        ssh_keys: vec![SshKey::parse(KEY).unwrap()],
        limits: Limits {
            cpus: 1,
            memory: ByteSize(1 << 30),
            disk: ByteSize(1 << 30),
            processes: 100,
        },
        gpus: 0,
        image: "debian-ssh".into(),
        shares: vec![],
        placement: Constraints::default(),
        kind: UserKind::Personal,
        network: Default::default(),
        desktop: false,
    })
}

/// The uid index kept every unused number between the lowest and the highest uid:
/// settings recorded after the first users (they were placed with the default
/// range) put the next uid billions above them, and applying that user took
/// memory and time in proportion to the gap, on every replica.
#[test]
fn uids_far_apart_cost_no_more_than_uids_close_together() {
    let mut s = State::default();
    s.apply(&one_host()).unwrap();
    s.apply(&plain_user("alice")).unwrap();
    s.apply(&Command::Init(Settings {
        uid_first: 4_000_000_000,
        uid_last: 4_000_000_009,
    }))
    .unwrap();
    let Ok(Outcome::UserAdded { user, .. }) = s.apply(&plain_user("bob")) else {
        panic!("bob was not added")
    };
    assert_eq!((s.users["alice"].uid, user.uid), (10000, 4_000_000_000));
    // A restored replica rebuilds the same index.
    let mut restored: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(
        restored.apply(&plain_user("carol")),
        s.apply(&plain_user("carol"))
    );
    assert_eq!(restored.usage(), s.usage());
}

/// `insert` computed `x + 1`: u32::MAX overflowed (a panic in a debug build, and
/// a wrong index in a release build).
#[test]
fn numbers_take_the_top_of_the_range() {
    let mut n = Numbers::default();
    n.insert(u32::MAX);
    n.insert(0);
    assert!(n.contains(u32::MAX) && n.contains(0) && n.len() == 2);
    assert_eq!(n.lowest_free(u32::MAX, u32::MAX), None);
    assert_eq!(n.lowest_free(u32::MAX - 1, u32::MAX), Some(u32::MAX - 1));
    assert_eq!(n.lowest_free(0, 5), Some(1));
    n.remove(u32::MAX);
    assert_eq!(n.lowest_free(u32::MAX, u32::MAX), Some(u32::MAX));
}
