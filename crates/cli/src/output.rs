//! Tables for people, JSON for scripts.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};

/// How results are printed.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Prints `rows` under `header`, or `json` when asked.
pub fn print(format: Format, header: &[&str], rows: Vec<Vec<String>>, json: serde_json::Value) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        ),
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
            for r in rows {
                t.add_row(r);
            }
            println!("{t}");
        }
    }
}

/// A byte count for people.
pub fn size(b: u64) -> String {
    ssp_model::ByteSize(b).to_string()
}
