//! `send_all`: a batch through the gate, none of it refused, none lost,
//! in virtual time.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tollgate::testing::{Reply, Script};
use tollgate::{ConcurrencyGateLayer, Error, Tollgate};
use tower::{Layer, ServiceExt};

fn requests(n: usize) -> impl futures_util::Stream<Item = http::Request<()>> + Unpin {
    futures_util::stream::iter((0..n).map(|_| http::Request::new(())))
}

#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_requests_none_refused_none_lost() {
    let n = 100_000;
    let server = Script::new().reply(Reply::status(200).after(Duration::from_millis(5)));
    let client = Tollgate::builder()
        .parallelism(8)
        .build(server.service())
        .unwrap();
    let handle = client.handle();
    let mut seen = vec![false; n];
    let mut results = client.send_all(requests(n));
    let mut most_in_gate = 0;
    while let Some((index, result)) = results.next().await {
        assert_eq!(result.unwrap().status(), 200);
        assert!(!std::mem::replace(&mut seen[index], true), "{index} twice");
        most_in_gate = most_in_gate.max(handle.in_flight() + handle.queued());
    }
    assert!(seen.iter().all(|s| *s), "every index once");
    assert_eq!(handle.refused(), 0);
    assert_eq!(server.attempts().len(), n);
    // 8 running, 18 waiting at most: the gate's own bound.
    assert!(most_in_gate <= 8 + 18, "{most_in_gate}");
    assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn follows_parallelism_changed_while_it_runs() {
    let n = 20_000;
    let server = Script::new().reply(Reply::status(200).after(Duration::from_millis(10)));
    let client = ConcurrencyGateLayer::new(50)
        .queue_limit(0)
        .layer(server.service());
    let handle = client.handle();
    let mut results = client.send_all(requests(n));
    let mut ended = 0;
    let mut seen = vec![false; n];
    let mut set_to = 50;
    while let Some((index, result)) = results.next().await {
        result.unwrap();
        assert!(!std::mem::replace(&mut seen[index], true), "{index} twice");
        // Never more in flight than the parallelism, once the requests
        // sent before it was lowered have ended.
        if ended % 1_000 == 999 {
            assert!(
                handle.in_flight() <= set_to,
                "{} > {set_to}",
                handle.in_flight()
            );
        }
        ended += 1;
        // Down to 3, up to 64, down to 1, with no waiting place at all.
        let set = match ended {
            2_000 => 3,
            4_000 => 64,
            10_000 => 1,
            _ => continue,
        };
        handle.set_parallelism(set).unwrap();
        set_to = set;
    }
    assert_eq!(ended, n);
    assert!(seen.iter().all(|s| *s), "every index once");
    assert_eq!(handle.refused(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_gives_back_every_slot_and_sends_no_more() {
    let server = Script::new().reply(Reply::status(200).after(Duration::from_secs(1)));
    let client = Tollgate::builder()
        .parallelism(4)
        .build(server.service())
        .unwrap();
    let handle = client.handle();
    let taken = Arc::new(AtomicUsize::new(0));
    let counted = {
        let taken = Arc::clone(&taken);
        requests(1_000).inspect(move |_| {
            taken.fetch_add(1, Ordering::Relaxed);
        })
    };
    let mut results = client.send_all(counted);
    for _ in 0..10 {
        results.next().await.unwrap().1.unwrap();
    }
    assert_eq!(handle.in_flight(), 4);
    let sent = server.attempts().len();
    drop(results);
    assert_eq!(
        (handle.in_flight(), handle.queued(), handle.lent()),
        (0, 0, 0)
    );
    // 10 yielded, at most 4 more ended but not yet yielded, and at most 4
    // running and 14 waiting cancelled; no request was taken after.
    let taken = taken.load(Ordering::Relaxed);
    assert!((10 + 4..=10 + 4 + 4 + 14).contains(&taken), "{taken}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(server.attempts().len(), sent, "nothing sent after the drop");
}

#[tokio::test(start_paused = true)]
async fn shares_a_gate_another_caller_fills_without_a_refusal() {
    let server = Script::new().reply(Reply::status(200).after(Duration::from_millis(100)));
    let client = ConcurrencyGateLayer::new(2)
        .queue_limit(2)
        .layer(server.service());
    // Another caller holds every slot and place for 1 s.
    let others: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client.clone().oneshot(http::Request::new(()))))
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(client.handle().in_flight() + client.handle().queued(), 4);
    let results: Vec<_> = client.send_all(requests(100)).collect().await;
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(|(_, r)| r.is_ok()));
    for other in others {
        other.await.unwrap().unwrap();
    }
    assert_eq!(client.handle().refused(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_timing_out_in_the_queue_is_one_item() {
    let server = Script::new().reply(Reply::status(200).after(Duration::from_secs(10)));
    let client = ConcurrencyGateLayer::new(1)
        .queue_limit(5)
        .queue_timeout(Duration::from_secs(15))
        .layer(server.service());
    let results: Vec<_> = client.send_all(requests(4)).collect().await;
    let timed_out = results
        .iter()
        .filter(|(_, r)| {
            r.as_ref()
                .is_err_and(|e| e.downcast_ref::<Error>() == Some(&Error::QueueTimeout))
        })
        .count();
    // One runs 0-10 s, the next 10-20 s; the other two give up at 15 s.
    assert_eq!((results.len(), timed_out), (4, 2));
}

#[tokio::test(start_paused = true)]
async fn ended_requests_give_back_their_slots_before_they_are_yielded() {
    // Four requests end at the same instant: the first poll that yields
    // one takes all four out of the gate, not one a poll (a slow consumer
    // would keep the rest holding slots, and an adaptive gate would read
    // its slowness as the server's).
    let server = Script::new().reply(Reply::status(200).after(Duration::from_millis(10)));
    let client = ConcurrencyGateLayer::new(4)
        .queue_limit(0)
        .layer(server.service());
    let handle = client.handle();
    let mut results = client.send_all(requests(8));
    results.next().await.unwrap().1.unwrap();
    assert_eq!(handle.in_flight(), 0, "the three others ended with it");
    assert_eq!(results.count().await, 7);
}

#[tokio::test(start_paused = true)]
async fn a_closed_gate_answers_each_request_with_its_error() {
    let server = Script::new();
    let client = ConcurrencyGateLayer::new(0)
        .queue_limit(0)
        .layer(server.service());
    let results = tokio::time::timeout(
        Duration::from_secs(3600),
        client.send_all(requests(3)).collect::<Vec<_>>(),
    )
    .await
    .expect("a closed gate hung the batch");
    assert_eq!(results.len(), 3);
    for (_, result) in results {
        let error = result.unwrap_err();
        assert!(matches!(
            error.downcast_ref::<Error>(),
            Some(Error::InvalidConfig { .. })
        ));
    }
}
