//! The concurrency gate beside tower's `ConcurrencyLimit` and a bare
//! `tokio::sync::Semaphore`: one request alone, and 64 tasks contending for
//! 4 slots, in one criterion run.
//!
//! cargo bench --bench concurrency

mod common;

use std::future::Future;
use std::mem::size_of_val;
use std::sync::Arc;
use std::task::{Context, Poll};

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tollgate::ConcurrencyGateLayer;
use tower::limit::ConcurrencyLimitLayer;
use tower::{BoxError, Layer, Service, ServiceExt};

/// The inner service: answers at once, or after yielding once so that a
/// slot is held across a scheduling point and other tasks really contend.
fn inner(
    yield_once: bool,
) -> impl Service<
    u32,
    Response = u32,
    Error = BoxError,
    Future = impl Future<Output = Result<u32, BoxError>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |id: u32| async move {
        if yield_once {
            tokio::task::yield_now().await;
        }
        Ok::<_, BoxError>(id)
    })
}

fn uncontended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("one request, no contention");
    group.bench_function("tokio Semaphore + service", |b| {
        let semaphore = Arc::new(Semaphore::new(64));
        let mut svc = inner(false);
        b.iter(|| {
            rt.block_on(async {
                let permit = Arc::clone(&semaphore).acquire_owned().await.unwrap();
                let out = svc.ready().await.unwrap().call(1).await.unwrap();
                drop(permit);
                out
            })
        });
    });
    group.bench_function("tower ConcurrencyLimit", |b| {
        let mut svc = ConcurrencyLimitLayer::new(64).layer(inner(false));
        b.iter(|| rt.block_on(async { svc.ready().await.unwrap().call(1).await.unwrap() }));
    });
    group.bench_function("tollgate ConcurrencyGate", |b| {
        let mut svc = ConcurrencyGateLayer::new(64).layer(inner(false));
        b.iter(|| rt.block_on(async { svc.ready().await.unwrap().call(1).await.unwrap() }));
    });
    group.finish();
}

const TASKS: u32 = 64;
const EACH: u32 = 16;

/// 64 tasks, each sending 16 requests through its own clone.
fn contend<S>(rt: &Runtime, svc: &S)
where
    S: Service<u32, Response = u32, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for id in 0..EACH {
                        svc.ready().await.unwrap().call(id).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

fn contended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let mut group = c.benchmark_group("64 tasks x 16 requests, 4 slots");
    group.bench_function("tokio Semaphore + service", |b| {
        let semaphore = Arc::new(Semaphore::new(4));
        let svc = tower::service_fn(move |id: u32| {
            let semaphore = Arc::clone(&semaphore);
            async move {
                let _permit = semaphore.acquire_owned().await.unwrap();
                tokio::task::yield_now().await;
                Ok::<_, BoxError>(id)
            }
        });
        b.iter(|| contend(&rt, &svc));
    });
    group.bench_function("tower ConcurrencyLimit", |b| {
        let svc = ConcurrencyLimitLayer::new(4).layer(inner(true));
        b.iter(|| contend(&rt, &svc));
    });
    group.bench_function("tollgate ConcurrencyGate (queue 1024)", |b| {
        // Queue room for every task, so nothing is refused.
        let svc = ConcurrencyGateLayer::new(4)
            .queue_limit(1024)
            .layer(inner(true));
        b.iter(|| contend(&rt, &svc));
    });
    group.finish();
}

/// Heap bytes each gate adds per waiting request, and the size of what
/// the caller holds while it waits, with 10,000 waiting behind one slot.
fn memory_per_waiter(_: &mut Criterion) {
    const N: usize = 10_000;
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let never = tower::service_fn(|_: u32| std::future::pending::<Result<u32, BoxError>>());

    // tollgate admits in `call`: a queued request has its place on return.
    let mut gate = ConcurrencyGateLayer::new(1).queue_limit(N).layer(never);
    let mut held = Vec::with_capacity(N + 1);
    held.push(gate.call(0));
    let before = common::live_bytes();
    for id in 0..N as u32 {
        held.push(gate.call(id));
    }
    let tollgate = (common::live_bytes() - before) as f64 / N as f64;
    assert_eq!(gate.handle().queued(), N);
    let tollgate_holds = size_of_val(&held[0]);
    drop(held);

    // tower's waiters each poll `poll_ready` on their own clone.
    let limit = ConcurrencyLimitLayer::new(1).layer(never);
    let mut clones = Vec::with_capacity(N + 1);
    clones.push(limit.clone());
    assert!(clones[0].poll_ready(&mut cx).is_ready());
    clones.extend((0..N).map(|_| limit.clone()));
    let before = common::live_bytes();
    for waiter in &mut clones[1..] {
        assert!(waiter.poll_ready(&mut cx).is_pending());
    }
    let tower = (common::live_bytes() - before) as f64 / N as f64;
    let tower_holds = size_of_val(&clones[0]);
    drop(clones);

    // tokio's semaphore keeps its waiter node inside the acquire future.
    let semaphore = Arc::new(Semaphore::new(1));
    let _permit = Arc::clone(&semaphore).try_acquire_owned().unwrap();
    let mut acquire = std::pin::pin!(Arc::clone(&semaphore).acquire_owned());
    assert!(matches!(acquire.as_mut().poll(&mut cx), Poll::Pending));
    let semaphore_holds = size_of_val(&*acquire);

    println!("memory per waiting request, {N} waiting behind one slot:");
    println!("  tollgate ConcurrencyGate: {tollgate:.0} heap bytes; the caller holds a {tollgate_holds}-byte future");
    println!("  tower ConcurrencyLimit:   {tower:.0} heap bytes; the caller holds a {tower_holds}-byte service clone");
    println!("  tokio Semaphore:          0 heap bytes; the caller holds a {semaphore_holds}-byte acquire future");
}

criterion_group!(benches, memory_per_waiter, uncontended, contended);
criterion_main!(benches);
