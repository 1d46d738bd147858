//! tollgate's default stack around hyper-util's legacy `Client`: 60 leads
//! sent with `client.send_all(..)` over two connections to a local server
//! that allows each connection 10 requests a second.
//!
//! ```text
//! cargo run --example hyper_client
//! ```
//!
//! `send_all` keeps as many leads in hand as the gate admits, 25 running
//! and 35 waiting (the builder's defaults, 10 + 25): all 60 here, none
//! refused. Each connection's bucket spaces them at the API's documented
//! 10 a second; a 429 that slips through (the server
//! counts in fixed windows) pauses its connection for the `Retry-After` it
//! names, and is retried.

mod common;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::{Quota, Tollgate};
use tower::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (addr, stats) = common::throttled_server(10).await?;
    println!("throttling server on http://{addr}: 10 requests a second per x-connection");

    // `Full<Bytes>` is `Clone`, so retries resend it.
    let hyper = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = Tollgate::builder()
        .per_connection(Quota::per_second(10).burst(1))
        .build(hyper)?;

    common::import_leads::<_, Full<Bytes>, _>(client, addr, 60, &stats).await
}
