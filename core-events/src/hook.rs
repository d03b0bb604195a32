//! The hook catalog: the 17 standard hooks, their kinds and Pagoda's legacy aliases.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which kind of model a hook is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// An entry (a record of an entity).
    Entry,
    /// An entity (a schema: a named set of attribute definitions).
    Entity,
}

impl ObjectKind {
    /// The lower-case name used in subjects and hook names (`entry`, `entity`).
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Entry => "entry",
            ObjectKind::Entity => "entity",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a hook is delivered and what its handlers may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    /// `after_*`: a durable event in JetStream, dispatched asynchronously.
    Notification,
    /// `entry.validate`: synchronous; every validator answers; any error vetoes.
    Validate,
    /// `before_create` / `before_update`: synchronous chain; each may modify or reject.
    BeforeModify,
    /// `before_delete` / `before_restore`: synchronous; any handler may veto.
    BeforeVeto,
    /// `get_attrs`: synchronous chain of transforms over the attribute list.
    GetAttrs,
}

impl HookKind {
    /// True for hooks delivered as durable JetStream events.
    pub fn is_notification(self) -> bool {
        self == HookKind::Notification
    }
}

macro_rules! hooks {
    ($( $variant:ident => $object:ident, $action:literal, $kind:ident, $alias:literal; )*) => {
        /// One of the 17 standard hooks.
        ///
        /// Parsed from its standard name (`entry.after_create`) or a legacy alias
        /// (`after_create_entry_v2`); serialized as the standard name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Hook {
            $(
                #[doc = concat!("`", stringify!($object), ".", $action, "` (legacy alias `", $alias, "`)")]
                $variant,
            )*
        }

        impl Hook {
            /// Every standard hook, entry hooks first, in catalog order.
            pub const ALL: [Hook; 17] = [$(Hook::$variant,)*];

            /// The model the hook is about.
            pub fn object(self) -> ObjectKind {
                match self { $(Hook::$variant => hook_object!($object),)* }
            }

            /// The action part of the name, e.g. `after_create`.
            pub fn action(self) -> &'static str {
                match self { $(Hook::$variant => $action,)* }
            }

            /// The standard name, e.g. `entry.after_create`.
            pub fn name(self) -> &'static str {
                match self { $(Hook::$variant => concat!(stringify!($object), ".", $action),)* }
            }

            /// How the hook is delivered.
            pub fn kind(self) -> HookKind {
                match self { $(Hook::$variant => HookKind::$kind,)* }
            }

            /// Pagoda's legacy name for the hook.
            pub fn legacy_alias(self) -> &'static str {
                match self { $(Hook::$variant => $alias,)* }
            }
        }
    };
}

macro_rules! hook_object {
    (entry) => {
        ObjectKind::Entry
    };
    (entity) => {
        ObjectKind::Entity
    };
}

hooks! {
    EntryBeforeCreate => entry, "before_create", BeforeModify, "before_create_entry_v2";
    EntryAfterCreate => entry, "after_create", Notification, "after_create_entry_v2";
    EntryBeforeUpdate => entry, "before_update", BeforeModify, "before_update_entry_v2";
    EntryAfterUpdate => entry, "after_update", Notification, "after_update_entry_v2";
    EntryBeforeDelete => entry, "before_delete", BeforeVeto, "before_delete_entry_v2";
    EntryAfterDelete => entry, "after_delete", Notification, "after_delete_entry_v2";
    EntryBeforeRestore => entry, "before_restore", BeforeVeto, "before_restore_entry_v2";
    EntryAfterRestore => entry, "after_restore", Notification, "after_restore_entry_v2";
    EntryValidate => entry, "validate", Validate, "validate_entry";
    EntryGetAttrs => entry, "get_attrs", GetAttrs, "get_entry_attr";
    EntityBeforeCreate => entity, "before_create", BeforeModify, "before_create_entity_v2";
    EntityAfterCreate => entity, "after_create", Notification, "after_create_entity_v2";
    EntityBeforeUpdate => entity, "before_update", BeforeModify, "before_update_entity_v2";
    EntityAfterUpdate => entity, "after_update", Notification, "after_update_entity_v2";
    EntityBeforeDelete => entity, "before_delete", BeforeVeto, "before_delete_entity_v2";
    EntityAfterDelete => entity, "after_delete", Notification, "after_delete_entity_v2";
    EntityGetAttrs => entity, "get_attrs", GetAttrs, "get_entity_attr";
}

impl Hook {
    /// Parses a standard name or a legacy alias.
    ///
    /// # Errors
    ///
    /// [`UnknownHook`] for any other text; its message lists the valid names and
    /// suggests the closest one.
    pub fn parse(name: &str) -> Result<Hook, UnknownHook> {
        Hook::ALL
            .into_iter()
            .find(|h| h.name() == name || h.legacy_alias() == name)
            .ok_or_else(|| UnknownHook::new(name))
    }

    /// Finds the hook for an object and action (`entry`, `after_create`).
    pub fn from_parts(object: ObjectKind, action: &str) -> Option<Hook> {
        Hook::ALL
            .into_iter()
            .find(|h| h.object() == object && h.action() == action)
    }

    /// The CloudEvents `type` of this hook's events, e.g. `pagoda.entry.after_create`.
    pub fn event_type(self) -> String {
        format!("pagoda.{}", self.name())
    }

