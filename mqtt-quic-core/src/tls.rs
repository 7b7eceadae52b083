//! TLS 1.3 configuration for both ends (rustls with the ring provider).
//!
//! Certificates and keys come in as PEM bytes: reading files is the adapters' business, so the
//! core never touches the file system. A self-signed certificate can be generated for
//! development.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::fmt;
use std::sync::Arc;
use thiserror::Error;

/// ALPN protocol identifier of MQTT over QUIC (EMQX convention).
pub const ALPN_MQTT: &[u8] = b"mqtt";

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate PEM holds no certificate, or one that cannot be parsed.
    #[error("no usable certificate in the PEM data: {0}")]
    Certificate(String),
    /// The key PEM holds no private key, or one that cannot be parsed.
    #[error("no usable private key in the PEM data: {0}")]
    PrivateKey(String),
    /// rustls refused the certificate/key pair or the settings.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating a self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// A pin is not a 64-character hexadecimal SHA-256 digest.
    #[error("certificate pin must be 64 hex digits (a SHA-256 fingerprint), got {0:?}")]
    Pin(String),
}

fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM with SHA-256 first (ring's default order puts AES-256/SHA-384 first). QUIC
    // derives some hundred HKDF keys per handshake, both ends together, and SHA-384 made them
    // 29% of a handshake's instructions; AES-128 also takes fewer rounds per packet. It is the
    // suite every QUIC stack must offer (RFC 9001, 5.3); the others stay available.
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Parses every certificate in `pem`.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Parses the first private key in `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::PrivateKey(e.to_string()))
}

/// SHA-256 of a DER certificate: what `ClientTls::pinned` compares against.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lower-case hex of a fingerprint, the form users copy around.
pub fn fingerprint_hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// A self-signed certificate generated for development.
#[derive(Clone)]
pub struct SelfSigned {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// SHA-256 fingerprint of the certificate.
    pub fingerprint: [u8; 32],
}

impl fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SelfSigned").field("fingerprint", &fingerprint_hex(&self.fingerprint)).finish_non_exhaustive()
    }
}

impl SelfSigned {
    /// Generates a certificate for `names` (DNS names or IP addresses).
    ///
    /// The key comes from the operating system's random source: this is the one place the core
    /// draws unseeded randomness, because a predictable private key would be worthless.
    pub fn generate(names: &[&str]) -> Result<SelfSigned, TlsError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let key = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
        let fingerprint = fingerprint(key.cert.der());
        Ok(SelfSigned { cert_pem: key.cert.pem(), key_pem: key.signing_key.serialize_pem(), fingerprint })
    }
}

/// The server's side of TLS: its certificate and, optionally, the CAs it accepts client
/// certificates from (mutual TLS).
#[derive(Debug, Clone)]
pub struct ServerTls {
    chain: Vec<CertificateDer<'static>>,
    key_pem: Vec<u8>,
    client_ca: Option<Vec<CertificateDer<'static>>>,
    /// With `client_ca`: whether a client without a certificate is let in (to log in with a
    /// password instead); a certificate it does present must still verify.
    client_optional: bool,
    /// Whether the TLS-over-TCP listeners also speak TLS 1.2 (QUIC is TLS 1.3 always).
    tls12: bool,
    /// The QUIC sessions clients may resume (and send 0-RTT data on), shared by every QUIC
    /// configuration built from this one: the shards of a broker each build their own, and a
    /// client resuming on another shard than the one it last connected to must find its
    /// session.
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
}

impl ServerTls {
    /// From a PEM certificate chain and a PEM private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerTls, TlsError> {
        let chain = certificates_from_pem(cert_pem)?;
        private_key_from_pem(key_pem)?;
        Ok(ServerTls {
            chain,
            key_pem: key_pem.to_vec(),
            client_ca: None,
            client_optional: false,
            tls12: false,
            // rustls's default size.
            sessions: rustls::server::ServerSessionMemoryCache::new(256),
        })
    }

    /// From a generated self-signed certificate.
    pub fn from_self_signed(cert: &SelfSigned) -> Result<ServerTls, TlsError> {
        ServerTls::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
    }

    /// Requires clients to present a certificate issued by one of the CAs in `ca_pem`.
    pub fn require_client_certificates(mut self, ca_pem: &[u8]) -> Result<ServerTls, TlsError> {
        self.client_ca = Some(certificates_from_pem(ca_pem)?);
        self.client_optional = false;
        Ok(self)
    }

    /// Verifies the certificates clients present against the CAs in `ca_pem`, and lets in
    /// clients that present none (mosquitto's `cafile` without `require_certificate`).
    pub fn accept_client_certificates(mut self, ca_pem: &[u8]) -> Result<ServerTls, TlsError> {
        self.client_ca = Some(certificates_from_pem(ca_pem)?);
        self.client_optional = true;
        Ok(self)
    }

    /// Lets the TLS-over-TCP listeners (`mqtts`, `wss`) speak TLS 1.2 too, for devices that
    /// have nothing newer (mosquitto's `tls_version tlsv1.2`); QUIC stays TLS 1.3 only, as
    /// RFC 9001 requires.
    pub fn allow_tls12(mut self, allow: bool) -> ServerTls {
        self.tls12 = allow;
        self
    }

    /// Whether client certificates are required (see [`ServerTls::require_client_certificates`]).
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some() && !self.client_optional
    }

    /// The end-entity certificate's SHA-256 fingerprint.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.chain[0])
    }

    /// A rustls server configuration: TLS 1.3 only, ALPN `mqtt`, 0-RTT when `early_data`.
    pub fn rustls_config(&self, early_data: bool) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = self.build(early_data, &[&rustls::version::TLS13])?;
        config.session_storage = self.sessions.clone();
        Ok(config)
    }

    /// A rustls server configuration for a TLS-over-TCP listener: as
    /// [`ServerTls::rustls_config`] without 0-RTT, with TLS 1.2 too when
    /// [`ServerTls::allow_tls12`] said so.
    pub fn rustls_stream_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        match self.tls12 {
            true => self.build(false, &[&rustls::version::TLS13, &rustls::version::TLS12]),
            false => self.build(false, &[&rustls::version::TLS13]),
        }
    }

    fn build(
        &self,
        early_data: bool,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(cas) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in cas {
                    roots.add(ca.clone())?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let verifier = match self.client_optional {
                    true => verifier.allow_unauthenticated(),
                    false => verifier,
                };
                let verifier = verifier.build().map_err(|e| TlsError::Certificate(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(self.chain.clone(), private_key_from_pem(&self.key_pem)?)?;
        config.alpn_protocols = vec![ALPN_MQTT.to_vec()];
        // QUIC requires this exact value when 0-RTT is on (RFC 9001, 4.6.1).
        config.max_early_data_size = if early_data { u32::MAX } else { 0 };
        Ok(config)
    }
}

/// How the client decides to trust the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerTrust {
    /// Certificates chaining to these CAs, for the name given at connect.
    Ca(Vec<CertificateDer<'static>>),
    /// Exactly the certificate with this SHA-256 fingerprint (e.g. a broker's self-signed one),
    /// whatever its name or expiry.
    Pinned([u8; 32]),
    /// Any certificate. For tests only: it gives up all protection against impostors.
    Insecure,
}

/// The client's side of TLS.
#[derive(Debug, Clone)]
pub struct ClientTls {
    trust: ServerTrust,
    client_cert: Option<(Vec<CertificateDer<'static>>, Vec<u8>)>,
}

impl ClientTls {
    /// Trust servers whose certificates chain to the CAs in `ca_pem`.
    pub fn with_ca_pem(ca_pem: &[u8]) -> Result<ClientTls, TlsError> {
        Ok(ClientTls { trust: ServerTrust::Ca(certificates_from_pem(ca_pem)?), client_cert: None })
    }

    /// Trust servers whose certificates chain to these roots, for example the operating
    /// system's store as loaded by an adapter (the core reads no files).
    pub fn with_roots(roots: Vec<CertificateDer<'static>>) -> ClientTls {
        ClientTls { trust: ServerTrust::Ca(roots), client_cert: None }
    }

    /// Trust exactly the certificate with this fingerprint (64 hex digits, `:` allowed).
    pub fn pinned(fingerprint_hex: &str) -> Result<ClientTls, TlsError> {
        let clean: String = fingerprint_hex.chars().filter(|c| *c != ':').collect();
        let bad = || TlsError::Pin(fingerprint_hex.to_string());
        if clean.len() != 64 {
            return Err(bad());
        }
        let mut fp = [0u8; 32];
        for (i, byte) in fp.iter_mut().enumerate() {
            *byte = u8::from_str_radix(clean.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        Ok(ClientTls { trust: ServerTrust::Pinned(fp), client_cert: None })
    }

    /// Trust any server. Tests only.
    pub fn insecure() -> ClientTls {
        ClientTls { trust: ServerTrust::Insecure, client_cert: None }
    }

    /// Present this certificate (PEM chain and key) when the server asks for one.
    pub fn with_client_certificate(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<ClientTls, TlsError> {
        let chain = certificates_from_pem(cert_pem)?;
        private_key_from_pem(key_pem)?;
        self.client_cert = Some((chain, key_pem.to_vec()));
        Ok(self)
    }

    /// A rustls client configuration: TLS 1.3 only, ALPN `mqtt`, session tickets kept in memory
    /// (per server name) and 0-RTT attempted when `early_data`.
    pub fn rustls_config(&self, early_data: bool) -> Result<rustls::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match &self.trust {
            ServerTrust::Ca(cas) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in cas {
                    roots.add(ca.clone())?;
                }
                builder.with_root_certificates(roots)
            }
            ServerTrust::Pinned(fp) => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(Some(*fp))))
            }
            ServerTrust::Insecure => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(None)))
            }
        };
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder.with_client_auth_cert(chain.clone(), private_key_from_pem(key)?)?,
        };
        config.alpn_protocols = vec![ALPN_MQTT.to_vec()];
        config.enable_early_data = early_data;
        Ok(config)
    }
}

/// Accepts the server certificate whose fingerprint is pinned (or any, when `pin` is `None`),
/// still checking that the server holds its key.
#[derive(Debug)]
struct PinnedVerifier {
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    fn new(pin: Option<[u8; 32]>) -> PinnedVerifier {
        PinnedVerifier { pin, provider: provider() }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.pin {
            Some(pin) if fingerprint(end_entity) != pin => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is never negotiated: the configurations are TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_reject() {
        let hex = "ab".repeat(32);
        assert!(ClientTls::pinned(&hex).is_ok());
        let colons: Vec<&str> = std::iter::repeat_n("AB", 32).collect();
        assert!(ClientTls::pinned(&colons.join(":")).is_ok());
        assert!(matches!(ClientTls::pinned("abc"), Err(TlsError::Pin(_))));
        assert!(matches!(ClientTls::pinned(&"zz".repeat(32)), Err(TlsError::Pin(_))));
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        assert!(matches!(ServerTls::from_pem(b"nonsense", b"nonsense"), Err(TlsError::Certificate(_))));
        let cert = SelfSigned::generate(&["localhost"]).unwrap();
        assert!(matches!(ServerTls::from_pem(cert.cert_pem.as_bytes(), b"nope"), Err(TlsError::PrivateKey(_))));
        let tls = ServerTls::from_self_signed(&cert).unwrap();
        assert_eq!(tls.fingerprint(), cert.fingerprint);
        assert!(tls.rustls_config(true).is_ok());
    }
}

/// The Common Name (CN) of a DER certificate's subject: the identity mosquitto's
/// `use_identity_as_username` takes as the user name of a client that logged in with a
/// certificate. `None` when the certificate has none (or is not one: the certificate was
/// verified before this is asked, so that only happens for a broken CA's certificates).
///
/// A small DER reader of its own, bounded by the input and without recursion: it walks
/// Certificate, TBSCertificate, the fields before the subject, then the subject's attributes.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    /// One DER element: its tag, its contents, and what follows it.
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = match first {
            0..=0x7F => (usize::from(first), rest),
            0x81..=0x84 => {
                let n = usize::from(first & 0x7F);
                if rest.len() < n {
                    return None;
                }
                let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
                (len, &rest[n..])
            }
            _ => return None,
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, cert, _) = element(der)?;
    (tag == SEQUENCE).then_some(())?;
    let (tag, tbs, _) = element(cert)?;
    (tag == SEQUENCE).then_some(())?;
    let mut fields = tbs;
    // An explicit version ([0]) comes first when present.
    if fields.first() == Some(&0xA0) {
        fields = element(fields)?.2;
    }
    // Serial number, signature algorithm, issuer, validity; then the subject.
    for _ in 0..4 {
        fields = element(fields)?.2;
    }
    let (tag, mut subject, _) = element(fields)?;
    (tag == SEQUENCE).then_some(())?;
    while !subject.is_empty() {
        let (tag, set, rest) = element(subject)?;
        subject = rest;
        if tag != SET {
            continue;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (_, attribute, rest) = element(attributes)?;
            attributes = rest;
            let (tag, oid, value) = element(attribute)?;
            if tag != 0x06 || oid != CN {
                continue;
            }
            let (tag, text, _) = element(value)?;
            // UTF8String, PrintableString, TeletexString, IA5String.
            if matches!(tag, 0x0C | 0x13 | 0x14 | 0x16) {
                return std::str::from_utf8(text).ok().map(str::to_string);
            }
        }
    }
    None
}

#[cfg(test)]
mod identity_tests {
    use super::certificate_common_name;

    #[test]
    fn the_common_name_of_a_subject_and_nothing_from_garbage() {
        let mut params = rcgen::CertificateParams::new(vec!["device.example".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Acme");
        params.distinguished_name.push(rcgen::DnType::CommonName, "device-7");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(certificate_common_name(cert.der()).as_deref(), Some("device-7"));
        let mut none = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        none.distinguished_name = rcgen::DistinguishedName::new();
        let cert = none.self_signed(&key).unwrap();
        assert_eq!(certificate_common_name(cert.der()), None);
        // Cut short anywhere, or garbage: no name, no panic.
        let der = params.self_signed(&key).unwrap().der().to_vec();
        for cut in 0..der.len() {
            let _ = certificate_common_name(&der[..cut]);
        }
        assert_eq!(certificate_common_name(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
    }
}
