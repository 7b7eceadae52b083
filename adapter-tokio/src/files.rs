//! Certificates and keys from files, and the operating system's trust store: the file system
//! work the core leaves to adapters, with errors that name the file.

use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls, TlsError};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why TLS material could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FileError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's content is not what was expected.
    #[error("{path}: {source}")]
    Tls {
        /// The file (or files, for a certificate and key that do not match).
        path: String,
        /// Why.
        source: TlsError,
    },
    /// The operating system trusts no CA certificate we could load.
    #[error("no trusted CA certificates found on this system; pass a CA file (--cafile) or pin the server")]
    NoRoots,
}

fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Read { path: path.to_owned(), source })
}

/// A server identity from a PEM certificate chain and a PEM private key file.
pub fn server_tls_from_files(cert: &Path, key: &Path) -> Result<ServerTls, FileError> {
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let tls = ServerTls::from_pem(&cert_pem, &key_pem)
        .map_err(|source| FileError::Tls { path: format!("{} / {}", cert.display(), key.display()), source })?;
    // Building the rustls configuration checks that the key belongs to the certificate.
    tls.rustls_config(false)
        .map_err(|source| FileError::Tls { path: format!("{} / {}", cert.display(), key.display()), source })?;
    Ok(tls)
}

/// Trust in the CA certificates of a PEM file.
pub fn client_tls_from_ca_file(ca: &Path) -> Result<ClientTls, FileError> {
    ClientTls::with_ca_pem(&read(ca)?).map_err(|source| FileError::Tls { path: ca.display().to_string(), source })
}

/// Trust in the operating system's CA certificates.
pub fn client_tls_from_system() -> Result<ClientTls, FileError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        return Err(FileError::NoRoots);
    }
    Ok(ClientTls::with_roots(found.certs))
}

/// Where `mqttq broker` keeps its generated certificate unless told otherwise:
/// `$MQTTQ_DATA_DIR`, else `$XDG_DATA_HOME/mqttq`, else `~/.local/share/mqttq`, else `.mqttq`.
pub fn default_data_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    // systemd's StateDirectory= (a colon-separated list: the first is ours).
    let state = || {
        let dirs = std::env::var("STATE_DIRECTORY").ok()?;
        dirs.split(':').next().filter(|d| !d.is_empty()).map(PathBuf::from)
    };
    var("MQTTQ_DATA_DIR")
        .or_else(state)
        .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("mqttq")))
        .or_else(|| var("HOME").map(|h| h.join(".local/share/mqttq")))
        .unwrap_or_else(|| PathBuf::from(".mqttq"))
}

/// The trust a command-line client uses when given no CA file: the system's CAs plus the
/// certificate a local `mqttq broker` generated in `data_dir`, if there is one, so that a
/// broker and its clients on one machine work together with full verification out of the box.
pub fn client_tls_default(data_dir: &Path) -> Result<ClientTls, FileError> {
    let mut roots = rustls_native_certs::load_native_certs().certs;
    let local = data_dir.join("cert.pem");
    if local.exists() {
        let pem = read(&local)?;
        let certs = mqtt_quic_core::tls::certificates_from_pem(&pem)
            .map_err(|source| FileError::Tls { path: local.display().to_string(), source })?;
        roots.extend(certs);
    }
    if roots.is_empty() {
        return Err(FileError::NoRoots);
    }
    Ok(ClientTls::with_roots(roots))
}

/// The broker's own certificate in `dir` (`cert.pem`, `key.pem`), generated self-signed for
/// `localhost` and this host's name on first use. Returns the identity and the files' paths.
pub fn self_signed_in(dir: &Path) -> Result<(ServerTls, PathBuf, PathBuf), FileError> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() || !key.exists() {
        std::fs::create_dir_all(dir).map_err(|source| FileError::Write { path: dir.to_owned(), source })?;
        let made = SelfSigned::generate(&["localhost", "127.0.0.1", "::1"])
            .map_err(|source| FileError::Tls { path: cert.display().to_string(), source })?;
        std::fs::write(&cert, &made.cert_pem).map_err(|source| FileError::Write { path: cert.clone(), source })?;
        write_private(&key, made.key_pem.as_bytes())?;
    }
    let tls = server_tls_from_files(&cert, &key)?;
    Ok((tls, cert, key))
}

/// Writes a private key readable by its owner only (where the platform has permissions).
fn write_private(path: &Path, data: &[u8]) -> Result<(), FileError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(|source| FileError::Write { path: path.to_owned(), source })?;
    f.write_all(data).map_err(|source| FileError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("mqttq-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, cert, key) = self_signed_in(&dir).unwrap();
        let (b, _, _) = self_signed_in(&dir).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint(), "the certificate was regenerated");
        let missing = dir.join("nope.pem");
        let e = server_tls_from_files(&missing, &key).unwrap_err().to_string();
        assert!(e.starts_with("cannot read ") && e.contains("nope.pem"), "{e}");
        // A certificate with a key that is not its own.
        let other = SelfSigned::generate(&["x"]).unwrap();
        let other_key = dir.join("other.pem");
        std::fs::write(&other_key, other.key_pem).unwrap();
        let e = server_tls_from_files(&cert, &other_key).unwrap_err().to_string();
        assert!(e.contains("other.pem"), "{e}");
        let e = server_tls_from_files(&key, &key).unwrap_err().to_string();
        assert!(e.contains("key.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
