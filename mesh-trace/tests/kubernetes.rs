//! The Kubernetes metadata source against an API server that replays
//! list and watch responses in the API server's format: add, update, delete, a watch that
//! ends and is resumed, a watch that expires (410 Gone) and the re-list
//! that follows; pod network namespaces found by address, or through the
//! processes in pod cgroups; and the agent labelling a lab's traffic with
//! what the API server said.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use common::{
    agent::{metric, AgentProcess, BIN},
    kubeapi::{event, fixture, gone, list, ReplayServer, Reply},
};
use mesh_trace::{
    flows::{
        kubernetes::{KubeMetadata, ProcScan},
        metadata::{netns_cookie_at, Metadata},
    },
    lab::topology::{Lab, LabOptions},
};
use serde_json::{json, Value};

const NODE: &str = "lab-node";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests make network namespaces and load eBPF programs: run them as root"
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Polls until `cond` holds; fails with `what` after 15 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Recorded pods by name prefix (`reviews-v1`).
fn pod(items: &[Value], prefix: &str) -> Value {
    items
        .iter()
        .find(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{prefix}-"))
        })
        .unwrap_or_else(|| panic!("no recorded pod {prefix}"))
        .clone()
}

fn items(list: &Value) -> Vec<Value> {
    list["items"].as_array().unwrap().clone()
}

/// The metadata source, watching the replay server from its own runtime.
struct Source {
    meta: Arc<KubeMetadata>,
    _runtime: tokio::runtime::Runtime,
}

fn source(server: &ReplayServer) -> Source {
    source_with(server, KubeMetadata::new(NODE))
}

fn source_with(server: &ReplayServer, meta: Arc<KubeMetadata>) -> Source {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url: hyper::Uri = format!("http://{}", server.addr).parse().unwrap();
    let client = runtime.block_on(async {
        kube::Client::try_from(kube::Config::new(url)).expect("client for the replay server")
    });
    {
        let _guard = runtime.enter();
        meta.spawn_watchers(client);
    }
    Source {
        meta,
        _runtime: runtime,
    }
}

