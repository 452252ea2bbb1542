//! The HTTP API inside `pipeline run` (axum): online features with read-your-writes,
//! health and Prometheus metrics.
//!
//! ```text
//! GET  /v1/features/{file}/{key}[?min_lsn=X/Y&timeout_ms=N]   one entity
//! POST /v1/features/{file}   {"keys":[…], "min_lsn":"X/Y", "timeout_ms":N}
//! GET  /health  /health/live  /health/ready                    no token needed
//! GET  /metrics                                                Prometheus text
//! ```
//!
//! Errors are JSON `{"error":{"code":…, "message":…}}`: 400 bad key, LSN or body; 401
//! no or wrong token; 404 unknown file, entity or route; 413 body or key list too
//! large; 503 not ready or over `serve.max_in_flight`; 504 `min_lsn` not reached in time
//! (with the watermark reached, so the caller can fall back).

use super::online::{Online, ReadError, WaitTimeout};
use super::table::{date_text, OnlineRow};
use crate::changelog::Lsn;
use crate::config::ServeConfig;
use crate::state::Key;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long requests still in flight get to finish after shutdown is asked.
const DRAIN: Duration = Duration::from_secs(2);

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    inner: Arc<ApiInner>,
}

struct ApiInner {
    online: Online,
    config: ServeConfig,
    metrics: Option<PrometheusHandle>,
    in_flight: Arc<Semaphore>,
}

impl Api {
    pub fn new(online: Online, config: ServeConfig, metrics: Option<PrometheusHandle>) -> Api {
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        Api {
            inner: Arc::new(ApiInner {
                online,
                config,
                metrics,
                in_flight,
            }),
        }
    }

    pub fn online(&self) -> &Online {
        &self.inner.online
    }

    pub fn config(&self) -> &ServeConfig {
        &self.inner.config
    }

    /// A request's JSON body as `T`: 413 `body_too_large` beyond `serve.max_body_bytes`,
    /// 400 `bad_body` when it cannot be read or parsed.
    pub fn json_body<T: serde::de::DeserializeOwned>(
        &self,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<T, ApiError> {
        let body = body.map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than serve.max_body_bytes ({})",
                    self.config().max_body_bytes
                ),
            ),
            _ => ApiError::bad_request("bad_body", e.body_text()),
        })?;
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("bad_body", format!("request body: {e}")))
    }

    /// The API's routes with auth, load shedding and request metrics.
    pub fn router(&self) -> Router {
        self.router_with(Router::new())
    }

    /// [`Api::router`] plus `extra` routes (e.g. decisions), guarded the same way.
    pub fn router_with(&self, extra: Router<Api>) -> Router {
        let guarded = Router::new()
            .route("/v1/features/{file}/{key}", get(get_one))
            .route("/v1/features/{file}", post(post_many))
            .route("/metrics", get(metrics))
            .merge(extra)
            .layer(middleware::from_fn_with_state(self.clone(), shed))
            .layer(middleware::from_fn_with_state(self.clone(), auth))
            .layer(DefaultBodyLimit::max(self.inner.config.max_body_bytes));
        Router::new()
            .route("/health", get(health))
            .route("/health/ready", get(health))
            .route("/health/live", get(live))
            .merge(guarded)
            .fallback(not_found)
            .layer(middleware::from_fn(record))
            .with_state(self.clone())
    }

    /// The rows of `keys` once the watermark reaches `min_lsn` (see [`Api::wait`]).
    pub async fn read(
        &self,
        file: &str,
        keys: &[Key],
        wait: Wait,
    ) -> Result<(Lsn, Vec<Option<OnlineRow>>), ApiError> {
        let online = &self.inner.online;
        // Unknown file or not ready: say so before waiting.
        online.text_keys(file).map_err(ApiError::read)?;
        self.wait(wait).await?;
        online.read(file, keys).map_err(ApiError::read)
    }

    /// Waits until the watermark reaches `wait.min_lsn` (none: at once), for at most the
    /// capped `timeout_ms`: 504 with the watermark reached when it does not.
    pub async fn wait(&self, wait: Wait) -> Result<(), ApiError> {
        let Some(min_lsn) = wait.min_lsn else {
            return Ok(());
        };
        let online = &self.inner.online;
        if let Some(reason) = online.phase().reason() {
            return Err(ApiError::read(ReadError::NotReady(reason)));
        }
        let started = Instant::now();
        metrics::counter!(crate::metrics::WAITS).increment(1);
        let waited = online
            .wait_for(min_lsn, self.inner.config.wait(wait.timeout_ms))
            .await;
        metrics::histogram!(crate::metrics::WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        match waited {
            Ok(_) => Ok(()),
            Err(WaitTimeout { watermark }) => {
                metrics::counter!(crate::metrics::WAIT_TIMEOUTS).increment(1);
                Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "wait_timeout",
                    format!(
                        "the features are current to {watermark}, not yet to min_lsn {min_lsn}"
                    ),
                )
                .with_watermark(watermark))
            }
        }
    }

    /// Parses request keys for `file` (integers or text, as its entity key column is).
    pub fn parse_keys(&self, file: &str, keys: &[Value]) -> Result<Vec<Key>, ApiError> {
        let text = self.inner.online.text_keys(file).map_err(ApiError::read)?;
        keys.iter()
            .enumerate()
            .map(|(i, v)| {
                json_key(text, v).ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_key",
                        format!("keys[{i}]: {v} is not {} key", key_kind(text)),
                    )
                })
            })
            .collect()
    }
}

