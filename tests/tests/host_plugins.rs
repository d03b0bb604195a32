//! Plugin API routes through the reference host (real nats-server, real SQLite,
//! real HTTP): SDK plugins and a hand-written raw-protocol plugin answer
//! `/api/v2/plugins/<id>/…`; authentication, plugin failures, limits; and
//! `PLUGIN_OPERATION_ID_CONFIG` checked by the real `hookbus host` binary.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use core_events::manifest::{ApiRouteSpec, TaskSpec};
use core_events::plugin_api::{ApiRequest, ApiResponse};
use core_events::protocol::headers;
use core_events::{PluginManifest, Subjects};
use futures::StreamExt;
use hookbus::config::StreamSettings;
use hookbus_tests::ServeOn;
use hookbus_tests::host::TestHost;
use hookbus_tests::{NatsServer, TestDb, free_port, hookbus_binary, poll_until};
use pagoda_plugin_sdk::{ApiResponse as SdkResponse, ApiRoute, HandlerError, Plugin, ServeOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Creates the streams and buckets (as the host and the bus do) so plugins can
/// register before the host starts.
async fn provision(client: &async_nats::Client) {
    hookbus::provision::provision(
        &jetstream::new(client.clone()),
        &Subjects::default(),
        &StreamSettings::default(),
    )
    .await
    .unwrap();
}

/// Puts a manifest in the registry bucket directly, as a plugin in any language does.
async fn register(client: &async_nats::Client, manifest: &PluginManifest) {
    let kv = jetstream::new(client.clone())
        .get_key_value(Subjects::default().registry_bucket())
        .await
        .unwrap();
    kv.put(
        manifest.registry_key(),
        serde_json::to_vec(manifest).unwrap().into(),
    )
    .await
    .unwrap();
}

async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// The SDK plugin `greeter`: one route of each kind; counts calls to `whoami`.
fn greeter(calls: Arc<AtomicUsize>) -> Plugin {
    Plugin::builder("greeter", "Greeter", "1.0.0")
        .api_route("whoami", "GET", "/whoami", move |ctx| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(SdkResponse::ok(json!({
                    "user": ctx.user().map(|u| u.username.clone()),
                    "query": ctx.request.query,
                    "accept": ctx.header("accept"),
                    "authorization": ctx.header("authorization"),
                })))
            }
        })
        .api_route("echo", "POST", "/echo/{name}", |ctx| async move {
            let mut response = SdkResponse::with_status(
                201,
                json!({"name": ctx.param("name"), "body": ctx.body(), "path": ctx.path()}),
            );
            response.headers.insert("X-Plugin".into(), "greeter".into());
            response
                .headers
                .insert("Transfer-Encoding".into(), "chunked".into());
            Ok(response)
        })
        .api_route(
            ApiRoute::named("ping").public(),
            "GET",
            "/ping",
            |ctx| async move {
                Ok(SdkResponse::ok(
                    json!({"pong": true, "user": ctx.user().map(|u| u.username.clone())}),
                ))
            },
        )
        .api_route("fail", "GET", "/fail", |_ctx| async move {
            Err(HandlerError::permanent("no widgets today"))
        })
        .api_route(
            ApiRoute::named("slow").timeout(Duration::from_millis(300)),
            "GET",
            "/slow",
            |_ctx| async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(SdkResponse::ok(json!("late")))
            },
        )
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_routes_are_forwarded_with_authentication_and_plugin_failures_mapped() {
    let server = NatsServer::start().await;
    let db = TestDb::sqlite();
    let client = server.connect().await;
    provision(&client).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let plugin = greeter(calls.clone());
    let running = plugin
        .serve_on(&server, ServeOptions::default())
        .await
        .unwrap();
    // `hidden` is registered but not in ENABLED_PLUGINS.
    let mut hidden = PluginManifest::new("hidden", "Hidden", "1.0.0");
    hidden.api.push(ApiRouteSpec::new("x", "GET", "/x"));
    register(&client, &hidden).await;
    let host = TestHost::start(&server, &db, &["greeter"]).await;
    host.wait_registered(&["greeter"]).await;
    host.state()
        .registry
        .wait_for(Duration::from_secs(10), |t| {
            t.plugins().contains_key("hidden")
        })
        .await
        .unwrap();

    // With a token: 200, the user arrives, the query is parsed, only forwarded
    // headers travel (never Authorization).
    let (status, body) = json_of(
        host.as_user(
            Method::GET,
            "/api/v2/plugins/greeter/whoami?x=1&y=a%20b&x=2",
        )
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"], "user");
    assert_eq!(body["query"], json!({"x": "2", "y": "a b"}));
    assert_eq!(body["accept"], "application/json");
    assert_eq!(body["authorization"], Value::Null);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Without a token, or with a wrong one: 401 and the plugin is not called.
    let response = host
        .client
        .get(host.url("/api/v2/plugins/greeter/whoami"))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "not_authenticated");
    let (status, _) = json_of(
        host.request(Method::GET, "/api/v2/plugins/greeter/whoami", "nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the plugin must not be called"
    );

    // A public route answers without a token (user null), and with one.
    let (status, body) = json_of(
        host.client
            .get(host.url("/api/v2/plugins/greeter/ping"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"pong": true, "user": null}));
    let (_, body) = json_of(
        host.as_admin(Method::GET, "/api/v2/plugins/greeter/ping/")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["user"], "admin");

    // Status, headers and body come from the plugin; hop-by-hop headers do not.
    let response = host
        .as_user(Method::POST, "/api/v2/plugins/greeter/echo/ada/")
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-plugin"], "greeter");
    assert!(response.headers().get("transfer-encoding").is_none());
    assert_eq!(response.headers()["content-type"], "application/json");
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body,
        json!({"name": "ada", "body": {"n": 1}, "path": "/echo/ada/"})
    );
    // A non-JSON body travels as a string; broken JSON is refused.
    let (_, body) = json_of(
        host.as_user(Method::POST, "/api/v2/plugins/greeter/echo/ada")
            .header("Content-Type", "text/plain")
            .body("hello")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["body"], "hello");
    let (status, body) = json_of(
        host.as_user(Method::POST, "/api/v2/plugins/greeter/echo/ada")
            .header("Content-Type", "application/json")
            .body("{nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );
    // Read like every request body: nesting past the limit is refused by field.
    let (status, body) = json_of(
        host.as_user(Method::POST, "/api/v2/plugins/greeter/echo/ada")
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"a": {}1{}}}"#, "[".repeat(40), "]".repeat(40)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["errors"][0].as_str().unwrap(),
        "field 'a[0][0]' nests arrays and objects deeper than 32 levels (the limit, counting the whole document as level 1)",
        "{body}"
    );

    // Oversized body: 413 before anything is forwarded. (The host does not read
    // the rest, so it closes that connection: a client of its own.)
    let big = "x".repeat(300 * 1024);
    let (status, body) = json_of(
        reqwest::Client::new()
            .post(host.url("/api/v2/plugins/greeter/echo/ada"))
            .header("Authorization", format!("Token {}", host.user_token))
            .header("Content-Type", "text/plain")
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    // A plugin error: 400 plugin_error with the message and the plugin id.
    let (status, body) = json_of(
        host.as_user(Method::GET, "/api/v2/plugins/greeter/fail")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "plugin_error");
    assert_eq!(body["plugin_id"], "greeter");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no widgets today"),
        "{body}"
    );

    // A slow plugin: 504 once the route's 300 ms are up, not after its 3 s.
    let started = Instant::now();
    let (status, body) = json_of(
        host.as_user(Method::GET, "/api/v2/plugins/greeter/slow")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"], "plugin_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // 404: unknown plugin, disabled plugin, unknown route, wrong method.
    for (method, path) in [
        (Method::GET, "/api/v2/plugins/nobody/whoami"),
        (Method::GET, "/api/v2/plugins/hidden/x"),
        (Method::GET, "/api/v2/plugins/greeter/nothing"),
        (Method::DELETE, "/api/v2/plugins/greeter/whoami"),
        (Method::GET, "/api/v2/plugins/greeter/tasks/anything"),
    ] {
        let (status, body) =
            json_of(host.as_user(method.clone(), path).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(body["error"], "not_found", "{method} {path}");
    }

    // The plugin goes away: 503 plugin_unavailable (its manifest stays registered).
    running.shutdown().await.unwrap();
    // Once the server has seen the endpoints go (a flush round-trips after the
    // unsubscribes), a request finds no responders.
    client.flush().await.unwrap();
    let (status, body) = json_of(
        host.as_user(Method::GET, "/api/v2/plugins/greeter/whoami")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "plugin_unavailable");
    assert_eq!(body["plugin_id"], "greeter");
    host.stop().await;
}

/// A plugin written against the raw protocol: its manifest put in the registry
/// bucket, a plain queue subscription answering `ApiRequest`s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_protocol_plugin_answers_and_bad_replies_are_refused() {
    let server = NatsServer::start().await;
    let db = TestDb::sqlite();
    let client = server.connect().await;
    provision(&client).await;
    let mut manifest = PluginManifest::new("raw", "Raw", "1.0.0");
    manifest
        .api
        .push(ApiRouteSpec::new("items", "GET", "/items/{id}"));
    manifest.api.push(ApiRouteSpec::new("bad", "GET", "/bad"));
    manifest.api.push(ApiRouteSpec::new("oops", "GET", "/oops"));
    register(&client, &manifest).await;
    let subjects = Subjects::default();
    let mut subscriber = client
        .queue_subscribe(format!("{}.api.raw.*", subjects.prefix()), "raw".into())
        .await
        .unwrap();
    let responder = client.clone();
    let serving = tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            let request: ApiRequest = serde_json::from_slice(&message.payload).unwrap();
            let reply = message.reply.unwrap();
            match request.route.as_str() {
                "items" => {
                    let body = ApiResponse::ok(json!({
                        "path": request.path,
                        "user": request.user.map(|u| u.username),
                    }));
                    responder
                        .publish(reply, serde_json::to_vec(&body).unwrap().into())
                        .await
                        .unwrap();
                }
                "bad" => {
                    responder
                        .publish(reply, Bytes::from_static(br#"{"status": 99}"#))
                        .await
                        .unwrap();
                }
                _ => {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert(headers::SERVICE_ERROR, "database is down");
                    h.insert(headers::SERVICE_ERROR_CODE, "500");
                    responder
                        .publish_with_headers(reply, h, Bytes::new())
                        .await
                        .unwrap();
                }
            }
        }
    });
    let host = TestHost::start(&server, &db, &["raw"]).await;
    host.wait_registered(&["raw"]).await;

    let (status, body) = json_of(
        host.as_user(Method::GET, "/api/v2/plugins/raw/items/42")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"path": "/items/42", "user": "user"}));

    let (status, body) = json_of(
        host.as_user(Method::GET, "/api/v2/plugins/raw/bad")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "plugin_bad_reply", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("status 99"),
        "{body}"
    );

    let (status, body) = json_of(
        host.as_user(Method::GET, "/api/v2/plugins/raw/oops")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body,
        json!({"error": "plugin_error", "message": "database is down", "plugin_id": "raw"})
    );

    // No replica at all: 503 at once.
    serving.abort();
    let _ = serving.await;
    client.flush().await.unwrap();
    let unavailable = poll_until(Duration::from_secs(10), || async {
        let r = host
            .as_user(Method::GET, "/api/v2/plugins/raw/items/1")
            .send()
            .await
            .unwrap();
        r.status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(unavailable, "a plugin without replicas must answer 503");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_routes_are_rate_limited_per_token() {
    let server = NatsServer::start().await;
    let db = TestDb::sqlite();
    let client = server.connect().await;
    provision(&client).await;
    let running = greeter(Arc::new(AtomicUsize::new(0)))
        .serve_on(&server, ServeOptions::default())
        .await
        .unwrap();
    let host = TestHost::start_with(&server, &db, |c| {
        c.enabled_plugins = vec!["greeter".into()];
        c.plugin_rate_per_sec = 1;
        c.plugin_rate_burst = 3;
    })
    .await;
    host.wait_registered(&["greeter"]).await;

    for n in 0..3 {
        let status = host
            .as_user(Method::GET, "/api/v2/plugins/greeter/whoami")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK, "request {n} is within the burst");
    }
    let response = host
        .as_user(Method::GET, "/api/v2/plugins/greeter/whoami")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1).contains(&retry), "Retry-After {retry}");
    let (_, body) = json_of(response).await;
    assert_eq!(body["error"], "rate_limited");
    // Another token has its own bucket.
    let status = host
        .as_admin(Method::GET, "/api/v2/plugins/greeter/whoami")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    // Anonymous calls of a public route have a bucket of their own (per client
    // address), limited the same way.
    let mut anonymous = Vec::new();
    for _ in 0..4 {
        anonymous.push(
            host.client
                .get(host.url("/api/v2/plugins/greeter/ping"))
                .send()
                .await
                .unwrap()
                .status(),
        );
    }
    assert_eq!(
        anonymous,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    // After the wait, the first token may call again.
    let recovered = poll_until(Duration::from_secs(5), || async {
        host.as_user(Method::GET, "/api/v2/plugins/greeter/whoami")
            .send()
            .await
            .unwrap()
            .status()
            == StatusCode::OK
    })
    .await;
    assert!(recovered);
    running.shutdown().await.unwrap();
    host.stop().await;
}

