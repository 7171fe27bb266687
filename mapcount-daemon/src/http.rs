//! The HTTP endpoint: `/metrics`, health and readiness, a landing page.
//!
//! mapcountd listens on all interfaces of hosts that run for months, so
//! the endpoint has to stay answerable whatever a client does. Every
//! connection holds a descriptor: their number is capped below the
//! descriptor limit, and at the cap the connection that has waited
//! longest for its next request makes room (a scrape that just arrived
//! is the last to go). A connection that sends no complete request within
//! the idle timeout, or no complete header within the header timeout, or
//! no TLS handshake within the handshake timeout, is closed. Requests in
//! flight are capped too, as node_exporter's `--web.max-requests` does.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Bytes, Frame, SizeHint},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Notify};

use crate::{log_limit::Throttle, metrics::Metrics, web_config::WebSecurity};

/// How much a misbehaving client may hold. The defaults serve a host
/// scraped by a few Prometheus servers with room to spare.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Open connections, each one descriptor.
    pub max_connections: usize,
    /// Requests being answered at once; beyond it, 503.
    pub max_requests: usize,
    /// From the first byte of a request to the end of its header.
    pub header_read_timeout: Duration,
    /// From the connection or its last request to its next request.
    pub idle_timeout: Duration,
    /// From accept to the end of the TLS handshake.
    pub tls_handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_requests: 40,
            header_read_timeout: Duration::from_secs(10),
            // Longer than Prometheus's longest usual scrape interval (1 m),
            // so its keep-alive connection is not closed between scrapes.
            idle_timeout: Duration::from_secs(90),
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What the endpoint serves, without knowing where it comes from.
pub trait Exposition: Send + Sync {
    /// The metrics in the Prometheus text format, as of now.
    fn metrics_text(&self) -> String;
    /// One process's folios (`/debug/folios?tgid=N`), at most `max_rows` rows.
    fn folios_of(&self, tgid: u32, max_rows: usize) -> String;
    /// What smaps, pagemap and kpagecount report for one process's mappings
    /// of folios starting in `[from, to)`, exact and without per-page
    /// mapcounts (`/debug/smaps?tgid=N&from=A&to=B`).
    fn smaps_of(&self, tgid: u32, from: u64, to: u64) -> String;
}

pub struct HttpState {
    exposition: Arc<dyn Exposition>,
    metrics: Arc<Metrics>,
    telemetry_path: String,
    security: WebSecurity,
    limits: Limits,
    /// Requests being answered, up to the moment their body is written.
    in_flight: Arc<AtomicUsize>,
    /// `/debug/folios` walks the whole table with the ingest loop stopped.
    /// After a walk that took `t`, the next waits `9 t`: however often it
    /// is asked, it takes at most a tenth of the daemon's time.
    debug_walk_allowed_at: Mutex<Option<Instant>>,
}

impl HttpState {
    pub fn new(
        exposition: Arc<dyn Exposition>,
        metrics: Arc<Metrics>,
        telemetry_path: String,
        security: WebSecurity,
        limits: Limits,
    ) -> Self {
        Self {
            exposition,
            metrics,
            telemetry_path,
            security,
            limits,
            in_flight: Arc::default(),
            debug_walk_allowed_at: Mutex::new(None),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    // The I/O error is part of the message, not a separate source, so that
    // it is printed once.
    #[error("cannot listen on {addr}: {error}{hint}", hint = if error.kind() == std::io::ErrorKind::AddrInUse { "; another process holds the port: stop it or pass --web.listen-address" } else { "" })]
    Bind { addr: SocketAddr, error: std::io::Error },
}

/// Binds before anything is loaded into the kernel, so a port in use fails fast.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr).await.map_err(|error| HttpError::Bind { addr, error })
}

/// Why the daemon closed a connection itself (`mapcount_http_connections_closed_total`).
const CLOSE_REASONS: &[&str] =
    &["connection_limit", "idle_timeout", "header_read_timeout", "tls_handshake_timeout"];

/// The open connections: when each last started a request, and how to
/// close it.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, Open>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Open {
    peer: IpAddr,
    /// Accepted, or the last request's header complete.
    last_request: Instant,
    /// The first byte of a request (or TLS handshake) whose header is not
    /// complete yet.
    reading_since: Option<Instant>,
    close: Arc<Notify>,
}

