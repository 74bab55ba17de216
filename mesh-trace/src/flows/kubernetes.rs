//! Pod and service metadata from the Kubernetes API server: every pod and
//! every service, kept current by list/watch. Pods on other nodes name the
//! clients of this node's servers by their addresses (the server's half of
//! a request from another node); this node's pods are also found by their
//! network namespace, whose traffic is captured. A pod's network namespace
//! is found by the addresses inside it: the namespaces under the netns directory are scanned, and one that
//! holds a pod's IP belongs to that pod. Runtimes that do not name pod
//! namespaces there leave pods unfound; for those, the processes under the
//! proc directory are looked at: cgroup paths name the pod's UID, and the
//! process's network namespace is the pod's.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod as KubePod, Service as KubeService};
use kube::{
    runtime::{
        watcher::{self, watcher, Event},
        WatchStreamExt as _,
    },
    Api, Client, Resource as _,
};

use super::metadata::{Metadata, Pod};

/// What the source has seen, for the agent's own metrics.
#[derive(Default)]
pub struct KubeStats {
    /// Watch events applied, per resource.
    pub pod_events: AtomicU64,
    pub service_events: AtomicU64,
    /// Full re-lists (first list, and every resync after 410 Gone).
    pub relists: AtomicU64,
    /// Errors from the API server or the connection; the watcher retries.
    pub errors: AtomicU64,
}

/// A pod as listed, with what service selection needs.
#[derive(Clone, Debug)]
struct PodRecord {
    uid: String,
    /// Whether it runs on this node (`spec.nodeName`).
    local: bool,
    labels: BTreeMap<String, String>,
    host_network: bool,
    ips: Vec<IpAddr>,
    pod: Arc<Pod>,
}

#[derive(Clone, Debug)]
struct ServiceRecord {
    namespace: String,
    name: String,
    selector: BTreeMap<String, String>,
    vips: Vec<SocketAddr>,
}