#[test]
fn metadata_follows_add_update_delete_watch_restart_and_resync() {
    let server = ReplayServer::start();
    let pods = items(&fixture("pods-list.json"));
    let services = fixture("services-list.json");
    let ratings = pod(&pods, "ratings-v1");
    let without_ratings: Vec<Value> = pods.iter().filter(|p| **p != ratings).cloned().collect();
    server.push("pods", Reply::List(list("PodList", without_ratings, 9100)));
    server.push("services", Reply::List(services.clone()));

    let src = source(&server);
    let meta = &src.meta;
    wait_until("pods and services are listed", || meta.synced());

    // The first list: pods on this node with their workloads, services by VIP.
    let reviews = meta.pod_by_ip(ip("10.244.0.21")).expect("reviews-v1 by IP");
    assert_eq!(reviews.namespace, "bookinfo");
    assert!(reviews.name.starts_with("reviews-v1-"));
    assert_eq!(
        reviews.workload, "reviews-v1",
        "Deployment from the ReplicaSet"
    );
    assert_eq!(
        (reviews.app.as_str(), reviews.version.as_str()),
        ("reviews", "v1")
    );
    assert!(reviews.sidecar, "istio-proxy injected");
    assert_eq!(reviews.service.as_deref(), Some("reviews.bookinfo"));
    assert_eq!(
        meta.pod_by_ip(ip("192.168.49.2")),
        None,
        "a host-network pod does not own the node's address"
    );
    assert_eq!(meta.pods().len(), 7, "6 Bookinfo pods and kube-proxy");
    let vip = |a: &str| meta.service_by_vip(a.parse::<SocketAddr>().unwrap());
    assert_eq!(vip("10.96.0.12:9080").as_deref(), Some("reviews.bookinfo"));
    assert_eq!(vip("10.96.0.1:443").as_deref(), Some("kubernetes.default"));
    assert_eq!(meta.services().len(), 6);
    assert!(meta.pod_by_ip(ip("10.244.0.31")).is_none());
    let first = &server.log()[..];
    let pods_list = first.iter().find(|l| l.resource == "pods").unwrap();
    assert!(!pods_list.watch);
    assert_eq!(
        pods_list.query.get("fieldSelector"),
        None,
        "every pod is listed: clients on other nodes are named by their addresses"
    );

    // A watch: add, update, delete; then the server ends the stream.
    let mut canary = pod(&pods, "reviews-v1");
    canary["metadata"]["labels"]["version"] = json!("v1-canary");
    let details = pod(&pods, "details-v1");
    // A client on another node: known by its address only.
    let mut remote = pod(&pods, "productpage-v1");
    remote["metadata"]["name"] = json!("productpage-v1-remote");
    remote["metadata"]["uid"] = json!("0f0f0f0f-remote");
    remote["spec"]["nodeName"] = json!("other-node");
    remote["status"]["podIP"] = json!("10.244.1.50");
    remote["status"]["podIPs"] = json!([{ "ip": "10.244.1.50" }]);
    server.push(
        "pods",
        Reply::Watch(vec![
            event("ADDED", &ratings, "Pod", 9101),
            event("MODIFIED", &canary, "Pod", 9102),
            event("DELETED", &details, "Pod", 9103),
            event("ADDED", &remote, "Pod", 9104),
        ]),
    );
    wait_until("the watch events are applied", || {
        meta.pod_by_ip(ip("10.244.1.50")).is_some()
            && meta.pod_by_ip(ip("10.244.0.31")).is_some()
            && meta.pod_by_ip(ip("10.244.0.11")).is_none()
            && meta
                .pod_by_ip(ip("10.244.0.21"))
                .is_some_and(|p| p.version == "v1-canary")
    });
    assert_eq!(
        meta.pod_by_ip(ip("10.244.0.31"))
            .unwrap()
            .service
            .as_deref(),
        Some("ratings.bookinfo")
    );
    // The watch is resumed from the last resource version seen.
    wait_until("the watch is resumed", || {
        server
            .log()
            .iter()
            .filter(|l| l.resource == "pods" && l.watch)
            .count()
            == 2
    });
    let watches: Vec<_> = server
        .log()
        .into_iter()
        .filter(|l| l.resource == "pods" && l.watch)
        .collect();
    assert_eq!(watches[0].query["resourceVersion"], "9100");
    assert_eq!(
        watches[1].query["resourceVersion"], "9104",
        "resumed, not re-listed"
    );
    assert_eq!(watches[1].query.get("fieldSelector"), None);
    let client = meta.pod_by_ip(ip("10.244.1.50")).unwrap();
    assert_eq!(client.workload, "productpage-v1");
    assert!(
        !meta
            .pods()
            .iter()
            .any(|p| p.name == "productpage-v1-remote"),
        "a pod on another node is none of this node's"
    );

    // Services change: a port moves, a service goes; pods follow.
    let mut reviews_svc = services["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["metadata"]["name"] == "reviews")
        .unwrap()
        .clone();
    reviews_svc["spec"]["ports"][0]["port"] = json!(9090);
    let ratings_svc = services["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["metadata"]["name"] == "ratings")
        .unwrap()
        .clone();
    server.push(
        "services",
        Reply::Watch(vec![
            event("MODIFIED", &reviews_svc, "Service", 9104),
            event("DELETED", &ratings_svc, "Service", 9105),
        ]),
    );
    wait_until("the service events are applied", || {
        vip("10.96.0.12:9090").is_some() && vip("10.96.0.13:9080").is_none()
    });
    assert_eq!(vip("10.96.0.12:9080"), None);
    assert_eq!(
        meta.pod_by_ip(ip("10.244.0.31")).unwrap().service,
        None,
        "no service selects ratings any more"
    );

    // The resumed watch has expired: 410 Gone. The source lists again, and
    // what the new list lacks is gone.
    server.push("pods", Reply::Watch(vec![gone(9103)]));
    let relisted: Vec<Value> = pods
        .iter()
        .filter(|p| {
            let name = p["metadata"]["name"].as_str().unwrap();
            !name.starts_with("reviews-v1-") && !name.starts_with("loadgen-v1-")
        })
        .cloned()
        .collect();
    let relists_before = meta
        .stats
        .relists
        .load(std::sync::atomic::Ordering::Relaxed);
    server.push("pods", Reply::List(list("PodList", relisted, 9200)));
    wait_until("the pods are listed again", || {
        meta.stats
            .relists
            .load(std::sync::atomic::Ordering::Relaxed)
            > relists_before
    });
    assert!(
        meta.pod_by_ip(ip("10.244.0.21")).is_none(),
        "reviews-v1 gone"
    );
    assert!(meta.pod_by_ip(ip("10.244.0.5")).is_none(), "loadgen gone");
    assert!(
        meta.pod_by_ip(ip("10.244.0.11")).is_some(),
        "details is back: the list is the truth"
    );
    assert_eq!(meta.pods().len(), 6);
    wait_until("the watch starts from the new list", || {
        server
            .log()
            .iter()
            .any(|l| l.resource == "pods" && l.watch && l.query["resourceVersion"] == "9200")
    });
    let kinds: Vec<bool> = server
        .log()
        .iter()
        .filter(|l| l.resource == "pods")
        .map(|l| l.watch)
        .collect();
    assert_eq!(
        kinds,
        [false, true, true, false, true],
        "list, watch, watch, list, watch"
    );
    assert!(server.mismatches().is_empty(), "{:?}", server.mismatches());
    assert_eq!(
        meta.stats.errors.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the 410"
    );
}

/// A network namespace under a scratch directory (a symlink to the named
/// namespace), removed on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(tag: &str) -> TestNetns {
        let name = format!("mt-kube-{tag}-{}", std::process::id());
        ip_cmd(&["netns", "add", &name]);
        ip_cmd(&[
            "-n", &name, "link", "add", "mt0", "type", "veth", "peer", "name", "mt1",
        ]);
        ip_cmd(&["-n", &name, "link", "set", "mt0", "up"]);
        TestNetns { name }
    }

    fn add_address(&self, cidr: &str) {
        ip_cmd(&["-n", &self.name, "addr", "add", cidr, "dev", "mt0"]);
    }

    fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/var/run/netns").join(&self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

fn ip_cmd(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2)");
    assert!(status.success(), "ip {}", args.join(" "));
}

