//! Who may do what: the broker's rules on CONNECT (enhanced authentication refused, will
//! topics, the password check handed out to the adapter with its per-address and global
//! bounds, session ownership, keep-alive and session limits), on PUBLISH and SUBSCRIBE (topic
//! limits, `$` topics being the broker's, the `Auth` rights, the subscription quota) and on
//! delivery (read rights). They live apart from the dispatch so each rule is stated once and
//! every path that needs it (client, will, in-process) asks the same question.

use super::auth::{Auth, AuthId, AuthRequest};
use super::limiter::FailureLimiter;
use super::links::Peer;
use super::local::LOCAL_BASE;
use super::machine::Broker;
use super::registry::Registry;
use super::router::SessionKey;
use bytes::Bytes;
use mqtt_proto::{Connect, ReasonCode, TopicFilter, TopicName};
use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A password verification the adapter is running.
struct PendingAuth {
    /// The connection and its CONNECT, or `None` once the connection has gone: the entry stays
    /// until the verdict comes, so it still counts against the bounds and a wrong password
    /// still counts as a failure of its address.
    waiting: Option<(Peer, Box<Connect>)>,
    ip: Option<IpAddr>,
}

/// Password verifications handed out and not answered, and the failed logins per address.
pub(super) struct Logins {
    pending: BTreeMap<AuthId, PendingAuth>,
    out: VecDeque<AuthRequest>,
    next: u64,
    limiter: FailureLimiter,
}

impl Logins {
    pub(super) fn new(max_failures: u32, window: Duration) -> Logins {
        Logins {
            pending: BTreeMap::new(),
            out: VecDeque::new(),
            next: 0,
            limiter: FailureLimiter::new(max_failures, window, 100_000),
        }
    }

    /// Whether a CONNECT from `ip` may have its password checked now: refused with Connection
    /// rate exceeded while the address has failed too often, with Server busy while `max`
    /// verifications are out (or `max_per_ip` from this address, so that one address cannot
    /// take every slot).
    fn refusal(&self, now: Instant, ip: Option<IpAddr>, max: usize, max_per_ip: usize) -> Option<ReasonCode> {
        if ip.is_some_and(|ip| self.limiter.is_limited(now, ip)) {
            return Some(ReasonCode::ConnectionRateExceeded);
        }
        let from_ip = ip.map_or(0, |ip| self.pending.values().filter(|p| p.ip == Some(ip)).count());
        (self.pending.len() >= max || from_ip >= max_per_ip).then_some(ReasonCode::ServerBusy)
    }

    /// Numbers a verification.
    fn next_id(&mut self) -> AuthId {
        self.next += 1;
        AuthId(self.next)
    }

    /// Hands verification `id` of `conn`'s CONNECT out to the adapter, and keeps the CONNECT
    /// for the verdict.
    fn hand_out(
        &mut self,
        id: AuthId,
        auth: Arc<dyn Auth>,
        conn: Peer,
        c: Connect,
        username: Option<String>,
        ip: Option<IpAddr>,
    ) {
        self.out.push_back(AuthRequest {
            id,
            auth,
            client_id: c.client_id.to_string(),
            username,
            // A copy: a slice would hold the whole CONNECT frame while the hash runs.
            password: c.password.as_deref().map(Bytes::copy_from_slice),
        });
        self.pending.insert(id, PendingAuth { waiting: Some((conn, Box::new(c))), ip });
    }

    /// The next verification for the adapter.
    pub(super) fn poll(&mut self) -> Option<AuthRequest> {
        self.out.pop_front()
    }

    /// The verdict on verification `id` came: its entry goes, a failure counts against its
    /// address (even when the client has gone: dropping the connection right after CONNECT
    /// must not make guessing free). `None` for an unknown id; otherwise the connection and
    /// CONNECT still waiting for it, if any.
    pub(super) fn settle(&mut self, now: Instant, id: AuthId, failed: bool) -> Option<Option<(Peer, Box<Connect>)>> {
        let pending = self.pending.remove(&id)?;
        if failed {
            if let Some(ip) = pending.ip {
                self.limiter.record_failure(now, ip);
            }
        }
        Some(pending.waiting)
    }

