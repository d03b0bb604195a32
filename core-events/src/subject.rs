//! The subject codec: validated NATS subjects for events, handlers and dead letters.
//!
//! Event subjects are `<prefix>.events.<object>.<action>.<entity-token>.<object-id>`,
//! for example `pagoda.events.entry.after_create.customer.42`. The events stream
//! appends the partition token at ingest (a subject transform, see
//! [`Subjects::events_transform`]), so the stored subject is
//! `pagoda.events.entry.after_create.customer.42.<p>` with `<p>` =
//! [`object_partition`] of the object and its id.
//!
//! # Entity tokens
//!
//! Entity names are free text; a NATS subject token may not contain `.`, `*`, `>`
//! or white space. The token encoding is:
//!
//! - a character that is alphanumeric in Unicode (`a`-`z`, `A`-`Z`, `0`-`9`,
//!   `顧客`, …), `-` or `_` stands for itself;
//! - every other character is written as `%XX` for each byte of its UTF-8 form,
//!   with upper-case hex digits (`my customer.v2` → `my%20customer%2Ev2`).
//!
//! So plain names stay readable, the encoding is defined for every non-empty
//! name, and decoding is its exact inverse (a token that is not the canonical
//! encoding of some name is rejected). Names are limited to
//! [`MAX_ENTITY_NAME_BYTES`] bytes so that every subject fits in the NATS
//! protocol's 4 KiB control line.

use std::fmt;

use crate::hook::{Hook, ObjectKind};

/// The longest entity name accepted, in UTF-8 bytes (Pagoda's own limit is 200 characters).
pub const MAX_ENTITY_NAME_BYTES: usize = 1024;

/// A problem with a subject, a subject token or an entity name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// The entity name is empty.
    #[error("entity name is empty; an entity needs a name")]
    EmptyEntityName,
    /// The entity name is longer than [`MAX_ENTITY_NAME_BYTES`].
    #[error("entity name is {len} bytes long; the limit is {MAX_ENTITY_NAME_BYTES} bytes")]
    EntityNameTooLong {
        /// Length of the rejected name in bytes.
        len: usize,
    },
    /// The token is not the canonical encoding of any entity name.
    #[error("'{token}' is not a valid entity token: {reason}")]
    InvalidToken {
        /// The token as given.
        token: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The subject prefix is not one or more dot-separated `[A-Za-z0-9_-]` tokens.
    #[error(
        "subject prefix '{0}' is invalid: use one or more dot-separated tokens of letters, digits, '-' and '_'"
    )]
    InvalidPrefix(String),
    /// A subject does not have the shape of an event subject.
    #[error("'{subject}' is not an event subject under '{prefix}': {reason}")]
    NotAnEventSubject {
        /// The subject as given.
        subject: String,
        /// The configured prefix.
        prefix: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A filter names an object of another kind than its hook's.
    #[error("hook '{hook}' has no events about {object} (its events are about {kind} objects)", kind = .hook.object())]
    ObjectNotOfHook {
        /// The hook.
        hook: Hook,
        /// The object.
        object: ObjectKey,
    },
    /// A name used as a subject token (plugin id, handler name) has characters it may not.
    #[error("{what} '{name}' is invalid: use only letters, digits, '-' and '_'")]
    InvalidName {
        /// What the name is for (`plugin id`, `handler name`).
        what: &'static str,
        /// The name as given.
        name: String,
    },
}

fn is_plain(c: char) -> bool {
    c.is_alphanumeric() || c == '-' || c == '_'
}

/// Encodes an entity name as one subject token (see the module docs).
///
/// # Errors
///
/// [`SubjectError::EmptyEntityName`] and [`SubjectError::EntityNameTooLong`].
pub fn encode_entity(name: &str) -> Result<String, SubjectError> {
    check_entity_name(name)?;
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if is_plain(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xF)]));
            }
        }
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Checks that an entity name can be used (non-empty, not too long).
///
/// # Errors
///
/// [`SubjectError::EmptyEntityName`] and [`SubjectError::EntityNameTooLong`].
pub fn check_entity_name(name: &str) -> Result<(), SubjectError> {
    if name.is_empty() {
        return Err(SubjectError::EmptyEntityName);
    }
    if name.len() > MAX_ENTITY_NAME_BYTES {
        return Err(SubjectError::EntityNameTooLong { len: name.len() });
    }
    Ok(())
}

