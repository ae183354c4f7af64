//! The append path copies no payload bytes in user space between socket and disk: the status
//! counters of the transport, the head's restamp and the storage writer all stay at zero.

mod common;

use chainlog_client::{Client, ClientConfig};
use common::Server;

/// Eight writers appending records of many sizes (1 B .. 5 KB), so batches and frames end at
/// every kind of boundary.
async fn load(client: &Client, per_writer: usize) {
    let mut tasks = vec![];
    for w in 0..8usize {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let p = vec![b'a' + (w as u8); 1 + (i * 37 + w * 101) % 5000];
                client.append("default", p).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
}

async fn copies_after_load(io_mode: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::single(&dir.path().join("n1"), io_mode);
    let client = Client::connect(ClientConfig::new([server.addr.to_string()]))
        .await
        .expect("connect");
    load(&client, 200).await;
    let s = client.status().await.expect("status");
    drop(server);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_payload_copies_on_the_append_path() {
    for mode in ["buffered", "direct", "auto"] {
        let s = copies_after_load(mode).await;
        let io = s["storage"]["io_mode"].as_str().unwrap_or("?").to_string();
        if mode == "direct" && io != "direct" {
            eprintln!("skipping direct: the probe chose {io} on this filesystem");
            continue;
        }
        assert_eq!(s["net_copy_bytes"], 0, "{mode}: transport copied: {s}");
        assert_eq!(
            s["replica"]["restamp_copy_bytes"], 0,
            "{mode}: head copied to restamp"
        );
        assert_eq!(
            s["storage"]["copy_bytes"], 0,
            "{mode}: storage copied ({io})"
        );
        assert!(s["storage"]["batches"].as_u64().unwrap_or(0) > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_payload_copies_on_any_replica_of_a_chain() {
    for mode in ["buffered", "direct"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let port = common::free_port_run();
        let addrs: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", port + i)).collect();
        let mut dev = std::process::Command::new(env!("CARGO_BIN_EXE_log-server"))
            .args([
                "dev",
                "--io-mode",
                mode,
                "--port",
                &port.to_string(),
                "--dir",
            ])
            .arg(tmp.path().join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn dev chain");
        for a in &addrs {
            common::wait_listening(
                a.parse().expect("addr"),
                std::time::Duration::from_secs(30),
                Some(&mut dev),
            );
        }
        let client = Client::connect(ClientConfig::new(addrs.clone()))
            .await
            .expect("connect");
        load(&client, 150).await;
        for node in 0..3 {
            let s = client.status_of(node).await.expect("status");
            let io = s["storage"]["io_mode"].as_str().unwrap_or("?").to_string();
            if mode == "direct" && io != "direct" {
                eprintln!("skipping direct: the probe chose {io} on this filesystem");
                break;
            }
            assert_eq!(
                s["net_copy_bytes"], 0,
                "{mode} node {node}: transport copied"
            );
            assert_eq!(
                s["storage"]["copy_bytes"], 0,
                "{mode} node {node}: storage copied"
            );
            assert_eq!(
                s["replica"]["restamp_copy_bytes"], 0,
                "{mode} node {node}: restamp copied"
            );
            assert!(
                s["storage"]["batches"].as_u64().unwrap_or(0) > 0,
                "node {node} stored nothing"
            );
        }
        let _ = dev.kill();
        let _ = dev.wait();
    }
}
