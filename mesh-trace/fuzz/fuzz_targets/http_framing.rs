#![no_main]
//! See `mesh_trace::fuzzing::http_framing`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_trace::fuzzing::http_framing(data));