impl ServiceRecord {
    /// How metrics name a service: `name.namespace`, unique in the cluster.
    fn label(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

/// A pod's network namespace found through a process in the pod's cgroup.
#[derive(Clone, Debug)]
struct CgroupFinding {
    uid: String,
    /// The pod's IPs when found: new IPs mean a new sandbox, so a new
    /// namespace to look for.
    ips: Vec<IpAddr>,
}

#[derive(Default)]
struct State {
    pods: HashMap<String, PodRecord>,
    services: HashMap<String, ServiceRecord>,
    /// Network namespace cookie -> addresses inside it, from the scans.
    netns_ips: HashMap<u64, Vec<IpAddr>>,
    /// Network namespace cookie -> the pod whose processes are inside, for
    /// pods no namespace under the netns directory holds the IP of.
    cgroup_netns: HashMap<u64, CgroupFinding>,
    // Indexes rebuilt after every change.
    by_ip: HashMap<IpAddr, Arc<Pod>>,
    by_uid: HashMap<String, Arc<Pod>>,
    by_netns: HashMap<u64, Arc<Pod>>,
    /// UIDs of pods that have a namespace of their own (not hostNetwork,
    /// with an IP) and no namespace found for it yet.
    pods_without_netns: HashSet<String>,
    vips: HashMap<SocketAddr, String>,
}

impl State {
    fn rebuild(&mut self) {
        let mut by_ns: HashMap<&str, Vec<&ServiceRecord>> = HashMap::new();
        for s in self.services.values() {
            by_ns.entry(&s.namespace).or_default().push(s);
        }
        for list in by_ns.values_mut() {
            list.sort_by(|a, b| a.name.cmp(&b.name));
        }
        for rec in self.pods.values_mut() {
            let service = by_ns.get(rec.pod.namespace.as_str()).and_then(|list| {
                list.iter()
                    .find(|s| {
                        !s.selector.is_empty()
                            && s.selector.iter().all(|(k, v)| rec.labels.get(k) == Some(v))
                    })
                    .map(|s| s.label())
            });
            if rec.pod.service != service {
                rec.pod = Arc::new(Pod {
                    service,
                    ..(*rec.pod).clone()
                });
            }
        }
        self.by_ip = self
            .pods
            .values()
            .filter(|r| !r.host_network)
            .flat_map(|r| r.ips.iter().map(|&ip| (ip, r.pod.clone())))
            .collect();
        self.by_uid = self
            .pods
            .values()
            .filter(|r| r.local)
            .map(|r| (r.uid.clone(), r.pod.clone()))
            .collect();
        let uid_by_ip: HashMap<IpAddr, &str> = self
            .pods
            .values()
            .filter(|r| r.local && !r.host_network)
            .flat_map(|r| r.ips.iter().map(|&ip| (ip, r.uid.as_str())))
            .collect();
        let mut netns_uid: HashMap<u64, &str> = self
            .netns_ips
            .iter()
            .filter_map(|(&cookie, ips)| {
                ips.iter()
                    .find_map(|ip| uid_by_ip.get(ip))
                    .map(|&uid| (cookie, uid))
            })
            .collect();
        // A namespace holding the pod's IP is the surer sign: a cgroup
        // finding counts only for a pod without one, and only while the pod
        // is there with the IPs it had when found.
        let found_by_ip: HashSet<&str> = netns_uid.values().copied().collect();
        let pods = &self.pods;
        self.cgroup_netns.retain(|_, found| {
            !found_by_ip.contains(found.uid.as_str())
                && pods
                    .get(&found.uid)
                    .is_some_and(|r| r.local && !r.host_network && r.ips == found.ips)
        });
        for (&cookie, found) in &self.cgroup_netns {
            netns_uid.entry(cookie).or_insert(found.uid.as_str());
        }
        self.by_netns = netns_uid
            .iter()
            .map(|(&cookie, uid)| (cookie, self.pods[*uid].pod.clone()))
            .collect();
        let with_netns: HashSet<&str> = netns_uid.into_values().collect();
        self.pods_without_netns = self
            .pods
            .values()
            .filter(|r| r.local && !r.host_network && !r.ips.is_empty())
            .filter(|r| !with_netns.contains(r.uid.as_str()))
            .map(|r| r.uid.clone())
            .collect();
        self.vips = self
            .services
            .values()
            .flat_map(|s| s.vips.iter().map(move |&a| (a, s.label())))
            .collect();
    }
}

/// How pods' network namespaces are looked for through their processes,
/// when the netns directory does not show them.
#[derive(Clone, Debug)]
pub struct ProcScan {
    /// The host's processes: the DaemonSet runs with hostPID.
    pub proc_dir: PathBuf,
    /// The shortest time between two walks of `proc_dir`, which reads a
    /// file per process: costly on a busy node if done every refresh.
    pub min_interval: Duration,
}

impl Default for ProcScan {
    fn default() -> ProcScan {
        ProcScan {
            proc_dir: "/proc".into(),
            min_interval: Duration::from_secs(10),
        }
    }
}

/// Metadata kept current from the API server.
pub struct KubeMetadata {
    node: String,
    state: RwLock<State>,
    pods_synced: AtomicBool,
    services_synced: AtomicBool,
    /// Network namespaces already scanned, by name: their cookie and
    /// addresses. A namespace with no address yet is scanned again.
    scanned: Mutex<HashMap<String, (u64, Vec<IpAddr>)>>,
    proc_scan: ProcScan,
    last_proc_scan: Mutex<Option<Instant>>,
    pub stats: KubeStats,
}

impl KubeMetadata {
    pub fn new(node: impl Into<String>) -> Arc<KubeMetadata> {
        KubeMetadata::with_proc_scan(node, ProcScan::default())
    }

    pub fn with_proc_scan(node: impl Into<String>, proc_scan: ProcScan) -> Arc<KubeMetadata> {
        Arc::new(KubeMetadata {
            node: node.into(),
            state: RwLock::default(),
            pods_synced: AtomicBool::new(false),
            services_synced: AtomicBool::new(false),
            scanned: Default::default(),
            proc_scan,
            last_proc_scan: Mutex::new(None),
            stats: KubeStats::default(),
        })
    }

    /// A client from the in-cluster service account, or KUBECONFIG.
    pub async fn client() -> anyhow::Result<Client> {
        let config = kube::Config::infer().await.context(
            "no Kubernetes API configuration: not in a pod with a service account, and no KUBECONFIG",
        )?;
        Client::try_from(config).context("creating the Kubernetes client")
    }

    /// Watches every pod and every service until the runtime stops. Every
    /// pod, not only this node's: a request from a pod on another node is
    /// labelled with that pod's workload, found by its address.
    pub fn spawn_watchers(self: &Arc<Self>, client: Client) {
        let pods: Api<KubePod> = Api::all(client.clone());
        let config = watcher::Config::default();
        let me = self.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut stream = std::pin::pin!(watcher(pods, config).default_backoff());
            while let Some(event) = stream.next().await {
                me.on_pod_event(event, &mut buffer);
            }
        });
        let services: Api<KubeService> = Api::all(client);
        let me = self.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut stream =
                std::pin::pin!(watcher(services, watcher::Config::default()).default_backoff());
            while let Some(event) = stream.next().await {
                me.on_service_event(event, &mut buffer);
            }
        });
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn on_pod_event(
        &self,
        event: Result<Event<KubePod>, watcher::Error>,
        buffer: &mut Vec<PodRecord>,
    ) {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("watching pods on node {}: {e}", self.node);
                return;
            }
        };
        self.stats.pod_events.fetch_add(1, Ordering::Relaxed);
        match event {
            Event::Init => buffer.clear(),
            Event::InitApply(p) => buffer.extend(pod_record(&p, &self.node)),
            Event::InitDone => {
                self.stats.relists.fetch_add(1, Ordering::Relaxed);
                let mut state = self.write();
                state.pods = buffer.drain(..).map(|r| (r.uid.clone(), r)).collect();
                state.rebuild();
                self.pods_synced.store(true, Ordering::Release);
                tracing::info!(
                    "{} pods, {} on node {}",
                    state.pods.len(),
                    state.by_uid.len(),
                    self.node
                );
            }
            Event::Apply(p) => {
                if let Some(r) = pod_record(&p, &self.node) {
                    let mut state = self.write();
                    state.pods.insert(r.uid.clone(), r);
                    state.rebuild();
                }
            }
            Event::Delete(p) => {
                if let Some(uid) = p.meta().uid.as_ref() {
                    let mut state = self.write();
                    state.pods.remove(uid);
                    state.rebuild();
                }
            }
        }
    }

    fn on_service_event(
        &self,
        event: Result<Event<KubeService>, watcher::Error>,
        buffer: &mut Vec<ServiceRecord>,
    ) {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("watching services: {e}");
                return;
            }
        };
        self.stats.service_events.fetch_add(1, Ordering::Relaxed);
        let key = |s: &ServiceRecord| format!("{}/{}", s.namespace, s.name);
        match event {
            Event::Init => buffer.clear(),
            Event::InitApply(s) => buffer.extend(service_record(&s)),
            Event::InitDone => {
                self.stats.relists.fetch_add(1, Ordering::Relaxed);
                let mut state = self.write();
                state.services = buffer.drain(..).map(|s| (key(&s), s)).collect();
                state.rebuild();
                self.services_synced.store(true, Ordering::Release);
            }
            Event::Apply(s) => {
                if let Some(r) = service_record(&s) {
                    let mut state = self.write();
                    state.services.insert(key(&r), r);
                    state.rebuild();
                }
            }
            Event::Delete(s) => {
                if let Some(r) = service_record(&s) {
                    let mut state = self.write();
                    state.services.remove(&key(&r));
                    state.rebuild();
                }
            }
        }
    }

    /// Pods on this node now.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let mut pods: Vec<_> = self.read().by_uid.values().cloned().collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        pods
    }

    /// Services known now, as `name.namespace`, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut s: Vec<_> = self.read().services.values().map(|s| s.label()).collect();
        s.sort();
        s
    }
}

