//! Asking a running replicator for its health, over its unix socket or `addr`, with hyper's
//! HTTP/1 client (one request, no connection pool needed).

use std::path::Path;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::health::Report;
use crate::verify::Verdict;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("unexpected answer: {0}")]
    Decode(String),
}

async fn request<S>(
    stream: S,
    method: hyper::Method,
    path: &str,
) -> Result<(u16, Vec<u8>), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "walden")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::Decode(e.to_string()))
}

/// Where a running replicator answers: its status socket, or `addr` (`:9090` means this
/// host).
#[derive(Debug, Clone)]
pub enum Endpoint<'a> {
    Socket(&'a Path),
    Addr(&'a str),
}

async fn call(
    endpoint: &Endpoint<'_>,
    method: hyper::Method,
    path: &str,
) -> Result<Vec<u8>, ClientError> {
    let (_, body) = match endpoint {
        Endpoint::Socket(socket) => {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(ClientError::Connect)?;
            request(stream, method, path).await?
        }
        Endpoint::Addr(addr) => {
            let target = match addr.strip_prefix(':') {
                Some(port) => format!("127.0.0.1:{port}"),
                None => addr.replace("0.0.0.0", "127.0.0.1"),
            };
            let stream = tokio::net::TcpStream::connect(&target)
                .await
                .map_err(ClientError::Connect)?;
            request(stream, method, path).await?
        }
    };
    Ok(body)
}

/// The running replicator's health report.
pub async fn health(endpoint: &Endpoint<'_>) -> Result<Report, ClientError> {
    decode(&call(endpoint, hyper::Method::GET, "/health").await?)
}

/// Asks the running replicator for a restore drill of one database.
pub async fn verify(endpoint: &Endpoint<'_>, db: &str) -> Result<Vec<Verdict>, ClientError> {
    let query: String = url_encode(db);
    decode(
        &call(
            endpoint,
            hyper::Method::POST,
            &format!("/verify?db={query}"),
        )
        .await?,
    )
}

/// Percent-encodes a query value (paths may hold spaces and `&`).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
