//! The other end of the agent's HTTP endpoints: `top` fetching the
//! statistics, `spans` and `flows` following the live feeds of an agent on
//! the node.
use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{body::Incoming, header, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;

/// A statistics document larger than this is refused rather than buffered:
/// 2,001 rows with ten slow requests each stay well under it.
const MAX_BODY: usize = 64 << 20;
/// A feed line longer than this is not one the agent writes.
const MAX_LINE: usize = 1 << 20;

/// `http://host:port[/prefix]` of an agent, split once so that each request
/// only connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    /// host:port, to connect to and for the Host header.
    pub authority: String,
    /// The agent's paths sit under this prefix ("" or "/prefix").
    pub prefix: String,
}

impl AgentUrl {
    pub fn parse(text: &str) -> anyhow::Result<AgentUrl> {
        // A bare host:port is taken as http: the agent serves nothing else.
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let uri: Uri = with_scheme
            .parse()
            .with_context(|| format!("--agent {text}: not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--agent {text}: only http:// is supported (the agent serves plain HTTP)");
        }
        let Some(authority) = uri.authority() else {
            bail!("--agent {text}: no host");
        };
        let port = authority.port_u16().unwrap_or(80);
        Ok(AgentUrl {
            authority: format!("{}:{port}", authority.host()),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The path of `api` (e.g. `/api/v1/stats`) on this agent.
    pub fn path(&self, api: &str) -> String {
        format!("{}{api}", self.prefix)
    }
}

impl std::fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

/// One HTTP/1.1 GET on a fresh connection, the whole body as text: the
/// agent is local or a node away, a request per second, so pooling would
/// only add state to recover when it restarts.
pub async fn get_text(url: &AgentUrl, path: &str) -> anyhow::Result<String> {
    exchange(url, path, "application/json", |resp| async move {
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
            .to_bytes();
        String::from_utf8(body.to_vec()).context("the response is not UTF-8")
    })
    .await
}

/// Follows a feed of JSON lines at `path` (query included), passing each
/// line to `on_line` until it returns false. The agent ending the feed
/// (it stopped) is an error: the caller wanted more.
pub async fn follow_lines(
    url: &AgentUrl,
    path: &str,
    mut on_line: impl FnMut(&str) -> bool,
) -> anyhow::Result<()> {
    exchange(url, path, "application/x-ndjson", |resp| async move {
        let mut body = resp.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading the feed")?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line[..end]);
                if !on_line(&text) {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                pending.len() <= MAX_LINE,
                "a feed line over {MAX_LINE} bytes"
            );
        }
        bail!("the agent ended the feed (it stopped or restarted)")
    })
    .await
}

/// Connects, sends `GET path` and hands a 200 response to `read`; any
/// other status is an error carrying the agent's own words.
async fn exchange<T, F>(
    url: &AgentUrl,
    path: &str,
    accept: &str,
    read: impl FnOnce(Response<Incoming>) -> F,
) -> anyhow::Result<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let stream = tokio::net::TcpStream::connect(&url.authority)
        .await
        .with_context(|| format!("connecting to {}", url.authority))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    // The connection is driven next to the request, and dropped with it.
    let request = async move {
        let req = Request::get(path)
            .header(header::HOST, url.authority.as_str())
            .header(header::ACCEPT, accept)
            .body(Empty::<Bytes>::new())
            .context("building the request")?;
        let resp = sender
            .send_request(req)
            .await
            .context("sending the request")?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = Limited::new(resp.into_body(), MAX_LINE)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            bail!("HTTP {status} from {path}: {}", text.trim());
        }
        read(resp).await
    };
    tokio::select! {
        r = request => r,
        r = connection => match r {
            Ok(()) => bail!("the agent closed the connection without answering"),
            Err(e) => Err(anyhow::Error::new(e).context("HTTP connection")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls() {
        let u = AgentUrl::parse("http://127.0.0.1:9464").unwrap();
        assert_eq!(u.authority, "127.0.0.1:9464");
        assert_eq!(u.path("/api/v1/stats"), "/api/v1/stats");
        assert_eq!(u.to_string(), "http://127.0.0.1:9464");
        let u = AgentUrl::parse("localhost:1234/").unwrap();
        assert_eq!(u.authority, "localhost:1234");
        assert_eq!(u.path("/api/v1/spans"), "/api/v1/spans");
        let u = AgentUrl::parse("http://node-1/mesh-trace/").unwrap();
        assert_eq!(u.authority, "node-1:80");
        assert_eq!(u.path("/api/v1/stats"), "/mesh-trace/api/v1/stats");
        assert_eq!(u.to_string(), "http://node-1:80/mesh-trace");
        assert!(AgentUrl::parse("https://node:9464").is_err());
        assert!(AgentUrl::parse("http://").is_err());
    }
}
