//! Per-user NATS permissions with least privilege: `hookbus nats-config`.
//!
//! [`render`] writes the `authorization { users = [...] }` block of a
//! `nats-server` configuration for one deployment (one subject prefix): a user
//! for the bus, one for the host, and one per enabled plugin, each allowed only
//! the subjects it needs (see [`permissions`] and `docs/deploy.md`).
//!
//! | user | may publish | may subscribe |
//! |---|---|---|
//! | the bus (`hookbus`, also the operator's user) | events, hook requests, dead letters, deferred, alerts, `<prefix>.bus.>` (status and the dead-letter service), the JetStream API, acks, its registry bucket, `$SRV.>` | `<prefix>.bus.>`, its own inbox |
//! | the host (`pagoda-host`) | events, its relay's dead letters (`<prefix>.dlq._relay.invalid`, nothing else of the dead-letter stream), hook / API / job requests, bus status requests (not the dead-letter service `<prefix>.bus.dlq.>`), audit records, cache notices to other hosts, the JetStream API except deleting or purging and except the consumers of the bus's and plugins' streams, the jobs bucket (not the registry) | other hosts' cache notices, its own inbox |
//! | plugin `<id>` | its own registry key, the events stream's read API (not the `dispatcher` consumers, one per partition: `--partitions`), `<prefix>.bus.registry`, its own jobs consumer | its endpoints `<prefix>.hooks.<id>.*`, its API routes `<prefix>.api.<id>.>`, its `$SRV` verbs, its own inbox |
//!
//! Every user gets `allow_responses`, so a service replies to the requests it
//! receives without a publish permission on reply subjects. Inboxes are per
//! user (`_INBOX_<user>.>`, see [`inbox_prefix`]): no user can read the replies
//! another one receives (JetStream deliveries, acks, service replies). Clients
//! must connect with that inbox prefix (async-nats:
//! `ConnectOptions::custom_inbox_prefix`; `hookbus` does it when `NATS_USER` is
//! set).
//!
//! Passwords: either references to environment variables resolved by
//! `nats-server` when it loads the file (`password: $NATS_PASSWORD_HELLO_WORLD`,
//! the default: the file holds no secret and can be checked in), or literal
//! passwords (`--passwords generate`: random, written into the file and listed
//! on stderr).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use async_nats::ConnectOptions;
use core_events::Subjects;
use core_events::subject::check_token_name;

/// Default user name of the bus.
pub const BUS_USER: &str = "hookbus";
/// Default user name of the host (the reference Pagoda core, `hookbus host`).
pub const HOST_USER: &str = "pagoda-host";

/// The dead-letter subject's plugin and handler tokens of the outbox rows the
/// relay cannot publish (`<prefix>.dlq._relay.invalid`): the host's relay may
/// publish there.
pub const RELAY_DLQ: (&str, &str) = ("_relay", "invalid");

/// What a user is for: decides its permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The bus: `hookbus run`, `provision` and the operator commands.
    Bus,
    /// The host: publishes events, calls sync hooks, plugin API routes and jobs.
    Host,
    /// One plugin, by id.
    Plugin(String),
}

/// How the passwords appear in the generated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Passwords {
    /// `password: $VAR` with `VAR` = [`password_env_var`] of the user:
    /// `nats-server` reads them from its environment.
    EnvRefs,
    /// The given password per user name (users without one get a reference).
    Literal(BTreeMap<String, String>),
}

/// The subjects a user may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    /// `publish.allow`.
    pub publish_allow: Vec<String>,
    /// `publish.deny` (wins over allow).
    pub publish_deny: Vec<String>,
    /// `subscribe.allow`.
    pub subscribe_allow: Vec<String>,
}

/// One user of the generated block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Why a configuration cannot be generated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsConfigError {
    /// A plugin id is not a valid subject token.
    #[error("plugin id '{0}' is invalid: use only letters, digits, '-' and '_'")]
    BadPluginId(String),
    /// Two users would have the same name.
    #[error("user name '{0}' is used twice (a plugin id equal to the bus or host user?)")]
    Duplicate(String),
    /// No randomness for generated passwords.
    #[error("cannot read random bytes for passwords: {0}")]
    Random(#[from] std::io::Error),
}

