//! Kernel tests: real programs loaded into this kernel, real traffic in
//! network namespaces. They need root; without it they fail, never skip.
mod redirecting;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use mesh_trace::{
    kernel::{
        events::{comm, socket_addr, Event},
        sysfs,
        tracer::{Tracer, TracerOptions},
    },
    netns::{netns_cookie, NetNs},
};
use redirecting::redirecting_namespace;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel tests load eBPF programs and create network namespaces: run them as root"
    );
}

fn load_tracer() -> Tracer {
    let cgroup = sysfs::cgroup2_root().expect("a cgroup v2 hierarchy must be mounted");
    Tracer::load(&TracerOptions::new(cgroup)).expect("loading and attaching the tracer")
}

/// Collects events from `tracer` until `done` says so or `limit` passes.
async fn collect_until(
    tracer: &mut Tracer,
    limit: Duration,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut batch = Vec::new();
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if tokio::time::timeout(left, tracer.next_batch(&mut batch))
            .await
            .is_ok()
        {
            seen.extend(batch.drain(..).map(|r| r.expect("every event decodes")));
        }
    }
    seen
}

struct Exchange {
    server: SocketAddr,
    client: SocketAddr,
    cookie: u64,
    tid: u32,
}

/// In two namespaces joined by a veth pair, a client connects to a server,
/// sends a request, reads the reply and closes.
fn connect_across_veth(client_ns: &NetNs, server_ns: &NetNs) -> Exchange {
    let (c, s) = (client_ns.name(), server_ns.name());
    mesh_trace::netns::cmd(
        "ip",
        &[
            "link", "add", "mtc0", "netns", c, "type", "veth", "peer", "name", "mts0", "netns", s,
        ],
    )
    .unwrap();
    client_ns
        .exec("ip", &["addr", "add", "10.231.0.1/24", "dev", "mtc0"])
        .unwrap();
    client_ns
        .exec("ip", &["link", "set", "mtc0", "up"])
        .unwrap();
    server_ns
        .exec("ip", &["addr", "add", "10.231.0.2/24", "dev", "mts0"])
        .unwrap();
    server_ns
        .exec("ip", &["link", "set", "mts0", "up"])
        .unwrap();

    let listener = server_ns
        .enter(|| TcpListener::bind("10.231.0.2:0").unwrap())
        .unwrap();
    let server = listener.local_addr().unwrap();
    let accept = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(b"pong").unwrap();
    });
    let exchange = client_ns
        .enter(move || {
            let mut conn = TcpStream::connect(server).unwrap();
            conn.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).unwrap();
            Exchange {
                server,
                client: conn.local_addr().unwrap(),
                cookie: netns_cookie(&conn).unwrap(),
                tid: nix::unistd::gettid().as_raw() as u32,
            }
        })
        .unwrap();
    accept.join().unwrap();
    exchange
}

