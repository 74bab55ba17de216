//! TCP sockets that already exist in a network namespace, from the kernel's
//! sock_diag netlink interface: how the agent picks up connections opened
//! before it started (sidecars keep pooled connections for a long time).
//! The socket cookie it reports is the one the eBPF programs see.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::bail;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
/// nlmsghdr (16) + inet_diag_msg (72).
const MSG_LEN: usize = 16 + 72;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub listening: bool,
    pub uid: u32,
}

/// IPv4 TCP sockets (established and listening) of the namespace at `netns`.
pub fn tcp_sockets(netns: &Path) -> anyhow::Result<Vec<DiagSocket>> {
    crate::netns::in_namespace(netns, dump)
}

fn dump() -> anyhow::Result<Vec<DiagSocket>> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        bail!("netlink socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; 16 + 56];
    let req_len = req.len() as u32;
    req[0..4].copy_from_slice(&req_len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states.
    req[16] = libc::AF_INET as u8;
    req[17] = libc::IPPROTO_TCP as u8;
    let states: u32 = (1 << TCP_ESTABLISHED) | (1 << TCP_LISTEN);
    req[20..24].copy_from_slice(&states.to_ne_bytes());
    // SAFETY: req is a valid buffer of its length.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        bail!("sock_diag request: {}", std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            bail!("sock_diag reply: {}", std::io::Error::last_os_error());
        }
        if parse(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
}

/// Parses one datagram of replies; true once the dump is complete.
fn parse(mut b: &[u8], out: &mut Vec<DiagSocket>) -> anyhow::Result<bool> {
    while b.len() >= 16 {
        let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(b[4..6].try_into().expect("2 bytes"));
        if len < 16 || len > b.len() {
            bail!("malformed sock_diag reply");
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => bail!("sock_diag refused the request"),
            SOCK_DIAG_BY_FAMILY if len >= MSG_LEN => out.push(socket(&b[16..len])),
            _ => {}
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    Ok(false)
}

/// One inet_diag_msg.
fn socket(m: &[u8]) -> DiagSocket {
    let port = |o: usize| u16::from_be_bytes([m[o], m[o + 1]]);
    let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(m[o], m[o + 1], m[o + 2], m[o + 3]));
    let u32_at = |o: usize| u32::from_ne_bytes(m[o..o + 4].try_into().expect("4 bytes"));
    // family, state, timer, retrans, then inet_diag_sockid at 4:
    // sport 4, dport 6, src 8, dst 24, if 40, cookie 44; then expires 52,
    // rqueue 56, wqueue 60, uid 64, inode 68.
    DiagSocket {
        cookie: u64::from(u32_at(44)) | (u64::from(u32_at(48)) << 32),
        local: SocketAddr::new(ip(8), port(4)),
        remote: SocketAddr::new(ip(24), port(6)),
        listening: m[1] == TCP_LISTEN,
        uid: u32_at(64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_reply_and_the_end_of_the_dump() {
        let mut msg = vec![0u8; MSG_LEN];
        msg[0..4].copy_from_slice(&(MSG_LEN as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let m = &mut msg[16..];
        m[0] = 2;
        m[1] = TCP_ESTABLISHED;
        m[4..6].copy_from_slice(&15001u16.to_be_bytes());
        m[6..8].copy_from_slice(&40000u16.to_be_bytes());
        m[8..12].copy_from_slice(&[127, 0, 0, 1]);
        m[24..28].copy_from_slice(&[10, 244, 0, 5]);
        m[44..48].copy_from_slice(&7u32.to_ne_bytes());
        m[64..68].copy_from_slice(&1337u32.to_ne_bytes());
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&done);
        let mut out = Vec::new();
        assert!(parse(&msg, &mut out).unwrap());
        assert_eq!(
            out,
            vec![DiagSocket {
                cookie: 7,
                local: "127.0.0.1:15001".parse().unwrap(),
                remote: "10.244.0.5:40000".parse().unwrap(),
                listening: false,
                uid: 1337,
            }]
        );
    }
}
