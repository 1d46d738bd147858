//! Which line a request waits in: one per connection, served in turn.

use std::hash::{DefaultHasher, Hash, Hasher};

use http::Request;

use crate::rate_limit::KeyOf;

/// How a [`ConcurrencyGate`](super::ConcurrencyGate) tells the requests of
/// different connections apart, so that waiting requests take the slots
/// in turn, one connection after another.
///
/// Implemented by [`OneLine`] (every request in one line, first come first
/// served: the gate's default, for any request type) and, for
/// `http::Request<B>`, by every [`KeyOf`]: [`ByConnection`](crate::rate_limit::ByConnection)
/// and the closures [`RateLimitLayer::key_by`](crate::RateLimitLayer::key_by)
/// takes. Give the gate the same key as the rate limiter inside it (the
/// [`Tollgate`](crate::Tollgate) builder does), so that a request that
/// lends its slot while waiting for its connection's token comes back to
/// the same line. Sealed: the gate reads the line only when a request has
/// to wait, and the trait's method is not part of the API.
pub trait LineOf<Request>: sealed::Sealed<Request> {}

/// Every request in one line, first come first served.
#[derive(Clone, Copy, Debug, Default)]
pub struct OneLine;

impl<R> LineOf<R> for OneLine {}
impl<F: KeyOf, B> LineOf<Request<B>> for F {}

pub(crate) mod sealed {
    use super::*;

    pub trait Sealed<R> {
        /// The line `request` waits in (it is handed back: a key is read
        /// from the request's head).
        fn line_of(&self, request: R) -> (R, u64);
    }

    impl<R> Sealed<R> for OneLine {
        #[inline]
        fn line_of(&self, request: R) -> (R, u64) {
            (request, 0)
        }
    }

    impl<F: KeyOf, B> Sealed<Request<B>> for F {
        fn line_of(&self, request: Request<B>) -> (Request<B>, u64) {
            let (head, body) = request.into_parts();
            let line = line_of(&self.key_of(&head));
            (Request::from_parts(head, body), line)
        }
    }
}

/// The line of the connection named `key`: the same in the gate (from
/// the request) and in the rate limiter (from the key it already has).
/// Two keys with one hash share a line, which costs only fairness.
pub(crate) fn line_of<K: Hash + ?Sized>(key: &K) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}
