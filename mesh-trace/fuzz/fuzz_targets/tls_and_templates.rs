#![no_main]
//! See `mesh_trace::fuzzing::tls_and_templates`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_trace::fuzzing::tls_and_templates(data));