    /// The connection whose verification `id` was has gone: its verdict, when it comes, must
    /// not land on a later connection that reuses this one's number; the entry itself stays
    /// until then (see `PendingAuth`).
    pub(super) fn abandon(&mut self, id: AuthId) {
        if let Some(pending) = self.pending.get_mut(&id) {
            pending.waiting = None;
        }
    }
}

impl Broker {
    /// Whether a topic name or filter is beyond the configured length or depth: the reason
    /// code to refuse it with.
    pub(super) fn topic_refusal(&self, topic: &str) -> Option<ReasonCode> {
        let levels = topic.bytes().filter(|&b| b == b'/').count() + 1;
        (topic.len() > self.config.max_topic_length || levels > self.config.max_topic_levels)
            .then_some(ReasonCode::TopicNameInvalid)
    }

    /// Whether a connected client may publish to `topic`: Success, or the code to refuse it
    /// with. The limits first (cheap, and they bound what the ACL walks), then the rights:
    /// `$` topics are the broker's (e.g. `$SYS`), clients may not publish there.
    pub(super) fn publish_refusal(&self, conn: Peer, topic: &TopicName) -> ReasonCode {
        let allowed = || match (&self.config.auth, self.conns.get(&conn)) {
            (Some(auth), Some(live)) if !live.internal => {
                auth.can_publish(live.client.as_deref().unwrap_or(""), live.username.as_deref(), topic)
            }
            _ => true,
        };
        if let Some(code) = self.topic_refusal(topic.as_str()) {
            code
        } else if topic.is_system() || !allowed() {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::Success
        }
    }

    /// Whether a connected client may subscribe to `filter` (`already` when it holds that
    /// subscription, which the quota does not count again): `None`, or the code to refuse it with.
    pub(super) fn subscribe_refusal(
        &self,
        conn: Peer,
        key: SessionKey,
        filter: &TopicFilter,
        already: bool,
    ) -> Option<ReasonCode> {
        if self.topic_refusal(filter.match_filter()).is_some() {
            Some(ReasonCode::TopicFilterInvalid)
        } else if self.config.auth.as_ref().zip(self.conns.get(&conn)).is_some_and(|(auth, live)| {
            !live.internal
                && !auth.can_subscribe(live.client.as_deref().unwrap_or(""), live.username.as_deref(), filter)
        }) {
            Some(ReasonCode::NotAuthorized)
        } else if !already && self.subscriptions_of(key) >= self.config.max_subscriptions_per_client {
            Some(ReasonCode::QuotaExceeded)
        } else {
            None
        }
    }

    /// Refuses a CONNECT with `code` (mapped to the 3.1.1 return code for 3.1.1 clients).
    pub(super) fn refuse(&mut self, now: Instant, conn: Peer, code: ReasonCode) {
        if let Some(live) = self.conns.get_mut(&conn) {
            let _ = live.session.refuse(now, code);
        }
    }

