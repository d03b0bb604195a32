//! Request and reply bodies of the synchronous hooks (`entry.validate`,
//! `before_*`, `get_attrs`), which the bus calls over NATS request/reply on the
//! handler's endpoint `<prefix>.hooks.<plugin>.<handler>`.
//!
//! The protocol, in one place (see `docs/protocol.md`, "Synchronous hooks"):
//!
//! - the request body is JSON, one of the `*Request` types below;
//! - the handler's **decision** is in the reply body: validation errors, a
//!   rejection, a veto, modified data, an attribute list. An empty body (or
//!   `{}`) means "no objection, no change";
//! - a Services API error (`Nats-Service-Error`, `Nats-Service-Error-Code`) means
//!   the handler **failed** to decide (a bug, a database down): the caller treats
//!   it like a handler that did not answer, by the handler's
//!   [`OnUnavailable`](crate::manifest::OnUnavailable) policy.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{Attribute, Entity, EntityAttr, Entry, User};
use crate::protocol::{MAX_REPLY_BYTES, ReplyError, preview};
use crate::request::{EntityChanges, EntryChanges, NewEntity, NewEntry};

/// `entry.validate` request: the entry as it would be written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ValidateRequest {
    /// The entity (schema) of the entry, with its attribute definitions.
    pub entity: Entity,
    /// The entry as it would be after the change: name, note and values by
    /// attribute name.
    pub entry: NewEntry,
    /// The entry as it is now, for an update; absent for a create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<Entry>,
    /// Who makes the change.
    #[serde(default)]
    pub user: Option<User>,
}

/// One problem a validator found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FieldError {
    /// The field it is about: `name`, `note` or an attribute name; absent for the
    /// entry as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong, for the user.
    pub message: String,
}

impl FieldError {
    /// An error about one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// An error about the entry as a whole.
    pub fn general(message: impl Into<String>) -> Self {
        FieldError {
            field: None,
            message: message.into(),
        }
    }
}

/// `entry.validate` reply: no errors (or an empty body) accepts the entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ValidateReply {
    /// Every problem found; any vetoes the change.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

/// `before_create` / `before_update` request (entries and entities).
///
/// | hook | `data` | `entity` | `entry` |
/// |---|---|---|---|
/// | `entry.before_create` | [`NewEntry`] | the entry's entity | — |
/// | `entry.before_update` | [`EntryChanges`] | the entry's entity | the entry now |
/// | `entity.before_create` | [`NewEntity`] | — | — |
/// | `entity.before_update` | [`EntityChanges`] | the entity now | — |
///
/// `data` is the change as the previous handler of the chain left it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BeforeModifyRequest<D> {
    /// The entity: the entry's entity for entry hooks, the entity as it is now
    /// for `entity.before_update`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity>,
    /// The entry as it is now (`entry.before_update`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Entry>,
    /// The proposed change.
    pub data: D,
    /// Who makes the change.
    #[serde(default)]
    pub user: Option<User>,
}

/// `before_create` / `before_update` reply: `{"data": …}` (the change, modified or
/// not), `{"reject": "reason"}`, or empty / `{}` for "unchanged".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BeforeModifyReply<D> {
    /// The change to go on with; absent leaves it unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<D>,
    /// Rejects the change with this reason (`data` is then ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject: Option<String>,
}

impl<D> Default for BeforeModifyReply<D> {
    fn default() -> Self {
        BeforeModifyReply {
            data: None,
            reject: None,
        }
    }
}

/// `entry.before_create` request.
pub type EntryBeforeCreateRequest = BeforeModifyRequest<NewEntry>;
/// `entry.before_update` request.
pub type EntryBeforeUpdateRequest = BeforeModifyRequest<EntryChanges>;
/// `entity.before_create` request.
pub type EntityBeforeCreateRequest = BeforeModifyRequest<NewEntity>;
/// `entity.before_update` request.
pub type EntityBeforeUpdateRequest = BeforeModifyRequest<EntityChanges>;

/// `before_delete` / `before_restore` request: the object as it is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VetoRequest {
    /// The entity: the entry's entity for entry hooks, the entity to delete for
    /// `entity.before_delete`.
    pub entity: Entity,
    /// The entry to delete or restore (entry hooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Entry>,
    /// Who makes the change.
    #[serde(default)]
    pub user: Option<User>,
}

/// `before_delete` / `before_restore` reply: `{"veto": "reason"}` stops the change;
/// empty or `{}` lets it go on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VetoReply {
    /// Vetoes the change with this reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veto: Option<String>,
}

/// `get_attrs` request: the object and its attribute list as the previous
/// handler of the chain left it.
///
/// `entry.get_attrs`: `entry` set, `attrs` are [`Attribute`]s (values).
/// `entity.get_attrs`: `entity` set, `attrs` are [`EntityAttr`]s (definitions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GetAttrsRequest<A> {
    /// The entity (`entity.get_attrs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity>,
    /// The entry (`entry.get_attrs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Entry>,
    /// The attribute list to transform.
    pub attrs: Vec<A>,
    /// Who reads.
    #[serde(default)]
    pub user: Option<User>,
}

/// `get_attrs` reply: `{"attrs": [...]}` replaces the list; empty or `{}` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GetAttrsReply<A> {
    /// The transformed list; absent keeps it unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attrs: Option<Vec<A>>,
}

impl<A> Default for GetAttrsReply<A> {
    fn default() -> Self {
        GetAttrsReply { attrs: None }
    }
}

/// `entry.get_attrs` request.
pub type EntryGetAttrsRequest = GetAttrsRequest<Attribute>;
/// `entity.get_attrs` request.
pub type EntityGetAttrsRequest = GetAttrsRequest<EntityAttr>;

/// Reads a synchronous hook's reply body: empty means the default (no objection,
/// no change).
///
/// # Errors
///
/// [`ReplyError`], saying what is wrong: too large, or not JSON of the reply's
/// shape.
pub fn parse_reply<R: DeserializeOwned + Default>(body: &[u8]) -> Result<R, ReplyError> {
    if body.is_empty() {
        return Ok(R::default());
    }
    if body.len() > MAX_SYNC_REPLY_BYTES {
        return Err(ReplyError::TooLarge {
            size: body.len(),
            limit: MAX_SYNC_REPLY_BYTES,
        });
    }
    serde_json::from_slice(body).map_err(|e| ReplyError::NotSyncReply {
        reason: e.to_string(),
        preview: preview(body),
    })
}

/// Largest reply body of a synchronous hook, in bytes (larger than a
/// notification's: before-hooks and get_attrs send data back).
pub const MAX_SYNC_REPLY_BYTES: usize = 16 * MAX_REPLY_BYTES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_replies_mean_no_change() {
        let r: ValidateReply = parse_reply(b"").unwrap();
        assert!(r.errors.is_empty());
        let r: BeforeModifyReply<NewEntry> = parse_reply(b"{}").unwrap();
        assert_eq!(r, BeforeModifyReply::default());
        let r: VetoReply = parse_reply(br#"{"veto":"no"}"#).unwrap();
        assert_eq!(r.veto.as_deref(), Some("no"));
        let err = parse_reply::<VetoReply>(b"garbage")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid reply body"), "{err}");
        let r: ValidateReply =
            parse_reply(br#"{"errors":[{"field":"name","message":"bad"},{"message":"x"}]}"#)
                .unwrap();
        assert_eq!(
            r.errors,
            [FieldError::field("name", "bad"), FieldError::general("x")]
        );
    }
}
