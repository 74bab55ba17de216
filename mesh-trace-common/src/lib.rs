//! Types shared by mesh-trace's kernel programs and its userspace agent.
//!
//! Every event written to the ring buffer starts with an [`EventHeader`] whose
//! `kind` is one of the [`EventKind`] discriminants. Discriminants are never
//! reused: an agent decoding an unknown kind counts it and skips it.
//!
//! All structs are `#[repr(C)]` with explicit padding fields so that the
//! kernel and userspace agree on the layout byte for byte; flags are `u32`,
//! never `bool`, for the same reason.
#![no_std]

pub mod syscall_abi;

/// Address family values, as in `<sys/socket.h>`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the maps and programs, shared so the loader never drifts from the ELF.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    pub const CONNECT4: &str = "mt_connect4";
    pub const CONNECT6: &str = "mt_connect6";
    pub const SOCK_OPS: &str = "mt_sock_ops";
    pub const SOCKS: &str = "SOCKS";
    pub const ADOPT: &str = "ADOPT";
    pub const ADOPT_PROG: &str = "mt_adopt";
    pub const SEND_LENGTH: &str = "mt_send_length";
    pub const DEV_QUEUE: &str = "mt_dev_queue";
    pub const RECV_LENGTH: &str = "mt_recv_length";
    pub const RETRANSMIT: &str = "mt_retransmit";
    pub const RETRANSMIT_SYNACK: &str = "mt_retransmit_synack";
    pub const SEND_RESET: &str = "mt_send_reset";
    pub const RECEIVE_RESET: &str = "mt_receive_reset";
    pub const MESHED_NETNS: &str = "MESHED_NETNS";
    pub const NETNS_SPENT: &str = "NETNS_SPENT";
    pub const PREFIX_LEN: &str = "PREFIX_LEN";
    pub const HEAD_LEN: &str = "HEAD_LEN";
    pub const BATCH: &str = "BATCH";
    pub const FLUSH: &str = "mt_flush";
    pub const SSL_WRITE: &str = "mt_ssl_write";
    pub const SSL_WRITE_EX: &str = "mt_ssl_write_ex";
    pub const SSL_READ: &str = "mt_ssl_read";
    pub const SSL_READ_EX: &str = "mt_ssl_read_ex";
    pub const SSL_RETURN: &str = "mt_ssl_return";
    pub const TLS_PROBES: &str = "TLS_PROBES";
}

/// Discriminants of the events in the ring buffer. Never reuse a value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A process called connect() on a TCP socket (cgroup/connect4).
    Connect = 1,
    /// A TCP socket reached ESTABLISHED, actively or passively (sock_ops).
    Established = 2,
    /// A TCP socket closed (sock_ops state callback to TCP_CLOSE).
    Closed = 3,
    /// The process that first sent or received on a tracked socket.
    Owner = 4,
    /// A retransmission or a reset on a tracked socket.
    TcpIssue = 5,
    /// The nat table rewrote a connection's destination (iptables REDIRECT),
    /// seen by netfilter programs around the NAT priority.
    Redirect = 6,
    /// Bytes sent or received on a socket in a meshed namespace.
    Data = 7,
    /// A listener resent its SYN-ACK for a connection it is accepting: a
    /// [`SockEvent`] naming the connection as its server socket will (no
    /// cookie yet: the socket does not exist).
    SynAckRetransmit = 8,
    /// Data events of one CPU sent to the ring buffer together (see
    /// [`DataBatch`]): the header, then [`BatchEntry`] records.
    Batch = 9,
    /// An HTTP/2 frame on a socket in a meshed namespace that matters to a
    /// request (see [`H2FrameEvent`]), found by walking the frames of each
    /// send and receive of a connection that began with HTTP/2.
    H2Frame = 10,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Connect),
            2 => Some(Self::Established),
            3 => Some(Self::Closed),
            4 => Some(Self::Owner),
            5 => Some(Self::TcpIssue),
            6 => Some(Self::Redirect),
            7 => Some(Self::Data),
            8 => Some(Self::SynAckRetransmit),
            9 => Some(Self::Batch),
            10 => Some(Self::H2Frame),
            _ => None,
        }
    }
}

/// Why a kernel event could not be delivered; the index into the `LOST` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// `bpf_ringbuf_reserve` failed: the agent did not drain fast enough.
    RingBufFull = 0,
    /// A bounded kernel map was full and an entry could not be inserted.
    MapFull = 1,
    /// A namespace spent its data events for the window on this CPU
    /// (`NETNS_BUDGET`): one pod cannot fill the ring for all the others.
    NetnsBudget = 2,
}

