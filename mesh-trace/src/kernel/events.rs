//! Decoding what the kernel programs write to the ring buffer.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_trace_common::{
    BatchEntry, ConnectEvent, DataEvent, Endpoint, EventHeader, EventKind, H2FrameEvent,
    OwnerEvent, RedirectEvent, SockEvent, TcpIssueEvent, AF_INET6, DATA_FIXED_LEN, H2_BLOCK_MAX,
    H2_FIXED_LEN, ISSUE_RESET_RECEIVED, ISSUE_RESET_SENT, ISSUE_RETRANSMIT, ISSUE_RTT_SAMPLE,
};

/// One decoded kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Connect(ConnectEvent),
    Established(SockEvent),
    Closed(SockEvent),
    Owner(OwnerEvent),
    TcpIssue(TcpIssueEvent),
    Redirect(RedirectEvent),
    /// Boxed: much larger than the others.
    Data(Box<DataEvent>),
    SynAckRetransmit(SockEvent),
    H2Frame(Box<H2Frame>),
}

/// An HTTP/2 frame a request is made of, as the kernel walked it (see
/// [`H2FrameEvent`]), with the payload bytes it carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H2Frame {
    pub ts_ns: u64,
    pub sock_cookie: u64,
    pub pid_tgid: u64,
    /// `DIR_SEND` or `DIR_RECV`.
    pub direction: u32,
    /// TCP sequence number of the frame's header (or, for continued bytes,
    /// of the first byte carried).
    pub seq: u32,
    pub length: u32,
    pub stream_id: u32,
    pub frame_type: u8,
    pub flags: u8,
    /// `H2_WHAT_*`.
    pub what: u8,
    pub payload: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} event of {len} bytes, expected {want}")]
    WrongSize {
        kind: EventKind,
        len: usize,
        want: usize,
    },
    #[error("a batch of events, not one event")]
    Batch,
    #[error("batch entry of {len} bytes at byte {at} does not fit its {total}-byte batch")]
    BadEntry { at: usize, len: usize, total: usize },
}

/// Decodes one ring buffer record into `out`: the event it holds, or each
/// data event of a batch (`mesh_trace_common::DataBatch`), in the order they
/// were appended; undecodable parts as errors in place.
pub fn decode_record(bytes: &[u8], out: &mut Vec<Result<Event, DecodeError>>) {
    match Event::decode(bytes) {
        Err(DecodeError::Batch) => decode_batch(bytes, out),
        other => out.push(other),
    }
}

fn decode_batch(bytes: &[u8], out: &mut Vec<Result<Event, DecodeError>>) {
    let mut at = size_of::<EventHeader>();
    while at + size_of::<BatchEntry>() <= bytes.len() {
        let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let start = at + size_of::<BatchEntry>();
        let Some(entry) = bytes.get(start..start.saturating_add(len)) else {
            out.push(Err(DecodeError::BadEntry {
                at,
                len,
                total: bytes.len(),
            }));
            return;
        };
        out.push(decode_data_entry(entry));
        at = (start + len + 7) & !7;
    }
}

/// A data event cut after its prefix: padded back to the full struct.
fn decode_data_entry(entry: &[u8]) -> Result<Event, DecodeError> {
    let want = size_of::<DataEvent>();
    if entry.len() < DATA_FIXED_LEN || entry.len() > want {
        return Err(DecodeError::WrongSize {
            kind: EventKind::Data,
            len: entry.len(),
            want,
        });
    }
    // Straight into a box, one given back by an event before when there is
    // one: the struct holds a request head's worth of payload (2 KiB), most
    // entries a fraction of it, and a fresh box of that size costs more than
    // the rest of decoding. Bytes past the entry are a former event's, past
    // `prefix_len`: never read.
    let mut d = spare_data_box();
    // SAFETY: `entry` is at most the struct's size; DataEvent is
    // plain-old-data, valid for any bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            entry.as_ptr(),
            (&mut *d as *mut DataEvent).cast::<u8>(),
            entry.len(),
        );
    }
    if d.header.kind != EventKind::Data as u32 {
        return Err(DecodeError::UnknownKind(d.header.kind));
    }
    if d.prefix_len as usize > entry.len() - DATA_FIXED_LEN {
        return Err(DecodeError::WrongSize {
            kind: EventKind::Data,
            len: entry.len(),
            want,
        });
    }
    Ok(Event::Data(d))
}

