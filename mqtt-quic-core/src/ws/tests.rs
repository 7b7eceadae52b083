use super::*;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

const REQUEST: &str = "GET /mqtt HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: wamp, mqtt\r\n\r\n";

/// A server and a client that have completed the handshake.
fn pair() -> (WsConn, WsConn) {
    let mut client = WsConn::client("b:8083", "/mqtt", 1);
    let mut server = WsConn::server("/mqtt");
    let mut sink = Vec::new();
    server.receive(&client.poll_output().unwrap(), &mut sink).unwrap();
    client.receive(&server.poll_output().unwrap(), &mut sink).unwrap();
    assert!(sink.is_empty() && client.is_open() && server.is_open());
    (server, client)
}

fn all_output(conn: &mut WsConn) -> Vec<u8> {
    std::iter::from_fn(|| conn.poll_output()).flat_map(|b| b.to_vec()).collect()
}

/// RFC 6455 §1.3's worked example: the key and the accept value it must give.
#[test]
fn the_server_answers_the_rfc_example_with_its_accept_key_and_mqtt() {
    let mut server = WsConn::server("/mqtt");
    let mut mqtt = Vec::new();
    server.receive(REQUEST.as_bytes(), &mut mqtt).unwrap();
    let answer = String::from_utf8(all_output(&mut server)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{answer}");
    assert!(answer.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{answer}");
    assert!(server.is_open());
}

#[test]
fn a_request_in_pieces_with_a_frame_behind_it() {
    let mut client = WsConn::client("b:8083", "/mqtt", 9);
    let mut server = WsConn::server("/mqtt");
    let mut wire = client.poll_output().unwrap().to_vec();
    let _ = client.frame(b"unused"); // the mask stream moves on; the server must not care
    wire.extend_from_slice(&client.frame(&[0x10, 0x02, 0xAB, 0xCD]));
    let mut mqtt = Vec::new();
    for byte in &wire {
        server.receive(std::slice::from_ref(byte), &mut mqtt).unwrap();
    }
    assert_eq!(mqtt, [0x10, 0x02, 0xAB, 0xCD]);
}

#[test]
fn packets_may_span_frames_and_frames_may_hold_several() {
    let (mut server, mut client) = pair();
    let mut mqtt = Vec::new();
    // Half a packet, then its rest with a whole second one, delivered a byte at a time.
    let mut wire = client.frame(&[0x30, 0x05, 0x00]).to_vec();
    wire.extend_from_slice(&client.frame(&[0x01, b't', b'x', b'y', 0xC0, 0x00]));
    for byte in &wire {
        server.receive(std::slice::from_ref(byte), &mut mqtt).unwrap();
    }
    assert_eq!(mqtt, [0x30, 0x05, 0x00, 0x01, b't', b'x', b'y', 0xC0, 0x00]);
    // The server's frames are unmasked and read back by the client.
    let mut back = Vec::new();
    let big = vec![7u8; 70_000]; // a 64-bit length
    client.receive(&server.frame(&big), &mut back).unwrap();
    assert_eq!(back, big);
}

#[test]
fn fragmented_messages_continue_and_out_of_order_continuations_are_refused() {
    let (mut server, _) = pair();
    let mask = [1, 2, 3, 4];
    let first = frames::frame(OpCode::Data(Data::Binary), b"ab", Some(mask));
    let mut first = first.to_vec();
    first[0] &= 0x7F; // not final
    let cont = frames::frame(OpCode::Data(Data::Continue), b"cd", Some(mask));
    let mut mqtt = Vec::new();
    server.receive(&first, &mut mqtt).unwrap();
    server.receive(&cont, &mut mqtt).unwrap();
    assert_eq!(mqtt, b"abcd");
    let err = server.receive(&cont, &mut mqtt).unwrap_err();
    assert!(matches!(err, WsError::Frame(_)), "{err}");
    assert!(server.is_closed());
}

/// [MQTT-6.0.0-1]: a text frame closes the connection (status 1003).
#[test]
fn a_text_frame_closes_with_unsupported_data() {
    let (mut server, _) = pair();
    let text = frames::frame(OpCode::Data(Data::Text), b"{}", Some([9, 9, 9, 9]));
    assert_eq!(server.receive(&text, &mut Vec::new()), Err(WsError::Text));
    assert_eq!(all_output(&mut server), [0x88, 0x02, 0x03, 0xEB]);
    assert!(server.is_closed());
}

#[test]
fn a_client_frame_without_a_mask_is_a_protocol_error() {
    let (mut server, _) = pair();
    let err = server.receive(&frames::binary(b"x", None), &mut Vec::new()).unwrap_err();
    assert!(matches!(err, WsError::Frame(_)), "{err}");
    assert_eq!(all_output(&mut server), [0x88, 0x02, 0x03, 0xEA]);
}

#[test]
fn pings_are_answered_and_a_close_is_echoed() {
    let (mut server, mut client) = pair();
    let mut mqtt = Vec::new();
    let mask = Some([5, 6, 7, 8]);
    let ping = frames::frame(OpCode::Control(Control::Ping), b"hi", mask);
    server.receive(&ping, &mut mqtt).unwrap();
    assert_eq!(all_output(&mut server), [0x8A, 0x02, b'h', b'i']);
    client.close();
    server.receive(&client.poll_output().unwrap(), &mut mqtt).unwrap();
    assert!(server.is_closed() && mqtt.is_empty());
    assert_eq!(all_output(&mut server), [0x88, 0x02, 0x03, 0xE8]);
}

/// A header that announces an enormous payload allocates nothing: bytes pass as they come.
#[test]
fn a_frame_that_claims_exabytes_costs_only_what_arrives() {
    let (mut server, _) = pair();
    let mut wire = vec![0x82, 0xFF];
    wire.extend_from_slice(&(1u64 << 62).to_be_bytes());
    wire.extend_from_slice(&[0, 0, 0, 0]);
    wire.extend_from_slice(b"abc");
    let mut mqtt = Vec::new();
    server.receive(&wire, &mut mqtt).unwrap();
    assert_eq!(mqtt, b"abc");
    assert!(mqtt.capacity() < 1024);
}

#[test]
fn refusals_say_why_in_http() {
    let cases = [
        (REQUEST.replace("wamp, mqtt", "wamp"), "400", "subprotocol mqtt"),
        (REQUEST.replace("GET /mqtt", "GET /other"), "404", "/mqtt"),
        (REQUEST.replace("Version: 13", "Version: 8"), "426", "version"),
        (REQUEST.replace("Upgrade: websocket", "Upgrade: h2c"), "400", "not a WebSocket"),
        ("POST /mqtt HTTP/1.1\r\n\r\n".to_string(), "400", "GET"),
        ("\x10\x0c\x00\x04MQTT".to_string(), "400", "not an HTTP request"),
        (format!("GET /mqtt HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HTTP)), "431", "too large"),
    ];
    for (request, status, why) in cases {
        let mut server = WsConn::server("/mqtt");
        let err = server.receive(request.as_bytes(), &mut Vec::new()).unwrap_err();
        let answer = String::from_utf8(all_output(&mut server)).unwrap();
        assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        assert!(err.to_string().contains(why), "{err} lacks {why}");
        assert!(server.is_closed());
    }
    // A query string is not part of the path.
    let mut server = WsConn::server("/mqtt");
    server.receive(REQUEST.replace("/mqtt ", "/mqtt?x=1 ").as_bytes(), &mut Vec::new()).unwrap();
    assert!(server.is_open());
}

#[test]
fn a_client_reports_a_refused_upgrade() {
    let mut client = WsConn::client("b:8083", "/ws", 3);
    let mut server = WsConn::server("/mqtt");
    let _ = server.receive(&client.poll_output().unwrap(), &mut Vec::new());
    let err = client.receive(&all_output(&mut server), &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("HTTP 404"), "{err}");
    // A 101 whose accept key is for another request.
    let mut client = WsConn::client("b:8083", "/mqtt", 3);
    let fake = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    let err = client.receive(fake.as_bytes(), &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    // A server's frame must not be masked.
    let (_, mut client) = pair();
    assert!(client.receive(&frames::binary(b"x", Some([1, 1, 1, 1])), &mut Vec::new()).is_err());
}

/// Found in review: a Ping flood from a client that reads nothing piled up Pongs. One read's
/// Pings get one Pong (the latest), and none while the broker says the client is behind.
#[test]
fn pings_of_one_read_get_one_pong_and_none_while_the_client_is_behind() {
    let (mut server, _) = pair();
    let ping = |body: &[u8]| frames::frame(OpCode::Control(Control::Ping), body, Some([1, 2, 3, 4]));
    let mut wire = ping(b"a").to_vec();
    wire.extend_from_slice(&ping(b"b"));
    wire.extend_from_slice(&ping(b"c"));
    server.receive(&wire, &mut Vec::new()).unwrap();
    assert_eq!(all_output(&mut server), [0x8A, 0x01, b'c']);
    server.set_answer_pings(false);
    server.receive(&ping(b"d"), &mut Vec::new()).unwrap();
    assert!(server.poll_output().is_none());
    assert!(server.is_open());
}

/// Nothing after the peer's closing frame reaches MQTT; a status that may not be sent back
/// (1005, 1006, 1015, below 1000) is answered with Normal; a 1-byte closing body is an error.
#[test]
fn a_closing_frame_ends_the_input_and_only_valid_statuses_are_echoed() {
    let (mut server, mut client) = pair();
    let mut wire = frames::close(1006, Some([7, 7, 7, 7])).to_vec();
    wire.extend_from_slice(&client.frame(&[0xC0, 0x00]));
    let mut mqtt = Vec::new();
    server.receive(&wire, &mut mqtt).unwrap();
    assert!(mqtt.is_empty() && server.is_closed());
    assert_eq!(all_output(&mut server), [0x88, 0x02, 0x03, 0xE8]);
    let (mut server, _) = pair();
    server.receive(&frames::close(4001, Some([0, 0, 0, 0])), &mut Vec::new()).unwrap();
    assert_eq!(all_output(&mut server), [0x88, 0x02, 0x0F, 0xA1]);
    let (mut server, _) = pair();
    let one_byte = frames::frame(OpCode::Control(Control::Close), &[3], Some([0, 0, 0, 0]));
    assert!(matches!(server.receive(&one_byte, &mut Vec::new()), Err(WsError::Frame(_))));
}

/// The key and masks come from SHA-256 of the seed: two seeds give unrelated keys, one seed
/// the same ones (simulations replay).
#[test]
fn client_keys_and_masks_follow_the_seed_only() {
    let request = |seed| WsConn::client("b", "/mqtt", seed).poll_output().unwrap();
    assert_eq!(request(1), request(1));
    assert_ne!(request(1), request(2));
    let mut a = WsConn::client("b", "/mqtt", 1);
    let (f1, f2) = (a.frame(b"x"), a.frame(b"x"));
    assert_ne!(f1[2..6], f2[2..6], "each frame its own mask");
}
