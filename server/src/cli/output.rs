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
/// Control characters and bidirectional overrides in a cell are shown escaped (`\u{1b}`), so a
/// value written by someone else (an audit record's details) cannot move the cursor, forge a
/// line or reorder what the terminal shows.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| printable(cell)).collect())
        .collect();
    let rows = rows.as_slice();
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

/// `cell` with control characters and bidirectional formatting characters escaped.
fn printable(cell: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !cell.chars().any(hidden) {
        return cell.to_owned();
    }
    cell.chars()
        .map(|c| {
            if hidden(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
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
    fn tables_escape_what_would_move_the_terminal() {
        let rows = vec![vec![
            "ok \u{1b}[2J".to_owned(),
            "a\nb \u{202e}txt \u{9b}".to_owned(),
        ]];
        let text = table(&["A", "B"], &rows);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}') && !text.contains('\u{9b}'));
        assert!(text.contains("ok \\u{1b}[2J"), "{text}");
        assert!(text.contains("a\\u{a}b \\u{202e}txt \\u{9b}"), "{text}");
    }

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
