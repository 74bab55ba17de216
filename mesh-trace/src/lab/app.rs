//! A Bookinfo-shaped app: an HTTP/1.1 service with a configurable service
//! time and error injection that calls other services for every request.
use std::{
    collections::BTreeMap, convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::{
    grpc,
    http_client::{self, HttpClient},
    ioclock::{Clocked, IoClock, WRITE_WAIT},
    records::{mono_ns, AppRecord, RecordWriter},
};

pub const REQUEST_ID: &str = "x-request-id";
pub const SERVED_BY: &str = "x-served-by";
/// The load generator's own id for a request that carries no x-request-id
/// (`lab load --no-request-id`), recorded for the tests' truth.
pub const CLIENT_ID: &str = "x-lab-client-id";
/// The content type of a request whose body is the load generator's id
/// (`lab load --client-id-in-body`): heads that tell requests apart in
/// nothing, for the tests' truth.
pub const CLIENT_ID_BODY: &str = "application/x-lab-client-id";
/// The longest id read from a body.
const CLIENT_ID_BODY_MAX: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct AppOptions {
    /// Pod name, returned in `x-served-by` and written into records.
    #[arg(long)]
    pub pod: String,
    #[arg(long, default_value = "0.0.0.0:9080")]
    pub listen: SocketAddr,
    /// Milliseconds of work per request.
    #[arg(long, default_value_t = 0.0)]
    pub service_time_ms: f64,
    /// Service times to pick from at random for each request, in ms
    /// (repeatable); when given, they replace --service-time-ms.
    #[arg(long = "service-time-choice-ms")]
    pub service_time_choices_ms: Vec<f64>,
    /// Share of requests answered 503 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// A URL to call for each request served (repeatable).
    #[arg(long = "call")]
    pub calls: Vec<String>,
    /// Name resolution, `name:port=ip:port` (repeatable): the lab's DNS.
    #[arg(long)]
    pub resolve: Vec<String>,
    /// JSON-lines file of AppRecords.
    #[arg(long)]
    pub records: PathBuf,
    /// Serve HTTP/2 too (by prior knowledge: the preface tells it from
    /// HTTP/1.1), and the lab's gRPC service (`lab::grpc`) on it.
    #[arg(long)]
    pub http2: bool,
}

struct App {
    opts: AppOptions,
    resolve: BTreeMap<String, SocketAddr>,
    client: HttpClient,
    records: RecordWriter,
}

pub async fn run(opts: AppOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&opts.error_rate),
        "--error-rate must be between 0 and 1"
    );
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    super::ioclock::write_bounds_beside(&opts.records)
        .with_context(|| format!("creating bounds beside {}", opts.records.display()))?;
    let app = Arc::new(App {
        resolve: http_client::parse_resolve(&opts.resolve)?,
        records: RecordWriter::create(&opts.records)
            .with_context(|| format!("creating {}", opts.records.display()))?,
        client: http_client::pooled_client(),
        opts,
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        // The records' times are those of this socket's reads and writes.
        let (stream, clock) = Clocked::with_tx_stamps(stream);
        tokio::spawn(async move {
            let served = if app.opts.http2 {
                let service = hyper::service::service_fn(move |req| {
                    let (app, clock) = (app.clone(), clock.clone());
                    // hyper calls this in the order the requests came: the
                    // clock's next request head over HTTP/2 is this one.
                    let stream = clock.next_h2_request();
                    let io = Io {
                        peer,
                        clock,
                        stream,
                    };
                    async move { Ok::<_, Infallible>(app.handle_any(req, io).await) }
                });
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await
            } else {
                let service = hyper::service::service_fn(move |req| {
                    let io = Io {
                        peer,
                        clock: clock.clone(),
                        stream: None,
                    };
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.handle(req, io).await) }
                });
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                    .map_err(Into::into)
            };
            if let Err(e) = served {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
}

impl App {
    /// HTTP/1.1 or HTTP/2: gRPC calls to the lab's service, other requests
    /// as over HTTP/1.1.
    async fn handle_any(
        self: Arc<Self>,
        req: Request<Incoming>,
        io: Io,
    ) -> Response<tonic::body::Body> {
        if !grpc::is_grpc(&req) {
            return self.handle(req, io).await.map(tonic::body::Body::new);
        }
        let call = Arc::new(GrpcCall {
            t_read_ns: io.read_ns(),
            path: req.uri().path().to_string(),
            app: self,
            io,
        });
        grpc::serve(call, req).await
    }

    fn service_time_ms(&self) -> f64 {
        match self.opts.service_time_choices_ms.as_slice() {
            [] => self.opts.service_time_ms,
            choices => choices[rand::random_range(0..choices.len())],
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, io: Io) -> Response<Full<Bytes>> {
        let t_read_ns = io.read_ns();
        let (req, client_id_in_body) = client_id_from_body(req).await;
        let request_id = req
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let service_time_ms = self.service_time_ms();
        if service_time_ms > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(service_time_ms / 1000.0)).await;
        }
        let status = if rand::random::<f64>() < self.opts.error_rate {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let mut calls = Vec::new();
        if status == StatusCode::OK {
            for url in &self.opts.calls {
                calls.push(self.call(url, request_id.as_deref()).await);
            }
        }
        let body = serde_json::json!({ "pod": self.opts.pod, "calls": calls });
        let resp = Response::builder()
            .status(status)
            .header(SERVED_BY, &self.opts.pod)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("static response parts are valid");
        let record = AppRecord {
            pod: self.opts.pod.clone(),
            request_id,
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            client_id: req
                .headers()
                .get(CLIENT_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or(client_id_in_body),
            status: status.as_u16(),
            peer: io.peer,
            t_read_ns,
            t_write_ns: 0,
            stream: io.stream.map(|(s, _)| s),
        };
        // hyper writes the response after we return it: the record waits
        // for that write. Responses on a connection go out in order and
        // the next request is not read before, so the first write from
        // now on is this response's.
        self.record_when_written(record, io, mono_ns());
        resp
    }

    /// Writes down `record` once its response is written: over HTTP/2,
    /// the write that carried its stream's last frame; over HTTP/1.1, the
    /// connection's first write from `answered_ns` on (responses go out in
    /// order, and the next request is not read before).
    fn record_when_written(self: &Arc<Self>, mut record: AppRecord, io: Io, answered_ns: u64) {
        let app = Arc::clone(self);
        tokio::spawn(async move {
            record.t_write_ns = match io.stream {
                // 0: the stream's end was not seen on the connection.
                Some((stream, _)) => io.clock.wait_h2_end(stream, WRITE_WAIT).await.unwrap_or(0),
                None => {
                    (io.clock.wait_write_from(answered_ns, WRITE_WAIT).await).unwrap_or(answered_ns)
                }
            };
            app.records.write(&record);
        });
    }

    /// Calls a downstream service, propagating the request id as Bookinfo does.
    async fn call(&self, url: &str, request_id: Option<&str>) -> serde_json::Value {
        let result = async {
            let mut builder = http_client::request_to(url, &self.resolve)?;
            if let Some(id) = request_id {
                builder = builder.header(REQUEST_ID, id);
            }
            let (resp, _) =
                http_client::fetch(&self.client, builder.body(Full::default())?).await?;
            let served_by = resp
                .headers()
                .get(SERVED_BY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            anyhow::Ok((resp.status().as_u16(), served_by))
        }
        .await;
        match result {
            Ok((status, served_by)) => {
                serde_json::json!({ "url": url, "status": status, "served_by": served_by })
            }
            Err(e) => serde_json::json!({ "url": url, "error": format!("{e:#}") }),
        }
    }
}

/// The load generator's id in the body of a request sent with
/// [`CLIENT_ID_BODY`] (the body is read, and dropped: the app serves no
/// body); other requests are passed on as they came.
async fn client_id_from_body(req: Request<Incoming>) -> (Request<()>, Option<String>) {
    use http_body_util::BodyExt as _;
    let (parts, body) = req.into_parts();
    let carries_id = parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v == CLIENT_ID_BODY);
    let id = if carries_id {
        http_body_util::Limited::new(body, CLIENT_ID_BODY_MAX)
            .collect()
            .await
            .ok()
            .and_then(|b| String::from_utf8(b.to_bytes().to_vec()).ok())
    } else {
        None
    };
    (Request::from_parts(parts, ()), id)
}

/// A request's connection, as the app's records need it.
#[derive(Clone)]
struct Io {
    peer: SocketAddr,
    clock: Arc<IoClock>,
    /// Over HTTP/2: the request's stream and the read that completed its
    /// head.
    stream: Option<(u32, u64)>,
}

impl Io {
    /// When the request's head was read. Over HTTP/1.1, hyper calls the
    /// service once the head is parsed: the last read so far completed it.
    fn read_ns(&self) -> u64 {
        if let Some((_, read_ns)) = self.stream {
            return read_ns;
        }
        let entered = mono_ns();
        self.clock.last_read_until(entered).unwrap_or(entered)
    }
}

/// One gRPC call to the lab's service, as the app serves it.
struct GrpcCall {
    app: Arc<App>,
    io: Io,
    path: String,
    t_read_ns: u64,
}

impl grpc::Handler for GrpcCall {
    fn reply(
        &self,
        _call: &grpc::Call,
        seq: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = grpc::Reply> + Send>> {
        let ms = self.app.service_time_ms();
        let pod = self.app.opts.pod.clone();
        Box::pin(async move {
            if ms > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
            }
            grpc::Reply { pod, seq }
        })
    }

    fn done(&self, _: &grpc::Call, metadata: &tonic::metadata::MetadataMap, answered_ns: u64) {
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let record = AppRecord {
            pod: self.app.opts.pod.clone(),
            request_id: text(REQUEST_ID),
            method: "POST".into(),
            path: self.path.clone(),
            client_id: text(CLIENT_ID),
            status: 200,
            peer: self.io.peer,
            t_read_ns: self.t_read_ns,
            t_write_ns: 0,
            stream: self.io.stream.map(|(s, _)| s),
        };
        self.app
            .record_when_written(record, self.io.clone(), answered_ns);
    }
}