/// What [`Connections::close_stalled`] closed.
#[derive(Debug, Default, PartialEq)]
struct Closed {
    idle: u64,
    slow_header: u64,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, peer: IpAddr) -> (u64, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        let open =
            Open { peer, last_request: Instant::now(), reading_since: None, close: Arc::clone(&close) };
        self.lock().insert(id, open);
        (id, close)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn request_started(&self, id: u64) {
        if let Some(open) = self.lock().get_mut(&id) {
            open.last_request = Instant::now();
            open.reading_since = None;
        }
    }

    /// Bytes arrived: the start of a request's header, unless one is being read.
    fn bytes_arrived(&self, id: u64) {
        if let Some(open) = self.lock().get_mut(&id) {
            open.reading_since.get_or_insert_with(Instant::now);
        }
    }

    /// Closes the connection that has waited longest for a request among
    /// those of the address that holds the most.
    fn close_idlest(&self) {
        let mut open = self.lock();
        let mut per_peer: HashMap<IpAddr, usize> = HashMap::new();
        for o in open.values() {
            *per_peer.entry(o.peer).or_default() += 1;
        }
        let Some(greediest) = per_peer.into_iter().max_by_key(|&(_, n)| n).map(|(peer, _)| peer) else {
            return;
        };
        let idlest = open
            .iter()
            .filter(|(_, o)| o.peer == greediest)
            .min_by_key(|(_, o)| o.last_request)
            .map(|(id, _)| *id);
        if let Some(closed) = idlest.and_then(|id| open.remove(&id)) {
            // A stored permit: the task sees it even if it is not waiting yet.
            closed.close.notify_one();
        }
    }

    /// Closes the connections that sent no byte of a request for
    /// `idle_timeout`, and those that began a header `header_timeout` ago
    /// and have not finished it.
    fn close_stalled(&self, now: Instant, idle_timeout: Duration, header_timeout: Duration) -> Closed {
        let mut closed = Closed::default();
        let older = |t: Instant, limit: Duration| now.checked_duration_since(t).is_some_and(|d| d >= limit);
        self.lock().retain(|_, o| {
            let (idle, slow_header) = match o.reading_since {
                Some(since) => (false, older(since, header_timeout)),
                None => (older(o.last_request, idle_timeout), false),
            };
            closed.idle += u64::from(idle);
            closed.slow_header += u64::from(slow_header);
            if idle || slow_header {
                o.close.notify_one();
            }
            !(idle || slow_header)
        });
        closed
    }
}

pub async fn serve(listener: TcpListener, state: Arc<HttpState>) {
    let connections = Arc::new(Connections::default());
    let limits = state.limits;
    // Every reason shows from the start, at 0, so that rate() sees the first one.
    for reason in CLOSE_REASONS {
        state.metrics.http_connections_closed.with_label_values(&[reason]);
    }
    tokio::spawn(close_stalled(Arc::clone(&connections), Arc::clone(&state.metrics), limits));
    // EMFILE and friends repeat for as long as the pressure lasts: one
    // line per minute, with the count of the others.
    let mut accept_failures = Throttle::new(Duration::from_secs(60));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                state.metrics.http_accept_failures.inc();
                if let Some(suppressed) = accept_failures.allow(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "accepting an HTTP connection failed");
                } else {
                    state.metrics.log_lines_suppressed.inc();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if connections.len() >= limits.max_connections {
            connections.close_idlest();
            state.metrics.http_connections_closed.with_label_values(&["connection_limit"]).inc();
        }
        let (id, close) = connections.add(peer.ip());
        let state = Arc::clone(&state);
        let connections = Arc::clone(&connections);
        tokio::spawn(async move {
            state.metrics.http_connections_open.inc();
            tokio::select! {
                () = accept_and_serve(stream, id, &state, &connections) => {}
                // Closed to make room or for idling: dropping the connection closes it.
                () = close.notified() => {}
            }
            connections.remove(id);
            state.metrics.http_connections_open.dec();
        });
    }
}