/// What a request asks to wait for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait {
    pub min_lsn: Option<Lsn>,
    pub timeout_ms: Option<u64>,
}

/// An error answer: status, a stable code, a sentence.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    watermark: Option<Lsn>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            watermark: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn with_watermark(mut self, watermark: Lsn) -> ApiError {
        self.watermark = Some(watermark);
        self
    }

    fn read(e: ReadError) -> ApiError {
        match e {
            ReadError::UnknownFile(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_file", e.to_string())
            }
            ReadError::NotReady(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(w) = self.watermark {
            body["watermark"] = w.to_string().into();
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    min_lsn: Option<String>,
    timeout_ms: Option<u64>,
}

impl WaitQuery {
    fn wait(query: Result<Query<WaitQuery>, QueryRejection>) -> Result<Wait, ApiError> {
        let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
        Ok(Wait {
            min_lsn: q
                .min_lsn
                .map(|s| parse_lsn(&Value::String(s)))
                .transpose()?,
            timeout_ms: q.timeout_ms,
        })
    }
}

/// `min_lsn` as `X/Y` text, or the LSN as an integer (a JSON number or digits).
pub fn parse_lsn(v: &Value) -> Result<Lsn, ApiError> {
    let parsed = match v {
        Value::Number(n) => n.as_u64().map(Lsn::new),
        Value::String(s) if s.contains('/') => s.parse().ok(),
        Value::String(s) => s.trim().parse::<u64>().ok().map(Lsn::new),
        _ => None,
    };
    parsed.ok_or_else(|| {
        ApiError::bad_request(
            "bad_min_lsn",
            format!("min_lsn {v} is not an LSN (`X/Y` as pg_current_wal_lsn() prints it, or an integer)"),
        )
    })
}

fn key_kind(text: bool) -> &'static str {
    if text {
        "a text"
    } else {
        "an integer"
    }
}

fn json_key(text: bool, v: &Value) -> Option<Key> {
    match (text, v) {
        (true, Value::String(s)) => Some(Key::Text(s.as_str().into())),
        (true, Value::Number(n)) => Some(Key::Text(n.to_string().into())),
        (false, Value::Number(n)) => n.as_i64().map(Key::Int),
        (false, Value::String(s)) => s.trim().parse().ok().map(Key::Int),
        _ => None,
    }
}

pub fn key_json(key: &Key) -> Value {
    match key {
        Key::Int(i) => (*i).into(),
        Key::Text(s) => s.as_ref().into(),
        Key::Null => Value::Null,
        Key::Tuple(parts) => parts.iter().map(key_json).collect(),
    }
}

/// An entity's row as the API shows it (without the watermark).
pub fn row_json(row: &OnlineRow) -> Value {
    json!({
        "key": key_json(&row.key),
        "features": row.features,
        "feature_time": date_text(row.feature_time),
        "lsn": row.lsn.to_string(),
    })
}

async fn get_one(
    State(api): State<Api>,
    Path((file, key)): Path<(String, String)>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let wait = WaitQuery::wait(query)?;
    let text = api.online().text_keys(&file).map_err(ApiError::read)?;
    let parsed = json_key(text, &Value::String(key.clone())).ok_or_else(|| {
        ApiError::bad_request(
            "bad_key",
            format!(
                "key `{key}` is not {} key of feature file {file}",
                key_kind(text)
            ),
        )
    })?;
    let (watermark, rows) = api.read(&file, std::slice::from_ref(&parsed), wait).await?;
    let Some(row) = rows.into_iter().next().flatten() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_entity",
            format!("feature file {file} has no entity {key}"),
        )
        .with_watermark(watermark));
    };
    let mut body = row_json(&row);
    body["watermark"] = watermark.to_string().into();
    Ok(axum::Json(body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManyRequest {
    keys: Vec<Value>,
    #[serde(default)]
    min_lsn: Option<Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

async fn post_many(
    State(api): State<Api>,
    Path(file): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ManyRequest = api.json_body(body)?;
    let max = api.config().max_keys;
    if req.keys.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_keys",
            format!("{} keys asked, serve.max_keys is {max}", req.keys.len()),
        ));
    }
    let mut wait = WaitQuery::wait(query)?;
    if let Some(v) = &req.min_lsn {
        wait.min_lsn = Some(parse_lsn(v)?);
    }
    wait.timeout_ms = req.timeout_ms.or(wait.timeout_ms);
    let keys = api.parse_keys(&file, &req.keys)?;
    let (watermark, rows) = api.read(&file, &keys, wait).await?;
    let mut missing = Vec::new();
    let rows: Vec<Value> = keys
        .iter()
        .zip(rows)
        .map(|(k, row)| match row {
            Some(r) => {
                let mut v = row_json(&r);
                v["found"] = true.into();
                v
            }
            None => {
                missing.push(key_json(k));
                json!({"key": key_json(k), "found": false})
            }
        })
        .collect();
    Ok(axum::Json(json!({
        "rows": rows,
        "missing": missing,
        "watermark": watermark.to_string(),
    }))
    .into_response())
}

