//! Authentication and authorization: the [`Auth`] trait the broker consults, and [`FileAuth`],
//! a built-in implementation from a password file and a mosquitto-style ACL file.
//!
//! The core reads no files: [`FileAuth`] parses their contents, which an adapter loads.
//!
//! # Password file
//!
//! One user per line, `name:$pbkdf2-sha256$ITERATIONS$SALT$HASH`, with SALT (16 bytes) and HASH
//! (32 bytes) in lower-case hex; PBKDF2 with HMAC-SHA-256, a slow salted hash so a leaked file
//! does not give the passwords away. [`FileAuth::hash_password`] writes such an entry. Entries
//! that mosquitto_passwd (mosquitto 2) writes are read too: `name:$7$ITERATIONS$SALT$HASH`,
//! PBKDF2 with HMAC-SHA-512, SALT and HASH in base64, so a mosquitto password file can be used
//! as it is (the two kinds may be mixed). mosquitto 1's `$6$` entries (one round of salted
//! SHA-512, no work factor) are refused with a message saying how to renew them. Blank lines
//! and lines starting with `#` are ignored.
//!
//! # ACL file
//!
//! mosquitto's `acl_file` syntax: `topic [read|write|readwrite|deny] TOPIC` lines before any
//! `user` line apply to anonymous clients; after `user NAME` they apply to that user; `pattern
//! [..] TOPIC` lines apply to everyone, with `%c` replaced by the client id and `%u` by the user
//! name. Access defaults to `readwrite`; anything not granted is denied, and a `deny` line wins
//! over any grant (a subscription wider than a denied subtree is granted, and the denied topics
//! are held back at delivery). While any `pattern` names `%c` (or `%u`), a client whose id (or
//! user name) contains `+`, `#` or `/` is denied everything: substituted, those would widen a
//! grant to other clients' topics or slip past a deny (mosquitto refuses them the same way). An access word other than the four is an error,
//! not a topic.
//!
//! An ACL with `user` sections only means something when user names are proven: the broker
//! refuses to start with one and no password file ([`FileAuth::check`]).
//!
//! # Time
//!
//! [`Auth::connect`] runs PBKDF2, milliseconds of CPU: the broker never calls it on its event
//! loop, but hands out an [`AuthRequest`] for the adapter to verify on
//! another thread. An unknown user costs the same work as a known one, so response times do not
//! tell which user names exist. The ACL checks are cheap and run on the loop: [`Auth::can_read`]
//! on every delivery.

use mqtt_proto::{topic, ReasonCode, TopicFilter, TopicName};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::num::NonZeroU32;
use thiserror::Error;

/// What the broker asks before letting a client in, publish or subscribe.
pub trait Auth: Debug + Send + Sync {
    /// Checks a CONNECT's credentials; `Err` carries the CONNACK refusal code (e.g. Bad User Name
    /// or Password, Not authorized).
    fn connect(&self, client_id: &str, username: Option<&str>, password: Option<&[u8]>) -> Result<(), ReasonCode>;
    /// Whether the client may publish to `topic`.
    fn can_publish(&self, client_id: &str, username: Option<&str>, topic: &TopicName) -> bool;
    /// Whether the client may subscribe to `filter` (a shared filter by its inner filter).
    fn can_subscribe(&self, client_id: &str, username: Option<&str>, filter: &TopicFilter) -> bool;
    /// Whether the client may receive a message published to `topic`: asked at every delivery,
    /// so a subscription granted earlier (before an ACL change, in a resumed session, or by a
    /// filter wider than a `deny` rule) never leaks a topic the client may not read.
    fn can_read(&self, client_id: &str, username: Option<&str>, topic: &TopicName) -> bool;
}

/// The answer to an [`AuthRequest`]: `Err` carries the CONNACK refusal code.
pub type AuthVerdict = Result<(), ReasonCode>;

/// Names one [`AuthRequest`] of a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthId(pub(crate) u64);

/// A CONNECT's credentials, handed out by the broker for the adapter to verify away from its
/// event loop (a password hash takes milliseconds of CPU, during which no other client would be
/// served). Send it to a worker thread, call [`AuthRequest::verify`] there, and give the verdict
/// back with [`crate::broker::machine::Broker::handle_auth_result`].
pub struct AuthRequest {
    pub(crate) id: AuthId,
    pub(crate) auth: std::sync::Arc<dyn Auth>,
    pub(crate) client_id: String,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<bytes::Bytes>,
}

