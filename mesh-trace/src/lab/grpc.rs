//! The lab's gRPC service pair: `lab.Reviews` served by the apps (with
//! `lab app --http2`) and called by the load generator (`lab load --grpc`),
//! both on tonic's gRPC machinery over hyper's HTTP/2, as Rust services in a
//! mesh are. Two methods, so that both shapes of call cross the sidecars:
//!
//! - `Get`: unary, one reply after the app's service time;
//! - `List`: server streaming, `messages` replies, each after a service
//!   time of its own; the call ends with the trailers after the last.
//!
//! The messages are declared here with prost's derive (no .proto build
//! step); their wire format is protobuf as any gRPC peer would read it.
use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::Context as _;
use hyper_util::{
    client::legacy::{
        connect::{dns::Name, HttpConnector},
        Client,
    },
    rt::TokioExecutor,
};

use super::ioclock::{ClockConnector, ConnectionClock, IoClock};

/// The service's methods, as the `:path` of their calls.
pub const GET: &str = "/lab.Reviews/Get";
pub const LIST: &str = "/lab.Reviews/List";

/// A call's request: the caller's id for it, and how many replies a `List`
/// streams back.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Call {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(uint32, tag = "2")]
    pub messages: u32,
}

/// One reply: the pod that served it and the reply's number in its call.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    #[prost(string, tag = "1")]
    pub pod: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

/// Which method `lab load --grpc` calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CallKind {
    /// `Get`, unary.
    Unary,
    /// `List`, server streaming (`--messages` replies).
    ServerStream,
}

impl CallKind {
    /// The method's path (`:path`).
    pub fn path(self) -> &'static str {
        match self {
            CallKind::Unary => GET,
            CallKind::ServerStream => LIST,
        }
    }
}

/// Whether a request is a gRPC call (by its content type).
pub fn is_grpc<B>(req: &hyper::Request<B>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"))
}

/// The lab's DNS for the gRPC client: service names to their VIPs, so that
/// a call's `:authority` keeps the service name (the sidecars route on it)
/// while the connection goes to the VIP.
#[derive(Clone, Debug)]
pub struct LabDns(Arc<BTreeMap<String, IpAddr>>);

impl LabDns {
    /// From the `name:port=ip:port` pairs of `--resolve`.
    pub fn new(resolve: &BTreeMap<String, SocketAddr>) -> LabDns {
        let names = resolve
            .iter()
            .map(|(name, addr)| {
                let host = name.rsplit_once(':').map_or(name.as_str(), |(h, _)| h);
                (host.to_string(), addr.ip())
            })
            .collect();
        LabDns(Arc::new(names))
    }
}

impl tower_service::Service<Name> for LabDns {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        // The port is the URI's: the connector sets it.
        std::future::ready(
            self.0
                .get(name.as_str())
                .map(|ip| vec![SocketAddr::new(*ip, 0)].into_iter())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{} is not a lab service (--resolve)", name.as_str()),
                    )
                }),
        )
    }
}

/// An HTTP/2 client whose connections are timed; one connection per
/// service, every call a stream on it, as gRPC channels pool.
pub type GrpcClient = Client<ClockConnector<HttpConnector<LabDns>>, tonic::body::Body>;

pub fn client(resolve: &BTreeMap<String, SocketAddr>) -> GrpcClient {
    let mut connector = HttpConnector::new_with_resolver(LabDns::new(resolve));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(ClockConnector::new(connector))
}

/// What a call came back with.
#[derive(Debug)]
pub struct Outcome {
    /// The pod that served it (from its replies).
    pub served_by: Option<String>,
    /// Replies received.
    pub replies: u32,
    /// The connection's clock, for the call's own reads and writes.
    pub clock: Option<Arc<IoClock>>,
}