async fn health(State(api): State<Api>) -> Response {
    let online = api.online();
    let phase = online.phase();
    let reason = phase.reason();
    let status = match reason {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = json!({
        "live": true,
        "ready": reason.is_none(),
        "reason": reason,
        "watermark": online.watermark().to_string(),
        "entities": online.sizes().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    });
    (status, axum::Json(body)).into_response()
}

async fn live() -> Response {
    axum::Json(json!({"live": true})).into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    let online = api.online();
    metrics::gauge!(crate::metrics::WATERMARK_LSN).set(online.watermark().as_u64() as f64);
    for (file, n) in online.sizes() {
        metrics::gauge!(crate::metrics::ONLINE_ENTITIES, "file" => file).set(n as f64);
    }
    match &api.inner.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "no_metrics",
            "no metrics recorder is installed in this process",
        )
        .into_response(),
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

/// Bearer token check (constant time), when one is configured.
async fn auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    let want = api.config().token.as_bytes();
    if want.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::as_bytes);
    match given {
        Some(g)
            if g.len() == want.len()
                && g.iter().zip(want).fold(0, |a, (x, y)| a | (x ^ y)) == 0 =>
        {
            next.run(req).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong bearer token",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this API needs `Authorization: Bearer <token>`",
        )
        .into_response(),
    }
}

