//! Asking a running replicator for its health, over its unix socket or `addr`, with hyper's
//! HTTP/1 client (one request, no connection pool needed).

use std::path::Path;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::health::Report;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("unexpected answer: {0}")]
    Decode(String),
}

async fn get<S>(stream: S, path: &str) -> Result<(u16, Vec<u8>), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
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

fn decode(body: &[u8]) -> Result<Report, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::Decode(e.to_string()))
}

/// The health report from the replicator listening on `socket`.
pub async fn health_from_socket(socket: &Path) -> Result<Report, ClientError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(ClientError::Connect)?;
    let (_, body) = get(stream, "/health").await?;
    decode(&body)
}

/// The health report from the replicator listening on `addr` (`:9090` means this host).
pub async fn health_from_addr(addr: &str) -> Result<Report, ClientError> {
    let target = match addr.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None => addr.replace("0.0.0.0", "127.0.0.1"),
    };
    let stream = tokio::net::TcpStream::connect(&target)
        .await
        .map_err(ClientError::Connect)?;
    let (_, body) = get(stream, "/health").await?;
    decode(&body)
}
