//! Bringing a lab up and down: a node bridge, one network namespace per pod
//! with a veth to the bridge and the istio-iptables rules, and the pods'
//! processes (sidecar as uid 1337, app as uid 1000).
//!
//! Everything the lab creates lives inside its own network namespaces, named
//! `mtl-<id>-...`: deleting them removes the veths, the bridge and the
//! iptables rules with them. [`Lab`]'s Drop does that, and kills every
//! process left in them, on return, on Ctrl-C (callers return normally) and
//! while unwinding from a panic. `mesh-trace lab down` removes what a killed
//! lab left behind.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    config::{
        Http2, LabTopology, OutboundTrafficPolicy, PodSpec, BOOKINFO_PROXY, BOOKINFO_TOPOLOGY,
    },
    haproxy::{self, RequestIds},
    impair::Impairment,
    loadgen::Summary,
    mtls::{self, MeshCa, Workload},
    pod_exec::in_pod,
};
use crate::{
    flows::metadata::LabNode,
    netns::{cmd, NetNs},
};

/// Prefix of every network namespace a lab creates.
pub const NS_PREFIX: &str = "mtl-";
pub const PROXY_UID: u32 = 1337;
pub const APP_UID: u32 = 1000;

/// The istio-iptables nat rules, exactly as in istio-init (DATAPATH.md).
pub const ISTIO_IPTABLES: &str = "\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub topology: LabTopology,
    /// The sidecars' configuration (Envoy-shaped JSON text).
    pub proxy_config: String,
    pub policy: Option<OutboundTrafficPolicy>,
    pub delay_outbound_ms: f64,
    pub delay_inbound_ms: f64,
    /// Per pod: share of requests its app answers 503.
    pub error_rate: BTreeMap<String, f64>,
    /// Per pod: service time overriding the topology's.
    pub service_time_ms: BTreeMap<String, f64>,
    /// The mesh-trace binary that runs the proxies and apps.
    pub exe: PathBuf,
    /// How long a sidecar drains on SIGTERM.
    pub drain_ms: u64,
    /// Mutual TLS between sidecars, with certificates made at start (see `lab::mtls`).
    pub mtls: bool,
    /// Which proxy the sidecars run.
    pub sidecar: Sidecar,
    /// Where the sidecars speak HTTP/2 (the apps too, end to end).
    pub http2: Http2,
    /// Per pod: service times its app picks from at random for each
    /// request, overriding the fixed one.
    pub service_time_choices_ms: BTreeMap<String, Vec<f64>>,
    /// Per pod: loss and delay on the packets leaving its `eth0`.
    pub impairments: BTreeMap<String, Impairment>,
    /// Nodes the pods are spread over (see [`LabNode`]).
    pub nodes: usize,
    /// Bytes of peer metadata the lab's sidecars put before a request's own
    /// header lines between them (0: none); see `lab proxy --peer-metadata-bytes`.
    pub peer_metadata_bytes: usize,
    /// Per pod: the node (0-based) it runs on; the others are dealt out
    /// in turn.
    pub placement: BTreeMap<String, usize>,
}

/// The proxy a lab's sidecars run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sidecar {
    /// The lab's own Envoy-like proxy (`lab::proxy`).
    #[default]
    Lab,
    /// HAProxy from Debian's packages (`lab::haproxy`), with this many
    /// worker threads.
    Haproxy { ids: RequestIds, threads: u32 },
}

impl LabOptions {
    /// The shipped Bookinfo lab.
    pub fn bookinfo() -> anyhow::Result<LabOptions> {
        Ok(LabOptions {
            topology: LabTopology::parse(BOOKINFO_TOPOLOGY)?,
            proxy_config: BOOKINFO_PROXY.to_string(),
            policy: None,
            delay_outbound_ms: 0.0,
            delay_inbound_ms: 0.0,
            error_rate: BTreeMap::new(),
            service_time_ms: BTreeMap::new(),
            exe: std::env::current_exe().context("locating the mesh-trace binary")?,
            drain_ms: 300,
            mtls: false,
            sidecar: Sidecar::Lab,
            http2: Http2::Off,
            service_time_choices_ms: BTreeMap::new(),
            impairments: BTreeMap::new(),
            nodes: 1,
            peer_metadata_bytes: 0,
            placement: BTreeMap::new(),
        })
    }

