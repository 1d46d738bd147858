//! The layers' figures, published through the [`metrics`](https://docs.rs/metrics)
//! facade (feature `metrics`), for a Prometheus or OpenTelemetry exporter
//! to serve.
//!
//! With the feature on, every layer publishes without code of yours:
//! install a recorder (an exporter) before the first request and the names
//! below appear. What the handles
//! ([`RateLimitHandle`](crate::rate_limit::RateLimitHandle),
//! [`ConcurrencyGateHandle`](crate::concurrency::ConcurrencyGateHandle))
//! show is read every [`sample_every`](Metrics::sample_every) (one second)
//! by a task each layer starts on its first request, and published as what
//! changed since the last reading. So a request that goes at once does one
//! load of a flag more than without the feature (to know the task runs); a
//! request that waits (for a slot, a token) also reads the clock when it
//! starts to, and records its wait when it ends. Events (a retry, a
//! cool-down) are published as they happen. Without the feature none of
//! this is compiled.
//!
//! The task reads on a tokio timer, so the runtime needs its timers on
//! (`#[tokio::main]` has them; a runtime built by hand, `enable_time()`),
//! as the layers' own waits do. Without them it panics as it starts, once
//! per layer (tokio reports it; with `panic = "abort"`, that ends the
//! process), and the layer publishes its events only.
//!
//! | name | type | published | what |
//! |---|---|---|---|
//! | `tollgate_rate_limit_keys` | gauge | sampled | connections (keys) tracked |
//! | `tollgate_rate_limit_waiting` | gauge | sampled | requests waiting for a token |
//! | `tollgate_rate_limit_admitted_total` | counter | sampled | tokens spent: attempts let through |
//! | `tollgate_rate_limit_fallbacks_total` | counter | sampled | decisions made locally because the fleet's store failed |
//! | `tollgate_rate_limit_evicted_active_total` | counter | sampled | keys evicted while their bucket was still in use |
//! | `tollgate_rate_limit_cool_downs_total` | counter | event, `connection`¹ | cool-downs applied (a 429/503 with `Retry-After`, or a published reset) |
//! | `tollgate_rate_limit_cool_down_seconds` | histogram | event, `connection`¹ | the pause each cool-down applied |
//! | `tollgate_rate_limit_rate_cuts_total` | counter | event, `connection`¹ | paces learned or cut from a throttling answer (429, or 503 with `Retry-After`) |
//! | `tollgate_rate_limit_pace` | gauge | event, `connection`¹ only | requests a second the connection's last such lesson set (set, not summed: the last stack to learn wins) |
//! | `tollgate_rate_limit_token_wait_seconds` | histogram | event, `connection`¹ | arrival to token, for each attempt not sent at once² |
//! | `tollgate_gate_in_flight` | gauge | sampled | requests holding a slot |
//! | `tollgate_gate_queued` | gauge | sampled | requests waiting for a slot (or taking a lent one back) |
//! | `tollgate_gate_lent` | gauge | sampled | admitted requests waiting for a token, their slot lent |
//! | `tollgate_gate_parallelism` | gauge | sampled | the parallelism (learned, if adaptive) |
//! | `tollgate_gate_queue_limit` | gauge | sampled | how many may wait |
//! | `tollgate_gate_refused_total` | counter | sampled | refused: the queue was full |
//! | `tollgate_gate_timed_out_total` | counter | sampled | gave up after `queue_timeout` |
//! | `tollgate_gate_queue_wait_seconds` | histogram | event | time each request handed its slot from the queue waited (not those that timed out or were dropped) |
//! | `tollgate_retry_retries_total` | counter | event, `reason` | retries scheduled, by what is retried: the status (`"429"`, `"503"`, ...) or `"error"` |
//! | `tollgate_retry_gave_up_total` | counter | event, `reason` | retryable outcomes returned instead: `retries_spent`, `retry_after_too_long`, `past_deadline`, `budget_spent`, `not_replayable` |
//! | `tollgate_retry_delay_seconds` | histogram | event | the wait before each retry scheduled |
//!
//! Every series carries the labels given with [`Metrics::label`] (none by
//! default). ¹ With [`per_connection`](Metrics::per_connection), these
//! also carry `connection`: the key's `Display` for a
//! [`ConnectionKey`] (`https://crm.example`), its `Debug` for a key of
//! your own. Off by default, because keys are unbounded: each is a series
//! in the exporter for as long as the process lives (an evicted key's
//! too); and each waiting attempt then pays a lookup in the recorder's
//! registry and its label's string. ² Attempts that go at once (their
//! connection's token there, nobody waiting) are not recorded:
//! `admitted_total` less this histogram's count is how many went at once;
//! with a fleet store every attempt is recorded, its time including the
//! store's round trip.
//!
//! Stacks that publish under the same labels add up: their gauges and
//! counters are sums. A layer dropped (every service, future and handle
//! of it) publishes its last counts at the next reading and takes its
//! gauges' share back out; a layer kept while the runtime that ran its
//! task shuts down takes its gauges' share back out too, and goes on
//! from its counts on the next runtime. Every reading publishes every
//! figure, changed or not, so an exporter that drops idle series
//! (metrics-exporter-prometheus's `idle_timeout`) keeps them. A recorder
//! installed after the first request sees gauges and counts from then on
//! only (as what changed, so not the levels before) and no waits; install
//! it first.
//!
//! ```
//! use std::time::Duration;
//! use tollgate::metrics::Metrics;
//! use tollgate::{Quota, Tollgate};
//!
//! # fn main() -> Result<(), tollgate::Error> {
//! # let client = tower::service_fn(|_: http::Request<()>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(()))
//! # });
//! // Install an exporter first, e.g. metrics-exporter-prometheus's
//! // `PrometheusBuilder::new().install()`; then:
//! let crm = Tollgate::builder()
//!     .per_connection(Quota::per_second(100))
//!     .metrics(Metrics::new().label("client", "crm").per_connection(true))
//!     .build(client)?;
//! # let _ = crm;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use ::metrics::{Histogram, Label, SharedString};