    /// A CONNECT: what can be decided without knowing who the client is, then the password
    /// check (handed out, see [`Broker::poll_auth`]), then `Broker::admit`.
    pub(super) fn on_connect(&mut self, now: Instant, conn: Peer, mut c: Connect) {
        let remote = self.links.remote_addr(conn);
        // mosquitto's `use_identity_as_username`: the certificate's name is the user name, and
        // the verified certificate the credential.
        let internal = self.conns.get(&conn).is_some_and(|l| l.internal);
        let by_certificate = match self.config.use_identity_as_username && !internal {
            true => match self.links.identity(conn) {
                Some(name) => Some(name),
                // As mosquitto: no certificate (or one without a common name) is no login at
                // all, whatever user name the CONNECT claims.
                None => return self.refuse(now, conn, ReasonCode::BadUserNameOrPassword),
            },
            false => None,
        };
        if let Some(name) = &by_certificate {
            match mqtt_proto::MqttString::try_from(name.clone()) {
                Ok(name) => {
                    c.username = Some(name);
                    c.password = None;
                }
                Err(_) => return self.refuse(now, conn, ReasonCode::BadUserNameOrPassword),
            }
        }
        let username = c.username.as_ref().map(|u| u.as_str().to_string());
        if let Some(live) = self.conns.get_mut(&conn) {
            live.hello = Some((c.client_id.to_string(), username.clone(), remote));
            live.datagrams = super::datagrams::asks_for_datagrams(&c);
        }
        if self.closing_until.is_some() {
            // Shutting down: a client that reconnects at once must not land here again.
            return self.refuse(now, conn, ReasonCode::ServerUnavailable);
        }
        // Bridges' sessions here are the broker's own: no client may take one over.
        if !internal && c.client_id.as_str().starts_with(crate::bridge::LOCAL_CLIENT_PREFIX) {
            return self.refuse(now, conn, ReasonCode::ClientIdentifierNotValid);
        }
        // Enhanced authentication (an AUTH exchange) is not offered: a client that asks for it
        // is refused with 0x8C and the connection closed [MQTT-4.12.0-1].
        if c.properties.authentication_method.is_some() {
            return self.refuse(now, conn, ReasonCode::BadAuthenticationMethod);
        }
        // A will is a publish that happens later: the same topic rules apply now, when the
        // client can still be told (0x90 beyond the limits, 0x87 for a `$` topic).
        if let Some(will) = &c.will {
            if let Some(code) = self.topic_refusal(will.topic.as_str()) {
                return self.refuse(now, conn, code);
            }
            if will.topic.is_system() {
                return self.refuse(now, conn, ReasonCode::NotAuthorized);
            }
        }
        let checked = internal || by_certificate.is_some();
        let Some(auth) = self.config.auth.clone().filter(|_| !checked) else { return self.admit(now, conn, c) };
        // Where it comes from, when known (QUIC always; byte streams when the adapter said,
        // with [`Broker::handle_stream_open`]).
        let ip = remote.map(|a| a.ip());
        let (max, max_per_ip) = (self.config.max_pending_auth, self.config.max_pending_auth_per_ip);
        if let Some(code) = self.logins.refusal(now, ip, max, max_per_ip) {
            return self.refuse(now, conn, code);
        }
        let id = self.logins.next_id();
        let Some(live) = self.conns.get_mut(&conn) else { return };
        live.auth = Some(id);
        self.logins.hand_out(id, auth, conn, c, username, ip);
    }

    /// The rules on a CONNECT that need the client's identity (its client id, assigned or not,
    /// and user name): its will's topic must be one it may publish to; a keep-alive beyond the
    /// maximum (or none) is replaced for MQTT 5 (`Ok(true)`: impose the maximum), while MQTT
    /// 3.1.1 has no way to say so and is refused, so no connection is exempt from liveness
    /// checks; a session belongs to the user that created it, and a new one must fit
    /// `max_sessions`.
    pub(super) fn identity_refusal(&self, id: &str, username: Option<&str>, c: &Connect) -> Result<bool, ReasonCode> {
        if let (Some(will), Some(auth)) = (&c.will, &self.config.auth) {
            if !auth.can_publish(id, username, &will.topic) {
                return Err(ReasonCode::NotAuthorized);
            }
        }
        let max_keepalive = self.config.max_keepalive;
        let impose = max_keepalive > 0 && (c.keep_alive == 0 || c.keep_alive > max_keepalive);
        if impose && !c.protocol.is_v5() {
            return Err(ReasonCode::ClientIdentifierNotValid);
        }
        // Another user presenting the same client id is refused, and neither takes over the
        // live connection nor gets (or discards) the kept session.
        match self.registry.get(id) {
            Some(record) if record.owner.as_deref() != username => Err(ReasonCode::NotAuthorized),
            None if self.registry.len() >= self.config.max_sessions => Err(ReasonCode::QuotaExceeded),
            _ => Ok(impose),
        }
    }
}

/// Whether a session may read `topic` (always, without `Auth`, and for in-process
/// subscriptions). A free function so it can borrow the registry while the router is borrowed.
pub(super) fn may_read(registry: &Registry, auth: Option<&dyn Auth>, key: SessionKey, topic: &TopicName) -> bool {
    let Some(auth) = auth else { return true };
    if key > LOCAL_BASE {
        return true;
    }
    registry.by_key(key).is_some_and(|(id, r)| {
        id.starts_with(crate::bridge::LOCAL_CLIENT_PREFIX) || auth.can_read(id, r.owner.as_deref(), topic)
    })
}