/// Decodes an entity token back to the entity name.
///
/// # Errors
///
/// [`SubjectError::InvalidToken`] when the token is not the canonical encoding of a
/// name (bad escape, lower-case hex, an escaped plain character, invalid UTF-8, a
/// raw character that should have been escaped).
pub fn decode_entity(token: &str) -> Result<String, SubjectError> {
    let invalid = |reason| SubjectError::InvalidToken {
        token: token.to_owned(),
        reason,
    };
    if token.is_empty() {
        return Err(invalid("it is empty"));
    }
    let mut bytes = Vec::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let hi = chars.next().and_then(hex_value);
            let lo = chars.next().and_then(hex_value);
            match (hi, lo) {
                (Some(hi), Some(lo)) => bytes.push(hi << 4 | lo),
                _ => return Err(invalid("'%' must be followed by two upper-case hex digits")),
            }
        } else if is_plain(c) {
            let mut buf = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        } else {
            return Err(invalid("it holds a character that must be %-escaped"));
        }
    }
    let name = String::from_utf8(bytes).map_err(|_| invalid("escapes do not form UTF-8"))?;
    // Canonical form only: re-encoding must give the same token back, so every
    // name has exactly one token.
    match encode_entity(&name) {
        Ok(again) if again == token => Ok(name),
        Ok(_) => Err(invalid("it escapes a character that stands for itself")),
        Err(SubjectError::EntityNameTooLong { .. }) => Err(invalid("the name is too long")),
        Err(_) => Err(invalid("it does not encode a name")),
    }
}

fn hex_value(c: char) -> Option<u8> {
    match c {
        '0'..='9' => Some(c as u8 - b'0'),
        'A'..='F' => Some(c as u8 - b'A' + 10),
        _ => None,
    }
}

/// Checks that a name (plugin id, handler name) is usable as one subject token:
/// non-empty, only ASCII letters, digits, `-` and `_`.
///
/// # Errors
///
/// [`SubjectError::InvalidName`] naming `what` the name is for.
pub fn check_token_name(what: &'static str, name: &str) -> Result<(), SubjectError> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(SubjectError::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// The subject namespace of one deployment: every subject, stream and bucket name
/// is derived from its prefix (default `pagoda`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects {
            prefix: "pagoda".to_owned(),
        }
    }
}

impl Subjects {
    /// A namespace with the given prefix (`pagoda`, `acme.pagoda`).
    ///
    /// # Errors
    ///
    /// [`SubjectError::InvalidPrefix`] unless the prefix is dot-separated tokens of
    /// ASCII letters, digits, `-` and `_`.
    pub fn new(prefix: &str) -> Result<Self, SubjectError> {
        let ok = !prefix.is_empty()
            && prefix
                .split('.')
                .all(|t| check_token_name("prefix", t).is_ok());
        if ok {
            Ok(Subjects {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(SubjectError::InvalidPrefix(prefix.to_owned()))
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn upper(&self) -> String {
        self.prefix.replace(['.', '-'], "_").to_ascii_uppercase()
    }

    /// Name of the events stream, e.g. `PAGODA_EVENTS`.
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper())
    }

    /// Name of the dead-letter stream, e.g. `PAGODA_DLQ`.
    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.upper())
    }

    /// Name of the stream of deliveries deferred while a plugin had no replica, e.g. `PAGODA_DEFERRED`.
    pub fn deferred_stream(&self) -> String {
        format!("{}_DEFERRED", self.upper())
    }

    /// Name of the registry KV bucket, e.g. `pagoda_registry`.
    pub fn registry_bucket(&self) -> String {
        format!("{}_registry", self.prefix.replace(['.', '-'], "_"))
    }

