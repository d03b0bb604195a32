//! Shared pieces of the end-to-end tests: an in-process bus and hand-written
//! plugins that answer on the real protocol (plain queue subscriptions, no SDK),
//! recording every delivery they get.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    unreachable_pub,
    missing_docs
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::service::error::Error as ServiceError;
use bytes::Bytes;
use core_events::protocol::headers;
use core_events::{HandlerSpec, Hook, PluginManifest, Subjects};
use futures::StreamExt;
use hookbus::config::BusConfig;
use hookbus::run::Bus;
use tokio::task::JoinHandle;

/// Bus settings for tests: short ack wait and polls so crash tests run quickly.
pub fn test_config(enabled: &[&str]) -> BusConfig {
    let mut config = BusConfig {
        enabled_plugins: enabled.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    };
    config.dispatcher.ack_wait = Duration::from_secs(2);
    config.dispatcher.deferred_poll = Duration::from_millis(50);
    config.dispatcher.shutdown_grace = Duration::from_secs(2);
    config
}

/// Starts an in-process bus connected as the bus's own user ([`hookbus_tests::BUS_USER`]).
pub async fn start_bus(server: &hookbus_tests::NatsServer, enabled: &[&str]) -> Bus {
    Bus::start(
        server.connect_as(hookbus_tests::BUS_USER).await,
        test_config(enabled),
    )
    .await
    .unwrap()
}

/// Starts an in-process bus on `client` (a client of the bus's user the test
/// made itself, e.g. to watch its permission errors).
pub async fn start_bus_on(client: &async_nats::Client, enabled: &[&str]) -> Bus {
    Bus::start(client.clone(), test_config(enabled))
        .await
        .unwrap()
}

/// One delivery a test plugin received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub plugin: String,
    pub handler: String,
    pub event_id: String,
    pub object: String,
    pub entity_token: String,
    pub seq: u64,
    pub attempt: u32,
    /// Which replica answered.
    pub replica: usize,
}

/// A log of calls shared by all test plugins of a test, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct CallLog(Arc<Mutex<Vec<Call>>>);

impl CallLog {
    pub fn all(&self) -> Vec<Call> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn of(&self, plugin: &str) -> Vec<Call> {
        self.all()
            .into_iter()
            .filter(|c| c.plugin == plugin)
            .collect()
    }

    pub fn count(&self, plugin: &str, handler: &str) -> usize {
        self.all()
            .iter()
            .filter(|c| c.plugin == plugin && c.handler == handler)
            .count()
    }

    /// How many different events `calls` are about (redeliveries count once).
    pub fn distinct_events(calls: &[Call]) -> usize {
        calls
            .iter()
            .map(|c| c.event_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    fn push(&self, call: Call) {
        self.0.lock().unwrap().push(call);
    }
}

/// What a test handler answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Ok,
    /// A Services API error with this code.
    Fail(u16),
    /// A reply body that is not the protocol's.
    Garbage,
    /// Waits, then answers OK.
    Slow(Duration),
}

/// A hand-written plugin: a manifest and one queue subscription per handler.
pub struct TestPlugin {
    pub manifest: PluginManifest,
    pub behaviour: Arc<Mutex<std::collections::HashMap<String, Behaviour>>>,
    pub log: CallLog,
    replicas: Vec<Vec<JoinHandle<()>>>,
    subjects: Subjects,
}

impl TestPlugin {
    pub fn new(id: &str, log: &CallLog) -> Self {
        TestPlugin {
            manifest: PluginManifest::new(id, format!("Test plugin {id}"), "1.0.0"),
            behaviour: Arc::default(),
            log: log.clone(),
            replicas: Vec::new(),
            subjects: Subjects::default(),
        }
    }