#[test]
fn pod_network_namespaces_are_found_by_their_address() {
    require_root();
    let server = ReplayServer::start();
    server.push("pods", Reply::List(fixture("pods-list.json")));
    server.push("services", Reply::List(fixture("services-list.json")));
    let src = source(&server);
    let meta = &src.meta;
    wait_until("pods and services are listed", || meta.synced());

    let reviews = TestNetns::new("reviews");
    reviews.add_address("10.244.0.21/24");
    let stranger = TestNetns::new("stranger");
    stranger.add_address("10.99.0.7/24");
    let pending = TestNetns::new("pending");
    let scratch = ScratchDir::new("netns");
    let dir = &scratch.0;
    for ns in [&reviews, &stranger, &pending] {
        std::os::unix::fs::symlink(ns.path(), dir.join(&ns.name)).unwrap();
    }
    let cookie = |ns: &TestNetns| netns_cookie_at(&ns.path()).unwrap();

    meta.refresh(dir);
    let found = meta
        .pod_by_netns(cookie(&reviews))
        .expect("reviews-v1's namespace");
    assert_eq!(found.workload, "reviews-v1");
    assert_eq!(meta.pod_by_netns(cookie(&stranger)), None);
    assert_eq!(meta.pod_by_netns(cookie(&pending)), None);
    assert_eq!(meta.meshed_netns(), vec![cookie(&reviews)]);

    // The CNI plugin configures the address after the namespace exists:
    // the next scan finds it.
    pending.add_address("10.244.0.31/24");
    meta.refresh(dir);
    assert_eq!(
        meta.pod_by_netns(cookie(&pending))
            .map(|p| p.workload.clone())
            .as_deref(),
        Some("ratings-v1")
    );
    // A namespace that is gone is forgotten.
    std::fs::remove_file(dir.join(&reviews.name)).unwrap();
    meta.refresh(dir);
    assert_eq!(meta.pod_by_netns(cookie(&reviews)), None);
}