impl AuthRequest {
    /// Which request this is.
    pub fn id(&self) -> AuthId {
        self.id
    }

    /// The user name given, if any.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// Runs the check (slow: call it off the event loop). A check that panics (a bug in an
    /// `Auth` implementation) refuses the client with Unspecified error instead of leaving it
    /// waiting and its worker gone.
    pub fn verify(&self) -> AuthVerdict {
        let check = || self.auth.connect(&self.client_id, self.username.as_deref(), self.password.as_deref());
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)).unwrap_or(Err(ReasonCode::UnspecifiedError))
    }
}

impl Debug for AuthRequest {
    /// Without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthRequest")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A password file or ACL file line that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {message}")]
pub struct AuthFileError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

const SCHEME: &str = "$pbkdf2-sha256$";

/// PBKDF2 rounds `mqttq passwd` writes, and what an unknown user is checked with when the file
/// has no entry to copy.
pub const DEFAULT_ITERATIONS: u32 = 100_000;

#[derive(Debug, Clone)]
struct Hash {
    /// PBKDF2 with HMAC-SHA-256 (ours) or HMAC-SHA-512 (mosquitto's `$7$`).
    sha512: bool,
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl Hash {
    /// Whether `password` is the one hashed (in constant time).
    fn verify(&self, password: &[u8]) -> bool {
        let algorithm = if self.sha512 { ring::pbkdf2::PBKDF2_HMAC_SHA512 } else { ring::pbkdf2::PBKDF2_HMAC_SHA256 };
        ring::pbkdf2::verify(algorithm, self.iterations, &self.salt, password, &self.hash).is_ok()
    }
}

/// mosquitto_passwd's PBKDF2-SHA512 entries.
const MOSQUITTO_SCHEME: &str = "$7$";

/// Reads one password entry's hash: ours, or mosquitto's `$7$`.
fn parse_hash(rest: &str) -> Result<Hash, &'static str> {
    if let Some(rest) = rest.strip_prefix(MOSQUITTO_SCHEME) {
        let mut parts = rest.split('$');
        let (Some(iter), Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected $7$ITERATIONS$SALT$HASH (mosquitto_passwd)");
        };
        let iterations = iter.parse::<NonZeroU32>().map_err(|_| "iterations must be a positive number")?;
        let b64 = |s: &str| data_encoding::BASE64.decode(s.as_bytes()).ok();
        let salt = b64(salt).filter(|s| !s.is_empty()).ok_or("salt is not base64")?;
        let hash = b64(hash).filter(|h| h.len() == 64).ok_or("hash is not 64 bytes of base64")?;
        return Ok(Hash { sha512: true, iterations, salt, hash });
    }
    if rest.starts_with("$6$") {
        return Err("a mosquitto 1 ($6$) hash, one round of SHA-512: set the password again with \
                    mosquitto_passwd 2 ($7$) or mqttq passwd");
    }
    let rest = rest.strip_prefix(SCHEME).ok_or("hash must start with $pbkdf2-sha256$ (or mosquitto's $7$)")?;
    let mut parts = rest.split('$');
    let (Some(iter), Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("expected $pbkdf2-sha256$ITERATIONS$SALT$HASH");
    };
    let iterations = iter.parse::<NonZeroU32>().map_err(|_| "iterations must be a positive number")?;
    let salt = unhex(salt).ok_or("salt is not hex")?;
    let hash = unhex(hash).filter(|h| h.len() == 32).ok_or("hash is not 32 bytes of hex")?;
    Ok(Hash { sha512: false, iterations, salt, hash })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    topic: String,
    /// Whether the topic names `%c` / `%u` (patterns): worked out once at load, not on every
    /// check (delivery checks run per message).
    needs_client: bool,
    needs_user: bool,
}

/// Passwords and ACL from files, plus whether anonymous clients may connect.
#[derive(Debug, Clone)]
pub struct FileAuth {
    allow_anonymous: bool,
    passwords: BTreeMap<String, Hash>,
    /// What an unknown user's password is checked against, so that the answer takes as long
    /// as for a known user: the iterations of the file's strongest entry.
    decoy: Hash,
    /// `None`: no ACL file, everything is allowed.
    acl: Option<Acl>,
}

#[derive(Debug, Clone, Default)]
struct Acl {
    anonymous: Vec<Rule>,
    users: BTreeMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
    /// Whether any `user` line was seen (even one with no rules after it).
    has_users: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Roughly what checking against an entry costs, in half SHA-256 rounds: its iterations, an
/// HMAC-SHA-512 round counted as about 1.5 HMAC-SHA-256 ones (on 64-bit machines).
fn cost(hash: &Hash) -> u64 {
    let per_round = if hash.sha512 { 3 } else { 2 };
    u64::from(hash.iterations.get()) * per_round
}

fn derive(password: &[u8], salt: &[u8], iterations: NonZeroU32) -> [u8; 32] {
    let mut out = [0u8; 32];
    ring::pbkdf2::derive(ring::pbkdf2::PBKDF2_HMAC_SHA256, iterations, salt, password, &mut out);
    out
}

impl FileAuth {
    /// No users, no ACL; anonymous clients allowed or not.
    pub fn new(allow_anonymous: bool) -> FileAuth {
        let iterations = NonZeroU32::new(DEFAULT_ITERATIONS).unwrap_or(NonZeroU32::MIN);
        FileAuth {
            allow_anonymous,
            passwords: BTreeMap::new(),
            decoy: Hash { sha512: false, iterations, salt: vec![0x5a; 16], hash: vec![0; 32] },
            acl: None,
        }
    }

