//! The fleet story: "100 Flows all starting in a relatively short time
//! talking to the same back end server". Here four worker processes start
//! at the same moment and import 2,000 CRM leads (500 each) over 2
//! connections into a local server that allows each connection 50 requests
//! a second (100 a second in all) and answers 429 with `Retry-After`
//! beyond that. The same import runs four ways; a table at the end.
//!
//! ```text
//! cargo run --example fleet --features redis
//! ```
//!
//! It needs `redis-server` (`apt-get install -y redis-server`): the example
//! starts its own on a free 127.0.0.1 port, with a temporary directory and
//! no persistence, and stops it (and removes the directory) when it ends.
//!
//! - **quota, no store**: each worker is given the API's documented quota,
//!   50 a second per connection with a burst of 10, and believes it owns
//!   it. Each is right about its own rate and wrong about the connection:
//!   four of them offer the server up to four times what it allows, and
//!   each learns a pace only from the 429s it meets itself.
//! - **quota + store**: the same quota, with a `RedisStore`: the four keep
//!   each connection's bucket, cool-down and learned pace in one Redis
//!   hash, so they spend one quota between them, as one client would.
//! - **no quota, no store**: no quota at all (the builder's default), each
//!   worker pausing and pacing itself from the 429s it meets.
//! - **no quota + store**: no quota at all (the builder's default): the
//!   server's 429s pause each connection for the whole fleet and teach the
//!   fleet one pace.
//!
//! Otherwise each worker runs tollgate's default stack: 25 requests at a
//! time, retries on `Backoff::power_automate()` (the builder's default),
//! which never waits less than the server's `Retry-After`. Each feeds its
//! leads to `client.send_all(..)`, which keeps as many in hand as the gate
//! admits (25 running, 10 + 25 waiting), so none is refused for a full
//! queue. The table shows,
//! per run, the leads delivered and lost (a lead still refused after its
//! retries is lost), the 429s the server answered, goodput as a fraction of
//! the server's capacity (leads delivered over the time from the common
//! start to the last worker's finish, against 100 a second), the slowest
//! and fastest worker's time, and the decisions taken locally because
//! Redis failed (none while it is healthy).
//!
//! What to look for: without the store, the four overrun the server until
//! each has learned a pace of its own, and every 429 sends its lead back
//! to wait at least 5 s (the policy's shortest wait) while it holds one of
//! its worker's 25 slots. With the store and the quota, 429s are rare: a
//! server that counts in fixed windows still refuses the odd request sent
//! at the end of one window that arrives in the next, and that one pauses
//! its connection for the whole fleet until `Retry-After`. Without a quota
//! the fleet's first requests go unpaced, and its pace comes from the 429s
//! they earn. Each 429's retry, its `Retry-After` later, can also be what
//! the slowest worker is waiting for at the end.
//!
//! With `TOLLGATE_SERVER=http://127.0.0.1:port` the workers import into
//! that server instead (HTTP/1.1), and the 429s are the ones they saw:
//! `scripts/bench.sh` runs it against nginx's `limit_req` this way.
//!
//! Each worker is this same program run again with `TOLLGATE_FLEET_WORKER`
//! set; it prints one `FLEET-RESULT` line for the parent to read.

mod common;

use common::{lead, CONNECTIONS};

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::redis::RedisStore;
use tollgate::{Quota, Tollgate};
use tower::BoxError;

const WORKERS: u64 = 4;
const LEADS_PER_WORKER: u64 = 500;
const LEADS: u64 = WORKERS * LEADS_PER_WORKER;
/// What the server allows each connection a second.
const SERVER_PER_SECOND: u32 = 50;
/// What the server allows in all: its capacity, for goodput.
const CAPACITY: f64 = SERVER_PER_SECOND as f64 * CONNECTIONS.len() as f64;
/// Each worker's concurrency gate: the builder's default, written out.
const PARALLELISM: usize = 25;
/// Time given to the workers to start and connect before the common start.
const STARTUP: Duration = Duration::from_millis(1_500);