/// An empty directory under the temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("mt-kube-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` in a hybrid layout), from mountinfo.
fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|line| {
            // `id parent dev root mount-point options ... - fstype source ...`
            let (mount, fs) = line.split_once(" - ")?;
            let fstype = fs.split(' ').next()?;
            let mount_point = mount.split(' ').nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .expect("a cgroup v2 hierarchy mounted (none in /proc/self/mountinfo)")
}

/// A pod's cgroup as the kubelet's cgroupfs driver lays it out, with the
/// directories this test made removed bottom-up on drop.
struct PodCgroup {
    dir: PathBuf,
    made: Vec<PathBuf>,
}

impl PodCgroup {
    fn new(root: &Path, uid: &str) -> PodCgroup {
        let dir = root.join(format!("kubepods/besteffort/pod{uid}"));
        let mut made = Vec::new();
        let mut at = root.to_path_buf();
        for part in ["kubepods", "besteffort", &format!("pod{uid}")] {
            at.push(part);
            if !at.exists() {
                std::fs::create_dir(&at)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", at.display()));
                made.push(at.clone());
            }
        }
        PodCgroup { dir, made }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", self.dir.display()));
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            // A killed process leaves its cgroup as it exits: wait briefly.
            let deadline = Instant::now() + Duration::from_secs(2);
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `sleep` in a network namespace of its own with no name, as runtimes
/// that do not mount pod namespaces under /var/run/netns leave them;
/// killed and reaped on drop.
struct AnonymousNetnsProcess {
    child: Child,
}

impl AnonymousNetnsProcess {
    fn start() -> AnonymousNetnsProcess {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "120"])
            .spawn()
            .expect("unshare (util-linux), to start a process in a new network namespace");
        let mut process = AnonymousNetnsProcess { child };
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let path = process.netns_path();
        wait_until("unshare has made the network namespace", || {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("unshare --net sleep exited: {status}");
            }
            std::fs::read_link(&path).is_ok_and(|ns| ns != own)
        });
        process
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid()))
    }

    fn netns_cookie(&self) -> u64 {
        netns_cookie_at(&self.netns_path()).unwrap()
    }
}

