//! Kernel events built by hand, for unit tests of the flow table and the
//! stitcher (the kernel tests drive the real programs).
use mesh_trace_common::{ConnectEvent, Endpoint, EventKind, SockEvent};

use crate::kernel::events::Event;

pub fn ep(ip: [u8; 4], port: u16) -> Endpoint {
    Endpoint::v4(u32::from_ne_bytes(ip), port)
}

pub fn connect(cookie: u64, netns: u64, uid: u64, tgid: u32, dst: Endpoint) -> Event {
    let mut c = ConnectEvent::default();
    c.header.kind = EventKind::Connect as u32;
    c.sock_cookie = cookie;
    c.netns_cookie = netns;
    c.task.pid_tgid = u64::from(tgid) << 32 | u64::from(tgid);
    c.task.uid_gid = uid << 32 | uid;
    c.dst = dst;
    Event::Connect(c)
}

pub fn established(
    cookie: u64,
    netns: u64,
    local: Endpoint,
    remote: Endpoint,
    active: bool,
) -> Event {
    let mut s = SockEvent::default();
    s.header.kind = EventKind::Established as u32;
    s.sock_cookie = cookie;
    s.netns_cookie = netns;
    s.local = local;
    s.remote = remote;
    s.active = u32::from(active);
    Event::Established(s)
}