/// The users of a deployment: the bus, the host, then one per plugin in order.
///
/// # Errors
///
/// [`NatsConfigError::BadPluginId`] for an id that is not one subject token,
/// [`NatsConfigError::Duplicate`] for a repeated user name.
pub fn users(plugins: &[String]) -> Result<Vec<User>, NatsConfigError> {
    let mut out = vec![
        User {
            name: BUS_USER.to_owned(),
            role: Role::Bus,
        },
        User {
            name: HOST_USER.to_owned(),
            role: Role::Host,
        },
    ];
    for id in plugins {
        if check_token_name("plugin id", id).is_err() {
            return Err(NatsConfigError::BadPluginId(id.clone()));
        }
        if out.iter().any(|u| &u.name == id) {
            return Err(NatsConfigError::Duplicate(id.clone()));
        }
        out.push(User {
            name: id.clone(),
            role: Role::Plugin(id.clone()),
        });
    }
    Ok(out)
}

/// The inbox prefix of a user: `_INBOX_<user>` (its clients must use it).
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// The environment variable holding a user's password:
/// `NATS_PASSWORD_<USER>` upper-cased, `-` and `.` as `_`.
pub fn password_env_var(user: &str) -> String {
    format!(
        "NATS_PASSWORD_{}",
        user.replace(['-', '.'], "_").to_ascii_uppercase()
    )
}

/// The permissions of `user` in the deployment of `subjects`, whose buses
/// dispatch in `partitions` partitions (`hookbus run --partitions`; 1 when not
/// partitioned).
pub fn permissions(subjects: &Subjects, user: &User, partitions: u32) -> Permissions {
    let p = subjects.prefix();
    let events = subjects.events_stream();
    let bucket = subjects.registry_bucket();
    let jobs = subjects.jobs_stream();
    let dlq = subjects.dlq_stream();
    let deferred = subjects.deferred_stream();
    let jobs_bucket = subjects.jobs_bucket();
    let inbox = format!("{}.>", inbox_prefix(&user.name));
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    match &user.role {
        Role::Bus => Permissions {
            publish_allow: s(&[
                // Events (outbox relay, `hookbus demo`), deliveries, dead letters,
                // deferrals, alerts, status requests (`hookbus health`); not the
                // host's API routes or jobs. Events only in the shape the events
                // stream takes (object, action, entity, id).
                &subjects.events_stream_subjects(),
                &format!("{p}.hooks.>"),
                &format!("{p}.dlq.>"),
                &format!("{p}.deferred.>"),
                &format!("{p}.alerts.>"),
                &format!("{p}.bus.>"),
                // The audit trail (DLQ replay and purge, registry changes).
                &format!("{p}.audit.>"),
                "$JS.API.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                &format!("$KV.{bucket}.>"),
                // The dispatcher lease (one active bus).
                &format!("$KV.{}.>", subjects.leases_bucket()),
                "$SRV.>",
            ]),
            publish_deny: vec![],
            subscribe_allow: s(&[&format!("{p}.bus.>"), &inbox]),
        },
        Role::Host => Permissions {
            publish_allow: s(&[
                // Its relay publishes events, and dead-letters the outbox rows it
                // cannot publish; sync hooks, plugin API routes, jobs, bus status
                // requests, audit records (tokens). Events only in the shape the
                // events stream takes (object, action, entity, id).
                &subjects.events_stream_subjects(),
                &subjects.dead_letter(RELAY_DLQ.0, RELAY_DLQ.1),
                &format!("{p}.hooks.>"),
                &format!("{p}.api.>"),
                &format!("{p}.jobs.>"),
                &format!("{p}.bus.>"),
                &format!("{p}.audit.>"),
                // Cache notices to the other host processes.
                &subjects.host_forget(),
                // Provisioning at start, the registry and jobs watches, job states.
                "$JS.API.>",
                &format!("$KV.{jobs_bucket}.>"),
            ]),
            // Never: delete or purge a stream or message, or touch the consumers of
            // the events, dead-letter, deferred and jobs streams (the bus's and the
            // plugins'); never write the registry (plugins register themselves);
            // never ask the bus's dead-letter service (list, replay, purge: an
            // operator's, as the bus user).
            publish_deny: s(&[
                &format!("{p}.bus.dlq.>"),
                "$JS.API.STREAM.DELETE.>",
                "$JS.API.STREAM.PURGE.>",
                "$JS.API.STREAM.MSG.DELETE.>",
                &format!("$JS.API.CONSUMER.*.{events}"),
                &format!("$JS.API.CONSUMER.*.{events}.>"),
                &format!("$JS.API.CONSUMER.*.{dlq}"),
                &format!("$JS.API.CONSUMER.*.{dlq}.>"),
                &format!("$JS.API.CONSUMER.*.{deferred}"),
                &format!("$JS.API.CONSUMER.*.{deferred}.>"),
                &format!("$JS.API.CONSUMER.*.{jobs}"),
                &format!("$JS.API.CONSUMER.*.{jobs}.>"),
                &format!("$KV.{bucket}.>"),
            ]),
            subscribe_allow: s(&[&subjects.host_forget(), &inbox]),
        },
        Role::Plugin(id) => Permissions {
            publish_allow: s(&[
                // Registration: find the bucket, put its own key.
                "$JS.API.INFO",
                &format!("$JS.API.STREAM.INFO.KV_{bucket}"),
                &format!("$KV.{bucket}.plugins.{id}"),
                // Replay: read the events stream through its own consumers.
                &format!("$JS.API.STREAM.INFO.{events}"),
                &format!("$JS.API.STREAM.MSG.GET.{events}"),
                &format!("$JS.API.DIRECT.GET.{events}"),
                &format!("$JS.API.DIRECT.GET.{events}.>"),
                &format!("$JS.API.CONSUMER.CREATE.{events}"),
                &format!("$JS.API.CONSUMER.CREATE.{events}.>"),
                &format!("$JS.API.CONSUMER.INFO.{events}.*"),
                &format!("$JS.API.CONSUMER.DELETE.{events}.*"),
                &format!("$JS.API.CONSUMER.MSG.NEXT.{events}.*"),
                &format!("{p}.bus.registry"),
                // Jobs: its own durable consumer `jobs-<id>` on the jobs stream
                // (created with its own filter), and its own keys in the jobs bucket.
                &format!("$JS.API.CONSUMER.CREATE.{jobs}.jobs-{id}.{p}.jobs.{id}.>"),
                &format!("$JS.API.CONSUMER.INFO.{jobs}.jobs-{id}"),
                &format!("$JS.API.CONSUMER.MSG.NEXT.{jobs}.jobs-{id}"),
                &format!("$JS.ACK.{jobs}.jobs-{id}.>"),
                &format!("$JS.API.STREAM.INFO.KV_{jobs_bucket}"),
                &format!("$JS.API.DIRECT.GET.KV_{jobs_bucket}.$KV.{jobs_bucket}.{id}.>"),
                &format!("$KV.{jobs_bucket}.{id}.>"),
            ]),
            // The bus's consumers (one per partition) are not a plugin's to read,
            // change or delete.
            publish_deny: dispatcher_consumers(partitions)
                .iter()
                .flat_map(|name| {
                    [
                        format!("$JS.API.CONSUMER.*.{events}.{name}"),
                        format!("$JS.API.CONSUMER.*.{events}.{name}.>"),
                        format!("$JS.API.CONSUMER.MSG.NEXT.{events}.{name}"),
                    ]
                })
                .collect(),
            subscribe_allow: s(&[
                &format!("{p}.hooks.{id}.*"),
                &format!("{p}.api.{id}.>"),
                "$SRV.PING",
                "$SRV.INFO",
                "$SRV.STATS",
                &format!("$SRV.*.{id}"),
                &format!("$SRV.*.{id}.*"),
                &inbox,
            ]),
        },
    }
}