impl Drop for AnonymousNetnsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pod_network_namespaces_are_found_through_pod_cgroups() {
    require_root();
    let cgroup_root = cgroup2_mount();
    // A pod the netns directory does not show: its IP is in no named
    // namespace, and its UID is unique to this run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let uid = format!("{:08x}-7e57-4c9a-8d1e-{nanos:012x}", std::process::id());
    let pod_ip = "10.244.0.231";
    let mut pods = items(&fixture("pods-list.json"));
    let ratings = pods
        .iter_mut()
        .find(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("ratings-v1-")
        })
        .unwrap();
    ratings["metadata"]["uid"] = json!(uid);
    ratings["status"]["podIP"] = json!(pod_ip);
    ratings["status"]["podIPs"] = json!([{ "ip": pod_ip }]);
    let ratings_name = ratings["metadata"]["name"].as_str().unwrap().to_string();
    assert!(
        ratings["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "istio-proxy"),
        "ratings-v1 has a sidecar, so counts as meshed"
    );

    let server = ReplayServer::start();
    server.push("pods", Reply::List(list("PodList", pods, 9100)));
    server.push("services", Reply::List(fixture("services-list.json")));
    let min_interval = Duration::from_secs(3);
    let src = source_with(
        &server,
        KubeMetadata::with_proc_scan(
            NODE,
            ProcScan {
                min_interval,
                ..ProcScan::default()
            },
        ),
    );
    let meta = &src.meta;
    wait_until("pods and services are listed", || meta.synced());

    // Dropped in reverse: the processes are killed before their cgroup goes.
    let cgroup = PodCgroup::new(&cgroup_root, &uid);
    let in_pod = AnonymousNetnsProcess::start();
    let outsider = AnonymousNetnsProcess::start();
    let (pod_netns, outsider_netns) = (in_pod.netns_cookie(), outsider.netns_cookie());
    let netns_scratch = ScratchDir::new("no-named-netns");
    let netns_dir = &netns_scratch.0;

    // Before the process joins the pod's cgroup, nothing says whose it is.
    meta.refresh(netns_dir);
    assert_eq!(meta.pod_by_netns(pod_netns), None);
    assert_eq!(meta.pod_by_netns(outsider_netns), None);
    assert_eq!(meta.meshed_netns(), Vec::<u64>::new());

    cgroup.add(in_pod.pid());
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", in_pod.pid())).unwrap();
    assert!(
        cgroups.contains(&format!("/kubepods/besteffort/pod{uid}")),
        "the process is in the pod's cgroup:
{cgroups}"
    );
    // /proc was walked just now: not again before min_interval.
    let walked = Instant::now();
    meta.refresh(netns_dir);
    assert_eq!(meta.pod_by_netns(pod_netns), None, "rate-limited");
    wait_until("the pod's namespace is found through its cgroup", || {
        meta.refresh(netns_dir);
        meta.pod_by_netns(pod_netns).is_some()
    });
    assert!(walked.elapsed() >= min_interval - Duration::from_millis(500));
    let found = meta.pod_by_netns(pod_netns).unwrap();
    assert_eq!(
        (
            found.namespace.as_str(),
            found.name.as_str(),
            found.workload.as_str()
        ),
        ("bookinfo", ratings_name.as_str(), "ratings-v1")
    );
    assert!(found.sidecar);
    assert_eq!(
        meta.pod_by_netns(outsider_netns),
        None,
        "not in a pod cgroup"
    );
    assert_eq!(meta.meshed_netns(), vec![pod_netns]);

    // A named namespace that holds the pod's IP takes precedence.
    let named = TestNetns::new("cgroup-pod");
    named.add_address(&format!("{pod_ip}/24"));
    std::os::unix::fs::symlink(named.path(), netns_dir.join(&named.name)).unwrap();
    let named_netns = netns_cookie_at(&named.path()).unwrap();
    meta.refresh(netns_dir);
    assert_eq!(
        meta.pod_by_netns(named_netns).map(|p| p.name.clone()),
        Some(ratings_name)
    );
    assert_eq!(meta.pod_by_netns(pod_netns), None);
    assert_eq!(meta.meshed_netns(), vec![named_netns]);
}

#[test]
fn the_agent_labels_lab_traffic_from_the_api_server() {
    require_root();
    let mut opts = LabOptions::bookinfo().unwrap();
    opts.exe = BIN.into();
    let lab = Lab::up(&opts).unwrap();
    let server = ReplayServer::start();
    server.push("pods", Reply::List(fixture("pods-list.json")));
    server.push("services", Reply::List(fixture("services-list.json")));
    let kubeconfig = server.kubeconfig(&lab.dir);
    let agent = AgentProcess::start(
        &["--kubernetes", "--node-name", NODE],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    lab.load_with(
        BIN.as_ref(),
        "loadgen-v1",
        &[
            "--url",
            "http://productpage:9080/productpage",
            "--requests",
            "200",
        ],
        &lab.dir.join("client.jsonl"),
    )
    .unwrap();
    // Spans close when the connection's last response is read.
    let want = "mesh_trace_requests_total{reporter=\"source\",source_workload=\"productpage-v1\",destination_service=\"reviews.bookinfo\",status_code=\"200\",request_protocol=\"http\",grpc_response_status=\"\",source_workload_namespace=\"bookinfo\",destination_service_namespace=\"bookinfo\"}";
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = agent.scrape();
        if metric(&text, want).is_some_and(|v| v >= 150.0) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        metric(&text, want).is_some_and(|v| v >= 150.0),
        "requests labelled from the API server's pods and services:\n{}",
        text.lines()
            .filter(|l| l.starts_with("mesh_trace_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        metric(&text, "mesh_trace_metadata_objects{resource=\"pods\"}"),
        Some(8.0)
    );
    assert_eq!(
        metric(&text, "mesh_trace_metadata_objects{resource=\"services\"}"),
        Some(6.0)
    );
    assert!(
        metric(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6),
        "the agent's own memory is exported"
    );
    assert!(
        !text.contains("destination_service=\"reviews\""),
        "the lab's own names are not used when the API server is the source"
    );
}
