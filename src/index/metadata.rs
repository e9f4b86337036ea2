//! An item's metadata, held as the JSON text it arrived as.
//!
//! A `serde_json::Value` tree costs up to ~170× its text for arrays of small objects (a 4.2 MB
//! document took ~700 MB); the text costs its length. It is checked to be JSON once, when it
//! is made, and written to disk and into responses as it is, without being parsed again.

use std::fmt;
use std::sync::Arc;

use serde::{Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

#[derive(Clone)]
pub struct Metadata(Arc<RawValue>);

impl Metadata {
    /// Checks that `text` is one JSON value and keeps it as it is.
    pub fn from_json(text: String) -> Result<Metadata, serde_json::Error> {
        RawValue::from_string(text).map(|raw| Metadata(Arc::from(raw)))
    }

    /// Keeps an already-checked borrowed value (as request parsing yields).
    pub fn from_raw(raw: &RawValue) -> Metadata {
        Metadata(Arc::from(raw.to_owned()))
    }

    pub fn from_value(value: &Value) -> Metadata {
        // A Value always serialises: its keys are strings.
        Metadata::from_json(value.to_string()).expect("a Value's text is JSON")
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The parsed value (for tools and tests; serving never needs it).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.get()).unwrap_or(Value::Null)
    }
}

impl PartialEq for Metadata {
    fn eq(&self, other: &Metadata) -> bool {
        self.get() == other.get()
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_and_serves_the_text() {
        let m = Metadata::from_json(r#"{"k": [1, 2]}"#.into()).expect("JSON");
        assert_eq!(m.get(), r#"{"k": [1, 2]}"#);
        assert_eq!(serde_json::to_string(&serde_json::json!({"m": 0})).expect("ser"), r#"{"m":0}"#);
        #[derive(Serialize)]
        struct Item {
            metadata: Metadata,
        }
        assert_eq!(serde_json::to_string(&Item { metadata: m.clone() }).expect("ser"), r#"{"metadata":{"k": [1, 2]}}"#);
        assert_eq!(m.to_value(), serde_json::json!({"k": [1, 2]}));
        assert!(Metadata::from_json("{".into()).is_err());
        assert!(Metadata::from_json("1 2".into()).is_err());
    }
}
