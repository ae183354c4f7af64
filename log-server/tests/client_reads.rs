//! chainlog-client against a real 3-node chain: what a client has seen acknowledged, it reads
//! back from whichever replica its reads go to.

mod common;

use chainlog_client::{Client, ClientConfig, Offset};
use common::{free_port_run, wait_listening, Server};
use std::net::SocketAddr;
use std::time::Duration;

/// Each append, acknowledged by the head, is read straight back, round-robin over the three
/// replicas. A middle or tail replica learns the commit a hop later (the head's next batch or
/// idle `Commit`), so without the client's remembered committed end many of these reads came
/// back empty.
#[tokio::test(flavor = "current_thread")]
async fn a_client_reads_its_own_appends_from_every_replica() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port_run();
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| format!("127.0.0.1:{}", port + i).parse().expect("addr"))
        .collect();
    let _dev = Server::start(
        addrs[0],
        vec![
            "dev".into(),
            "--nodes".into(),
            "3".into(),
            "--port".into(),
            port.to_string(),
            "--dir".into(),
            tmp.path().join("data").display().to_string(),
        ],
        tmp.path().join("dev.log"),
    );
    for a in &addrs[1..] {
        wait_listening(*a, Duration::from_secs(30), None);
    }
    let cfg = ClientConfig::new(addrs.iter().map(|a| a.to_string()));
    let client = Client::connect(cfg).await.expect("connect");
    for i in 0..150u32 {
        let payload = format!("record {i}");
        let at = client
            .append("default", payload.clone())
            .await
            .expect("append");
        let recs = client.read("default", at, 1).await.expect("read");
        let got: Vec<(Offset, &[u8])> = recs.iter().map(|r| (r.offset, &r.payload[..])).collect();
        assert_eq!(got, vec![(at, payload.as_bytes())], "append {i}");
    }
}
