//! An OTLP trace receiver built on the protocol's own definitions
//! (opentelemetry-proto): OTLP/HTTP, every `POST /v1/traces` decoded from
//! its message type, and OTLP/gRPC, the protocol's generated server on
//! hyper's HTTP/2. It keeps the spans with the node that sent them.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value,
    trace::v1::Span,
};
use prost::Message as _;

/// A received span and the `k8s.node.name` of the agent that sent it.
#[derive(Clone, Debug)]
pub struct Received {
    pub node: String,
    pub span: Span,
}

impl Received {
    /// A string attribute of the span.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.as_str()),
                _ => None,
            })
    }
}

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    /// Where it takes OTLP/gRPC.
    pub grpc_addr: SocketAddr,
    pub spans: Arc<Mutex<Vec<Received>>>,
}

impl OtlpReceiver {
    pub fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let keep = spans.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve(stream, &keep) {
                    eprintln!("OTLP receiver: {e}");
                }
            }
        });
        let grpc = TcpListener::bind("127.0.0.1:0").unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        grpc.set_nonblocking(true).unwrap();
        let keep = spans.clone();
        std::thread::spawn(move || serve_grpc(grpc, keep));
        OtlpReceiver {
            addr,
            grpc_addr,
            spans,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }
}

/// The generated gRPC service, keeping what it receives.
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(request.into_inner(), &self.0);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn serve_grpc(listener: TcpListener, spans: Arc<Mutex<Vec<Received>>>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let service = TraceServiceServer::new(Collector(spans));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let served =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                if let Err(e) = served {
                    eprintln!("OTLP/gRPC receiver: {e}");
                }
            });
        }
    });
}

/// Keeps an export's spans with the node that sent them.
fn keep(req: ExportTraceServiceRequest, spans: &Mutex<Vec<Received>>) {
    let mut out = spans.lock().unwrap();
    for rs in req.resource_spans {
        let node = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "k8s.node.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            out.extend(ss.spans.into_iter().map(|span| Received {
                node: node.clone(),
                span,
            }));
        }
    }
}

fn serve(stream: TcpStream, spans: &Mutex<Vec<Received>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let request_line = line.clone();
    let mut length = 0usize;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let status = match (
        request_line.starts_with("POST /v1/traces "),
        ExportTraceServiceRequest::decode(body.as_slice()),
    ) {
        (true, Ok(req)) => {
            keep(req, spans);
            "200 OK"
        }
        _ => "400 Bad Request",
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
}
