//! One trace per model change, end to end: the host, the bus and the plugins run
//! as processes (`hookbus host`, `hookbus run`, `hello-world`, `flaky`) with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP/HTTP receiver in this test,
//! which decodes the protobuf `ExportTraceServiceRequest`s. One entry creation
//! must give one trace: HTTP request → sync-hook calls → plugin handlers, and
//! HTTP request → store commit → relay publish (PRODUCER) → dispatcher process
//! (CONSUMER, child of and linked to the producer) → delivery attempts (CLIENT)
//! → the plugin's handler (SERVER); flaky's retries and dead letter are events
//! of the process span. A delivery deferred while flaky is down is made later under
//! a `deliver_deferred` CONSUMER span of its change's trace. A plugin API route
//! and a job continue the caller's trace in the same way.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use hookbus_tests::deploy::Deployment;
use hookbus_tests::otlp::{Code, Got, Receiver, SpanKind, attr, hex};
use hookbus_tests::{TestDb, poll_until};
use serde_json::json;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

struct Trace(Vec<Got>);

impl Trace {
    fn named(&self, name: &str) -> Vec<&Got> {
        self.0.iter().filter(|g| g.span.name == name).collect()
    }

    fn one(&self, name: &str) -> &Got {
        let all = self.named(name);
        assert_eq!(all.len(), 1, "one span '{name}' expected:\n{}", self.dump());
        all[0]
    }

    fn children(&self, parent: &Got, name: &str) -> Vec<&Got> {
        self.0
            .iter()
            .filter(|g| g.span.name == name && g.span.parent_span_id == parent.span.span_id)
            .collect()
    }