    /// Whether the combination makes sense for a broker: an ACL with `user` sections and no
    /// password file would let anyone claim any user name (and its rights). The error is one
    /// line for the operator.
    pub fn check(&self) -> Result<(), String> {
        if self.acl.as_ref().is_some_and(|a| a.has_users) && self.passwords.is_empty() {
            return Err("the ACL file has `user` sections but there is no password file: anyone could claim \
                        any user name (add a password file, or use only anonymous and `pattern` rules)"
                .into());
        }
        Ok(())
    }

    /// A password file entry for `user` (the salt should be 16 random bytes).
    pub fn hash_password(user: &str, password: &str, salt: [u8; 16], iterations: NonZeroU32) -> String {
        let hash = derive(password.as_bytes(), &salt, iterations);
        format!("{user}:{SCHEME}{iterations}${}${}", hex(&salt), hex(&hash))
    }

    /// Loads the contents of a password file (see the module docs).
    pub fn with_passwords(mut self, contents: &str) -> Result<FileAuth, AuthFileError> {
        for (n, raw) in contents.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: &str| AuthFileError { line: n + 1, message: message.to_string() };
            let (user, rest) = line.split_once(':').ok_or_else(|| bad("expected name:hash"))?;
            let hash = parse_hash(rest).map_err(bad)?;
            // The decoy for unknown users costs what the file's most expensive entry does.
            if self.passwords.is_empty() || cost(&hash) > cost(&self.decoy) {
                self.decoy = Hash { salt: vec![0x5a; hash.salt.len()], hash: vec![0; hash.hash.len()], ..hash.clone() };
            }
            self.passwords.insert(user.to_string(), hash);
        }
        Ok(self)
    }

