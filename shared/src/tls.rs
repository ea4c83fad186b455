//! TLS to RabbitMQ (`amqps://`) and Redis (`rediss://`).
//!
//! The URL's scheme turns TLS on; these settings only say whom to trust
//! and who we are. A certificate authority file lets a private or
//! self-signed CA sign the servers' certificates; a client certificate and
//! key give mutual TLS. Both brokers use the same files, so one set of
//! settings serves a deployment. The files are read and checked when the
//! settings are parsed: a missing or unusable file fails at start, naming
//! the setting, not at the first connect.
//!
//! rustls with the ring provider does the work (docs/SECURITY.md says why).

use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The contents of a PEM file read at start. Its `Debug` shows the path
/// only: a key file is a secret.
#[derive(Clone)]
pub struct PemFile {
    path: PathBuf,
    pem: Arc<[u8]>,
}

impl PemFile {
    fn read(path: &Path) -> Result<PemFile, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(PemFile {
            path: path.to_path_buf(),
            pem: pem.into(),
        })
    }

    /// Reads a file of one or more PEM certificates (a CA bundle or a
    /// certificate chain).
    pub fn certificates(path: impl AsRef<Path>) -> Result<PemFile, String> {
        let file = Self::read(path.as_ref())?;
        let certs = CertificateDer::pem_slice_iter(&file.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not PEM certificates: {e}", file.path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                file.path.display()
            ));
        }
        Ok(file)
    }

    /// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1). Errors never
    /// quote the file's contents.
    pub fn private_key(path: impl AsRef<Path>) -> Result<PemFile, String> {
        let file = Self::read(path.as_ref())?;
        PrivateKeyDer::from_pem_slice(&file.pem).map_err(|_| {
            format!(
                "{}: holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                file.path.display()
            )
        })?;
        Ok(file)
    }

    /// Where the file was read from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's PEM content as read at start.
    pub fn bytes(&self) -> &[u8] {
        &self.pem
    }

    /// The text of a certificate file. PEM is ASCII; a certificate file
    /// that is not was refused by [`certificates`](Self::certificates).
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.pem).into_owned()
    }
}

impl std::fmt::Debug for PemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PemFile({})", self.path.display())
    }
}

/// Trust and identity for `amqps://` and `rediss://` connections. Unused
/// with plain `amqp://` and `redis://` URLs.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsSettings {
    /// PEM file of the certificate authorities that sign the RabbitMQ and
    /// Redis server certificates (a private or self-signed CA). RabbitMQ
    /// trusts it besides the system's roots; Redis trusts only it.
    #[arg(long, env = "KAIROS_TLS_CA_FILE", value_name = "KAIROS_TLS_CA_FILE", value_parser = certificate_file, global = true)]
    pub tls_ca_file: Option<PemFile>,

    /// PEM client certificate (chain) for mutual TLS; needs
    /// `KAIROS_TLS_KEY_FILE`.
    #[arg(long, env = "KAIROS_TLS_CERT_FILE", value_name = "KAIROS_TLS_CERT_FILE", value_parser = certificate_file, requires = "tls_key_file", global = true)]
    pub tls_cert_file: Option<PemFile>,

    /// PEM private key of `KAIROS_TLS_CERT_FILE`.
    #[arg(long, env = "KAIROS_TLS_KEY_FILE", value_name = "KAIROS_TLS_KEY_FILE", value_parser = key_file, requires = "tls_cert_file", global = true)]
    pub tls_key_file: Option<PemFile>,
}

fn certificate_file(path: &str) -> Result<PemFile, String> {
    PemFile::certificates(path)
}

fn key_file(path: &str) -> Result<PemFile, String> {
    PemFile::private_key(path)
}

impl TlsSettings {
    /// The client identity for mutual TLS, when both halves are set.
    pub fn identity(&self) -> Option<(&PemFile, &PemFile)> {
        self.tls_cert_file.as_ref().zip(self.tls_key_file.as_ref())
    }

    /// The settings in lapin's form.
    pub fn amqp(&self) -> lapin::tcp::OwnedTLSConfig {
        install_crypto_provider();
        lapin::tcp::OwnedTLSConfig {
            identity: self
                .identity()
                .map(|(cert, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: cert.bytes().to_vec(),
                    key: key.bytes().to_vec(),
                }),
            cert_chain: self.tls_ca_file.as_ref().map(PemFile::text),
        }
    }
}

/// A hint for an operator when a connect failed on the server's
/// certificate: retrying will not help until the trust is fixed.
pub fn hint(cause: &str) -> &'static str {
    if cause.contains("certificate") {
        "the server's certificate is not trusted or not valid for its name: check KAIROS_TLS_CA_FILE and the URL's host"
    } else {
        ""
    }
}

/// Makes ring rustls's provider for this process. rustls picks one by
/// itself only when exactly one is compiled in; a program embedding Kairos
/// may bring aws-lc-rs too, and rustls would then panic at the first TLS
/// connect. Installing ours first settles it; an embedder's own choice,
/// installed earlier, stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of one test's files, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("kairos-tls-{test}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn unusable_files_are_refused_with_their_path() {
        let err = PemFile::certificates("/nonexistent/ca.pem").unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let scratch = Scratch::new("unusable");
        let path = scratch.file("not-a-cert.pem", "hello");
        let err = PemFile::certificates(&path).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = PemFile::private_key(&path).unwrap_err();
        assert!(err.contains("no PEM private key"), "{err}");
    }

    #[test]
    fn a_key_never_shows_in_debug_or_errors() {
        // Looks like a key to a PEM reader but is not a valid one.
        let secret =
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END PRIVATE KEY-----\n";
        let scratch = Scratch::new("secret");
        let path = scratch.file("key.pem", secret);
        let file = PemFile::private_key(&path).unwrap();
        let shown = format!("{file:?} {:?}", TlsSettings::default());
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        let broken = scratch.file("broken-key.pem", "-----BEGIN PRIVATE KEY-----\nc2VjcmV0");
        let err = PemFile::private_key(&broken).unwrap_err();
        assert!(!err.contains("c2VjcmV0"), "{err}");
    }
}
