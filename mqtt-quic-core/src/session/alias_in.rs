//! Topic aliases the peer sets on the PUBLISHes it sends us (MQTT 5, 3.3.2.3.4), for either role:
//! a PUBLISH with a topic and an alias sets the alias, one with an empty topic uses it. The table
//! lives and dies with one connection [MQTT-3.3.2-7] and holds at most the Topic Alias Maximum we
//! announced.

use mqtt_proto::{Publish, ReasonCode, TopicName};
use std::collections::BTreeMap;

/// The aliases the peer has set on this connection.
#[derive(Debug, Default)]
pub(crate) struct IncomingAliases {
    by_alias: BTreeMap<u16, TopicName>,
}

impl IncomingAliases {
    /// Gives `publish` its topic when it uses an alias, and records one it sets. `max` is the
    /// Topic Alias Maximum we announced. The error is the reason the peer broke the protocol:
    /// an alias above `max` (0x94), or an unknown one used (0x82). The alias property itself is
    /// left on the message.
    pub(crate) fn resolve(&mut self, publish: &mut Publish, max: u16) -> Result<(), ReasonCode> {
        let Some(alias) = publish.properties.topic_alias else { return Ok(()) };
        if alias.get() > max {
            return Err(ReasonCode::TopicAliasInvalid);
        }
        if publish.topic.is_empty() {
            match self.by_alias.get(&alias.get()) {
                Some(topic) => publish.topic = topic.clone(),
                None => return Err(ReasonCode::ProtocolError),
            }
        } else {
            self.by_alias.insert(alias.get(), publish.topic.clone());
        }
        Ok(())
    }

    /// Forgets every alias (a new connection).
    pub(crate) fn clear(&mut self) {
        self.by_alias.clear();
    }
}
