//! Secrets in settings: URLs that carry a password, the API token.
//!
//! Passwords must never reach a log line, an error message or `--help`:
//! clap echoes a value it refuses, so the settings that may hold a secret
//! use [`SecretParser`], which shows the value redacted. Each secret can also
//! come from a file (`KAIROS_X_FILE`, for secrets mounted by Docker or
//! Kubernetes): [`read_secret_file`].

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use std::ffi::OsStr;
use std::path::Path;

/// What stands in for a password or token.
pub const MASK: &str = "***";

/// What separates a URL's scheme from the rest.
const SCHEME_END: &str = "://";

/// `url` with the password of its user info replaced by `***`
/// (`amqp://kairos:***@rabbitmq:5672/%2f`). A URL without a password comes
/// back unchanged. When in doubt (an `@` in the path as well) more is
/// masked, never less: the last `@` ends the user info.
pub fn redact_url(url: &str) -> String {
    // A list of URLs (the nodes of a cluster): each redacted on its own.
    if url.contains(',') {
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    let (scheme, rest) = match url.find(SCHEME_END) {
        Some(i) => url.split_at(i + SCHEME_END.len()),
        None => ("", url),
    };
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}{user}:{MASK}{}", &rest[at..]),
        // A user name alone is no secret.
        None => url.to_string(),
    }
}

/// `text` with every URL in it redacted as by [`redact_url`]: for error
/// texts of libraries that may quote the URL they were given.
pub(crate) fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(SCHEME_END) {
        // The URL starts at its scheme (letters before `://`) and ends at
        // whitespace or a quote.
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |p| p + 1);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | '`' | '<' | '>'))
            .map_or(rest.len(), |p| i + p);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A secret value: shown as `***` by `Debug`, so a config printed whole
/// does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`; from here on only [`expose`](Self::expose) shows it.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must use it (a compare,
    /// a connect); never for a log line.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MASK)
    }
}

/// A clap value parser for a secret-bearing setting: `check` validates the
/// value, and a refused value is shown through `shown` (a redacted URL, or
/// nothing at all for a token) instead of as typed.
#[derive(Clone)]
pub struct SecretParser {
    /// Validates the value as typed; its error text is redacted before it
    /// is shown.
    pub check: fn(&str) -> Result<(), String>,
    /// How a refused value is shown: [`redact_url`] for a URL, something
    /// that shows nothing for a token.
    pub shown: fn(&str) -> String,
}

impl TypedValueParser for SecretParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<String, clap::Error> {
        let name = arg.map_or_else(|| "the setting".to_string(), |a| format!("'{a}'"));
        let fail = |why: String| {
            let shown = (self.shown)(&value.to_string_lossy());
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid value '{shown}' for {name}: {why}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| fail("not valid UTF-8".into()))?;
        (self.check)(text).map_err(|why| fail(redact_text(&why)))?;
        Ok(text.to_string())
    }
}

/// Reads a secret from the file a `KAIROS_X_FILE` setting names: its
/// content, trimmed (editors and `echo` add a newline), checked by `check`.
/// Errors name the setting and the path, never the content.
pub fn read_secret_file(
    setting: &str,
    path: &Path,
    check: fn(&str) -> Result<(), String>,
) -> Result<String, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let value = raw.trim();
    if value.is_empty() {
        return Err(format!("{setting}: {} is empty", path.display()));
    }
    check(value).map_err(|why| {
        format!(
            "{setting}: the content of {} is refused: {}",
            path.display(),
            redact_text(&why)
        )
    })?;
    Ok(value.to_string())
}

/// Compares two secrets in time that depends only on their lengths, so the
/// time a wrong guess takes tells nothing about how much of it was right.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_the_rest_kept() {
        for (url, want) in [
            (
                "amqp://kairos:s3cret@rabbitmq:5672/%2f",
                "amqp://kairos:***@rabbitmq:5672/%2f",
            ),
            ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
            ("rediss://u:p@ss@h/0", "rediss://u:***@h/0"),
            ("amqp://u:pa/ss@h", "amqp://u:***@h"),
            (
                "amqp://a:p1@n1:5681/%2f,amqp://b:p2@n2:5682/%2f",
                "amqp://a:***@n1:5681/%2f,amqp://b:***@n2:5682/%2f",
            ),
            ("amqp://127.0.0.1:5672/%2f", "amqp://127.0.0.1:5672/%2f"),
            ("redis://user@h/0", "redis://user@h/0"),
            ("u:s3cret@h", "u:***@h"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn urls_inside_text_are_masked() {
        let text = "cannot connect to 'amqp://a:s3cret@h:1/x' (then redis://:s3cret@r/0): refused";
        let out = redact_text(text);
        assert!(!out.contains("s3cret"), "{out}");
        assert_eq!(
            out,
            "cannot connect to 'amqp://a:***@h:1/x' (then redis://:***@r/0): refused"
        );
        assert_eq!(redact_text("no url here"), "no url here");
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
        assert_eq!(format!("{:?}", Secret::new("s3cret")), "***");
    }

    #[test]
    fn refused_values_are_shown_redacted() {
        let parser = SecretParser {
            check: |_| Err("no good".into()),
            shown: redact_url,
        };
        let cmd = clap::Command::new("x");
        let err = parser
            .parse_ref(&cmd, None, OsStr::new("amqp://u:s3cret@h"))
            .expect_err("refused")
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains("amqp://u:***@h"), "{err}");
    }

    #[test]
    fn secret_files_are_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("kairos-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("token");
        std::fs::write(&path, "  s3cret-value\n").expect("write");
        assert_eq!(
            read_secret_file("KAIROS_X_FILE", &path, |_| Ok(())),
            Ok("s3cret-value".to_string())
        );
        let err =
            read_secret_file("KAIROS_X_FILE", &path, |_| Err("bad".into())).expect_err("refused");
        assert!(err.starts_with("KAIROS_X_FILE"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        std::fs::write(&path, "\n").expect("write");
        assert!(read_secret_file("KAIROS_X_FILE", &path, |_| Ok(())).is_err());
        let missing = read_secret_file("KAIROS_X_FILE", &dir.join("nope"), |_| Ok(()));
        assert!(missing.expect_err("missing").contains("KAIROS_X_FILE"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