async fn accept_and_serve(
    stream: tokio::net::TcpStream,
    id: u64,
    state: &Arc<HttpState>,
    connections: &Arc<Connections>,
) {
    let stream = Watched { inner: stream, id, connections: Arc::clone(connections) };
    match state.security.tls.clone() {
        Some(acceptor) => {
            match tokio::time::timeout(state.limits.tls_handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_connection(TokioIo::new(tls), id, state, connections).await,
                // Plain HTTP to a TLS port, or a bad handshake: nothing to answer.
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => {
                    state.metrics.http_connections_closed.with_label_values(&["tls_handshake_timeout"]).inc();
                }
            }
        }
        None => serve_connection(TokioIo::new(stream), id, state, connections).await,
    }
}

/// Four times a second, closes the idle connections and those that
/// stalled inside a header. (hyper's own header timeout also runs while a
/// kept-alive connection waits for its next request, which would close
/// Prometheus's connection between scrapes.)
async fn close_stalled(connections: Arc<Connections>, metrics: Arc<Metrics>, limits: Limits) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let closed =
            connections.close_stalled(Instant::now(), limits.idle_timeout, limits.header_read_timeout);
        metrics.http_connections_closed.with_label_values(&["idle_timeout"]).inc_by(closed.idle);
        metrics
            .http_connections_closed
            .with_label_values(&["header_read_timeout"])
            .inc_by(closed.slow_header);
    }
}

/// A connection's byte stream, reporting each arrival of bytes.
struct Watched<S> {
    inner: S,
    id: u64,
    connections: Arc<Connections>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.connections.bytes_arrived(self.id);
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn serve_connection<I>(io: I, id: u64, state: &Arc<HttpState>, connections: &Arc<Connections>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = {
        let state = Arc::clone(state);
        let connections = Arc::clone(connections);
        service_fn(move |request| {
            connections.request_started(id);
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(respond_limited(&state, &request)) }
        })
    };
    let served = http1::Builder::new().serve_connection(io, service).await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// A response body that counts as in flight until hyper has sent it.
pub struct CountedBody {
    inner: Full<Bytes>,
    _in_flight: Option<InFlight>,
}

/// One request in flight, for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>, max: usize) -> Option<InFlight> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(InFlight(Arc::clone(count)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn respond_limited<B>(state: &HttpState, request: &Request<B>) -> Response<CountedBody> {
    let Some(in_flight) = InFlight::enter(&state.in_flight, state.limits.max_requests) else {
        state.metrics.http_requests_rejected.with_label_values(&["max_requests"]).inc();
        let mut response =
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "too many requests in flight\n");
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response.map(|inner| CountedBody { inner, _in_flight: None });
    };
    respond(state, request).map(|inner| CountedBody { inner, _in_flight: Some(in_flight) })
}

/// The most rows `/debug/folios` writes; the table can hold millions.
pub const DEBUG_FOLIOS_MAX_ROWS: usize = 100_000;

fn respond<B>(state: &HttpState, request: &Request<B>) -> Response<Full<Bytes>> {
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
    if !state.security.authorized(authorization) {
        let mut response = text(StatusCode::UNAUTHORIZED, "text/plain", "Unauthorized\n");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"mapcountd\""));
        return response;
    }
    let path = request.uri().path();
    if path == state.telemetry_path {
        return text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.exposition.metrics_text(),
        );
    }
    if path == "/debug/folios" || path == "/debug/smaps" {
        return debug_walk(state, path, request.uri().query());
    }
    match path {
        "/-/healthy" | "/-/ready" => text(StatusCode::OK, "text/plain", "OK\n"),
        "/" => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            format!(
                "<html><head><title>mapcountd</title></head><body><h1>mapcountd</h1>\
                 <p>How folios are mapped, measured from the kernel's rmap calls.</p>\
                 <p><a href=\"{0}\">{0}</a></p></body></html>\n",
                state.telemetry_path
            ),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The debug views, for tests and for looking closer: `/debug/folios`, the
/// folios one process maps, named by the daemon's serial number (never an
/// address); `/debug/smaps`, what smaps reports for them.
fn debug_walk(state: &HttpState, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
    let Some(query) = DebugQuery::parse(query.unwrap_or("")) else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "usage: /debug/folios?tgid=N, /debug/smaps?tgid=N[&from=ADDRESS&to=ADDRESS]\n",
        );
    };
    let mut allowed_at = state.debug_walk_allowed_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = Instant::now();
    if let Some(at) = *allowed_at
        && now < at
    {
        state.metrics.http_requests_rejected.with_label_values(&["debug_walk_budget"]).inc();
        let mut response =
            text(StatusCode::TOO_MANY_REQUESTS, "text/plain", "the table was walked a moment ago; retry\n");
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    }
    let body = if path == "/debug/smaps" {
        state.exposition.smaps_of(query.tgid, query.from, query.to)
    } else {
        state.exposition.folios_of(query.tgid, DEBUG_FOLIOS_MAX_ROWS)
    };
    *allowed_at = Some(Instant::now() + now.elapsed() * 9);
    text(StatusCode::OK, "text/plain", body)
}

