//! A private three-master Redis Cluster.

mod common;

use brisk_testkit::RedisCluster;
use redis::Commands;

#[test]
fn serves_keys_on_every_master_and_stops_on_drop() {
    let cluster = RedisCluster::start().unwrap();
    assert_eq!(cluster.urls().len(), 3);
    for node in cluster.nodes() {
        let info = node.command(&["CLUSTER", "INFO"]).unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
    }

    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut conn = client.get_connection().unwrap();
    for i in 0..200 {
        let _: () = conn.set(format!("key:{i}"), i).unwrap();
    }
    assert_eq!(conn.get::<_, i32>("key:123").unwrap(), 123);
    let mut total = 0;
    for node in cluster.nodes() {
        let keys: usize = node.command(&["DBSIZE"]).unwrap().parse().unwrap();
        assert!(keys > 30, "{} holds only {keys} of 200 keys", node.url());
        total += keys;
    }
    assert_eq!(total, 200);

    let pids: Vec<u32> = cluster
        .nodes()
        .iter()
        .filter_map(brisk_testkit::RedisServer::pid)
        .collect();
    drop(cluster);
    assert!(pids.iter().all(|&pid| common::exited(pid)));
}

#[test]
fn a_restarted_master_rejoins_with_its_slots() {
    let mut cluster = RedisCluster::start().unwrap();
    let url = cluster.nodes()[1].url();
    cluster.node_mut(1).kill().unwrap();
    cluster.node_mut(1).restart().unwrap();
    assert_eq!(cluster.nodes()[1].url(), url);
    cluster.wait_ok().unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut conn = client.get_connection().unwrap();
    for i in 0..50 {
        let _: () = conn.set(format!("again:{i}"), i).unwrap();
    }
}