use crate::rate_limit::ConnectionKey;

/// What the layers publish under, and how often their figures are read.
///
/// The default (what a layer uses when it is given none): no labels of
/// yours, no `connection` label, a reading every second.
#[derive(Clone, Debug)]
pub struct Metrics {
    labels: Vec<Label>,
    per_connection: bool,
    sample_every: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// One second: finer than any Prometheus scrape interval (15 s by
    /// default, rarely under 5 s), so a scrape never shows a reading older
    /// than a second, while a layer's task wakes once a second: nothing
    /// beside a client's own timers.
    pub const DEFAULT_SAMPLE_EVERY: Duration = Duration::from_secs(1);

    /// The default: see [`Metrics`].
    pub const fn new() -> Self {
        Metrics {
            labels: Vec::new(),
            per_connection: false,
            sample_every: Self::DEFAULT_SAMPLE_EVERY,
        }
    }

    /// Adds a label to every series this layer (or stack) publishes, e.g.
    /// `("client", "crm")` to tell two clients' stacks apart.
    pub fn label(mut self, key: impl Into<SharedString>, value: impl Into<SharedString>) -> Self {
        self.labels.push(Label::new(key, value));
        self
    }

    /// Whether the rate limiter's events carry the `connection` label (see
    /// the [module docs](self)). Off by default: keys are unbounded, and so
    /// would the series be.
    pub fn per_connection(mut self, on: bool) -> Self {
        self.per_connection = on;
        self
    }

    /// How often the handles' figures are read and published. Zero is
    /// taken as [`DEFAULT_SAMPLE_EVERY`](Self::DEFAULT_SAMPLE_EVERY) (a
    /// task reading without pause would spin).
    pub fn sample_every(mut self, every: Duration) -> Self {
        self.sample_every = if every.is_zero() {
            Self::DEFAULT_SAMPLE_EVERY
        } else {
            every
        };
        self
    }
}

