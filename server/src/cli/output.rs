//! Writing results: text for people (aligned blocks and tables), JSON for scripts (one document
//! per line).

use std::io::Write as _;

use anyhow::Context as _;
use serde::Serialize;

use super::OutputFormat;

/// Writes a command's results to stdout in the chosen format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Printer {
    format: OutputFormat,
}

// === impl Printer ===

impl Printer {
    pub(crate) fn new(format: OutputFormat) -> Self {
        Self { format }
    }

    pub(crate) fn is_json(self) -> bool {
        self.format == OutputFormat::Json
    }

    /// One JSON document on one line.
    pub(crate) fn json<T: Serialize>(self, value: &T) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(value).context("cannot encode the result as JSON")?;
        line.push(b'\n');
        self.raw(&line)
    }

    /// Text, written as given (the caller ends it with a newline).
    pub(crate) fn text(self, text: &str) -> anyhow::Result<()> {
        self.raw(text.as_bytes())
    }

    fn raw(self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .context("cannot write to stdout")
    }
}

/// `Key : value` lines with the colons aligned, ending with a newline.
pub(crate) fn block(rows: &[(&str, String)]) -> String {
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(&format!("{key:<width$} : {value}\n"));
    }
    out
}

/// Columns aligned with two spaces between them, a header row first, ending with a newline.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let width = widths.get(i).copied().unwrap_or(0);
            line.push_str(&format!("{cell:<width$}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `1 entry`, `2 entries`.
pub(crate) fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_align_their_colons() {
        let text = block(&[("ID", "a".to_owned()), ("SPIFFE ID", "b".to_owned())]);
        assert_eq!(text, "ID        : a\nSPIFFE ID : b\n");
    }

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let text = table(
            &["NAME", "X"],
            &[
                vec!["long name".to_owned(), "1".to_owned()],
                vec!["a".to_owned(), String::new()],
            ],
        );
        assert_eq!(text, "NAME       X\nlong name  1\na\n");
    }
}