#[tokio::test]
async fn connection_in_a_namespace_is_seen_with_its_addresses() {
    require_root();
    let mut tracer = load_tracer();
    let tag = std::process::id();
    let client_ns = NetNs::create(&format!("mt-t-cli-{tag}")).unwrap();
    let server_ns = NetNs::create(&format!("mt-t-srv-{tag}")).unwrap();
    let ex = connect_across_veth(&client_ns, &server_ns);

    let mine = |e: &&Event| match e {
        Event::Connect(c) => c.netns_cookie == ex.cookie,
        Event::Established(s) | Event::Closed(s) => {
            socket_addr(&s.local) == ex.client || socket_addr(&s.local) == ex.server
        }
        Event::Owner(_)
        | Event::TcpIssue(_)
        | Event::Redirect(_)
        | Event::Data(_)
        | Event::SynAckRetransmit(_)
        | Event::H2Frame(_) => false,
    };
    let events = collect_until(&mut tracer, Duration::from_secs(5), |seen| {
        seen.iter().filter(mine).count() >= 5
    })
    .await;
    let mine: Vec<&Event> = events.iter().filter(mine).collect();

    let connect = mine
        .iter()
        .find_map(|e| match e {
            Event::Connect(c) => Some(c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no connect event among {mine:#?}"));
    assert_eq!(socket_addr(&connect.dst), ex.server);
    assert_eq!(connect.task.pid_tgid >> 32, u64::from(std::process::id()));
    assert_eq!(connect.task.pid_tgid as u32, ex.tid);
    assert_eq!(connect.task.uid_gid as u32, 0);
    assert!(!comm(&connect.task.comm).is_empty());

    let established: Vec<_> = mine
        .iter()
        .filter_map(|e| match e {
            Event::Established(s) => Some(s),
            _ => None,
        })
        .collect();
    let active = established
        .iter()
        .find(|s| s.active == 1)
        .expect("client side established");
    assert_eq!(socket_addr(&active.local), ex.client);
    assert_eq!(socket_addr(&active.remote), ex.server);
    assert_eq!(
        active.sock_cookie, connect.sock_cookie,
        "one cookie across hooks"
    );
    assert_eq!(active.netns_cookie, ex.cookie);
    let passive = established
        .iter()
        .find(|s| s.active == 0)
        .expect("server side established");
    assert_eq!(socket_addr(&passive.local), ex.server);
    assert_eq!(socket_addr(&passive.remote), ex.client);
    assert_ne!(
        passive.netns_cookie, ex.cookie,
        "server lives in another namespace"
    );

    let closed: Vec<_> = mine
        .iter()
        .filter_map(|e| match e {
            Event::Closed(s) => Some(s),
            _ => None,
        })
        .collect();
    let client_closed = closed
        .iter()
        .find(|s| s.sock_cookie == active.sock_cookie)
        .expect("client close seen");
    // 4 bytes each way. The kernel counts sequence space: bytes_acked
    // includes our SYN, bytes_received the server's FIN if it came first.
    assert!(
        (4..=5).contains(&client_closed.bytes_received),
        "{client_closed:?}"
    );
    assert!(
        (4..=6).contains(&client_closed.bytes_acked),
        "{client_closed:?}"
    );
}

#[test]
fn dropping_the_tracer_detaches_every_program() {
    require_root();
    let before = attached_program_ids();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tracer = rt.block_on(async { load_tracer() });
    // This kernel takes every program, the optional ones too.
    assert!(tracer.skipped.is_empty(), "{:?}", tracer.skipped);
    assert!(
        tracer
            .attached
            .iter()
            .any(|a| a.program == mesh_trace_common::names::DEV_QUEUE),
        "{:?}",
        tracer.attached
    );
    let during = attached_program_ids();
    assert!(
        during.len() >= before.len() + tracer.attached.len(),
        "programs attached: before {before:?}, during {during:?}"
    );
    drop(tracer);
    let after = attached_program_ids();
    assert_eq!(before, after, "links left behind");
}

/// Program ids of every BPF link in the system.
fn attached_program_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.program_id())
        .collect();
    ids.sort();
    ids
}

/// Two agents on one node (the old and the new pod of a rolling update):
/// netfilter takes one BPF program per priority, so the second sits one
/// place further from the nat table, and both see every REDIRECT.
#[tokio::test]
async fn two_tracers_both_observe_the_nat_step_of_one_namespace() {
    require_root();
    let name = format!("mt-t-nat2-{}", std::process::id());
    let ns = redirecting_namespace(&name);
    let dir = std::path::Path::new(mesh_trace::agent::settings::DEFAULT_NETNS_DIR);
    let mut old = load_tracer();
    let mut new = load_tracer();
    let mut watches = Vec::new();
    for tracer in [&old, &new] {
        let mut watch = tracer.nat_watch().expect("netfilter programs load here");
        assert!(watch.watch(dir, &name).unwrap(), "watching {name}");
        watches.push(watch);
    }
    let cookie = ns
        .enter(|| {
            let listener = TcpListener::bind("127.0.0.1:15001").unwrap();
            let client = TcpStream::connect("127.0.0.1:9080").unwrap();
            let _accepted = listener.accept().unwrap();
            netns_cookie(&client).unwrap()
        })
        .unwrap();
    for (who, tracer) in [("the first", &mut old), ("the second", &mut new)] {
        let events = collect_until(tracer, Duration::from_secs(5), |seen| {
            seen.iter()
                .any(|e| matches!(e, Event::Redirect(r) if r.netns_cookie == cookie))
        })
        .await;
        assert!(
            events.iter().any(
                |e| matches!(e, Event::Redirect(r) if r.netns_cookie == cookie
                    && u16::from_be(r.new_dport_be) == 15001)
            ),
            "{who} tracer saw no REDIRECT to 15001"
        );
        // The original destination comes from the connection's conntrack
        // entry, and only its first packet reports.
        let redirects: Vec<&Event> = events
            .iter()
            .filter(|e| matches!(e, Event::Redirect(r) if r.netns_cookie == cookie))
            .collect();
        assert!(
            matches!(redirects[..], [Event::Redirect(r)] if u16::from_be(r.orig_dport_be) == 9080
                && r.orig_daddr_be == u32::from_ne_bytes([127, 0, 0, 1])),
            "{who} tracer: {redirects:?}"
        );
    }
}

/// A namespace becomes meshed at its first REDIRECT, in the kernel: that
/// connection's own first bytes are captured, before the agent has read
/// any event (this test never marks the namespace itself).
#[tokio::test]
async fn the_first_redirected_connection_of_a_namespace_is_captured() {
    require_root();
    let name = format!("mt-t-first-{}", std::process::id());
    let ns = redirecting_namespace(&name);
    let dir = std::path::Path::new(mesh_trace::agent::settings::DEFAULT_NETNS_DIR);
    let mut tracer = load_tracer();
    let mut watch = tracer.nat_watch().expect("netfilter programs load here");
    assert!(watch.watch(dir, &name).unwrap(), "watching {name}");
    let netns = ns
        .enter(|| {
            let listener = TcpListener::bind("127.0.0.1:15001").unwrap();
            let mut client = TcpStream::connect("127.0.0.1:9080").unwrap();
            let (mut accepted, _) = listener.accept().unwrap();
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let mut buf = [0u8; 18];
            accepted.read_exact(&mut buf).unwrap();
            netns_cookie(&client).unwrap()
        })
        .unwrap();
    let events = collect_until(&mut tracer, Duration::from_secs(5), |seen| {
        seen.iter()
            .any(|e| matches!(e, Event::Data(d) if d.prefix[..d.prefix_len as usize].starts_with(b"GET /")))
    })
    .await;
    assert!(
        tracer.meshed_netns().contains(&netns),
        "the NAT step marked the namespace"
    );
    let first: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Data(d) if d.prefix[..d.prefix_len as usize].starts_with(b"GET /")))
        .collect();
    // The client's send and the listener's receive of the same bytes.
    assert_eq!(
        first.len(),
        2,
        "data events of the first request: {first:?}"
    );
}

