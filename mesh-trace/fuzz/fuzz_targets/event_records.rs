#![no_main]
//! See `mesh_trace::fuzzing::event_records`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_trace::fuzzing::event_records(data));