/// The metric names: one place, so the table above and the code agree
/// (a test renders every one).
pub(crate) mod name {
    pub(crate) const RATE_LIMIT_KEYS: &str = "tollgate_rate_limit_keys";
    pub(crate) const RATE_LIMIT_WAITING: &str = "tollgate_rate_limit_waiting";
    pub(crate) const RATE_LIMIT_ADMITTED: &str = "tollgate_rate_limit_admitted_total";
    pub(crate) const RATE_LIMIT_FALLBACKS: &str = "tollgate_rate_limit_fallbacks_total";
    pub(crate) const RATE_LIMIT_EVICTED_ACTIVE: &str = "tollgate_rate_limit_evicted_active_total";
    pub(crate) const RATE_LIMIT_COOL_DOWNS: &str = "tollgate_rate_limit_cool_downs_total";
    pub(crate) const RATE_LIMIT_COOL_DOWN_SECONDS: &str = "tollgate_rate_limit_cool_down_seconds";
    pub(crate) const RATE_LIMIT_RATE_CUTS: &str = "tollgate_rate_limit_rate_cuts_total";
    pub(crate) const RATE_LIMIT_PACE: &str = "tollgate_rate_limit_pace";
    pub(crate) const RATE_LIMIT_TOKEN_WAIT: &str = "tollgate_rate_limit_token_wait_seconds";
    pub(crate) const GATE_IN_FLIGHT: &str = "tollgate_gate_in_flight";
    pub(crate) const GATE_QUEUED: &str = "tollgate_gate_queued";
    pub(crate) const GATE_LENT: &str = "tollgate_gate_lent";
    pub(crate) const GATE_PARALLELISM: &str = "tollgate_gate_parallelism";
    pub(crate) const GATE_QUEUE_LIMIT: &str = "tollgate_gate_queue_limit";
    pub(crate) const GATE_REFUSED: &str = "tollgate_gate_refused_total";
    pub(crate) const GATE_TIMED_OUT: &str = "tollgate_gate_timed_out_total";
    pub(crate) const GATE_QUEUE_WAIT: &str = "tollgate_gate_queue_wait_seconds";
    pub(crate) const RETRY_RETRIES: &str = "tollgate_retry_retries_total";
    pub(crate) const RETRY_GAVE_UP: &str = "tollgate_retry_gave_up_total";
    pub(crate) const RETRY_DELAY: &str = "tollgate_retry_delay_seconds";
}

/// A figure read from a handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reading {
    /// A level: published as a gauge.
    Level(&'static str, u64),
    /// A running count: published as a counter.
    Count(&'static str, u64),
}

impl Reading {
    fn name(self) -> &'static str {
        match self {
            Reading::Level(name, _) | Reading::Count(name, _) => name,
        }
    }

    fn value(self) -> u64 {
        match self {
            Reading::Level(_, value) | Reading::Count(_, value) => value,
        }
    }
}

/// A layer's shared state whose figures the sampling task reads.
pub(crate) trait Sampled: Send + Sync + 'static {
    /// Appends this layer's figures, in the same order every time.
    fn read(&self, into: &mut Vec<Reading>);
}

/// What to publish, given the readings before and now: a gauge moves by
/// its difference, a counter grows by its (a count that went down, which
/// a handle's never does, adds nothing). Every figure is published, changed
/// or not, so that an exporter dropping idle series keeps it.
pub(crate) fn changes(before: &[Reading], now: &[Reading]) -> Vec<Change> {
    now.iter()
        .enumerate()
        .map(|(at, reading)| {
            let was = before
                .get(at)
                .filter(|was| was.name() == reading.name())
                .map_or(0, |was| was.value());
            match *reading {
                Reading::Level(name, value) => Change::Level(name, value as f64 - was as f64),
                Reading::Count(name, value) => Change::Count(name, value.saturating_sub(was)),
            }
        })
        .collect()
}

