//! Helpers to unit-test retry and throttling behaviour in virtual time.
//!
//! [`Script`] is a mock HTTP service that answers from a list of
//! [`Reply`]s and records the virtual instant of every attempt, so a test
//! can assert how long the client waited between attempts without waiting
//! real seconds:
//!
//! ```
//! use std::time::Duration;
//! use tollgate::testing::{Reply, Script};
//! use tollgate::{Backoff, RetryLayer};
//! use tower::{Layer, ServiceExt};
//!
//! #[tokio::test(start_paused = true)]
//! # async fn _doc() {}
//! async fn waits_for_the_larger_of_policy_and_retry_after() {
//!     let server = Script::new()
//!         .reply(Reply::status(503).retry_after(Duration::from_secs(10)))
//!         .reply(200);
//!     let client = RetryLayer::new(Backoff::fixed(Duration::from_secs(3))).layer(server.service());
//!
//!     let response = client.oneshot(http::Request::new(())).await.unwrap();
//!
//!     assert_eq!(response.status(), 200);
//!     assert_eq!(server.waits(), [Duration::from_secs(10)]);
//! }
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() { waits_for_the_larger_of_policy_and_retry_after().await }
//! ```
//!
//! Run such tests with `#[tokio::test(start_paused = true)]` (tokio's
//! `test-util` feature): sleeps then complete as soon as nothing else can
//! run, and `tokio::time::Instant` measures the virtual time they took.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Service};

/// One scripted answer: a response, or an inner-service error, after an
/// optional latency.
#[derive(Debug, Clone)]
pub struct Reply {
    kind: ReplyKind,
    latency: Duration,
}

#[derive(Debug, Clone)]
enum ReplyKind {
    Response {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    },
    Error(String),
}

impl Reply {
    /// A response with this status code (an invalid code becomes `500`).
    pub fn status(code: u16) -> Self {
        Reply {
            kind: ReplyKind::Response {
                status: StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                headers: HeaderMap::new(),
                body: String::new(),
            },
            latency: Duration::ZERO,
        }
    }

    /// An inner-service error (as a connection reset would be), a
    /// [`ScriptError`] carrying `message`.
    pub fn error(message: impl Into<String>) -> Self {
        Reply {
            kind: ReplyKind::Error(message.into()),
            latency: Duration::ZERO,
        }
    }

    /// Answers `latency` after the request arrives (in tokio time), as a
    /// slow server would; the default is at once.
    pub fn after(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Adds `Retry-After` in whole seconds (rounded up).
    pub fn retry_after(self, delay: Duration) -> Self {
        let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        self.header(http::header::RETRY_AFTER, &secs.to_string())
    }

    /// Adds a header; a value that is not a valid header value is skipped.
    pub fn header(mut self, name: HeaderName, value: &str) -> Self {
        if let (ReplyKind::Response { headers, .. }, Ok(value)) =
            (&mut self.kind, HeaderValue::from_str(value))
        {
            headers.append(name, value);
        }
        self
    }

    /// Sets the response body.
    pub fn body(mut self, text: impl Into<String>) -> Self {
        if let ReplyKind::Response { body, .. } = &mut self.kind {
            *body = text.into();
        }
        self
    }

    fn make(&self) -> Result<Response<String>, BoxError> {
        match &self.kind {
            ReplyKind::Response {
                status,
                headers,
                body,
            } => {
                let mut response = Response::new(body.clone());
                *response.status_mut() = *status;
                *response.headers_mut() = headers.clone();
                Ok(response)
            }
            ReplyKind::Error(message) => Err(Box::new(ScriptError(message.clone()))),
        }
    }
}

impl From<u16> for Reply {
    fn from(code: u16) -> Self {
        Reply::status(code)
    }
}

/// The error a [`Reply::error`] produces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scripted error: {0}")]
pub struct ScriptError(pub String);

/// One request as the [`Script`] saw it.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When it arrived, in tokio (virtual, under `pause`) time.
    pub at: Instant,
    /// Its method.
    pub method: Method,
    /// Its URI.
    pub uri: Uri,
    /// Its headers.
    pub headers: HeaderMap,
}

struct Log {
    replies: VecDeque<Reply>,
    last: Option<Reply>,
    attempts: Vec<Attempt>,
}

/// A mock HTTP server: answers each request with the next [`Reply`] and
/// records every [`Attempt`].
///
/// When the list runs out the last reply repeats (an empty script answers
/// `200 OK`), so `Script::new().reply(429)` is a server that always
/// throttles. Clones share the list and the record.
#[derive(Clone)]
pub struct Script {
    log: Arc<Mutex<Log>>,
}

impl Script {
    /// An empty script (every request gets `200 OK`).
    pub fn new() -> Self {
        Script {
            log: Arc::new(Mutex::new(Log {
                replies: VecDeque::new(),
                last: None,
                attempts: Vec::new(),
            })),
        }
    }

    /// Appends a reply: a [`Reply`] or a bare status code.
    pub fn reply(self, reply: impl Into<Reply>) -> Self {
        self.lock().replies.push_back(reply.into());
        self
    }

    /// A service answering from this script, for any request body type.
    pub fn service(&self) -> ScriptService {
        ScriptService {
            script: self.clone(),
        }
    }

    /// Every attempt so far, in arrival order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.lock().attempts.clone()
    }

    /// How many attempts arrived.
    pub fn count(&self) -> usize {
        self.lock().attempts.len()
    }

    /// The time between each attempt and the one before it: one entry fewer
    /// than there were attempts.
    pub fn waits(&self) -> Vec<Duration> {
        let log = self.lock();
        log.attempts
            .windows(2)
            .map(|pair| pair[1].at - pair[0].at)
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panicking test thread must not hide the record from the others.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn answer<B>(&self, request: &Request<B>) -> (Duration, Result<Response<String>, BoxError>) {
        let mut log = self.lock();
        log.attempts.push(Attempt {
            at: Instant::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        });
        if let Some(next) = log.replies.pop_front() {
            log.last = Some(next);
        }
        match &log.last {
            Some(reply) => (reply.latency, reply.make()),
            None => (Duration::ZERO, Reply::status(200).make()),
        }
    }
}

impl Default for Script {
    fn default() -> Self {
        Script::new()
    }
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let log = self.lock();
        f.debug_struct("Script")
            .field("replies_left", &log.replies.len())
            .field("attempts", &log.attempts.len())
            .finish()
    }
}

/// The `tower::Service` of a [`Script`]: always ready; answers when the
/// reply's [`after`](Reply::after) latency has passed.
#[derive(Debug, Clone)]
pub struct ScriptService {
    script: Script,
}

impl<B> Service<Request<B>> for ScriptService {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = ScriptFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ScriptFuture {
        let (latency, answer) = self.script.answer(&request);
        ScriptFuture {
            latency: (!latency.is_zero()).then(|| Box::pin(tokio::time::sleep(latency))),
            answer: Some(answer),
        }
    }
}

/// The response future of a [`ScriptService`].
#[derive(Debug)]
pub struct ScriptFuture {
    latency: Option<Pin<Box<Sleep>>>,
    answer: Option<Result<Response<String>, BoxError>>,
}

impl Future for ScriptFuture {
    type Output = Result<Response<String>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(latency) = self.latency.as_mut() {
            ready!(latency.as_mut().poll(cx));
            self.latency = None;
        }
        match self.answer.take() {
            Some(answer) => Poll::Ready(answer),
            None => Poll::Pending,
        }
    }
}