    /// Loads the contents of an ACL file (see the module docs).
    pub fn with_acl(mut self, contents: &str) -> Result<FileAuth, AuthFileError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, raw) in contents.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: &str| AuthFileError { line: n + 1, message: message.to_string() };
            let (keyword, rest) =
                line.split_once(char::is_whitespace).ok_or_else(|| bad("expected a keyword and a value"))?;
            let rest = rest.trim();
            match keyword {
                "user" => {
                    user = Some(rest.to_string());
                    acl.has_users = true;
                }
                "topic" | "pattern" => {
                    let (access, topic) = match rest.split_once(char::is_whitespace) {
                        Some(("read", t)) => (Access::Read, t.trim()),
                        Some(("write", t)) => (Access::Write, t.trim()),
                        Some(("readwrite", t)) => (Access::ReadWrite, t.trim()),
                        Some(("deny", t)) => (Access::Deny, t.trim()),
                        Some((word, _)) => {
                            return Err(bad(&format!(
                                "unknown access {word:?} (expected read, write, readwrite or deny before the topic)"
                            )))
                        }
                        None => (Access::ReadWrite, rest),
                    };
                    // The filter must be valid once %c / %u are filled in with plain text.
                    TopicFilter::new(topic.replace("%c", "c").replace("%u", "u"))
                        .map_err(|_| bad("invalid topic filter"))?;
                    let rule = Rule {
                        access,
                        topic: topic.to_string(),
                        needs_client: topic.contains("%c"),
                        needs_user: topic.contains("%u"),
                    };
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => return Err(bad(&format!("unknown keyword {other:?}"))),
            }
        }
        self.acl = Some(acl);
        Ok(self)
    }

    /// Whether `rules` (and the patterns) grant `want` on `target` for this client.
    fn allowed(
        &self,
        client_id: &str,
        username: Option<&str>,
        want: Access,
        target: &str,
        covers: fn(&str, &str) -> bool,
    ) -> bool {
        let Some(acl) = &self.acl else { return true };
        let own = match username {
            Some(u) => acl.users.get(u).map_or(&[][..], |v| v.as_slice()),
            None => acl.anonymous.as_slice(),
        };
        // A pattern applies only where its substitutions are plain levels: an id or name with
        // a wildcard or a separator would widen a grant to other clients' topics, and slip past
        // a deny. As mosquitto does, such a client is refused whenever a pattern would need it.
        let plain = |s: &str| !s.contains(['+', '#', '/']);
        let unsafe_substitution = acl
            .patterns
            .iter()
            .any(|r| (r.needs_client && !plain(client_id)) || (r.needs_user && username.is_some_and(|u| !plain(u))));
        if unsafe_substitution {
            return false;
        }
        let patterns = acl.patterns.iter().filter_map(|r| {
            // A pattern naming %u does not apply to anonymous clients.
            if r.needs_user && username.is_none() {
                return None;
            }
            if !r.needs_user && !r.needs_client {
                return Some((r.access, Cow::Borrowed(r.topic.as_str())));
            }
            let topic = r.topic.replace("%c", client_id).replace("%u", username.unwrap_or(""));
            Some((r.access, Cow::Owned(topic)))
        });
        let rules = own.iter().map(|r| (r.access, Cow::Borrowed(r.topic.as_str()))).chain(patterns);
        let mut granted = false;
        for (access, topic) in rules {
            match access {
                // A deny rule wins over any grant. At SUBSCRIBE it refuses a filter it covers
                // whole; a wider filter is granted, and the denied topics are held back at
                // delivery, where `can_read` sees each topic.
                Access::Deny if covers(&topic, target) => return false,
                Access::Deny => {}
                a if (a == want || a == Access::ReadWrite) && covers(&topic, target) => granted = true,
                _ => {}
            }
        }
        granted
    }
}