    /// Adds a handler (builder style).
    pub fn handler(
        mut self,
        name: &str,
        hook: Hook,
        entities: Option<&[&str]>,
        priority: i32,
    ) -> Self {
        let mut h = HandlerSpec::new(name, hook);
        h.entities = entities.map(|e| e.iter().map(|s| (*s).to_owned()).collect());
        h.priority = priority;
        h.timeout_ms = 2_000;
        h.retry_backoff_ms = vec![20, 40];
        self.manifest.handlers.push(h);
        self
    }

    pub fn set(&self, handler: &str, b: Behaviour) {
        self.behaviour.lock().unwrap().insert(handler.to_owned(), b);
    }

    /// Starts one more replica (subscriptions first), connected as the plugin's
    /// own user (added to the server's users first), then registers the manifest.
    pub async fn start(&mut self, server: &hookbus_tests::NatsServer) {
        server.allow_plugins(&[self.manifest.id.as_str()]).await;
        let client = &server.connect_as(&self.manifest.id).await;
        let replica = self.replicas.len();
        let mut tasks = Vec::new();
        for h in &self.manifest.handlers {
            let subject = self.subjects.handler(&self.manifest.id, &h.name);
            let mut sub = client
                .queue_subscribe(subject, self.manifest.id.clone())
                .await
                .unwrap();
            let client = client.clone();
            let plugin = self.manifest.id.clone();
            let handler = h.name.clone();
            let log = self.log.clone();
            let behaviour = self.behaviour.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let hdr = msg.headers.clone().unwrap_or_default();
                    let get = |n: &str| hdr.get(n).map(|v| v.to_string()).unwrap_or_default();
                    log.push(Call {
                        plugin: plugin.clone(),
                        handler: handler.clone(),
                        event_id: get(headers::MSG_ID),
                        object: get(headers::OBJECT),
                        entity_token: get(headers::ENTITY),
                        seq: get(headers::STREAM_SEQ).parse().unwrap_or(0),
                        attempt: get(headers::ATTEMPT).parse().unwrap_or(0),
                        replica,
                    });
                    let b = behaviour
                        .lock()
                        .unwrap()
                        .get(&handler)
                        .cloned()
                        .unwrap_or(Behaviour::Ok);
                    let Some(reply) = msg.reply else { continue };
                    match b {
                        Behaviour::Ok => {
                            let _ = client.publish(reply, Bytes::new()).await;
                        }
                        Behaviour::Slow(d) => {
                            tokio::time::sleep(d).await;
                            let _ = client.publish(reply, Bytes::new()).await;
                        }
                        Behaviour::Garbage => {
                            let _ = client
                                .publish(reply, Bytes::from_static(b"\x00\x01garbage"))
                                .await;
                        }
                        Behaviour::Fail(code) => {
                            let err = ServiceError {
                                status: format!("test failure {code}"),
                                code: code.into(),
                            };
                            let mut h = async_nats::HeaderMap::new();
                            h.insert(headers::SERVICE_ERROR, err.status.as_str());
                            h.insert(headers::SERVICE_ERROR_CODE, code.to_string().as_str());
                            let _ = client.publish_with_headers(reply, h, Bytes::new()).await;
                        }
                    }
                }
            }));
        }
        self.replicas.push(tasks);
        register(client, &self.manifest).await;
    }

    /// Stops every replica (its subscriptions go away: "no responders").
    pub fn stop(&mut self) {
        for tasks in self.replicas.drain(..) {
            for t in tasks {
                t.abort();
            }
        }
    }
}

impl Drop for TestPlugin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Puts a manifest in the registry bucket.
pub async fn register(client: &async_nats::Client, manifest: &PluginManifest) {
    let js = jetstream::new(client.clone());
    let store = registry(&js).await;
    store
        .put(
            manifest.registry_key(),
            serde_json::to_vec(manifest).unwrap().into(),
        )
        .await
        .unwrap();
}

pub async fn registry(js: &jetstream::Context) -> kv::Store {
    js.get_key_value(Subjects::default().registry_bucket())
        .await
        .unwrap()
}

