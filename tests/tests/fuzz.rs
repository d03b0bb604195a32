//! Fuzz-style property tests (proptest, a few seconds in all) of the parsers
//! that read network input: the subject codec, the event envelope, the plugin
//! manifest and handler replies. Any input gives a value or an error, never a
//! panic or a stack overflow; valid values round-trip. The reply classifier's
//! header handling is tested next to it (`bus/src/dispatch/deliver.rs`).
#![allow(clippy::unwrap_used, missing_docs)]

use core_events::protocol::{HandlerReply, MAX_REPLY_BYTES};
use core_events::sample::{entity_event, entry_event};
use core_events::subject::{decode_entity, encode_entity};
use core_events::{EntityEvent, EntryEvent, Envelope, Hook, PluginManifest, Subjects};
use proptest::prelude::*;

const CASES: u32 = 512;

/// JSON values of any shape, a few levels deep.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "\\PC{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    "[a-z]{1,8}",
                    Just("id".to_owned()),
                    Just("hook".to_owned()),
                    Just("handlers".to_owned()),
                    Just("status".to_owned()),
                    Just("data".to_owned()),
                    Just("specversion".to_owned()),
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bytes that are often almost JSON: mutations of a valid document.
fn near_json(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    proptest::collection::vec((0..len, any::<u8>()), 0..8).prop_map(move |edits| {
        let mut bytes = valid.clone();
        for (i, b) in edits {
            bytes[i] = b;
        }
        bytes
    })
}

fn hooks() -> impl Strategy<Value = Hook> {
    proptest::sample::select(Hook::ALL.to_vec())
}

/// The hooks that have events (`after_*`).
fn notification_hooks() -> impl Strategy<Value = Hook> {
    proptest::sample::select(
        Hook::ALL
            .into_iter()
            .filter(|h| h.kind().is_notification())
            .collect::<Vec<_>>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    // --- subject codec -------------------------------------------------------

    #[test]
    fn subject_parse_never_panics(subject in "\\PC{0,80}") {
        let subjects = Subjects::default();
        let _ = subjects.parse_event(&subject);
        let _ = subjects.parse_event(&format!("pagoda.events.{subject}"));
        let _ = decode_entity(&subject);
    }

    #[test]
    fn event_subjects_round_trip(hook in hooks(), name in "\\PC{1,40}", id in any::<i64>()) {
        let subjects = Subjects::default();
        if let Ok(subject) = subjects.event(hook, &name, id) {
            prop_assert!(!subject.contains(' ') && !subject.contains('*') && !subject.contains('>'));
            let parsed = subjects.parse_event_subject(&subject).unwrap();
            prop_assert_eq!(parsed.hook, hook);
            prop_assert_eq!(&parsed.entity, &name);
            prop_assert_eq!(parsed.object.id, id);
            prop_assert_eq!(parsed.object.kind, hook.object());
            let stored = subjects
                .parse_event_subject(&format!("{subject}.{}", parsed.object.partition(4)))
                .unwrap();
            prop_assert_eq!(stored.partition, Some(parsed.object.partition(4)));
            let token = encode_entity(&name).unwrap();
            let suffix = format!(".{token}.{id}");
            prop_assert!(subject.ends_with(&suffix));
            prop_assert_eq!(decode_entity(&token).unwrap(), name.clone());
        }
    }

    // --- the host's strict body reader ---------------------------------------

    #[test]
    fn strict_reader_takes_what_serde_json_takes(value in json_value()) {
        // No NUL, no duplicate key, a few levels: read exactly as serde_json reads it.
        let text = serde_json::to_vec(&value).unwrap();
        let strict = core_events::input::parse_strict(&text, core_events::input::MAX_JSON_DEPTH);
        prop_assert_eq!(strict.unwrap(), value);
    }

    #[test]
    fn strict_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let strict = core_events::input::parse_strict(&bytes, 4);
        if let Ok(v) = strict {
            prop_assert!(core_events::input::json_depth(&v) <= 4);
            prop_assert_eq!(Some(v), serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        }
    }

    // --- envelope ------------------------------------------------------------

    #[test]
    fn envelope_from_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = serde_json::from_slice::<Envelope>(&bytes);
        let _ = serde_json::from_slice::<Envelope<EntryEvent>>(&bytes);
        let _ = serde_json::from_slice::<Envelope<EntityEvent>>(&bytes);
    }

    #[test]
    fn envelope_from_any_json(value in json_value()) {
        let _ = serde_json::from_value::<Envelope<EntryEvent>>(value.clone());
        let mut event = serde_json::to_value(entry_event(Hook::EntryAfterCreate, "customer", 1)).unwrap();
        event["data"] = value;
        let _ = serde_json::from_value::<Envelope<EntryEvent>>(event);
    }

    #[test]
    fn envelope_mutations(bytes in near_json(serde_json::to_vec(&entry_event(Hook::EntryAfterUpdate, "顧客 master", 42)).unwrap())) {
        let _ = serde_json::from_slice::<Envelope<EntryEvent>>(&bytes);
    }

    #[test]
    fn envelopes_round_trip(hook in notification_hooks(), name in "\\PC{1,30}", id in 1i64..1_000_000) {
        if hook.object() == core_events::ObjectKind::Entry {
            let event = entry_event(hook, &name, id);
            let bytes = serde_json::to_vec(&event).unwrap();
            prop_assert_eq!(serde_json::from_slice::<Envelope<EntryEvent>>(&bytes).unwrap(), event);
        } else {
            let event = entity_event(hook, id, &name);
            let bytes = serde_json::to_vec(&event).unwrap();
            prop_assert_eq!(serde_json::from_slice::<Envelope<EntityEvent>>(&bytes).unwrap(), event);
        }
    }

    // --- manifest ------------------------------------------------------------

    #[test]
    fn manifest_from_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        if let Err(e) = PluginManifest::from_json(&bytes) {
            prop_assert!(e.to_string().starts_with("invalid plugin manifest"), "{e}");
        }
    }

    #[test]
    fn manifest_from_any_json(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Err(e) = PluginManifest::from_json(&bytes) {
            prop_assert!(!e.problems.is_empty());
        }
    }

    #[test]
    fn manifest_mutations(bytes in near_json(valid_manifest_json())) {
        match PluginManifest::from_json(&bytes) {
            // What parses is valid, and round-trips.
            Ok(m) => {
                prop_assert!(m.validate().is_ok());
                let again = PluginManifest::from_json(&serde_json::to_vec(&m).unwrap()).unwrap();
                prop_assert_eq!(again, m);
            }
            Err(e) => prop_assert!(e.to_string().starts_with("invalid plugin manifest")),
        }
    }

    #[test]
    fn manifests_round_trip(
        id in "[a-zA-Z0-9_-]{1,20}",
        handlers in proptest::collection::vec(("[a-z]{1,10}", hooks(), -1000i32..1000), 0..6),
    ) {
        let mut manifest = PluginManifest::new(id, "Name", "1.2.3");
        for (i, (name, hook, priority)) in handlers.into_iter().enumerate() {
            let mut h = core_events::HandlerSpec::new(format!("{name}{i}"), hook);
            h.priority = priority;
            manifest.handlers.push(h);
        }
        let bytes = serde_json::to_vec(&manifest).unwrap();
        prop_assert_eq!(PluginManifest::from_json(&bytes).unwrap(), manifest);
    }

    // --- replies -------------------------------------------------------------

    #[test]
    fn reply_from_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        match HandlerReply::parse(&bytes) {
            Ok(reply) => prop_assert!(reply.status.is_none() || reply.status.as_deref() == Some("ok")),
            Err(e) => {
                let e = e.to_string();
                prop_assert!(!e.is_empty() && e.len() < 2048, "{e}");
            }
        }
    }

    #[test]
    fn reply_from_any_json(value in json_value()) {
        let _ = HandlerReply::parse(&serde_json::to_vec(&value).unwrap());
    }
}

