//! Tables for people, JSON for scripts.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};

/// How results are printed.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Writes to stdout. When the reader has gone (`sspctl ls | head`), exits quietly
/// as other command-line tools do, instead of panicking.
pub fn write(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("sspctl: writing the output: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`write`].
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::output::write(format_args!("{}\n", format_args!($($t)*))) };
}

/// `print!` through [`write`].
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::output::write(format_args!($($t)*)) };
}

/// Prints `rows` under `header`, or `json` when asked.
pub fn print(format: Format, header: &[&str], rows: Vec<Vec<String>>, json: serde_json::Value) {
    match format {
        Format::Json => crate::outln!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        ),
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
            for r in rows {
                t.add_row(r);
            }
            crate::outln!("{t}");
        }
    }
}

/// A byte count for people.
pub fn size(b: u64) -> String {
    ssp_model::ByteSize(b).to_string()
}

/// Where the user's SSH answers for `i`: its own LAN address (port 22) in LAN
/// mode, else its host's forwarded port. An empty address while a LAN container
/// has none yet.
pub fn ssh_address(i: &ssp_proto::InstanceView) -> (String, u32) {
    if i.network == "lan" {
        (i.lan_address.clone(), 22)
    } else {
        (i.ssh_host.clone(), i.ssh_port)
    }
}

/// How `i` is reached, for tables: `ADDRESS:PORT`, with `(lan NAME)` for a
/// container on the LAN, and the relay's `HOST:PORT` for outside the LAN.
pub fn reach(i: &ssp_proto::InstanceView) -> String {
    let inside = match ssh_address(i) {
        (a, p) if i.network != "lan" => format!("{a}:{p}"),
        (a, _) if a.is_empty() => format!("no address yet (lan {})", i.lan),
        (a, p) => format!("{a}:{p} (lan {})", i.lan),
    };
    let mut out = inside;
    if i.relay_port > 0 && !i.relay_host.is_empty() {
        out.push_str(&format!(", outside {}:{}", i.relay_host, i.relay_port));
    }
    if i.desktop && i.rdp_port > 0 && !i.rdp_host.is_empty() {
        out.push_str(&format!(", RDP {}:{}", i.rdp_host, i.rdp_port));
    }
    out
}