/// The names of the bus's dispatcher consumers on the events stream: those of
/// `partitions` partitions, and always the unpartitioned one (a bus started
/// without `--partitions` must stay out of a plugin's reach too).
fn dispatcher_consumers(partitions: u32) -> Vec<String> {
    let base = crate::config::DispatcherSettings::default().consumer;
    let count = partitions.max(1);
    let mut names: Vec<String> = (0..count)
        .map(|index| crate::dispatch::Partition { index, count }.consumer(&base))
        .collect();
    if !names.contains(&base) {
        names.insert(0, base);
    }
    names
}

/// Random passwords (32 hex digits from the OS) for every user.
///
/// # Errors
///
/// [`NatsConfigError::Random`] when `/dev/urandom` cannot be read.
pub fn generate_passwords(users: &[User]) -> Result<BTreeMap<String, String>, NatsConfigError> {
    use std::io::Read as _;
    let mut random = std::fs::File::open("/dev/urandom")?;
    let mut out = BTreeMap::new();
    for user in users {
        let mut bytes = [0u8; 16];
        random.read_exact(&mut bytes)?;
        let hex = bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        out.insert(user.name.clone(), hex);
    }
    Ok(out)
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The `authorization` block for `plugins` (the bus's `ENABLED_PLUGINS`) under
/// the prefix of `subjects`.
///
/// # Errors
///
/// As [`users`].
pub fn render(
    subjects: &Subjects,
    plugins: &[String],
    passwords: &Passwords,
    partitions: u32,
) -> Result<String, NatsConfigError> {
    let users = users(plugins)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by `hookbus nats-config` for prefix '{}' and plugins [{}]: do not edit,",
        subjects.prefix(),
        plugins.join(", ")
    );
    let _ = writeln!(
        out,
        "# regenerate. Every user uses the inbox prefix _INBOX_<user>. See docs/deploy.md."
    );
    let _ = writeln!(out, "authorization {{");
    let _ = writeln!(out, "  users = [");
    for user in &users {
        let perms = permissions(subjects, user, partitions);
        let password = match passwords {
            Passwords::Literal(map) if map.contains_key(&user.name) => {
                quote(map.get(&user.name).map(String::as_str).unwrap_or_default())
            }
            _ => format!("${}", password_env_var(&user.name)),
        };
        let role = match &user.role {
            Role::Bus => "the bus".to_owned(),
            Role::Host => "the host".to_owned(),
            Role::Plugin(id) => format!("plugin {id}"),
        };
        let _ = writeln!(out, "    # {role}");
        let _ = writeln!(out, "    {{");
        let _ = writeln!(out, "      user: {}", quote(&user.name));
        let _ = writeln!(out, "      password: {password}");
        let _ = writeln!(out, "      permissions: {{");
        let _ = writeln!(out, "        publish: {{");
        let _ = writeln!(out, "          allow: {}", list(&perms.publish_allow));
        if !perms.publish_deny.is_empty() {
            let _ = writeln!(out, "          deny: {}", list(&perms.publish_deny));
        }
        let _ = writeln!(out, "        }}");
        let _ = writeln!(out, "        subscribe: {{");
        let _ = writeln!(out, "          allow: {}", list(&perms.subscribe_allow));
        let _ = writeln!(out, "        }}");
        let _ = writeln!(out, "        allow_responses: true");
        let _ = writeln!(out, "      }}");
        let _ = writeln!(out, "    }}");
    }
    let _ = writeln!(out, "  ]");
    let _ = writeln!(out, "}}");
    Ok(out)
}

/// Adds user, password and the user's inbox prefix to `options` when `user` is
/// set; `options` unchanged otherwise.
pub fn with_credentials(
    options: ConnectOptions,
    user: Option<&str>,
    password: Option<&str>,
) -> ConnectOptions {
    match user.filter(|u| !u.is_empty()) {
        Some(user) => options
            .user_and_password(user.to_owned(), password.unwrap_or_default().to_owned())
            .custom_inbox_prefix(inbox_prefix(user)),
        None => options,
    }
}

/// The servers of a comma-separated `NATS_URL`
/// (`nats://n1:4222,nats://n2:4222,nats://n3:4222`), in the order given, for
/// `ConnectOptions::connect`: the client connects to one of them and, when that
/// server goes away, reconnects to another (it also learns the cluster's other
/// servers from the one it is connected to). async-nats itself reads a string
/// as one URL, so a list must be split first. Spaces around a URL are ignored;
/// a URL without a scheme is `nats://`, without a port `:4222`.
///
/// # Errors
///
/// [`ServerListError`] when the list is empty or a URL is not a NATS server
/// URL, naming it.
pub fn server_addrs(list: &str) -> Result<Vec<async_nats::ServerAddr>, ServerListError> {
    let servers = list
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse()
                .map_err(|e: std::io::Error| ServerListError::Invalid {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(ServerListError::Empty);
    }
    Ok(servers)
}

/// A `NATS_URL` that [`server_addrs`] refuses.
#[derive(Debug, thiserror::Error)]
pub enum ServerListError {
    /// No URL at all.
    #[error("NATS_URL lists no server (expected nats://host:port, or several separated by commas)")]
    Empty,
    /// One URL of the list is not a NATS server URL.
    #[error("NATS_URL: {url:?} is not a NATS server URL: {reason}")]
    Invalid {
        /// The URL, as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// One pass of the consumer guard: deletes every push consumer on the events
/// stream whose deliver subject is not an inbox (`_INBOX…`), and returns their
/// names.
///
/// Plugins may create consumers on the events stream (replay), and NATS does not
/// check a consumer's deliver subject against its creator's permissions, so a
/// push consumer could make the server deliver events to another plugin's
/// endpoint. Nothing of the bus or the SDK uses push consumers there except with
/// inbox deliver subjects.
///
/// # Errors
///
/// When the stream or its consumers cannot be read; a failed delete is logged.
pub async fn guard_push_consumers(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
) -> Result<Vec<String>, async_nats::Error> {
    use futures::TryStreamExt as _;
    let stream = js.get_stream(subjects.events_stream()).await?;
    let infos: Vec<_> = stream.consumers().try_collect().await?;
    let mut deleted = Vec::new();
    for info in infos {
        let Some(deliver) = info.config.deliver_subject.as_deref() else {
            continue;
        };
        if deliver.starts_with("_INBOX") {
            continue;
        }
        tracing::warn!(
            consumer = %info.name,
            deliver_subject = %deliver,
            stream = %subjects.events_stream(),
            "deleting a push consumer that delivers events outside an inbox"
        );
        match stream.delete_consumer(&info.name).await {
            Ok(_) => deleted.push(info.name.clone()),
            Err(e) => tracing::warn!(consumer = %info.name, error = %e, "cannot delete consumer"),
        }
    }
    Ok(deleted)
}

/// Runs [`guard_push_consumers`] every `interval` until `shutdown`.
pub async fn run_consumer_guard(
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = guard_push_consumers(&js, &subjects).await {
            tracing::debug!(error = %e, "consumer guard pass failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_split_on_commas() {
        let one = server_addrs("nats://127.0.0.1:4222").unwrap();
        assert_eq!(one.len(), 1);
        let three = server_addrs(" nats://n1:4222, nats://n2:4223 ,n3 ").unwrap();
        let ports: Vec<u16> = three.iter().map(async_nats::ServerAddr::port).collect();
        assert_eq!(ports, [4222, 4223, 4222]);
        assert_eq!(three[1].host(), "n2");
        assert!(matches!(server_addrs(" , "), Err(ServerListError::Empty)));
        let err = server_addrs("nats://n1:4222,http://n2:80").unwrap_err();
        assert!(err.to_string().contains("http://n2:80"), "{err}");
    }

    #[test]
    fn rejects_bad_and_duplicate_ids() {
        assert!(matches!(
            users(&["a.b".to_owned()]),
            Err(NatsConfigError::BadPluginId(_))
        ));
        assert!(matches!(
            users(&[BUS_USER.to_owned()]),
            Err(NatsConfigError::Duplicate(_))
        ));
    }

    #[test]
    fn host_may_dead_letter_its_relays_rows_and_nothing_else() {
        let user = User {
            name: HOST_USER.to_owned(),
            role: Role::Host,
        };
        let perms = permissions(&Subjects::default(), &user, 1);
        let dlq: Vec<&String> = perms
            .publish_allow
            .iter()
            .filter(|s| s.starts_with("pagoda.dlq."))
            .collect();
        assert_eq!(dlq, ["pagoda.dlq._relay.invalid"]);
    }

    #[test]
    fn env_var_names() {
        assert_eq!(password_env_var("hello-world"), "NATS_PASSWORD_HELLO_WORLD");
        assert_eq!(inbox_prefix("flaky"), "_INBOX_flaky");
    }

    #[test]
    fn host_and_bus_publish_events_only_in_the_stream_s_shape() {
        let subjects = Subjects::new("acme.pagoda").unwrap();
        for role in [Role::Host, Role::Bus] {
            let user = User {
                name: "u".to_owned(),
                role,
            };
            let perms = permissions(&subjects, &user, 4);
            let events: Vec<&String> = perms
                .publish_allow
                .iter()
                .filter(|s| s.contains(".events."))
                .collect();
            assert_eq!(events, ["acme.pagoda.events.*.*.*.*"], "{:?}", user.role);
        }
    }

    #[test]
    fn plugin_cannot_publish_events_or_other_keys() {
        let subjects = Subjects::default();
        let user = User {
            name: "a".to_owned(),
            role: Role::Plugin("a".to_owned()),
        };
        let perms = permissions(&subjects, &user, 1);
        assert!(!perms.publish_allow.iter().any(|s| s.contains(".events.")));
        assert!(
            perms
                .publish_allow
                .contains(&"$KV.pagoda_registry.plugins.a".to_owned())
        );
        assert!(!perms.subscribe_allow.contains(&"_INBOX.>".to_owned()));
        // `*` is one token: MSG.NEXT (two tokens) needs its own deny.
        assert!(
            perms
                .publish_deny
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.PAGODA_EVENTS.dispatcher".to_owned())
        );
        assert!(perms.subscribe_allow.contains(&"_INBOX_a.>".to_owned()));
        // With partitions, every partition's consumer is denied.
        let perms = permissions(&subjects, &user, 4);
        for i in 0..4 {
            let next = format!("$JS.API.CONSUMER.MSG.NEXT.PAGODA_EVENTS.dispatcher-p{i}of4");
            assert!(perms.publish_deny.contains(&next), "{next}");
        }
    }
}