    fn dump(&self) -> String {
        self.0
            .iter()
            .map(|g| {
                format!(
                    "{} {} kind={} id={} parent={}",
                    g.service,
                    g.span.name,
                    g.span.kind,
                    hex(&g.span.span_id),
                    hex(&g.span.parent_span_id)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_entry_creation_is_one_trace_across_host_bus_and_plugins() {
    let receiver = Receiver::start().await;
    let url = receiver.url.clone();
    let db = TestDb::sqlite();
    let mut d = Deployment::start_with_env(
        &db,
        &["hello-world", "flaky"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &url),
            ("OTEL_SERVICE_NAME", "{service}"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // hello-world's task `count` gets operation id 5000.
            (
                "PLUGIN_OPERATION_ID_CONFIG",
                r#"{"hello-world": [5000, 5099]}"#,
            ),
        ],
    )
    .await;

    let (status, entity) = d.post("/api/v2/entities/", json!({"name": "shop"})).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{entity}");
    let entity_id = entity["id"].as_i64().unwrap();
    // The caller's own trace context: the host's span continues it.
    let response = d
        .request(
            reqwest::Method::POST,
            &format!("/api/v2/entities/{entity_id}/entries/"),
        )
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({"name": "Hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);

    let process_name = "process pagoda.events.entry.after_create.{entity}.{object_id}";
    let mine = || -> Vec<Got> {
        receiver
            .spans()
            .into_iter()
            .filter(|g| hex(&g.span.trace_id) == TRACE)
            .collect()
    };
    let complete = poll_until(Duration::from_secs(30), || {
        let got = Trace(mine());
        async move {
            got.named("handle flaky.always_fails").len() >= 3
                && !got.named("handle hello-world.entry_created").is_empty()
                && !got.named("handle hello-world.fill_note").is_empty()
                && !got.named("handle hello-world.reject_forbidden").is_empty()
                && !got.named("store commit").is_empty()
                && got
                    .0
                    .iter()
                    .any(|g| g.service == "hookbus-host" && g.span.kind == SpanKind::Server as i32)
                && got
                    .named(process_name)
                    .iter()
                    .any(|p| p.span.events.iter().any(|e| e.name == "dead_letter"))
        }
    })
    .await;
    let trace = Trace(mine());
    assert!(
        complete,
        "the trace did not arrive:\n{}\n{}",
        trace.dump(),
        d.outputs()
    );

    // The host: the HTTP request continues the caller's context.
    let http = trace
        .0
        .iter()
        .find(|g| g.span.kind == SpanKind::Server as i32 && g.service == "hookbus-host")
        .unwrap_or_else(|| panic!("no host request span:\n{}", trace.dump()));
    assert_eq!(hex(&http.span.parent_span_id), CALLER_SPAN);
    assert!(
        http.span.name.starts_with("POST /api/v2/entities/"),
        "{}",
        http.span.name
    );

    // The sync hooks: a CLIENT call under the request, the plugin's SERVER span under it.
    for handler in ["fill_note", "reject_forbidden"] {
        let calls = trace.children(http, &format!("call hello-world.{handler}"));
        assert_eq!(calls.len(), 1, "{handler}:\n{}", trace.dump());
        assert_eq!(calls[0].span.kind, SpanKind::Client as i32);
        let served = trace.children(calls[0], &format!("handle hello-world.{handler}"));
        assert_eq!(served.len(), 1, "{handler}:\n{}", trace.dump());
        assert_eq!(served[0].service, "hello-world");
        assert_eq!(served[0].span.kind, SpanKind::Server as i32);
    }

    // The store commit under the request, the relay's PRODUCER span under the commit.
    let commit = trace.one("store commit");
    assert_eq!(commit.span.parent_span_id, http.span.span_id);
    let publish = trace.one("send pagoda.events.entry.after_create.{entity}.{object_id}");
    assert_eq!(publish.service, "hookbus-host");
    assert_eq!(publish.span.kind, SpanKind::Producer as i32);
    assert_eq!(publish.span.parent_span_id, commit.span.span_id);
    assert_eq!(
        attr(&publish.span.attributes, "messaging.system").as_deref(),
        Some("nats")
    );
    let message_id = attr(&publish.span.attributes, "messaging.message.id").unwrap();

    // The dispatcher's CONSUMER span: a child of the producer, linked to it.
    let process = trace.one(process_name);
    assert_eq!(process.service, "hookbus-run");
    assert_eq!(process.span.kind, SpanKind::Consumer as i32);
    assert_eq!(process.span.parent_span_id, publish.span.span_id);
    assert!(
        process
            .span
            .links
            .iter()
            .any(|l| l.span_id == publish.span.span_id && l.trace_id == publish.span.trace_id),
        "the process span links to the producer: {:?}",
        process.span.links
    );
    let pattr = |k: &str| attr(&process.span.attributes, k);
    assert_eq!(pattr("messaging.system").as_deref(), Some("nats"));
    assert_eq!(pattr("messaging.message.id"), Some(message_id));
    assert_eq!(
        pattr("messaging.consumer.group.name").as_deref(),
        Some("dispatcher")
    );
    assert_eq!(
        pattr("messaging.destination.partition.id").as_deref(),
        Some("0")
    );
    assert!(
        pattr("messaging.destination.name")
            .unwrap()
            .starts_with("pagoda.events.entry.after_create."),
    );

    // hello-world: one CLIENT attempt, its handler's SERVER span under it.
    let ok = trace.children(process, "deliver hello-world.entry_created");
    assert_eq!(ok.len(), 1, "{}", trace.dump());
    assert_eq!(ok[0].span.kind, SpanKind::Client as i32);
    let handled = trace.children(ok[0], "handle hello-world.entry_created");
    assert_eq!(handled.len(), 1, "{}", trace.dump());
    assert_eq!(handled[0].service, "hello-world");

    // flaky: three failed attempts (retried twice), each with the plugin's span
    // under it; the retries and the dead letter are events of the process span.
    let failed = trace.children(process, "deliver flaky.always_fails");
    assert_eq!(failed.len(), 3, "{}", trace.dump());
    for attempt in &failed {
        assert_eq!(attempt.span.kind, SpanKind::Client as i32);
        assert_eq!(
            attempt.span.status.as_ref().map(|s| s.code),
            Some(Code::Error as i32)
        );
        assert_eq!(
            attr(&attempt.span.attributes, "error.type").as_deref(),
            Some("transient_failure")
        );
        let served = trace.children(attempt, "handle flaky.always_fails");
        assert_eq!(served.len(), 1, "{}", trace.dump());
        assert_eq!(served[0].service, "flaky");
        assert_eq!(
            served[0].span.status.as_ref().map(|s| s.code),
            Some(Code::Error as i32)
        );
    }
    let events: Vec<&str> = process
        .span
        .events
        .iter()
        .map(|e| e.name.as_str())
        .filter(|n| *n == "retry" || *n == "dead_letter")
        .collect();
    assert_eq!(events, ["retry", "retry", "dead_letter"]);
    // Each names the handler and the error of the attempt before it.
    for event in process
        .span
        .events
        .iter()
        .filter(|e| e.name == "retry" || e.name == "dead_letter")
    {
        assert_eq!(
            attr(&event.attributes, "pagoda.handler").as_deref(),
            Some("flaky.always_fails")
        );
        assert!(
            attr(&event.attributes, "pagoda.error").is_some_and(|e| !e.is_empty()),
            "{event:?}"
        );
    }

    // A delivery deferred while flaky has no replica is made, once it is back, under
    // a `deliver_deferred` CONSUMER span of the same trace, linked to the producer.
    const LATER: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    d.kill_plugin("flaky").await;
    let response = d
        .request(
            reqwest::Method::POST,
            &format!("/api/v2/entities/{entity_id}/entries/"),
        )
        .header("traceparent", format!("00-{LATER}-{CALLER_SPAN}-01"))
        .json(&json!({"name": "Later"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let later = || -> Trace {
        Trace(
            receiver
                .spans()
                .into_iter()
                .filter(|g| hex(&g.span.trace_id) == LATER)
                .collect(),
        )
    };
    // The live process span gave the delivery up to the deferred queue.
    let deferred = poll_until(Duration::from_secs(30), || {
        let got = later();
        async move { !got.named(process_name).is_empty() }
    })
    .await;
    assert!(deferred, "no process span:\n{}", later().dump());
    d.restart_plugin("flaky").await;
    let drained_name = "deliver_deferred pagoda.events.entry.after_create.{entity}.{object_id}";
    let drained = poll_until(Duration::from_secs(30), || {
        let got = later();
        async move {
            got.named("handle flaky.always_fails").len() >= 3
                && got
                    .named(drained_name)
                    .iter()
                    .any(|p| p.span.events.iter().any(|e| e.name == "dead_letter"))
        }
    })
    .await;
    let trace = later();
    assert!(
        drained,
        "no deferred delivery span:\n{}\n{}",
        trace.dump(),
        d.outputs()
    );
    let publish = trace.one("send pagoda.events.entry.after_create.{entity}.{object_id}");
    let drain = trace.one(drained_name);
    assert_eq!(drain.span.kind, SpanKind::Consumer as i32);
    assert_eq!(drain.span.parent_span_id, publish.span.span_id);
    assert!(
        drain
            .span
            .links
            .iter()
            .any(|l| l.span_id == publish.span.span_id)
    );
    // Attempts that found no replica yet (while flaky starts) are polls, marked
    // `no_responders`; the three that reached it failed and were dead-lettered.
    let attempts: Vec<_> = trace
        .children(drain, "deliver flaky.always_fails")
        .into_iter()
        .filter(|a| attr(&a.span.attributes, "error.type").as_deref() != Some("no_responders"))
        .collect();
    assert_eq!(attempts.len(), 3, "{}", trace.dump());
    for attempt in attempts {
        assert_eq!(
            trace.children(attempt, "handle flaky.always_fails").len(),
            1,
            "{}",
            trace.dump()
        );
    }

    // A change whose caller did not sample its trace (`traceparent` flags 00, as a
    // `parentbased_*` sampler leaves it): no process makes a span of it. Shown by
    // a sampled change made after the unsampled one was dead-lettered (so every
    // span of it, had one been made, ended earlier in each process's export queue).
    const UNSAMPLED: &str = "6bf92f3577b34da6a3ce929d0e0e4738";
    const AFTER: &str = "7bf92f3577b34da6a3ce929d0e0e4739";
    let create = |trace: &'static str, flags: &'static str, name: &'static str| {
        d.request(
            reqwest::Method::POST,
            &format!("/api/v2/entities/{entity_id}/entries/"),
        )
        .header("traceparent", format!("00-{trace}-{CALLER_SPAN}-{flags}"))
        .json(&json!({ "name": name }))
        .send()
    };
    let response = create(UNSAMPLED, "00", "Unsampled").await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let js = async_nats::jetstream::new(d.nats.connect().await);
    let flaky = hookbus::dlq::Filter::plugin("flaky");
    let dead_lettered = poll_until(Duration::from_secs(30), || {
        let (js, flaky) = (js.clone(), flaky.clone());
        async move {
            Box::pin(hookbus::dlq::list(
                &js,
                &core_events::Subjects::default(),
                &flaky,
                None,
            ))
            .await
            .unwrap()
            .iter()
            .any(|l| l.body.to_string().contains(UNSAMPLED))
        }
    })
    .await;
    assert!(
        dead_lettered,
        "the unsampled change was not dead-lettered by flaky:\n{}",
        d.outputs()
    );
    let response = create(AFTER, "01", "After").await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let after = poll_until(Duration::from_secs(30), || {
        let got = Trace(
            receiver
                .spans()
                .into_iter()
                .filter(|g| hex(&g.span.trace_id) == AFTER)
                .collect(),
        );
        async move {
            got.named("handle flaky.always_fails").len() >= 3
                && !got.named("handle hello-world.entry_created").is_empty()
                && got
                    .named(process_name)
                    .iter()
                    .any(|p| p.span.events.iter().any(|e| e.name == "dead_letter"))
        }
    })
    .await;
    assert!(
        after,
        "the sampled change's trace did not arrive:\n{}",
        d.outputs()
    );
    let unsampled: Vec<String> = receiver
        .spans()
        .into_iter()
        .filter(|g| hex(&g.span.trace_id) == UNSAMPLED)
        .map(|g| format!("{} {}", g.service, g.span.name))
        .collect();
    assert!(
        unsampled.is_empty(),
        "spans of an unsampled trace: {unsampled:?}"
    );

    // A plugin API route and a job continue the caller's trace too: the host's
    // CLIENT call and PRODUCER publish under its request span, the plugin's
    // SERVER and CONSUMER spans under them.
    const API: &str = "8bf92f3577b34da6a3ce929d0e0e473a";
    const JOB: &str = "9bf92f3577b34da6a3ce929d0e0e473b";
    let response = d
        .request(reqwest::Method::GET, "/api/v2/plugins/hello-world/greet")
        .header("traceparent", format!("00-{API}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let response = d
        .request(
            reqwest::Method::POST,
            "/api/v2/plugins/hello-world/tasks/count/",
        )
        .header("traceparent", format!("00-{JOB}-{CALLER_SPAN}-01"))
        .json(&json!({"to": 1, "delay_ms": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let of = |id: &'static str| -> Trace {
        Trace(
            receiver
                .spans()
                .into_iter()
                .filter(|g| hex(&g.span.trace_id) == id)
                .collect(),
        )
    };
    let job_process = "process pagoda.jobs.{plugin}.{task}";
    let arrived =
        poll_until(Duration::from_secs(30), || {
            let (api, job) = (of(API), of(JOB));
            async move {
                !api.named("handle hello-world.greet").is_empty()
                    && !job.named(job_process).is_empty()
                    && api.0.iter().any(|g| {
                        g.service == "hookbus-host" && g.span.kind == SpanKind::Server as i32
                    })
                    && job.0.iter().any(|g| {
                        g.service == "hookbus-host" && g.span.kind == SpanKind::Server as i32
                    })
            }
        })
        .await;
    let (api, job) = (of(API), of(JOB));
    assert!(
        arrived,
        "the API route's and the job's traces did not arrive:\n{}\n--\n{}\n{}",
        api.dump(),
        job.dump(),
        d.outputs()
    );
    let request_of = |t: &Trace| -> Got {
        t.0.iter()
            .find(|g| g.service == "hookbus-host" && g.span.kind == SpanKind::Server as i32)
            .cloned()
            .unwrap()
    };
    let http = request_of(&api);
    assert_eq!(hex(&http.span.parent_span_id), CALLER_SPAN);
    let calls = api.children(&http, "call hello-world.greet");
    assert_eq!(calls.len(), 1, "{}", api.dump());
    assert_eq!(calls[0].span.kind, SpanKind::Client as i32);
    let served = api.children(calls[0], "handle hello-world.greet");
    assert_eq!(served.len(), 1, "{}", api.dump());
    assert_eq!(served[0].service, "hello-world");
    assert_eq!(served[0].span.kind, SpanKind::Server as i32);

    let http = request_of(&job);
    assert_eq!(hex(&http.span.parent_span_id), CALLER_SPAN);
    let sends = job.children(&http, "send pagoda.jobs.{plugin}.{task}");
    assert_eq!(sends.len(), 1, "{}", job.dump());
    assert_eq!(sends[0].span.kind, SpanKind::Producer as i32);
    assert_eq!(
        attr(&sends[0].span.attributes, "messaging.destination.name").as_deref(),
        Some("pagoda.jobs.hello-world.count")
    );
    let processed = job.children(sends[0], job_process);
    assert_eq!(processed.len(), 1, "{}", job.dump());
    assert_eq!(processed[0].service, "hello-world");
    assert_eq!(processed[0].span.kind, SpanKind::Consumer as i32);
    assert!(
        processed[0]
            .span
            .links
            .iter()
            .any(|l| l.span_id == sends[0].span.span_id),
        "the job's CONSUMER span links to the publish"
    );
}
