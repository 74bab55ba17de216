//! The kernel's own transmit times of a socket's writes, for the lab's truth
//! (`SO_TIMESTAMPING`, software transmit stamps).
//!
//! A write stamped from user space can be early: a thread kept off the CPU
//! inside its call before the bytes leave (two cores, many busy threads) is
//! stamped when it went in. The kernel stamps the packet as the device
//! takes it (`skb_tx_timestamp`, which loopback and veth call in the
//! writer's context, inside the call), and queues the stamp on the socket's
//! error queue, keyed by the byte offset of the call's last byte
//! (`SOF_TIMESTAMPING_OPT_ID`). The stamps carry no payload
//! (`OPT_TSONLY`), and reading them moves no stream bytes.
use std::{io, os::fd::RawFd};

/// Stamps asked for: software transmit stamps, reported, keyed by byte
/// offset, without the packet.
const FLAGS: u32 = libc::SOF_TIMESTAMPING_TX_SOFTWARE
    | libc::SOF_TIMESTAMPING_SOFTWARE
    | libc::SOF_TIMESTAMPING_OPT_ID
    | libc::SOF_TIMESTAMPING_OPT_TSONLY;

/// `sock_extended_err.ee_origin` of a timestamp, and `ee_info` of a
/// transmit (send) stamp (linux/errqueue.h).
const SO_EE_ORIGIN_TIMESTAMPING: u8 = 4;
const SCM_TSTAMP_SND: u32 = 0;

/// `struct sock_extended_err`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ExtendedErr {
    errno: u32,
    origin: u8,
    kind: u8,
    code: u8,
    pad: u8,
    info: u32,
    data: u32,
}

/// A TCP socket whose writes the kernel stamps.
#[derive(Debug)]
pub struct TxStamps {
    fd: RawFd,
    /// Bytes written since the stamps were turned on.
    sent: u64,
}

impl TxStamps {
    /// Turns the stamps on for `fd`, a TCP socket that has sent nothing
    /// yet (its offsets count from here).
    pub fn enable(fd: RawFd) -> io::Result<TxStamps> {
        let flags = FLAGS as libc::c_int;
        // SAFETY: a c_int option value of its size, on a socket we own.
        let ret = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPING,
                &flags as *const libc::c_int as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(TxStamps { fd, sent: 0 })
    }

    /// A write of `n` bytes returned: the kernel's transmit time of its
    /// last byte (CLOCK_MONOTONIC ns), when the packet left within the call
    /// (else `None`: held back by the congestion window, say).
    pub fn after_write(&mut self, n: usize) -> Option<u64> {
        if n == 0 {
            return None;
        }
        self.sent += n as u64;
        // The kernel's key is 32 bits and wraps.
        let last = (self.sent - 1) as u32;
        // A write makes one stamp, but one that came late (its packet held
        // back) is still queued at the next write: the queue is read until
        // this write's, or empty, so that one late stamp does not leave every
        // later write a stamp behind on a long-lived connection.
        while let Some((key, realtime_ns)) = self.next_stamp() {
            if key == last {
                return Some(realtime_to_monotonic(realtime_ns));
            }
        }
        None
    }

    /// The next transmit stamp on the error queue: (key, CLOCK_REALTIME ns).
    fn next_stamp(&self) -> Option<(u32, u64)> {
        loop {
            let mut control = [0u64; 64];
            // SAFETY: an empty msghdr is valid; the control buffer outlives
            // the call, and its length is what we say.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = size_of_val(&control) as _;
            // SAFETY: a valid msghdr for this socket.
            let got = unsafe {
                libc::recvmsg(self.fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT)
            };
            if got < 0 {
                return None;
            }
            let (mut stamp, mut err) = (None, None);
            // SAFETY: walking the control messages the kernel filled in,
            // inside `control`, with the libc macros.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    let data = libc::CMSG_DATA(c);
                    match ((*c).cmsg_level, (*c).cmsg_type) {
                        (libc::SOL_SOCKET, libc::SO_TIMESTAMPING) => {
                            // struct scm_timestamping: [timespec; 3], the
                            // software stamp first.
                            let ts = std::ptr::read_unaligned(data as *const libc::timespec);
                            stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                        }
                        (libc::SOL_IP, libc::IP_RECVERR) | (libc::SOL_IPV6, libc::IPV6_RECVERR) => {
                            err = Some(std::ptr::read_unaligned(data as *const ExtendedErr));
                        }
                        _ => {}
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            match (stamp, err) {
                (Some(ns), Some(e))
                    if e.origin == SO_EE_ORIGIN_TIMESTAMPING && e.info == SCM_TSTAMP_SND =>
                {
                    return Some((e.data, ns));
                }
                // Something else on the queue (an ICMP error): next.
                _ => continue,
            }
        }
    }
}

/// A CLOCK_REALTIME time as CLOCK_MONOTONIC, by the clocks' offset now.
fn realtime_to_monotonic(realtime_ns: u64) -> u64 {
    let now = |id| {
        nix::time::clock_gettime(id)
            .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
            .unwrap_or(0)
    };
    let mono = now(nix::time::ClockId::CLOCK_MONOTONIC);
    let real = now(nix::time::ClockId::CLOCK_REALTIME);
    (realtime_ns as i128 - (real - mono)).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        os::fd::AsRawFd,
    };

    /// Over loopback the packet leaves inside the write: its stamp is there
    /// when the call returns, between the call's start and its return.
    #[test]
    fn a_loopback_write_is_stamped_inside_its_call() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut stamps = TxStamps::enable(server.as_raw_fd()).unwrap();
        for size in [1, 100, 5] {
            let before = crate::clock::mono_ns();
            server.write_all(&vec![7u8; size]).unwrap();
            let after = crate::clock::mono_ns();
            let t = stamps.after_write(size).expect("a stamp for the write");
            // The clocks' offset is read anew each time: a few us of slack.
            assert!(
                t + 50_000 >= before && t <= after + 50_000,
                "{before} {t} {after}"
            );
            let mut buf = vec![0u8; size];
            client.read_exact(&mut buf).unwrap();
        }
        // A socket that cannot take them says so.
        assert!(TxStamps::enable(-1).is_err());
    }

    /// A packet held back past its write's call (here by TCP_CORK) is
    /// stamped after it: that write has none, and the next write still
    /// finds its own behind the late one.
    #[test]
    fn a_late_stamp_leaves_the_next_write_its_own() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut stamps = TxStamps::enable(server.as_raw_fd()).unwrap();
        let fd = server.as_raw_fd();
        let cork = |on: libc::c_int| {
            // SAFETY: a c_int option value of its size, on a socket we own.
            let ret = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_CORK,
                    &on as *const libc::c_int as *const libc::c_void,
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        };
        cork(1);
        server.write_all(&[1]).unwrap();
        assert_eq!(
            stamps.after_write(1),
            None,
            "a corked write left in its call"
        );
        cork(0);
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf[..1]).unwrap();
        server.write_all(&[2; 5]).unwrap();
        assert!(
            stamps.after_write(5).is_some(),
            "the next write lost its stamp"
        );
        client.read_exact(&mut buf).unwrap();
    }
}
