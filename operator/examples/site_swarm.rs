//! Simulated site agents for the gateway's scale figure (`bench/sites.sh`): enrols `--sites` sites with
//! join tokens on a running coordinator, opens one mTLS `Session` each with a `SiteHello`, holds them
//! open, and prints one JSON line per phase with the coordinator's resident memory (`--pid`) and the
//! bytes each site sent and received. Not a test: a measuring tool.

use std::time::{Duration, Instant};

use caduceus_operator::gateway::enrol;
use caduceus_operator::site::identity::channel;
use caduceus_proto::v1::site_gateway_client::SiteGatewayClient;
use caduceus_proto::v1::{EnrolRequest, SiteHello, SiteMessage, site_message};
use clap::Parser;
use prost::Message;

#[derive(Parser)]
struct Args {
    /// The coordinator's operator namespace.
    #[arg(long)]
    namespace: String,
    /// The gateway's address (host:port).
    #[arg(long)]
    gateway: String,
    /// How many sites to simulate.
    #[arg(long, default_value_t = 50)]
    sites: usize,
    /// The coordinator operator's pid (its VmRSS is read from /proc).
    #[arg(long)]
    pid: u32,
    /// How long to hold the streams open before measuring.
    #[arg(long, default_value_t = 10)]
    hold_secs: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    let ca = enrol::ensure_sites_ca(&client, &args.namespace).await?;
    let ca_pem = ca.cert_pem().to_string();
    println!(
        "{}",
        serde_json::json!({"phase": "baseline", "sites": 0, "rss_kib": rss_kib(args.pid)})
    );
    let t0 = Instant::now();
    let mut streams = Vec::new();
    let mut sent = 0usize;
    for i in 0..args.sites {
        let name = format!("swarm-{i:03}");
        let (token, _) =
            enrol::create_join_token(&client, &args.namespace, &name, 600, &args.gateway).await?;
        let (key, csr) = caduceus_pki::site_key_and_csr(&name)?;
        let enrol_req = EnrolRequest {
            token: token.to_string(),
            csr_pem: csr,
        };
        sent += enrol_req.encoded_len();
        let resp = SiteGatewayClient::new(channel(&args.gateway, &ca_pem, None).await?)
            .enrol(enrol_req)
            .await?
            .into_inner();
        let mut gw =
            SiteGatewayClient::new(channel(&args.gateway, &ca_pem, Some((&resp.cert_pem, &key))).await?);
        let hello = SiteHello {
            hospital_spec_json: serde_json::json!({
                "data": {"claimName": "data"},
                "privacyBudget": {"epsilon": 8.0, "delta": 1e-5},
            })
            .to_string(),
            ready: true,
            seal_public_key: caduceus_secagg::SealKeyPair::generate()?.public_key().to_vec(),
            ..Default::default()
        };
        let msg = SiteMessage {
            body: Some(site_message::Body::Hello(hello)),
        };
        sent += msg.encoded_len();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(msg).await?;
        let out = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let inbound = gw.session(out).await?.into_inner();
        streams.push((tx, inbound));
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    println!(
        "{}",
        serde_json::json!({
            "phase": "connected", "sites": streams.len(), "rss_kib": rss_kib(args.pid),
            "connect_seconds": (connect_secs * 10.0).round() / 10.0,
            "bytes_sent_per_site_to_connect": sent / args.sites.max(1),
        })
    );
    drop(streams);
    Ok(())
}
