//! Private servers with TLS, for tests of `amqps://` and `rediss://`.
//!
//! [`TlsFiles`] makes a throwaway CA, a server certificate it signs (for
//! `localhost` and `127.0.0.1`), a client certificate for mutual TLS, and a
//! second, unrelated CA to show that a server signed by another one is
//! refused. [`OwnRedis::start_tls`](crate::OwnRedis::start_tls) and
//! [`OwnRabbit::start_tls`](crate::OwnRabbit::start_tls) start servers that
//! only speak TLS with them.

use crate::processes::run_ok;
use crate::servers::temp_dir;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `openssl` with a command line of words without spaces.
fn openssl(command_line: &str, dir: &Path) {
    run_ok(
        Command::new("openssl")
            .args(command_line.split_whitespace())
            .current_dir(dir),
        &format!("openssl {command_line}"),
        "the openssl command must be installed",
    );
}

/// Certificates made for one test (P-256 keys: quick to make).
pub struct TlsFiles {
    /// The directory that holds them all, removed on drop.
    pub dir: PathBuf,
    /// The CA that signs the servers' and the client's certificates.
    pub ca: PathBuf,
    /// The servers' certificate, for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// The servers' private key.
    pub server_key: PathBuf,
    /// The client's certificate, for mutual TLS.
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting only it must fail.
    pub other_ca: PathBuf,
}

/// Days the certificates are valid: longer than any test run.
const VALID_DAYS: u32 = 2;

impl TlsFiles {
    /// Makes the CAs, and the server and client certificates, with
    /// `openssl` in a new temporary directory.
    pub fn generate() -> Self {
        let dir = temp_dir("tls");
        const EC: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let new_ca = |name: &str, cn: &str| {
            openssl(
                &format!(
                    "req -x509 {EC} -days {VALID_DAYS} -subj /CN={cn} -keyout {name}.key -out {name}.pem"
                ),
                &dir,
            )
        };
        new_ca("ca", "kairos-test-ca");
        new_ca("other-ca", "kairos-unrelated-ca");
        let signed = |name: &str, cn: &str, ext: &str| {
            std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
            openssl(
                &format!("req {EC} -subj /CN={cn} -keyout {name}.key -out {name}.csr"),
                &dir,
            );
            openssl(
                &format!(
                    "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                     -days {VALID_DAYS} -extfile {name}.ext -out {name}.pem"
                ),
                &dir,
            );
        };
        signed(
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        );
        signed(
            "client",
            "kairos-client",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
        );
        TlsFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
            dir,
        }
    }

    /// Settings that trust `ca`, with the client certificate when
    /// `client_cert`.
    pub fn settings(&self, ca: &Path, client_cert: bool) -> kairos_shared::tls::TlsSettings {
        use kairos_shared::tls::PemFile;
        kairos_shared::tls::TlsSettings {
            tls_ca_file: Some(PemFile::certificates(ca).expect("CA file")),
            tls_cert_file: client_cert
                .then(|| PemFile::certificates(&self.client_cert).expect("client cert")),
            tls_key_file: client_cert
                .then(|| PemFile::private_key(&self.client_key).expect("client key")),
        }
    }

    /// The same as environment variables for a `kairos-*` process.
    pub fn env(&self, client_cert: bool) -> Vec<(String, String)> {
        let path = |p: &Path| p.display().to_string();
        let mut env = vec![("KAIROS_TLS_CA_FILE".to_string(), path(&self.ca))];
        if client_cert {
            env.push(("KAIROS_TLS_CERT_FILE".into(), path(&self.client_cert)));
            env.push(("KAIROS_TLS_KEY_FILE".into(), path(&self.client_key)));
        }
        env
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
