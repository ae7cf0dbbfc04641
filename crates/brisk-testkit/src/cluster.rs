//! A private Redis Cluster of three masters.

use std::time::Duration;

use crate::{Error, RedisServer, Result, wait_until};

const SLOTS: usize = 16_384;
const MASTERS: usize = 3;
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Three `redis-server` masters in cluster mode with all 16,384 slots assigned, ready when
/// every node reports `cluster_state:ok`. Stopped on drop.
///
/// ```no_run
/// let cluster = brisk_testkit::RedisCluster::start()?;
/// let urls = cluster.urls(); // one redis:// URL per master
/// # let _ = urls;
/// # Ok::<(), brisk_testkit::Error>(())
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the three masters, assigns the slots, joins them and waits for `cluster_state:ok`.
    ///
    /// # Errors
    /// As [`RedisServer::start`]; [`Error::NotReady`] if the cluster does not converge in 30 s.
    pub fn start() -> Result<Self> {
        let mut nodes = Vec::with_capacity(MASTERS);
        for _ in 0..MASTERS {
            // The cluster bus listens on port + 10000; nodes.conf stays in the node's temp dir,
            // so a restarted node rejoins with its slots.
            let port = crate::free_port(true)?;
            let node = RedisServer::builder()
                .port(port)
                .arg("--cluster-enabled")
                .arg("yes")
                .arg("--cluster-config-file")
                .arg("nodes.conf")
                .arg("--cluster-node-timeout")
                .arg("5000")
                .start()?;
            nodes.push(node);
        }
        let cluster = Self { nodes };
        cluster.assign_slots()?;
        cluster.wait_ok()?;
        Ok(cluster)
    }

    fn assign_slots(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            let (from, to) = (i * SLOTS / MASTERS, (i + 1) * SLOTS / MASTERS);
            let slots: Vec<String> = (from..to).map(|slot| slot.to_string()).collect();
            let mut args = vec!["CLUSTER", "ADDSLOTS"];
            args.extend(slots.iter().map(String::as_str));
            node.command(&args)?;
        }
        let first = &self.nodes[0];
        for node in &self.nodes[1..] {
            let port = node
                .port()
                .expect("cluster nodes listen on TCP")
                .to_string();
            first.command(&["CLUSTER", "MEET", "127.0.0.1", &port])?;
        }
        Ok(())
    }

    /// Waits until every running node reports `cluster_state:ok`.
    ///
    /// # Errors
    /// [`Error::NotReady`] with each node's `CLUSTER INFO` state if it does not happen in 30 s.
    pub fn wait_ok(&self) -> Result<()> {
        let all_ok = || {
            self.nodes.iter().filter(|n| n.pid().is_some()).all(|node| {
                node.command(&["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
        };
        wait_until(READY_WITHIN, || true, all_ok).map_err(|waited| Error::NotReady {
            what: format!("Redis Cluster on {}", self.urls().join(", ")),
            waited,
            log: self
                .nodes
                .iter()
                .map(|n| format!("{}: {:?}", n.url(), n.command(&["CLUSTER", "INFO"])))
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }

    /// One `redis://` URL per master, to seed a cluster client.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The masters, in slot order: node 0 serves slots 0–5460, node 1 5461–10921, node 2 the rest.
    #[must_use]
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One master, to kill, pause, resume or restart it.
    ///
    /// # Panics
    /// If `index` is not 0, 1 or 2.
    pub fn node_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }
}