impl LossReason {
    pub const COUNT: u32 = 3;
    pub const ALL: [LossReason; 3] = [
        LossReason::RingBufFull,
        LossReason::MapFull,
        LossReason::NetnsBudget,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LossReason::RingBufFull => "ringbuf_full",
            LossReason::MapFull => "map_full",
            LossReason::NetnsBudget => "netns_budget",
        }
    }
}

/// The window of a namespace's data-event budget.
pub const BUDGET_WINDOW_NS: u64 = 100_000_000;

/// A namespace's data events in the current window on one CPU
/// (`NETNS_SPENT`, an LRU per-CPU hash by namespace cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetWindow {
    pub start_ns: u64,
    pub events: u32,
    pub _pad: u32,
}

/// First 16 bytes of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] discriminant.
    pub kind: u32,
    /// CPU that produced the event.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
}

/// An IPv4 or IPv6 socket address. IPv4 addresses use the first 4 bytes of
/// `addr`; bytes are in network order, `port` in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

impl Endpoint {
    /// `addr_be` is the address as the kernel stores it (network order in memory),
    /// `port` in host order.
    pub const fn v4(addr_be: u32, port: u16) -> Self {
        let b = addr_be.to_ne_bytes();
        Endpoint {
            addr: [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port,
            family: AF_INET,
            _pad: 0,
        }
    }

    /// `words` are the four 32-bit words of the address as the kernel stores them.
    pub const fn v6(words: [u32; 4], port: u16) -> Self {
        let (a, b, c, d) = (
            words[0].to_ne_bytes(),
            words[1].to_ne_bytes(),
            words[2].to_ne_bytes(),
            words[3].to_ne_bytes(),
        );
        Endpoint {
            addr: [
                a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
                d[2], d[3],
            ],
            port,
            family: AF_INET6,
            _pad: 0,
        }
    }
}

/// Who and what: the process context of a socket event, where the hook runs in
/// process context. Hooks that run in softirq leave it zeroed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskInfo {
    /// `bpf_get_current_pid_tgid()`: tgid in the upper 32 bits, thread id below.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: gid in the upper 32 bits, uid below.
    pub uid_gid: u64,
    pub comm: [u8; 16],
}

/// [`EventKind::Connect`]: connect() on a TCP socket, seen before any NAT, so
/// `dst` is the destination the application asked for (e.g. a service VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectEvent {
    pub header: EventHeader,
    pub sock_cookie: u64,
    pub netns_cookie: u64,
    pub task: TaskInfo,
    pub dst: Endpoint,
}

/// [`EventKind::Established`] and [`EventKind::Closed`], from sock_ops.
/// Runs in softirq for passive opens: never attribute a process from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockEvent {
    pub header: EventHeader,
    pub sock_cookie: u64,
    pub netns_cookie: u64,
    pub local: Endpoint,
    pub remote: Endpoint,
    /// 1 when this socket called connect() (active open), 0 when it was accepted.
    pub active: u32,
    /// Smoothed RTT in microseconds, as sock_ops reports it (`srtt_us >> 3`).
    pub srtt_us: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// [`EventKind::Owner`]: who first sent or received on a tracked socket, from
/// `sock_send_length`/`sock_recv_length`, which run in the process's context.
/// This is how accepted sockets, which sock_ops sees in softirq, get a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerEvent {
    pub header: EventHeader,
    pub sock_cookie: u64,
    pub task: TaskInfo,
}

/// What a [`TcpIssueEvent`] reports about a socket; `detail` says more.
/// Retransmitted segments: `detail` is how many (a GSO packet holds several).
pub const ISSUE_RETRANSMIT: u32 = 1;
/// A reset sent: `detail` is the kernel's `enum sk_rst_reason` where the
/// tracepoint carries one, else `RESET_REASON_UNKNOWN`.
pub const ISSUE_RESET_SENT: u32 = 2;
/// A reset received: `detail` is 0.
pub const ISSUE_RESET_RECEIVED: u32 = 3;
/// An RTT sample from the data path: `detail` is the smoothed RTT and
/// `min_rtt_us` the kernel's windowed minimum, in microseconds.
pub const ISSUE_RTT_SAMPLE: u32 = 4;
/// `detail` of a reset whose reason the kernel does not give.
pub const RESET_REASON_UNKNOWN: u32 = u32::MAX;

