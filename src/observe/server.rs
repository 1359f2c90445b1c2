//! The HTTP endpoints: `GET /health` (JSON; 200 when healthy, 503 otherwise) and
//! `GET /metrics` (Prometheus text). Served on `addr` when configured and always on a unix
//! socket in each database's metadata directory, so `walden status` finds a running
//! replicator without any configuration and without opening a network port.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::health;
use super::metrics::metrics;
use crate::replicate::DbView;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Name of the status socket inside a database's metadata directory.
pub const SOCKET_NAME: &str = "walden.sock";

/// Where a database's status socket is.
pub fn socket_path(meta: &Path) -> PathBuf {
    meta.join(SOCKET_NAME)
}

/// Every listener (one socket per database, and `addr`) shares one list of views.
type Views = std::sync::Arc<Vec<DbView>>;

fn router(views: Views) -> Router {
    Router::new()
        .route("/health", get(health_handler))
        .route("/metrics", get(metrics_handler))
        .route("/verify", axum::routing::post(verify_handler))
        .with_state(views)
}

async fn health_handler(State(views): State<Views>) -> impl IntoResponse {
    let report = health::report(&views, SystemTime::now());
    let code = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(report))
}

#[derive(serde::Deserialize)]
struct VerifyQuery {
    /// Only this database; all when absent.
    db: Option<String>,
}

/// Runs a restore drill now (`walden verify` asks for one when a replicator runs).
async fn verify_handler(
    State(views): State<Views>,
    axum::extract::Query(q): axum::extract::Query<VerifyQuery>,
) -> impl IntoResponse {
    let mut verdicts = Vec::new();
    for v in views.iter().filter(|v| {
        q.db.as_ref()
            .is_none_or(|d| *d == v.path.display().to_string())
    }) {
        verdicts.extend(v.verify().await);
    }
    let code = if !verdicts.is_empty() && verdicts.iter().all(|v| v.ok) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(verdicts))
}

async fn metrics_handler() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().encode(),
    )
}

/// Litestream accepts `:9090` (all interfaces); so does Walden.
fn listen_addr(addr: &str) -> String {
    match addr.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => addr.to_string(),
    }
}

/// Starts serving until `shutdown`; returns once the listeners are bound, so a bind error is
/// reported at start-up.
pub async fn serve(
    addr: Option<&str>,
    sockets: &[PathBuf],
    views: Vec<DbView>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    // One router for every listener: a thousand databases mean a thousand sockets.
    let app = router(std::sync::Arc::new(views));
    if let Some(addr) = addr {
        let bind = listen_addr(addr);
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .map_err(|source| ServerError::Bind {
                addr: bind.clone(),
                source,
            })?;
        tracing::info!(addr = %bind, "serving /health and /metrics");
        let app = app.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
    }
    for path in sockets {
        // A socket left by a process that died is removed; a live one is someone else's.
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let listener = match tokio::net::UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e,
                    "cannot open the status socket; walden status will read the bucket instead");
                continue;
            }
        };
        let app = app.clone();
        let stop = shutdown.clone();
        let cleanup = path.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            let _ = std::fs::remove_file(cleanup);
        });
    }
    Ok(())
}