impl Metadata for KubeMetadata {
    fn pod_by_netns(&self, netns_cookie: u64) -> Option<Arc<Pod>> {
        self.read().by_netns.get(&netns_cookie).cloned()
    }
    fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.read().by_ip.get(&ip).cloned()
    }
    fn service_by_vip(&self, addr: SocketAddr) -> Option<String> {
        self.read().vips.get(&addr).cloned()
    }
    fn service_namespace(&self, service: &str) -> Option<String> {
        // Services are named `name.namespace`.
        let (name, namespace) = service.split_once('.')?;
        self.read()
            .services
            .contains_key(&format!("{namespace}/{name}"))
            .then(|| namespace.to_string())
    }
    fn meshed_netns(&self) -> Vec<u64> {
        self.read()
            .by_netns
            .iter()
            .filter(|(_, p)| p.sidecar)
            .map(|(&c, _)| c)
            .collect()
    }
    fn counts(&self) -> (usize, usize) {
        let state = self.read();
        (state.pods.len(), state.services.len())
    }
    fn synced(&self) -> bool {
        self.pods_synced.load(Ordering::Acquire) && self.services_synced.load(Ordering::Acquire)
    }
    fn refresh(&self, netns_dir: &Path) {
        self.scan_netns_dir(netns_dir);
        self.scan_processes_of_pods_without_netns();
    }
}