    /// The subject an event about `entity` for `hook` is published on:
    /// `<prefix>.events.<object>.<action>.<entity-token>.<object-id>`. `id` is the
    /// id of the event's object (the entry, or the entity for entity hooks).
    ///
    /// # Errors
    ///
    /// As [`encode_entity`].
    pub fn event(&self, hook: Hook, entity: &str, id: i64) -> Result<String, SubjectError> {
        Ok(format!(
            "{}.events.{}.{}.{}.{id}",
            self.prefix,
            hook.object(),
            hook.action(),
            encode_entity(entity)?
        ))
    }

    /// The template of a hook's event subjects, for trace attributes and span
    /// names (low cardinality): `pagoda.events.entry.create.{entity}.{object_id}`.
    pub fn event_template(&self, hook: Hook) -> String {
        format!(
            "{}.events.{}.{}.{{entity}}.{{object_id}}",
            self.prefix,
            hook.object(),
            hook.action()
        )
    }

    /// All event subjects, as published and as stored (`pagoda.events.>`).
    pub fn all_events(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// The subjects of the events stream: exactly the published shape,
    /// `pagoda.events.*.*.*.*` (object, action, entity token, object id), so that
    /// the server refuses a publish of any other shape.
    pub fn events_stream_subjects(&self) -> String {
        format!("{}.events.*.*.*.*", self.prefix)
    }

    /// The events stream's subject transform for `partitions` partitions: from
    /// [`Subjects::events_stream_subjects`] to the same tokens followed by
    /// `{{partition(N,1,4)}}`, the FNV-1a-32 hash of the object and the id
    /// tokens modulo N ([`object_partition`]). Returns `(source, destination)`.
    pub fn events_transform(&self, partitions: u32) -> (String, String) {
        (
            self.events_stream_subjects(),
            format!(
                "{}.events.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.{{{{wildcard(4)}}}}.{{{{partition({},1,4)}}}}",
                self.prefix,
                partitions.max(1)
            ),
        )
    }

    /// The partition count of an events stream's transform destination (the `N`
    /// of [`Subjects::events_transform`]), or `None` when `destination` is not
    /// that transform.
    pub fn partitions_of_transform(&self, destination: &str) -> Option<u32> {
        let (_, wanted) = self.events_transform(1);
        let head = wanted.strip_suffix("{{partition(1,1,4)}}")?;
        let n: u32 = destination
            .strip_prefix(head)?
            .strip_prefix("{{partition(")?
            .strip_suffix(",1,4)}}")?
            .trim()
            .parse()
            .ok()?;
        (n >= 1).then_some(n)
    }

    /// The stored events of one partition: `pagoda.events.*.*.*.*.<index>` (the
    /// filter of that partition's dispatcher consumer).
    pub fn partition_events(&self, index: u32) -> String {
        format!("{}.events.*.*.*.*.{index}", self.prefix)
    }

    /// A filter over event subjects: any of the arguments may be left open. It
    /// ends in `.>` (the object id, and in the stream the partition), so it
    /// matches both published and stored subjects: `pagoda.events.*.*.customer.>`
    /// is every event about entries and the entity of `customer`.
    ///
    /// # Errors
    ///
    /// As [`encode_entity`].
    pub fn event_filter(
        &self,
        hook: Option<Hook>,
        entity: Option<&str>,
    ) -> Result<String, SubjectError> {
        let (object, action) = match hook {
            Some(h) => (h.object().as_str(), h.action()),
            None => ("*", "*"),
        };
        let entity = match entity {
            Some(e) => encode_entity(e)?,
            None => "*".to_owned(),
        };
        Ok(format!(
            "{}.events.{object}.{action}.{entity}.>",
            self.prefix
        ))
    }

    /// The stored events about one object (its history):
    /// `pagoda.events.entry.*.*.42.*`.
    pub fn object_filter(&self, object: ObjectKey) -> String {
        format!("{}.events.{}.*.*.{}.*", self.prefix, object.kind, object.id)
    }

    /// [`Subjects::event_filter`], narrowed to one object when `object` is given:
    /// then a filter over stored events,
    /// `pagoda.events.entry.after_update.customer.42.*`.
    ///
    /// # Errors
    ///
    /// As [`encode_entity`]; [`SubjectError::ObjectNotOfHook`] when the hook's
    /// events are about the other kind of object.
    pub fn stored_event_filter(
        &self,
        hook: Option<Hook>,
        entity: Option<&str>,
        object: Option<ObjectKey>,
    ) -> Result<String, SubjectError> {
        let Some(object) = object else {
            return self.event_filter(hook, entity);
        };
        let action = match hook {
            Some(h) if h.object() != object.kind => {
                return Err(SubjectError::ObjectNotOfHook { hook: h, object });
            }
            Some(h) => h.action(),
            None => "*",
        };
        let entity = match entity {
            Some(e) => encode_entity(e)?,
            None => "*".to_owned(),
        };
        Ok(format!(
            "{}.events.{}.{action}.{entity}.{}.*",
            self.prefix, object.kind, object.id
        ))
    }

    /// Splits an event subject into its hook and entity name (see
    /// [`Subjects::parse_event_subject`]).
    ///
    /// # Errors
    ///
    /// As [`Subjects::parse_event_subject`].
    pub fn parse_event(&self, subject: &str) -> Result<(Hook, String), SubjectError> {
        let parsed = self.parse_event_subject(subject)?;
        Ok((parsed.hook, parsed.entity))
    }

    /// Reads an event subject, as published
    /// (`<prefix>.events.<object>.<action>.<entity-token>.<id>`) or as stored in
    /// the events stream (the same followed by `.<partition>`).
    ///
    /// # Errors
    ///
    /// [`SubjectError::NotAnEventSubject`] for any other subject: another shape,
    /// an unknown hook, an invalid entity token, an id or partition that is not a
    /// number.
    pub fn parse_event_subject(&self, subject: &str) -> Result<EventSubject, SubjectError> {
        let fail = |reason: String| SubjectError::NotAnEventSubject {
            subject: subject.to_owned(),
            prefix: self.prefix.clone(),
            reason,
        };
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix(".events."))
            .ok_or_else(|| fail("it does not start with '<prefix>.events.'".into()))?;
        let parts: Vec<&str> = rest.split('.').collect();
        let (object, action, token, id, partition) = match parts.as_slice() {
            [o, a, t, i] => (*o, *a, *t, *i, None),
            [o, a, t, i, p] => (*o, *a, *t, *i, Some(*p)),
            _ => {
                return Err(fail(
                    "expected <object>.<action>.<entity-token>.<object-id>[.<partition>]".into(),
                ));
            }
        };
        let object = match object {
            "entry" => ObjectKind::Entry,
            "entity" => ObjectKind::Entity,
            other => return Err(fail(format!("unknown object '{other}'"))),
        };
        let hook = Hook::from_parts(object, action)
            .ok_or_else(|| fail(format!("unknown hook '{object}.{action}'")))?;
        let entity = decode_entity(token).map_err(|e| fail(e.to_string()))?;
        let id: i64 = id
            .parse()
            .map_err(|_| fail(format!("object id '{id}' is not a number")))?;
        let partition = partition
            .map(|p| {
                p.parse::<u32>()
                    .map_err(|_| fail(format!("partition '{p}' is not a number")))
            })
            .transpose()?;
        Ok(EventSubject {
            hook,
            entity,
            object: ObjectKey { kind: object, id },
            partition,
        })
    }