/// Waits until the bus has every plugin registered and enabled.
pub async fn wait_registered(bus: &Bus, plugins: &[&str]) {
    bus.registry
        .wait_for(Duration::from_secs(10), |t| {
            plugins.iter().all(|p| t.is_enabled(p))
        })
        .await
        .unwrap_or_else(|()| panic!("plugins {plugins:?} were not registered in time"));
}

pub use core_events::sample::{entity_event, entry_event};

pub use hookbus_tests::stream_len;

/// Reads every dead letter: (subject, record).
pub async fn dead_letters(js: &jetstream::Context) -> Vec<(String, serde_json::Value)> {
    hookbus::dlq::list(
        js,
        &Subjects::default(),
        &hookbus::dlq::Filter::default(),
        None,
    )
    .await
    .unwrap()
    .into_iter()
    .map(|l| (l.subject, l.body))
    .collect()
}

/// The password of `user` in tests with generated NATS users.
pub fn password(user: &str) -> String {
    hookbus_tests::NatsServer::password(user)
}

/// A production-profile nats-server with users for `plugins` from the start.
pub async fn start_server(plugins: &[&str]) -> hookbus_tests::NatsServer {
    hookbus_tests::NatsServer::start_for(plugins).await
}

/// As [`start_server`], with more server configuration (`max_payload: …`),
/// which overrides the production limits.
pub async fn start_server_with(plugins: &[&str], extra: &str) -> hookbus_tests::NatsServer {
    hookbus_tests::NatsServer::start_for_with(plugins, extra).await
}

/// A client of `user`, and the server errors (permission violations) it gets.
pub async fn connect(
    server: &hookbus_tests::NatsServer,
    user: &str,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let options = server.connect_options(user).event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event {
                let _ = tx.send(e.to_string());
            }
        }
    });
    (options.connect(server.url()).await.unwrap(), rx)
}

/// `event` as a later, compatible version of the protocol would publish it: the
/// same `type`, `dataschema` at `v2`, an envelope extension attribute and fields
/// in `data` (and in its models and attributes) that version 1 does not know.
pub fn as_next_version<D: serde::Serialize>(event: &core_events::Envelope<D>) -> serde_json::Value {
    use serde_json::{Value, json};
    let mut v = serde_json::to_value(event).unwrap();
    let v1 = v["dataschema"].as_str().unwrap().to_owned();
    assert!(v1.ends_with(":v1"), "{v1}");
    v["dataschema"] = json!(v1.replace(":v1", ":v2"));
    v["pagodatenant"] = json!("acme");
    let data = v["data"].as_object_mut().unwrap();
    data.insert("changed_fields".into(), json!(["name", "note"]));
    for model in ["entity", "entry", "previous", "user"] {
        if let Some(Value::Object(m)) = data.get_mut(model) {
            m.insert("revision".into(), json!(3));
            if let Some(Value::Array(attrs)) = m.get_mut("attrs") {
                for attr in attrs {
                    attr["unit"] = json!("kg");
                }
            }
        }
    }
    v
}

/// Publishes `body` (an event as JSON, any shape) into the events stream for
/// `hook`, `entity` and `object`, as the host would; returns its stream sequence.
pub async fn publish_raw(
    client: &async_nats::Client,
    hook: Hook,
    entity: &str,
    object: core_events::ObjectKey,
    body: &serde_json::Value,
) -> u64 {
    let id: core_events::EventId = body["id"].as_str().unwrap().parse().unwrap();
    let event = hookbus::EncodedEvent::from_parts(
        &Subjects::default(),
        hook,
        entity,
        object,
        id,
        None,
        Bytes::from(serde_json::to_vec(body).unwrap()),
    )
    .unwrap();
    let publisher = hookbus::Publisher::new(jetstream::new(client.clone()), Subjects::default());
    publisher.send(event).await.unwrap().await.unwrap().sequence
}
