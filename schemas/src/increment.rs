//! The increment body and its strict decoder.
//!
//! One decoder serves the HTTP edge and the aggregator, so a body accepted over HTTP
//! and a record produced directly to Kafka are judged by exactly the same rules.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::reason::RejectReason;

/// A valid increment: a UUID key and a strictly positive i64 value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Increment {
    pub key: Uuid,
    pub value: i64,
}

impl Increment {
    /// The key in canonical form: lower-case hyphenated, as used for the Kafka key.
    pub fn canonical_key(&self) -> String {
        self.key.hyphenated().to_string()
    }

    /// The canonical JSON body, `{"key":"<lower-case uuid>","value":N}`.
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"key":"{}","value":{}}}"#,
            self.key.hyphenated(),
            self.value
        )
    }
}

/// Why one body was rejected: a stable reason and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct InvalidIncrement {
    pub reason: RejectReason,
    pub detail: String,
}

impl InvalidIncrement {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        InvalidIncrement {
            reason,
            detail: detail.into(),
        }
    }
}

/// Decodes and validates one increment body.
///
/// Rules (DESIGN.md, "The increment contract"): exactly the fields `key` and `value`;
/// `key` a UUID string in 8-4-4-4-12 hyphenated form (any letter case; braces, URN
/// and 32-digit forms are refused so every producer agrees on one text); `value` a
/// JSON integer in `1..=2^63-1` (no fraction, exponent, string or null).
pub fn decode_increment(bytes: &[u8]) -> Result<Increment, InvalidIncrement> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(InvalidIncrement::new(
            RejectReason::InvalidJson,
            "empty body",
        ));
    }
    let rejection = Cell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = deserializer.deserialize_any(IncrementVisitor {
        rejection: &rejection,
    });
    let increment = match parsed {
        Ok(increment) => increment,
        Err(err) => return Err(classify(bytes, err, rejection.take())),
    };
    deserializer
        .end()
        .map_err(|err| InvalidIncrement::new(RejectReason::InvalidJson, err.to_string()))?;
    Ok(increment)
}

/// A rule broken inside the visitor is recorded in `rejection`; anything else that
/// failed is the JSON itself.
///
/// The visitor stops at the first broken rule, before the rest of the text is read;
/// a body that is also malformed further on must still be reported as malformed
/// (400, not 422), so on this error path only the whole text is syntax-checked.
fn classify(
    bytes: &[u8],
    err: serde_json::Error,
    rejection: Option<InvalidIncrement>,
) -> InvalidIncrement {
    // serde_json refuses integers beyond f64's range as a parse error, but they are
    // well-formed JSON numbers: the rule they break is the value range.
    if err.to_string().starts_with("number out of range") {
        return InvalidIncrement::new(
            RejectReason::InvalidValue,
            "value is far beyond the maximum 9223372036854775807",
        );
    }
    match rejection {
        Some(rejection) => match serde_json::from_slice::<de::IgnoredAny>(bytes) {
            Err(syntax) if !syntax.to_string().starts_with("number out of range") => {
                InvalidIncrement::new(RejectReason::InvalidJson, syntax.to_string())
            }
            _ => rejection,
        },
        None => InvalidIncrement::new(RejectReason::InvalidJson, err.to_string()),
    }
}

struct IncrementVisitor<'a> {
    rejection: &'a Cell<Option<InvalidIncrement>>,
}

impl IncrementVisitor<'_> {
    fn reject<E: de::Error>(&self, reason: RejectReason, detail: impl Into<String>) -> E {
        let rejection = InvalidIncrement::new(reason, detail);
        let message = rejection.to_string();
        self.rejection.set(Some(rejection));
        E::custom(message)
    }

    fn not_an_object<E: de::Error>(&self, found: &str) -> Result<Increment, E> {
        Err(self.reject(
            RejectReason::NotAnObject,
            format!("expected a JSON object with \"key\" and \"value\", found {found}"),
        ))
    }
}

