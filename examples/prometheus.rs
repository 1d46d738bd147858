//! The bulk import watched as production watches it: tollgate's stack
//! publishes through the `metrics` facade, metrics-exporter-prometheus
//! serves it on 127.0.0.1, and this example scrapes that endpoint (as
//! Prometheus would) halfway through the import and after it, and prints
//! what tollgate's series show.
//!
//! ```text
//! cargo run --example prometheus --features metrics
//! ```
//!
//! 4,000 leads go over 2 connections into the local server of
//! `bulk_import`, which allows each connection 500 requests a second and
//! answers 429 with `Retry-After` beyond. The stack has no quota: the
//! server's 429s pause each connection and teach it a pace, which the
//! scrape shows per connection (`Metrics::per_connection`, fine here with
//! two). No code of this example reads tollgate's figures: only the
//! scrape.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::metrics::Metrics;
use tollgate::Tollgate;
use tower::BoxError;

const LEADS: u64 = 4_000;
const SERVER_PER_SECOND: u32 = 500;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The exporter's endpoint, on a port free a moment ago.
    let exporter = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    PrometheusBuilder::new()
        .with_http_listener(exporter)
        // Buckets in seconds, for the waits: a histogram, not a summary,
        // so that Prometheus can add up a fleet's.
        .set_buckets(&[0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0])?
        .install()?;
    println!("Prometheus exporter on http://{exporter}/metrics");

    let (addr, stats) = common::throttled_server(SERVER_PER_SECOND).await?;
    println!("throttling server on http://{addr}: {SERVER_PER_SECOND} requests a second per x-connection\n");

    let hyper = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = Tollgate::builder()
        .parallelism(50)
        .metrics(Metrics::new().label("client", "crm").per_connection(true))
        .build(hyper)?;
    // A clone for the import; this one keeps the stack (and so its
    // gauges) alive for the last scrape.
    let importing = client.clone();
    let import = tokio::spawn(async move {
        common::import_leads::<_, Full<Bytes>, _>(importing, addr, LEADS, &stats).await
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("--- a scrape 2 s into the import (tollgate's series) ---");
    print!("{}", tollgate_series(&scrape(exporter).await?));

    import.await??;
    // The layers publish their figures each second: one more reading.
    tokio::time::sleep(Metrics::DEFAULT_SAMPLE_EVERY + Duration::from_millis(100)).await;
    println!("\n--- a scrape after the import ---");
    let scrape = scrape(exporter).await?;
    print!("{}", tollgate_series(&scrape));

    // What the example promises: the import's figures are in the scrape,
    // a token for every attempt.
    let admitted = series(
        &scrape,
        r#"tollgate_rate_limit_admitted_total{client="crm"}"#,
    );
    let retried = series(
        &scrape,
        r#"tollgate_retry_retries_total{client="crm",reason="429"}"#,
    );
    if admitted != LEADS as f64 + retried {
        return Err(format!(
            "the scrape shows {admitted} tokens spent for {LEADS} leads and {retried} retries"
        )
        .into());
    }
    drop(client);
    Ok(())
}

/// A port on 127.0.0.1 that nothing listened on a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// `GET /metrics`, as Prometheus sends it: the body of the answer.
async fn scrape(exporter: SocketAddr) -> Result<String, BoxError> {
    let mut stream = TcpStream::connect(exporter).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {exporter}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or("the exporter's answer has no body")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("the exporter answered {head}").into());
    }
    Ok(body.to_owned())
}

/// tollgate's series in a scrape (the `# HELP` and `# TYPE` lines left
/// out, and of each histogram its count and sum).
fn tollgate_series(scrape: &str) -> String {
    let mut lines: Vec<&str> = scrape
        .lines()
        .filter(|line| line.starts_with("tollgate_") && !line.contains("_bucket{"))
        .collect();
    lines.sort_unstable();
    lines.iter().map(|line| format!("{line}\n")).collect()
}

/// The value of one series in a scrape, or 0.
fn series(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}