    /// The service endpoint subject of a plugin's handler: `pagoda.hooks.<plugin>.<handler>`.
    pub fn handler(&self, plugin: &str, handler: &str) -> String {
        format!("{}.hooks.{plugin}.{handler}", self.prefix)
    }

    /// The subject a dead letter for a handler is stored under: `pagoda.dlq.<plugin>.<handler>`.
    pub fn dead_letter(&self, plugin: &str, handler: &str) -> String {
        format!("{}.dlq.{plugin}.{handler}", self.prefix)
    }

    /// All dead letters (`pagoda.dlq.>`).
    pub fn all_dead_letters(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    /// The subject of a plugin's deferred deliveries: `pagoda.deferred.<plugin>`.
    pub fn deferred(&self, plugin: &str) -> String {
        format!("{}.deferred.{plugin}", self.prefix)
    }

    /// The subject of a plugin's deferred deliveries taken by the dispatcher of one
    /// partition: `pagoda.deferred.<plugin>.<tag>` (`tag` e.g. `p1of4`; see
    /// [`object_partition`]). Without a tag, [`Subjects::deferred`].
    pub fn deferred_in(&self, plugin: &str, tag: Option<&str>) -> String {
        match tag {
            Some(tag) => format!("{}.deferred.{plugin}.{tag}", self.prefix),
            None => self.deferred(plugin),
        }
    }

    /// All deferred deliveries (`pagoda.deferred.>`).
    pub fn all_deferred(&self) -> String {
        format!("{}.deferred.>", self.prefix)
    }

    /// The plugin a deferred delivery's subject names (`pagoda.deferred.<plugin>`
    /// or `pagoda.deferred.<plugin>.<partition tag>`).
    pub fn plugin_of_deferred<'s>(&self, subject: &'s str) -> Option<&'s str> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".deferred.")?;
        rest.split('.').next().filter(|p| !p.is_empty())
    }

    /// The service endpoint subject of a plugin API route: `pagoda.api.<plugin>.<route>`.
    pub fn api(&self, plugin: &str, route: &str) -> String {
        format!("{}.api.{plugin}.{route}", self.prefix)
    }

    /// Name of the work-queue stream of plugin jobs, e.g. `PAGODA_JOBS`.
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.upper())
    }

    /// The subject a job of a plugin's task is queued on: `pagoda.jobs.<plugin>.<task>`.
    pub fn job(&self, plugin: &str, task: &str) -> String {
        format!("{}.jobs.{plugin}.{task}", self.prefix)
    }

    /// All queued jobs of one plugin (`pagoda.jobs.<plugin>.>`).
    pub fn plugin_jobs(&self, plugin: &str) -> String {
        format!("{}.jobs.{plugin}.>", self.prefix)
    }

    /// All queued jobs (`pagoda.jobs.>`).
    pub fn all_jobs(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }

    /// Name of the KV bucket holding every job's state, e.g. `pagoda_jobs`; key
    /// `<plugin>.<job-id>`.
    pub fn jobs_bucket(&self) -> String {
        format!("{}_jobs", self.prefix.replace(['.', '-'], "_"))
    }

    /// Where host processes tell each other to drop cached tokens, users and
    /// entities after a change (core NATS), e.g. `pagoda.host.forget`.
    pub fn host_forget(&self) -> String {
        format!("{}.host.forget", self.prefix)
    }

    /// Name of the KV bucket of leases (one active dispatcher), e.g. `pagoda_leases`.
    pub fn leases_bucket(&self) -> String {
        format!("{}_leases", self.prefix.replace(['.', '-'], "_"))
    }

    /// Name of the stream of audit events (admin actions), e.g. `PAGODA_AUDIT`.
    pub fn audit_stream(&self) -> String {
        format!("{}_AUDIT", self.upper())
    }

    /// Subject of an audit event: `pagoda.audit.<action>` (`dlq.replay`,
    /// `registry.update`, `token.create`, …).
    pub fn audit(&self, action: &str) -> String {
        format!("{}.audit.{action}", self.prefix)
    }

    /// All audit events (`pagoda.audit.>`).
    pub fn all_audit(&self) -> String {
        format!("{}.audit.>", self.prefix)
    }
}

