//! What the lab's processes write down about every request: the ground truth
//! that tests and benchmarks compare mesh-trace's observations with. Each is
//! one JSON object per line. Timestamps are CLOCK_MONOTONIC nanoseconds, the
//! clock `bpf_ktime_get_ns()` reads. A request's are taken when the read or
//! write system calls that carried it returned (see [`super::ioclock`]),
//! where mesh-trace observes it too; the client's start and end are taken
//! around the whole exchange, as a caller would time it.
use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::Path,
    sync::Mutex,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use crate::clock::mono_ns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// One request (kind "http") or one TCP connection (kind "tcp") handled by a sidecar.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyRecord {
    pub pod: String,
    pub direction: Direction,
    /// "http" or "tcp".
    pub kind: String,
    /// Where the app meant to go (SO_ORIGINAL_DST).
    pub original_dst: SocketAddr,
    /// The downstream peer (the app's socket for outbound, the remote proxy for inbound).
    pub downstream_peer: SocketAddr,
    /// Virtual host name, or the listener/cluster for TCP.
    pub route: String,
    /// The cluster picked, e.g. `outbound|9080|v2|reviews...`, PassthroughCluster, BlackHoleCluster.
    pub cluster: String,
    /// The endpoint of the last attempt, if any connection was made.
    pub upstream_host: Option<SocketAddr>,
    /// This proxy's local address on the last attempt's upstream connection.
    pub upstream_local: Option<SocketAddr>,
    /// Upstream attempts (1 + retries); 0 when no upstream was tried.
    pub attempts: u32,
    /// Status sent downstream (0 for TCP).
    pub status: u16,
    pub request_id: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    /// HTTP: the downstream read that completed the request head returned.
    /// TCP: the connection was accepted.
    pub t_downstream_read_ns: u64,
    /// HTTP: the first upstream write of the request returned, on the last
    /// attempt (the one whose response goes downstream): mesh-trace, too,
    /// reports the final attempt's moments, a retry's replacing the failed
    /// attempt's. When the last attempt got no connection, when it started.
    /// TCP: connecting to the original destination started.
    pub t_upstream_write_ns: u64,
    /// HTTP: the first upstream read of the response returned (last
    /// attempt; over HTTP/2 the read of its HEADERS frame); 0 when the last
    /// attempt got no response. TCP: connected.
    pub t_upstream_read_ns: u64,
    /// HTTP: the first downstream write of the response returned (over
    /// HTTP/2 the write of its HEADERS frame; or, if it never reached the
    /// socket, when the response was ready). TCP: closed.
    pub t_downstream_write_ns: u64,
    /// HTTP/2 upstream: the read that carried the response's last frame.
    #[serde(default)]
    pub t_upstream_read_end_ns: Option<u64>,
    /// HTTP/2 downstream: the write that carried the response's last frame.
    #[serde(default)]
    pub t_downstream_write_end_ns: Option<u64>,
    /// Outbound: the last upstream attempt was mutual TLS (a mesh endpoint with mTLS on).
    #[serde(default)]
    pub upstream_tls: bool,
    /// Inbound: the downstream connection was mutual TLS (plaintext is accepted too, PERMISSIVE).
    #[serde(default)]
    pub downstream_tls: bool,
}

/// One request served by a lab app.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppRecord {
    pub pod: String,
    pub request_id: Option<String>,
    pub method: String,
    pub path: String,
    /// The load generator's id in `x-lab-client-id`, when it sent one there
    /// instead of `x-request-id`.
    #[serde(default)]
    pub client_id: Option<String>,
    pub status: u16,
    pub peer: SocketAddr,
    /// The read that completed the request head returned.
    pub t_read_ns: u64,
    /// The first write of the response returned (or, if it never reached
    /// the socket, when the response was ready). Over HTTP/2, the write
    /// that carried the stream's last frame; 0 if none was seen.
    pub t_write_ns: u64,
    /// Over HTTP/2, the request's stream on its connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u32>,
}

/// One request sent by the load generator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientRecord {
    pub request_id: String,
    pub url: String,
    pub status: u16,
    pub error: Option<String>,
    /// The pod that served it (the app's `x-served-by` response header).
    pub served_by: Option<String>,
    /// Just before the request is written.
    pub t_start_ns: u64,
    /// Response body fully read.
    pub t_end_ns: u64,
    /// The first write of the request returned; 0 without a response.
    #[serde(default)]
    pub t_write_ns: u64,
    /// The first read of the response returned; 0 without a response.
    #[serde(default)]
    pub t_read_ns: u64,
    /// The W3C `traceparent` it carried (`--traceparent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Appends records to a JSON-lines file; safe to share between tasks.
pub struct RecordWriter {
    file: Mutex<std::io::LineWriter<File>>,
}

impl RecordWriter {
    pub fn create(path: &Path) -> std::io::Result<RecordWriter> {
        Ok(RecordWriter {
            file: Mutex::new(std::io::LineWriter::new(File::create(path)?)),
        })
    }

    pub fn write<T: Serialize>(&self, record: &T) {
        let line = serde_json::to_string(record).expect("records serialize");
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(f, "{line}") {
            tracing::warn!("writing record: {e}");
        }
    }
}

/// Reads every record of a JSON-lines file.
pub fn read_records<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    use anyhow::Context as _;
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    BufReader::new(f)
        .lines()
        .map(|l| {
            let l = l?;
            serde_json::from_str(&l).with_context(|| format!("{}: {l}", path.display()))
        })
        .collect()
}
