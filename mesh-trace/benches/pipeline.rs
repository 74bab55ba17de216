//! `cargo bench -p mesh-trace --bench pipeline`: the agent's pipeline on one
//! core: synthetic kernel events through decoding, flow tagging, HTTP
//! framing and stitching.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesh_trace::bench::{run_pipeline, synthetic_events, synthetic_events_with_metadata};

fn pipeline(c: &mut Criterion) {
    let records = synthetic_events(10_000);
    let events = run_pipeline(&records);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(events as u64));
    group.bench_function("decode+flows+framing+stitching", |b| {
        b.iter(|| run_pipeline(&records))
    });
    // Sidecar heads between sidecars: 1,200 bytes of peer metadata first.
    let records = synthetic_events_with_metadata(10_000, 1200);
    group.bench_function("with kilobyte request heads", |b| {
        b.iter(|| run_pipeline(&records))
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
