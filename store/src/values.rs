//! Checking attribute values against their attribute's type (Pagoda's types).

use serde_json::Value;

use core_events::input::{MAX_JSON_DEPTH, json_depth};
use core_events::model::{AttrType, EntityAttr};

/// `None` when `value` fits the attribute's type, else what is wrong.
///
/// `null` clears a value of any type. Scalars: string, textarea, date and
/// datetime take strings (date `YYYY-MM-DD`, datetime RFC 3339); boolean a
/// bool; number a number. References (object, group, role, select) take an id,
/// a name, or `{"id": …, "name": …}`; named_object takes
/// `{"name": …, "id": …}`. Array types take an array of their element type.
///
/// A value nesting deeper than [`MAX_JSON_DEPTH`] is refused too (one a
/// `before_*` hook handed back, say: request bodies are limited already).
pub(super) fn check(attr: &EntityAttr, value: &Value) -> Option<String> {
    check_typed(&attr.name, attr.attr_type, value)
}

/// [`check`] for an attribute named `name` of type `t` (one not stored yet:
/// a new attribute's `default_value` is checked with this).
pub(super) fn check_typed(name: &str, t: AttrType, value: &Value) -> Option<String> {
    if value.is_null() {
        return None;
    }
    let depth = json_depth(value);
    if depth > MAX_JSON_DEPTH {
        return Some(format!(
            "attribute '{name}': the value nests {depth} levels of arrays and objects; at most {MAX_JSON_DEPTH} are allowed"
        ));
    }
    let type_name = t.name().unwrap_or("unknown");
    let fail = |expected: &str| {
        Some(format!(
            "attribute '{name}' is {type_name} and takes {expected}; got {}",
            short(value)
        ))
    };
    if t.is_array() {
        let Value::Array(items) = value else {
            return fail("an array");
        };
        let element = AttrType(t.0 & !AttrType::ARRAY);
        return items
            .iter()
            .find_map(|item| check_scalar(element, item).err())
            .and_then(|expected| fail(&format!("an array of {expected}")));
    }
    check_scalar(t, value).err().and_then(fail)
}

/// `Err(what it takes)` when `value` does not fit the scalar type `t`.
fn check_scalar(t: AttrType, value: &Value) -> Result<(), &'static str> {
    let ok = match t {
        AttrType::STRING | AttrType::TEXTAREA => value.is_string(),
        AttrType::DATE => value
            .as_str()
            .is_some_and(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()),
        AttrType::DATETIME => value
            .as_str()
            .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        AttrType::BOOLEAN => value.is_boolean(),
        AttrType::NUMBER => value.is_number(),
        AttrType(n) if n == AttrType::NAMED_OBJECT.0 & !AttrType::ARRAY => value.is_object(),
        _ => value.is_string() || value.is_i64() || value.is_object(),
    };
    if ok {
        return Ok(());
    }
    Err(match t {
        AttrType::STRING | AttrType::TEXTAREA => "a string",
        AttrType::DATE => "a date 'YYYY-MM-DD'",
        AttrType::DATETIME => "an RFC 3339 date-time",
        AttrType::BOOLEAN => "true or false",
        AttrType::NUMBER => "a number",
        _ => "an id, a name or {\"id\", \"name\"}",
    })
}

fn short(value: &Value) -> String {
    let s = value.to_string();
    if s.len() <= 60 {
        return s;
    }
    let mut end = 57;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attr(t: AttrType) -> EntityAttr {
        EntityAttr {
            id: 1,
            name: "a".into(),
            attr_type: t,
            is_mandatory: false,
            referral: vec![],
            index: 0,
            is_summarized: false,
            is_delete_in_chain: false,
            note: String::new(),
            default_value: None,
            is_active: true,
        }
    }

    #[test]
    fn values_are_checked_by_type() {
        assert!(check(&attr(AttrType::STRING), &json!("x")).is_none());
        assert!(check(&attr(AttrType::NUMBER), &json!(3.5)).is_none());
        assert!(check(&attr(AttrType::DATE), &json!("2026-11-24")).is_none());
        assert!(check(&attr(AttrType::ARRAY_STRING), &json!(["a", "b"])).is_none());
        assert!(check(&attr(AttrType::OBJECT), &json!({"id": 3, "name": "x"})).is_none());
        assert!(check(&attr(AttrType::BOOLEAN), &Value::Null).is_none());
        let e = check(&attr(AttrType::NUMBER), &json!("abc")).unwrap();
        assert_eq!(e, "attribute 'a' is number and takes a number; got \"abc\"");
        let e = check(&attr(AttrType::ARRAY_NUMBER), &json!([1, "x"])).unwrap();
        assert!(e.contains("an array of a number"), "{e}");
        assert!(check(&attr(AttrType::DATE), &json!("24/11/2026")).is_some());
    }
}
