//! The HTTP endpoint: `/metrics`, health and readiness, a landing page.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{aggregate::Aggregator, web_config::WebSecurity};

pub struct HttpState {
    pub aggregator: Arc<Mutex<Aggregator>>,
    pub telemetry_path: String,
    pub security: WebSecurity,
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

pub async fn serve(listener: TcpListener, state: Arc<HttpState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // EMFILE and friends: keep serving once the pressure is gone.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            match state.security.tls.clone() {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => serve_connection(TokioIo::new(tls), state).await,
                    // Plain HTTP to a TLS port, or a bad handshake: nothing to answer.
                    Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                },
                None => serve_connection(TokioIo::new(stream), state).await,
            }
        });
    }
}

async fn serve_connection<I>(io: I, state: Arc<HttpState>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(respond(&state, &request)) }
    });
    if let Err(e) = http1::Builder::new().serve_connection(io, service).await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

fn respond<B>(state: &HttpState, request: &Request<B>) -> Response<Full<Bytes>> {
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
    if !state.security.authorized(authorization) {
        let mut response = text(StatusCode::UNAUTHORIZED, "text/plain", "Unauthorized\n".to_owned());
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"mapcountd\""));
        return response;
    }
    let path = request.uri().path();
    if path == state.telemetry_path {
        let body = {
            let aggregator = state.aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            aggregator.publish_metrics();
            aggregator.metrics().render()
        };
        return text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body);
    }
    if path == "/debug/folios" {
        // The folios one process maps, for tests and for looking closer.
        // Folios are named by the daemon's serial number, never an address.
        let tgid =
            request.uri().query().and_then(|q| q.strip_prefix("tgid=")).and_then(|t| t.parse::<u32>().ok());
        let Some(tgid) = tgid else {
            return text(StatusCode::BAD_REQUEST, "text/plain", "usage: /debug/folios?tgid=N\n".to_owned());
        };
        let aggregator = state.aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        return text(StatusCode::OK, "text/plain", aggregator.describe_tgid(tgid));
    }
    match path {
        "/-/healthy" | "/-/ready" => text(StatusCode::OK, "text/plain", "OK\n".to_owned()),
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
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}
