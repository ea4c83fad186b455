//! The paging cursor: where the last page ended in the dead-letter queue.
//!
//! A page is read from the head of `NS.dead` with `basic.get` (the letters
//! are held unacked and put back in order), so a cursor cannot be a broker
//! position. It is the position after the last letter returned, counted
//! from the head, plus a fingerprint of that letter (id, failed-at,
//! attempt). The next page looks for the fingerprint at or before that
//! position and resumes right after it: letters removed in front of it
//! (replayed, purged) do not make the next page skip any; new dead letters
//! go to the tail and show up on a later page. Only when the letter the
//! cursor points after was itself removed does the next page resume at
//! its old position minus one, which skips as many letters as were removed
//! before it besides itself.

use super::letter::DeadLetter;

/// Where the next page starts. Printed as `POSITION-FINGERPRINT`; clients
/// treat it as opaque.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Letters from the head up to and including the last one returned.
    pub position: usize,
    /// [`fingerprint`] of that letter.
    pub fingerprint: u64,
}

impl Cursor {
    /// The cursor after `letter`, found at 0-based `index`.
    pub fn after(index: usize, letter: &DeadLetter) -> Self {
        Cursor {
            position: index + 1,
            fingerprint: fingerprint(letter),
        }
    }

    /// Parses what [`Display`](std::fmt::Display) printed.
    pub fn parse(text: &str) -> Option<Self> {
        let (position, fp) = text.split_once('-')?;
        if fp.len() != 16 {
            return None;
        }
        Some(Cursor {
            position: position.parse().ok().filter(|p| *p > 0)?,
            fingerprint: u64::from_str_radix(fp, 16).ok()?,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{:016x}", self.position, self.fingerprint)
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

    #[test]
    fn a_cursor_prints_and_parses_back() {
        let l = DeadLetter {
            id: Some("x".into()),
            name: None,
            queue: "q".into(),
            attempt: Some("3".into()),
            error: None,
            failed_at: Some(17),
            body_bytes: 0,
        };
        let c = Cursor::after(41, &l);
        assert_eq!(c.position, 42);
        assert_eq!(Cursor::parse(&c.to_string()), Some(c));
        let mut other = l.clone();
        other.failed_at = Some(18);
        assert_ne!(fingerprint(&l), fingerprint(&other));
        for bad in [
            "",
            "12",
            "x-0000000000000000",
            "0-0000000000000000",
            "3-zz",
            "3-00",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }
}