impl<'de> Visitor<'de> for IncrementVisitor<'_> {
    type Value = Increment;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object {\"key\": UUID, \"value\": integer}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Increment, A::Error> {
        let mut key: Option<Uuid> = None;
        let mut value: Option<i64> = None;
        while let Some(field) = map.next_key::<Cow<'de, str>>()? {
            match field.as_ref() {
                "key" => {
                    if key.is_some() {
                        return Err(
                            self.reject(RejectReason::DuplicateField, "duplicate field \"key\"")
                        );
                    }
                    key = Some(map.next_value_seed(KeySeed { visitor: &self })?);
                }
                "value" => {
                    if value.is_some() {
                        return Err(
                            self.reject(RejectReason::DuplicateField, "duplicate field \"value\"")
                        );
                    }
                    value = Some(map.next_value_seed(ValueSeed { visitor: &self })?);
                }
                other => {
                    let shown: String = other.chars().take(64).collect();
                    return Err(self.reject(
                        RejectReason::UnknownField,
                        format!("unknown field {shown:?}: only \"key\" and \"value\" are allowed"),
                    ));
                }
            }
        }
        let key =
            key.ok_or_else(|| self.reject(RejectReason::MissingKey, "missing field \"key\""))?;
        let value = value
            .ok_or_else(|| self.reject(RejectReason::MissingValue, "missing field \"value\""))?;
        Ok(Increment { key, value })
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<Increment, A::Error> {
        self.not_an_object("an array")
    }
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<Increment, E> {
        self.not_an_object("a string")
    }
    fn visit_u64<E: de::Error>(self, _v: u64) -> Result<Increment, E> {
        self.not_an_object("a number")
    }
    fn visit_i64<E: de::Error>(self, _v: i64) -> Result<Increment, E> {
        self.not_an_object("a number")
    }
    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Increment, E> {
        self.not_an_object("a number")
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<Increment, E> {
        self.not_an_object("a boolean")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Increment, E> {
        self.not_an_object("null")
    }
}

/// Parses the `key` field.
struct KeySeed<'v, 'a> {
    visitor: &'v IncrementVisitor<'a>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = Uuid;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Uuid, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, '_> {
    type Value = Uuid;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a UUID string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Uuid, E> {
        parse_hyphenated_uuid(text).ok_or_else(|| {
            let shown: String = text.chars().take(64).collect();
            self.visitor.reject(
                RejectReason::InvalidKey,
                format!("key {shown:?} is not a UUID in 8-4-4-4-12 hyphenated form"),
            )
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<Uuid, A::Error> {
        Err(self.not_a_string("an object"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<Uuid, A::Error> {
        Err(self.not_a_string("an array"))
    }
    fn visit_u64<E: de::Error>(self, _v: u64) -> Result<Uuid, E> {
        Err(self.not_a_string("a number"))
    }
    fn visit_i64<E: de::Error>(self, _v: i64) -> Result<Uuid, E> {
        Err(self.not_a_string("a number"))
    }
    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Uuid, E> {
        Err(self.not_a_string("a number"))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<Uuid, E> {
        Err(self.not_a_string("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Uuid, E> {
        Err(self.not_a_string("null"))
    }
}

impl KeySeed<'_, '_> {
    fn not_a_string<E: de::Error>(&self, found: &str) -> E {
        self.visitor.reject(
            RejectReason::InvalidKey,
            format!("key must be a UUID string, found {found}"),
        )
    }
}

/// Accepts only `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` with hex digits of any case.
fn parse_hyphenated_uuid(text: &str) -> Option<Uuid> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    for (index, byte) in bytes.iter().enumerate() {
        let is_dash_position = matches!(index, 8 | 13 | 18 | 23);
        let ok = if is_dash_position {
            *byte == b'-'
        } else {
            byte.is_ascii_hexdigit()
        };
        if !ok {
            return None;
        }
    }
    Uuid::try_parse(text).ok()
}

/// Parses the `value` field.
struct ValueSeed<'v, 'a> {
    visitor: &'v IncrementVisitor<'a>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = i64;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<i64, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ValueSeed<'_, '_> {
    fn invalid<E: de::Error>(&self, detail: impl Into<String>) -> E {
        self.visitor.reject(RejectReason::InvalidValue, detail)
    }
    fn not_an_integer<E: de::Error>(&self, found: &str) -> E {
        self.invalid(format!(
            "value must be a JSON integer from 1 to 9223372036854775807, found {found}"
        ))
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer from 1 to 2^63-1")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        match i64::try_from(v) {
            Ok(0) => Err(self.invalid("value must be at least 1, found 0")),
            Ok(value) => Ok(value),
            Err(_) => Err(self.invalid(format!(
                "value {v} is larger than the maximum 9223372036854775807"
            ))),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        if v >= 1 {
            Ok(v)
        } else {
            Err(self.invalid(format!("value must be at least 1, found {v}")))
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
        // serde_json reports every number with a fraction or an exponent, and every
        // integer beyond u64/i64, as f64: none of them is an accepted integer.
        Err(self.not_an_integer(&format!("the non-integer number {v}")))
    }
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<i64, E> {
        Err(self.not_an_integer("a string"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<i64, A::Error> {
        Err(self.not_an_integer("an object"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<i64, A::Error> {
        Err(self.not_an_integer("an array"))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<i64, E> {
        Err(self.not_an_integer("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<i64, E> {
        Err(self.not_an_integer("null"))
    }
}

/// How a `POST /increments` body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFormat {
    /// One JSON array of increment objects.
    JsonArray,
    /// Newline-delimited JSON: one increment object per line; blank lines are ignored.
    Ndjson,
}

/// One rejected item of a batch, by zero-based index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRejection {
    pub index: usize,
    pub error: InvalidIncrement,
}

/// Why a batch was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchRejection {
    /// The framing itself is broken (not an array, malformed array).
    #[error("{0}")]
    Framing(InvalidIncrement),
    /// Well-formed, but no items: `[]`, or an NDJSON body of blank lines only.
    #[error("the batch has no items")]
    Empty,
    /// Some items break the rules; nothing of the batch may be produced.
    #[error("{} invalid item(s) in batch", .0.len())]
    Items(Vec<ItemRejection>),
    /// More items than allowed in one batch.
    #[error("batch has {count} items, more than the limit of {limit}")]
    TooManyItems { count: usize, limit: usize },
}

/// Decodes a whole batch; it is valid only if every item is.
pub fn decode_batch(
    body: &[u8],
    format: BatchFormat,
    max_items: usize,
) -> Result<Vec<Increment>, BatchRejection> {
    let items: Vec<&[u8]> = match format {
        BatchFormat::JsonArray => {
            let raw: Vec<&RawValue> = serde_json::from_slice(body).map_err(|err| {
                let reason = if body.iter().all(u8::is_ascii_whitespace) {
                    InvalidIncrement::new(RejectReason::InvalidJson, "empty body")
                } else if err.classify() == serde_json::error::Category::Data {
                    InvalidIncrement::new(
                        RejectReason::NotAnObject,
                        format!("expected a JSON array of increments: {err}"),
                    )
                } else {
                    InvalidIncrement::new(RejectReason::InvalidJson, err.to_string())
                };
                BatchRejection::Framing(reason)
            })?;
            raw.into_iter().map(|item| item.get().as_bytes()).collect()
        }
        BatchFormat::Ndjson => body
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .collect(),
    };
    if items.is_empty() {
        return Err(BatchRejection::Empty);
    }
    if items.len() > max_items {
        return Err(BatchRejection::TooManyItems {
            count: items.len(),
            limit: max_items,
        });
    }
    let mut increments = Vec::with_capacity(items.len());
    let mut rejections = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match decode_increment(item) {
            Ok(increment) => increments.push(increment),
            Err(error) => rejections.push(ItemRejection { index, error }),
        }
    }
    if rejections.is_empty() {
        Ok(increments)
    } else {
        Err(BatchRejection::Items(rejections))
    }
}
