//! The examples' throttling server, on its own: starts it on 127.0.0.1,
//! sends it a burst of 8 requests on one connection (its quota here is 5 a
//! second), prints what it answered, and exits.
//!
//! ```text
//! cargo run --example throttled_server
//! ```

mod common;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (addr, stats) = common::throttled_server(5).await?;
    println!("throttling server on http://{addr}: 5 requests a second per x-connection");
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    for n in 1..=8 {
        let request = http::Request::get(format!("http://{addr}/leads/{n}"))
            .header("x-connection", "crm-1")
            .body(Empty::new())?;
        let response = client.request(request).await?;
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| format!(", Retry-After: {}", v.to_str().unwrap_or("?")))
            .unwrap_or_default();
        println!("request {n}: {}{retry_after}", response.status());
    }
    println!("{stats:?}");
    Ok(())
}