/// Set (to the worker's number) in a worker's environment.
const WORKER_VAR: &str = "TOLLGATE_FLEET_WORKER";
const RESULT: &str = "FLEET-RESULT";

/// The quota the API documents for each connection.
fn documented_quota() -> Quota {
    Quota::per_second(SERVER_PER_SECOND).burst(10)
}

fn unix_micros() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970");
    u64::try_from(since.as_micros()).expect("a clock before the year 500,000")
}

/// How the workers of a run are set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The documented quota, each worker on its own.
    Alone,
    /// The documented quota, shared through Redis.
    Shared,
    /// No quota; each worker learns its own pace from its 429s.
    Guessing,
    /// No quota; the pace learned from 429s, shared through Redis.
    Learned,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Alone, Mode::Shared, Mode::Guessing, Mode::Learned];

    /// How it is named in a worker's environment and in Redis key prefixes.
    fn tag(self) -> &'static str {
        match self {
            Mode::Alone => "alone",
            Mode::Shared => "shared",
            Mode::Guessing => "guessing",
            Mode::Learned => "learned",
        }
    }

    /// How it is named in the table.
    fn title(self) -> &'static str {
        match self {
            Mode::Alone => "quota, no store",
            Mode::Shared => "quota + store",
            Mode::Guessing => "no quota, no store",
            Mode::Learned => "no quota + store",
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(tag: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|mode| mode.tag() == tag)
            .ok_or_else(|| format!("no mode is called {tag:?}"))
    }
}

// ---------------------------------------------------------------------------
// The worker: one fleet member, in its own process.
// ---------------------------------------------------------------------------

/// What the parent tells a worker, through its environment.
#[derive(Debug)]
struct Job {
    worker: u64,
    mode: Mode,
    server: SocketAddr,
    /// The example's own server (HTTP/2), or another one (HTTP/1.1).
    server_is_ours: bool,
    redis: String,
    prefix: String,
    first_lead: u64,
    leads: u64,
    /// When every worker starts sending, in µs since the Unix epoch.
    start: u64,
}

/// The variable `name` of a worker's environment, parsed.
fn from_env<T>(name: &str) -> Result<T, BoxError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let text = std::env::var(name).map_err(|_| format!("{name} is not set"))?;
    let value = text
        .parse()
        .map_err(|error| format!("{name}={text:?}: {error}"))?;
    Ok(value)
}

impl Job {
    fn from_env() -> Result<Job, BoxError> {
        Ok(Job {
            worker: from_env(WORKER_VAR)?,
            mode: from_env("TOLLGATE_FLEET_MODE")?,
            server: from_env("TOLLGATE_FLEET_SERVER")?,
            server_is_ours: from_env("TOLLGATE_FLEET_OURS")?,
            redis: from_env("TOLLGATE_FLEET_REDIS")?,
            prefix: from_env("TOLLGATE_FLEET_PREFIX")?,
            first_lead: from_env("TOLLGATE_FLEET_FIRST_LEAD")?,
            leads: from_env("TOLLGATE_FLEET_LEADS")?,
            start: from_env("TOLLGATE_FLEET_START")?,
        })
    }

    /// The command that runs this job in a new process.
    fn command(&self) -> std::io::Result<Command> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(WORKER_VAR, self.worker.to_string())
            .env("TOLLGATE_FLEET_MODE", self.mode.tag())
            .env("TOLLGATE_FLEET_SERVER", self.server.to_string())
            .env("TOLLGATE_FLEET_OURS", self.server_is_ours.to_string())
            .env("TOLLGATE_FLEET_REDIS", &self.redis)
            .env("TOLLGATE_FLEET_PREFIX", &self.prefix)
            .env("TOLLGATE_FLEET_FIRST_LEAD", self.first_lead.to_string())
            .env("TOLLGATE_FLEET_LEADS", self.leads.to_string())
            .env("TOLLGATE_FLEET_START", self.start.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        Ok(command)
    }
}

