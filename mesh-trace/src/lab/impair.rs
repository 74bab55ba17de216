//! Packet loss and delay on a pod's `eth0`, so that tests can check TCP
//! health against the kernel's own counters. netem is not in every kernel
//! (not in this one), so loss is an iptables `statistic` rule and delay an
//! NFQUEUE relay that holds each packet for a while before letting it go.
//!
//! Both sit in mangle POSTROUTING: only there does `-o eth0` mean the
//! interface a packet leaves by. In OUTPUT a packet to a service address
//! still has the route it had before the nat REDIRECT turned it to
//! loopback, so a rule there would also drop what the app sends its own
//! sidecar.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::netns::NetNs;

/// What a pod's `eth0` does to the packets leaving it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Share of packets dropped, 0..1.
    pub loss: f64,
    /// Milliseconds each packet is held.
    pub delay_ms: f64,
}

/// The NFQUEUE queue the delay relay reads (queues are per namespace).
pub const DELAY_QUEUE: u16 = 0;

impl Impairment {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (0.0..1.0).contains(&self.loss),
            "packet loss {} is not a share in [0, 1)",
            self.loss
        );
        anyhow::ensure!(
            (0.0..=1000.0).contains(&self.delay_ms),
            "packet delay {} ms is not in [0, 1000]",
            self.delay_ms
        );
        Ok(())
    }

    /// The iptables rules, in order: drops first, then the delay queue.
    /// `--queue-bypass`: without a relay reading, packets pass undelayed.
    pub fn rules(&self) -> Vec<Vec<String>> {
        let on_eth0 = |action: &[&str]| -> Vec<String> {
            ["-t", "mangle", "-A", "POSTROUTING", "-o", "eth0"]
                .iter()
                .chain(action)
                .map(|s| s.to_string())
                .collect()
        };
        let (loss, queue) = (format!("{:.6}", self.loss), DELAY_QUEUE.to_string());
        let mut rules = Vec::new();
        if self.loss > 0.0 {
            rules.push(on_eth0(&[
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &loss,
                "-j",
                "DROP",
            ]));
        }
        if self.delay_ms > 0.0 {
            rules.push(on_eth0(&[
                "-j",
                "NFQUEUE",
                "--queue-num",
                &queue,
                "--queue-bypass",
            ]));
        }
        rules
    }

    /// Installs the rules in a pod's namespace (its delay relay, if any,
    /// already runs).
    pub fn install(&self, ns: &NetNs) -> anyhow::Result<()> {
        for rule in self.rules() {
            let args: Vec<&str> = rule.iter().map(String::as_str).collect();
            ns.exec("iptables", &args)
                .with_context(|| format!("iptables {}", rule.join(" ")))?;
        }
        Ok(())
    }
}

/// `mesh-trace lab delay-packets`: the delay relay, run inside a pod.
#[derive(Debug, clap::Args)]
pub struct DelayOptions {
    /// Milliseconds each packet is held.
    #[arg(long)]
    pub delay_ms: f64,
    #[arg(long, default_value_t = DELAY_QUEUE)]
    pub queue: u16,
}

/// How long the relay sleeps when nothing is due: the delay's granularity.
const NAP: Duration = Duration::from_micros(100);

/// Holds every packet of the queue for `delay_ms`, in arrival order, then
/// accepts it. Runs until killed.
pub fn run_delay(opts: DelayOptions) -> anyhow::Result<()> {
    let delay = Duration::from_secs_f64(opts.delay_ms / 1e3);
    let mut queue = nfq::Queue::open().context("opening an NFQUEUE socket")?;
    queue
        .bind(opts.queue)
        .with_context(|| format!("binding NFQUEUE {}", opts.queue))?;
    // Verdicts need only the packet's id: copy no payload.
    queue.set_copy_range(opts.queue, 0)?;
    queue.set_queue_max_len(opts.queue, 65_536)?;
    queue.set_nonblocking(true);
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    msg.set_verdict(nfq::Verdict::Accept);
                    held.push_back((Instant::now() + delay, msg));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading NFQUEUE"),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, msg) = held.pop_front().expect("checked");
            queue.verdict(msg).context("releasing a packet")?;
        }
        std::thread::sleep(NAP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_drop_before_they_delay_on_eth0_after_routing() {
        let imp = Impairment {
            loss: 0.05,
            delay_ms: 5.0,
        };
        let rules: Vec<String> = imp.rules().iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            rules,
            [
                "-t mangle -A POSTROUTING -o eth0 -m statistic --mode random --probability 0.050000 -j DROP",
                "-t mangle -A POSTROUTING -o eth0 -j NFQUEUE --queue-num 0 --queue-bypass",
            ]
        );
        assert!(Impairment::default().rules().is_empty());
        assert!(Impairment {
            loss: 1.5,
            delay_ms: 0.0
        }
        .validate()
        .is_err());
        assert!(Impairment {
            loss: 0.0,
            delay_ms: -1.0
        }
        .validate()
        .is_err());
    }
}
