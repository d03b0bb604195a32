//! The reference host's HTTP layer with real sockets: header and body timeouts
//! and the connection limit (raw TCP clients), the JSON shape of every error
//! (axum's rejections included), plugin replies HTTP cannot answer, and the
//! host's `/metrics` (under the production NATS users).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use core_events::manifest::ApiRouteSpec;
use core_events::plugin_api::ApiRequest;
use core_events::{PluginManifest, Subjects};
use futures::StreamExt;
use hookbus::config::StreamSettings;
use hookbus::nats_config;
use hookbus_host::{Host, HostConfig};
use hookbus_tests::host::{TestHost, call, user_with_token};
use hookbus_tests::{NatsServer, TestDb, assert_eventually};
use pagoda_plugin_sdk::{ApiResponse as SdkResponse, FieldError, Plugin, ServeOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use store::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

/// Reads from `stream` until the server closes it (or `limit` passes); returns
/// what was read and whether it was closed.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The value of the series `series` (name and labels, exactly) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn scrape(base: &str) -> String {
    let r = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    r.text().await.unwrap()
}

/// Scrapes until `done` holds for the text (or 15 s passed); returns the last.
async fn scrape_until(base: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(base).await;
        if done(&text) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(hookbus_tests::POLL_INTERVAL).await;
    }
}

/// A slowloris header (one more header line every 100 ms) and a connection
/// that sends nothing are both closed once the header timeout is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_missing_request_headers_are_cut_after_the_header_timeout() {
    let nats = NatsServer::start().await;
    let db = TestDb::sqlite();
    let host = TestHost::start_with(&nats, &db, |c| {
        c.http.header_timeout = Duration::from_millis(500);
    })
    .await;

    let mut idle = TcpStream::connect(host.host.addr()).await.unwrap();
    let mut slow = TcpStream::connect(host.host.addr()).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            tokio::select! {
                read = slow.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => panic!("the slow header got an answer"),
                },
                _ = tick.tick() => {
                    if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    assert!(closed.is_ok(), "the slowloris connection is still open");
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(10),
        "cut after {elapsed:?}"
    );
    let (text, closed) = read_to_close(&mut idle, WAIT).await;
    assert!(
        closed && text.is_empty(),
        "idle connection: {closed} {text:?}"
    );

    // The cut connections are counted (just after they close).
    let series = r#"hookbus_host_http_timeouts_total{kind="header"}"#;
    let text = scrape_until(&host.base, |t| sample(t, series) == Some(2.0)).await;
    assert_eq!(sample(&text, series), Some(2.0), "{text}");
    host.stop().await;
}

/// A body announced as 1,000 bytes of which 10 arrive: 408 JSON and the
/// connection closed once the body timeout is up, on a model route and on a
/// task route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_answered_408_json_after_the_body_timeout() {
    let nats = NatsServer::start().await;
    let db = TestDb::sqlite();
    let host = TestHost::start_with(&nats, &db, |c| {
        c.http.body_timeout = Duration::from_millis(500);
    })
    .await;
    let (status, entity) = call(
        host.as_admin(Method::POST, "/api/v2/entities/")
            .json(&json!({"name": "customer"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{entity}");
    for path in [
        format!("/api/v2/entities/{}/entries/", entity["id"]),
        "/api/v2/plugins/any/tasks/any/".to_owned(),
        "/api/v2/tokens/".to_owned(),
    ] {
        let mut stream = TcpStream::connect(host.host.addr()).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"name\": \"",
            host.user_token
        );
        let started = Instant::now();
        stream.write_all(head.as_bytes()).await.unwrap();
        let (text, closed) = read_to_close(&mut stream, WAIT).await;
        let elapsed = started.elapsed();
        assert!(closed, "{path}: the connection stays open: {text}");
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{text}"
        );
        let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"], "request_timeout", "{body}");
        assert_eq!(body["timeout_ms"], 500);
        assert!(
            elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(10),
            "{path}: answered after {elapsed:?}"
        );
    }
    let series = r#"hookbus_host_http_timeouts_total{kind="body"}"#;
    let text = scrape_until(&host.base, |t| sample(t, series) == Some(3.0)).await;
    assert_eq!(sample(&text, series), Some(3.0), "{text}");
    host.stop().await;
}

/// More idle connections than the limit: the host keeps at most the limit open,
/// closes the idle ones at the header timeout, and an authenticated request
/// waiting behind them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_limit_do_not_lock_out_a_client() {
    let nats = NatsServer::start().await;
    let db = TestDb::sqlite();
    let host = TestHost::start_with(&nats, &db, |c| {
        c.http.max_connections = 3;
        c.http.header_timeout = Duration::from_secs(1);
    })
    .await;
    let metrics = std::sync::Arc::clone(&host.state().metrics);
    assert_eq!(metrics.connection_limit.get(), 3);
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(host.host.addr()).await.unwrap());
    }
    assert_eventually!(metrics.connections.get() == 3, WAIT, "3 connections served");

    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let response = client
        .get(host.url("/api/v2/users/me/"))
        .header("Authorization", format!("Token {}", host.user_token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        metrics.connections.get() <= 3,
        "{}",
        metrics.connections.get()
    );
    for (n, stream) in idle.iter_mut().enumerate() {
        let (text, closed) = read_to_close(stream, WAIT).await;
        assert!(closed && text.is_empty(), "idle connection {n}: {text:?}");
    }
    host.stop().await;
}

