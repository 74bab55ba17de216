//! The eBPF objects built by build.rs, embedded in the binary.
use aya::include_bytes_aligned;

/// The tracer's programs.
pub static TRACER: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-trace.bpf.o"));

/// One tiny program per hook type, for feature detection.
pub static FEATURE_PROBES: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-trace-feature-probes.bpf.o"));

#[derive(Debug, thiserror::Error)]
#[error(
    "this mesh-trace binary was built without its eBPF programs (no eBPF toolchain at build \
     time); run `cargo xtask setup` and rebuild"
)]
pub struct MissingObjects;

/// Returns `obj`, or an error when the build had no eBPF toolchain.
pub fn require(obj: &'static [u8]) -> Result<&'static [u8], MissingObjects> {
    if obj.is_empty() {
        Err(MissingObjects)
    } else {
        Ok(obj)
    }
}
