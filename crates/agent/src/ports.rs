//! Ports of the SSH range that something other than ssp holds on this host: proxy
//! devices of containers ssp did not make, and host processes listening on TCP.
//! The agent reports them with each registration so placement never hands them out.

use std::collections::BTreeSet;

use ssp_lxd::Instance;

/// The name of the proxy device that forwards a managed container's SSH port.
const SSH_DEVICE: &str = "ssp-ssh";

/// TCP ports in `LISTEN` state in the text of `/proc/net/tcp` or `/proc/net/tcp6`.
pub fn listening_ports(text: &str) -> BTreeSet<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (_, port) = local.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// The TCP ports a proxy device's `listen` value holds: `tcp:ADDR:PORT`, where
/// PORT may be a list and ranges (`22000,22005-22007`). Other kinds hold none.
pub fn proxy_listen_ports(listen: &str) -> Vec<u16> {
    let Some(rest) = listen.trim().strip_prefix("tcp:") else {
        return Vec::new();
    };
    let Some((_, ports)) = rest.rsplit_once(':') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for part in ports.split(',').map(str::trim) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<u16>().ok()),
        }
    }
    out
}

fn managed(i: &Instance) -> bool {
    i.config.get("user.ssp.managed").map(String::as_str) == Some("true")
}

/// Ports in `first..=last` held by anything but ssp's own SSH forwards: every
/// proxy device except a managed container's `ssp-ssh`, and every host listener
/// not explained by such an `ssp-ssh` (with `ssh_forward = "proxy"` ssp's own
/// forwards are host listeners too).
pub fn foreign_ports(
    instances: &[Instance],
    listening: &BTreeSet<u16>,
    (first, last): (u16, u16),
) -> Vec<u16> {
    let mut own = BTreeSet::new();
    let mut foreign = BTreeSet::new();
    for i in instances {
        let devices = if i.expanded_devices.is_empty() {
            &i.devices
        } else {
            &i.expanded_devices
        };
        for (name, d) in devices {
            if d.get("type").map(String::as_str) != Some("proxy") {
                continue;
            }
            let ports = proxy_listen_ports(d.get("listen").map(String::as_str).unwrap_or(""));
            if managed(i) && name == SSH_DEVICE {
                own.extend(ports);
            } else {
                foreign.extend(ports);
            }
        }
    }
    foreign.extend(listening.iter().filter(|p| !own.contains(p)));
    foreign.range(first..=last).copied().collect()
}

/// Reads the host's TCP listeners (IPv4 and IPv6); a missing file counts as none.
pub fn host_listeners() -> BTreeSet<u16> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| listening_ports(&t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1CE8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 00000000:55F0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31338 1 0000000000000000 100 0 0 10 0
   2: 0100007F:55F1 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 31339 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:55F3 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn proc_net_tcp_lines_give_the_listening_ports_only() {
        // 0x1CE8 = 7400, 0x55F0 = 22000; 0x55F1 is an established connection.
        assert_eq!(
            listening_ports(TCP).into_iter().collect::<Vec<_>>(),
            vec![7400, 22000]
        );
        assert_eq!(
            listening_ports(TCP6).into_iter().collect::<Vec<_>>(),
            vec![22003]
        );
        assert!(listening_ports("").is_empty());
        assert!(listening_ports("header\n garbage line\n").is_empty());
    }

    #[test]
    fn proxy_listen_strings_give_their_tcp_ports() {
        assert_eq!(proxy_listen_ports("tcp:0.0.0.0:22000"), vec![22000]);
        assert_eq!(proxy_listen_ports("tcp:[::]:22001"), vec![22001]);
        assert_eq!(
            proxy_listen_ports("tcp:10.0.0.5:22000-22002,22010"),
            vec![22000, 22001, 22002, 22010]
        );
        assert!(proxy_listen_ports("udp:0.0.0.0:22000").is_empty());
        assert!(proxy_listen_ports("unix:/run/x.sock").is_empty());
        assert!(proxy_listen_ports("tcp:0.0.0.0:http").is_empty());
        assert!(proxy_listen_ports("").is_empty());
    }

    fn inst(name: &str, managed: bool, devices: &[(&str, &str, &str)]) -> Instance {
        let mut i = Instance {
            name: name.into(),
            ..Default::default()
        };
        if managed {
            i.config.insert("user.ssp.managed".into(), "true".into());
        }
        for (dev, kind, listen) in devices {
            let d = [("type", *kind), ("listen", *listen)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            i.expanded_devices.insert(dev.to_string(), d);
        }
        i
    }

    #[test]
    fn foreign_ports_leave_out_ssps_own_forwards_and_what_is_outside_the_range() {
        let instances = vec![
            inst("alice", true, &[("ssp-ssh", "proxy", "tcp:0.0.0.0:22001")]),
            // A hand-made proxy on a managed container is not ssp's.
            inst(
                "bob",
                true,
                &[
                    ("ssp-ssh", "proxy", "tcp:0.0.0.0:22002"),
                    ("web", "proxy", "tcp:0.0.0.0:22008"),
                ],
            ),
            inst(
                "handmade",
                false,
                &[("ssp-ssh", "proxy", "tcp:0.0.0.0:22000")],
            ),
            inst(
                "other",
                false,
                &[("eth0", "nic", ""), ("p", "proxy", "tcp:0.0.0.0:8080")],
            ),
        ];
        // 22001 is alice's forward by a proxy process; 22005 some host daemon; 7400 out of range.
        let listening: BTreeSet<u16> = [7400, 22001, 22005].into();
        assert_eq!(
            foreign_ports(&instances, &listening, (22000, 22099)),
            vec![22000, 22005, 22008]
        );
    }
}
