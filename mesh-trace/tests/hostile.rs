//! A hostile pod beside a traced mesh. In a pod-like namespace whose nat
//! table redirects port 9080 to a local "sidecar" on 15001 (which answers
//! every request itself), a client sends:
//! - 1,000,000 requests, each with its own path, Host and x-request-id;
//! - 10,000 requests whose heads (8 KiB) are far larger than the prefix;
//! - one write holding the same request 10,000 times (pipelined);
//! - 1,000 connections that send one byte and then nothing.
//!
//! Meanwhile the lab's Bookinfo serves its own traffic. The agent's memory
//! stays under the bound README "Bounds" states, the metrics' series stay
//! bounded, and the other pods' spans are each right against their own
//! request. Needs root.
mod common;

mod redirecting;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{
    peak_rss_mib,
    truth::{delayed_lab, judge_bookinfo_client, require_root, spawn_reviews_load, BIN},
    Traced,
};
use mesh_trace::lab::topology::Lab;
use redirecting::redirecting_namespace;

const DISTINCT: usize = 1_000_000;
const LARGE_HEADS: usize = 10_000;
const PIPELINED: usize = 10_000;
const SLOW: usize = 1_000;
/// Peak resident memory of the process holding the agent (and the hostile
/// pod's own threads), in MiB.
const RSS_BOUND_MIB: u64 = 256;

/// Data events one namespace may send per CPU per second: far below what
/// this test's agent, a debug build, drains on a slow machine (at 10,000 a
/// loaded machine's ring once overflowed by 22,815 events), so that the
/// ring's staying clear shows the budget's effect, not the machine's speed.
const NETNS_EVENTS_PER_S: u32 = 2_000;

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

/// The hostile pod's "sidecar": answers each request head it reads (heads
/// end with an empty line; these requests have no body) itself.
fn serve(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { return };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut tail = 0u32; // the last bytes seen, to find "\r\n\r\n" across reads
            loop {
                let n = match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut heads = 0;
                for &b in &buf[..n] {
                    tail = (tail << 8) | u32::from(b);
                    if tail == u32::from_be_bytes(*b"\r\n\r\n") {
                        heads += 1;
                    }
                }
                if heads > 0 && conn.write_all(&RESPONSE.repeat(heads)).is_err() {
                    return;
                }
            }
        });
    }
}

/// Sends `requests` over one keep-alive connection, one at a time.
fn exchange(requests: impl Iterator<Item = String>) -> usize {
    let conn = TcpStream::connect("127.0.0.1:9080").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    let mut line = String::new();
    let mut n = 0;
    for req in requests {
        writer.write_all(req.as_bytes()).unwrap();
        read_response(&mut reader, &mut line);
        n += 1;
    }
    n
}

fn read_response(reader: &mut BufReader<TcpStream>, line: &mut String) {
    loop {
        line.clear();
        assert!(reader.read_line(line).unwrap() > 0, "sidecar closed");
        if line == "\r\n" {
            return;
        }
    }
}

#[test]
fn a_hostile_pod_cannot_exhaust_the_agent_nor_disturb_other_spans() {
    require_root();
    let mut opts = delayed_lab(false);
    opts.exe = BIN.into();
    let lab = Lab::up(&opts).unwrap();
    // A budget the hostile pod overruns many times over.
    let traced = Traced::start_spans_only(&lab, |s| s.netns_events_per_s = NETNS_EVENTS_PER_S);
    let records = lab.dir.join("client.jsonl");
    let mut load = spawn_reviews_load(&lab, &records);
    let ns = redirecting_namespace(&format!("mt-hostile-{}", std::process::id()));
    let listener = ns
        .enter(|| TcpListener::bind("127.0.0.1:15001").unwrap())
        .unwrap();
    std::thread::spawn(move || serve(listener));
    // The agent observes the namespace's NAT step within a scan.
    std::thread::sleep(Duration::from_millis(1500));
    let rss_before = peak_rss_mib();
    let started = Instant::now();

    // Connections that send one byte, then nothing, held to the end.
    let slow = ns
        .enter(|| {
            (0..SLOW)
                .map(|_| {
                    let mut c = TcpStream::connect("127.0.0.1:9080").unwrap();
                    c.write_all(b"G").unwrap();
                    c
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    // Every request its own path, Host and id: two connections at a time.
    let distinct: usize = (0..2)
        .map(|k| {
            ns.enter(move || {
                exchange((k..DISTINCT).step_by(2).map(|i| {
                    format!(
                        "GET /item/{i}/{:x}?q={i} HTTP/1.1\r\nhost: h{i}.example\r\nx-request-id: hostile-{i}\r\n\r\n",
                        i.wrapping_mul(2654435761)
                    )
                }))
            })
            .unwrap()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .sum();
    // Heads far larger than the captured prefix.
    let padding = "x".repeat(8 << 10);
    let large = ns
        .enter(move || {
            exchange((0..LARGE_HEADS).map(|i| {
                format!(
                    "GET /large/{i} HTTP/1.1\r\nhost: large.example\r\nx-padding: {padding}\r\nx-request-id: large-{i}\r\n\r\n"
                )
            }))
        })
        .unwrap();
    // One write holding the same request 10,000 times.
    ns.enter(|| {
        let conn = TcpStream::connect("127.0.0.1:9080").unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut writer = conn;
        let req = b"GET /pipelined HTTP/1.1\r\nhost: p.example\r\n\r\n";
        writer.write_all(&req.repeat(PIPELINED)).unwrap();
        let mut line = String::new();
        for _ in 0..PIPELINED {
            read_response(&mut reader, &mut line);
        }
    })
    .unwrap();
    let hostile = started.elapsed();
    let _ = load.kill();
    let _ = load.wait();
    std::thread::sleep(Duration::from_secs(1));

    let m = &traced.state.metrics;
    let rss = peak_rss_mib();
    let series = m.encode().lines().filter(|l| !l.starts_with('#')).count();
    let lost = |reason| traced.events_lost(reason);
    eprintln!(
        "events lost: ringbuf_full {}, map_full {}, netns_budget {}",
        lost("ringbuf_full"),
        lost("map_full"),
        lost("netns_budget")
    );
    eprintln!(
        "hostile pod: {distinct} distinct requests, {large} heads of 8 KiB, {PIPELINED} pipelined, \
         {SLOW} one-byte connections in {:.1} s; peak RSS {rss} MiB (before {rss_before} MiB, bound \
         {RSS_BOUND_MIB}); {series} metric series; {} sockets tracked, {} framed, {} requests in \
         flight; unstitched {:?}",
        hostile.as_secs_f64(),
        m.flows_tracked.get(),
        m.stitch_sockets.get(),
        m.requests_in_flight.get(),
        traced.unstitched()
    );
    assert_eq!(distinct, DISTINCT);
    assert_eq!(large, LARGE_HEADS);
    assert!(rss < RSS_BOUND_MIB, "peak RSS {rss} MiB");
    // Labels fold: a million paths, hosts and ids make no new series.
    assert!(series < 2_000, "{series} metric series");
    // The flood was held to its budget: the ring never overflowed.
    assert!(
        lost("netns_budget") > 0,
        "the hostile pod stayed within its budget"
    );
    assert_eq!(lost("ringbuf_full"), 0, "the ring buffer overflowed");
    drop(slow);

    // The other pods' spans, each against its own request.
    let spans = traced.spans.lock().unwrap().clone();
    judge_bookinfo_client(&lab, &records, &spans, "other pods");
}