    /// The node (0-based) of the `i`th pod, `name`.
    fn node_of(&self, i: usize, name: &str) -> usize {
        self.placement
            .get(name)
            .copied()
            .unwrap_or(i % self.nodes.max(1))
    }
}

pub struct LabPod {
    pub spec: PodSpec,
    pub ns: NetNs,
    /// Index of its node in [`Lab::nodes`].
    pub node: usize,
}

/// A running lab. Dropping it tears everything down.
pub struct Lab {
    pub id: String,
    /// Config files and the records (access logs) of every process.
    pub dir: PathBuf,
    pub topology: LabTopology,
    pub pods: Vec<LabPod>,
    /// The nodes the pods run on: one kernel and one clock, each a cgroup of
    /// its pods' processes and a directory of their network namespaces.
    pub nodes: Vec<LabNode>,
    /// The cgroup holding the nodes' cgroups, with several nodes.
    cgroup: Option<PathBuf>,
    node: Option<NetNs>,
    procs: Vec<(String, Child)>,
    /// The mesh-trace binary that runs the pods' processes.
    exe: PathBuf,
    torn_down: bool,
}

impl Lab {
    pub fn up(opts: &LabOptions) -> anyhow::Result<Lab> {
        if let Sidecar::Haproxy { .. } = opts.sidecar {
            anyhow::ensure!(
                Path::new(haproxy::HAPROXY).exists(),
                "HAProxy sidecars need {} (Debian package haproxy; `cargo xtask setup` installs it)",
                haproxy::HAPROXY
            );
        }
        let id = format!("{:04x}", rand::random::<u16>());
        let dir = std::env::temp_dir().join(format!("mesh-trace-lab-{id}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Apps and proxies run as other users and write their records here.
        set_mode(&dir, 0o1777)?;
        let mut lab = Lab {
            id,
            dir,
            topology: opts.topology.clone(),
            pods: Vec::new(),
            nodes: Vec::new(),
            cgroup: None,
            node: None,
            procs: Vec::new(),
            exe: opts.exe.clone(),
            torn_down: false,
        };
        // From here on, an error drops `lab`, which removes what was made.
        anyhow::ensure!(
            (1..=opts.topology.pods.len().max(1)).contains(&opts.nodes),
            "a lab of {} pods can be spread over 1 to {} nodes, not {}",
            opts.topology.pods.len(),
            opts.topology.pods.len(),
            opts.nodes
        );
        if let Some((pod, &node)) = opts.placement.iter().find(|(_, &n)| n >= opts.nodes) {
            bail!(
                "pod {pod} placed on node {node}, but the lab has {} (0-based)",
                opts.nodes
            );
        }
        lab.build_network(opts)?;
        lab.build_nodes(opts.nodes)?;
        lab.write_manifest()?;
        if opts.mtls {
            lab.issue_certificates()?;
        }
        lab.start_processes(opts)?;
        lab.wait_listening(Duration::from_secs(15))?;
        lab.impair(&opts.impairments)?;
        Ok(lab)
    }

    /// Loss and delay on pods' `eth0`: each delay relay is started and
    /// bound to its queue before the rules send packets to it.
    fn impair(&mut self, impairments: &BTreeMap<String, Impairment>) -> anyhow::Result<()> {
        for (pod, imp) in impairments {
            imp.validate().with_context(|| format!("pod {pod}"))?;
            let i = self
                .pods
                .iter()
                .position(|p| &p.spec.name == pod)
                .with_context(|| format!("impairment for {pod}: no such pod in the lab"))?;
            if imp.delay_ms > 0.0 {
                let mut c = Command::new(&self.exe);
                c.args([
                    "lab",
                    "delay-packets",
                    "--delay-ms",
                    &imp.delay_ms.to_string(),
                ]);
                // NFQUEUE needs CAP_NET_ADMIN in the pod's namespace.
                self.spawn_in(i, format!("{pod}/delay-packets"), c, 0)?;
                self.wait_queue_bound(i, Duration::from_secs(5))?;
            }
            imp.install(&self.pods[i].ns)?;
        }
        Ok(())
    }

    fn wait_queue_bound(&mut self, pod: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let ns = &self.pods[pod].ns;
        loop {
            // One line per bound queue, its number first.
            let bound = ns
                .exec("cat", &["/proc/net/netfilter/nfnetlink_queue"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let queue = super::impair::DELAY_QUEUE.to_string();
            if bound
                .lines()
                .any(|l| l.split_whitespace().next() == Some(queue.as_str()))
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the delay relay in {} did not bind its queue (see its log in {})",
                ns.name(),
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ns_name(&self, what: &str) -> String {
        format!("{NS_PREFIX}{}-{what}", self.id)
    }

    /// The nodes: a directory of links to each one's pods' namespaces and,
    /// with several, a cgroup for each one's processes (which their sockets
    /// keep, so that an agent attached there sees that node's only).
    fn build_nodes(&mut self, count: usize) -> anyhow::Result<()> {
        if count > 1 {
            let root = crate::kernel::sysfs::cgroup2_root()
                .context("a lab of several nodes needs cgroup v2")?;
            let dir = root.join(format!("{CGROUP_PREFIX}{}", self.id));
            fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
            self.cgroup = Some(dir);
        }
        // A lab id is reused now and then (its directory is kept for the
        // records): start from no node directories.
        let nodes_dir = self.dir.join("nodes");
        if nodes_dir.exists() {
            fs::remove_dir_all(&nodes_dir)
                .with_context(|| format!("removing {}", nodes_dir.display()))?;
        }
        for k in 0..count {
            let name = format!("node-{}", k + 1);
            let netns_dir = self.dir.join("nodes").join(&name).join("netns");
            fs::create_dir_all(&netns_dir)
                .with_context(|| format!("creating {}", netns_dir.display()))?;
            for pod in self.pods.iter().filter(|p| p.node == k) {
                let link = netns_dir.join(pod.ns.name());
                std::os::unix::fs::symlink(pod.ns.path(), &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
            let cgroup = match &self.cgroup {
                Some(lab) => {
                    let dir = lab.join(&name);
                    fs::create_dir(&dir)
                        .with_context(|| format!("creating cgroup {}", dir.display()))?;
                    Some(dir)
                }
                None => None,
            };
            self.nodes.push(LabNode {
                name,
                cgroup,
                netns_dir,
            });
        }
        Ok(())
    }

    /// The node pod `name` runs on.
    pub fn node_of(&self, pod: &str) -> &LabNode {
        &self.nodes[self.pod(pod).node]
    }

    fn build_network(&mut self, opts: &LabOptions) -> anyhow::Result<()> {
        let node = NetNs::create(&self.ns_name("node"))?;
        let cidr = self.topology.bridge_cidr.clone();
        let gateway = cidr.split('/').next().unwrap_or_default().to_string();
        let prefix = cidr.split('/').nth(1).unwrap_or("24").to_string();
        node.exec("ip", &["link", "add", "br0", "type", "bridge"])?;
        node.exec("ip", &["addr", "add", &cidr, "dev", "br0"])?;
        node.exec("ip", &["link", "set", "br0", "up"])?;
        let node_name = node.name().to_string();
        self.node = Some(node);
        let rules = self.dir.join("istio-iptables.rules");
        fs::write(&rules, ISTIO_IPTABLES)?;
        for (i, spec) in self.topology.pods.clone().into_iter().enumerate() {
            let ns = NetNs::create(&self.ns_name(&spec.name))?;
            let host_if = format!("vp{i}");
            cmd(
                "ip",
                &[
                    "link",
                    "add",
                    &host_if,
                    "netns",
                    &node_name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns.name(),
                ],
            )?;
            let node = self.node.as_ref().expect("set above");
            node.exec("ip", &["link", "set", &host_if, "master", "br0", "up"])?;
            ns.exec(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/{prefix}", spec.ip),
                    "dev",
                    "eth0",
                ],
            )?;
            ns.exec("ip", &["link", "set", "eth0", "up"])?;
            ns.exec("ip", &["route", "add", "default", "via", &gateway])?;
            if spec.sidecar {
                ns.exec("iptables-restore", &[rules.to_str().unwrap_or_default()])
                    .context("installing the istio-iptables rules (is iptables installed?)")?;
            }
            let node = opts.node_of(i, &spec.name);
            self.pods.push(LabPod { spec, ns, node });
        }
        Ok(())
    }

    /// A new mesh CA and a certificate per sidecar pod, into the lab's
    /// directory, the keys readable by the sidecars' user only.
    fn issue_certificates(&self) -> anyhow::Result<()> {
        let ca = MeshCa::new(&format!("mesh-trace lab {} CA", self.id))?;
        ca.write_ca(&self.dir)?;
        for spec in self.topology.pods.iter().filter(|p| p.sidecar) {
            let workload = Workload {
                pod: &spec.name,
                namespace: &self.topology.namespace,
                // Bookinfo gives each app a service account of its own.
                service_account: &spec.app,
                ip: spec.ip.into(),
            };
            ca.write_workload(&self.dir, &workload)?;
            let key = self.dir.join(mtls::key_file(&spec.name));
            let owner = Some(nix::unistd::Uid::from_raw(PROXY_UID));
            nix::unistd::chown(&key, owner, Some(nix::unistd::Gid::from_raw(PROXY_UID)))
                .with_context(|| format!("chown {}", key.display()))?;
        }
        Ok(())
    }

    /// HAProxy's certificate bundle (the pod's certificate, then its key,
    /// readable by the sidecar's user only) and the mesh CA.
    fn haproxy_tls(&self, pod: &str) -> anyhow::Result<haproxy::SidecarTls> {
        let cert = fs::read_to_string(self.dir.join(mtls::cert_file(pod)))?;
        let key = fs::read_to_string(self.dir.join(mtls::key_file(pod)))?;
        let bundle = self.dir.join(format!("{pod}.bundle.pem"));
        mtls::write_private(&bundle, format!("{cert}{key}").as_bytes())?;
        let owner = Some(nix::unistd::Uid::from_raw(PROXY_UID));
        nix::unistd::chown(&bundle, owner, Some(nix::unistd::Gid::from_raw(PROXY_UID)))
            .with_context(|| format!("chown {}", bundle.display()))?;
        Ok(haproxy::SidecarTls {
            bundle,
            ca: self.dir.join(mtls::CA_FILE),
        })
    }

    /// Writes `lab.json`, the metadata the agent reads with `--lab DIR`.
    fn write_manifest(&self) -> anyhow::Result<()> {
        let manifest = crate::flows::metadata::LabManifest {
            topology: self.topology.clone(),
            netns: self
                .pods
                .iter()
                .map(|p| (p.spec.name.clone(), p.ns.name().to_string()))
                .collect(),
            nodes: self.nodes.clone(),
            pod_nodes: self
                .pods
                .iter()
                .map(|p| (p.spec.name.clone(), self.nodes[p.node].name.clone()))
                .collect(),
        };
        let path = self.dir.join(crate::flows::metadata::LabManifest::FILE);
        fs::write(&path, serde_json::to_string_pretty(&manifest)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    fn resolve_args(&self) -> Vec<String> {
        self.topology
            .service_addresses()
            .into_iter()
            .flat_map(|(name, addr)| ["--resolve".to_string(), format!("{name}={addr}")])
            .collect()
    }

    fn start_processes(&mut self, opts: &LabOptions) -> anyhow::Result<()> {
        let proxy_cfg = self.dir.join("envoy.json");
        fs::write(&proxy_cfg, &opts.proxy_config)?;
        let resolve = self.resolve_args();
        for i in 0..self.pods.len() {
            let spec = self.pods[i].spec.clone();
            if let (true, Sidecar::Haproxy { ids, threads }) = (spec.sidecar, opts.sidecar) {
                let tls = if opts.mtls {
                    Some(self.haproxy_tls(&spec.name)?)
                } else {
                    None
                };
                let cfg = self.dir.join(format!("{}.haproxy.cfg", spec.name));
                let text = haproxy::config(
                    &self.topology,
                    &spec,
                    ids,
                    threads,
                    tls.as_ref(),
                    opts.http2,
                );
                fs::write(&cfg, text)?;
                let mut c = Command::new(haproxy::HAPROXY);
                // -db: in the foreground, logging to stderr (the pod's log).
                c.arg("-db").arg("-f").arg(&cfg);
                self.spawn_in(i, format!("{}/haproxy", spec.name), c, PROXY_UID)?;
            } else if spec.sidecar {
                let mut c = Command::new(&opts.exe);
                c.args(["lab", "proxy", "--pod", &spec.name])
                    .arg("--config")
                    .arg(&proxy_cfg)
                    .arg("--access-log")
                    .arg(self.proxy_log(&spec.name))
                    .args(["--delay-outbound-ms", &opts.delay_outbound_ms.to_string()])
                    .args(["--delay-inbound-ms", &opts.delay_inbound_ms.to_string()])
                    .args(["--drain-ms", &opts.drain_ms.to_string()])
                    .args([
                        "--peer-metadata-bytes",
                        &opts.peer_metadata_bytes.to_string(),
                    ]);
                if let Some(p) = opts.policy {
                    c.args(["--outbound-traffic-policy", policy_arg(p)]);
                }
                if opts.http2 != Http2::Off {
                    c.args(["--http2", &http2_arg(opts.http2)]);
                }
                if opts.mtls {
                    c.arg("--mtls-dir").arg(&self.dir);
                }
                self.spawn_in(i, format!("{}/envoy", spec.name), c, PROXY_UID)?;
            }
            if spec.port != 0 {
                let service_time = opts
                    .service_time_ms
                    .get(&spec.name)
                    .copied()
                    .unwrap_or(spec.service_time_ms);
                let error_rate = opts.error_rate.get(&spec.name).copied().unwrap_or(0.0);
                let choices = opts.service_time_choices_ms.get(&spec.name);
                let mut c = Command::new(&opts.exe);
                c.args(["lab", "app", "--pod", &spec.name])
                    .args(["--listen", &format!("0.0.0.0:{}", spec.port)])
                    .args(["--service-time-ms", &service_time.to_string()])
                    .args(["--error-rate", &error_rate.to_string()])
                    .arg("--records")
                    .arg(self.app_log(&spec.name))
                    .args(&resolve);
                for url in &spec.calls {
                    c.args(["--call", url]);
                }
                for ms in choices.into_iter().flatten() {
                    c.args(["--service-time-choice-ms", &ms.to_string()]);
                }
                if opts.http2 == Http2::EndToEnd {
                    // Its sidecar speaks HTTP/2 to it.
                    c.arg("--http2");
                }
                self.spawn_in(i, format!("{}/app", spec.name), c, APP_UID)?;
            }
        }
        Ok(())
    }

    fn spawn_in(
        &mut self,
        pod: usize,
        label: String,
        mut c: Command,
        uid: u32,
    ) -> anyhow::Result<()> {
        let log = File::create(self.dir.join(format!("{}.log", label.replace('/', "."))))?;
        c.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("MESH_TRACE_LOG", "warn");
        let _ns = self.in_pod(&mut c, pod, uid)?;
        let child = c.spawn().with_context(|| format!("starting {label}"))?;
        self.procs.push((label, child));
        Ok(())
    }

    /// Waits until every proxy and app listens, reading the pods' socket
    /// tables rather than connecting (a probe connection would be traced).
    fn wait_listening(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        for pod in &self.pods {
            let mut want: Vec<u16> = Vec::new();
            if pod.spec.sidecar {
                want.extend([15001, 15006]);
            }
            if pod.spec.port != 0 {
                want.push(pod.spec.port);
            }
            loop {
                let out = pod.ns.exec("ss", &["-Hltn"])?;
                let text = String::from_utf8_lossy(&out.stdout);
                let listening = |port: u16| text.contains(&format!(":{port} "));
                if want.iter().all(|&p| listening(p)) {
                    break;
                }
                for (label, child) in &mut self.procs {
                    if let Some(status) = child.try_wait()? {
                        bail!(
                            "{label} exited during start-up ({status}); see {}",
                            self.dir.display()
                        );
                    }
                }
                if Instant::now() > deadline {
                    bail!(
                        "pod {} not listening on {want:?} after {limit:?}",
                        pod.spec.name
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &LabPod {
        &self.pods[self.pod_index(name)]
    }

    fn pod_index(&self, name: &str) -> usize {
        self.pods
            .iter()
            .position(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// Makes `c` start in pod `i`: its network namespace, its node's
    /// cgroup, as `uid`. What is returned must live until `c` is spawned.
    fn in_pod(&self, c: &mut Command, i: usize, uid: u32) -> anyhow::Result<(File, Option<File>)> {
        let pod = &self.pods[i];
        let cgroup = self.nodes.get(pod.node).and_then(|n| n.cgroup.as_deref());
        in_pod(c, &pod.ns.path(), cgroup, uid, uid)
    }

    pub fn proxy_log(&self, pod: &str) -> PathBuf {
        self.dir.join(format!("{pod}.proxy.jsonl"))
    }

    pub fn app_log(&self, pod: &str) -> PathBuf {
        self.dir.join(format!("{pod}.app.jsonl"))
    }

    /// Runs the load generator in `pod` (as the app user) and returns its
    /// summary; its ClientRecords go to `records`.
    pub fn load(&self, pod: &str, args: &[&str], records: &Path) -> anyhow::Result<Summary> {
        self.load_with(&self.exe, pod, args, records)
    }

    pub fn load_with(
        &self,
        exe: &Path,
        pod: &str,
        args: &[&str],
        records: &Path,
    ) -> anyhow::Result<Summary> {
        let mut c = Command::new(exe);
        c.args(["lab", "load"])
            .args(args)
            .arg("--records")
            .arg(records)
            .args(self.resolve_args())
            .env("MESH_TRACE_LOG", "warn")
            .stdin(Stdio::null());
        let _ns = self.in_pod(&mut c, self.pod_index(pod), APP_UID)?;
        let out = c.output().context("running the load generator")?;
        if !out.status.success() {
            bail!(
                "load generator failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("reading the load generator's summary")
    }

    /// Starts the load generator in `pod` in the background; the lab kills it
    /// at teardown if it is still running.
    pub fn spawn_load(&self, pod: &str, args: &[&str], records: &Path) -> anyhow::Result<Child> {
        let mut c = Command::new(&self.exe);
        c.args(["lab", "load"])
            .args(args)
            .arg("--records")
            .arg(records)
            .args(self.resolve_args())
            .env("MESH_TRACE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let _ns = self.in_pod(&mut c, self.pod_index(pod), APP_UID)?;
        c.spawn().context("starting the load generator")
    }

    /// Stops the processes and removes the namespaces. Idempotent.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for (_, child) in &self.procs {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for (label, child) in &mut self.procs {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        tracing::warn!("{label} did not stop on SIGTERM: killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.procs.clear();
        // Anything else still inside the pods (e.g. a load generator).
        for pod in &self.pods {
            kill_all_in(pod.ns.name());
        }
        // Dropping the namespaces deletes them, with their links and rules.
        self.pods.clear();
        self.node = None;
        // The nodes' cgroups, empty now.
        if let Some(lab) = self.cgroup.take() {
            remove_cgroup(&lab);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

use std::fs::File;

fn http2_arg(h: Http2) -> String {
    clap::ValueEnum::to_possible_value(&h)
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

fn policy_arg(p: OutboundTrafficPolicy) -> &'static str {
    match p {
        OutboundTrafficPolicy::AllowAny => "ALLOW_ANY",
        OutboundTrafficPolicy::RegistryOnly => "REGISTRY_ONLY",
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// SIGKILLs every process in the named network namespace.
fn kill_all_in(ns: &str) {
    if let Ok(out) = cmd("ip", &["netns", "pids", ns]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Prefix of the cgroup a lab of several nodes makes at the cgroup v2 root.
pub const CGROUP_PREFIX: &str = "mesh-trace-lab-";

/// Removes a lab's cgroup and its nodes' (empty once their processes are
/// gone; the kernel frees a dying process's cgroup a moment after it is
/// reaped, so each removal is retried briefly).
fn remove_cgroup(lab: &Path) {
    let nodes: Vec<PathBuf> = fs::read_dir(lab)
        .map(|e| {
            e.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    for dir in nodes.iter().map(PathBuf::as_path).chain([lab]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Err(e) = fs::remove_dir(dir) {
            if e.kind() == std::io::ErrorKind::NotFound || Instant::now() > deadline {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing cgroup {}: {e}", dir.display());
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Network namespaces left by labs that could not clean up (killed with
/// SIGKILL, machine crash): `mesh-trace lab down` removes them.
pub fn leftover_namespaces() -> Vec<String> {
    cmd("ip", &["netns", "list"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(NS_PREFIX))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes every lab namespace and the processes inside, and the cgroups
/// of labs of several nodes; returns their names.
pub fn remove_leftovers() -> anyhow::Result<Vec<String>> {
    let mut names = leftover_namespaces();
    for n in &names {
        kill_all_in(n);
        cmd("ip", &["netns", "del", n])?;
    }
    if let Some(root) = crate::kernel::sysfs::cgroup2_root() {
        for e in fs::read_dir(&root)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(CGROUP_PREFIX) {
                remove_cgroup(&e.path());
                names.push(name);
            }
        }
    }
    Ok(names)
}