impl KubeMetadata {
    /// Finds pods' namespaces by the IPs inside the named namespaces.
    fn scan_netns_dir(&self, netns_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(netns_dir) else {
            return;
        };
        let names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut scanned = self.scanned.lock().unwrap_or_else(|p| p.into_inner());
        let before = scanned.len();
        scanned.retain(|name, _| names.contains(name));
        let mut changed = scanned.len() != before;
        for name in names {
            if scanned.contains_key(&name) {
                continue;
            }
            match netns_addresses(&netns_dir.join(&name)) {
                // The CNI plugin configures the address after creating the
                // namespace: look again at the next scan.
                Ok((_, ips)) if ips.is_empty() => {}
                Ok(found) => {
                    scanned.insert(name, found);
                    changed = true;
                }
                Err(e) => tracing::debug!("addresses in network namespace {name}: {e:#}"),
            }
        }
        if changed {
            let mut state = self.write();
            state.netns_ips = scanned.values().cloned().collect();
            state.rebuild();
        }
    }

    /// Finds the namespaces of pods the netns directory did not show,
    /// through processes in their cgroups; at most once per
    /// `min_interval`, and not at all while every pod has one.
    fn scan_processes_of_pods_without_netns(&self) {
        let wanted = self.read().pods_without_netns.clone();
        if wanted.is_empty() {
            return;
        }
        {
            let mut last = self
                .last_proc_scan
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < self.proc_scan.min_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        let found = netns_of_pod_processes(&self.proc_scan.proc_dir, &wanted);
        if found.is_empty() {
            return;
        }
        let mut state = self.write();
        for (cookie, uid) in found {
            // The pod may have gone while /proc was read.
            let Some(ips) = state.pods.get(&uid).map(|r| r.ips.clone()) else {
                continue;
            };
            state
                .cgroup_netns
                .insert(cookie, CgroupFinding { uid, ips });
        }
        state.rebuild();
    }
}

/// The workload that owns a pod, as Istio names it: a ReplicaSet's
/// Deployment (the ReplicaSet name without its pod-template-hash), a
/// StatefulSet, DaemonSet or Job by name, else the pod itself.
fn workload_of(pod: &KubePod) -> String {
    let meta = pod.meta();
    let name = meta.name.clone().unwrap_or_default();
    let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return name;
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = meta
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"))
                .map(String::as_str);
            match (hash, owner.name.rsplit_once('-')) {
                (Some(h), Some((deployment, suffix))) if suffix == h => deployment.to_string(),
                _ => owner.name.clone(),
            }
        }
        _ => owner.name.clone(),
    }
}

/// Istio's injector adds an `istio-proxy` container (an init container
/// with restartPolicy Always as a native sidecar) and a status annotation.
fn has_sidecar(pod: &KubePod) -> bool {
    let annotated = pod
        .meta()
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("sidecar.istio.io/status"));
    let spec = pod.spec.as_ref();
    let container = spec.is_some_and(|s| {
        s.containers.iter().any(|c| c.name == "istio-proxy")
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == "istio-proxy" && c.restart_policy.as_deref() == Some("Always"))
    });
    annotated || container
}

