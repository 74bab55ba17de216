//! A Kubernetes API server that replays list and watch responses in the API server's format,
//! one scripted reply per request, in order. A request that arrives when no
//! reply is queued waits for the test to queue one, so a test can look at
//! the client's state between steps. Every request is logged.
use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// One scripted reply.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A complete list (`PodList`, `ServiceList`).
    List(Value),
    /// A watch stream: these events, then the server ends the stream (as
    /// the API server does at its timeout), and the client watches again.
    Watch(Vec<Value>),
}

/// A logged request: the resource, whether it was a watch, and its query.
#[derive(Clone, Debug)]
pub struct Logged {
    pub resource: String,
    pub watch: bool,
    pub query: HashMap<String, String>,
}

#[derive(Default)]
struct Script {
    replies: HashMap<String, VecDeque<Reply>>,
    log: Vec<Logged>,
    mismatches: Vec<String>,
}

pub struct ReplayServer {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    queued: Arc<tokio::sync::Notify>,
    _runtime: tokio::runtime::Runtime,
}

impl ReplayServer {
    pub fn start() -> ReplayServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script::default()));
        let queued = Arc::new(tokio::sync::Notify::new());
        let (s, q) = (script.clone(), queued.clone());
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (s, q) = (s.clone(), q.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (s, q) = (s.clone(), q.clone());
                        async move { Ok::<_, Infallible>(answer(req, s, q).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        ReplayServer {
            addr,
            script,
            queued,
            _runtime: runtime,
        }
    }

    /// Queues the next reply for `resource` ("pods", "services").
    pub fn push(&self, resource: &str, reply: Reply) {
        self.script
            .lock()
            .unwrap()
            .replies
            .entry(resource.to_string())
            .or_default()
            .push_back(reply);
        self.queued.notify_waiters();
    }

    pub fn log(&self) -> Vec<Logged> {
        self.script.lock().unwrap().log.clone()
    }

    /// Requests that did not match the scripted reply (a watch where a list
    /// was queued, or the reverse).
    pub fn mismatches(&self) -> Vec<String> {
        self.script.lock().unwrap().mismatches.clone()
    }

    /// Replies queued and not yet taken, per resource.
    pub fn pending(&self, resource: &str) -> usize {
        self.script
            .lock()
            .unwrap()
            .replies
            .get(resource)
            .map_or(0, VecDeque::len)
    }

    /// A kubeconfig file naming this server, for KUBECONFIG.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: replay\n  cluster:\n    server: http://{}\ncontexts:\n- name: replay\n  context:\n    cluster: replay\n    user: replay\ncurrent-context: replay\nusers:\n- name: replay\n  user:\n    token: replay-token\n",
            self.addr
        );
        std::fs::write(&path, text).expect("writing kubeconfig");
        path
    }
}

async fn answer(
    req: Request<Incoming>,
    script: Arc<Mutex<Script>>,
    queued: Arc<tokio::sync::Notify>,
) -> Response<Full<Bytes>> {
    let resource = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
    script.lock().unwrap().log.push(Logged {
        resource: resource.clone(),
        watch,
        query,
    });
    let reply = loop {
        let notified = queued.notified();
        if let Some(r) = script
            .lock()
            .unwrap()
            .replies
            .get_mut(&resource)
            .and_then(VecDeque::pop_front)
        {
            break r;
        }
        // Held like a watch with nothing to say; the client may give up.
        if tokio::time::timeout(Duration::from_secs(300), notified)
            .await
            .is_err()
        {
            return respond(StatusCode::GATEWAY_TIMEOUT, "{}".into());
        }
    };
    match (reply, watch) {
        (Reply::List(list), false) => respond(StatusCode::OK, list.to_string()),
        (Reply::Watch(events), true) => {
            let lines: String = events.iter().map(|e| format!("{e}\n")).collect();
            respond(StatusCode::OK, lines)
        }
        (reply, _) => {
            let what = format!("{resource}: watch={watch} but the script had {reply:?}");
            script.lock().unwrap().mismatches.push(what.clone());
            respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"message": what}).to_string(),
            )
        }
    }
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A recorded list, from `tests/fixtures/kubernetes/`.
pub fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kubernetes")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture JSON")
}

/// A watch event for `object` of `kind`, at resource version `rv`.
pub fn event(kind: &str, object: &Value, obj_kind: &str, rv: u64) -> Value {
    let mut object = object.clone();
    object["kind"] = json!(obj_kind);
    object["apiVersion"] = json!("v1");
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    json!({"type": kind, "object": object})
}

/// The API server's answer to a watch from a compacted resource version.
pub fn gone(rv: u64) -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {rv} ({})", rv + 1000),
        "reason": "Expired", "code": 410
    }})
}

/// A list with these items and resource version.
pub fn list(kind: &str, items: Vec<Value>, rv: u64) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}
