//! The agent's configuration file (TOML). Every key is optional; command-line
//! flags override the file, and the file overrides the defaults.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{kernel::tracer::DEFAULT_RING_BUFFER_BYTES, logging::LogLevel};

pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";

/// The file's shape. Unknown keys are errors, so a typo never goes unnoticed.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub metrics_addr: Option<SocketAddr>,
    pub log_level: Option<LogLevel>,
    /// Size of the kernel-to-agent ring buffer in bytes (power of two, >= 4096).
    pub ring_buffer_bytes: Option<u32>,
    /// cgroup v2 directory to attach cgroup programs to (default: the root).
    pub cgroup: Option<PathBuf>,
    /// Whether the agent may mount tracefs/bpffs when they are missing.
    pub mount: Option<bool>,
    /// Metadata from a running lab's directory.
    pub lab: Option<PathBuf>,
    /// Metadata from the Kubernetes API server, for the pods on `node_name`.
    pub kubernetes: Option<bool>,
    pub node_name: Option<String>,
    /// Sockets tracked at once.
    pub max_flows: Option<usize>,
    /// Directory of named network namespaces to watch at the NAT step.
    pub netns_dir: Option<PathBuf>,
    /// Serve `/api/v1/stats` (request paths and ids) to any client, not
    /// only to loopback ones.
    pub stats_from_anywhere: Option<bool>,
    /// Data events one pod's network namespace may send per CPU per
    /// second (0: no limit).
    pub netns_events_per_s: Option<u32>,
    /// Bytes captured of a send or receive that begins an HTTP/1.x request.
    pub request_head_bytes: Option<u32>,
    /// Read the plaintext of TLS calls in traced processes (uprobes on
    /// `SSL_write`/`SSL_read`); default true.
    pub tls_plaintext: Option<bool>,
    /// Send request traces over OTLP to this collector.
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (the default).
    pub otlp_protocol: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid request_head_bytes {0}: at most 2048 bytes of a request head are captured")]
    RequestHeadBytes(u32),
    #[error("invalid ring_buffer_bytes {0}: must be a power of two of at least 4096")]
    RingBufferSize(u32),
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            // toml's message spans several lines; keep the error on one.
            message: e.message().replace('\n', " "),
        })
    }
}

/// `request_head_bytes` must fit a data event's payload.
pub fn check_request_head_bytes(n: u32) -> Result<u32, ConfigError> {
    if n as usize > mesh_trace_common::DATA_PREFIX_MAX {
        return Err(ConfigError::RequestHeadBytes(n));
    }
    Ok(n)
}

/// Validates a ring buffer size the way the kernel will.
pub fn check_ring_buffer_bytes(n: u32) -> Result<u32, ConfigError> {
    if n >= 4096 && n.is_power_of_two() {
        Ok(n)
    } else {
        Err(ConfigError::RingBufferSize(n))
    }
}

pub fn default_ring_buffer_bytes() -> u32 {
    DEFAULT_RING_BUFFER_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c: ConfigFile = toml::from_str(
            "metrics_addr = \"127.0.0.1:9000\"\nlog_level = \"debug\"\n\
             ring_buffer_bytes = 65536\ncgroup = \"/sys/fs/cgroup\"\nmount = false\n",
        )
        .unwrap();
        assert_eq!(c.metrics_addr.unwrap().port(), 9000);
        assert_eq!(c.log_level, Some(LogLevel::Debug));
        assert_eq!(c.mount, Some(false));
    }

    #[test]
    fn rejects_unknown_keys() {
        assert!(toml::from_str::<ConfigFile>("metrics_adr = \"x\"").is_err());
    }

    #[test]
    fn ring_buffer_size_must_be_a_power_of_two() {
        assert!(check_ring_buffer_bytes(1 << 20).is_ok());
        assert!(check_ring_buffer_bytes(3000).is_err());
        assert!(check_ring_buffer_bytes(1000 * 1024).is_err());
    }
}
