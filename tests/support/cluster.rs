//! A real three-node nats-server cluster on loopback: [`Cluster`].
//!
//! Every node runs the **production profile** of a cluster node (the limits of
//! `docker/nats/cluster-node.conf` and the users `hookbus nats-config`
//! generates, as [`NatsServer::start`] does for one server), on its own random client, monitoring
//! and route ports, with its own JetStream store, in one cluster. A node can be
//! killed (SIGKILL) and restarted with its store, and the leader of a stream
//! found, so tests can take the leader away mid-burst.
//!
//! ```no_run
//! # async fn demo() {
//! use hookbus_tests::{BUS_USER, cluster::Cluster};
//!
//! let mut cluster = Cluster::start_for(&["hello-world"]).await;
//! // The bus on node 1 first (then the others, for fail-over).
//! let bus_client = cluster.connect_as(BUS_USER, 1).await;
//! let leader = cluster.stream_leader("PAGODA_EVENTS").await;
//! cluster.kill(leader);
//! cluster.restart(leader).await;
//! cluster.wait_current("PAGODA_EVENTS").await;
//! # }
//! ```

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;

use crate::{
    NatsServer, NotReady, OPERATOR_USER, cluster_limits, free_port, poll_for, poll_until,
    production_conf,
};

/// Nodes in a [`Cluster`].
pub const NODES: usize = 3;

/// The cluster's name (`cluster { name }`).
pub const CLUSTER_NAME: &str = "hookbus-test";

/// How long [`Cluster`] waits for a stream leader, a catch-up or the cluster to
/// form again after a node came back.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// How many times [`Cluster::start`] picks new ports when one was taken.
const START_ATTEMPTS: usize = 5;

/// Three nats-server processes in one cluster, each with JetStream and its own
/// store; killed and removed on drop.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<NatsServer>,
}

impl Cluster {
    /// Starts the cluster in the production profile with no plugin users, and
    /// waits until every node is healthy and JetStream has a meta leader.
    ///
    /// # Panics
    ///
    /// When a node does not start or the cluster does not form within
    /// [`READY_TIMEOUT`](crate::READY_TIMEOUT).
    pub async fn start() -> Cluster {
        Self::start_for(&[]).await
    }

    /// [`start`](Cluster::start) with users for `plugins` on every node.
    ///
    /// # Panics
    ///
    /// As [`start`](Cluster::start).
    pub async fn start_for(plugins: &[&str]) -> Cluster {
        Self::start_with_limits(plugins, &cluster_limits()).await
    }

