#![no_main]
//! See `mesh_trace::fuzzing::btf`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_trace::fuzzing::btf(data));
