//! The synchronous hooks end to end: SDK plugins on a real nats-server, the bus's
//! live registry, and `hookbus::sync_hooks::SyncHooks` calling them.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use core_events::{AttrType, Attribute, Hook, ObjectRef, OnUnavailable, sample};
use hookbus::run::Bus;
use hookbus::sync_hooks::{SyncHookError, SyncHooks, ValidationError};
use hookbus_tests::ServeOn;
use hookbus_tests::{NatsServer, assert_eventually, init_tracing};
use pagoda_plugin_sdk::{
    FieldError, Plugin, PluginBuilder, RunningPlugin, ServeOptions, SyncError, SyncHandler,
};
use store::{NewEntity, NewEntry, WriteContext};

struct Setup {
    _server: NatsServer,
    client: async_nats::Client,
    bus: Bus,
    hooks: SyncHooks,
    running: Vec<RunningPlugin>,
}

async fn setup(enabled: &[&str], plugins: Vec<PluginBuilder>) -> Setup {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let bus = common::start_bus(&server, enabled).await;
    let mut running = Vec::new();
    for p in plugins {
        let plugin = p.build().unwrap();
        running.push(
            plugin
                .serve_on(&server, ServeOptions::default())
                .await
                .unwrap(),
        );
    }
    common::wait_registered(&bus, enabled).await;
    let hooks = SyncHooks::new(
        server.connect_as(hookbus_tests::HOST_USER).await,
        bus.registry.clone(),
    );
    Setup {
        _server: server,
        client,
        bus,
        hooks,
        running,
    }
}

fn ctx() -> WriteContext {
    WriteContext {
        user: Some(sample::user(1, "admin")),
        traceparent: None,
        tracestate: None,
    }
}

