#![no_main]
//! See `mesh_trace::fuzzing::h2_frames`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_trace::fuzzing::h2_frames(data));
