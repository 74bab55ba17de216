//! The ring buffer made to overflow in the middle of traced traffic. The
//! agent runs with a small ring; while the lab's Bookinfo client sends its
//! requests (each with its own id, the reviews taking 2 or 40 ms at random),
//! bursts of loopback connections elsewhere on the node fill the ring, and
//! events of the lab's own requests are lost with the rest. The loss is
//! counted; no span holds another request's moments; and every request that
//! starts a second after the last burst has a span exact to its truth.
//! Needs root.
mod common;

use std::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use common::{
    truth::{
        delayed_lab, judge, killed_client_records, require_root, spawn_reviews_load, truths, BIN,
    },
    Traced,
};
use mesh_trace::lab::topology::Lab;

/// Small enough that a burst of connections overflows it.
const RING_BYTES: u32 = 64 << 10;
const BURSTS: usize = 6;
const CONNECTIONS_PER_BURST: usize = 3_000;

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// A burst of loopback connections opened and closed as fast as one thread
/// can: several kernel events each, many times what the ring holds.
fn burst() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = std::thread::spawn(move || {
        for c in listener.incoming().take(CONNECTIONS_PER_BURST) {
            drop(c);
        }
    });
    let open: Vec<_> = (0..CONNECTIONS_PER_BURST)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    drop(open);
    acceptor.join().unwrap();
}

#[test]
fn a_full_ring_costs_only_the_requests_it_touched() {
    require_root();
    let mut opts = delayed_lab(false);
    opts.exe = BIN.into();
    let lab = Lab::up(&opts).unwrap();
    let traced = Traced::start_spans_only(&lab, |s| s.ring_buffer_bytes = RING_BYTES);
    let records = lab.dir.join("client.jsonl");
    let mut load = spawn_reviews_load(&lab, &records);

    // Traffic before, between and after the bursts.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..BURSTS {
        burst();
        std::thread::sleep(Duration::from_millis(700));
    }
    let calm_from_ns = monotonic_ns() + 1_000_000_000;
    std::thread::sleep(Duration::from_secs(6));
    let _ = load.kill();
    let _ = load.wait();
    std::thread::sleep(Duration::from_secs(1));

    let lost = traced.events_lost("ringbuf_full");
    let client = killed_client_records(&records);
    let truth = truths(&lab, &client);
    let spans: Vec<_> = (traced.spans.lock().unwrap().iter())
        .filter(|s| s.source_workload == "loadgen")
        .cloned()
        .collect();
    let all = judge(&spans, &truth);
    let truth_len = truth.len();
    // The requests that started a second after the last burst.
    let calm: std::collections::HashMap<_, _> = truth
        .into_iter()
        .filter(|(id, _)| {
            client
                .iter()
                .any(|c| &c.request_id == id && c.t_start_ns >= calm_from_ns)
        })
        .collect();
    let after = judge(&spans, &calm);
    // No request is stitched twice (a socket learnt again after its
    // opening was lost must not start its requests over).
    let mut per_request: std::collections::HashMap<&str, usize> = Default::default();
    for s in &spans {
        if let Some(id) = s.request_id.as_deref() {
            *per_request.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<&&str> = per_request
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(id, _)| id)
        .collect();
    let relearned = traced.state.metrics.flows_relearned.get();
    eprintln!(
        "{lost} events lost to a full ring in {BURSTS} bursts; {} requests, {} spans joined to \
         their truth, {} exact to 0.5 ms, {} wrong; unstitched {:?}; a second after the last \
         burst: {} requests, {} spans, {} exact",
        client.len(),
        all.compared,
        all.exact,
        all.wrong.len(),
        traced.unstitched(),
        calm.len(),
        after.compared,
        after.exact
    );
    eprintln!("{relearned} open sockets learnt again after their opening was lost");
    assert!(lost > 0, "the ring never overflowed");
    assert!(twice.is_empty(), "requests with two spans: {twice:?}");
    assert!(
        all.wrong.is_empty(),
        "spans holding another request's moments: {:?}",
        &all.wrong[..all.wrong.len().min(5)]
    );
    // Every request without a span is counted by reason.
    let counted: u64 = traced.unstitched().values().sum();
    assert!(
        counted >= (truth_len - all.compared) as u64,
        "{} requests without a span, {counted} counted",
        truth_len - all.compared
    );
    // A second after the last burst every request has its span again, and
    // they are exact (some 250 requests: each is 0.4%).
    assert!(calm.len() > 100, "{} requests after the bursts", calm.len());
    assert!(
        after.compared as f64 >= 0.99 * calm.len() as f64,
        "a second after the last burst: {} spans for {} requests",
        after.compared,
        calm.len()
    );
    assert!(
        after.exact as f64 >= 0.99 * calm.len() as f64,
        "a second after the last burst: {} of {} requests exact",
        after.exact,
        calm.len()
    );
}
