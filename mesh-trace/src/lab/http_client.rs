//! The lab apps' outgoing HTTP: a pooled keep-alive client and the lab's
//! stand-in for cluster DNS (service name -> VIP).
use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

use super::ioclock::{ClockConnector, ConnectionClock, Exchange};

/// Its connections are timed: see [`exchange`].
pub type HttpClient = Client<ClockConnector<HttpConnector>, Full<Bytes>>;

fn connector() -> ClockConnector<HttpConnector> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    ClockConnector::new(connector)
}

/// A pooled HTTP/1.1 client: connections are kept alive and reused, as a
/// real app's client library would.
pub fn pooled_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(connector())
}

/// A client that opens a new connection for every request.
pub fn unpooled_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector())
}

/// When the request of `resp`, handed to the client at `sent_ns`, was
/// written and its response began to be read, by its connection's clock
/// (see [`super::ioclock::IoClock::exchange_until`]).
pub fn exchange<B>(resp: &Response<B>, sent_ns: u64) -> Option<Exchange> {
    let clock = &resp.extensions().get::<ConnectionClock>()?.0;
    match resp.extensions().get::<HeadArrived>() {
        Some(HeadArrived(arrived)) => clock.exchange_until(sent_ns, *arrived),
        None => clock.exchange_from(sent_ns),
    }
}

/// When the client handed a response's head back (CLOCK_MONOTONIC ns), in
/// the response's extensions ([`fetch`]).
#[derive(Clone, Copy, Debug)]
pub struct HeadArrived(pub u64);

/// Parses `name:port=ip:port` pairs given on the command line.
pub fn parse_resolve(pairs: &[String]) -> anyhow::Result<BTreeMap<String, SocketAddr>> {
    pairs
        .iter()
        .map(|p| {
            let (name, addr) = p
                .split_once('=')
                .with_context(|| format!("--resolve {p}: expected name:port=ip:port"))?;
            let addr = addr
                .parse()
                .with_context(|| format!("--resolve {p}: bad address"))?;
            Ok((name.to_string(), addr))
        })
        .collect()
}

/// A request for `url` whose authority is resolved through `resolve` (the
/// URI gets the VIP; the Host header keeps the service name, as with DNS).
pub fn request_to(
    url: &str,
    resolve: &BTreeMap<String, SocketAddr>,
) -> anyhow::Result<hyper::http::request::Builder> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let authority = uri
        .authority()
        .with_context(|| format!("URL {url} has no host"))?;
    let host = authority.as_str().to_string();
    let target = resolve
        .get(&host)
        .map(|a| a.to_string())
        .unwrap_or_else(|| host.clone());
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Ok(Request::get(format!("http://{target}{path}")).header(hyper::header::HOST, host))
}

/// Sends `req` and reads the whole response (its extensions kept, the
/// connection's clock among them).
pub async fn fetch(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(Response<()>, Bytes)> {
    let resp = client.request(req).await?;
    let arrived = super::records::mono_ns();
    let (mut parts, body) = resp.into_parts();
    parts.extensions.insert(HeadArrived(arrived));
    let body = body.collect().await?.to_bytes();
    Ok((Response::from_parts(parts, ()), body))
}
