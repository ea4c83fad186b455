//! Private servers with TLS, for tests of `amqps://` and `rediss://`.
//!
//! [`TlsFiles`] makes a throwaway CA, a server certificate it signs (for
//! `localhost` and `127.0.0.1`), a client certificate for mutual TLS, and a
//! second, unrelated CA to show that a server signed by another one is
//! refused. [`TlsRedis`] and [`TlsRabbit`] start a redis-server and a
//! RabbitMQ node that only speak TLS, on free ports, with their data in
//! temporary directories removed on drop. The shared servers are never
//! touched.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kairos-{kind}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Runs `openssl` with a command line of words without spaces.
fn openssl(command_line: &str, dir: &Path) {
    let args: Vec<&str> = command_line.split_whitespace().collect();
    let out = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("the openssl command must be installed");
    assert!(
        out.status.success(),
        "openssl {command_line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until something accepts TCP connections on `port`.
fn wait_for_port(port: u16, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Certificates made for one test (P-256 keys: quick to make).
pub struct TlsFiles {
    pub dir: PathBuf,
    /// The CA that signs the servers' and the client's certificates.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting only it must fail.
    pub other_ca: PathBuf,
}

impl TlsFiles {
    pub fn generate() -> Self {
        let dir = temp_dir("tls");
        const EC: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let new_ca = |name: &str, cn: &str| {
            openssl(
                &format!(
                    "req -x509 {EC} -days 2 -subj /CN={cn} -keyout {name}.key -out {name}.pem"
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
                     -days 2 -extfile {name}.ext -out {name}.pem"
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

/// A redis-server that only speaks TLS.
pub struct TlsRedis {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl TlsRedis {
    /// `password`: `requirepass`, so tests can check it never shows in
    /// errors. `client_cert_required`: `--tls-auth-clients yes`.
    pub fn start(files: &TlsFiles, password: &str, client_cert_required: bool) -> Self {
        let port = free_port();
        let dir = temp_dir("redis-tls");
        let p = |p: &Path| p.display().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
            .args(["--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &p(&files.server_cert)])
            .args(["--tls-key-file", &p(&files.server_key)])
            .args(["--tls-ca-cert-file", &p(&files.ca)])
            .args([
                "--tls-auth-clients",
                if client_cert_required { "yes" } else { "no" },
            ])
            .args(["--requirepass", password])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/services.sh installs it)");
        wait_for_port(port, Duration::from_secs(10), "redis-server with TLS");
        TlsRedis { port, dir, child }
    }

    /// `rediss://` with the password and the IP address (the certificate
    /// names both `localhost` and `127.0.0.1`).
    pub fn url(&self, password: &str) -> String {
        format!("rediss://:{password}@127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RabbitMQ node of its own that only speaks TLS (no plain listener, no
/// plugins). Takes several seconds to boot. It runs as the current user
/// with its own home directory and Erlang cookie, so it neither needs nor
/// touches the shared node's.
pub struct TlsRabbit {
    pub port: u16,
    pub node: String,
    dir: PathBuf,
    child: Child,
}

impl TlsRabbit {
    /// `client_cert_required`: the node asks for a client certificate
    /// signed by the CA and refuses a client without one.
    pub fn start(files: &TlsFiles, client_cert_required: bool) -> Self {
        let port = free_port();
        let dist_port = free_port();
        let dir = temp_dir("rabbit-tls");
        let node = format!("kairos-tls-{port}@localhost");
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("home dir");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("kairos-tls-{port}")).expect("cookie");
        restrict_to_owner(&cookie);
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        let p = |p: &Path| p.display().to_string();
        let verify = if client_cert_required {
            "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
        } else {
            "ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
        };
        let conf = format!(
            "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\n\
             {verify}loopback_users.guest = true\n",
            p(&files.ca),
            p(&files.server_cert),
            p(&files.server_key),
        );
        std::fs::write(dir.join("rabbitmq.conf"), conf).expect("rabbitmq.conf");
        let child = Command::new(rabbit_bin("rabbitmq-server"))
            .envs(rabbit_env(&dir, &node))
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server must be installed (scripts/services.sh installs it)");
        let rabbit = TlsRabbit {
            port,
            node,
            dir,
            child,
        };
        // The TLS listener opens at the end of the boot.
        wait_for_port(port, Duration::from_secs(90), "RabbitMQ node with TLS");
        rabbit
    }

    /// `amqps://` as guest (allowed: the connection comes from loopback).
    pub fn url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n NODE ARGS...` on this node (for tests that make
    /// it misbehave, e.g. `set_vm_memory_high_watermark`).
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(rabbit_bin("rabbitmqctl"))
            .envs(rabbit_env(&self.dir, &self.node))
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .expect("rabbitmqctl must be installed")
    }

    /// The node's own log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log").join(format!("{}.log", self.node)))
            .unwrap_or_default()
    }
}

impl Drop for TlsRabbit {
    fn drop(&mut self) {
        // A graceful `rabbitmqctl stop` takes up to 20 s on a busy machine;
        // the node's data is thrown away, so kill it: the Erlang VM whose
        // pid the node wrote, then the start script if it still runs.
        let pid_file = self.dir.join("mnesia").join(format!("{}.pid", self.node));
        if let Ok(pid) = std::fs::read_to_string(pid_file) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// RabbitMQ's own scripts (the ones in /usr/sbin switch to the rabbitmq
/// user, which would lose our environment).
fn rabbit_bin(name: &str) -> PathBuf {
    let own = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if own.exists() {
        own
    } else {
        PathBuf::from(name)
    }
}

fn rabbit_env(dir: &Path, node: &str) -> Vec<(&'static str, String)> {
    vec![
        ("HOME", dir.join("home").display().to_string()),
        ("RABBITMQ_NODENAME", node.to_string()),
    ]
}

fn restrict_to_owner(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400));
}
