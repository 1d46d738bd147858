//! The concurrency gate: admission, order, refusal, cancellation.

mod common;

use common::{secs, watchdog, DropAfter};

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tollgate::concurrency::ConcurrencyGateHandle;
use tollgate::{ConcurrencyGate, ConcurrencyGateLayer, Error};
use tower::{BoxError, Layer, Service, ServiceExt};

/// An inner service that records call order and how many calls run at
/// once. Each call takes `latency` of tokio time, or, with `latency` zero,
/// yields a few times (for real-time runtimes: no sleeping).
#[derive(Clone, Default)]
struct Probe {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    order: Arc<Mutex<Vec<u32>>>,
    latency: Duration,
}

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<u32> for Probe {
    type Response = u32;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, id: u32) -> Self::Future {
        self.order.lock().unwrap().push(id);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let running = Running(Arc::clone(&self.running));
        let latency = self.latency;
        Box::pin(async move {
            if latency.is_zero() {
                for _ in 0..(id % 7) {
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::time::sleep(latency).await;
            }
            drop(running);
            Ok(id)
        })
    }
}

fn gate(layer: ConcurrencyGateLayer, latency: Duration) -> (ConcurrencyGate<Probe>, Probe) {
    let probe = Probe {
        latency,
        ..Probe::default()
    };
    (layer.layer(probe.clone()), probe)
}