/// A change to publish.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Change {
    /// Move a gauge by this much.
    Level(&'static str, f64),
    /// Add this much to a counter.
    Count(&'static str, u64),
}

/// One layer's publishing: its labels, and whether its sampling task runs.
#[derive(Debug, Default)]
pub(crate) struct Publisher {
    config: Arc<Metrics>,
    // Whether a sampling task runs (or failed to start: see `Sampler`'s
    // drop).
    sampling: Arc<AtomicBool>,
    // What the sampling tasks have published so far: the next task, on
    // another runtime, goes on from its counts.
    published: Arc<Mutex<Vec<Reading>>>,
    // The histograms a busy waiting path records into, registered on
    // first use: a registry lookup (hashing the name and labels, a lock)
    // once, not per request; with two threads queueing, 380 ns a queued
    // request (BENCHMARKS.md).
    queue_wait: OnceLock<Histogram>,
    token_wait: OnceLock<Histogram>,
    retry_delay: OnceLock<Histogram>,
}

impl Publisher {
    pub(crate) fn new(config: Metrics) -> Self {
        Publisher {
            config: Arc::new(config),
            ..Publisher::default()
        }
    }

    /// Starts the task that reads `source` and publishes its figures, if
    /// it has not started and a tokio runtime is here to run it (else the
    /// next request tries again). Called on every request: one load once
    /// the task runs.
    #[inline]
    pub(crate) fn sample<T: Sampled>(&self, source: &Arc<T>) {
        if !self.sampling.load(Ordering::Relaxed) {
            self.start_sampling(source);
        }
    }

    #[cold]
    fn start_sampling<T: Sampled>(&self, source: &Arc<T>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.sampling.swap(true, Ordering::Relaxed) {
            return;
        }
        describe();
        let sampler = Sampler {
            config: Arc::clone(&self.config),
            published: Arc::clone(&self.published),
            sampling: Arc::clone(&self.sampling),
            started: false,
        };
        runtime.spawn(sample(Arc::clone(source), sampler));
    }

    /// This layer's labels, and `extra`.
    fn labels(&self, extra: Option<Label>) -> Vec<Label> {
        let mut labels = self.config.labels.clone();
        labels.extend(extra);
        labels
    }

    /// The `connection` label of `key`, if asked for.
    fn connection<K: fmt::Debug + 'static>(&self, key: &K) -> Option<Label> {
        if !self.config.per_connection {
            return None;
        }
        let any: &dyn std::any::Any = key;
        let connection = match any.downcast_ref::<ConnectionKey>() {
            Some(key) => key.to_string(),
            None => format!("{key:?}"),
        };
        Some(Label::new("connection", connection))
    }

    /// The histogram `name` under this layer's labels, registered once.
    fn registered<'a>(
        &self,
        histogram: &'a OnceLock<Histogram>,
        name: &'static str,
    ) -> &'a Histogram {
        histogram.get_or_init(|| {
            describe();
            ::metrics::histogram!(name, self.config.labels.iter())
        })
    }

    /// A cool-down of `pause` applied to `key`.
    pub(crate) fn cool_down<K: fmt::Debug + 'static>(&self, key: &K, pause: Duration) {
        describe();
        let labels = self.labels(self.connection(key));
        ::metrics::counter!(name::RATE_LIMIT_COOL_DOWNS, labels.iter()).increment(1);
        ::metrics::histogram!(name::RATE_LIMIT_COOL_DOWN_SECONDS, labels).record(pause);
    }

    /// A pace of `rate` requests a second learned for `key`.
    pub(crate) fn rate_cut<K: fmt::Debug + 'static>(&self, key: &K, rate: f64) {
        describe();
        let labels = self.labels(self.connection(key));
        ::metrics::counter!(name::RATE_LIMIT_RATE_CUTS, labels.iter()).increment(1);
        if self.config.per_connection {
            ::metrics::gauge!(name::RATE_LIMIT_PACE, labels).set(rate);
        }
    }

    /// A request on `key` that got its token `waited` after it arrived.
    pub(crate) fn token_wait<K: fmt::Debug + 'static>(&self, key: &K, waited: Duration) {
        if let Some(connection) = self.connection(key) {
            let labels = self.labels(Some(connection));
            ::metrics::histogram!(name::RATE_LIMIT_TOKEN_WAIT, labels).record(waited);
        } else {
            self.registered(&self.token_wait, name::RATE_LIMIT_TOKEN_WAIT)
                .record(waited);
        }
    }

    /// A request handed a slot `waited` after it queued.
    pub(crate) fn queue_wait(&self, waited: Duration) {
        self.registered(&self.queue_wait, name::GATE_QUEUE_WAIT)
            .record(waited);
    }

    /// A retry of `reason` (a status code, or `"error"`), after `delay`.
    pub(crate) fn retry(&self, reason: SharedString, delay: Duration) {
        describe();
        let labels = self.labels(Some(Label::new("reason", reason)));
        ::metrics::counter!(name::RETRY_RETRIES, labels).increment(1);
        self.registered(&self.retry_delay, name::RETRY_DELAY)
            .record(delay);
    }

    /// A retryable outcome returned for `reason`.
    pub(crate) fn gave_up(&self, reason: &'static str) {
        describe();
        let labels = self.labels(Some(Label::new("reason", reason)));
        ::metrics::counter!(name::RETRY_GAVE_UP, labels).increment(1);
    }
}

