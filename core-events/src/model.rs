//! Typed models: the snapshots of Pagoda's objects that plugins see.
//!
//! Field names follow Pagoda's (`airone/plugins` model injection), so a plugin
//! ported from Pagoda reads the same names.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pagoda's attribute type: bit flags (`object` 1, `string` 2, … `array` bit 1024,
/// `named` bit 2048), serialized as the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct AttrType(pub u16);

impl AttrType {
    /// A reference to another entry.
    pub const OBJECT: AttrType = AttrType(1);
    /// A single-line string.
    pub const STRING: AttrType = AttrType(2);
    /// A multi-line string.
    pub const TEXTAREA: AttrType = AttrType(4);
    /// A boolean.
    pub const BOOLEAN: AttrType = AttrType(8);
    /// A reference to a group.
    pub const GROUP: AttrType = AttrType(16);
    /// A date (`YYYY-MM-DD`).
    pub const DATE: AttrType = AttrType(32);
    /// A reference to a role.
    pub const ROLE: AttrType = AttrType(64);
    /// A date and time (RFC 3339).
    pub const DATETIME: AttrType = AttrType(128);
    /// A number.
    pub const NUMBER: AttrType = AttrType(256);
    /// One choice of a fixed list.
    pub const SELECT: AttrType = AttrType(512);
    /// The array bit.
    pub const ARRAY: u16 = 1024;
    /// The named bit.
    pub const NAMED: u16 = 2048;
    /// A name with a reference to another entry.
    pub const NAMED_OBJECT: AttrType = AttrType(2049);
    /// A list of references.
    pub const ARRAY_OBJECT: AttrType = AttrType(1025);
    /// A list of strings.
    pub const ARRAY_STRING: AttrType = AttrType(1026);
    /// A list of named references.
    pub const ARRAY_NAMED_OBJECT: AttrType = AttrType(3073);
    /// A list of groups.
    pub const ARRAY_GROUP: AttrType = AttrType(1040);
    /// A list of roles.
    pub const ARRAY_ROLE: AttrType = AttrType(1088);
    /// A list of numbers.
    pub const ARRAY_NUMBER: AttrType = AttrType(1280);
    /// Several choices of a fixed list.
    pub const MULTI_SELECT: AttrType = AttrType(1536);

    /// Every type Pagoda defines, with its name.
    pub const ALL: [(AttrType, &'static str); 18] = [
        (AttrType::OBJECT, "object"),
        (AttrType::STRING, "string"),
        (AttrType::TEXTAREA, "textarea"),
        (AttrType::BOOLEAN, "boolean"),
        (AttrType::GROUP, "group"),
        (AttrType::DATE, "date"),
        (AttrType::ROLE, "role"),
        (AttrType::DATETIME, "datetime"),
        (AttrType::NUMBER, "number"),
        (AttrType::SELECT, "select"),
        (AttrType::NAMED_OBJECT, "named_object"),
        (AttrType::ARRAY_OBJECT, "array_object"),
        (AttrType::ARRAY_STRING, "array_string"),
        (AttrType::ARRAY_NAMED_OBJECT, "array_named_object"),
        (AttrType::ARRAY_GROUP, "array_group"),
        (AttrType::ARRAY_ROLE, "array_role"),
        (AttrType::ARRAY_NUMBER, "array_number"),
        (AttrType::MULTI_SELECT, "multi_select"),
    ];

    /// Pagoda's name of the type, or `None` for a code Pagoda does not define.
    pub fn name(self) -> Option<&'static str> {
        AttrType::ALL
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, n)| *n)
    }

    /// The type with Pagoda's name `name`.
    pub fn from_name(name: &str) -> Option<AttrType> {
        AttrType::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(t, _)| *t)
    }

    /// True when the array bit is set.
    pub fn is_array(self) -> bool {
        self.0 & Self::ARRAY != 0
    }
}

/// A short reference to another object: its id and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectRef {
    /// The object's id.
    pub id: i64,
    /// The object's name.
    pub name: String,
}