/// [`EventKind::TcpIssue`]: retransmitted segments, a reset or an RTT sample.
/// A socket still connecting (SYN_SENT, no storage yet) is reported by its
/// cookie too: the agent holds the event until the socket is established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpIssueEvent {
    pub header: EventHeader,
    pub sock_cookie: u64,
    /// One of the `ISSUE_*` values.
    pub issue: u32,
    pub detail: u32,
    /// `ISSUE_RTT_SAMPLE` only: the minimum RTT the kernel saw in its
    /// window (`tcp_sock.rtt_min`), which a delayed ACK does not inflate.
    pub min_rtt_us: u32,
    /// `ISSUE_RETRANSMIT` only: the socket's TCP state (`TCP_SYN_SENT` for
    /// a socket still connecting).
    pub sk_state: u32,
}

/// [`TcpIssueEvent::sk_state`] of a socket whose SYN is being resent.
pub const TCP_SYN_SENT: u32 = 2;

/// Value of the `SOCKS` socket-local storage: TCP sockets between
/// ESTABLISHED and close. Lives on the socket and goes with it; a failed
/// creation (no memory) counts as `map_full`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedSock {
    /// The socket's cookie, kept so the data path need not ask for it.
    pub cookie: u64,
    pub netns_cookie: u64,
    /// `TRACKED_OWNER_SEEN` once an [`OwnerEvent`] was sent;
    /// `TRACKED_MESHED` once the data path found its namespace meshed.
    pub flags: u32,
    /// When the data path last sent an RTT sample, in units of 2^30 ns
    /// (about a second) of `bpf_ktime_get_ns`: at most one per unit.
    pub rtt_sampled: u32,
    /// When the newest data the socket sent first left it
    /// (`net_dev_queue`), `bpf_ktime_get_ns`; 0 before any did.
    pub sent_ns: u64,
    /// The TCP sequence number just past that packet's data.
    pub sent_end_seq: u32,
    pub _pad: u32,
}

/// Most payload bytes a [`DataEvent`] carries: the bytes of an HTTP/1.x
/// request head (sidecars' heads between them run past a kilobyte); other
/// bytes get the shorter prefix the agent asks for.
pub const DATA_PREFIX_MAX: usize = 2048;
/// [`DataEvent::direction`] values.
pub const DIR_SEND: u32 = 0;
pub const DIR_RECV: u32 = 1;
/// Flag on [`DataEvent::direction`]: the plaintext a TLS library call
/// (`SSL_write`/`SSL_read`) took or returned, not bytes on the wire.
/// `offset` is the TCP sequence number of the first byte of the call's last
/// send or receive on the socket (a call that also finishes the handshake
/// moves the handshake's records first), `opposite_seq` that of the call's
/// first send or receive, `len` the plaintext bytes.
pub const DIR_TLS_PLAINTEXT: u32 = 0x10;
/// With [`DIR_TLS_PLAINTEXT`]: the call moved nothing on the network (it
/// returned bytes the library had read before); `offset` means nothing.
pub const DIR_TLS_NO_SEQ: u32 = 0x20;

/// A TLS library call in progress on a thread (`TLS_CALLS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCall {
    /// The `SSL *` the call is on.
    pub ssl: u64,
    /// The caller's plaintext buffer.
    pub buf: u64,
    /// `_ex` forms: where the library writes the byte count.
    pub count_ptr: u64,
    /// The socket of the call's last I/O in its direction.
    pub cookie: u64,
    /// TCP sequence number of that I/O's first byte.
    pub seq: u32,
    /// `DIR_SEND` (`SSL_write`) or `DIR_RECV` (`SSL_read`).
    pub direction: u32,
    /// 1 once the call moved bytes on a meshed socket.
    pub seen_io: u32,
    /// 1 for `SSL_write_ex`/`SSL_read_ex`.
    pub ex: u32,
    /// TCP sequence number of the first byte of the call's first I/O in
    /// its direction (where a response read by the call starts).
    pub first_seq: u32,
    pub _pad: u32,
    /// When the call's first and last I/O in its direction happened.
    pub first_ts: u64,
    pub last_ts: u64,
}