thread_local! {
    /// Boxes of data events done with, for the next ones decoded here: the
    /// boxes themselves are what is reused.
    #[allow(clippy::vec_box)]
    static SPARE_DATA: std::cell::RefCell<Vec<Box<DataEvent>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Data event boxes kept per thread for reuse (2 KiB each).
const SPARE_DATA_MAX: usize = 1024;

fn spare_data_box() -> Box<DataEvent> {
    SPARE_DATA
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| Box::new(DataEvent::default()))
}

/// Gives the memory of an event done with to the next data event decoded
/// on this thread (see `decode_data_entry`).
pub fn recycle(ev: Event) {
    if let Event::Data(d) = ev {
        SPARE_DATA.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_DATA_MAX {
                s.push(d);
            }
        });
    }
}

fn read<T: Copy>(bytes: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let want = size_of::<T>();
    if bytes.len() != want {
        return Err(DecodeError::WrongSize {
            kind,
            len: bytes.len(),
            want,
        });
    }
    // SAFETY: length checked; T is a repr(C) plain-old-data event type.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl Event {
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        if bytes.len() < size_of::<EventHeader>() {
            return Err(DecodeError::Short(bytes.len()));
        }
        let raw_kind = u32::from_ne_bytes(bytes[..4].try_into().unwrap());
        let kind = EventKind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
        Ok(match kind {
            EventKind::Connect => Event::Connect(read(bytes, kind)?),
            EventKind::Established => Event::Established(read(bytes, kind)?),
            EventKind::Closed => Event::Closed(read(bytes, kind)?),
            EventKind::Owner => Event::Owner(read(bytes, kind)?),
            EventKind::TcpIssue => Event::TcpIssue(read(bytes, kind)?),
            EventKind::Redirect => Event::Redirect(read(bytes, kind)?),
            EventKind::Data => Event::Data(Box::new(read(bytes, kind)?)),
            EventKind::SynAckRetransmit => Event::SynAckRetransmit(read(bytes, kind)?),
            EventKind::Batch => return Err(DecodeError::Batch),
            EventKind::H2Frame => Event::H2Frame(Box::new(decode_h2_frame(bytes)?)),
        })
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::Connect(_) => EventKind::Connect,
            Event::Established(_) => EventKind::Established,
            Event::Closed(_) => EventKind::Closed,
            Event::Owner(_) => EventKind::Owner,
            Event::TcpIssue(_) => EventKind::TcpIssue,
            Event::Redirect(_) => EventKind::Redirect,
            Event::Data(_) => EventKind::Data,
            Event::SynAckRetransmit(_) => EventKind::SynAckRetransmit,
            Event::H2Frame(_) => EventKind::H2Frame,
        }
    }

    pub fn sock_cookie(&self) -> u64 {
        match self {
            Event::Connect(e) => e.sock_cookie,
            Event::Established(e) | Event::Closed(e) => e.sock_cookie,
            Event::Owner(e) => e.sock_cookie,
            Event::TcpIssue(e) => e.sock_cookie,
            Event::Redirect(_) | Event::SynAckRetransmit(_) => 0,
            Event::Data(e) => e.sock_cookie,
            Event::H2Frame(e) => e.sock_cookie,
        }
    }

    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Connect(e) => e.header.ts_ns,
            Event::Established(e) | Event::Closed(e) => e.header.ts_ns,
            Event::Owner(e) => e.header.ts_ns,
            Event::TcpIssue(e) => e.header.ts_ns,
            Event::Redirect(e) => e.header.ts_ns,
            Event::Data(e) => e.header.ts_ns,
            Event::SynAckRetransmit(e) => e.header.ts_ns,
            Event::H2Frame(e) => e.ts_ns,
        }
    }
}

