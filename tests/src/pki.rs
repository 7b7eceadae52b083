//! A throw-away certificate authority for TLS tests: a CA and certificates it issues.

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// A CA able to issue server and client certificates.
pub struct Pki {
    /// The CA certificate, PEM: what clients (or a server checking client certificates) trust.
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Issued {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

impl Pki {
    /// A fresh CA.
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Pki { ca_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A certificate for `names`, for a server (`client == false`) or a client; its subject's
    /// common name is the first name (a client's identity).
    pub fn issue(&self, names: &[&str], client: bool) -> Issued {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(first) = names.first() {
            params.distinguished_name.push(rcgen::DnType::CommonName, first.as_str());
        }
        params.extended_key_usages =
            vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf certificate");
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// A self-signed Ed25519 server certificate for `names`, as a [`ServerTls`].
///
/// For simulations that must replay exactly from a seed: Ed25519 signatures are deterministic
/// and always 64 bytes, where the default ECDSA signature of each handshake's CertificateVerify
/// varies in length (DER, random nonce), and a byte more or less in the handshake shifts every
/// later packet's timing by a few nanoseconds.
pub fn ed25519_server_tls(names: &[&str]) -> mqtt_quic_core::tls::ServerTls {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
    let cert = CertificateParams::new(names).expect("params").self_signed(&key).expect("certificate");
    mqtt_quic_core::tls::ServerTls::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .expect("Ed25519 server TLS")
}