async fn worker(job: Job) -> Result<(), BoxError> {
    let http = Client::builder(TokioExecutor::new())
        .http2_only(job.server_is_ours)
        .build_http::<Full<Bytes>>();
    // Every attempt the stack sends, and the 429s among them: the server's
    // own count when the server is not ours (nginx).
    let attempts = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let (sent, seen) = (Arc::clone(&attempts), Arc::clone(&throttled));
    let http = tower::ServiceBuilder::new()
        .map_request(move |request: Request<Full<Bytes>>| {
            sent.fetch_add(1, Ordering::Relaxed);
            request
        })
        .map_response(move |response: http::Response<hyper::body::Incoming>| {
            if response.status() == http::StatusCode::TOO_MANY_REQUESTS {
                seen.fetch_add(1, Ordering::Relaxed);
            }
            response
        })
        .service(http);
    let builder = Tollgate::builder().parallelism(PARALLELISM);
    let builder = match job.mode {
        Mode::Alone => builder.per_connection(documented_quota()),
        Mode::Guessing => builder,
        Mode::Shared | Mode::Learned => {
            let store = RedisStore::connect(&job.redis).await?.prefix(&job.prefix)?;
            let builder = builder.store(store);
            if job.mode == Mode::Shared {
                builder.per_connection(documented_quota())
            } else {
                builder
            }
        }
    };
    let client = builder.build(http)?;
    // ConcurrencyGate<Retry<RateLimit<_>>>: the rate limiter's figures.
    let rate_limit = client.get_ref().get_ref().handle();

    tokio::time::sleep(Duration::from_micros(
        job.start.saturating_sub(unix_micros()),
    ))
    .await;

    let leads = job.first_lead..job.first_lead + job.leads;
    let mut results = client.send_all(stream::iter(leads).map(|n| lead(job.server, n)));
    let (mut delivered, mut lost, mut first_lost) = (0, 0, None);
    while let Some((index, result)) = results.next().await {
        let n = job.first_lead + index as u64;
        match delivery(result).await {
            Ok(()) => delivered += 1,
            Err(why) => {
                lost += 1;
                first_lost.get_or_insert(format!("lead {n} {why}"));
            }
        }
    }
    let finished = unix_micros();

    if let Some(first) = first_lost {
        eprintln!(
            "  worker {}: {lost} leads lost, the first: {first}",
            job.worker
        );
    }
    println!(
        "{RESULT} worker={} delivered={delivered} lost={lost} finished={finished} fallbacks={} \
         attempts={} throttled={}",
        job.worker,
        rate_limit.fallbacks(),
        attempts.load(Ordering::Relaxed),
        throttled.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Whether a lead was delivered: its answer read, and a success.
async fn delivery(
    result: Result<http::Response<hyper::body::Incoming>, BoxError>,
) -> Result<(), String> {
    let response = result.map_err(|error| format!("failed: {error}"))?;
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|error| format!("reading the answer: {error}"))?;
    if !status.is_success() {
        return Err(format!("ended {status}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The parent: Redis, the throttling server, the workers, the table.
// ---------------------------------------------------------------------------

/// A `redis-server` of our own on a free 127.0.0.1 port, with no
/// persistence and a temporary directory; killed, and the directory
/// removed, when dropped (a panic included).
struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts it and waits until it answers `PING`. An error of kind
    /// `NotFound` if `redis-server` is not installed.
    fn start() -> std::io::Result<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!(
            "tollgate-fleet-example-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let spawned = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error);
            }
        };
        // From here on, dropping `server` cleans up.
        let mut server = RedisServer { child, port, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !server.answers_ping() {
            if let Some(status) = server.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "redis-server exited at start ({status})"
                )));
            }
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "redis-server did not answer PING within 10 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = Vec::new();
        let mut chunk = [0u8; 64];
        while !reply.ends_with(b"\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(read) => reply.extend_from_slice(&chunk[..read]),
            }
        }
        reply == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A run's worker processes; any still running when this is dropped (the
/// parent failed or panicked) are killed.
#[derive(Default)]
struct Workers(Vec<Child>);

impl Workers {
    /// Waits for each worker in turn: its exit status and what it printed.
    fn wait(mut self) -> std::io::Result<Vec<(ExitStatus, String)>> {
        let mut ended = Vec::with_capacity(self.0.len());
        // Take them in order; those not yet taken stay under `Drop`.
        self.0.reverse();
        while let Some(child) = self.0.pop() {
            let output = child.wait_with_output()?;
            ended.push((
                output.status,
                String::from_utf8_lossy(&output.stdout).into_owned(),
            ));
        }
        Ok(ended)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What one worker reported.
#[derive(Debug)]
struct Report {
    delivered: u64,
    lost: u64,
    /// µs since the Unix epoch.
    finished: u64,
    fallbacks: u64,
    attempts: u64,
    throttled: u64,
}

impl Report {
    /// Reads the `FLEET-RESULT key=value ...` line.
    fn parse(line: &str) -> Result<Report, BoxError> {
        let fields: HashMap<&str, u64> = line
            .split_whitespace()
            .filter_map(|field| field.split_once('='))
            .map(|(key, value)| Ok((key, value.parse()?)))
            .collect::<Result<_, std::num::ParseIntError>>()?;
        let field = |key: &str| {
            fields
                .get(key)
                .copied()
                .ok_or_else(|| format!("no {key} in {line:?}"))
        };
        Ok(Report {
            delivered: field("delivered")?,
            lost: field("lost")?,
            finished: field("finished")?,
            fallbacks: field("fallbacks")?,
            attempts: field("attempts")?,
            throttled: field("throttled")?,
        })
    }
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    mode: Mode,
    delivered: u64,
    lost: u64,
    /// Requests the workers sent, and the 429s among them.
    attempts: u64,
    throttled: u64,
    /// From the common start to the last worker's finish.
    elapsed: Duration,
    fastest: Duration,
    fallbacks: u64,
}

impl Row {
    fn goodput(&self) -> f64 {
        self.delivered as f64 / (self.elapsed.as_secs_f64() * CAPACITY)
    }
}

/// The server `TOLLGATE_SERVER` names (`http://127.0.0.1:port`, as
/// `scripts/bench.sh` starts nginx), if set.
fn their_server() -> Result<Option<SocketAddr>, BoxError> {
    let Ok(url) = std::env::var("TOLLGATE_SERVER") else {
        return Ok(None);
    };
    let address = url.trim_start_matches("http://").trim_end_matches('/');
    Ok(Some(address.parse().map_err(|error| {
        format!("TOLLGATE_SERVER={url:?}: want http://127.0.0.1:port ({error})")
    })?))
}

async fn run(mode: Mode, redis: &RedisServer) -> Result<Row, BoxError> {
    // A fresh server per run, so each run's 429s are its own; or the one
    // TOLLGATE_SERVER names, after a pause that lets its buckets refill.
    let (server, server_is_ours) = match their_server()? {
        Some(server) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            (server, false)
        }
        None => (common::throttled_server(SERVER_PER_SECOND).await?.0, true),
    };
    println!(
        "{}: {WORKERS} workers x {LEADS_PER_WORKER} leads, on http://{server}",
        mode.title()
    );
    let start = unix_micros() + STARTUP.as_micros() as u64;
    let mut workers = Workers::default();
    for worker in 0..WORKERS {
        let job = Job {
            worker,
            mode,
            server,
            server_is_ours,
            redis: redis.url(),
            // Runs share the Redis, not its state.
            prefix: format!("fleet-example-{}-{}", std::process::id(), mode.tag()),
            first_lead: worker * LEADS_PER_WORKER,
            leads: LEADS_PER_WORKER,
            start,
        };
        workers.0.push(job.command()?.spawn()?);
    }
    let ended = tokio::task::spawn_blocking(move || workers.wait()).await??;

    let mut reports = Vec::with_capacity(ended.len());
    for (worker, (status, stdout)) in ended.into_iter().enumerate() {
        if !status.success() {
            return Err(format!("{}: worker {worker} failed ({status})", mode.title()).into());
        }
        let mut report = None;
        for line in stdout.lines() {
            match line.strip_prefix(RESULT) {
                Some(fields) => report = Some(Report::parse(fields)?),
                None => println!("  worker {worker}: {line}"),
            }
        }
        reports.push(report.ok_or_else(|| format!("worker {worker} printed no {RESULT} line"))?);
    }

    let took = |report: &Report| Duration::from_micros(report.finished.saturating_sub(start));
    let elapsed = reports.iter().map(took).max().unwrap_or_default();
    let fastest = reports.iter().map(took).min().unwrap_or_default();
    Ok(Row {
        mode,
        delivered: reports.iter().map(|report| report.delivered).sum(),
        lost: reports.iter().map(|report| report.lost).sum(),
        attempts: reports.iter().map(|report| report.attempts).sum(),
        throttled: reports.iter().map(|report| report.throttled).sum(),
        elapsed,
        fastest,
        fallbacks: reports.iter().map(|report| report.fallbacks).sum(),
    })
}

async fn parent() -> Result<(), BoxError> {
    let redis = match RedisServer::start() {
        Ok(redis) => redis,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("this example starts its own redis-server, and none is installed:");
            eprintln!("  apt-get install -y redis-server   (or your system's package)");
            std::process::exit(1);
        }
        Err(error) => return Err(format!("starting redis-server: {error}").into()),
    };
    println!(
        "{LEADS} leads over {CONNECTIONS:?} from {WORKERS} worker processes started at once; \
         the server ({}) allows {SERVER_PER_SECOND}/s per connection ({CAPACITY}/s in all); \
         redis-server on {}\n",
        match their_server()? {
            Some(server) => format!("http://{server}"),
            None => "this example's, fixed one-second windows".into(),
        },
        redis.url()
    );

    let mut rows = Vec::new();
    for mode in Mode::ALL {
        let row = run(mode, &redis).await?;
        println!(
            "  done in {:.1?}: {} delivered, {} lost, {} 429s\n",
            row.elapsed, row.delivered, row.lost, row.throttled
        );
        rows.push(row);
    }

    println!(
        "{:<18} {:>9} {:>5} {:>16} {:>8} {:>18} {:>9}",
        "run", "delivered", "lost", "429s (share)", "goodput", "slowest / fastest", "fallbacks"
    );
    for row in &rows {
        let share = if row.attempts == 0 {
            0.0
        } else {
            100.0 * row.throttled as f64 / row.attempts as f64
        };
        println!(
            "{:<18} {:>9} {:>5} {:>16} {:>8.3} {:>18} {:>9}",
            row.mode.title(),
            row.delivered,
            row.lost,
            format!("{} ({share:.1}%)", row.throttled),
            row.goodput(),
            format!(
                "{:.1} s / {:.1} s",
                row.elapsed.as_secs_f64(),
                row.fastest.as_secs_f64()
            ),
            row.fallbacks,
        );
    }
    println!(
        "\ngoodput: leads delivered / (seconds from the common start to the last worker's finish \
         x {CAPACITY}/s); fallbacks: decisions taken locally because Redis failed"
    );

    let store_lost: u64 = rows
        .iter()
        .filter(|row| matches!(row.mode, Mode::Shared | Mode::Learned))
        .map(|row| row.lost)
        .sum();
    if store_lost > 0 {
        return Err(
            format!("the fleet lost {store_lost} leads with the store; it should not").into(),
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    if std::env::var_os(WORKER_VAR).is_some() {
        worker(Job::from_env()?).await
    } else {
        parent().await
    }
}