/// Whether an ACL filter covers a subscription filter: every topic the subscription can match,
/// the ACL filter matches too.
fn covers(acl: &str, sub: &str) -> bool {
    if sub.starts_with('$') != acl.starts_with('$') && (acl.starts_with('+') || acl.starts_with('#')) {
        return false;
    }
    let mut a = acl.split('/');
    let mut s = sub.split('/');
    loop {
        match (a.next(), s.next()) {
            (Some("#"), _) => return true,
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Auth for FileAuth {
    fn connect(&self, _client_id: &str, username: Option<&str>, password: Option<&[u8]>) -> Result<(), ReasonCode> {
        let Some(user) = username else {
            return if self.allow_anonymous { Ok(()) } else { Err(ReasonCode::NotAuthorized) };
        };
        let Some(expected) = self.passwords.get(user) else {
            // Users without a password entry are let in only where anonymous clients are.
            if self.allow_anonymous && self.passwords.is_empty() {
                return Ok(());
            }
            // As much work as for a known user, so timing does not reveal which names exist.
            let _ = self.decoy.verify(password.unwrap_or_default());
            return Err(ReasonCode::BadUserNameOrPassword);
        };
        match expected.verify(password.unwrap_or_default()) {
            true => Ok(()),
            false => Err(ReasonCode::BadUserNameOrPassword),
        }
    }

    fn can_publish(&self, client_id: &str, username: Option<&str>, t: &TopicName) -> bool {
        self.allowed(client_id, username, Access::Write, t.as_str(), topic::matches)
    }

    fn can_subscribe(&self, client_id: &str, username: Option<&str>, filter: &TopicFilter) -> bool {
        self.allowed(client_id, username, Access::Read, filter.match_filter(), covers)
    }

    fn can_read(&self, client_id: &str, username: Option<&str>, t: &TopicName) -> bool {
        self.allowed(client_id, username, Access::Read, t.as_str(), topic::matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }

    #[test]
    fn passwords_verify_and_bad_lines_are_reported() {
        let entry = FileAuth::hash_password("alice", "s3cret", [7; 16], n(1000));
        let auth = FileAuth::new(false).with_passwords(&format!("# users\n\n{entry}\n")).unwrap();
        assert_eq!(auth.connect("c", Some("alice"), Some(b"s3cret")), Ok(()));
        assert_eq!(auth.connect("c", Some("alice"), Some(b"wrong")), Err(ReasonCode::BadUserNameOrPassword));
        assert_eq!(auth.connect("c", Some("bob"), Some(b"s3cret")), Err(ReasonCode::BadUserNameOrPassword));
        assert_eq!(auth.connect("c", None, None), Err(ReasonCode::NotAuthorized));
        let err = FileAuth::new(false).with_passwords("alice:plain").unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.to_string().contains("pbkdf2"), "{err}");
    }

    /// A line `mosquitto_passwd -b -c pw alice secret` (mosquitto 2.0.11) wrote: PBKDF2-SHA512,
    /// 101 rounds, accepted beside our own entries; mosquitto 1's `$6$` is refused with advice.
    #[test]
    fn mosquitto_passwd_entries_are_accepted() {
        let mosquitto = "alice:$7$101$zyqhjer3mbAdPTxX$MFRHMcJZSqJ/TU4mP2ALlHzyNIiLcer9N5RPPMQ48PTteWmK8U++EKfowvH1gFgoSUSqrGZn6U5nbQqPslaT5w==";
        let ours = FileAuth::hash_password("bob", "hunter2", [3; 16], n(1000));
        let auth = FileAuth::new(false).with_passwords(&format!("{mosquitto}\n{ours}\n")).unwrap();
        assert_eq!(auth.connect("c", Some("alice"), Some(b"secret")), Ok(()));
        assert_eq!(auth.connect("c", Some("alice"), Some(b"Secret")), Err(ReasonCode::BadUserNameOrPassword));
        assert_eq!(auth.connect("c", Some("bob"), Some(b"hunter2")), Ok(()));
        assert_eq!(auth.connect("c", Some("carol"), Some(b"secret")), Err(ReasonCode::BadUserNameOrPassword));
        let old = FileAuth::new(false).with_passwords("dave:$6$c2FsdA==$aGFzaA==").unwrap_err();
        assert!(old.to_string().contains("mosquitto_passwd 2"), "{old}");
        let cut = FileAuth::new(false).with_passwords("erin:$7$101$zyqhjer3mbAdPTxX$AAAA").unwrap_err();
        assert!(cut.to_string().contains("64 bytes"), "{cut}");
    }

    #[test]
    fn acl_sections_patterns_and_access() {
        let acl = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic write reports/+

pattern read devices/%c/commands
pattern write users/%u/status
";
        let auth = FileAuth::new(true).with_acl(acl).unwrap();
        let t = |s: &str| TopicName::new(s).unwrap();
        let f = |s: &str| TopicFilter::new(s).unwrap();
        // Anonymous: read public only.
        assert!(auth.can_subscribe("dev1", None, &f("public/news")));
        assert!(auth.can_subscribe("dev1", None, &f("public/#")));
        assert!(!auth.can_publish("dev1", None, &t("public/news")));
        // Alice: her own tree both ways, reports write-only.
        assert!(auth.can_publish("c", Some("alice"), &t("alice/x/y")));
        assert!(auth.can_subscribe("c", Some("alice"), &f("alice/+/y")));
        assert!(auth.can_publish("c", Some("alice"), &t("reports/daily")));
        assert!(!auth.can_subscribe("c", Some("alice"), &f("reports/daily")));
        assert!(!auth.can_subscribe("c", Some("alice"), &f("public/news")), "anonymous rules are not hers");
        // Patterns.
        assert!(auth.can_subscribe("dev1", None, &f("devices/dev1/commands")));
        assert!(!auth.can_subscribe("dev1", None, &f("devices/dev2/commands")));
        assert!(auth.can_publish("c", Some("alice"), &t("users/alice/status")));
        assert!(!auth.can_publish("c", None, &t("users//status")), "%u needs a user");
        // A subscription wider than the grant is refused.
        assert!(!auth.can_subscribe("c", Some("alice"), &f("#")));
        assert!(!auth.can_subscribe("dev1", None, &f("devices/+/commands")));
        assert!(FileAuth::new(true).with_acl("frobnicate x").is_err());
    }

    #[test]
    fn deny_rules_win_and_are_held_back_at_delivery() {
        let acl = "user alice\ntopic read #\ntopic deny secret/#\ntopic write out/#\n";
        let auth = FileAuth::new(false).with_acl(acl).unwrap();
        let t = |s: &str| TopicName::new(s).unwrap();
        let f = |s: &str| TopicFilter::new(s).unwrap();
        let alice = Some("alice");
        // A filter the deny rule covers whole is refused; a wider one is granted...
        assert!(!auth.can_subscribe("c", alice, &f("secret/x")));
        assert!(!auth.can_subscribe("c", alice, &f("secret/#")));
        assert!(auth.can_subscribe("c", alice, &f("#")));
        // ...and its deliveries of denied topics are held back.
        assert!(auth.can_read("c", alice, &t("public/x")));
        assert!(!auth.can_read("c", alice, &t("secret/x")));
        assert!(auth.can_publish("c", alice, &t("out/1")));
        assert!(!auth.can_publish("c", alice, &t("public/x")));
    }

    #[test]
    fn patterns_do_not_apply_to_ids_and_names_with_wildcards_or_separators() {
        let acl = "pattern readwrite devices/%c/#\npattern read users/%u/#\n";
        let auth = FileAuth::new(true).with_acl(acl).unwrap();
        let f = |s: &str| TopicFilter::new(s).unwrap();
        assert!(auth.can_subscribe("dev1", None, &f("devices/dev1/#")));
        // `a/b` would reach into `devices/a/...` of a client named `a`; `+` and `#` into all.
        assert!(!auth.can_subscribe("a/b", None, &f("devices/a/b/#")));
        assert!(!auth.can_subscribe("+", None, &f("devices/+/#")));
        assert!(!auth.can_subscribe("#", None, &f("devices/#")));
        assert!(auth.can_subscribe("c", Some("bob"), &f("users/bob/#")));
        assert!(!auth.can_subscribe("c", Some("b/o"), &f("users/b/o/#")));
        // A deny pattern must not fail open for such ids: they are denied everything.
        let deny = "topic read #\npattern deny private/%c/#\n";
        let auth = FileAuth::new(true).with_acl(deny).unwrap();
        let t = |s: &str| TopicName::new(s).unwrap();
        assert!(auth.can_read("dev1", None, &t("public/x")));
        assert!(!auth.can_read("dev1", None, &t("private/dev1/x")));
        assert!(!auth.can_read("a/b", None, &t("private/a/b/x")));
        assert!(!auth.can_read("a/b", None, &t("public/x")));
    }

    #[test]
    fn acl_mistakes_are_named_with_their_line() {
        let err = FileAuth::new(true).with_acl("# comment\ntopic reed a/b\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.to_string().contains("reed"), "{err}");
        // `user` sections without a password file: anyone could claim the name.
        let users = FileAuth::new(true).with_acl("user alice\ntopic read #\n").unwrap();
        assert!(users.check().unwrap_err().contains("password file"));
        let entry = FileAuth::hash_password("alice", "pw", [1; 16], n(1000));
        assert!(users.with_passwords(&entry).unwrap().check().is_ok());
        assert!(FileAuth::new(true).with_acl("pattern read d/%c\n").unwrap().check().is_ok());
    }

    #[test]
    fn unknown_users_cost_a_full_hash() {
        // Not a timing test: the decoy takes the strongest entry's iterations, so an unknown
        // name is checked with as many rounds as a known one.
        let strong = FileAuth::hash_password("a", "pw", [1; 16], n(5000));
        let weak = FileAuth::hash_password("b", "pw", [1; 16], n(1000));
        let auth = FileAuth::new(false).with_passwords(&format!("{weak}\n{strong}\n")).unwrap();
        assert_eq!(auth.decoy.iterations, n(5000));
        assert_eq!(auth.connect("c", Some("nobody"), Some(b"pw")), Err(ReasonCode::BadUserNameOrPassword));
    }

    #[test]
    fn covering_rules() {
        assert!(covers("a/#", "a/+/b"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("#", "a/#"));
        assert!(!covers("#", "$SYS/#"));
    }
}
