//! Request JSON read straight into typed values, with counts checked while parsing.
//!
//! A generic `serde_json::Value` tree costs tens of bytes per JSON token (an empty object in
//! an array is 3 bytes of body and about 80 of tree), so a body of tiny objects parsed that way
//! takes ~70× its size before any check can refuse it. Here arrays are refused at the first
//! element over their limit, strings (base64 images) and metadata are borrowed from the body
//! rather than copied, and unknown keys are skipped without being built. What a body costs is
//! therefore its own bytes plus at most `max_images` small records.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::{ApiError, ErrorCode};

/// The most elements each array may hold.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// `images` and `items`.
    pub images: usize,
    /// `vector`.
    pub vector: usize,
}

/// Every key any JSON request body may have; each route takes the ones it knows.
#[derive(Debug, Default)]
pub struct JsonBody<'a> {
    pub images: Option<Vec<Text<'a>>>,
    pub items: Option<Vec<AddItem<'a>>>,
    pub vector: Option<Vec<f32>>,
    pub id: Option<String>,
    /// Keys that are none of the above (skipped unread).
    pub unknown: Vec<String>,
}

impl JsonBody<'_> {
    /// How many keys the object had.
    pub fn keys(&self) -> usize {
        usize::from(self.images.is_some())
            + usize::from(self.items.is_some())
            + usize::from(self.vector.is_some())
            + usize::from(self.id.is_some())
            + self.unknown.len()
    }
}

/// One item of `POST /v1/items`.
#[derive(Debug, Deserialize)]
pub struct AddItem<'a> {
    pub id: String,
    #[serde(borrow)]
    pub image: Text<'a>,
    /// Kept as the client's JSON text: never built into a tree.
    #[serde(default, borrow)]
    pub metadata: Option<&'a RawValue>,
}

/// A JSON string, borrowed from the body unless it has escapes.
#[derive(Debug)]
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Which limit a body broke, so the caller can answer with the right status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Images(usize),
    Vector(usize),
}

/// Parses a JSON object body. `shape` describes the expected body in error messages.
pub fn parse<'a>(body: &'a [u8], caps: Caps, shape: &str) -> Result<JsonBody<'a>, ApiError> {
    let over = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = BodySeed { caps, over: &over }.deserialize(&mut de).and_then(|b| de.end().map(|()| b));
    match (parsed, over.get()) {
        (Ok(b), _) => Ok(b),
        (Err(_), Some(Over::Images(max))) => Err(ApiError::new(
            ErrorCode::TooManyImages,
            format!("the request has more than {max} images, over the limit of {max} per request"),
        )),
        (Err(_), Some(Over::Vector(max))) => Err(ApiError::invalid_request(format!(
            "\"vector\" has more than {max} values, the index expects {max}"
        ))),
        (Err(e), None) if e.is_data() => Err(ApiError::invalid_request(format!("expected {shape}: {e}"))),
        (Err(e), None) => Err(ApiError::new(ErrorCode::InvalidJson, format!("the body is not valid JSON ({shape}): {e}"))),
    }
}

struct BodySeed<'c> {
    caps: Caps,
    over: &'c Cell<Option<Over>>,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = JsonBody<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<JsonBody<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = JsonBody<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonBody<'de>, A::Error> {
        let mut body = JsonBody::default();
        let (images, vector) = (Over::Images(self.caps.images), Over::Vector(self.caps.vector));
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let key = key.0;
            let fresh = match &*key {
                "images" => body.images.replace(map.next_value_seed(Capped::new(images, self.over))?).is_none(),
                "items" => body.items.replace(map.next_value_seed(Capped::new(images, self.over))?).is_none(),
                "vector" => body.vector.replace(map.next_value_seed(Capped::new(vector, self.over))?).is_none(),
                "id" => body.id.replace(map.next_value()?).is_none(),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    body.unknown.push(key.chars().take(64).collect());
                    true
                }
            };
            if !fresh {
                return Err(de::Error::custom(format!("duplicate key \"{key}\"")));
            }
        }
        Ok(body)
    }
}

/// A JSON array refused as soon as it holds one element more than its limit.
struct Capped<'c, T> {
    limit: Over,
    over: &'c Cell<Option<Over>>,
    _t: PhantomData<T>,
}

impl<'c, T> Capped<'c, T> {
    fn new(limit: Over, over: &'c Cell<Option<Over>>) -> Self {
        Capped { limit, over, _t: PhantomData }
    }

    fn max(&self) -> usize {
        match self.limit {
            Over::Images(n) | Over::Vector(n) => n,
        }
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Capped<'_, T> {
    type Value = Vec<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Capped<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of at most {} elements", self.max())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let max = self.max();
        let mut out = Vec::with_capacity(max.min(64));
        while let Some(x) = seq.next_element()? {
            if out.len() == max {
                self.over.set(Some(self.limit));
                return Err(de::Error::custom(format!("more than {max} elements")));
            }
            out.push(x);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    const CAPS: Caps = Caps { images: 2, vector: 3 };

    #[test]
    fn reads_each_shape_and_borrows_strings() {
        let body = br#"{"images": ["aGk=", "a\/b"], "extra": {"deep": [1, 2]}}"#;
        let b = parse(body, CAPS, "x").expect("parses");
        assert_eq!((b.unknown.clone(), b.keys()), (vec!["extra".to_string()], 2));
        let images = b.images.expect("images");
        assert!(matches!(images[0].0, Cow::Borrowed("aGk=")));
        assert_eq!(images[1].0, "a/b");
        let b = parse(br#"{"items": [{"id": "a", "image": "aGk=", "metadata": {"k": [1, {"x": null}]}}]}"#, CAPS, "x").expect("items");
        let items = b.items.expect("items");
        assert_eq!(items[0].metadata.expect("metadata").get(), r#"{"k": [1, {"x": null}]}"#);
        assert_eq!(parse(br#"{"vector": [1, 2.5, -3]}"#, CAPS, "x").expect("v").vector, Some(vec![1.0, 2.5, -3.0]));
    }

    #[test]
    fn refuses_at_the_first_element_over_a_cap() {
        let err = parse(br#"{"images": ["", "", "", "#, CAPS, "x").unwrap_err();
        assert_eq!((err.status(), err.code), (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooManyImages));
        let err = parse(br#"{"items": [{"a":0},{"a":0}]}"#, CAPS, "x").unwrap_err();
        assert_eq!((err.status(), err.code), (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidRequest), "{}", err.message);
        let err = parse(br#"{"vector": [1, 2, 3, 4]}"#, CAPS, "x").unwrap_err();
        assert!(err.message.contains("more than 3 values"), "{}", err.message);
        let err = parse(br#"{"id": "a", "id": "b"}"#, CAPS, "x").unwrap_err();
        assert!(err.message.contains("duplicate key"), "{}", err.message);
        let err = parse(b"{\"id\": \"a\"} x", CAPS, "x").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidJson);
        assert_eq!(parse(b"[1]", CAPS, "x").unwrap_err().status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
