//! Which attempts are worth retrying.

use std::error::Error as StdError;

use http::{HeaderMap, Method, StatusCode};

/// How one attempt ended, as a [`Classify`] sees it.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// The inner service answered.
    Response {
        /// The status code.
        status: StatusCode,
        /// The response headers (e.g. to look for `Retry-After`).
        headers: &'a HeaderMap,
    },
    /// The inner service failed (connection refused, reset, timed out, ...).
    Error(&'a (dyn StdError + Send + Sync + 'static)),
}

/// Decides whether an attempt should be retried.
///
/// Implemented by [`DefaultClassify`] and by any
/// `Fn(&Method, &Outcome<'_>) -> bool`. It decides *whether*; the retry layer
/// decides *when* (the backoff, `Retry-After`) and *whether it still can*
/// (retries left, the deadline, a replayable body).
pub trait Classify {
    /// `true` if a request with `method` that ended in `outcome` should be
    /// tried again.
    fn is_retryable(&self, method: &Method, outcome: &Outcome<'_>) -> bool;
}

impl<F> Classify for F
where
    F: Fn(&Method, &Outcome<'_>) -> bool,
{
    fn is_retryable(&self, method: &Method, outcome: &Outcome<'_>) -> bool {
        self(method, outcome)
    }
}

/// The default rule: `429 Too Many Requests` for every method; `408`, `500`,
/// `502`, `503`, `504` and inner-service errors only for idempotent methods
/// (but never a request reqwest refused to build, with feature `reqwest`).
///
/// A 429 means the server did *not* process the request, so repeating even a
/// `POST` is safe. The others may come after the server acted (a 504 from a
/// proxy whose upstream committed the write), so only methods that RFC 9110
/// §9.2.2 calls idempotent (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`,
/// `DELETE`) repeat them, unless
/// [`retry_non_idempotent`](DefaultClassify::retry_non_idempotent) says so.
///
/// Use it inside your own classifier to extend rather than replace it:
///
/// ```
/// use http::{Method, StatusCode};
/// use tollgate::retry::{Classify, DefaultClassify, Outcome};
///
/// // Also retry this API's "409 Conflict: try again" on idempotent methods.
/// let classify = |method: &Method, outcome: &Outcome<'_>| {
///     matches!(outcome, Outcome::Response { status: StatusCode::CONFLICT, .. })
///         && DefaultClassify::is_idempotent(method)
///         || DefaultClassify::new().is_retryable(method, outcome)
/// };
/// # let _ = tollgate::RetryLayer::new(tollgate::Backoff::none()).classify(classify);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultClassify {
    retry_non_idempotent: bool,
}

impl DefaultClassify {
    /// The default rule, idempotent methods only for everything but 429.
    pub const fn new() -> Self {
        DefaultClassify {
            retry_non_idempotent: false,
        }
    }

    /// Also retry `POST`, `PATCH` and other non-idempotent methods on the
    /// statuses and errors that idempotent methods retry. Default `false`:
    /// a retried `POST` may create a second lead.
    pub const fn retry_non_idempotent(mut self, retry: bool) -> Self {
        self.retry_non_idempotent = retry;
        self
    }

    /// Whether RFC 9110 §9.2.2 calls `method` idempotent.
    pub fn is_idempotent(method: &Method) -> bool {
        matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        )
    }
}

impl Classify for DefaultClassify {
    fn is_retryable(&self, method: &Method, outcome: &Outcome<'_>) -> bool {
        let may_repeat = self.retry_non_idempotent || Self::is_idempotent(method);
        match outcome {
            Outcome::Response { status, .. } => match *status {
                StatusCode::TOO_MANY_REQUESTS => true,
                StatusCode::REQUEST_TIMEOUT
                | StatusCode::INTERNAL_SERVER_ERROR
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT => may_repeat,
                _ => false,
            },
            #[cfg(feature = "reqwest")]
            Outcome::Error(error) if crate::reqwest::is_permanent(*error) => false,
            Outcome::Error(_) => may_repeat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(method: Method, code: u16, classify: DefaultClassify) -> bool {
        let headers = HeaderMap::new();
        let outcome = Outcome::Response {
            status: StatusCode::from_u16(code).unwrap(),
            headers: &headers,
        };
        classify.is_retryable(&method, &outcome)
    }

    #[test]
    fn default_rule() {
        let d = DefaultClassify::new();
        for m in [Method::GET, Method::POST, Method::PATCH, Method::PUT] {
            assert!(status(m, 429, d));
        }
        for code in [408, 500, 502, 503, 504] {
            assert!(status(Method::GET, code, d));
            assert!(status(Method::DELETE, code, d));
            assert!(!status(Method::POST, code, d), "{code}");
            assert!(!status(Method::PATCH, code, d), "{code}");
            assert!(status(Method::POST, code, d.retry_non_idempotent(true)));
        }
        for code in [200, 201, 301, 400, 401, 403, 404, 409, 501, 505] {
            assert!(!status(Method::GET, code, d), "{code}");
        }
        let err = std::io::Error::other("reset");
        assert!(d.is_retryable(&Method::GET, &Outcome::Error(&err)));
        assert!(!d.is_retryable(&Method::POST, &Outcome::Error(&err)));
    }
}