/// Label for an event kind in metrics and JSON.
pub fn kind_label(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Connect => "connect",
        EventKind::Established => "established",
        EventKind::Closed => "closed",
        EventKind::Owner => "owner",
        EventKind::TcpIssue => "tcp_issue",
        EventKind::Redirect => "redirect",
        EventKind::Data => "data",
        EventKind::SynAckRetransmit => "synack_retransmit",
        EventKind::Batch => "batch",
        EventKind::H2Frame => "h2_frame",
    }
}

/// An HTTP/2 frame event: sent cut after the payload it carries.
fn decode_h2_frame(bytes: &[u8]) -> Result<H2Frame, DecodeError> {
    let wrong = || DecodeError::WrongSize {
        kind: EventKind::H2Frame,
        len: bytes.len(),
        want: H2_FIXED_LEN,
    };
    if bytes.len() < H2_FIXED_LEN || bytes.len() > H2_FIXED_LEN + H2_BLOCK_MAX {
        return Err(wrong());
    }
    let mut fixed = [0u8; size_of::<H2FrameEvent>()];
    fixed[..H2_FIXED_LEN].copy_from_slice(&bytes[..H2_FIXED_LEN]);
    let ev: H2FrameEvent = read(&fixed, EventKind::H2Frame)?;
    let payload = bytes[H2_FIXED_LEN..]
        .get(..ev.captured as usize)
        .ok_or_else(wrong)?;
    Ok(H2Frame {
        ts_ns: ev.header.ts_ns,
        sock_cookie: ev.sock_cookie,
        pid_tgid: ev.pid_tgid,
        direction: ev.direction,
        seq: ev.seq,
        length: ev.length,
        stream_id: ev.stream_id,
        frame_type: ev.frame_type,
        flags: ev.flags,
        what: ev.what,
        payload: payload.to_vec(),
    })
}

pub const ALL_KINDS: [EventKind; 9] = [
    EventKind::Connect,
    EventKind::Established,
    EventKind::Closed,
    EventKind::Owner,
    EventKind::TcpIssue,
    EventKind::Redirect,
    EventKind::Data,
    EventKind::SynAckRetransmit,
    EventKind::H2Frame,
];

/// Label for a [`TcpIssueEvent`]'s issue.
pub fn issue_label(issue: u32) -> &'static str {
    match issue {
        ISSUE_RETRANSMIT => "retransmit",
        ISSUE_RESET_SENT => "reset_sent",
        ISSUE_RESET_RECEIVED => "reset_received",
        ISSUE_RTT_SAMPLE => "rtt_sample",
        _ => "unknown",
    }
}

/// Names of the kernel's `enum sk_rst_reason` values, lower case and
/// without the `SK_RST_REASON_` prefix: learnt from its BTF when the
/// tracer loads (a closed set of one kernel enum).
static RESET_REASONS: std::sync::OnceLock<Vec<(u32, String)>> = std::sync::OnceLock::new();

/// Learns the reset reasons' names from the kernel's BTF (once).
pub fn learn_reset_reasons(btf: &super::btf::KernelBtf) {
    RESET_REASONS.get_or_init(|| {
        btf.enum_values("sk_rst_reason")
            .unwrap_or_default()
            .into_iter()
            .map(|(v, name)| {
                let short = name.trim_start_matches("SK_RST_REASON_");
                (v, short.to_ascii_lowercase())
            })
            .collect()
    });
}

/// Label for a reset's reason (a [`TcpIssueEvent`]'s `detail`): the
/// kernel's own name, or `unknown` (not given, or not learnt).
pub fn reset_reason_label(reason: u32) -> &'static str {
    RESET_REASONS
        .get()
        .and_then(|names| names.iter().find(|(v, _)| *v == reason))
        .map_or("unknown", |(_, name)| name.as_str())
}

/// The socket address an [`Endpoint`] holds.
pub fn socket_addr(ep: &Endpoint) -> SocketAddr {
    let ip = match ep.family {
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(ep.addr)),
        _ => IpAddr::V4(Ipv4Addr::new(
            ep.addr[0], ep.addr[1], ep.addr[2], ep.addr[3],
        )),
    };
    SocketAddr::new(ip, ep.port)
}

