//! AMQP short strings without panics.
//!
//! Exchange and queue names, routing keys, header names, `type`,
//! `message_id` and `content_type` are AMQP short strings: at most 255
//! bytes. lapin's `ShortString::from` (and so `.into()` from a `&str` or
//! `String`) panics above that, and every one of those values can come
//! from a user (an HTTP body, a schedule file, a message of another
//! client). Every conversion of a value that is not a short literal goes
//! through [`short`], which fails with an error naming the field instead.
//! The test at the bottom keeps the panicking forms out of the sources.

use lapin::types::ShortString;

/// Longest AMQP short string, in bytes.
pub(crate) const MAX_SHORT_STRING: usize = 255;

/// A value too long for an AMQP short string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {len} bytes; AMQP allows at most {MAX_SHORT_STRING}")]
pub struct TooLong {
    /// What the value is (`routing key`, `header name "..."`).
    pub field: String,
    /// The value's length in bytes.
    pub len: usize,
}

/// `value` as a short string, or an error naming `field`.
pub fn short(field: &str, value: &str) -> Result<ShortString, TooLong> {
    ShortString::try_new(value).map_err(|_| TooLong {
        field: field.to_string(),
        len: value.len(),
    })
}

/// A header name as a short string; the error quotes the start of it.
pub fn header_name(name: &str) -> Result<ShortString, TooLong> {
    short(&format!("header name {:?}", preview(name)), name)
}

/// How many characters of a value an error text quotes: enough to tell
/// which value it was, short enough that a huge one does not flood a log.
const PREVIEW_CHARS: usize = 32;

/// The first `PREVIEW_CHARS` (32) characters of a (possibly huge) value, for
/// error texts; `…` marks a cut.
pub fn preview(value: &str) -> String {
    let mut out: String = value.chars().take(PREVIEW_CHARS).collect();
    if out.len() < value.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_to_255_bytes_fit_and_longer_is_an_error_naming_the_field() {
        assert_eq!(short("q", &"a".repeat(255)).unwrap().as_str().len(), 255);
        let err = short("routing key", &"a".repeat(256)).unwrap_err();
        assert_eq!(err.len, 256);
        assert!(err.to_string().contains("routing key"), "{err}");
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        assert!(short("q", &"é".repeat(128)).is_err());
        let err = header_name(&"h".repeat(300)).unwrap_err();
        assert!(err.to_string().starts_with("header name \"hhhh"), "{err}");
        assert!(err.to_string().len() < 120, "{err}");
    }

    /// The guard: no source of the services builds a short string in a way
    /// that panics on a long value. `"literal".into()` stays allowed (a
    /// literal's length is known when it is written).
    #[test]
    fn no_panicking_short_string_conversions_in_the_sources() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut offences = Vec::new();
        for krate in ["shared", "scheduler", "worker", "ctl"] {
            scan(&root.join(krate).join("src"), &mut offences);
        }
        assert!(
            offences.is_empty(),
            "use kairos_shared::short::short (or a Names method) instead:\n{}",
            offences.join("\n")
        );
    }

    /// Patterns that turn a runtime string into a short string unchecked.
    const FORBIDDEN: [&str; 4] = [
        "ShortString::from(",
        ".as_str().into()",
        ".to_string().into()",
        ".clone().into()",
    ];

    fn scan(dir: &std::path::Path, offences: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                scan(&path, offences);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("short.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // Unit tests build their fixtures with short literals.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, line) in code.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                if FORBIDDEN.iter().any(|p| line.contains(p)) {
                    offences.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
}
