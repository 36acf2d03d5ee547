//! Checks that /etc/subuid and /etc/subgid let root map ssp's uid range (each
//! container maps its owner's uid and the lab gid of it 1:1), which `raw.idmap` needs; without it a container fails to start with an
//! obscure idmap error, so the agent says what to add instead.

use std::path::Path;

/// True when `text` (subuid/subgid format) gives `root` every id in `first..=last`.
pub fn covers(text: &str, first: u32, last: u32) -> bool {
    let mut ranges: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (who, start, count) = (f.next()?, f.next()?, f.next()?);
            (who == "root" || who == "0").then_some(())?;
            let start: u64 = start.parse().ok()?;
            let count: u64 = count.parse().ok()?;
            Some((start, start + count))
        })
        .collect();
    ranges.sort();
    let (mut need, end) = (first as u64, last as u64 + 1);
    for (s, e) in ranges {
        if s <= need && e > need {
            need = e;
        }
        if need >= end {
            return true;
        }
    }
    need >= end
}

/// Parses `FIRST-LAST`.
pub fn parse_range(r: &str) -> Option<(u32, u32)> {
    let (a, b) = r.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// `Err` with the line to add when a file exists and does not cover the range.
/// Hosts without the files (some snap setups) are not checked.
pub fn check(range: &str) -> Result<(), String> {
    let Some((first, last)) = parse_range(range) else {
        return Err(format!("uid range {range:?} is not FIRST-LAST"));
    };
    for file in ["/etc/subuid", "/etc/subgid"] {
        let Ok(text) = std::fs::read_to_string(Path::new(file)) else {
            continue;
        };
        if !covers(&text, first, last) {
            return Err(format!(
                "{file} does not let root map ssp's uid range {range}; add the line root:{first}:{} to /etc/subuid and /etc/subgid and restart the daemon",
                last - first + 1
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage() {
        let f = "root:1000000:1000000000\n_lxd:1001000000:10000001\nroot:10000:10000\n";
        assert!(covers(f, 10000, 19999));
        assert!(!covers(f, 10000, 20000));
        assert!(!covers("root:1000000:1000000000\n", 10000, 19999));
        assert!(covers("root:10000:5000\nroot:15000:5000\n", 10000, 19999));
        assert!(!covers("alice:10000:10000\n", 10000, 19999));
        assert_eq!(parse_range("10000-19999"), Some((10000, 19999)));
    }
}