/// (source, original destination, new destination) of a redirect.
pub fn redirect_addrs(r: &RedirectEvent) -> (SocketAddr, SocketAddr, SocketAddr) {
    let addr = |ip_be: u32, port_be: u16| {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(ip_be.to_ne_bytes())),
            u16::from_be(port_be),
        )
    };
    (
        addr(r.saddr_be, r.sport_be),
        addr(r.orig_daddr_be, r.orig_dport_be),
        addr(r.new_daddr_be, r.new_dport_be),
    )
}

/// A process name from the kernel's fixed 16-byte buffer.
pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// The JSON shape of an event for `--print-events` and tests.
pub fn to_json(ev: &Event) -> serde_json::Value {
    use serde_json::json;
    match ev {
        Event::Connect(c) => json!({
            "kind": "connect",
            "ts_ns": c.header.ts_ns,
            "sock_cookie": c.sock_cookie,
            "netns_cookie": c.netns_cookie,
            "pid": c.task.pid_tgid >> 32,
            "tid": c.task.pid_tgid as u32,
            "uid": c.task.uid_gid as u32,
            "gid": c.task.uid_gid >> 32,
            "comm": comm(&c.task.comm),
            "dst": socket_addr(&c.dst).to_string(),
        }),
        Event::Established(s) | Event::Closed(s) | Event::SynAckRetransmit(s) => json!({
            "kind": kind_label(ev.kind()),
            "ts_ns": s.header.ts_ns,
            "sock_cookie": s.sock_cookie,
            "netns_cookie": s.netns_cookie,
            "local": socket_addr(&s.local).to_string(),
            "remote": socket_addr(&s.remote).to_string(),
            "active": s.active == 1,
            "srtt_us": s.srtt_us,
            "bytes_acked": s.bytes_acked,
            "bytes_received": s.bytes_received,
        }),
        Event::Owner(o) => json!({
            "kind": "owner",
            "ts_ns": o.header.ts_ns,
            "sock_cookie": o.sock_cookie,
            "pid": o.task.pid_tgid >> 32,
            "tid": o.task.pid_tgid as u32,
            "uid": o.task.uid_gid as u32,
            "comm": comm(&o.task.comm),
        }),
        Event::Redirect(r) => json!({
            "kind": "redirect",
            "ts_ns": r.header.ts_ns,
            "netns_cookie": r.netns_cookie,
            "src": redirect_addrs(r).0.to_string(),
            "original_dst": redirect_addrs(r).1.to_string(),
            "new_dst": redirect_addrs(r).2.to_string(),
            "hook": if r.hook == mesh_trace_common::HOOK_LOCAL_OUT { "local_out" } else { "pre_routing" },
        }),
        Event::Data(d) => json!({
            "kind": "data",
            "ts_ns": d.header.ts_ns,
            "sock_cookie": d.sock_cookie,
            "tid": d.pid_tgid as u32,
            "direction": if d.direction & mesh_trace_common::DIR_RECV == 0 { "send" } else { "recv" },
            // The plaintext of a TLS call, not bytes on the wire.
            "tls_plaintext": d.direction & mesh_trace_common::DIR_TLS_PLAINTEXT != 0,
            "offset": d.offset,
            "len": d.len,
            "prefix_len": d.prefix_len,
            "prefix": String::from_utf8_lossy(&d.prefix[..(d.prefix_len as usize).min(48)]),
        }),
        Event::H2Frame(f) => json!({
            "kind": "h2_frame",
            "ts_ns": f.ts_ns,
            "sock_cookie": f.sock_cookie,
            "tid": f.pid_tgid as u32,
            "direction": if f.direction & mesh_trace_common::DIR_RECV == 0 { "send" } else { "recv" },
            "what": match f.what {
                mesh_trace_common::H2_WHAT_FRAME => "frame",
                mesh_trace_common::H2_WHAT_CONTINUED => "continued",
                _ => "lost",
            },
            "seq": f.seq,
            "frame_type": f.frame_type,
            "flags": f.flags,
            "stream_id": f.stream_id,
            "length": f.length,
            "captured": f.payload.len(),
        }),
        Event::TcpIssue(t) => json!({
            "kind": "tcp_issue",
            "ts_ns": t.header.ts_ns,
            "sock_cookie": t.sock_cookie,
            "issue": issue_label(t.issue),
            "detail": t.detail,
            "min_rtt_us": t.min_rtt_us,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names come from the running kernel's `enum sk_rst_reason`.
    #[test]
    fn reset_reasons_are_named_by_the_kernel() {
        learn_reset_reasons(&crate::kernel::btf::KernelBtf::from_sys_fs().unwrap());
        assert_eq!(reset_reason_label(0), "not_specified");
        let unknown = mesh_trace_common::RESET_REASON_UNKNOWN;
        assert_eq!(reset_reason_label(unknown), "unknown");
        assert_eq!(reset_reason_label(1_000_000), "unknown");
    }

    /// A batch as the data path writes it: its header, then entries of a
    /// data event cut after its prefix, each padded to 8 bytes.
    #[test]
    fn batches_decode_into_their_data_events_in_order() {
        let mut batch = bytes_of(&EventHeader {
            kind: EventKind::Batch as u32,
            cpu: 1,
            ts_ns: 0,
        });
        for (cookie, prefix) in [(7u64, &b"GET /"[..]), (8, &b""[..])] {
            let mut d = DataEvent::default();
            d.header.kind = EventKind::Data as u32;
            d.header.ts_ns = cookie * 10;
            d.sock_cookie = cookie;
            d.len = 100;
            d.prefix_len = prefix.len() as u32;
            d.prefix[..prefix.len()].copy_from_slice(prefix);
            let len = DATA_FIXED_LEN + prefix.len();
            batch.extend_from_slice(&(len as u32).to_ne_bytes());
            batch.extend_from_slice(&[0; 4]);
            batch.extend_from_slice(&bytes_of(&d)[..len]);
            batch.resize((batch.len() + 7) & !7, 0);
        }
        let mut out = Vec::new();
        decode_record(&batch, &mut out);
        let got: Vec<(u64, Vec<u8>)> = out
            .iter()
            .map(|e| match e {
                Ok(Event::Data(d)) => (d.sock_cookie, d.prefix[..d.prefix_len as usize].to_vec()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, [(7, b"GET /".to_vec()), (8, Vec::new())]);
        // A batch cut inside an entry: the entries before it, then an error.
        let mut out = Vec::new();
        decode_record(&batch[..batch.len() - 8], &mut out);
        assert!(
            matches!(
                out[..],
                [Ok(Event::Data(_)), Err(DecodeError::BadEntry { .. })]
            ),
            "{out:?}"
        );
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of a repr(C) POD value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn connect_round_trips() {
        let mut ev = ConnectEvent::default();
        ev.header.kind = EventKind::Connect as u32;
        ev.header.ts_ns = 42;
        ev.sock_cookie = 7;
        ev.dst = Endpoint::v4(u32::from_ne_bytes([10, 96, 0, 3]), 9080);
        ev.task.comm[..11].copy_from_slice(b"productpage");
        let decoded = Event::decode(&bytes_of(&ev)).unwrap();
        assert_eq!(decoded, Event::Connect(ev));
        let json = to_json(&decoded);
        assert_eq!(json["dst"], "10.96.0.3:9080");
        assert_eq!(json["comm"], "productpage");
    }

    #[test]
    fn sock_event_round_trips_v6() {
        let mut ev = SockEvent::default();
        ev.header.kind = EventKind::Closed as u32;
        let mut w = [0u32; 4];
        w[3] = u32::from_ne_bytes([0, 0, 0, 1]);
        ev.local = Endpoint::v6(w, 15006);
        let decoded = Event::decode(&bytes_of(&ev)).unwrap();
        assert_eq!(decoded, Event::Closed(ev));
        assert_eq!(socket_addr(&ev.local).to_string(), "[::1]:15006");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(Event::decode(&[1, 0]), Err(DecodeError::Short(2)));
        let mut raw = vec![0u8; 16];
        raw[0] = 99;
        assert_eq!(Event::decode(&raw), Err(DecodeError::UnknownKind(99)));
        raw[0] = EventKind::Connect as u8;
        assert!(matches!(
            Event::decode(&raw),
            Err(DecodeError::WrongSize { len: 16, .. })
        ));
    }
}