/// What an event subject says ([`Subjects::parse_event_subject`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSubject {
    /// The hook.
    pub hook: Hook,
    /// The entity name (decoded).
    pub entity: String,
    /// The object the event is about.
    pub object: ObjectKey,
    /// The partition token the events stream appended (`None` for a subject as
    /// published).
    pub partition: Option<u32>,
}

/// The partition of an object among `count` partitions (`0..count`), as
/// nats-server computes `{{partition(N,1,4)}}` in the events stream's subject
/// transform: FNV-1a (32-bit) of the object token and the id token joined with
/// nothing between them (`entry` and `42` hash `entry42`), modulo `count`. Any
/// client can compute it; `count` 0 or 1 is one partition, 0.
pub fn object_partition(object: &str, id: &str, count: u32) -> u32 {
    if count <= 1 {
        return 0;
    }
    let hash = object
        .bytes()
        .chain(id.bytes())
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    hash % count
}

/// The object an event is about; events about one object are dispatched in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Entry or entity.
    pub kind: ObjectKind,
    /// The object's id.
    pub id: i64,
}

impl ObjectKey {
    /// This object's partition among `count` ([`object_partition`]).
    pub fn partition(&self, count: u32) -> u32 {
        object_partition(self.kind.as_str(), &self.id.to_string(), count)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

impl std::str::FromStr for ObjectKey {
    type Err = ObjectKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, id) = s
            .split_once('/')
            .ok_or_else(|| ObjectKeyError::Shape(s.to_owned()))?;
        let kind = match kind {
            "entry" => ObjectKind::Entry,
            "entity" => ObjectKind::Entity,
            _ => {
                return Err(ObjectKeyError::Kind {
                    key: s.to_owned(),
                    kind: kind.to_owned(),
                });
            }
        };
        let id = id.parse().map_err(|_| ObjectKeyError::Id(s.to_owned()))?;
        Ok(ObjectKey { kind, id })
    }
}