fn valid_manifest_json() -> Vec<u8> {
    br#"{"id":"hello-world","name":"Hello","version":"1.0.0","handlers":[{"name":"greet","hook":"entry.after_create","entities":["a"],"priority":50,"timeout_ms":5000,"retry_backoff_ms":[100,500]}]}"#.to_vec()
}

/// serde_json stops at a depth of 128 (its default recursion limit, which the
/// bus and the SDK keep: none of them call `disable_recursion_limit`), so deep
/// input from the network is an error, not a stack overflow.
#[test]
fn deep_json_is_an_error_not_a_stack_overflow() {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let nested_objects = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
    for input in [deep(129), deep(100_000), nested_objects] {
        assert!(serde_json::from_str::<serde_json::Value>(&input).is_err());
        assert!(serde_json::from_str::<Envelope>(&input).is_err());
        assert!(PluginManifest::from_json(input.as_bytes()).is_err());
        assert!(HandlerReply::parse(input.as_bytes()).is_err());
    }
    // Within the limit is fine.
    assert!(serde_json::from_str::<serde_json::Value>(&deep(100)).is_ok());
}

/// Sizes are bounded before parsing.
#[test]
fn sizes_are_bounded() {
    let big = vec![b' '; MAX_REPLY_BYTES + 1];
    assert!(
        HandlerReply::parse(&big)
            .unwrap_err()
            .to_string()
            .contains("limit")
    );
    let manifest = vec![b' '; 256 * 1024 + 1];
    let e = PluginManifest::from_json(&manifest).unwrap_err();
    assert!(e.to_string().contains("the limit is 262144"), "{e}");
}