/// Calls `kind` on the service at `url`'s authority (`http://reviews:9080`),
/// with `metadata` (its id among it). A status other than OK is an error.
pub async fn call(
    client: &GrpcClient,
    url: &str,
    kind: CallKind,
    messages: u32,
    id: &str,
    metadata: &[(&'static str, &str)],
) -> anyhow::Result<Outcome> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let authority = uri
        .authority()
        .with_context(|| format!("URL {url} has no host"))?;
    let origin = hyper::Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query("/")
        .build()?;
    let mut grpc = tonic::client::Grpc::with_origin(client.clone(), origin);
    grpc.ready()
        .await
        .map_err(|e| anyhow::anyhow!("connecting: {e}"))?;
    let mut request = tonic::Request::new(Call {
        id: id.to_string(),
        messages,
    });
    for (key, value) in metadata {
        request.metadata_mut().insert(*key, value.parse()?);
    }
    let codec = tonic_prost::ProstCodec::<Call, Reply>::default();
    let mut out = Outcome {
        served_by: None,
        replies: 0,
        clock: None,
    };
    match kind {
        CallKind::Unary => {
            let resp = grpc.unary(request, GET.parse()?, codec).await?;
            out.clock = resp
                .extensions()
                .get::<ConnectionClock>()
                .map(|c| c.0.clone());
            out.served_by = Some(resp.into_inner().pod);
            out.replies = 1;
        }
        CallKind::ServerStream => {
            let resp = grpc.server_streaming(request, LIST.parse()?, codec).await?;
            out.clock = resp
                .extensions()
                .get::<ConnectionClock>()
                .map(|c| c.0.clone());
            let mut replies = resp.into_inner();
            // Ends at the trailers; an error status in them is an error.
            while let Some(reply) = replies.message().await? {
                out.served_by = Some(reply.pod);
                out.replies += 1;
            }
        }
    }
    Ok(out)
}

/// The app's side: what it does for one call, given by the app.
pub trait Handler: Send + Sync + 'static {
    /// Reply `seq` to `call`, once its service time has passed.
    fn reply(&self, call: &Call, seq: u32) -> Pin<Box<dyn Future<Output = Reply> + Send>>;
    /// The call is answered (its last reply and trailers handed to the
    /// connection at `answered_ns`): write down its truth.
    fn done(&self, call: &Call, metadata: &tonic::metadata::MetadataMap, answered_ns: u64);
}

/// Serves one gRPC request with `handler`.
pub async fn serve<H, B>(
    handler: Arc<H>,
    req: hyper::Request<B>,
) -> hyper::Response<tonic::body::Body>
where
    H: Handler,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tonic::codegen::StdError> + Send,
{
    let codec = tonic_prost::ProstCodec::<Reply, Call>::default();
    let mut grpc = tonic::server::Grpc::new(codec);
    match req.uri().path() {
        GET => grpc.unary(Unary(handler), req).await,
        LIST => grpc.server_streaming(Streaming(handler), req).await,
        _ => tonic::Status::unimplemented("lab.Reviews has Get and List").into_http(),
    }
}

struct Unary<H>(Arc<H>);

impl<H: Handler> tonic::server::UnaryService<Call> for Unary<H> {
    type Response = Reply;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<Reply>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Call>) -> Self::Future {
        let handler = Arc::clone(&self.0);
        Box::pin(async move {
            let reply = handler.reply(request.get_ref(), 0).await;
            handler.done(
                request.get_ref(),
                request.metadata(),
                super::records::mono_ns(),
            );
            Ok(tonic::Response::new(reply))
        })
    }
}

struct Streaming<H>(Arc<H>);

type Replies = Pin<Box<dyn futures_util::Stream<Item = Result<Reply, tonic::Status>> + Send>>;

impl<H: Handler> tonic::server::ServerStreamingService<Call> for Streaming<H> {
    type Response = Reply;
    type ResponseStream = Replies;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<Replies>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Call>) -> Self::Future {
        let handler = Arc::clone(&self.0);
        Box::pin(async move {
            let metadata = request.metadata().clone();
            let call = request.into_inner();
            let n = call.messages.max(1);
            // Each reply after its own service time; after the last, the
            // stream ends and the trailers follow.
            let replies = futures_util::stream::unfold(0u32, move |seq| {
                let (handler, call, metadata) = (handler.clone(), call.clone(), metadata.clone());
                async move {
                    if seq == n {
                        handler.done(&call, &metadata, super::records::mono_ns());
                        return None;
                    }
                    Some((Ok(handler.reply(&call, seq).await), seq + 1))
                }
            });
            Ok(tonic::Response::new(Box::pin(replies) as Replies))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_dns_maps_service_names_to_their_vips_whatever_the_port() {
        let resolve = crate::lab::http_client::parse_resolve(&[
            "reviews:9080=10.96.0.12:9080".to_string(),
            "ratings:9080=10.96.0.13:9080".to_string(),
        ])
        .unwrap();
        let mut dns = LabDns::new(&resolve);
        let name: Name = "reviews".parse().unwrap();
        let addrs: Vec<SocketAddr> =
            futures_util::FutureExt::now_or_never(tower_service::Service::call(&mut dns, name))
                .unwrap()
                .unwrap()
                .collect();
        assert_eq!(addrs, vec!["10.96.0.12:0".parse().unwrap()]);
        let unknown: Name = "details".parse().unwrap();
        assert!(
            futures_util::FutureExt::now_or_never(tower_service::Service::call(&mut dns, unknown))
                .unwrap()
                .is_err()
        );
    }
}