fn assert_json_error(
    what: &str,
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    text: &str,
) {
    let content_type = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {status} with content-type {content_type:?}: {text}"
    );
    let body: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
    assert!(
        body["error"].is_string() && body["message"].is_string(),
        "{what}: {body}"
    );
}

/// Every error the host answers is the documented JSON: its handlers' and the
/// HTTP layer's (body limit, unreadable path or query, missing token, unknown
/// path or method, malformed body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_including_the_http_layers() {
    let nats = NatsServer::start().await;
    let db = TestDb::sqlite();
    let host = TestHost::start_with(&nats, &db, |c| c.max_body_bytes = 1024).await;
    let big = "x".repeat(2000);
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode)> = vec![
        (
            "over the body limit on a task route",
            host.as_user(Method::POST, "/api/v2/plugins/p/tasks/t/")
                .header("Content-Type", "application/json")
                .body(format!("{{\"a\": \"{big}\"}}")),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "over the body limit on an entity route",
            host.as_admin(Method::POST, "/api/v2/entities/")
                .json(&json!({"name": big})),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "a path id that is not UTF-8",
            host.as_user(Method::GET, "/api/v2/entries/%FF/"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a task path that is not UTF-8",
            host.as_user(Method::POST, "/api/v2/plugins/%FF/tasks/t/"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a user id that is not UTF-8",
            host.as_admin(Method::GET, "/api/v2/users/%FF/"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a query that does not parse",
            host.as_user(Method::GET, "/api/v2/jobs/?limit=many"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "malformed JSON",
            host.as_user(Method::POST, "/api/v2/tokens/")
                .header("Content-Type", "application/json")
                .body("{\"name\": "),
            StatusCode::BAD_REQUEST,
        ),
        (
            "no content type",
            host.as_user(Method::POST, "/api/v2/tokens/").body("name=x"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "no token",
            host.client.get(host.url("/api/v2/entities/")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "an unknown path",
            host.as_user(Method::GET, "/api/v2/nothing/"),
            StatusCode::NOT_FOUND,
        ),
        (
            "a method the path does not take",
            host.as_user(Method::PUT, "/api/v2/jobs/"),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "a method the task path does not take",
            host.as_user(Method::GET, "/api/v2/plugins/p/tasks/t/"),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "an unknown method",
            host.as_user(Method::from_bytes(b"BREW").unwrap(), "/api/v2/entities/"),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (what, request, expected) in cases {
        let r = request.send().await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        let text = r.text().await.unwrap();
        assert_eq!(status, expected, "{what}: {text}");
        assert_json_error(what, status, &headers, &text);
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(body["error"], "payload_too_large", "{what}");
            assert_eq!(body["limit"], 1024, "{what}");
        }
    }
    host.stop().await;
}

/// A raw-protocol plugin answering each route with a fixed reply.
async fn raw_plugin(
    client: &async_nats::Client,
    replies: &[(&str, &'static str)],
) -> tokio::task::JoinHandle<()> {
    hookbus::provision::provision(
        &jetstream::new(client.clone()),
        &Subjects::default(),
        &StreamSettings::default(),
    )
    .await
    .unwrap();
    let mut manifest = PluginManifest::new("raw", "Raw", "1.0.0");
    for (route, _) in replies {
        manifest
            .api
            .push(ApiRouteSpec::new(*route, "GET", format!("/{route}")));
    }
    let kv = jetstream::new(client.clone())
        .get_key_value(Subjects::default().registry_bucket())
        .await
        .unwrap();
    kv.put(
        manifest.registry_key(),
        serde_json::to_vec(&manifest).unwrap().into(),
    )
    .await
    .unwrap();
    let replies: std::collections::HashMap<String, &'static str> =
        replies.iter().map(|(r, b)| ((*r).to_owned(), *b)).collect();
    let mut subscriber = client
        .queue_subscribe("pagoda.api.raw.*", "raw".into())
        .await
        .unwrap();
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            let request: ApiRequest = serde_json::from_slice(&message.payload).unwrap();
            let reply = replies[&request.route];
            responder
                .publish(message.reply.unwrap(), Bytes::from_static(reply.as_bytes()))
                .await
                .unwrap();
        }
    })
}

/// Plugin replies HTTP cannot carry (an interim 1xx status, a body with 204 or
/// 304, a status out of range) are answered 502 JSON naming the plugin and the
/// reason, at once; a 204 without a body is sent without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_replies_http_cannot_answer_get_502_naming_the_plugin() {
    let nats = NatsServer::start().await;
    let db = TestDb::sqlite();
    let client = nats.connect().await;
    let serving = raw_plugin(
        &client,
        &[
            ("switching", r#"{"status": 101, "body": "upgrade"}"#),
            ("continue", r#"{"status": 100}"#),
            ("nocontent", r#"{"status": 204, "body": {"a": 1}}"#),
            ("notmodified", r#"{"status": 304, "body": "x"}"#),
            ("low", r#"{"status": 99}"#),
            ("empty", r#"{"status": 204}"#),
        ],
    )
    .await;
    let host = TestHost::start(&nats, &db, &["raw"]).await;
    host.wait_registered(&["raw"]).await;
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    for (route, status) in [
        ("switching", "101"),
        ("continue", "100"),
        ("nocontent", "204"),
        ("notmodified", "304"),
        ("low", "99"),
    ] {
        let r = http
            .get(host.url(&format!("/api/v2/plugins/raw/{route}")))
            .header("Authorization", format!("Token {}", host.user_token))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{route}: {e}"));
        let (code, headers) = (r.status(), r.headers().clone());
        let text = r.text().await.unwrap();
        assert_eq!(code, StatusCode::BAD_GATEWAY, "{route}: {text}");
        assert_json_error(route, code, &headers, &text);
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["error"], "plugin_bad_reply", "{body}");
        assert_eq!(body["plugin_id"], "raw", "{body}");
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.contains(status), "{route}: {reason}");
        assert!(body["message"].as_str().unwrap().contains("raw"), "{body}");
    }
    let r = http
        .get(host.url("/api/v2/plugins/raw/empty"))
        .header("Authorization", format!("Token {}", host.user_token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(
        r.headers().get("content-length").is_none(),
        "{:?}",
        r.headers()
    );
    assert!(
        r.headers().get("content-type").is_none(),
        "{:?}",
        r.headers()
    );
    assert_eq!(r.bytes().await.unwrap().len(), 0);
    serving.abort();
    host.stop().await;
}

/// `/metrics` after an entry write (one sync hook call, one batch), a plugin
/// route call and a few failed requests, with the host and the plugin on their
/// production NATS users: the series and their counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_serves_metrics_of_requests_hooks_routes_batches_and_the_relay() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        host_metrics(backend).await;
    }
}

async fn host_metrics(backend: Backend) {
    let server = common::start_server(&["checker"]).await;
    let db = TestDb::new(backend).await;
    let (bus_client, _) = common::connect(&server, nats_config::BUS_USER).await;
    hookbus::provision::provision(
        &jetstream::new(bus_client.clone()),
        &Subjects::default(),
        &StreamSettings::default(),
    )
    .await
    .unwrap();
    let (plugin_client, mut plugin_errors) = common::connect(&server, "checker").await;
    let plugin = Plugin::builder("checker", "Checker", "1.0.0")
        .on_validate("named", |ctx| async move {
            Ok(if ctx.request.entry.name.is_empty() {
                vec![FieldError::field("name", "empty")]
            } else {
                vec![]
            })
        })
        .api_route("whoami", "GET", "/whoami", |ctx| async move {
            Ok(SdkResponse::ok(
                json!({"user": ctx.user().map(|u| u.username.clone())}),
            ))
        })
        .build()
        .unwrap();
    let running = plugin
        .serve(plugin_client.clone(), ServeOptions::default())
        .await
        .unwrap();
    let (host_client, mut host_errors) = common::connect(&server, nats_config::HOST_USER).await;
    let mut config = HostConfig::new(db.url());
    config.listen = ([127, 0, 0, 1], 0).into();
    config.enabled_plugins = vec!["checker".into()];
    let host = Host::start(host_client, config).await.unwrap();
    host.state()
        .registry
        .wait_for(WAIT, |t| t.is_enabled("checker"))
        .await
        .unwrap();
    let (_, admin) = user_with_token(&host.state().store, "admin", true).await;
    let base = format!("http://{}", host.addr());
    let http = reqwest::Client::new();
    let auth = format!("Token {admin}");
    let send = |method: Method, path: &str| {
        http.request(method, format!("{base}{path}"))
            .header("Authorization", &auth)
    };

    let (status, entity) =
        call(send(Method::POST, "/api/v2/entities/").json(&json!({"name": "customer"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{entity}");
    let entries = format!("/api/v2/entities/{}/entries/", entity["id"]);
    let (status, entry) = call(send(Method::POST, &entries).json(&json!({"name": "ann"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{backend:?}: {entry}");
    let (status, me) = call(send(Method::GET, "/api/v2/plugins/checker/whoami")).await;
    assert_eq!(
        (status, me["user"].as_str()),
        (StatusCode::OK, Some("admin"))
    );
    let (status, _) = call(send(
        Method::GET,
        &format!("/api/v2/entries/{}/", entry["id"]),
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(send(Method::GET, "/api/v2/entries/999999/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(send(Method::GET, "/api/v2/no/such/path/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The relay publishes the two events: its backlog reads 0 again.
    let expected = [
        (
            r#"hookbus_host_http_requests_total{method="POST",route="/api/v2/entities/{id}/entries/",status="201"}"#,
            1.0,
        ),
        (
            r#"hookbus_host_http_requests_total{method="POST",route="/api/v2/entities/",status="201"}"#,
            1.0,
        ),
        (
            r#"hookbus_host_http_requests_total{method="GET",route="/api/v2/entries/{id}/",status="200"}"#,
            1.0,
        ),
        (
            r#"hookbus_host_http_requests_total{method="GET",route="/api/v2/entries/{id}/",status="404"}"#,
            1.0,
        ),
        (
            r#"hookbus_host_http_requests_total{method="GET",route="unmatched",status="404"}"#,
            1.0,
        ),
        (
            r#"hookbus_host_http_requests_total{method="GET",route="/api/v2/plugins/{plugin}/{*path}",status="200"}"#,
            1.0,
        ),
        (
            r#"hookbus_host_http_request_duration_seconds_count{method="GET",route="/api/v2/entries/{id}/"}"#,
            2.0,
        ),
        (
            r#"hookbus_sync_hook_calls_total{hook="entry.validate",plugin="checker",handler="named",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"hookbus_sync_hook_duration_seconds_count{hook="entry.validate",plugin="checker",handler="named"}"#,
            1.0,
        ),
        (
            r#"hookbus_plugin_api_requests_total{plugin="checker",route="whoami",status="200"}"#,
            1.0,
        ),
        (
            r#"hookbus_plugin_api_duration_seconds_count{plugin="checker",route="whoami"}"#,
            1.0,
        ),
        ("hookbus_host_entry_batch_size_count", 1.0),
        ("hookbus_host_entry_batch_size_sum", 1.0),
        ("hookbus_relay_backlog_rows", 0.0),
    ];
    let text = scrape_until(&base, |text| {
        expected
            .iter()
            .all(|(series, value)| sample(text, series) == Some(*value))
    })
    .await;
    for (series, value) in expected {
        assert_eq!(sample(&text, series), Some(value), "{series}\n{text}");
    }
    assert!(
        text.contains("hookbus_relay_oldest_row_age_seconds"),
        "{text}"
    );
    let limit = host.state().metrics.connection_limit.get();
    assert!(limit > 0);
    assert_eq!(
        sample(&text, "hookbus_host_http_connection_limit"),
        Some(limit as f64)
    );

    running.shutdown().await.unwrap();
    host.stop().await;
    for (who, errors) in [("checker", &mut plugin_errors), ("host", &mut host_errors)] {
        if let Ok(e) = errors.try_recv() {
            panic!("{who} got a server error with its own permissions: {e}");
        }
    }
}

/// `hookbus host` refuses a zero timeout at once, naming the flag (no NATS or
/// database needed to find out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookbus_host_refuses_zero_http_timeouts() {
    for flag in ["--http-header-timeout", "--http-body-timeout"] {
        let out = tokio::process::Command::new(hookbus_tests::hookbus_binary())
            .args(["host", flag, "0s", "--nats-url", "nats://127.0.0.1:1"])
            .env_remove("HOOKBUS_HTTP_HEADER_TIMEOUT")
            .env_remove("HOOKBUS_HTTP_BODY_TIMEOUT")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("must be more than 0"),
            "{flag}: {stderr}"
        );
    }
}