/// The sampling task: reads `source` every `config.sample_every` and
/// publishes what changed, until the layer (every service, future and
/// handle of it) is gone: then it publishes the last counts, and the
/// sampler, dropped, takes its gauges' share back out.
async fn sample<T: Sampled>(source: Arc<T>, mut sampler: Sampler) {
    let mut ticks = tokio::time::interval(sampler.config.sample_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sampler.started = true;
    loop {
        ticks.tick().await;
        // Only this task holds the figures now: none can change again.
        let last = Arc::strong_count(&source) == 1;
        if last {
            // What the last holder wrote before it let go is visible.
            std::sync::atomic::fence(Ordering::Acquire);
        }
        sampler.read(&*source);
        if last {
            break;
        }
    }
}

/// A sampling task's state: what its layer has published so far.
struct Sampler {
    config: Arc<Metrics>,
    published: Arc<Mutex<Vec<Reading>>>,
    sampling: Arc<AtomicBool>,
    // Whether the task made its timer (a runtime without timers panics).
    started: bool,
}

impl Sampler {
    fn read<T: Sampled>(&mut self, source: &T) {
        let mut now = Vec::new();
        source.read(&mut now);
        let mut published = lock(&self.published);
        publish(&changes(&published, &now), &self.config.labels);
        *published = now;
    }
}

/// However the task ends (its layer gone, or its runtime shut down), its
/// layer's gauges go back to zero, counts kept, and the layer's next
/// request may start another task; unless this one could not make its
/// timer, which the next could not either.
impl Drop for Sampler {
    fn drop(&mut self) {
        let mut published = lock(&self.published);
        let mut retract = Vec::new();
        for reading in published.iter_mut() {
            if let Reading::Level(name, value) = *reading {
                retract.push(Change::Level(name, -(value as f64)));
                *reading = Reading::Level(name, 0);
            }
        }
        publish(&retract, &self.config.labels);
        drop(published);
        if self.started {
            self.sampling.store(false, Ordering::Relaxed);
        }
    }
}

/// The published readings; nothing that can panic runs under this lock,
/// but recover regardless.
fn lock(published: &Mutex<Vec<Reading>>) -> MutexGuard<'_, Vec<Reading>> {
    published.lock().unwrap_or_else(PoisonError::into_inner)
}

fn publish(changes: &[Change], labels: &[Label]) {
    for change in changes {
        match *change {
            Change::Level(name, by) => ::metrics::gauge!(name, labels.iter()).increment(by),
            Change::Count(name, by) => ::metrics::counter!(name, labels.iter()).increment(by),
        }
    }
}

/// Tells the recorder what each name means (Prometheus' `# HELP`), once
/// a process (a recorder installed later misses it: install it first).
fn describe() {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(describe_all);
}