    /// [`start_for`](Cluster::start_for) with `limits` in place of the shipped
    /// cluster node's ([`cluster_limits`]); say, the single server's
    /// [`crate::production_limits`], which fsync every write.
    ///
    /// # Panics
    ///
    /// As [`start`](Cluster::start).
    pub async fn start_with_limits(plugins: &[&str], limits: &str) -> Cluster {
        crate::init_tracing();
        let plugins: BTreeSet<String> = plugins.iter().map(|p| (*p).to_owned()).collect();
        for attempt in 1..=START_ATTEMPTS {
            let routes: Vec<u16> = distinct_ports(NODES);
            let route_urls = routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut nodes = Vec::with_capacity(NODES);
            for route in &routes {
                let extra = format!(
                    "cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{route}\n  routes: [{route_urls}]\n}}\n"
                );
                nodes.push(unstarted(limits, &plugins, &extra));
            }
            for node in &mut nodes {
                node.spawn();
            }
            let mut cluster = Cluster { nodes };
            match cluster.wait_all_ready().await {
                // A meta group that has not formed with every peer current within
                // CLUSTER_WAIT (seen now and then on nats-server 2.10 on a loaded
                // machine) is started again, like a node that did not come up.
                Ok(()) if !cluster.meta_formed().await && attempt < START_ATTEMPTS => {
                    tracing::warn!(
                        attempt,
                        logs = %cluster.nodes.iter().map(|n| n.log_tail(10)).collect::<Vec<_>>().join("\n--\n"),
                        "the JetStream meta group did not form; starting the cluster again"
                    );
                    for node in &mut cluster.nodes {
                        node.kill();
                    }
                }
                Ok(()) => {
                    cluster.wait_meta_leader().await;
                    cluster.wait_r3_placement().await;
                    return cluster;
                }
                // A port taken between choosing and binding it, or a node that
                // died for it while the others waited for a meta leader: start
                // the three again on other ports.
                Err((index, reason)) if attempt < START_ATTEMPTS => {
                    tracing::warn!(
                        node = index,
                        ?reason,
                        log = %cluster.nodes[index].log_tail(20),
                        "a cluster node did not come up; starting the cluster again"
                    );
                    for node in &mut cluster.nodes {
                        node.kill();
                    }
                }
                Err((index, reason)) => cluster.nodes[index].fail(reason),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Waits until every running node answers `/healthz` (JetStream current
    /// with the meta leader) and accepts clients.
    async fn wait_all_ready(&self) -> Result<(), (usize, NotReady)> {
        for (index, node) in self.nodes.iter().enumerate() {
            if node.is_running() {
                node.wait_ready().await.map_err(|e| (index, e))?;
            }
        }
        Ok(())
    }

    /// Whether, within [`CLUSTER_WAIT`], the JetStream meta group gets a leader
    /// that counts every running node as a current peer.
    async fn meta_formed(&self) -> bool {
        let running = self.nodes.iter().filter(|n| n.is_running()).count();
        poll_until(CLUSTER_WAIT, || async {
            let Some(leader) = self.meta_leader().await else {
                return false;
            };
            let Some(meta) = self.meta_cluster(leader).await else {
                return false;
            };
            let current = meta["replicas"].as_array().map_or(0, |peers| {
                peers
                    .iter()
                    .filter(|p| p["current"] == true && p["offline"] != true)
                    .count()
            });
            current + 1 >= running
        })
        .await
    }

    /// Waits until the JetStream meta group has a leader that counts every
    /// running node as a current peer (before that, creating an R3 stream fails
    /// with "no suitable peers for placement"), and the JetStream API answers
    /// through every running node.
    ///
    /// # Panics
    ///
    /// When it does not within [`CLUSTER_WAIT`].
    pub async fn wait_meta_leader(&self) {
        let running = self.nodes.iter().filter(|n| n.is_running()).count();
        let formed = self.meta_formed().await;
        assert!(
            formed,
            "the JetStream meta group has no leader with {running} current peers after {CLUSTER_WAIT:?}"
        );
        for (index, node) in self.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            let client = node.connect().await;
            let js = jetstream::new(client);
            let ok = poll_until(CLUSTER_WAIT, || async { js.query_account().await.is_ok() }).await;
            assert!(
                ok,
                "node {index}: JetStream has no meta leader after {CLUSTER_WAIT:?}; its log:\n{}",
                node.log_tail(40)
            );
        }
    }

    /// Waits until the cluster places an R3 stream: a probe stream is created
    /// (and removed) until that works. Just after the meta group formed, an R3
    /// placement can still time out or find "no suitable peers".
    ///
    /// # Panics
    ///
    /// When no R3 stream can be created within [`CLUSTER_WAIT`].
    async fn wait_r3_placement(&self) {
        let js = jetstream::new(self.connect().await);
        let placed = poll_until(CLUSTER_WAIT, || async {
            let config = jetstream::stream::Config {
                name: "HARNESS_R3_PROBE".into(),
                subjects: vec!["harness.r3.probe".into()],
                num_replicas: 3,
                ..Default::default()
            };
            match js.create_stream(config).await {
                Ok(_) => js.delete_stream("HARNESS_R3_PROBE").await.is_ok(),
                Err(_) => {
                    let _ = js.delete_stream("HARNESS_R3_PROBE").await;
                    false
                }
            }
        })
        .await;
        assert!(
            placed,
            "the cluster placed no R3 stream within {CLUSTER_WAIT:?}"
        );
    }

    /// The node that leads the JetStream meta group, as a running node sees it.
    async fn meta_leader(&self) -> Option<usize> {
        for (index, node) in self.nodes.iter().enumerate() {
            if node.is_running()
                && let Some(meta) = self.meta_cluster(index).await
                && let Some(name) = meta["leader"].as_str()
            {
                return self
                    .node_named(name)
                    .filter(|i| self.nodes[*i].is_running());
            }
        }
        None
    }

    /// The `meta_cluster` part of node `index`'s `/jsz` (its replicas only on
    /// the meta leader).
    async fn meta_cluster(&self, index: usize) -> Option<serde_json::Value> {
        let url = format!("{}/jsz", self.nodes[index].monitor_url());
        let body: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
        Some(body["meta_cluster"].clone()).filter(|m| !m.is_null())
    }

    /// Node `index` (0, 1 or 2).
    pub fn node(&self, index: usize) -> &NatsServer {
        &self.nodes[index]
    }

    /// Every node, in order.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// The node whose `server_name` is `name` (stream info names leaders and
    /// replicas by it).
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.server_name() == name)
    }

    /// The node that a client is connected to, from the server's INFO.
    pub fn node_of(&self, client: &async_nats::Client) -> Option<usize> {
        let info = client.server_info();
        self.node_named(&info.server_name)
    }

    /// The nodes' client URLs, node `first` first, then the others in order:
    /// `NATS_URL` for a component that should connect to that node.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        let mut order: Vec<usize> = vec![first];
        order.extend((0..self.nodes.len()).filter(|i| *i != first));
        order.into_iter().map(|i| self.nodes[i].url()).collect()
    }