/// Sends `ids` at once, each as its own task (its own waker: a lost
/// wake-up hangs it, which the watchdog reports), in order.
async fn run_all(
    client: &ConcurrencyGate<Probe>,
    ids: std::ops::Range<u32>,
) -> Vec<Result<u32, BoxError>> {
    let tasks: Vec<_> = ids
        .map(|id| tokio::spawn(client.clone().oneshot(id)))
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

fn is(error: &BoxError, want: &Error) -> bool {
    error.downcast_ref::<Error>() == Some(want)
}

/// Spawns `ids` as tasks and lets them all reach the gate.
async fn spawn_all(
    client: &ConcurrencyGate<Probe>,
    ids: std::ops::Range<u32>,
) -> Vec<tokio::task::JoinHandle<Result<u32, BoxError>>> {
    let tasks = ids
        .map(|id| tokio::spawn(client.clone().oneshot(id)))
        .collect();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tasks
}

#[tokio::test(start_paused = true)]
async fn parallelism_in_flight_and_no_more() {
    watchdog(secs(600), async {
        let (client, probe) = gate(ConcurrencyGateLayer::new(3), secs(1));
        let started = Instant::now();
        let results = run_all(&client, 0..9).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(probe.most.load(Ordering::SeqCst), 3);
        // Nine one-second requests, three at a time.
        assert_eq!(started.elapsed(), secs(3));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn waiters_are_admitted_in_arrival_order() {
    watchdog(secs(600), async {
        let (client, probe) = gate(ConcurrencyGateLayer::new(1).queue_limit(50), secs(1));
        let results = run_all(&client, 0..40).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(*probe.order.lock().unwrap(), (0..40).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn queue_of_ten_plus_parallelism_then_queue_full_at_once() {
    watchdog(secs(600), async {
        let (client, _probe) = gate(ConcurrencyGateLayer::new(3), secs(60));
        let handle = client.handle();
        assert_eq!(handle.queue_limit(), 13);
        let tasks = spawn_all(&client, 0..16).await;
        assert_eq!((handle.in_flight(), handle.queued()), (3, 13));

        let started = Instant::now();
        let error = client.clone().oneshot(99).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        assert!(is(&error, &Error::QueueFull), "{error}");
        assert_eq!(handle.refused(), 1);

        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn queue_limit_zero_refuses_as_soon_as_slots_are_busy() {
    watchdog(secs(600), async {
        let (client, _probe) = gate(ConcurrencyGateLayer::new(2).queue_limit(0), secs(1));
        let tasks = spawn_all(&client, 0..2).await;
        let error = client.clone().oneshot(2).await.unwrap_err();
        assert!(is(&error, &Error::QueueFull));
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        // Free again.
        client.clone().oneshot(3).await.unwrap();
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_fails_waiters_not_admitted_in_time() {
    watchdog(secs(600), async {
        let layer = ConcurrencyGateLayer::new(1).queue_timeout(secs(5));
        let (client, _probe) = gate(layer, secs(4));
        let handle = client.handle();
        let started = Instant::now();
        let results = run_all(&client, 0..3).await;
        // 0 runs 0-4 s; 1 is admitted at 4 s (< 5 s) and runs to 8 s; 2 gives
        // up at 5 s.
        assert_eq!(results[0].as_ref().unwrap(), &0);
        assert_eq!(results[1].as_ref().unwrap(), &1);
        assert!(is(results[2].as_ref().unwrap_err(), &Error::QueueTimeout));
        assert_eq!(handle.timed_out(), 1);
        assert_eq!(started.elapsed(), secs(8));
        assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn set_parallelism_up_and_down() {
    watchdog(secs(600), async {
        let (client, probe) = gate(ConcurrencyGateLayer::new(1), secs(10));
        let handle = client.handle();
        let tasks = spawn_all(&client, 0..6).await;
        assert_eq!((handle.in_flight(), handle.queued()), (1, 5));

        handle.set_parallelism(3).unwrap();
        assert_eq!((handle.in_flight(), handle.queued()), (3, 3));

        // Lowering cancels nothing: three keep running until they finish.
        handle.set_parallelism(1).unwrap();
        assert_eq!(handle.in_flight(), 3);
        tokio::time::sleep(secs(10)).await;
        tokio::task::yield_now().await;
        // Three finished; only one slot is handed on.
        assert_eq!((handle.in_flight(), handle.queued()), (1, 2));
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(probe.most.load(Ordering::SeqCst), 3);
        assert!(handle.set_parallelism(0).is_err());
        assert_eq!(handle.parallelism(), 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn zero_parallelism_fails_every_call_and_never_hangs() {
    watchdog(secs(600), async {
        let (client, probe) = gate(ConcurrencyGateLayer::new(0), secs(1));
        for id in 0..3 {
            let error = client.clone().oneshot(id).await.unwrap_err();
            assert!(matches!(
                error.downcast_ref::<Error>(),
                Some(Error::InvalidConfig { .. })
            ));
        }
        assert!(probe.order.lock().unwrap().is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn dropping_futures_returns_slots_and_places() {
    watchdog(secs(600), async {
        let (client, _probe) = gate(ConcurrencyGateLayer::new(2).queue_limit(4), secs(10));
        let handle = client.handle();
        let tasks = spawn_all(&client, 0..6).await;
        assert_eq!((handle.in_flight(), handle.queued()), (2, 4));
        // Abort two queued and one running.
        tasks[3].abort();
        tasks[4].abort();
        tasks[0].abort();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // The running one's slot went to the first live waiter (2); 5 waits.
        assert_eq!((handle.in_flight(), handle.queued()), (2, 1));
        for (i, task) in tasks.into_iter().enumerate() {
            let result = task.await;
            assert_eq!(result.is_err(), [0, 3, 4].contains(&i), "task {i}");
        }
        assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_drops_at_every_await_point_leak_nothing() {
    watchdog(secs(60), async {
        const P: usize = 4;
        let (client, probe) = gate(ConcurrencyGateLayer::new(P).queue_limit(64), Duration::ZERO);
        let handle: ConcurrencyGateHandle = client.handle();
        // A deterministic spread of drop points (xorshift), 0 = before any poll.
        let mut x = 0x9E37_79B9_u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut tasks = Vec::new();
        for id in 0..10_000u32 {
            let polls = next() % 6;
            let future = client.clone().oneshot(id);
            tasks.push(tokio::spawn(DropAfter {
                inner: Some(Box::pin(future)),
                polls: if polls == 5 { u32::MAX } else { polls },
            }));
            if next() % 5 == 0 {
                let victim = next() as usize % tasks.len();
                tasks[victim].abort();
            }
            if id % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let (mut done, mut dropped, mut refused) = (0, 0, 0);
        for task in tasks {
            match task.await {
                Ok(Some(Ok(_))) => done += 1,
                Ok(Some(Err(error))) => {
                    assert!(is(&error, &Error::QueueFull), "{error}");
                    refused += 1;
                }
                Ok(None) | Err(_) => dropped += 1,
            }
        }
        assert_eq!(done + dropped + refused, 10_000);
        assert!(done > 0 && dropped > 0, "done {done}, dropped {dropped}");
        assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
        assert!(probe.most.load(Ordering::SeqCst) <= P);
        assert_eq!(probe.running.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_parallelism_plus_queue_inside_under_races() {
    watchdog(secs(60), async {
        const P: usize = 3;
        const Q: usize = 5;
        let (client, probe) = gate(ConcurrencyGateLayer::new(P).queue_limit(Q), Duration::ZERO);
        let handle = client.handle();
        // A monitor samples the gate for as long as the load runs.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let monitor = tokio::spawn({
            let (handle, stop) = (handle.clone(), Arc::clone(&stop));
            async move {
                let (mut most_in_flight, mut most_queued, mut samples) = (0, 0, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    most_in_flight = most_in_flight.max(handle.in_flight());
                    most_queued = most_queued.max(handle.queued());
                    samples += 1;
                    tokio::task::yield_now().await;
                }
                (most_in_flight, most_queued, samples)
            }
        });
        let tasks: Vec<_> = (0..2_000u32)
            .map(|id| tokio::spawn(client.clone().oneshot(id)))
            .collect();
        let mut refused = 0;
        for task in tasks {
            if let Err(error) = task.await.unwrap() {
                assert!(is(&error, &Error::QueueFull));
                refused += 1;
            }
        }
        stop.store(true, Ordering::SeqCst);
        let (most_in_flight, most_queued, samples) = monitor.await.unwrap();
        assert!(samples > 0);
        assert!(
            most_in_flight <= P && most_queued <= Q,
            "{most_in_flight} + {most_queued}"
        );
        assert!(probe.most.load(Ordering::SeqCst) <= P);
        assert!(refused > 0, "the load reached the bound");
        assert_eq!(handle.refused(), refused);
        assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_request_with_a_free_slot_is_called_from_call() {
    let (mut client, probe) = gate(ConcurrencyGateLayer::new(1).queue_limit(1), secs(1));
    let first = client.ready().await.unwrap().call(1);
    assert_eq!(
        *probe.order.lock().unwrap(),
        [1],
        "called before its first poll"
    );
    // No slot left: the second waits in the queue, uncalled, until the
    // first ends.
    let second = client.ready().await.unwrap().call(2);
    assert_eq!(*probe.order.lock().unwrap(), [1]);
    watchdog(secs(5), async {
        let (a, b) = tokio::join!(first, second);
        assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
    })
    .await;
    assert_eq!(*probe.order.lock().unwrap(), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn an_inner_service_that_reserves_in_poll_ready_gets_every_request_through() {
    // tower's `ConcurrencyLimit(1)` inside a gate of 3: a request handed a
    // slot finds the inner service not ready (its permit held by another),
    // and the future must drive that same service ready, permit and all:
    // a fresh clone would queue behind the one left waiting in the gate.
    let probe = Probe {
        latency: secs(1),
        ..Probe::default()
    };
    let limited = tower::limit::ConcurrencyLimitLayer::new(1).layer(probe.clone());
    let mut client = ConcurrencyGateLayer::new(3).layer(limited);
    watchdog(secs(10), async {
        let calls: Vec<_> = (0..3)
            .map(|id| {
                let future = client.call(id);
                tokio::spawn(future)
            })
            .collect();
        for (id, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), id as u32);
        }
    })
    .await;
    assert_eq!(probe.most.load(Ordering::SeqCst), 1);
    assert_eq!(*probe.order.lock().unwrap(), [0, 1, 2]);
}
