//! In-process clients: the application that embeds the broker subscribes and publishes without
//! a connection. Its subscriptions are router sessions with keys of their own range, so routing
//! treats them like any other and delivery hands their messages out as events.
//!
//! A subscription made with a window ([`Broker::subscribe_local_window`]) is flow-controlled
//! like a client: at most `window` of its messages are out with the application at once (it
//! reports what it has taken with [`Broker::handle_local_taken`]); beyond that they wait in the
//! broker, as a slow client's do: up to [`BrokerConfig::max_offline_queue`] messages, QoS 0
//! ones dropped first once [`BrokerConfig::max_queued_bytes`] wait (counted in
//! `$SYS/broker/messages/dropped`). A slow handler so slows only itself, never the broker or
//! other clients.
//!
//! [`BrokerConfig::max_offline_queue`]: super::config::BrokerConfig::max_offline_queue
//! [`BrokerConfig::max_queued_bytes`]: super::config::BrokerConfig::max_queued_bytes

use super::events::BrokerEvent;
use super::machine::Broker;
use super::router::{Entry, SessionKey};
use mqtt_proto::{Publish, QoS, ReasonCode, TopicFilter};
use std::collections::VecDeque;
use std::time::Instant;

/// The window adapters give in-process subscriptions: how many messages may wait for the
/// application before the broker holds the rest back (as many as a client's message buffer).
pub const DEFAULT_WINDOW: usize = 1024;

/// Session keys from here up belong to in-process subscriptions, not to clients.
pub(super) const LOCAL_BASE: SessionKey = 1 << 63;

/// A subscription of the application that embeds the broker: it receives messages as
/// [`BrokerEvent::Message`], with no connection involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalSubscription(pub(super) SessionKey);

/// The flow control of a windowed in-process subscription.
#[derive(Debug, Default)]
pub(super) struct LocalWindow {
    /// Messages out with the application at most.
    window: usize,
    /// Messages out with the application now (handed out, not yet reported taken).
    out: usize,
    /// Messages waiting for room in the window, and their bytes.
    waiting: VecDeque<Publish>,
    waiting_bytes: usize,
}

/// What a message costs in a waiting queue: its topic and payload.
fn cost(publish: &Publish) -> usize {
    publish.topic.as_str().len() + publish.payload.len()
}

impl Broker {
    /// Subscribes the embedding application: matching messages (and the retained ones now)
    /// come out of [`Broker::poll_event`], all of them, however slowly the application takes
    /// them (see [`Broker::subscribe_local_window`] for a bounded one).
    pub fn subscribe_local(&mut self, now: Instant, filter: &TopicFilter, qos: QoS) -> LocalSubscription {
        self.subscribe_local_inner(now, filter, qos, None)
    }

    /// Subscribes the embedding application with flow control (see the module docs): at most
    /// `window` messages (at least 1) come out of [`Broker::poll_event`] until the application
    /// reports some taken with [`Broker::handle_local_taken`].
    pub fn subscribe_local_window(
        &mut self,
        now: Instant,
        filter: &TopicFilter,
        qos: QoS,
        window: usize,
    ) -> LocalSubscription {
        let window = LocalWindow { window: window.max(1), ..Default::default() };
        self.subscribe_local_inner(now, filter, qos, Some(window))
    }

    fn subscribe_local_inner(
        &mut self,
        now: Instant,
        filter: &TopicFilter,
        qos: QoS,
        window: Option<LocalWindow>,
    ) -> LocalSubscription {
        self.next_local += 1;
        let key = self.next_local;
        if let Some(window) = window {
            self.local_windows.insert(key, window);
        }
        let options = mqtt_proto::SubscriptionOptions { qos, ..Default::default() };
        self.router.subscribe(key, filter, Entry { options, subscription_id: None });
        if filter.shared().is_none() {
            for publish in self.retained.matching(now, filter, usize::MAX) {
                self.deliver_local(key, publish);
            }
        }
        LocalSubscription(key)
    }

    /// Ends an in-process subscription; what waited for it is dropped, including its messages
    /// not yet polled from [`Broker::poll_event`].
    pub fn unsubscribe_local(&mut self, subscription: LocalSubscription) {
        self.router.remove_session(subscription.0);
        self.local_windows.remove(&subscription.0);
        self.events.retain(|e| !matches!(e, BrokerEvent::Message { subscription: s, .. } if *s == subscription));
    }

