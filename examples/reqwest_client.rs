//! tollgate's default stack around a `reqwest::Client`: 60 leads sent with
//! `client.send_all(..)` over two connections to a local server that
//! allows each connection 10 requests a second.
//!
//! ```text
//! cargo run --example reqwest_client --features reqwest
//! ```
//!
//! `send_all` keeps as many leads in hand as the gate admits, 25 running
//! and 35 waiting (the builder's defaults, 10 + 25): all 60 here, none
//! refused. Each connection's bucket spaces them at the API's documented
//! 10 a second; a 429 that slips through (the server
//! counts in fixed windows) pauses its connection for the `Retry-After` it
//! names, and is retried.

mod common;

use std::time::Duration;

use tollgate::{Quota, Tollgate};
use tower::{BoxError, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (addr, stats) = common::throttled_server(10).await?;
    println!("throttling server on http://{addr}: 10 requests a second per x-connection");

    // Configure reqwest as usual (timeouts, TLS, proxies); tollgate wraps it.
    let reqwest = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let client = Tollgate::builder()
        .per_connection(Quota::per_second(10).burst(1))
        .build(tollgate::reqwest::Client::from(reqwest))?;

    // One request, read back through reqwest's own response type.
    let request = http::Request::get(format!("http://{addr}/leads/0"))
        .header("x-connection", "crm-0")
        .body(String::new())?;
    let response = client.clone().oneshot(request).await?;
    let response = reqwest::Response::from(response);
    println!(
        "GET /leads/0: {} {:?}",
        response.status(),
        response.text().await?
    );

    // Then the batch, bodies as `String`: buffered, so retries resend them.
    common::import_leads::<_, String, _>(client, addr, 60, &stats).await
}
