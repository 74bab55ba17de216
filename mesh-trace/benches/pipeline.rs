//! `cargo bench -p mesh-trace --bench pipeline`: the agent's pipeline on one
//! core: synthetic kernel events through decoding, flow tagging, HTTP
//! framing and stitching.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesh_trace::bench::{run_pipeline, synthetic_events};

fn pipeline(c: &mut Criterion) {
    let events = synthetic_events(10_000);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("decode+flows+framing+stitching", |b| {
        b.iter(|| run_pipeline(&events))
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
