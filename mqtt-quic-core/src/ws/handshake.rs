//! The WebSocket opening handshake (RFC 6455 §4) with MQTT's subprotocol rule: the client
//! offers `mqtt` and the server answers with it [MQTT-6.0.0-3], [MQTT-6.0.0-4]. HTTP is parsed by
//! httparse; the accept key is tungstenite's.

use super::WsError;
use bytes::Bytes;

/// The most a handshake request or response may take before it is refused: a browser's
/// upgrade request, cookies included, fits comfortably.
pub const MAX_HTTP: usize = 8 * 1024;
/// The most headers read.
const MAX_HEADERS: usize = 48;

/// The subprotocols a broker accepts, best first: `mqtt` (MQTT 3.1.1 and 5) and `mqttv3.1`,
/// which MQTT 3.1 clients (and old Paho JavaScript) offer.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// A request the broker refuses, with the HTTP answer that says why.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) response: Bytes,
    pub(crate) error: WsError,
}

fn refuse(status: &str, why: String, extra: &str) -> Refusal {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{why}",
        why.len()
    );
    Refusal { response: Bytes::from(response), error: WsError::Upgrade(why) }
}

/// The value of a header, if the request or response has it (names are case-insensitive).
fn header<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok())
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Reads a client's upgrade request from what came so far. `Ok(None)`: incomplete. `Ok(Some)`:
/// the 101 answer and how many bytes the request took (frames may follow in the same read).
pub(crate) fn accept(buf: &[u8], path: &str) -> Result<Option<(Bytes, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let used = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HTTP => return Ok(None),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse("431 Request Header Fields Too Large", "request too large".into(), ""))
        }
        Err(e) => return Err(refuse("400 Bad Request", format!("not an HTTP request: {e}"), "")),
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return Err(refuse("400 Bad Request", "a WebSocket upgrade is a GET over HTTP/1.1".into(), ""));
    }
    let asked = request.path.unwrap_or("/");
    let asked = asked.split_once('?').map_or(asked, |(p, _)| p);
    if asked != path {
        return Err(refuse("404 Not Found", format!("no MQTT endpoint at {asked} (it is at {path})"), ""));
    }
    let headers = request.headers;
    if !has_token(header(headers, "Upgrade"), "websocket") || !has_token(header(headers, "Connection"), "upgrade") {
        return Err(refuse("400 Bad Request", "not a WebSocket upgrade".into(), ""));
    }
    if header(headers, "Sec-WebSocket-Version").map(str::trim) != Some("13") {
        let why = "unsupported WebSocket version (13 is)".to_string();
        return Err(refuse("426 Upgrade Required", why, "Sec-WebSocket-Version: 13\r\n"));
    }
    let Some(key) = header(headers, "Sec-WebSocket-Key").map(str::trim).filter(|k| !k.is_empty()) else {
        return Err(refuse("400 Bad Request", "no Sec-WebSocket-Key".into(), ""));
    };
    let offered = header(headers, "Sec-WebSocket-Protocol");
    let Some(protocol) = SUBPROTOCOLS.into_iter().find(|p| has_token(offered, p)) else {
        let why = format!("the client must offer the subprotocol mqtt (it offered {})", offered.unwrap_or("none"));
        return Err(refuse("400 Bad Request", why, ""));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    );
    Ok(Some((Bytes::from(response), used)))
}

/// A client's upgrade request for `path` on `authority` (the Host header), with its key.
pub(crate) fn request(authority: &str, path: &str, key: &str) -> Bytes {
    Bytes::from(format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    ))
}

/// Reads the server's answer to [`request`]. `Ok(None)`: incomplete. `Ok(Some(n))`: upgraded;
/// the answer took `n` bytes (frames may follow).
pub(crate) fn check_response(buf: &[u8], key: &str) -> Result<Option<usize>, WsError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let used = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HTTP => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(WsError::Upgrade("the server's answer is too large".into())),
        Err(e) => return Err(WsError::Upgrade(format!("the server's answer is not HTTP: {e}"))),
    };
    if response.code != Some(101) {
        let (code, reason) = (response.code.unwrap_or(0), response.reason.unwrap_or(""));
        return Err(WsError::Upgrade(format!("the server refused the upgrade: HTTP {code} {reason}")));
    }
    let headers = response.headers;
    if !has_token(header(headers, "Upgrade"), "websocket") || !has_token(header(headers, "Connection"), "upgrade") {
        return Err(WsError::Upgrade("the server's 101 is not a WebSocket upgrade".into()));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if header(headers, "Sec-WebSocket-Accept").map(str::trim) != Some(expected.as_str()) {
        return Err(WsError::Upgrade("the server's Sec-WebSocket-Accept does not match the key".into()));
    }
    // [MQTT-6.0.0-4]: the server selects mqtt. A server that names none is taken at its word
    // that it speaks MQTT (some do not echo it); one that names another is refused.
    match header(headers, "Sec-WebSocket-Protocol").map(str::trim) {
        None => {}
        Some(p) if SUBPROTOCOLS.iter().any(|s| s.eq_ignore_ascii_case(p)) => {}
        Some(p) => return Err(WsError::Upgrade(format!("the server chose the subprotocol {p}, not mqtt"))),
    }
    Ok(Some(used))
}