/// `tgid=N`, and optionally a range of user addresses `from=A&to=B`
/// (decimal, or hexadecimal with `0x`); the whole address space by default.
#[derive(Debug, PartialEq, Eq)]
struct DebugQuery {
    tgid: u32,
    from: u64,
    to: u64,
}

impl DebugQuery {
    fn parse(query: &str) -> Option<Self> {
        let number = |v: &str| match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        };
        let (mut tgid, mut from, mut to) = (None, 0, u64::MAX);
        for pair in query.split('&') {
            match pair.split_once('=')? {
                ("tgid", v) => tgid = Some(v.parse().ok()?),
                ("from", v) => from = number(v)?,
                ("to", v) => to = number(v)?,
                _ => return None,
            }
        }
        Some(Self { tgid: tgid?, from, to })
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_queries() {
        use super::DebugQuery;
        assert_eq!(DebugQuery::parse("tgid=7"), Some(DebugQuery { tgid: 7, from: 0, to: u64::MAX }));
        assert_eq!(
            DebugQuery::parse("tgid=7&from=0x7f0000200000&to=140737488355328"),
            Some(DebugQuery { tgid: 7, from: 0x7f00_0020_0000, to: 1 << 47 })
        );
        for bad in ["", "tgid=x", "from=1", "tgid=1&size=2", "tgid=1&to=0xz"] {
            assert_eq!(DebugQuery::parse(bad), None, "{bad}");
        }
    }

    use super::*;

    const FLOODER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const SCRAPER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn the_idlest_connection_makes_room() {
        let connections = Connections::default();
        let (first, _) = connections.add(FLOODER);
        let (second, _) = connections.add(FLOODER);
        std::thread::sleep(Duration::from_millis(2));
        connections.request_started(first);
        connections.close_idlest();
        assert_eq!(connections.len(), 1);
        // The second never sent a request: it goes, the first stays.
        assert!(connections.lock().contains_key(&first));
        assert!(!connections.lock().contains_key(&second));
    }

    #[test]
    fn a_flood_pushes_out_only_its_own_connections() {
        let connections = Connections::default();
        let (scrape, _) = connections.add(SCRAPER);
        for _ in 0..10 {
            connections.add(FLOODER);
        }
        for _ in 0..100 {
            connections.close_idlest();
            connections.add(FLOODER);
        }
        assert!(connections.lock().contains_key(&scrape));
    }

    #[test]
    fn idle_and_slow_connections_close_after_their_timeouts() {
        let connections = Connections::default();
        let (idle, _) = connections.add(FLOODER);
        let (slow, _) = connections.add(FLOODER);
        connections.bytes_arrived(slow);
        let (kept_alive, _) = connections.add(SCRAPER);
        connections.bytes_arrived(kept_alive);
        connections.request_started(kept_alive);
        let start = Instant::now();
        let (idle_timeout, header_timeout) = (Duration::from_secs(90), Duration::from_secs(10));
        let closed = connections.close_stalled(start + Duration::from_secs(11), idle_timeout, header_timeout);
        assert_eq!(closed, Closed { idle: 0, slow_header: 1 });
        assert!(!connections.lock().contains_key(&slow));
        // A kept-alive connection waits for its next request as long as a fresh one.
        let closed = connections.close_stalled(start + Duration::from_secs(91), idle_timeout, header_timeout);
        assert_eq!(closed, Closed { idle: 2, slow_header: 0 });
        assert!(!connections.lock().contains_key(&idle));
        assert_eq!(connections.len(), 0);
    }

    #[test]
    fn requests_in_flight_are_capped() {
        let count = Arc::default();
        let a = InFlight::enter(&count, 2).expect("first");
        let b = InFlight::enter(&count, 2).expect("second");
        assert!(InFlight::enter(&count, 2).is_none());
        drop(a);
        assert!(InFlight::enter(&count, 2).is_some());
        drop(b);
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }
}