    /// The application took `n` messages of a windowed subscription: as many waiting ones come
    /// out of [`Broker::poll_event`] now.
    pub fn handle_local_taken(&mut self, subscription: LocalSubscription, n: usize) {
        let Some(w) = self.local_windows.get_mut(&subscription.0) else { return };
        w.out = w.out.saturating_sub(n);
        while w.out < w.window {
            let Some(publish) = w.waiting.pop_front() else { break };
            w.waiting_bytes -= cost(&publish);
            w.out += 1;
            self.events.push_back(BrokerEvent::Message { subscription, publish });
        }
    }

    /// Hands a message to an in-process subscription: out now, or waiting for room in its
    /// window (dropped when no more may wait).
    pub(super) fn deliver_local(&mut self, key: SessionKey, publish: Publish) {
        let subscription = LocalSubscription(key);
        let Some(w) = self.local_windows.get_mut(&key) else {
            self.events.push_back(BrokerEvent::Message { subscription, publish });
            return;
        };
        if w.out < w.window {
            w.out += 1;
            self.events.push_back(BrokerEvent::Message { subscription, publish });
            return;
        }
        let full = w.waiting.len() >= self.config.max_offline_queue
            || (publish.qos() == QoS::AtMostOnce && w.waiting_bytes + cost(&publish) > self.config.max_queued_bytes);
        if full {
            self.stats.messages_dropped += 1;
            return;
        }
        w.waiting_bytes += cost(&publish);
        w.waiting.push_back(publish);
    }

    /// Publishes from the embedding application, as a client would (retain honoured). The
    /// topic limits apply as to clients: a topic beyond them is refused with Topic Name invalid,
    /// a retained message the store has no room for with Quota exceeded.
    pub fn publish_local(&mut self, now: Instant, publish: Publish) -> Result<(), ReasonCode> {
        self.tick(now);
        if let Some(code) = self.topic_refusal(publish.topic.as_str()) {
            return Err(code);
        }
        if publish.retain && self.keep_retained(now, &publish).is_err() {
            return Err(ReasonCode::QuotaExceeded);
        }
        self.route(now, publish, None);
        self.pump(now);
        Ok(())
    }
}

/// What an application asks of the broker in-process, as an adapter carries it from its
/// `Server` handle to the loop that owns the broker (there: [`LocalSinks::handle`]). The
/// replies are the adapter's (a oneshot channel's send, say).
pub enum LocalCommand<S> {
    /// Subscribe `sink`; the reply gets the subscription (false if nobody waits for it any
    /// more: the subscription is ended again).
    Subscribe {
        /// What to subscribe to.
        filter: TopicFilter,
        /// At most this QoS.
        qos: QoS,
        /// Where its messages go.
        sink: S,
        /// Gets the subscription.
        reply: Box<dyn FnOnce(LocalSubscription) -> bool + Send>,
    },
    /// End a subscription.
    Unsubscribe(LocalSubscription),
    /// The application took this many messages of a subscription.
    Taken(LocalSubscription, usize),
    /// Publish; the reply gets the broker's verdict.
    Publish {
        /// The message.
        publish: Publish,
        /// Gets the verdict.
        reply: Box<dyn FnOnce(Result<(), ReasonCode>) + Send>,
    },
}

/// Where an adapter hands an in-process subscription's messages: the application's queue or
/// handler.
pub trait LocalSink {
    /// Hands a message over; false once nobody takes them any more (the application dropped
    /// its end), which ends the subscription.
    fn deliver(&mut self, publish: Publish) -> bool;
}

impl<S: LocalSink + ?Sized> LocalSink for Box<S> {
    fn deliver(&mut self, publish: Publish) -> bool {
        (**self).deliver(publish)
    }
}

/// An adapter's in-process subscriptions: each one's sink, by subscription. The part of the
/// adapters' `Server::subscribe` that is not channels: windowed subscriptions made and ended,
/// messages routed to their sinks (see the module docs for the flow control).
#[derive(Debug)]
pub struct LocalSinks<S> {
    sinks: std::collections::HashMap<LocalSubscription, S>,
}

impl<S> Default for LocalSinks<S> {
    fn default() -> Self {
        LocalSinks { sinks: Default::default() }
    }
}

impl<S: LocalSink> LocalSinks<S> {
    /// Subscribes `sink` to `filter` with a window of `window` messages (the retained ones
    /// come out of [`Broker::poll_event`] at once, for [`LocalSinks::deliver`]).
    pub fn subscribe(
        &mut self,
        broker: &mut Broker,
        now: Instant,
        filter: &TopicFilter,
        qos: QoS,
        window: usize,
        sink: S,
    ) -> LocalSubscription {
        let subscription = broker.subscribe_local_window(now, filter, qos, window);
        self.sinks.insert(subscription, sink);
        subscription
    }