/// HTTP/2 inside a TLS session (`TLS_H2`, by `SSL *`): per direction, the
/// plaintext bytes so far (the position both ends of the session count
/// alike from its first application byte), whether its first call was
/// seen, and the frame walk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsH2 {
    /// The socket the session was last seen on: another is another session
    /// at a freed one's address.
    pub cookie: u64,
    pub pos: [u32; 2],
    pub seen: [u32; 2],
    /// When a call of the session last moved bytes on the network, per
    /// direction: when bytes a read takes from the library's buffer came.
    pub last_io_ts: [u64; 2],
    pub dirs: [H2Dir; 2],
}

/// TLS sessions whose HTTP/2 state is kept (LRU).
pub const TLS_H2_MAX: u32 = 16_384;

/// Threads inside a TLS call at once (LRU).
pub const TLS_CALLS_MAX: u32 = 16_384;
/// TLS sessions whose socket is remembered (LRU).
pub const TLS_SESSIONS_MAX: u32 = 65_536;

/// [`EventKind::Data`]: one send or receive on a socket in a meshed
/// namespace, from `sock_send_length`/`sock_recv_length` in the context of
/// the thread that did it. Only a bounded prefix of the payload is copied.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataEvent {
    pub header: EventHeader,
    pub sock_cookie: u64,
    pub pid_tgid: u64,
    /// TCP sequence number of the first byte moved (the low 32 bits; the
    /// high bits are 0): both ends of a connection see the same numbers.
    pub offset: u64,
    /// Bytes moved by the call.
    pub len: u32,
    /// `DIR_SEND` or `DIR_RECV`.
    pub direction: u32,
    /// Valid bytes in `prefix` (0 when the buffer could not be found, e.g.
    /// io_uring or sendfile).
    pub prefix_len: u32,
    /// The other direction's sequence number as the call returned: for a
    /// send, how far the caller had read (`copied_seq`); for a receive, how
    /// far it had written (`write_seq`). A request's response starts there
    /// on a connection that does not pipeline, which lets a response be
    /// told from another request's after bytes went by unseen.
    pub opposite_seq: u32,
    pub prefix: [u8; DATA_PREFIX_MAX],
}

impl Default for DataEvent {
    fn default() -> Self {
        DataEvent {
            header: EventHeader::default(),
            sock_cookie: 0,
            pid_tgid: 0,
            offset: 0,
            len: 0,
            direction: 0,
            prefix_len: 0,
            opposite_seq: 0,
            prefix: [0; DATA_PREFIX_MAX],
        }
    }
}

pub const TRACKED_OWNER_SEEN: u32 = 1;
/// The socket's namespace was found in MESHED_NETNS: later calls skip the
/// lookup (a namespace stays meshed while it has sockets; only one that is
/// gone leaves the map).
pub const TRACKED_MESHED: u32 = 2;
/// The data path saw the socket's first send (`TRACKED_SEEN_SEND`) or
/// receive (`TRACKED_SEEN_RECV`): where HTTP/2 is told from its first bytes.
/// Adopted sockets start with both, as their first bytes went by unseen.
pub const TRACKED_SEEN_SEND: u32 = 4;
pub const TRACKED_SEEN_RECV: u32 = 8;
/// The socket's connection began with HTTP/2 in at least one direction: its
/// calls are walked frame by frame (`H2_SOCKS`).
pub const TRACKED_H2: u32 = 16;

/// The client connection preface that opens every HTTP/2 connection.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most header block bytes one [`H2FrameEvent`] carries (the payload of a
/// HEADERS, CONTINUATION or PUSH_PROMISE frame). A frame with a longer
/// payload is reported with what fits: its connection's header compression
/// state is lost in that direction.
pub const H2_BLOCK_MAX: usize = 4096;
/// Frames walked per send or receive; past it the direction is lost.
pub const H2_FRAMES_PER_IO: usize = 2048;

/// Flag on [`H2FrameEvent::direction`]: walked in a TLS session's
/// plaintext; `seq` is the position in it, not a TCP sequence number.
pub const H2_IN_TLS: u32 = 0x10;

/// [`H2FrameEvent::what`]: the frame itself, from its 9-byte header (and
/// its payload's bytes that this send or receive moved).
pub const H2_WHAT_FRAME: u8 = 1;
/// More payload bytes of a header frame begun in an earlier send or receive.
pub const H2_WHAT_CONTINUED: u8 = 2;
/// The walk lost the frame boundaries in this direction (bytes went by
/// unwalked, more frames or buffers than the bounds): nothing more is
/// reported for it.
pub const H2_WHAT_LOST: u8 = 3;

