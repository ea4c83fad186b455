//! Which dead letters an operation touches: ids, origin queue and task
//! name (exact), error text (substring, case-insensitive). Every condition
//! given must hold; an empty filter matches every letter.

use super::letter::DeadLetter;
use serde::{Deserialize, Serialize};

/// Longest queue or name a filter takes (an AMQP short string).
pub const MAX_FILTER_NAME_BYTES: usize = 255;
/// Longest error text a filter takes.
pub const MAX_FILTER_ERROR_BYTES: usize = 1024;
/// Most ids one filter takes.
pub const MAX_FILTER_IDS: usize = 10_000;

/// A selection of dead letters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Task ids (`message_id`); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// The origin queue (`x-origin-queue`, else the routing key), exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The task name (`type`), exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A part of the error text (`x-error`), ignoring case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A filter value that cannot be used: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FilterError {
    /// `ids`, `queue`, `name` or `error`.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl Filter {
    /// Only the letters with these ids.
    pub fn ids(ids: &[String]) -> Self {
        Filter {
            ids: ids.to_vec(),
            ..Filter::default()
        }
    }

    /// No condition at all: every letter.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.queue.is_none() && self.name.is_none() && self.error.is_none()
    }

    /// The filter with empty strings taken as absent (a form's empty
    /// field), checked against the size limits.
    pub fn normalized(mut self) -> Result<Self, FilterError> {
        for (field, value, max) in [
            ("queue", &mut self.queue, MAX_FILTER_NAME_BYTES),
            ("name", &mut self.name, MAX_FILTER_NAME_BYTES),
            ("error", &mut self.error, MAX_FILTER_ERROR_BYTES),
        ] {
            if value.as_deref() == Some("") {
                *value = None;
            }
            if let Some(v) = value.as_deref() {
                if v.len() > max {
                    return Err(FilterError {
                        field,
                        message: format!("{} bytes, at most {max}", v.len()),
                    });
                }
            }
        }
        if self.ids.len() > MAX_FILTER_IDS {
            return Err(FilterError {
                field: "ids",
                message: format!("{} ids, at most {MAX_FILTER_IDS}", self.ids.len()),
            });
        }
        if let Some(bad) = self.ids.iter().find(|id| id.is_empty() || id.len() > 255) {
            return Err(FilterError {
                field: "ids",
                message: format!("an id must be 1 to 255 bytes, not {}", bad.len()),
            });
        }
        Ok(self)
    }

    /// Whether `letter` is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        (self.ids.is_empty()
            || letter
                .id
                .as_ref()
                .is_some_and(|id| self.ids.iter().any(|want| want == id)))
            && self.queue.as_ref().is_none_or(|q| *q == letter.queue)
            && self
                .name
                .as_ref()
                .is_none_or(|n| letter.name.as_ref() == Some(n))
            && self.error.as_ref().is_none_or(|e| {
                letter
                    .error
                    .as_ref()
                    .is_some_and(|text| text.to_lowercase().contains(&e.to_lowercase()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str, queue: &str, name: &str, error: &str) -> DeadLetter {
        DeadLetter {
            id: Some(id.into()),
            name: Some(name.into()),
            queue: queue.into(),
            attempt: Some("1".into()),
            error: Some(error.into()),
            failed_at: Some(1),
            body_bytes: 0,
        }
    }

    #[test]
    fn every_condition_given_must_hold() {
        let l = letter("a", "emails", "email.send", "SMTP timeout after 30 s");
        assert!(Filter::default().matches(&l));
        let f = |q: Option<&str>, n: Option<&str>, e: Option<&str>| {
            Filter {
                ids: vec![],
                queue: q.map(Into::into),
                name: n.map(Into::into),
                error: e.map(Into::into),
            }
            .normalized()
            .expect("valid")
        };
        assert!(f(Some("emails"), None, None).matches(&l));
        assert!(!f(Some("email"), None, None).matches(&l), "queue is exact");
        assert!(f(None, Some("email.send"), Some("smtp TIME")).matches(&l));
        assert!(!f(None, Some("email.send"), Some("refused")).matches(&l));
        assert!(!f(None, Some("email"), None).matches(&l), "name is exact");
        assert!(
            f(Some(""), Some(""), Some("")).matches(&l),
            "empty = absent"
        );
        assert!(Filter::ids(&["a".into(), "b".into()]).matches(&l));
        assert!(!Filter::ids(&["b".into()]).matches(&l));
        let mut no_error = l.clone();
        no_error.error = None;
        assert!(!f(None, None, Some("x")).matches(&no_error));
    }

    #[test]
    fn oversized_values_name_their_field() {
        let e = Filter {
            queue: Some("q".repeat(256)),
            ..Filter::default()
        }
        .normalized()
        .expect_err("too long");
        assert_eq!(e.field, "queue");
        let e = Filter::ids(&[String::new()])
            .normalized()
            .expect_err("empty id");
        assert_eq!(e.field, "ids");
    }
}
