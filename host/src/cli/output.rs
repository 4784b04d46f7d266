//! Output formats shared by every subcommand: text for people, JSON for
//! scripts (`-o json`).

use clap::ValueEnum;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// Prints `value` as JSON, or calls `text` to print it for people.
pub fn emit<T: Serialize>(format: Format, value: &T, text: impl FnOnce(&T)) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(value)?);
        }
        Format::Text => text(value),
    }
    Ok(())
}