// ---------------------------------------------------------------------------
// PLUGIN_OPERATION_ID_CONFIG through the real `hookbus host` binary.

/// Registers `tasks` (`a`: t0 offset 0, t1 offset 20; `b`: v offset 5; `c`: none).
async fn register_task_plugins(client: &async_nats::Client) {
    let with_tasks = |id: &str, tasks: &[(&str, u32)]| {
        let mut m = PluginManifest::new(id, id, "1.0.0");
        m.tasks = tasks.iter().map(|(n, o)| TaskSpec::new(*n, *o)).collect();
        m
    };
    register(client, &with_tasks("a", &[("t0", 0), ("t1", 20)])).await;
    register(client, &with_tasks("b", &[("v", 5)])).await;
    register(client, &with_tasks("c", &[])).await;
}

/// Runs `hookbus host` with `config`; returns its exit (None: still running after
/// answering /healthz, then stopped) and its stderr.
async fn run_host(server: &NatsServer, db: &TestDb, config: &str) -> (Option<i32>, String) {
    let port = free_port();
    let mut child = tokio::process::Command::new(hookbus_binary())
        .arg("host")
        .envs(server.env_for(hookbus_tests::HOST_USER))
        .env("HOOKBUS_DATABASE_URL", db.url())
        .env("HOOKBUS_HOST_LISTEN", format!("127.0.0.1:{port}"))
        .env("ENABLED_PLUGINS", "a,b,c")
        .env("PLUGIN_OPERATION_ID_CONFIG", config)
        .env("HOOKBUS_PLUGIN_WAIT", "2s")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let collect = tokio::spawn(async move {
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text)
            .await
            .unwrap();
        text
    });
    let url = format!("http://127.0.0.1:{port}/healthz");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), collect.await.unwrap());
        }
        if let Ok(r) = http.get(&url).send().await
            && r.status().is_success()
        {
            child.kill().await.unwrap();
            return (None, collect.await.unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "hookbus host neither exited nor answered /healthz within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_id_configuration_is_checked_at_start_up() {
    let server = NatsServer::start().await;
    let db = TestDb::sqlite();
    let client = server.connect().await;
    provision(&client).await;
    register_task_plugins(&client).await;

    let cases = [
        (
            r#"{"a": [300, 399], "e": "x"}"#,
            vec!["Operation ID range for plugin 'e' must be a tuple of (start: int, end: int)"],
        ),
        (
            r#"{"a": [300, 399], "d": [1000, 1001]}"#,
            vec!["Plugin 'd' is configured in PLUGIN_OPERATION_ID_CONFIG but not registered"],
        ),
        (
            r#"{"a": [300, 399], "c": [100, 50]}"#,
            vec![
                "Operation ID range (100, 50) for plugin 'c' is invalid. Range must be within 200-9999 and start <= end.",
            ],
        ),
        (
            r#"{"a": [300, 309]}"#,
            vec![
                "Offset 20 for operation 't1' in plugin 'a' exceeds range size 10. Range: 300-309",
            ],
        ),
        (
            r#"{"a": [300, 399], "b": [295, 400]}"#,
            vec!["Operation ID 300 for operation 'v' in plugin 'b' is already in use."],
        ),
        // Several problems: all of them at once.
        (
            r#"{"a": [300, 309], "b": [295, 400], "c": [100, 50], "d": [1000, 1001], "e": "x"}"#,
            vec![
                "Offset 20 for operation 't1' in plugin 'a' exceeds range size 10. Range: 300-309",
                "Operation ID 300 for operation 'v' in plugin 'b' is already in use.",
                "Operation ID range (100, 50) for plugin 'c' is invalid. Range must be within 200-9999 and start <= end.",
                "Plugin 'd' is configured in PLUGIN_OPERATION_ID_CONFIG but not registered",
                "Operation ID range for plugin 'e' must be a tuple of (start: int, end: int)",
            ],
        ),
    ];
    for (config, messages) in cases {
        let (code, stderr) = run_host(&server, &db, config).await;
        assert!(
            matches!(code, Some(c) if c != 0),
            "{config}: expected a failed start, got {code:?}; stderr:\n{stderr}"
        );
        for m in &messages {
            assert!(
                stderr.contains(m),
                "{config}: missing {m:?} in stderr:\n{stderr}"
            );
        }
    }

    let (code, stderr) = run_host(&server, &db, r#"{"a": [300, 399], "b": [400, 499]}"#).await;
    assert_eq!(
        code, None,
        "a valid configuration starts; stderr:\n{stderr}"
    );
}

/// Start-up waits (boundedly) for configured, enabled plugins to register: one
/// that never comes is "not registered" after the wait; one that registers
/// during the wait gets its operation ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_for_configured_plugins_then_checks_them() {
    use hookbus_host::{Host, HostConfig, HostError};

    hookbus_tests::init_tracing();
    let server = NatsServer::start().await;
    let db = TestDb::sqlite();
    let client = server.connect().await;
    provision(&client).await;
    let config = |enabled: &str, ops: &str| {
        let mut c = HostConfig::new(db.url());
        c.listen = ([127, 0, 0, 1], 0).into();
        c.enabled_plugins = vec![enabled.to_owned()];
        c.operation_id_config = ops.to_owned();
        c.plugin_wait = Duration::from_millis(1500);
        c
    };

    let started = Instant::now();
    let err = Host::start(
        server.connect_as(hookbus_tests::HOST_USER).await,
        config("ghost", r#"{"ghost": [300, 310]}"#),
    )
    .await
    .unwrap_err();
    let waited = started.elapsed();
    let HostError::OperationIds(problems) = &err else {
        panic!("expected OperationIds, got {err}");
    };
    assert_eq!(
        problems,
        &["Plugin 'ghost' is configured in PLUGIN_OPERATION_ID_CONFIG but not registered"]
    );
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "waited {waited:?}"
    );

    // The plugin registers while the host waits.
    let late = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut m = PluginManifest::new("late", "Late", "1.0.0");
            m.tasks.push(TaskSpec::new("t", 4));
            register(&client, &m).await;
        })
    };
    let mut c = config("late", r#"{"late": [700, 799]}"#);
    c.plugin_wait = Duration::from_secs(10);
    let started = Instant::now();
    let host = Host::start(server.connect_as(hookbus_tests::HOST_USER).await, c)
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    late.await.unwrap();
    assert_eq!(host.state().operation_ids.get("late", "t"), Some(704));
    host.stop().await;
}
