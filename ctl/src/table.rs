//! Plain-text tables for the human output: left-aligned columns two
//! spaces apart, headers in capitals, the last column never padded, and
//! long cells cut with `…` where a column has a width cap.

/// A table being filled; [`Table::render`] lays it out.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    caps: Vec<Option<usize>>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            caps: vec![None; headers.len()],
            rows: Vec::new(),
        }
    }

    /// Cuts cells of column `col` to `width` characters (an error text,
    /// say). Out-of-range columns are ignored.
    pub fn cap(mut self, col: usize, width: usize) -> Self {
        if let Some(c) = self.caps.get_mut(col) {
            *c = Some(width.max(1));
        }
        self
    }

    /// Adds a row; missing cells are empty, extra ones dropped. Control
    /// characters (a newline in an error) are shown as spaces so a row
    /// stays one line.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells
            .into_iter()
            .take(self.headers.len())
            .enumerate()
            .map(|(i, c)| fit(&one_line(&c), self.caps[i]))
            .collect();
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// How many rows were added.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row after the header line, each
    /// line ending in `\n`.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let last = row.len().saturating_sub(1);
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i < last {
                    line.extend(std::iter::repeat_n(' ', widths[i] - width(cell) + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Characters shown (not bytes).
fn width(s: &str) -> usize {
    s.chars().count()
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `s` cut to `cap` characters, the last one `…` when cut.
pub fn fit(s: &str, cap: Option<usize>) -> String {
    match cap {
        Some(cap) if width(s) > cap => {
            let mut cut: String = s.chars().take(cap - 1).collect();
            cut.push('…');
            cut
        }
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_the_last_is_not_padded() {
        let mut t = Table::new(&["ID", "STATE", "ERROR"]);
        t.row(vec!["a".into(), "running".into(), "".into()]);
        t.row(vec!["long-id".into(), "dead".into(), "boom\nagain".into()]);
        assert_eq!(
            t.render(),
            "ID       STATE    ERROR\n\
             a        running\n\
             long-id  dead     boom again\n"
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn capped_columns_are_cut_with_an_ellipsis() {
        let mut t = Table::new(&["NAME", "ERROR"]).cap(1, 5);
        t.row(vec!["é".into(), "abcdefgh".into()]);
        t.row(vec!["x".into()]);
        assert_eq!(t.render(), "NAME  ERROR\né     abcd…\nx\n");
    }
}
