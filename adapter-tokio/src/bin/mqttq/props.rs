//! mosquitto_pub/sub's `-D command identifier value` (MQTT 5 properties) and `-L URL`.

use bytes::Bytes;
use mqtt_proto::{ConnectProperties, MqttString, PublishProperties, TopicName, WillProperties};

/// The `-D` properties given, by packet.
#[derive(Debug, Default, Clone)]
pub struct Properties {
    pub connect: ConnectProperties,
    pub publish: PublishProperties,
    pub will: WillProperties,
}

fn string(s: &str) -> Result<MqttString, String> {
    MqttString::try_from(s).map_err(|e| format!("-D: `{s}`: {e}"))
}

fn number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("-D: {name} `{v}` is not a number in range"))
}

/// Reads the `-D` arguments (each `command identifier value`, `user-property` with a name
/// and a value), in mosquitto's names.
pub fn parse(args: &[String]) -> Result<Properties, String> {
    let mut p = Properties::default();
    let mut rest = args;
    while !rest.is_empty() {
        let (command, name) = match rest {
            [c, n, ..] => (c.as_str(), n.as_str()),
            _ => return Err("-D: expected COMMAND IDENTIFIER VALUE".into()),
        };
        let values = if name == "user-property" { 2 } else { 1 };
        if rest.len() < 2 + values {
            return Err(format!("-D {command} {name}: expected {values} value(s)"));
        }
        let v = &rest[2..2 + values];
        rest = &rest[2 + values..];
        match (command, name) {
            ("connect", "session-expiry-interval") => p.connect.session_expiry_interval = Some(number(name, &v[0])?),
            ("connect", "receive-maximum") => p.connect.receive_maximum = Some(number(name, &v[0])?),
            ("connect", "maximum-packet-size") => p.connect.maximum_packet_size = Some(number(name, &v[0])?),
            ("connect", "topic-alias-maximum") => p.connect.topic_alias_maximum = Some(number(name, &v[0])?),
            ("connect", "request-problem-information") => {
                p.connect.request_problem_information = Some(number::<u8>(name, &v[0])? != 0)
            }
            ("connect", "request-response-information") => {
                p.connect.request_response_information = Some(number::<u8>(name, &v[0])? != 0)
            }
            ("connect", "user-property") => p.connect.user_properties.push((string(&v[0])?, string(&v[1])?)),
            ("publish", "payload-format-indicator") => {
                p.publish.payload_format_indicator = Some(number::<u8>(name, &v[0])? != 0)
            }
            ("publish", "message-expiry-interval") => p.publish.message_expiry_interval = Some(number(name, &v[0])?),
            ("publish", "content-type") => p.publish.content_type = Some(string(&v[0])?),
            ("publish", "response-topic") => {
                p.publish.response_topic = Some(TopicName::new(&v[0]).map_err(|e| format!("-D: response-topic: {e}"))?)
            }
            ("publish", "correlation-data") => p.publish.correlation_data = Some(Bytes::from(v[0].clone())),
            ("publish", "user-property") => p.publish.user_properties.push((string(&v[0])?, string(&v[1])?)),
            ("will", "will-delay-interval") => p.will.will_delay_interval = Some(number(name, &v[0])?),
            ("will", "payload-format-indicator") => {
                p.will.payload_format_indicator = Some(number::<u8>(name, &v[0])? != 0)
            }
            ("will", "message-expiry-interval") => p.will.message_expiry_interval = Some(number(name, &v[0])?),
            ("will", "content-type") => p.will.content_type = Some(string(&v[0])?),
            ("will", "response-topic") => {
                p.will.response_topic = Some(TopicName::new(&v[0]).map_err(|e| format!("-D: response-topic: {e}"))?)
            }
            ("will", "correlation-data") => p.will.correlation_data = Some(Bytes::from(v[0].clone())),
            ("will", "user-property") => p.will.user_properties.push((string(&v[0])?, string(&v[1])?)),
            _ => return Err(format!("-D: `{command} {name}` is not a property this client sends")),
        }
    }
    Ok(p)
}

/// mosquitto's `-L mqtt(s)://[username[:password]@]host[:port]/topic` (also `ws`, `wss` and
/// `quic` schemes here), split into a broker URL, credentials and a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topic: String,
}

pub fn location(s: &str) -> Result<Location, String> {
    let bad = || format!("-L `{s}`: expected mqtt(s)://[username[:password]@]host[:port]/topic");
    let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
    let (authority, topic) = rest.split_once('/').ok_or_else(bad)?;
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((n, p)) => (Some(n.to_string()), Some(p.to_string())),
            None => (Some(u.to_string()), None),
        },
    };
    if host.is_empty() || topic.is_empty() {
        return Err(bad());
    }
    Ok(Location { url: format!("{scheme}://{host}"), username, password, topic: topic.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_and_locations_as_mosquitto_writes_them() {
        let args: Vec<String> =
            "connect user-property site east publish message-expiry-interval 60 publish content-type text/plain"
                .split(' ')
                .map(String::from)
                .collect();
        let p = parse(&args).unwrap();
        assert_eq!(p.connect.user_properties.len(), 1);
        assert_eq!(p.publish.message_expiry_interval, Some(60));
        assert!(parse(&["publish".into(), "nonsense".into(), "1".into()]).is_err());
        assert!(parse(&["connect".into(), "user-property".into(), "k".into()]).is_err());
        let l = location("mqtts://ann:secret@broker.example:8883/a/b").unwrap();
        assert_eq!(
            l,
            Location {
                url: "mqtts://broker.example:8883".into(),
                username: Some("ann".into()),
                password: Some("secret".into()),
                topic: "a/b".into()
            }
        );
        assert!(location("mqtt://host").is_err());
    }
}