/// A user, as Pagoda exposes it to plugins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct User {
    /// User id.
    pub id: i64,
    /// Login name.
    pub username: String,
    /// E-mail address.
    #[serde(default)]
    pub email: String,
    /// Given name.
    #[serde(default)]
    pub first_name: String,
    /// Family name.
    #[serde(default)]
    pub last_name: String,
    /// False once the user is deactivated.
    pub is_active: bool,
    /// Superusers pass every permission check.
    #[serde(default)]
    pub is_superuser: bool,
    /// When the account was created.
    pub date_joined: DateTime<Utc>,
}

/// An attribute definition of an entity (Pagoda's `EntityAttr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EntityAttr {
    /// Attribute definition id.
    pub id: i64,
    /// Attribute name, unique within its entity.
    pub name: String,
    /// Attribute type code.
    #[serde(rename = "type")]
    pub attr_type: AttrType,
    /// A value is required on every entry.
    #[serde(default)]
    pub is_mandatory: bool,
    /// Entities an object-typed attribute may refer to.
    #[serde(default)]
    pub referral: Vec<ObjectRef>,
    /// Display order.
    #[serde(default)]
    pub index: i32,
    /// Shown in summaries.
    #[serde(default)]
    pub is_summarized: bool,
    /// Deleting the entry deletes referred entries too.
    #[serde(default)]
    pub is_delete_in_chain: bool,
    /// Free text.
    #[serde(default)]
    pub note: String,
    /// Value new entries start with.
    #[serde(default)]
    pub default_value: Option<serde_json::Value>,
    /// False once the definition is deleted.
    pub is_active: bool,
}

/// An entity (a schema: Pagoda's `Entity`), with its attribute definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Entity {
    /// Entity id.
    pub id: i64,
    /// Entity name; free text, unique.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub note: String,
    /// False once deleted (deletes are soft).
    pub is_active: bool,
    /// When it was created.
    pub created_time: DateTime<Utc>,
    /// Who created it.
    #[serde(default)]
    pub created_user: Option<ObjectRef>,
    /// Attribute definitions, in `index` order.
    #[serde(default)]
    pub attrs: Vec<EntityAttr>,
}

/// One attribute of an entry, with its current value.
///
/// `value` has the JSON shape of its type: `string`/`textarea`/`date`/`datetime`/`select`
/// a string, `boolean` a bool, `number` a number, `object`/`group`/`role` an
/// [`ObjectRef`], `named_object` `{"name": …, "object": ObjectRef|null}`, array types a
/// list of the element shape; `null` when unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Attribute {
    /// Attribute id.
    pub id: i64,
    /// Attribute name (the definition's name).
    pub name: String,
    /// Attribute type code.
    #[serde(rename = "type")]
    pub attr_type: AttrType,
    /// The definition this attribute instantiates.
    pub schema: ObjectRef,
    /// The current value (see the type's shape above).
    pub value: serde_json::Value,
}

/// An entry (a record of an entity: Pagoda's `Entry`), with its attribute values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Entry {
    /// Entry id.
    pub id: i64,
    /// Entry name, unique within its entity.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub note: String,
    /// False once deleted (deletes are soft).
    pub is_active: bool,
    /// The entity this entry belongs to.
    pub schema: ObjectRef,
    /// When it was created.
    pub created_time: DateTime<Utc>,
    /// Who created it.
    #[serde(default)]
    pub created_user: Option<ObjectRef>,
    /// When it last changed.
    pub updated_time: DateTime<Utc>,
    /// Attribute values, in the entity's attribute order.
    #[serde(default)]
    pub attrs: Vec<Attribute>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_types_match_pagoda() {
        assert_eq!(
            AttrType::from_name("array_named_object"),
            Some(AttrType(3073))
        );
        assert_eq!(AttrType(1536).name(), Some("multi_select"));
        assert!(AttrType::ARRAY_STRING.is_array());
        assert!(!AttrType::NAMED_OBJECT.is_array());
        assert_eq!(AttrType(3).name(), None);
    }
}