/// At most `serve.max_in_flight` requests at once; the rest are refused at once rather
/// than queued, so memory stays bounded and the pipeline keeps its share of the cores.
async fn shed(State(api): State<Api>, req: Request, next: Next) -> Response {
    let Ok(_permit) = api.inner.in_flight.clone().try_acquire_owned() else {
        metrics::counter!(crate::metrics::SHED).increment(1);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{} requests are in flight (serve.max_in_flight); try again",
                api.config().max_in_flight
            ),
        )
        .into_response();
    };
    next.run(req).await
}

async fn record(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    metrics::histogram!(crate::metrics::HTTP_SECONDS,
        "route" => route, "status" => response.status().as_u16().to_string())
    .record(started.elapsed().as_secs_f64());
    response
}

/// Binds the configured address (a start-up error if it cannot).
pub async fn bind(config: &ServeConfig) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.addr()).await
}

/// Serves `router` on `listener` until `cancel`; requests in flight then get [`DRAIN`]
/// to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving the online API");
    let listener = limit::Limited::new(listener, max_connections);
    let shutdown = cancel.clone();
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await });
    tokio::select! {
        r = server => r,
        _ = async { cancel.cancelled().await; tokio::time::sleep(DRAIN).await } => Ok(()),
    }
}

/// A listener that holds at most `max` connections open (further ones wait in the
/// accept queue), turns Nagle off on each, so small answers leave at once, and closes a
/// connection that neither reads nor writes for [`IDLE`](limit::IDLE), so idle or
/// stalled clients cannot hold every connection.
mod limit {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{OwnedSemaphorePermit, Semaphore};
    use tokio::time::{Instant, Sleep};

    /// Longer than any wait a request may ask for (`serve.max_wait_ms` ≤ 60 s).
    pub(super) const IDLE: Duration = Duration::from_secs(120);

    pub(super) struct Limited {
        inner: TcpListener,
        permits: Arc<Semaphore>,
    }

    impl Limited {
        pub(super) fn new(inner: TcpListener, max: usize) -> Limited {
            Limited {
                inner,
                permits: Arc::new(Semaphore::new(max)),
            }
        }
    }

    pub(super) struct Conn {
        stream: TcpStream,
        _permit: OwnedSemaphorePermit,
        idle: Pin<Box<Sleep>>,
    }

    impl Conn {
        /// Pushes the idle deadline on after progress.
        fn touch<T>(&mut self, r: Poll<T>) -> Poll<T> {
            if r.is_ready() {
                self.idle.as_mut().reset(Instant::now() + IDLE);
            }
            r
        }

        /// Pending, unless the connection has been idle too long.
        fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
            match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle too long",
                ))),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    impl axum::serve::Listener for Limited {
        type Io = Conn;
        type Addr = std::net::SocketAddr;

        async fn accept(&mut self) -> (Conn, std::net::SocketAddr) {
            let permit = self
                .permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            loop {
                match self.inner.accept().await {
                    Ok((stream, addr)) => {
                        let _ = stream.set_nodelay(true);
                        return (
                            Conn {
                                stream,
                                _permit: permit,
                                idle: Box::pin(tokio::time::sleep(IDLE)),
                            },
                            addr,
                        );
                    }
                    // Out of file descriptors and the like: wait instead of spinning.
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }

        fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
            self.inner.local_addr()
        }
    }

    impl AsyncRead for Conn {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            match Pin::new(&mut this.stream).poll_read(cx, buf) {
                Poll::Pending => this.pending(cx),
                r => this.touch(r),
            }
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            match Pin::new(&mut this.stream).poll_write(cx, buf) {
                Poll::Pending => this.pending(cx),
                r => this.touch(r),
            }
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
                Poll::Pending => this.pending(cx),
                r => this.touch(r),
            }
        }

        fn is_write_vectored(&self) -> bool {
            self.stream.is_write_vectored()
        }
    }
}
