//! Limits on user-supplied JSON, and a strict JSON reader that enforces them.
//!
//! Every JSON value a user hands the bus (a request body of the reference
//! host: entity and entry fields, attribute values, `default_value`, task
//! parameters) ends up inside other JSON: an event envelope, a hook request, a
//! job request. Their readers (the SDK, `hookbus rebuild`, replay) use
//! `serde_json`, which refuses nesting deeper than 128 levels. So a user value
//! may nest at most [`MAX_JSON_DEPTH`] levels, far below that: the deepest
//! place a value sits in any message (an attribute's `default_value` in an
//! `entity.after_update` event: envelope, `data`, `entity`, `attrs`, one
//! attribute) adds about 6 levels.
//!
//! [`parse_strict`] reads a request body and refuses, naming the field:
//! nesting deeper than [`MAX_JSON_DEPTH`] (the body counting as level 1), a key
//! that appears twice in one object (`serde_json` would silently keep the last
//! one), and a NUL character (`\u0000`) in any string or key (PostgreSQL's text
//! cannot hold it; SQLite would store it: both are refused alike).

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Deepest nesting of arrays and objects accepted in a user-supplied JSON
/// document (a request body: the body itself is level 1, so an attribute's
/// `default_value` in `{"attrs": [{"default_value": …}]}` has 29 levels left).
/// Well under the 128 levels that `serde_json`, and so every consumer of
/// events and jobs, reads.
pub const MAX_JSON_DEPTH: usize = 32;