    /// Does what the application asked; subscriptions get a window of `window` messages.
    pub fn handle(&mut self, broker: &mut Broker, now: Instant, window: usize, command: LocalCommand<S>) {
        match command {
            LocalCommand::Subscribe { filter, qos, sink, reply } => {
                let subscription = self.subscribe(broker, now, &filter, qos, window, sink);
                if !reply(subscription) {
                    self.unsubscribe(broker, subscription);
                }
            }
            LocalCommand::Unsubscribe(subscription) => self.unsubscribe(broker, subscription),
            LocalCommand::Taken(subscription, n) => broker.handle_local_taken(subscription, n),
            LocalCommand::Publish { publish, reply } => reply(broker.publish_local(now, publish)),
        }
    }

    /// Ends a subscription (the application dropped it).
    pub fn unsubscribe(&mut self, broker: &mut Broker, subscription: LocalSubscription) {
        if self.sinks.remove(&subscription).is_some() {
            broker.unsubscribe_local(subscription);
        }
    }

    /// A message for a subscription, from [`Handling::Message`](super::lifecycle::Handling):
    /// handed to its sink; a sink that is gone ends its subscription. Messages for
    /// subscriptions of others (made on the broker directly) are returned.
    pub fn deliver(
        &mut self,
        broker: &mut Broker,
        subscription: LocalSubscription,
        publish: Publish,
    ) -> Option<(LocalSubscription, Publish)> {
        let Some(sink) = self.sinks.get_mut(&subscription) else { return Some((subscription, publish)) };
        if !sink.deliver(publish) {
            self.unsubscribe(broker, subscription);
        }
        None
    }

    /// Subscriptions live.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::machine::BrokerConfig;
    use crate::config::ServerConfig;
    use crate::tls::{SelfSigned, ServerTls};
    use mqtt_proto::TopicName;

    fn broker(max_offline_queue: usize) -> Broker {
        let cert = SelfSigned::generate(&["localhost"]).unwrap();
        let mut config = BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()));
        config.max_offline_queue = max_offline_queue;
        config.sys_interval = None;
        Broker::new(config).unwrap()
    }

    fn messages(b: &mut Broker) -> Vec<String> {
        std::iter::from_fn(|| b.poll_event())
            .filter_map(|e| match e {
                BrokerEvent::Message { publish, .. } => Some(String::from_utf8_lossy(&publish.payload).into_owned()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_window_holds_messages_back_until_they_are_taken_and_bounds_what_waits() {
        let mut b = broker(3);
        #[allow(clippy::disallowed_methods)] // a fixed origin; only differences matter
        let now = Instant::now();
        let sub = b.subscribe_local_window(now, &TopicFilter::new("t/#").unwrap(), QoS::AtLeastOnce, 2);
        let topic = TopicName::new("t/1").unwrap();
        for i in 0..7 {
            let p = Publish::new(topic.clone(), format!("m{i}")).with_qos(QoS::AtLeastOnce);
            b.publish_local(now, p).unwrap();
        }
        // Two out, three wait (the queue's limit), two dropped.
        assert_eq!(messages(&mut b), ["m0", "m1"]);
        assert_eq!(b.stats().messages_dropped, 2);
        b.handle_local_taken(sub, 1);
        assert_eq!(messages(&mut b), ["m2"]);
        b.handle_local_taken(sub, 5);
        assert_eq!(messages(&mut b), ["m3", "m4"]);
        // Without a window, everything comes out.
        let all = b.subscribe_local(now, &TopicFilter::new("u/#").unwrap(), QoS::AtMostOnce);
        for i in 0..5 {
            b.publish_local(now, Publish::new(TopicName::new("u/1").unwrap(), format!("n{i}"))).unwrap();
        }
        assert_eq!(messages(&mut b).len(), 5);
        // Found in review: messages of a subscription ended before they were polled stayed
        // among the events (and piled up in the mio broker's queue for nobody).
        for i in 0..3 {
            b.publish_local(now, Publish::new(TopicName::new("u/1").unwrap(), format!("late{i}"))).unwrap();
        }
        b.unsubscribe_local(all);
        assert!(messages(&mut b).is_empty());
        b.unsubscribe_local(sub);
    }
}
