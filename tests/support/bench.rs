//! Shared pieces of the benchmarks (`tests/benches/*.rs`): knobs from the
//! environment, medians and percentiles, and the `main` that runs a bench in
//! smoke mode under `cargo test` and in full under `cargo bench`.

use std::future::Future;

/// A positive number from the environment, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// The `p`-th percentile (0–100) of sorted values (nearest rank); NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median (mean of the two middle values for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Runs a bench's body on a multi-threaded runtime. `cargo bench` passes
/// `--bench`: then `smoke` is false; under `cargo test` it is true (a quick run
/// that checks the bench still works). Other arguments (a filter) are ignored.
///
/// # Panics
///
/// When the runtime cannot be built.
pub fn main<F, Fut>(bench: F)
where
    F: FnOnce(bool) -> Fut,
    Fut: Future<Output = ()>,
{
    let smoke = !std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(smoke));
}

/// Which NATS a bench side runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsKind {
    /// One server, the shipped config (`sync_interval: always`); streams R1.
    R1,
    /// One server with nats-server's default fsync (every 2 min); streams R1.
    R1DefaultSync,
    /// A three-node cluster on loopback, the shipped node config; streams R3.
    R3,
}

impl NatsKind {
    /// Its name in `bench:` lines: `r1`, `r1_default_sync`, `r3`.
    pub fn name(self) -> &'static str {
        match self {
            NatsKind::R1 => "r1",
            NatsKind::R1DefaultSync => "r1_default_sync",
            NatsKind::R3 => "r3",
        }
    }

    /// Stream replicas on it.
    pub fn replicas(self) -> usize {
        match self {
            NatsKind::R3 => 3,
            NatsKind::R1 | NatsKind::R1DefaultSync => 1,
        }
    }
}

/// A running server or cluster for a bench side ([`NatsKind`]); killed on drop.
#[derive(Debug)]
pub enum BenchNats {
    /// One server.
    Single(crate::NatsServer),
    /// Three nodes.
    Cluster(crate::cluster::Cluster),
}

impl BenchNats {
    /// Starts `kind`: in the production profile (the shipped limits and the
    /// generated users; a bench connects as the operator).
    pub async fn start(kind: NatsKind) -> BenchNats {
        match kind {
            NatsKind::R1 => BenchNats::Single(crate::NatsServer::start().await),
            NatsKind::R1DefaultSync => BenchNats::Single(
                crate::NatsServer::start_for_with_limits(
                    &[],
                    &crate::limits_with_default_sync(),
                    "",
                )
                .await,
            ),
            NatsKind::R3 => BenchNats::Cluster(crate::cluster::Cluster::start().await),
        }
    }

    /// The operator's client: on a cluster, to node 0 first.
    pub async fn connect(&self) -> async_nats::Client {
        match self {
            BenchNats::Single(server) => server.connect().await,
            BenchNats::Cluster(cluster) => cluster.connect().await,
        }
    }

    /// The server processes (for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        match self {
            BenchNats::Single(server) => server.pid().into_iter().collect(),
            BenchNats::Cluster(cluster) => cluster
                .nodes()
                .iter()
                .filter_map(crate::NatsServer::pid)
                .collect(),
        }
    }

    /// Provisions the bus's streams and bucket with `settings`, as the bus does
    /// at start-up (trying again for 30 s while a just-formed cluster cannot
    /// place R3 streams yet), then waits until the events stream has a leader.
    ///
    /// # Panics
    ///
    /// When provisioning fails, or the stream gets no leader within
    /// [`CLUSTER_WAIT`](crate::cluster::CLUSTER_WAIT).
    pub async fn provision(
        js: &async_nats::jetstream::Context,
        subjects: &core_events::Subjects,
        settings: &hookbus::config::StreamSettings,
    ) {
        hookbus::provision::provision_patiently(
            js,
            subjects,
            settings,
            hookbus::provision::PROVISION_PATIENCE,
        )
        .await
        .unwrap_or_else(|e| panic!("provisioning failed: {e}"));
        // A new R3 stream takes a moment to elect its leader; a publish before
        // that finds no stream (no responders).
        let stream = subjects.events_stream();
        let led = crate::poll_until(crate::cluster::CLUSTER_WAIT, || async {
            let Ok(mut s) = js.get_stream(&stream).await else {
                return false;
            };
            s.info()
                .await
                .is_ok_and(|i| i.cluster.as_ref().is_none_or(|c| c.leader.is_some()))
        })
        .await;
        assert!(led, "stream {stream} has no leader");
    }

    /// Stream settings for it: the defaults with its replicas.
    pub fn stream_settings(&self) -> hookbus::config::StreamSettings {
        hookbus::config::StreamSettings {
            replicas: match self {
                BenchNats::Single(_) => 1,
                BenchNats::Cluster(_) => 3,
            },
            ..Default::default()
        }
    }
}
