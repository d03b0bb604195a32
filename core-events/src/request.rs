//! What a write asks for: the bodies of model writes (create a user, an entity,
//! an entry; change an entity or an entry). The model store takes them, the host
//! reads them from its HTTP requests, and the `before_create` / `before_update`
//! hooks carry them to plugins (see [`sync`](crate::sync)).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{AttrType, ObjectRef};

/// A user to create.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NewUser {
    /// Unique login name.
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
    /// Administrator.
    #[serde(default)]
    pub is_superuser: bool,
}

/// An attribute definition to add to an entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NewAttr {
    /// Name, unique among the entity's active attributes.
    pub name: String,
    /// Pagoda's type code.
    #[serde(rename = "type")]
    pub attr_type: AttrType,
    /// Entries must have a value.
    #[serde(default)]
    pub is_mandatory: bool,
    /// Entities an object attribute may refer to.
    #[serde(default)]
    pub referral: Vec<ObjectRef>,
    /// Shown in summaries.
    #[serde(default)]
    pub is_summarized: bool,
    /// Deleting an entry deletes the entries it refers to.
    #[serde(default)]
    pub is_delete_in_chain: bool,
    /// Free text.
    #[serde(default)]
    pub note: String,
    /// Value given to new entries that name none.
    #[serde(default)]
    pub default_value: Option<Value>,
}

impl NewAttr {
    /// An attribute with a name and a type, everything else default.
    pub fn new(name: &str, attr_type: AttrType) -> Self {
        NewAttr {
            name: name.to_owned(),
            attr_type,
            is_mandatory: false,
            referral: Vec::new(),
            is_summarized: false,
            is_delete_in_chain: false,
            note: String::new(),
            default_value: None,
        }
    }
}

/// An entity to create.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NewEntity {
    /// Name, unique among active entities.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub note: String,
    /// Attribute definitions, in display order.
    #[serde(default)]
    pub attrs: Vec<NewAttr>,
}

impl NewEntity {
    /// An entity with a name and no attributes.
    pub fn named(name: &str) -> Self {
        NewEntity {
            name: name.to_owned(),
            ..Default::default()
        }
    }

    /// Adds an attribute definition.
    #[must_use]
    pub fn attr(mut self, attr: NewAttr) -> Self {
        self.attrs.push(attr);
        self
    }
}

/// A change to one attribute definition: `id` set changes (or with
/// `is_deleted` removes) an existing one; no `id` adds one (name and type needed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AttrChange {
    /// The attribute to change; none to add one.
    #[serde(default)]
    pub id: Option<i64>,
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New type (adding only: an existing attribute keeps its type).
    #[serde(default, rename = "type")]
    pub attr_type: Option<AttrType>,
    /// New mandatory flag.
    #[serde(default)]
    pub is_mandatory: Option<bool>,
    /// New note.
    #[serde(default)]
    pub note: Option<String>,
    /// New default value.
    #[serde(default)]
    pub default_value: Option<Value>,
    /// Remove the attribute (its values are kept, unseen).
    #[serde(default)]
    pub is_deleted: bool,
}

/// Changes to an entity; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EntityChanges {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New note.
    #[serde(default)]
    pub note: Option<String>,
    /// Attribute definitions to add, change or remove.
    #[serde(default)]
    pub attrs: Vec<AttrChange>,
}

/// An entry to create.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NewEntry {
    /// Name, unique among the entity's active entries.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub note: String,
    /// Values by attribute name.
    #[serde(default)]
    pub attrs: BTreeMap<String, Value>,
}

impl NewEntry {
    /// An entry with a name and no values.
    pub fn named(name: &str) -> Self {
        NewEntry {
            name: name.to_owned(),
            ..Default::default()
        }
    }

    /// Sets a value.
    #[must_use]
    pub fn value(mut self, attr: &str, value: Value) -> Self {
        self.attrs.insert(attr.to_owned(), value);
        self
    }
}

/// Changes to an entry; absent fields and attributes stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EntryChanges {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New note.
    #[serde(default)]
    pub note: Option<String>,
    /// New values by attribute name (`null` clears one).
    #[serde(default)]
    pub attrs: BTreeMap<String, Value>,
}