fn describe_all() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        name::RATE_LIMIT_KEYS,
        "Connections (keys) the rate limiter tracks."
    );
    describe_gauge!(name::RATE_LIMIT_WAITING, "Requests waiting for a token.");
    describe_counter!(
        name::RATE_LIMIT_ADMITTED,
        "Tokens spent: requests let through."
    );
    describe_counter!(
        name::RATE_LIMIT_FALLBACKS,
        "Decisions made on local buckets because the fleet's store failed."
    );
    describe_counter!(
        name::RATE_LIMIT_EVICTED_ACTIVE,
        "Keys evicted while their bucket was still in use."
    );
    describe_counter!(
        name::RATE_LIMIT_COOL_DOWNS,
        "Cool-downs applied to a connection."
    );
    describe_histogram!(
        name::RATE_LIMIT_COOL_DOWN_SECONDS,
        Unit::Seconds,
        "The pause each cool-down applied."
    );
    describe_counter!(
        name::RATE_LIMIT_RATE_CUTS,
        "Paces learned or cut from a 429."
    );
    describe_gauge!(
        name::RATE_LIMIT_PACE,
        "Requests a second the connection's last lesson set."
    );
    describe_histogram!(
        name::RATE_LIMIT_TOKEN_WAIT,
        Unit::Seconds,
        "Arrival to token, for each request not sent at once."
    );
    describe_gauge!(name::GATE_IN_FLIGHT, "Requests holding a slot.");
    describe_gauge!(name::GATE_QUEUED, "Requests waiting for a slot.");
    describe_gauge!(
        name::GATE_LENT,
        "Admitted requests waiting for a token, their slot lent."
    );
    describe_gauge!(name::GATE_PARALLELISM, "The gate's parallelism.");
    describe_gauge!(
        name::GATE_QUEUE_LIMIT,
        "How many requests may wait for a slot."
    );
    describe_counter!(
        name::GATE_REFUSED,
        "Requests refused because the queue was full."
    );
    describe_counter!(
        name::GATE_TIMED_OUT,
        "Requests that gave up waiting after queue_timeout."
    );
    describe_histogram!(
        name::GATE_QUEUE_WAIT,
        Unit::Seconds,
        "Time each request that queued waited for its slot."
    );
    describe_counter!(
        name::RETRY_RETRIES,
        "Retries, by the status (or error) retried."
    );
    describe_counter!(
        name::RETRY_GAVE_UP,
        "Retryable outcomes returned instead of retried, by why."
    );
    describe_histogram!(
        name::RETRY_DELAY,
        Unit::Seconds,
        "The wait before each retry."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_move_by_their_difference_and_counts_grow() {
        let before = [
            Reading::Level("in_flight", 5),
            Reading::Count("admitted", 10),
            Reading::Level("queued", 3),
        ];
        let now = [
            Reading::Level("in_flight", 2),
            Reading::Count("admitted", 17),
            Reading::Level("queued", 3),
        ];
        assert_eq!(
            changes(&before, &now),
            [
                Change::Level("in_flight", -3.0),
                Change::Count("admitted", 7),
                // Unchanged, published all the same (an exporter's idle
                // timeout would drop it otherwise).
                Change::Level("queued", 0.0)
            ]
        );
        // The first reading publishes everything.
        assert_eq!(
            changes(&[], &now),
            [
                Change::Level("in_flight", 2.0),
                Change::Count("admitted", 17),
                Change::Level("queued", 3.0)
            ]
        );
    }

    #[test]
    fn a_zero_sampling_period_is_the_default() {
        let metrics = Metrics::new().sample_every(Duration::ZERO);
        assert_eq!(metrics.sample_every, Metrics::DEFAULT_SAMPLE_EVERY);
    }

    #[test]
    fn connection_labels_only_when_asked_for() {
        let key = ConnectionKey::of_uri(&"https://CRM.example/leads".parse().unwrap());
        let quiet = Publisher::new(Metrics::new().label("client", "crm"));
        assert_eq!(quiet.connection(&key), None);
        assert_eq!(quiet.labels(None), [Label::new("client", "crm")]);
        let per = Publisher::new(Metrics::new().per_connection(true));
        assert_eq!(
            per.connection(&key),
            Some(Label::new("connection", "https://crm.example"))
        );
        // A key of the user's own: its Debug.
        assert_eq!(per.connection(&7u32), Some(Label::new("connection", "7")));
    }
}
