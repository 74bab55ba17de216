//! The agent as a separate process, and plain HTTP GETs to its endpoints.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command},
    time::{Duration, Instant},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_mesh-trace");

pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A minimal HTTP/1.0 GET: (status, body).
pub fn get(addr: SocketAddr, path: &str, accept: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the first sample line starting with `series`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
}

/// The sum of every sample line starting with `prefix` (all the series of
/// a family, or those with the labels the prefix names).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `mesh-trace run` serving on a free port, killed on drop.
pub struct AgentProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The agent's stderr.
    pub log: std::path::PathBuf,
}

impl AgentProcess {
    /// Starts the agent with these extra arguments and environment, and
    /// waits until /readyz answers 200.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        Self::start_on(free_port(), args, env)
    }

    /// [`AgentProcess::start`], serving on `addr`.
    pub fn start_on(addr: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        let log = std::env::temp_dir().join(format!("mesh-trace-agent-{}.log", addr.port()));
        let child = Command::new(BIN)
            .args(["run", "--metrics-addr", &addr.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log).expect("agent log file"))
            .spawn()
            .expect("starting the agent");
        let mut agent = AgentProcess { child, addr, log };
        agent.wait_ready(Duration::from_secs(30));
        agent
    }

    pub fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok((200, _)) = get(self.addr, "/readyz", "*/*") {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "agent exited early: {status}\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let (_, why) = get(self.addr, "/readyz", "*/*").unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "agent not ready in {limit:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The classic text exposition.
    pub fn scrape(&self) -> String {
        let (status, body) = get(self.addr, "/metrics", "*/*").expect("scraping the agent");
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
