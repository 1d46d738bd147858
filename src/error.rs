//! The errors tollgate itself produces.

/// An error made by a tollgate layer rather than by the inner service.
///
/// Services in this crate return [`tower::BoxError`], as tower's own
/// middleware does; an error of ours is found with
/// `err.downcast_ref::<tollgate::Error>()`. Errors of the inner service are
/// passed through unchanged inside the box.
///
/// The enum is `#[non_exhaustive]`: new layers may add variants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value makes no sense (a zero rate, `min > max`, ...).
    #[error("invalid {setting} configuration: {reason}")]
    InvalidConfig {
        /// Which setting is wrong (e.g. `"backoff"`).
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The concurrency gate had every slot busy and its queue full: the
    /// request was refused without waiting.
    #[error("refused: every slot is busy and the waiting queue is full")]
    QueueFull,

    /// The request waited in the concurrency gate's queue for longer than
    /// its `queue_timeout`.
    #[error("gave up waiting for a slot: queue_timeout elapsed")]
    QueueTimeout,

    /// The rate limiter would make this request wait longer than its
    /// `max_wait` for a token (or a cool-down pushed its token further).
    #[error("rate limited: the connection's next token is {retry_after:?} away")]
    RateLimited {
        /// How long until the connection's next token is ready.
        retry_after: std::time::Duration,
    },

    /// The shared store (feature `redis`) could not be reached or refused
    /// the connection (wrong password, not a Redis server) when it was
    /// set up. Once set up, a store that fails is never this error: the
    /// rate limiter decides locally until the store answers again.
    #[error("the shared store is unavailable: {reason}")]
    Store {
        /// What the store's client said.
        reason: String,
    },
}

impl Error {
    pub(crate) fn invalid_config(setting: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            setting,
            reason: reason.into(),
        }
    }
}