fn pod_record(pod: &KubePod, node: &str) -> Option<PodRecord> {
    let meta = pod.meta();
    let uid = meta.uid.clone()?;
    let labels = meta.labels.clone().unwrap_or_default();
    let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status
        .and_then(|s| s.pod_ip.as_ref())
        .and_then(|ip| ip.parse().ok())
    {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let workload = workload_of(pod);
    let record = Pod {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        app: label(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| workload.clone()),
        workload,
        version: label(&["version", "app.kubernetes.io/version"]).unwrap_or_default(),
        ip: ips
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        sidecar: has_sidecar(pod) && !host_network,
        service: None,
    };
    let local = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
    Some(PodRecord {
        uid,
        local,
        labels,
        host_network,
        ips,
        pod: Arc::new(record),
    })
}

fn service_record(svc: &KubeService) -> Option<ServiceRecord> {
    let meta = svc.meta();
    let spec = svc.spec.as_ref();
    let ips: Vec<IpAddr> = spec
        .and_then(|s| {
            s.cluster_ips
                .clone()
                .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
        })
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let ports: Vec<u16> = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.port).ok())
        .collect();
    Some(ServiceRecord {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
        vips: ips
            .iter()
            .flat_map(|&ip| ports.iter().map(move |&p| SocketAddr::new(ip, p)))
            .collect(),
    })
}

/// The pod UID in a cgroup path, as the kubelet names pod cgroups with
/// either driver: `.../kubepods-burstable-pod<uid_with_underscores>.slice/...`
/// (systemd) or `.../kubepods/burstable/pod<uid>/...` (cgroupfs).
pub fn pod_uid_from_cgroup(path: &str) -> Option<String> {
    path.split('/').find_map(|part| {
        let part = part.strip_suffix(".slice").unwrap_or(part);
        let at = part.rfind("pod")?;
        let uid = part[at + 3..].replace('_', "-");
        let shape = uid.len() == 36
            && uid.chars().enumerate().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        shape.then_some(uid)
    })
}

/// Network namespace cookie -> pod UID, for the `wanted` pods that have a
/// process under `proc_dir`. The first process found stands for its pod:
/// all of a pod's containers share the sandbox's namespace, and the lowest
/// pid, listed first, is normally the sandbox's own.
fn netns_of_pod_processes(proc_dir: &Path, wanted: &HashSet<String>) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    let entries = match std::fs::read_dir(proc_dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::debug!("listing processes in {}: {e}", proc_dir.display());
            return found;
        }
    };
    let mut pods_done: HashSet<&str> = HashSet::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Processes exit while the directory is read: skip them quietly.
        let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        // `hierarchy-ID:controllers:path`, one line per hierarchy (cgroup
        // v1 and v2 both name the pod in a hybrid layout).
        let Some(uid) = cgroups
            .lines()
            .filter_map(|line| line.splitn(3, ':').nth(2))
            .find_map(pod_uid_from_cgroup)
        else {
            continue;
        };
        let Some(uid) = wanted.get(&uid).filter(|u| !pods_done.contains(u.as_str())) else {
            continue;
        };
        match super::metadata::netns_cookie_at(&entry.path().join("ns/net")) {
            Ok(cookie) => {
                tracing::debug!("pod {uid}: network namespace of process {pid}");
                found.insert(cookie, uid.clone());
                pods_done.insert(uid);
            }
            Err(e) => tracing::debug!("network namespace of process {pid} (pod {uid}): {e:#}"),
        }
    }
    found
}

