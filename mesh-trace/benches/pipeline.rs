//! `cargo bench -p mesh-trace --bench pipeline`: the agent's pipeline on one
//! core: synthetic kernel events through decoding, flow tagging, HTTP
//! framing and stitching.
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesh_trace::{
    bench::synthetic_events,
    flows::{
        metadata::NoMetadata,
        table::{FlowTable, FlowTableConfig},
    },
    kernel::events::Event,
    spans::stitch::{StitchConfig, Stitcher},
};

fn pipeline(c: &mut Criterion) {
    let events = synthetic_events(10_000);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("decode+flows+framing+stitching", |b| {
        b.iter(|| {
            let mut table = FlowTable::new(FlowTableConfig::default(), Arc::new(NoMetadata));
            let mut stitcher = Stitcher::new(StitchConfig::default());
            let (mut legs, mut spans) = (Vec::new(), Vec::new());
            for raw in &events {
                let Ok(ev) = Event::decode(raw) else { continue };
                if let Event::Data(d) = &ev {
                    stitcher.data(&table, d, &mut spans);
                }
                table.apply(&ev, &mut legs);
                legs.clear();
                spans.clear();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