/// MESHED_NETNS is bounded: when it is full, the NAT step's REDIRECT is
/// still reported, and the namespace it could not mark is counted as
/// `map_full` loss, not passed over in silence.
#[tokio::test]
async fn a_full_meshed_set_is_counted_at_the_nat_step() {
    require_root();
    let name = format!("mt-t-full-{}", std::process::id());
    let ns = redirecting_namespace(&name);
    let dir = std::path::Path::new(mesh_trace::agent::settings::DEFAULT_NETNS_DIR);
    let mut tracer = load_tracer();
    let mut watch = tracer.nat_watch().expect("netfilter programs load here");
    assert!(watch.watch(dir, &name).unwrap(), "watching {name}");
    // Fill the set with cookies no namespace has (cookies count up from 1).
    let mut filled = tracer.meshed_netns().len() as u64;
    let mut fake = u64::MAX;
    while filled < mesh_trace_common::MESHED_NETNS_MAX as u64 {
        tracer.mark_meshed(fake).expect("room left in MESHED_NETNS");
        fake -= 1;
        filled += 1;
    }
    assert!(tracer.mark_meshed(fake).is_err(), "MESHED_NETNS is full");
    let map_full = |t: &Tracer| {
        t.lost()
            .unwrap()
            .into_iter()
            .find(|(r, _)| *r == mesh_trace_common::LossReason::MapFull)
            .map_or(0, |(_, n)| n)
    };
    let before = map_full(&tracer);
    let cookie = ns
        .enter(|| {
            let listener = TcpListener::bind("127.0.0.1:15001").unwrap();
            let client = TcpStream::connect("127.0.0.1:9080").unwrap();
            let _accepted = listener.accept().unwrap();
            netns_cookie(&client).unwrap()
        })
        .unwrap();
    collect_until(&mut tracer, Duration::from_secs(5), |seen| {
        seen.iter()
            .any(|e| matches!(e, Event::Redirect(r) if r.netns_cookie == cookie))
    })
    .await;
    assert!(!tracer.meshed_netns().contains(&cookie), "the set was full");
    assert_eq!(
        map_full(&tracer) - before,
        1,
        "the namespace the NAT step could not mark is counted once"
    );
}