/// The namespace cookie of the network namespace at `path` and the
/// addresses of its interfaces other than loopback.
fn netns_addresses(path: &Path) -> anyhow::Result<(u64, Vec<IpAddr>)> {
    crate::netns::in_namespace(path, || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let cookie = crate::netns::netns_cookie(&sock).context("SO_NETNS_COOKIE")?;
        let mut ips = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
            let Some(addr) = ifa.address else { continue };
            let ip: IpAddr = if let Some(a) = addr.as_sockaddr_in() {
                a.ip().into()
            } else if let Some(a) = addr.as_sockaddr_in6() {
                a.ip().into()
            } else {
                continue;
            };
            if !ip.is_loopback() {
                ips.push(ip);
            }
        }
        Ok((cookie, ips))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uid_from_both_cgroup_drivers() {
        let uid = "0b5e3c1a-7f2d-4c8e-9a61-2d4f5e6a7b8c";
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b5e3c1a_7f2d_4c8e_9a61_2d4f5e6a7b8c.slice/cri-containerd-abc.scope";
        let cgroupfs = "/kubepods/besteffort/pod0b5e3c1a-7f2d-4c8e-9a61-2d4f5e6a7b8c/4f1e2d";
        assert_eq!(pod_uid_from_cgroup(systemd).as_deref(), Some(uid));
        assert_eq!(pod_uid_from_cgroup(cgroupfs).as_deref(), Some(uid));
        assert_eq!(
            pod_uid_from_cgroup("/system.slice/containerd.service"),
            None
        );
        assert_eq!(pod_uid_from_cgroup("/kubepods/podnotauid"), None);
    }

    fn record(uid: &str, ip: &str, host_network: bool) -> PodRecord {
        let ip: IpAddr = ip.parse().unwrap();
        PodRecord {
            uid: uid.into(),
            local: true,
            labels: BTreeMap::new(),
            host_network,
            ips: vec![ip],
            pod: Arc::new(Pod {
                namespace: "ns".into(),
                name: uid.into(),
                workload: uid.into(),
                app: uid.into(),
                version: String::new(),
                ip,
                sidecar: true,
                service: None,
            }),
        }
    }

    fn found(uid: &str, ip: &str) -> CgroupFinding {
        CgroupFinding {
            uid: uid.into(),
            ips: vec![ip.parse().unwrap()],
        }
    }

    #[test]
    fn cgroup_findings_count_for_pods_no_namespace_holds_the_ip_of() {
        let mut state = State::default();
        for r in [
            record("by-ip", "10.0.0.1", false),
            record("by-cgroup", "10.0.0.2", false),
            record("unfound", "10.0.0.3", false),
            record("host", "192.168.0.1", true),
        ] {
            state.pods.insert(r.uid.clone(), r);
        }
        state.netns_ips.insert(1, vec!["10.0.0.1".parse().unwrap()]);
        state.cgroup_netns.insert(2, found("by-cgroup", "10.0.0.2"));
        // Pods found by IP keep their namespace; hostNetwork pods have none.
        state.cgroup_netns.insert(3, found("by-ip", "10.0.0.1"));
        state.cgroup_netns.insert(4, found("host", "192.168.0.1"));
        state.rebuild();
        let uid_of = |cookie| state.by_netns.get(&cookie).map(|p| p.name.as_str());
        assert_eq!(uid_of(1), Some("by-ip"));
        assert_eq!(uid_of(2), Some("by-cgroup"));
        assert_eq!((uid_of(3), uid_of(4)), (None, None));
        assert_eq!(state.pods_without_netns, HashSet::from(["unfound".into()]));

        // New IPs mean a new sandbox: the namespace found before is not it.
        state
            .pods
            .insert("by-cgroup".into(), record("by-cgroup", "10.0.0.9", false));
        state.rebuild();
        assert_eq!(state.by_netns.get(&2), None);
        assert!(state.pods_without_netns.contains("by-cgroup"));
    }

    #[test]
    fn pod_processes_are_read_from_the_proc_dir() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "entering a network namespace needs CAP_SYS_ADMIN: run as root"
        );
        let uid = "0b5e3c1a-7f2d-4c8e-9a61-2d4f5e6a7b8c";
        let other = "11111111-2222-4333-8444-555555555555";
        struct RemoveOnDrop(PathBuf);
        impl Drop for RemoveOnDrop {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let proc_dir = std::env::temp_dir().join(format!("mt-kube-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&proc_dir);
        let _cleanup = RemoveOnDrop(proc_dir.clone());
        let process = |pid: &str, cgroup: Option<&str>| {
            let dir = proc_dir.join(pid);
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::os::unix::fs::symlink("/proc/self/ns/net", dir.join("ns/net")).unwrap();
            if let Some(cgroup) = cgroup {
                std::fs::write(dir.join("cgroup"), cgroup).unwrap();
            }
        };
        process("self", Some(&format!("0::/kubepods/besteffort/pod{uid}\n")));
        process("10", Some("0::/system.slice/containerd.service\n"));
        process("11", None); // exited while the directory was read
        process("12", Some(&format!("0::/kubepods/pod{other}/c1\n")));
        process(
            "13",
            Some(&format!(
                "4:memory:/kubepods/besteffort/pod{uid}/c2\n0::/kubepods/besteffort/pod{uid}/c2\n"
            )),
        );
        let wanted = HashSet::from([uid.to_string()]);
        let found = netns_of_pod_processes(&proc_dir, &wanted);
        let own = super::super::metadata::netns_cookie_at(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(found, HashMap::from([(own, uid.to_string())]));
    }
}
