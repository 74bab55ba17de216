//! Per-request latency spans across the sidecar hops.
//!
//! - [`h2`]: HTTP/2 header blocks and stream ends, from the frames the
//!   kernel walks, with a HPACK decoder per connection direction;
//! - [`http`]: HTTP/1.1 framing of each socket's byte stream (from the
//!   kernel's data events: timestamps, stream offsets, payload prefixes);
//! - [`span`]: the span of one request and its hops;
//! - [`live`]: sliding-window percentiles per service and hop;
//! - [`trace_id`]: the trace id both nodes of a request derive alike.
pub mod h2;
pub mod http;
pub mod live;
pub mod span;
pub mod stitch;
pub mod trace_id;
