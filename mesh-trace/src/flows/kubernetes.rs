//! Pod and service metadata from the Kubernetes API server: the pods on this
//! node (field selector `spec.nodeName`) and every service, kept current by
//! list/watch. A pod's network namespace is found by the addresses inside
//! it: the namespaces under the netns directory are scanned, and one that
//! holds a pod's IP belongs to that pod. Cgroup paths name the pod's UID.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
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

#[derive(Default)]
struct State {
    pods: HashMap<String, PodRecord>,
    services: HashMap<String, ServiceRecord>,
    /// Network namespace cookie -> addresses inside it, from the scans.
    netns_ips: HashMap<u64, Vec<IpAddr>>,
    // Indexes rebuilt after every change.
    by_ip: HashMap<IpAddr, Arc<Pod>>,
    by_uid: HashMap<String, Arc<Pod>>,
    by_netns: HashMap<u64, Arc<Pod>>,
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
            .map(|r| (r.uid.clone(), r.pod.clone()))
            .collect();
        self.by_netns = self
            .netns_ips
            .iter()
            .filter_map(|(&cookie, ips)| {
                ips.iter()
                    .find_map(|ip| self.by_ip.get(ip))
                    .map(|p| (cookie, p.clone()))
            })
            .collect();
        self.vips = self
            .services
            .values()
            .flat_map(|s| s.vips.iter().map(move |&a| (a, s.label())))
            .collect();
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
    scanned: std::sync::Mutex<HashMap<String, (u64, Vec<IpAddr>)>>,
    pub stats: KubeStats,
}

impl KubeMetadata {
    pub fn new(node: impl Into<String>) -> Arc<KubeMetadata> {
        Arc::new(KubeMetadata {
            node: node.into(),
            state: RwLock::default(),
            pods_synced: AtomicBool::new(false),
            services_synced: AtomicBool::new(false),
            scanned: Default::default(),
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

    /// Watches pods on this node and all services until the runtime stops.
    pub fn spawn_watchers(self: &Arc<Self>, client: Client) {
        let pods: Api<KubePod> = Api::all(client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
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
            Event::InitApply(p) => buffer.extend(pod_record(&p)),
            Event::InitDone => {
                self.stats.relists.fetch_add(1, Ordering::Relaxed);
                let mut state = self.write();
                state.pods = buffer.drain(..).map(|r| (r.uid.clone(), r)).collect();
                state.rebuild();
                self.pods_synced.store(true, Ordering::Release);
                tracing::info!("{} pods on node {}", state.pods.len(), self.node);
            }
            Event::Apply(p) => {
                if let Some(r) = pod_record(&p) {
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

    /// The pod a process belongs to, from one line of its cgroup path.
    pub fn pod_by_cgroup(&self, cgroup_path: &str) -> Option<Arc<Pod>> {
        let uid = pod_uid_from_cgroup(cgroup_path)?;
        self.read().by_uid.get(&uid).cloned()
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

fn pod_record(pod: &KubePod) -> Option<PodRecord> {
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
    Some(PodRecord {
        uid,
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

/// The namespace cookie of the network namespace at `path` and the
/// addresses of its interfaces other than loopback.
fn netns_addresses(path: &Path) -> anyhow::Result<(u64, Vec<IpAddr>)> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<(u64, Vec<IpAddr>)> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the namespace (needs CAP_SYS_ADMIN)")?;
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
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
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
}