fn attr(name: &str, value: &str) -> Attribute {
    Attribute {
        id: 0,
        name: name.into(),
        attr_type: AttrType::STRING,
        schema: ObjectRef {
            id: 0,
            name: name.into(),
        },
        value: serde_json::json!(value),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_returns_every_error_at_once_in_priority_order() {
    let late = Plugin::builder("late", "Late", "1.0.0").on_validate(
        SyncHandler::named("two_errors").priority(200),
        |ctx| async move {
            Ok(vec![
                FieldError::field("name", format!("'{}' is taken", ctx.request.entry.name)),
                FieldError::general("late says no"),
            ])
        },
    );
    let early = Plugin::builder("early", "Early", "1.0.0")
        .on_validate(
            SyncHandler::named("one_error").priority(50),
            |ctx| async move {
                assert_eq!(ctx.request.user.unwrap().username, "admin");
                Ok(vec![FieldError::field("phone", "phone is required")])
            },
        )
        .on_validate(
            SyncHandler::named("other_entity").entities(["product"]),
            |_ctx| async move { Ok(vec![FieldError::general("must not run for customer")]) },
        )
        .on_validate("accepts", |_ctx| async move { Ok(vec![]) });
    let s = setup(&["late", "early"], vec![late, early]).await;
    let entity = sample::entity(1, "customer");

    let err = s
        .hooks
        .validate(&entity, &NewEntry::named("ACME"), None, &ctx())
        .await
        .unwrap_err();
    let SyncHookError::Invalid { errors } = &err else {
        panic!("expected Invalid, got {err:?}");
    };
    let e = |plugin: &str, handler: &str, field: Option<&str>, message: &str| ValidationError {
        plugin: plugin.into(),
        handler: handler.into(),
        field: field.map(Into::into),
        message: message.into(),
    };
    assert_eq!(
        errors,
        &[
            e("early", "one_error", Some("phone"), "phone is required"),
            e("late", "two_errors", Some("name"), "'ACME' is taken"),
            e("late", "two_errors", None, "late says no"),
        ]
    );
    let text = err.to_string();
    assert!(
        text.contains("phone: phone is required (early/one_error)"),
        "{text}"
    );

    // An entity no validator with errors is for: only `accepts` and the
    // unfiltered ones run; `other_entity` is for product only.
    let product = sample::entity(2, "product");
    let err = s
        .hooks
        .validate(&product, &NewEntry::named("x"), None, &ctx())
        .await
        .unwrap_err();
    let SyncHookError::Invalid { errors } = err else {
        panic!()
    };
    assert_eq!(errors.len(), 4, "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_create_chain_applies_every_change_in_priority_order() {
    let second = Plugin::builder("second", "Second", "1.0.0")
        .on_before_create_entry(
            SyncHandler::named("append").priority(20),
            |ctx| async move {
                let mut draft = ctx.request.data;
                draft.note.push_str("+second");
                draft
                    .attrs
                    .insert("seen_note".into(), serde_json::json!(draft.note.clone()));
                Ok(draft)
            },
        )
        .on_before_create_entity(
            SyncHandler::named("entity_note").priority(20),
            |ctx| async move {
                let mut new = ctx.request.data;
                new.note.push_str("+second");
                Ok(new)
            },
        );
    let first = Plugin::builder("first", "First", "1.0.0")
        .on_before_create_entry(SyncHandler::named("set").priority(10), |ctx| async move {
            let mut draft = ctx.request.data;
            assert_eq!(ctx.request.entity.unwrap().name, "customer");
            draft.note = "first".into();
            Ok(draft)
        })
        .on_before_create_entity(
            SyncHandler::named("entity_note").priority(10),
            |ctx| async move {
                let mut new = ctx.request.data;
                new.note = "first".into();
                Ok(new)
            },
        );
    let s = setup(&["second", "first"], vec![second, first]).await;
    let entity = sample::entity(1, "customer");

    let out = s
        .hooks
        .before_create_entry(&entity, NewEntry::named("ACME"), &ctx())
        .await
        .unwrap();
    assert_eq!(out.value.name, "ACME");
    assert_eq!(out.value.note, "first+second");
    assert_eq!(out.value.attrs["seen_note"], "first+second");
    assert!(out.skipped.is_empty());

    let out = s
        .hooks
        .before_create_entity(NewEntity::named("product"), &ctx())
        .await
        .unwrap();
    assert_eq!(out.value.note, "first+second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vetoes_and_rejections_stop_the_change_with_the_reason() {
    let calls = Arc::new(AtomicUsize::new(0));
    let after_veto = calls.clone();
    let guard = Plugin::builder("guard", "Guard", "1.0.0")
        .on_before_delete_entry(
            SyncHandler::named("keep_pinned").priority(10),
            |ctx| async move {
                if ctx.request.entry.unwrap().note == "pinned" {
                    return Err(SyncError::reject("pinned entries cannot be deleted"));
                }
                Ok(())
            },
        )
        .on_before_delete_entry(SyncHandler::named("counts").priority(20), move |_ctx| {
            let calls = after_veto.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .on_before_create_entry("no_drafts", |ctx| async move {
            if ctx.request.data.name.starts_with("draft") {
                return Err(SyncError::reject("drafts are not allowed"));
            }
            Ok(ctx.request.data)
        });
    let s = setup(&["guard"], vec![guard]).await;
    let entity = sample::entity(1, "customer");
    let mut entry = sample::entry(5, "ACME", &entity);

    let allowed = s
        .hooks
        .before_delete_entry(&entity, &entry, &ctx())
        .await
        .unwrap();
    assert!(allowed.skipped.is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    entry.note = "pinned".into();
    let err = s
        .hooks
        .before_delete_entry(&entity, &entry, &ctx())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        SyncHookError::Rejected {
            hook: Hook::EntryBeforeDelete,
            plugin: "guard".into(),
            handler: "keep_pinned".into(),
            reason: "pinned entries cannot be deleted".into(),
        }
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the chain stops at the veto"
    );

    let err = s
        .hooks
        .before_create_entry(&entity, NewEntry::named("draft-1"), &ctx())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "entry.before_create rejected by guard/no_drafts: drafts are not allowed"
    );
    // Hooks with no handler are a no-op.
    let restored = s
        .hooks
        .before_restore_entry(&entity, &entry, &ctx())
        .await
        .unwrap();
    assert!(restored.skipped.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_attrs_is_a_chain_of_transforms() {
    let a = Plugin::builder("a", "A", "1.0.0").on_get_entry_attrs(
        SyncHandler::named("add_a").priority(1),
        |ctx| async move {
            let mut attrs = ctx.request.attrs;
            attrs.push(attr("a", "from a"));
            Ok(attrs)
        },
    );
    let b = Plugin::builder("b", "B", "1.0.0").on_get_entry_attrs(
        SyncHandler::named("count").priority(2),
        |ctx| async move {
            let mut attrs = ctx.request.attrs;
            let n = attrs.len();
            attrs.retain(|a| a.name != "secret");
            attrs.push(attr("count", &n.to_string()));
            Ok(attrs)
        },
    );
    let s = setup(&["b", "a"], vec![a, b]).await;
    let entity = sample::entity(1, "customer");
    let mut entry = sample::entry(5, "ACME", &entity);
    entry.attrs = vec![attr("phone", "123"), attr("secret", "x")];

    let out = s.hooks.get_entry_attrs(&entry, &ctx()).await.unwrap();
    let names: Vec<&str> = out.value.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["phone", "a", "count"]);
    assert_eq!(out.value[2].value, "3");

    // No entity.get_attrs handler: unchanged.
    let out = s.hooks.get_entity_attrs(&entity, &ctx()).await.unwrap();
    assert_eq!(out.value, entity.attrs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_that_does_not_answer_blocks_or_is_skipped_never_hangs() {
    let strict = Plugin::builder("strict", "Strict", "1.0.0")
        .on_validate("v", |_ctx| async move { Ok(vec![]) });
    let lenient = Plugin::builder("lenient", "Lenient", "1.0.0").on_validate(
        SyncHandler::named("v").on_unavailable(OnUnavailable::Skip),
        |_ctx| async move { Ok(vec![]) },
    );
    let stuck = Plugin::builder("stuck", "Stuck", "1.0.0").on_before_create_entry(
        SyncHandler::named("hangs").timeout(Duration::from_millis(300)),
        |_ctx| async move {
            std::future::pending::<()>().await;
            Ok(NewEntry::default())
        },
    );
    let mut s = setup(
        &["strict", "lenient", "stuck"],
        vec![strict, lenient, stuck],
    )
    .await;
    let entity = sample::entity(1, "customer");
    let draft = NewEntry::named("ACME");
    let out = s
        .hooks
        .validate(&entity, &draft, None, &ctx())
        .await
        .unwrap();
    assert!(out.skipped.is_empty());

    // A handler that never answers: blocked within its timeout, with the reason.
    let started = Instant::now();
    let err = s
        .hooks
        .before_create_entry(&entity, draft.clone(), &ctx())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let SyncHookError::Unavailable {
        plugin,
        handler,
        reason,
        ..
    } = &err
    else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert_eq!((plugin.as_str(), handler.as_str()), ("stuck", "hangs"));
    assert!(
        reason.contains("no reply within 300 ms") || reason.contains("timed out after 300 ms"),
        "{reason}"
    );

    // Stop both validator plugins: no responders.
    let lenient_running = s.running.remove(1);
    let strict_running = s.running.remove(0);
    strict_running.shutdown().await.unwrap();
    lenient_running.shutdown().await.unwrap();
    let started = Instant::now();
    let err = s
        .hooks
        .validate(&entity, &draft, None, &ctx())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no responders took {:?}: {err}",
        started.elapsed()
    );
    assert_eq!(
        err.to_string(),
        "entry.validate handler strict/v is unavailable: no replica is running (no responders)"
    );

    // With only the lenient one down, the change goes on and the caller is told.
    let strict_again = Plugin::builder("strict", "Strict", "1.0.0")
        .on_validate("v", |_ctx| async move { Ok(vec![]) })
        .build()
        .unwrap();
    let _strict = strict_again
        .serve_on(&s._server, ServeOptions::default())
        .await
        .unwrap();
    let out = s
        .hooks
        .validate(&entity, &draft, None, &ctx())
        .await
        .unwrap();
    assert_eq!(out.skipped.len(), 1, "{:?}", out.skipped);
    assert_eq!(out.skipped[0].plugin, "lenient");
    assert!(out.skipped[0].reason.contains("no responders"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_never_delivers_sync_hooks_as_events() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let v = Plugin::builder("v", "V", "1.0.0").on_validate("v", move |_ctx| {
        let calls = counted.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(vec![])
        }
    });
    let s = setup(&["v"], vec![v]).await;
    // Someone publishes a "validate event" by hand.
    let js = async_nats::jetstream::new(s.client.clone());
    let mut h = async_nats::HeaderMap::new();
    h.insert(core_events::protocol::headers::OBJECT, "entry/1");
    js.publish_with_headers(
        "pagoda.events.entry.validate.customer.1",
        h,
        bytes::Bytes::from_static(b"{}"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert_eventually!(
        common::dead_letters(&js)
            .await
            .iter()
            .any(|(subject, _)| subject == "pagoda.dlq._bus.malformed"),
        Duration::from_secs(10),
        "the sync-hook event was not set aside as malformed"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(s.bus.stats.delivered.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_chains_entity_vetoes_and_get_attrs_skip_by_default() {
    let p = Plugin::builder("p", "P", "1.0.0")
        .on_before_update_entry("stamp", |ctx| async move {
            let mut changes = ctx.request.data;
            let current = ctx.request.entry.unwrap();
            changes.note = Some(format!("was {}", current.name));
            changes
                .attrs
                .insert("phone".into(), serde_json::Value::Null);
            Ok(changes)
        })
        .on_before_update_entity("upper", |ctx| async move {
            let mut changes = ctx.request.data;
            changes.name = changes.name.map(|n| n.to_uppercase());
            Ok(changes)
        })
        .on_before_delete_entity("keep_customer", |ctx| async move {
            if ctx.request.entity.name == "customer" {
                return Err(SyncError::reject("customer is in use"));
            }
            Ok(())
        })
        .on_get_entity_attrs("hide_inactive", |ctx| async move {
            Ok(ctx
                .request
                .attrs
                .into_iter()
                .filter(|a| a.is_active)
                .collect())
        });
    let down = Plugin::builder("down", "Down", "1.0.0").on_get_entity_attrs(
        SyncHandler::named("never_runs").priority(1),
        |_ctx| async move { Ok(vec![]) },
    );
    let mut s = setup(&["p", "down"], vec![p, down]).await;
    s.running.remove(1).shutdown().await.unwrap();

    let mut entity = sample::entity(1, "customer");
    let entry = sample::entry(5, "ACME", &entity);
    let changes = store::EntryChanges {
        name: Some("ACME 2".into()),
        ..Default::default()
    };
    let out = s
        .hooks
        .before_update_entry(&entity, &entry, changes, &ctx())
        .await
        .unwrap();
    assert_eq!(out.value.name.as_deref(), Some("ACME 2"));
    assert_eq!(out.value.note.as_deref(), Some("was ACME"));
    assert_eq!(out.value.attrs["phone"], serde_json::Value::Null);

    let changes = store::EntityChanges {
        name: Some("client".into()),
        ..Default::default()
    };
    let out = s
        .hooks
        .before_update_entity(&entity, changes, &ctx())
        .await
        .unwrap();
    assert_eq!(out.value.name.as_deref(), Some("CLIENT"));

    let err = s
        .hooks
        .before_delete_entity(&entity, &ctx())
        .await
        .unwrap_err();
    assert!(matches!(err, SyncHookError::Rejected { .. }), "{err:?}");
    let other = s
        .hooks
        .before_delete_entity(&sample::entity(2, "product"), &ctx())
        .await
        .unwrap();
    assert!(other.skipped.is_empty());

    let mut active = core_events::EntityAttr {
        id: 1,
        name: "phone".into(),
        attr_type: AttrType::STRING,
        is_mandatory: false,
        referral: vec![],
        index: 0,
        is_summarized: false,
        is_delete_in_chain: false,
        note: String::new(),
        default_value: None,
        is_active: true,
    };
    let mut gone = active.clone();
    gone.name = "fax".into();
    gone.is_active = false;
    active.id = 2;
    entity.attrs = vec![active.clone(), gone];
    // `down` (get_attrs: skip by default) has no replica: left out, and said so.
    let out = s.hooks.get_entity_attrs(&entity, &ctx()).await.unwrap();
    assert_eq!(out.value, [active]);
    assert_eq!(out.skipped.len(), 1);
    assert_eq!(
        (
            out.skipped[0].plugin.as_str(),
            out.skipped[0].handler.as_str()
        ),
        ("down", "never_runs")
    );
}
