//! The protocol of the Pagoda hook bus: everything that describes an event or a
//! message, with no I/O (no database, no NATS connection, no async runtime). The
//! model store is the `store` crate; the runtime is `hookbus`.
//!
//! | part | module |
//! |---|---|
//! | the 17 hooks, their kinds and legacy aliases | [`hook`] |
//! | the CloudEvents envelope and event payloads | [`envelope`] |
//! | typed models plugins see (Entity, Entry, Attribute, User) | [`model`] |
//! | the subject codec (events, handlers, dead letters; entity tokens) | [`subject`] |
//! | plugin manifests and their validation | [`manifest`] |
//! | headers, handler replies, dead-letter records | [`protocol`] |
//! | request and reply bodies of the synchronous hooks | [`sync`] |
//! | sample objects for demos, docs and tests | [`sample`] |
//! | the bodies of model writes (new and changed users, entities, entries) | [`request`] |
//! | plugin API routes: the forwarded request and the plugin's reply | [`plugin_api`] |
//! | plugin tasks as jobs: statuses, queue message, state, operation ids | [`jobs`] |
//! | limits on user-supplied JSON (nesting depth), the strict reader of request bodies | [`input`] |
#![forbid(unsafe_code)]

pub mod envelope;
pub mod hook;
pub mod input;
pub mod jobs;
pub mod manifest;
pub mod model;
pub mod plugin_api;
pub mod protocol;
pub mod request;
pub mod sample;
pub mod subject;
pub mod sync;

pub use envelope::{EntityEvent, EntryEvent, Envelope, EventId};
pub use hook::{Hook, HookKind, ObjectKind, UnknownHook};
pub use manifest::{
    ApiRouteSpec, HandlerSpec, ManifestError, OnUnavailable, PluginManifest, TaskSpec,
};
pub use model::{AttrType, Attribute, Entity, EntityAttr, Entry, ObjectRef, User};
pub use subject::{
    EventSubject, ObjectKey, ObjectKeyError, SubjectError, Subjects, object_partition,
};