/// The depth of a JSON value: 0 for a scalar, 1 for an array or object of
/// scalars, and so on.
pub fn json_depth(value: &Value) -> usize {
    // Iterative, so a deep value cannot exhaust the stack.
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((v, level)) = stack.pop() {
        match v {
            Value::Array(items) => {
                deepest = deepest.max(level);
                stack.extend(items.iter().map(|i| (i, level + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(level);
                stack.extend(map.values().map(|i| (i, level + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// Why [`parse_strict`] refused a document. Each message names the field (its
/// path in the document, like `attrs[0].default_value`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// Not JSON at all.
    #[error("not valid JSON: {0}")]
    Syntax(#[from] serde_json::Error),
    /// Nested deeper than the limit.
    #[error(
        "field '{field}' nests arrays and objects deeper than {limit} levels (the limit, counting the whole document as level 1)"
    )]
    TooDeep {
        /// The field whose value is too deep.
        field: String,
        /// The limit.
        limit: usize,
    },
    /// A key given twice in one object.
    #[error("field '{field}' is given twice (duplicate key '{key}')")]
    DuplicateKey {
        /// The repeated field's path.
        field: String,
        /// The key.
        key: String,
    },
    /// A NUL character in a string or a key.
    #[error("field '{field}' contains a NUL character (\\u0000), which text may not contain")]
    Nul {
        /// The field whose value (or name) has it.
        field: String,
    },
}

/// Reads a JSON document, refusing nesting deeper than `max_depth`, duplicate
/// keys and NUL characters (see the module docs).
///
/// # Errors
///
/// [`InputError`] for the first problem found.
pub fn parse_strict(bytes: &[u8], max_depth: usize) -> Result<Value, InputError> {
    let state = RefCell::new(State {
        path: Vec::new(),
        problem: None,
        max_depth,
    });
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Strict {
        state: &state,
        level: 1,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match (parsed, state.into_inner().problem) {
        (_, Some(problem)) => Err(problem),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(InputError::Syntax(e)),
    }
}

#[derive(Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

struct State {
    path: Vec<Seg>,
    problem: Option<InputError>,
    max_depth: usize,
}

impl State {
    fn render(path: &[Seg]) -> String {
        let mut out = String::new();
        for seg in path {
            match seg {
                Seg::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.extend(k.escape_debug());
                }
                Seg::Index(i) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
            }
        }
        if out.is_empty() {
            "(the document)".to_owned()
        } else {
            out
        }
    }

    /// The field a too-deep value is reported under: its path cut after its
    /// second key, three steps at most (`attrs[0].default_value`,
    /// `attrs.colour`), not the whole descent.
    fn field_of_deep(&self) -> String {
        let mut keys = 0;
        let mut cut = 0;
        for seg in self.path.iter().take(3) {
            cut += 1;
            if matches!(seg, Seg::Key(_)) {
                keys += 1;
                if keys == 2 {
                    break;
                }
            }
        }
        Self::render(&self.path[..cut])
    }
}

/// Reads one value at `level` (the level its array or object would have).
#[derive(Clone, Copy)]
struct Strict<'a> {
    state: &'a RefCell<State>,
    level: usize,
}

impl Strict<'_> {
    fn fail<E: de::Error>(&self, problem: InputError) -> E {
        let message = problem.to_string();
        self.state.borrow_mut().problem.get_or_insert(problem);
        E::custom(message)
    }

    fn enter<E: de::Error>(&self) -> Result<(), E> {
        let st = self.state.borrow();
        if self.level > st.max_depth {
            let problem = InputError::TooDeep {
                field: st.field_of_deep(),
                limit: st.max_depth,
            };
            drop(st);
            return Err(self.fail(problem));
        }
        Ok(())
    }

    fn text<E: de::Error>(&self, s: &str) -> Result<(), E> {
        if s.contains('\0') {
            let field = State::render(&self.state.borrow().path);
            return Err(self.fail(InputError::Nul { field }));
        }
        Ok(())
    }

    fn child(&self) -> Strict<'_> {
        Strict {
            state: self.state,
            level: self.level + 1,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.text(v)?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.text(&v)?;
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut items = Vec::new();
        loop {
            self.state.borrow_mut().path.push(Seg::Index(items.len()));
            let item = seq.next_element_seed(self.child());
            self.state.borrow_mut().path.pop();
            match item? {
                Some(v) => items.push(v),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            self.state.borrow_mut().path.push(Seg::Key(key));
            let problem = {
                let st = self.state.borrow();
                let Some(Seg::Key(key)) = st.path.last() else {
                    unreachable!("the key was just pushed")
                };
                if key.contains('\0') {
                    Some(InputError::Nul {
                        field: State::render(&st.path),
                    })
                } else if map.contains_key(key) {
                    Some(InputError::DuplicateKey {
                        field: State::render(&st.path),
                        key: key.escape_debug().to_string(),
                    })
                } else {
                    None
                }
            };
            if let Some(problem) = problem {
                return Err(self.fail(problem));
            }
            let value = access.next_value_seed(self.child());
            let Some(Seg::Key(key)) = self.state.borrow_mut().path.pop() else {
                unreachable!("the key was pushed above")
            };
            map.insert(key, value?);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let text = r#"{"a": [1, -2, 3.5, "x", true, null, {"b": {}}], "c": "\u00e9"}"#;
        let strict = parse_strict(text.as_bytes(), MAX_JSON_DEPTH).unwrap();
        let plain: Value = serde_json::from_str(text).unwrap();
        assert_eq!(strict, plain);
        assert_eq!(json_depth(&strict), 4);
        assert_eq!(json_depth(&json!(1)), 0);
    }

    #[test]
    fn nesting_is_limited_and_the_field_named() {
        let ok = format!(r#"{{"attrs": [{{"default_value": {}}}]}}"#, nested(29));
        let v = parse_strict(ok.as_bytes(), MAX_JSON_DEPTH).unwrap();
        assert_eq!(json_depth(&v), MAX_JSON_DEPTH);
        let deep = format!(r#"{{"attrs": [{{"default_value": {}}}]}}"#, nested(30));
        let e = parse_strict(deep.as_bytes(), MAX_JSON_DEPTH).unwrap_err();
        assert!(matches!(e, InputError::TooDeep { .. }), "{e}");
        assert!(
            e.to_string().starts_with(
                "field 'attrs[0].default_value' nests arrays and objects deeper than 32 levels"
            ),
            "{e}"
        );
        // Deeper than serde_json's own limit: still our error, not a syntax error.
        let e = parse_strict(nested(500).as_bytes(), MAX_JSON_DEPTH).unwrap_err();
        assert!(matches!(e, InputError::TooDeep { .. }), "{e}");
        let e = parse_strict(br#"{"attrs": {"colour": [[[[1]]]]}}"#, 4).unwrap_err();
        assert!(e.to_string().starts_with("field 'attrs.colour' "), "{e}");
        let e = parse_strict(br#"{"attrs": {"colour": {"x": {"y": 1}}}}"#, 3).unwrap_err();
        assert!(e.to_string().starts_with("field 'attrs.colour' "), "{e}");
        let e = parse_strict(b"[[[[1]]]]", 2).unwrap_err();
        assert!(e.to_string().starts_with("field '[0][0]' "), "{e}");
    }

    #[test]
    fn duplicate_keys_and_nul_characters_are_refused_by_field() {
        let e = parse_strict(br#"{"a": 1, "b": {"c": 1, "c": 2}}"#, 32).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field 'b.c' is given twice (duplicate key 'c')"
        );
        let e = parse_strict(br#"{"attrs": [{"name": "a\u0000b"}]}"#, 32).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field 'attrs[0].name' contains a NUL character (\\u0000), which text may not contain"
        );
        let e = parse_strict(br#"{"a\u0000": 1}"#, 32).unwrap_err();
        assert!(matches!(e, InputError::Nul { .. }), "{e}");
        let e = parse_strict(br#"{"a": 1"#, 32).unwrap_err();
        assert!(matches!(e, InputError::Syntax(_)), "{e}");
    }

    #[test]
    fn events_holding_the_deepest_value_decode() {
        // The deepest place a user value sits: an attribute's default in an
        // entity event, with the previous state. serde_json reads it.
        let value = parse_strict(nested(MAX_JSON_DEPTH - 3).as_bytes(), 64).unwrap();
        let mut entity = crate::sample::entity(1, "deep");
        entity.attrs = vec![crate::EntityAttr {
            id: 1,
            name: "a".into(),
            attr_type: crate::AttrType::ARRAY_NUMBER,
            is_mandatory: false,
            referral: vec![],
            index: 0,
            is_summarized: false,
            is_delete_in_chain: false,
            note: String::new(),
            default_value: Some(value),
            is_active: true,
        }];
        let env = crate::Envelope::entity(
            crate::Hook::EntityAfterUpdate,
            "test",
            crate::EntityEvent {
                entity: entity.clone(),
                previous: Some(entity),
                user: None,
            },
        );
        let bytes = serde_json::to_vec(&env).unwrap();
        let back: crate::Envelope<crate::EntityEvent> = serde_json::from_slice(&bytes).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(json_depth(&v) < 64, "{}", json_depth(&v));
        assert_eq!(back.data.entity.attrs.len(), 1);
    }
}
