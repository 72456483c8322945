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
///
/// The answer is always the one of [`decode_increment_strict`]: bodies in the shape
/// producers normally send are recognised by [`decode_canonical`] without building
/// a JSON parser, and everything else (including every rejection) goes to the strict
/// decoder.
pub fn decode_increment(bytes: &[u8]) -> Result<Increment, InvalidIncrement> {
    match decode_canonical(bytes) {
        Some(increment) => Ok(increment),
        None => decode_increment_strict(bytes),
    }
}

/// The strict decoder alone (serde_json plus the contract's rules), without the
/// fast path. [`decode_increment`] answers exactly as this function does; it is
/// public so tests and benchmarks can hold the two side by side.
pub fn decode_increment_strict(bytes: &[u8]) -> Result<Increment, InvalidIncrement> {
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

/// The fast path: recognises the bodies producers normally send and decodes them
/// without a JSON parser; `None` means "not recognised", never "invalid".
///
/// It accepts exactly the texts of this grammar, and nothing else:
///
/// ```text
/// body   = ws "{" ws field ws "," ws field ws "}" ws     one "key" and one "value" field, either order
/// key    = "\"key\"" ws ":" ws "\"" uuid "\""            uuid: 8-4-4-4-12 hex digits, any case, no escapes
/// value  = "\"value\"" ws ":" ws [1-9] [0-9]{0,18}       and at most 9223372036854775807
/// ws     = (" " | "\t" | "\n" | "\r")*                   JSON's whitespace, as serde_json reads it
/// ```
///
/// Every such text is well-formed JSON with no escapes, no duplicate or unknown
/// field, a key of the hyphenated form the strict decoder checks and a plain integer
/// in range, so [`decode_increment_strict`] accepts it with the same key and value
/// (the differential property test in `schemas/tests/fast_path.rs` checks this on
/// near-canonical inputs). Anything outside the grammar (escapes, leading zeros,
/// exponents, 20+ digits, other whitespace, trailing bytes, non-ASCII) is left to
/// the strict decoder, which also produces every rejection and its detail.
pub fn decode_canonical(bytes: &[u8]) -> Option<Increment> {
    let mut cursor = Cursor { rest: bytes };
    cursor.skip_whitespace();
    cursor.eat(b'{')?;
    cursor.skip_whitespace();
    let increment = if cursor.eat_literal(b"\"key\"") {
        let key = cursor.key_after_name()?;
        cursor.between_fields()?;
        cursor.eat_literal(b"\"value\"").then_some(())?;
        let value = cursor.value_after_name()?;
        Increment { key, value }
    } else if cursor.eat_literal(b"\"value\"") {
        let value = cursor.value_after_name()?;
        cursor.between_fields()?;
        cursor.eat_literal(b"\"key\"").then_some(())?;
        let key = cursor.key_after_name()?;
        Increment { key, value }
    } else {
        return None;
    };
    cursor.skip_whitespace();
    cursor.eat(b'}')?;
    cursor.skip_whitespace();
    cursor.rest.is_empty().then_some(increment)
}

/// The unread part of a body, for [`decode_canonical`].
struct Cursor<'a> {
    rest: &'a [u8],
}

/// Hex digit values by byte; `INVALID_HEX` for every other byte.
const INVALID_HEX: u8 = 0xff;
static HEX_VALUES: [u8; 256] = {
    let mut table = [INVALID_HEX; 256];
    let mut digit = 0u8;
    while digit < 10 {
        table[(b'0' + digit) as usize] = digit;
        digit += 1;
    }
    let mut letter = 0u8;
    while letter < 6 {
        table[(b'a' + letter) as usize] = 10 + letter;
        table[(b'A' + letter) as usize] = 10 + letter;
        letter += 1;
    }
    table
};

/// Where the two hex digits of each of the 16 bytes sit in `8-4-4-4-12` text.
const HEX_PAIR_POSITIONS: [[usize; 2]; 16] = {
    let mut pairs = [[0usize; 2]; 16];
    let mut digit = 0;
    let mut at = 0;
    while digit < 32 {
        if at == 8 || at == 13 || at == 18 || at == 23 {
            at += 1;
        }
        pairs[digit / 2][digit % 2] = at;
        digit += 1;
        at += 1;
    }
    pairs
};

impl Cursor<'_> {
    fn skip_whitespace(&mut self) {
        while let [b' ' | b'\t' | b'\n' | b'\r', rest @ ..] = self.rest {
            self.rest = rest;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        match self.rest {
            [first, rest @ ..] if *first == byte => {
                self.rest = rest;
                Some(())
            }
            _ => None,
        }
    }

    fn eat_literal(&mut self, literal: &[u8]) -> bool {
        match self.rest.strip_prefix(literal) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    /// `ws "," ws` between the two fields.
    fn between_fields(&mut self) -> Option<()> {
        self.skip_whitespace();
        self.eat(b',')?;
        self.skip_whitespace();
        Some(())
    }

    /// `ws ":" ws`, after a field name.
    fn colon(&mut self) -> Option<()> {
        self.skip_whitespace();
        self.eat(b':')?;
        self.skip_whitespace();
        Some(())
    }

    /// `ws ":" ws "\"" uuid "\""`.
    fn key_after_name(&mut self) -> Option<Uuid> {
        self.colon()?;
        let (text, rest) = match self.rest {
            [b'"', rest @ ..] if rest.len() > 36 && rest[36] == b'"' => rest.split_at(36),
            _ => return None,
        };
        let text: &[u8; 36] = text.try_into().ok()?;
        if text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
            return None;
        }
        // Each byte from its two digits independently (no carried 128-bit shift),
        // so the 16 bytes decode in parallel.
        let mut uuid = [0u8; 16];
        let mut invalid = 0u8;
        for (byte, positions) in uuid.iter_mut().zip(HEX_PAIR_POSITIONS.iter()) {
            let high = HEX_VALUES[usize::from(text[positions[0]])];
            let low = HEX_VALUES[usize::from(text[positions[1]])];
            invalid |= high | low;
            *byte = (high << 4) | (low & 0x0f);
        }
        if invalid & 0xf0 != 0 {
            return None;
        }
        // Skip the 36 characters and the closing quote.
        self.rest = &rest[1..];
        Some(Uuid::from_bytes(uuid))
    }

    /// `ws ":" ws [1-9][0-9]{0,18}`, at most `i64::MAX`.
    fn value_after_name(&mut self) -> Option<i64> {
        self.colon()?;
        let digits = self
            .rest
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .count();
        // 19 digits always fit in a u64; more are beyond i64 or have a leading zero.
        if digits == 0 || digits > 19 || self.rest[0] == b'0' {
            return None;
        }
        let (text, rest) = self.rest.split_at(digits);
        let value = text
            .iter()
            .fold(0u64, |value, byte| value * 10 + u64::from(byte - b'0'));
        let value = i64::try_from(value).ok()?;
        self.rest = rest;
        Some(value)
    }
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