/// Kernel state of one direction of an HTTP/2 connection (`H2_SOCKS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Dir {
    /// Sequence number where the next frame header begins.
    pub next_frame: u32,
    /// Sequence number up to which the payload of a header frame begun
    /// earlier goes on (captured first in the next send or receive).
    pub capture_until: u32,
    /// `H2_DIR_*`.
    pub state: u32,
    /// Bytes of a frame header cut by the end of a send or receive.
    pub hdr_have: u32,
    pub hdr: [u8; 16],
}

/// [`H2Dir::state`]: the direction's first bytes are still to come.
pub const H2_DIR_UNKNOWN: u32 = 0;
/// Frames are walked.
pub const H2_DIR_WALKING: u32 = 1;
/// The frame boundaries were lost: nothing more is walked.
pub const H2_DIR_LOST: u32 = 2;

/// Value of the `H2_SOCKS` socket storage: per direction (send, receive).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Sock {
    pub dirs: [H2Dir; 2],
}

/// [`EventKind::H2Frame`]: a frame a request is made of (HEADERS,
/// CONTINUATION, PUSH_PROMISE with their header block; DATA that ends a
/// stream; RST_STREAM; GOAWAY), more bytes of one (`H2_WHAT_CONTINUED`), or
/// the walk's loss (`H2_WHAT_LOST`). Sent at the time of the data event of
/// the send or receive that moved it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2FrameEvent {
    pub header: EventHeader,
    pub sock_cookie: u64,
    /// The thread whose send or receive moved it.
    pub pid_tgid: u64,
    /// `DIR_SEND` or `DIR_RECV`.
    pub direction: u32,
    /// Sequence number of the frame's first byte (its header), or of the
    /// first byte carried for `H2_WHAT_CONTINUED`.
    pub seq: u32,
    /// The frame's payload length (24 bits).
    pub length: u32,
    pub stream_id: u32,
    pub frame_type: u8,
    pub flags: u8,
    /// `H2_WHAT_*`.
    pub what: u8,
    pub _pad: u8,
    /// Payload bytes carried in `payload`.
    pub captured: u32,
    /// Twice the bound so that the verifier sees every copy inside it; at
    /// most [`H2_BLOCK_MAX`] bytes are sent.
    pub payload: [u8; 2 * H2_BLOCK_MAX],
}

/// Bytes of an [`H2FrameEvent`] before its payload.
pub const H2_FIXED_LEN: usize = core::mem::offset_of!(H2FrameEvent, payload);

/// Size of the `ADOPT` map: sockets found open when the agent starts,
/// adopted one network namespace at a time.
pub const ADOPT_MAX: u32 = 16_384;

/// Entries of MESHED_NETNS: network namespaces whose sockets' payload is
/// captured. A namespace that is gone leaves; one that finds it full is
/// counted as `map_full` loss.
pub const MESHED_NETNS_MAX: u32 = 16_384;

/// Netfilter hooks a [`RedirectEvent`] comes from.
pub const HOOK_LOCAL_OUT: u16 = 0;
pub const HOOK_PRE_ROUTING: u16 = 1;

/// [`EventKind::Redirect`]: the first packet (SYN) of a connection whose
/// destination the nat table changed. Written by generated netfilter
/// programs (see the agent's `kernel::nat`), so its layout is fixed here and
/// there: addresses and ports are in network byte order, as in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectEvent {
    pub header: EventHeader,
    /// The namespace whose nat table did it.
    pub netns_cookie: u64,
    pub saddr_be: u32,
    pub orig_daddr_be: u32,
    pub new_daddr_be: u32,
    pub sport_be: u16,
    pub orig_dport_be: u16,
    pub new_dport_be: u16,
    /// `HOOK_LOCAL_OUT` or `HOOK_PRE_ROUTING`.
    pub hook: u16,
    pub _pad: u32,
}

/// Most bytes of one batch record in the ring buffer.
pub const BATCH_MAX: usize = 8192;
/// A batch's buffer: room for an entry written at any offset below
/// [`BATCH_MAX`], and a power of two so that a length masked by it is
/// within the buffer (which is what the verifier checks).
pub const BATCH_BUF: usize = 2 * BATCH_MAX;
/// Most bytes one entry takes in a batch.
pub const BATCH_ENTRY_MAX: usize = core::mem::size_of::<BatchEntry>() + MAX_EVENT_SIZE;
/// Bytes of a [`DataEvent`] before its prefix: what an entry always holds.
pub const DATA_FIXED_LEN: usize = core::mem::offset_of!(DataEvent, prefix);

