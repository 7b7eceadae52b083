//! In-process clients: the application that embeds the broker subscribes and publishes without
//! a connection. Its subscriptions are router sessions with keys of their own range, so routing
//! treats them like any other and delivery hands their messages out as events.

use super::events::BrokerEvent;
use super::machine::Broker;
use super::router::{Entry, SessionKey};
use mqtt_proto::{Publish, QoS, ReasonCode, TopicFilter};
use std::time::Instant;

/// Session keys from here up belong to in-process subscriptions, not to clients.
pub(super) const LOCAL_BASE: SessionKey = 1 << 63;

/// A subscription of the application that embeds the broker: it receives messages as
/// [`BrokerEvent::Message`], with no connection involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalSubscription(pub(super) SessionKey);

impl Broker {
    /// Subscribes the embedding application: matching messages (and the retained ones now)
    /// come out of [`Broker::poll_event`].
    pub fn subscribe_local(&mut self, now: Instant, filter: &TopicFilter, qos: QoS) -> LocalSubscription {
        self.next_local += 1;
        let key = self.next_local;
        let options = mqtt_proto::SubscriptionOptions { qos, ..Default::default() };
        self.router.subscribe(key, filter, Entry { options, subscription_id: None });
        if filter.shared().is_none() {
            for publish in self.retained.matching(now, filter, usize::MAX) {
                self.events.push_back(BrokerEvent::Message { subscription: LocalSubscription(key), publish });
            }
        }
        LocalSubscription(key)
    }

    /// Ends an in-process subscription.
    pub fn unsubscribe_local(&mut self, subscription: LocalSubscription) {
        self.router.remove_session(subscription.0);
    }

    /// Publishes from the embedding application, as a client would (retain honoured). The
    /// topic limits apply as to clients: a topic beyond them is refused with Topic Name invalid,
    /// a retained message the store has no room for with Quota exceeded.
    pub fn publish_local(&mut self, now: Instant, publish: Publish) -> Result<(), ReasonCode> {
        self.tick(now);
        if let Some(code) = self.topic_refusal(publish.topic.as_str()) {
            return Err(code);
        }
        if publish.retain {
            if self.retained.set(now, &publish).is_err() {
                return Err(ReasonCode::QuotaExceeded);
            }
            self.journal_retained(now, &publish);
        }
        self.route(now, publish, None);
        self.pump(now);
        Ok(())
    }
}