    /// [`urls_from`](Cluster::urls_from), comma-separated, as `NATS_URL`.
    pub fn url_list_from(&self, first: usize) -> String {
        self.urls_from(first).join(",")
    }

    /// The environment a child process needs to connect as `user`, to node
    /// `first` first (`NATS_URL` lists all three nodes).
    pub fn env_for(&self, user: &str, first: usize) -> Vec<(&'static str, String)> {
        let mut env = self.nodes[first].env_for(user);
        for (key, value) in &mut env {
            if *key == "NATS_URL" {
                *value = self.url_list_from(first);
            }
        }
        env
    }

    /// Connect options for `user` that keep the servers' order (so the client
    /// connects to the first one listed while it runs).
    pub fn connect_options(&self, user: &str) -> async_nats::ConnectOptions {
        self.nodes[0]
            .connect_options(user)
            .retain_servers_order()
            .name(user)
    }

    /// Connects as `user` to node `first`, with the other nodes to fail over
    /// to.
    ///
    /// # Panics
    ///
    /// When the connection fails.
    pub async fn connect_as(&self, user: &str, first: usize) -> async_nats::Client {
        let servers: Vec<async_nats::ServerAddr> = self
            .urls_from(first)
            .iter()
            .map(|u| u.parse().expect("a server URL"))
            .collect();
        Box::pin(self.connect_options(user).connect(servers))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to node {first} as {user}: {e}"))
    }

    /// The test's own client (the operator, every right), on the first running
    /// node, failing over to the others.
    ///
    /// # Panics
    ///
    /// When no node runs or the connection fails.
    pub async fn connect(&self) -> async_nats::Client {
        let first = (0..self.nodes.len())
            .find(|i| self.nodes[*i].is_running())
            .expect("a running node");
        self.connect_as(OPERATOR_USER, first).await
    }