/// One CPU's data events waiting to go to the ring buffer together
/// (`BATCH`, a per-CPU array of one): a ring buffer reservation per socket
/// call costs more than everything else the data path does, so the socket
/// programs append here and the batch goes out in one record when it is
/// full, or when the agent asks (it runs the flush program on every CPU
/// before it reads the ring, and orders what it read by time).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataBatch {
    /// Bytes of `buf` in use, the batch header included; 0 when empty.
    pub len: u32,
    /// Data events in the batch: what is counted lost if the ring is full.
    pub count: u32,
    /// Bytes past which the batch is sent, set by the agent (at most
    /// [`BATCH_MAX`]); 0: no batching, every event goes out on its own.
    pub cap: u32,
    /// 1 while a program on this CPU appends: a flush that interrupts it
    /// (the agent's, in an interrupt) leaves the batch alone.
    pub busy: u32,
    pub buf: [u8; BATCH_BUF],
}

/// An entry of a batch: the event's length, then its bytes (a
/// [`DataEvent`] cut after `prefix_len` bytes of prefix), padded to 8.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchEntry {
    pub len: u32,
    pub _pad: u32,
}

/// Largest event, for sizing reads in tests and benchmarks.
pub const MAX_EVENT_SIZE: usize = core::mem::size_of::<DataEvent>();

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers and arrays of
    // integers, and have no implicit padding (checked by the layout tests).
    unsafe impl aya::Pod for EventHeader {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for TaskInfo {}
    unsafe impl aya::Pod for ConnectEvent {}
    unsafe impl aya::Pod for SockEvent {}
    unsafe impl aya::Pod for OwnerEvent {}
    unsafe impl aya::Pod for TcpIssueEvent {}
    unsafe impl aya::Pod for TrackedSock {}
    unsafe impl aya::Pod for RedirectEvent {}
    unsafe impl aya::Pod for DataEvent {}
    unsafe impl aya::Pod for DataBatch {}
    unsafe impl aya::Pod for BudgetWindow {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    /// Sizes equal the sum of the fields: no implicit padding anywhere.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EventHeader>(), 4 + 4 + 8);
        assert_eq!(size_of::<Endpoint>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<TaskInfo>(), 8 + 8 + 16);
        assert_eq!(size_of::<ConnectEvent>(), 16 + 8 + 8 + 32 + 24);
        assert_eq!(size_of::<SockEvent>(), 16 + 8 + 8 + 24 + 24 + 4 + 4 + 8 + 8);
        assert_eq!(size_of::<OwnerEvent>(), 16 + 8 + 32);
        assert_eq!(size_of::<TcpIssueEvent>(), 16 + 8 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<TrackedSock>(), 8 + 8 + 4 + 4 + 8 + 4 + 4);
        assert_eq!(
            size_of::<DataEvent>(),
            16 + 8 + 8 + 8 + 4 * 4 + DATA_PREFIX_MAX
        );
        assert_eq!(size_of::<RedirectEvent>(), 16 + 8 + 12 + 8 + 4);
        assert_eq!(core::mem::offset_of!(RedirectEvent, sport_be), 36);
        assert_eq!(core::mem::offset_of!(RedirectEvent, hook), 42);
        assert_eq!(align_of::<ConnectEvent>(), 8);
        assert_eq!(size_of::<DataBatch>(), 16 + BATCH_BUF);
        assert_eq!(DATA_FIXED_LEN, 56);
        const { assert!(BATCH_BUF >= BATCH_MAX + BATCH_ENTRY_MAX) };
        assert!(MAX_EVENT_SIZE >= size_of::<SockEvent>());
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in [
            EventKind::Connect,
            EventKind::Established,
            EventKind::Closed,
        ] {
            assert_eq!(EventKind::from_u32(k as u32), Some(k));
        }
        assert_eq!(EventKind::from_u32(0), None);
        assert_eq!(EventKind::from_u32(99), None);
    }

    #[test]
    fn v4_endpoint_keeps_network_order() {
        // 10.0.3.29 as the kernel stores it: bytes 10,0,3,29 in memory.
        let be = u32::from_ne_bytes([10, 0, 3, 29]);
        let ep = Endpoint::v4(be, 9080);
        assert_eq!(&ep.addr[..4], &[10, 0, 3, 29]);
        assert_eq!(ep.port, 9080);
        assert_eq!(ep.family, AF_INET);
    }
}