    /// Parses a CloudEvents `type` (`pagoda.entry.after_create`).
    pub fn from_event_type(event_type: &str) -> Option<Hook> {
        let name = event_type.strip_prefix("pagoda.")?;
        Hook::ALL.into_iter().find(|h| h.name() == name)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Hook {
    type Err = UnknownHook;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hook::parse(s)
    }
}

impl Serialize for Hook {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Hook {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Hook::parse(&name).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Hook {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Hook".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let names: Vec<&str> = Hook::ALL
            .iter()
            .flat_map(|h| [h.name(), h.legacy_alias()])
            .collect();
        schemars::json_schema!({
            "description": "A standard hook name (entry.after_create) or a legacy alias (after_create_entry_v2).",
            "type": "string",
            "enum": names,
        })
    }
}

/// A hook name that is neither a standard name nor a legacy alias.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hook '{name}'{suggestion}; valid hooks: {valid}", suggestion = self.suggestion_text(), valid = valid_names())]
pub struct UnknownHook {
    /// The name as given.
    pub name: String,
    /// The closest valid name, when one is close enough to be a likely typo.
    pub did_you_mean: Option<&'static str>,
}

impl UnknownHook {
    fn new(name: &str) -> Self {
        let did_you_mean = Hook::ALL
            .iter()
            .flat_map(|h| [h.name(), h.legacy_alias()])
            .map(|candidate| (strsim::levenshtein(name, candidate), candidate))
            .min_by_key(|(d, _)| *d)
            .filter(|(d, _)| *d <= 3.max(name.len() / 4))
            .map(|(_, candidate)| candidate);
        UnknownHook {
            name: name.to_owned(),
            did_you_mean,
        }
    }

    fn suggestion_text(&self) -> String {
        self.did_you_mean
            .map(|s| format!(" (did you mean '{s}'?)"))
            .unwrap_or_default()
    }
}

fn valid_names() -> String {
    Hook::ALL
        .iter()
        .map(|h| h.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_seventeen_distinct_hooks() {
        let mut names: Vec<_> = Hook::ALL.iter().map(|h| h.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 17);
        let mut aliases: Vec<_> = Hook::ALL.iter().map(|h| h.legacy_alias()).collect();
        aliases.sort_unstable();
        aliases.dedup();
        assert_eq!(aliases.len(), 17);
    }

    #[test]
    fn standard_names_and_aliases_parse() {
        for hook in Hook::ALL {
            assert_eq!(Hook::parse(hook.name()), Ok(hook));
            assert_eq!(Hook::parse(hook.legacy_alias()), Ok(hook));
            assert_eq!(Hook::from_parts(hook.object(), hook.action()), Some(hook));
            assert_eq!(Hook::from_event_type(&hook.event_type()), Some(hook));
        }
        assert_eq!(
            Hook::parse("after_delete_entity_v2"),
            Ok(Hook::EntityAfterDelete)
        );
        assert_eq!(Hook::parse("get_entry_attr"), Ok(Hook::EntryGetAttrs));
        assert_eq!(Hook::parse("validate_entry"), Ok(Hook::EntryValidate));
    }

    #[test]
    fn kinds_follow_the_design() {
        assert_eq!(Hook::EntryAfterCreate.kind(), HookKind::Notification);
        assert_eq!(Hook::EntityAfterDelete.kind(), HookKind::Notification);
        assert_eq!(Hook::EntryValidate.kind(), HookKind::Validate);
        assert_eq!(Hook::EntityBeforeUpdate.kind(), HookKind::BeforeModify);
        assert_eq!(Hook::EntryBeforeRestore.kind(), HookKind::BeforeVeto);
        assert_eq!(Hook::EntityGetAttrs.kind(), HookKind::GetAttrs);
        let notifications = Hook::ALL
            .iter()
            .filter(|h| h.kind().is_notification())
            .count();
        assert_eq!(notifications, 7);
    }

    #[test]
    fn unknown_hook_is_an_error_with_a_suggestion() {
        let err = Hook::parse("entry.after_creat").unwrap_err();
        assert_eq!(err.did_you_mean, Some("entry.after_create"));
        let msg = err.to_string();
        assert!(msg.contains("unknown hook 'entry.after_creat'"), "{msg}");
        assert!(msg.contains("did you mean 'entry.after_create'"), "{msg}");
        assert!(msg.contains("entity.get_attrs"), "{msg}");

        let err = Hook::parse("completely different").unwrap_err();
        assert_eq!(err.did_you_mean, None);
        // `_V2` capitalisation typo (Pagoda's own defect) is not silently accepted.
        assert!(Hook::parse("before_create_entity_V2").is_err());
    }

    #[test]
    fn serde_uses_standard_names_and_accepts_aliases() {
        let json = serde_json::to_string(&Hook::EntityBeforeCreate).unwrap();
        assert_eq!(json, "\"entity.before_create\"");
        let hook: Hook = serde_json::from_str("\"before_create_entity_v2\"").unwrap();
        assert_eq!(hook, Hook::EntityBeforeCreate);
        let err = serde_json::from_str::<Hook>("\"nope\"").unwrap_err();
        assert!(err.to_string().contains("unknown hook 'nope'"));
    }
}
