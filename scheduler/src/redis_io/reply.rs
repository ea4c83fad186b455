//! Reading the replies of the scheduler's scripts: a reply that does not
//! have the shape its script documents is a [`ReplyError`], never a panic.

use redis::Value;
use thiserror::Error;

/// A script's reply did not have the documented shape.
#[derive(Debug, Error)]
pub enum ReplyError {
    /// A value of the wrong type.
    #[error("{what}: expected {expected}, got {got}")]
    Unexpected {
        /// The part of the reply being read.
        what: &'static str,
        /// The type the script documents.
        expected: &'static str,
        /// What came instead (debug form).
        got: String,
    },
    /// The reply ended before this part.
    #[error("{0}: missing from the reply")]
    Missing(&'static str),
    /// A string that must be UTF-8 was not.
    #[error("{what}: not UTF-8")]
    Utf8 {
        /// The part of the reply being read.
        what: &'static str,
        /// The decoding error.
        #[source]
        cause: std::string::FromUtf8Error,
    },
    /// Redis answered this script with an error.
    #[error("script error: {0}")]
    Script(String),
}

/// Reads the values of an array reply in order.
pub(crate) struct Reader {
    items: std::vec::IntoIter<Value>,
}

impl Reader {
    /// The items of `reply`, which must be an array.
    pub(crate) fn new(reply: Value, what: &'static str) -> Result<Self, ReplyError> {
        match reply {
            Value::Array(items) => Ok(Reader {
                items: items.into_iter(),
            }),
            other => Err(unexpected(what, "an array", other)),
        }
    }

    /// True when every value was read.
    pub(crate) fn is_done(&self) -> bool {
        self.items.len() == 0
    }

    /// The next value, whatever it is.
    pub(crate) fn value(&mut self, what: &'static str) -> Result<Value, ReplyError> {
        self.items.next().ok_or(ReplyError::Missing(what))
    }

    /// The next value, an integer.
    pub(crate) fn int(&mut self, what: &'static str) -> Result<i64, ReplyError> {
        int(self.value(what)?, what)
    }

    /// The next value, a string of bytes.
    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, ReplyError> {
        match self.value(what)? {
            Value::BulkString(b) => Ok(b),
            other => Err(unexpected(what, "a string", other)),
        }
    }

    /// The next value, a UTF-8 string.
    pub(crate) fn string(&mut self, what: &'static str) -> Result<String, ReplyError> {
        String::from_utf8(self.bytes(what)?).map_err(|cause| ReplyError::Utf8 { what, cause })
    }

    /// The next value, an integer where a negative one means none.
    pub(crate) fn opt_time(&mut self, what: &'static str) -> Result<Option<i64>, ReplyError> {
        let n = self.int(what)?;
        Ok((n >= 0).then_some(n))
    }
}

/// `value` as an integer.
pub(crate) fn int(value: Value, what: &'static str) -> Result<i64, ReplyError> {
    match value {
        Value::Int(n) => Ok(n),
        other => Err(unexpected(what, "an integer", other)),
    }
}

/// The error for `got` where `expected` was due; a Redis error reply is
/// reported as such.
fn unexpected(what: &'static str, expected: &'static str, got: Value) -> ReplyError {
    match got {
        Value::ServerError(e) => ReplyError::Script(format!("{e:?}")),
        other => ReplyError::Unexpected {
            what,
            expected,
            got: format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_order_and_reports_what_is_wrong() {
        let reply = Value::Array(vec![
            Value::Int(4),
            Value::BulkString(b"m".to_vec()),
            Value::Int(-1),
            Value::BulkString(vec![0xff]),
        ]);
        let mut r = Reader::new(reply, "test").expect("array");
        assert_eq!(r.int("a").expect("int"), 4);
        assert_eq!(r.string("b").expect("string"), "m");
        assert_eq!(r.opt_time("c").expect("time"), None);
        assert!(matches!(
            r.string("d"),
            Err(ReplyError::Utf8 { what: "d", .. })
        ));
        assert!(r.is_done());
        assert!(matches!(r.int("e"), Err(ReplyError::Missing("e"))));
    }

    #[test]
    fn a_wrong_type_or_a_non_array_is_an_error() {
        assert!(matches!(
            Reader::new(Value::Int(1), "x"),
            Err(ReplyError::Unexpected { what: "x", .. })
        ));
        let mut r = Reader::new(Value::Array(vec![Value::Nil]), "x").expect("array");
        assert!(matches!(r.int("n"), Err(ReplyError::Unexpected { .. })));
    }
}