/// Why an object key (`entry/42`), or the object of an event, cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectKeyError {
    /// Not `<kind>/<id>`.
    #[error("object key '{0}' is not '<entry|entity>/<id>'")]
    Shape(String),
    /// A kind other than `entry` and `entity`.
    #[error("object key '{key}' has unknown kind '{kind}'")]
    Kind {
        /// The key.
        key: String,
        /// Its kind.
        kind: String,
    },
    /// An id that is not a number.
    #[error("object key '{0}' has a non-numeric id")]
    Id(String),
    /// An event payload that is not JSON of an event.
    #[error("the payload is not a readable event: {0}")]
    NotEvent(String),
    /// An event with neither `subject` nor the id of its object.
    #[error("the event has no 'subject' and no 'data.{0}.id' to take its object from")]
    NoObject(ObjectKind),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partitions_are_fnv1a_32_of_object_and_id() {
        // Known FNV-1a-32 values (the reference test vectors: "" and "a"), and
        // the hash of the joined tokens, as nats-server's partition() computes it.
        let fnv = |s: &str| {
            s.bytes().fold(0x811c_9dc5_u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            })
        };
        assert_eq!(fnv(""), 0x811c_9dc5);
        assert_eq!(fnv("a"), 0xe40c_292c);
        assert_eq!(fnv("foobar"), 0xbf9c_f968);
        assert_eq!(
            object_partition("foo", "bar", 1_000_000_007),
            0xbf9c_f968 % 1_000_000_007
        );
        assert_eq!(object_partition("entry", "42", 7), fnv("entry42") % 7);
        // Fixed values, checked against nats-server 2.10.26 and 2.12 by the
        // `partition` integration test.
        assert_eq!(object_partition("entry", "42", 4), 1);
        assert_eq!(object_partition("entry", "1", 4), 2);
        assert_eq!(object_partition("entity", "3", 8), 3);
        assert_eq!(object_partition("entry", "42", 1), 0);
        assert_eq!(object_partition("entry", "42", 0), 0);
        let key = ObjectKey {
            kind: ObjectKind::Entity,
            id: 3,
        };
        assert_eq!(key.partition(8), object_partition("entity", "3", 8));
        let mut counts = [0u32; 4];
        for id in 0..4000 {
            counts[object_partition("entry", &id.to_string(), 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..=1200).contains(&c)),
            "4000 entries spread over 4 partitions: {counts:?}"
        );
    }

    #[test]
    fn the_stream_transform_names_its_partition_count() {
        let s = Subjects::new("acme.pagoda").unwrap();
        let (src, dest) = s.events_transform(4);
        assert_eq!(src, "acme.pagoda.events.*.*.*.*");
        assert_eq!(
            dest,
            "acme.pagoda.events.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{wildcard(4)}}.{{partition(4,1,4)}}"
        );
        assert_eq!(s.partitions_of_transform(&dest), Some(4));
        assert_eq!(s.partitions_of_transform(&s.events_transform(1).1), Some(1));
        assert_eq!(s.partitions_of_transform(&s.events_transform(0).1), Some(1));
        assert_eq!(s.partitions_of_transform("acme.pagoda.events.>"), None);
        let other = Subjects::default();
        assert_eq!(other.partitions_of_transform(&dest), None);
        assert_eq!(s.partition_events(3), "acme.pagoda.events.*.*.*.*.3");
    }

    #[test]
    fn deferred_subjects_name_their_plugin() {
        let s = Subjects::default();
        assert_eq!(s.plugin_of_deferred(&s.deferred("audit")), Some("audit"));
        let tagged = s.deferred_in("audit", Some("p1of4"));
        assert_eq!(tagged, "pagoda.deferred.audit.p1of4");
        assert_eq!(s.plugin_of_deferred(&tagged), Some("audit"));
        assert_eq!(s.plugin_of_deferred("other.deferred.audit"), None);
    }

    #[test]
    fn plain_names_stay_readable() {
        assert_eq!(encode_entity("customer").unwrap(), "customer");
        assert_eq!(encode_entity("Server-Rack_2").unwrap(), "Server-Rack_2");
        assert_eq!(encode_entity("顧客").unwrap(), "顧客");
    }

    #[test]
    fn hostile_names_are_escaped() {
        assert_eq!(
            encode_entity("my customer.v2").unwrap(),
            "my%20customer%2Ev2"
        );
        assert_eq!(encode_entity("*").unwrap(), "%2A");
        assert_eq!(encode_entity(">").unwrap(), "%3E");
        assert_eq!(encode_entity("a\tb").unwrap(), "a%09b");
        assert_eq!(encode_entity("100%").unwrap(), "100%25");
        assert_eq!(
            encode_entity("顧客\u{3000}一覧").unwrap(),
            "顧客%E3%80%80一覧"
        );
        assert_eq!(encode_entity("\0").unwrap(), "%00");
    }

    #[test]
    fn empty_and_too_long_names_are_rejected() {
        assert_eq!(encode_entity(""), Err(SubjectError::EmptyEntityName));
        let long = "x".repeat(MAX_ENTITY_NAME_BYTES + 1);
        let err = encode_entity(&long).unwrap_err();
        assert!(
            err.to_string()
                .contains("1025 bytes long; the limit is 1024")
        );
        let longest = "顧".repeat(MAX_ENTITY_NAME_BYTES / 3);
        assert_eq!(
            decode_entity(&encode_entity(&longest).unwrap()).unwrap(),
            longest
        );
    }

    #[test]
    fn non_canonical_tokens_are_rejected() {
        for bad in [
            "", "a.b", "a b", "%2", "%zz", "%2e", "%61", "a*", "%FF", "%E3%80",
        ] {
            assert!(decode_entity(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn event_subjects_round_trip() {
        let s = Subjects::default();
        let subject = s.event(Hook::EntryAfterCreate, "customer", 42).unwrap();
        assert_eq!(subject, "pagoda.events.entry.after_create.customer.42");
        assert_eq!(
            s.parse_event(&subject).unwrap(),
            (Hook::EntryAfterCreate, "customer".to_owned())
        );
        let parsed = s.parse_event_subject(&subject).unwrap();
        assert_eq!(parsed.object.to_string(), "entry/42");
        assert_eq!(parsed.partition, None);
        let stored = s
            .parse_event_subject("pagoda.events.entry.after_create.customer.42.3")
            .unwrap();
        assert_eq!(stored.object.id, 42);
        assert_eq!(stored.partition, Some(3));
        let s = Subjects::new("acme.pagoda").unwrap();
        assert_eq!(s.events_stream(), "ACME_PAGODA_EVENTS");
        assert_eq!(s.registry_bucket(), "acme_pagoda_registry");
        let subject = s.event(Hook::EntityAfterDelete, "a.b", 7).unwrap();
        assert_eq!(subject, "acme.pagoda.events.entity.after_delete.a%2Eb.7");
        assert_eq!(
            s.parse_event(&subject).unwrap(),
            (Hook::EntityAfterDelete, "a.b".to_owned())
        );
        for bad in [
            "acme.pagoda.events.entry.nope.x.1",
            "acme.pagoda.events.entry.after_create.x",
            "acme.pagoda.events.entry.after_create.x.abc",
            "acme.pagoda.events.entry.after_create.x.1.p",
            "acme.pagoda.events.entry.after_create.x.1.2.3",
            "pagoda.events.entry.after_create.x.1",
        ] {
            let err = s.parse_event(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert!(Subjects::new("bad prefix").is_err());
        assert!(Subjects::new("a..b").is_err());
        assert_eq!(
            s.event_filter(Some(Hook::EntryAfterUpdate), None).unwrap(),
            "acme.pagoda.events.entry.after_update.*.>"
        );
        assert_eq!(
            Subjects::default()
                .event_filter(None, Some("customer"))
                .unwrap(),
            "pagoda.events.*.*.customer.>"
        );
        let entry42 = ObjectKey {
            kind: ObjectKind::Entry,
            id: 42,
        };
        let d = Subjects::default();
        assert_eq!(d.object_filter(entry42), "pagoda.events.entry.*.*.42.*");
        assert_eq!(
            d.stored_event_filter(None, None, Some(entry42)).unwrap(),
            "pagoda.events.entry.*.*.42.*"
        );
        assert_eq!(
            d.stored_event_filter(Some(Hook::EntryAfterUpdate), Some("a b"), Some(entry42))
                .unwrap(),
            "pagoda.events.entry.after_update.a%20b.42.*"
        );
        assert_eq!(
            d.stored_event_filter(Some(Hook::EntryAfterUpdate), None, None)
                .unwrap(),
            "pagoda.events.entry.after_update.*.>"
        );
        let err = d
            .stored_event_filter(Some(Hook::EntityAfterCreate), None, Some(entry42))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "hook 'entity.after_create' has no events about entry/42 (its events are about entity objects)"
        );
    }

    #[test]
    fn object_keys_round_trip() {
        let key = ObjectKey {
            kind: ObjectKind::Entry,
            id: 42,
        };
        assert_eq!(key.to_string(), "entry/42");
        assert_eq!("entry/42".parse::<ObjectKey>().unwrap(), key);
        assert!("thing/1".parse::<ObjectKey>().is_err());
        assert!("entry/x".parse::<ObjectKey>().is_err());
    }

    /// A subject token valid for NATS: non-empty, no `.`, `*`, `>`, no white space
    /// or control characters.
    fn is_valid_nats_token(token: &str) -> bool {
        !token.is_empty()
            && token
                .chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '.' | '*' | '>'))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_name_round_trips_to_a_valid_token(name in "\\PC{1,64}|[ -~]{1,64}|.{1,32}") {
            prop_assume!(!name.is_empty());
            let token = encode_entity(&name).unwrap();
            prop_assert!(is_valid_nats_token(&token), "token {token:?}");
            prop_assert_eq!(decode_entity(&token).unwrap(), name);
        }

        #[test]
        fn distinct_names_get_distinct_tokens(a in ".{1,16}", b in ".{1,16}") {
            prop_assume!(a != b);
            prop_assert_ne!(encode_entity(&a).unwrap(), encode_entity(&b).unwrap());
        }

        #[test]
        fn decoding_never_panics_and_is_canonical(token in "[%A-Fa-z0-9._ *>\u{3000}顧]{0,24}") {
            if let Ok(name) = decode_entity(&token) {
                prop_assert_eq!(encode_entity(&name).unwrap(), token);
            }
        }
    }
}