    /// Kills node `index` with SIGKILL (nothing flushed) and waits for it to
    /// exit; its store stays. (The meta group may have to elect a leader again:
    /// [`wait_meta_leader`](Cluster::wait_meta_leader) waits for one.)
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
    }

    /// Starts node `index` again on its ports with its store, and waits until it
    /// is healthy (back in the cluster, JetStream current with the meta leader).
    ///
    /// # Panics
    ///
    /// When it is not within [`CLUSTER_WAIT`].
    pub async fn restart(&mut self, index: usize) {
        // Healthy once it has rejoined the meta group: as long as forming it takes.
        self.nodes[index].restart_within(CLUSTER_WAIT).await;
        self.wait_meta_leader().await;
    }

    /// The index of the node that leads `stream`, once it has a leader.
    ///
    /// # Panics
    ///
    /// When it has none within [`CLUSTER_WAIT`].
    pub async fn stream_leader(&self, stream: &str) -> usize {
        let client = self.connect().await;
        let js = jetstream::new(client);
        poll_for(CLUSTER_WAIT, || async {
            let mut s = js.get_stream(stream).await.ok()?;
            let info = s.info().await.ok()?;
            let leader = info.cluster.as_ref()?.leader.clone()?;
            self.node_named(&leader)
        })
        .await
        .unwrap_or_else(|| panic!("stream {stream} has no leader within {CLUSTER_WAIT:?}"))
    }

    /// Waits until `stream` has a leader and every replica is current (no lag,
    /// not offline): a restarted node has caught up.
    ///
    /// # Panics
    ///
    /// When it does not within [`CLUSTER_WAIT`], with the last stream info.
    pub async fn wait_current(&self, stream: &str) {
        let client = self.connect().await;
        let js = jetstream::new(client);
        let last = Mutex::new(String::new());
        let current = poll_until(CLUSTER_WAIT, || async {
            let Ok(mut s) = js.get_stream(stream).await else {
                return false;
            };
            let Ok(info) = s.info().await else {
                return false;
            };
            let Some(cluster) = &info.cluster else {
                return false;
            };
            *last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = format!("{cluster:?}");
            cluster.leader.is_some()
                && cluster.replicas.len() + 1 == self.nodes.len()
                && cluster
                    .replicas
                    .iter()
                    .all(|r| r.current && !r.offline && r.lag.unwrap_or(0) == 0)
        })
        .await;
        assert!(
            current,
            "stream {stream}: replicas not current within {CLUSTER_WAIT:?}: {}",
            last.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        );
    }

    /// What node `index` itself stores of `stream` (its own replica, from its
    /// monitoring endpoint `/jsz`): messages, first and last sequence.
    /// `None` when the node does not answer or holds no such stream.
    pub async fn replica_state(&self, index: usize, stream: &str) -> Option<ReplicaState> {
        let url = format!(
            "{}/jsz?accounts=true&streams=true",
            self.nodes[index].monitor_url()
        );
        let body: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
        body["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|s| s["name"] == stream)
            .map(|s| ReplicaState {
                messages: s["state"]["messages"].as_u64().unwrap_or(0),
                first_seq: s["state"]["first_seq"].as_u64().unwrap_or(0),
                last_seq: s["state"]["last_seq"].as_u64().unwrap_or(0),
            })
    }

    /// Waits until every running node stores the same messages and sequences of
    /// `stream` (every replica holds every event), and returns that state.
    ///
    /// # Panics
    ///
    /// When they still differ after [`CLUSTER_WAIT`], with each node's state.
    pub async fn wait_replicas_equal(&self, stream: &str) -> ReplicaState {
        let states = || async {
            let mut out = Vec::new();
            for (i, node) in self.nodes.iter().enumerate() {
                if node.is_running() {
                    out.push(self.replica_state(i, stream).await);
                }
            }
            out
        };
        let agreed = poll_for(CLUSTER_WAIT, || async {
            let all = states().await;
            let first = all.first().cloned().flatten()?;
            all.iter()
                .all(|s| s.as_ref() == Some(&first))
                .then_some(first)
        })
        .await;
        match agreed {
            Some(state) => state,
            None => panic!(
                "the nodes' replicas of {stream} differ after {CLUSTER_WAIT:?}: {:?}",
                states().await
            ),
        }
    }
}

/// One node's own copy of a stream ([`Cluster::replica_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaState {
    /// Messages stored.
    pub messages: u64,
    /// First sequence stored.
    pub first_seq: u64,
    /// Last sequence stored.
    pub last_seq: u64,
}

/// `n` free ports, all different.
fn distinct_ports(n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// A production-profile node, its config written and ports chosen, not yet
/// running.
fn unstarted(limits: &str, plugins: &BTreeSet<String>, extra: &str) -> NatsServer {
    let dir = tempfile::Builder::new()
        .prefix("hookbus-nats-cluster-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir for nats-server: {e}"));
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, production_conf(limits, plugins, extra))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let ports = distinct_ports(2);
    NatsServer {
        child: Mutex::new(None),
        port: ports[0],
        monitor_port: ports[1],
        dir,
        config: Some(path),
        auth: Some(Mutex::new(plugins.clone())),
        extra: extra.to_owned(),
        limits: limits.to_owned(),
    }
}
