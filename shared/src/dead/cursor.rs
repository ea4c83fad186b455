//! The paging cursor: where the last page ended in the dead-letter queue.
//!
//! A page is read from the head of `NS.dead` with `basic.get` (the letters
//! are held unacked and put back in order), so a cursor cannot be a broker
//! position. It holds the position after the last letter returned, counted
//! from the head, and fingerprints (id, failed-at, attempt) of the page's
//! last [`MARKS`] letters with the position of the oldest of them. The next
//! page looks for those letters at or before the position and resumes right
//! after the furthest one it finds:
//!
//! * letters removed (replayed, purged) in front of the cursor make the
//!   next page skip nothing, nor does the removal of some of the marked
//!   letters themselves;
//! * new dead letters go to the tail and show up on a later page;
//! * only when every marked letter is gone does the next page resume where
//!   the oldest of them was, which skips as many letters as were removed in
//!   front of them (none when only the page's own letters went).

use super::letter::DeadLetter;

/// Letters of a page a cursor remembers.
pub const MARKS: usize = 8;

/// Where the next page starts. Printed as
/// `POSITION-FIRST-FP.FP...`; clients treat it as opaque.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Letters from the head up to and including the last one returned.
    pub position: usize,
    /// 0-based position of the oldest marked letter.
    pub first: usize,
    /// [`fingerprint`]s of the page's last letters, oldest first (1 to
    /// [`MARKS`]).
    pub marks: Vec<u64>,
}

impl Cursor {
    /// The cursor after a page's letters (with their 0-based positions, in
    /// order); None for an empty page.
    pub fn after(page: &[(usize, DeadLetter)]) -> Option<Self> {
        let (last, _) = page.last()?;
        let marked = &page[page.len().saturating_sub(MARKS)..];
        Some(Cursor {
            position: last + 1,
            first: marked[0].0,
            marks: marked.iter().map(|(_, d)| fingerprint(d)).collect(),
        })
    }

    /// Parses what [`Display`](std::fmt::Display) printed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, '-');
        let position: usize = parts.next()?.parse().ok().filter(|p| *p > 0)?;
        let first: usize = parts.next()?.parse().ok().filter(|f| *f < position)?;
        let marks = parts
            .next()?
            .split('.')
            .map(|fp| {
                (fp.len() == 16)
                    .then(|| u64::from_str_radix(fp, 16).ok())
                    .flatten()
            })
            .collect::<Option<Vec<u64>>>()?;
        if marks.is_empty() || marks.len() > MARKS {
            return None;
        }
        Some(Cursor {
            position,
            first,
            marks,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-", self.position, self.first)?;
        for (i, m) in self.marks.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{m:016x}")?;
        }
        Ok(())
    }
}

/// FNV-1a over the letter's id, failed-at and attempt: equal for the same
/// letter, rarely for two.
pub fn fingerprint(letter: &DeadLetter) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let failed = letter.failed_at.map(|t| t.to_string()).unwrap_or_default();
    for part in [
        letter.id.as_deref().unwrap_or(""),
        &failed,
        letter.attempt.as_deref().unwrap_or(""),
    ] {
        for b in part.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str, failed_at: i64) -> DeadLetter {
        DeadLetter {
            id: Some(id.into()),
            name: None,
            queue: "q".into(),
            attempt: Some("3".into()),
            error: None,
            failed_at: Some(failed_at),
            body_bytes: 0,
        }
    }

    #[test]
    fn a_cursor_prints_and_parses_back() {
        let page: Vec<(usize, DeadLetter)> = (0..12)
            .map(|i| (i * 2, letter(&format!("x{i}"), 17)))
            .collect();
        let c = Cursor::after(&page).expect("a page");
        assert_eq!(c.position, 23);
        assert_eq!(c.first, 8, "the last eight letters are marked");
        assert_eq!(c.marks.len(), MARKS);
        assert_eq!(Cursor::parse(&c.to_string()), Some(c));
        assert_eq!(Cursor::after(&[]), None);
        assert_ne!(fingerprint(&letter("x", 17)), fingerprint(&letter("x", 18)));
        for bad in [
            "",
            "12",
            "x-0-0000000000000000",
            "0-0-0000000000000000",
            "3-3-0000000000000000",
            "3-1-zz",
            "3-1-00",
            "3-1-",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }
}
