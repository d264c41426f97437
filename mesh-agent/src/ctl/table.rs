//! The one table renderer: rows as aligned columns for people, or JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::CtlError;

/// Rows that render as a table.
pub trait Table: Serialize {
    const HEADER: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

pub fn render<T: Table>(json: bool, rows: &[T]) -> Result<String, CtlError> {
    if json {
        return serde_json::to_string_pretty(rows).map_err(|e| CtlError::Usage(e.to_string()));
    }
    let cells: Vec<Vec<String>> = rows.iter().map(Table::cells).collect();
    let mut widths: Vec<usize> = T::HEADER.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String]| {
        let cols: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cols.join("  ").trim_end());
    };
    line(
        &mut out,
        &T::HEADER.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for row in &cells {
        line(&mut out, row);
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    Ok(out.trim_end().to_owned())
}
