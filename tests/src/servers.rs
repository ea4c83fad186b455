//! The servers tests run against: the shared Redis and RabbitMQ (their
//! URLs), and private ones a test starts for itself ([`OwnRedis`],
//! [`OwnRabbit`]) when it must make a server misbehave, restart it, or
//! speak TLS to it. A private server listens on a free port, keeps its data
//! in a temporary directory, and is killed and removed on drop: the shared
//! servers are never touched.

use crate::processes::run_ok;
use crate::tls::TlsFiles;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shared RabbitMQ (`scripts/services.sh` starts it).
pub const AMQP_URL: &str = kairos_shared::config::DEFAULT_AMQP_URL;
/// The shared Redis (`scripts/services.sh` starts it).
pub const REDIS_URL: &str = kairos_shared::config::DEFAULT_REDIS_URL;

/// How long a private redis-server may take to listen.
const REDIS_BOOT: Duration = Duration::from_secs(10);
/// How long a private RabbitMQ node may take to listen: 10 to 30 s on a
/// loaded 2-core machine, the TLS listener last of all.
const RABBIT_BOOT: Duration = Duration::from_secs(120);
/// How often a starting server's port is tried.
const PORT_POLL: Duration = Duration::from_millis(50);
/// RabbitMQ's own scripts, which run as the calling user; the ones in
/// /usr/sbin switch to the `rabbitmq` user (another home, another Erlang
/// cookie) and lose the environment set here.
const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// A free local address, e.g. for a scheduler's HTTP API (bound, then
/// released).
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// A new directory under the system's temporary one, named after `kind`
/// and made unique.
pub(crate) fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kairos-{kind}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Waits until something accepts TCP connections on `port` (blocking).
fn wait_for_port(port: u16, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within {within:?}"
        );
        std::thread::sleep(PORT_POLL);
    }
}

/// Sends `signal` (`-STOP`, `-KILL`...) to process `pid` with `kill`.
fn send_signal(signal: &str, pid: &str) -> bool {
    Command::new("kill")
        .args([signal, pid])
        .status()
        .is_ok_and(|s| s.success())
}

/// A private `redis-server`: plain with AOF (a restart keeps its data), or
/// TLS only with a password. Killed when dropped.
pub struct OwnRedis {
    /// The port it listens on (the TLS port for a TLS server).
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Every argument of `redis-server`, kept for [`restart`](Self::restart).
    args: Vec<String>,
    /// `Some(password)` for a TLS server: its URL is `rediss://`.
    tls_password: Option<String>,
}

impl OwnRedis {
    /// A plain server with AOF (`appendfsync always`).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A plain server with extra `redis-server` arguments after the
    /// defaults (they win over them), e.g. `["--maxmemory-policy",
    /// "allkeys-lru"]` or `["--replicaof", "127.0.0.1", "6380"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let mut args = vec![
            "--port".to_string(),
            port.to_string(),
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            "always".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::launch(port, args, None)
    }

    /// A server that only speaks TLS, with the certificates of `files`.
    /// `password`: `requirepass`, so tests can check it never shows in
    /// errors. `client_cert_required`: `--tls-auth-clients yes`.
    pub fn start_tls(files: &TlsFiles, password: &str, client_cert_required: bool) -> Self {
        let port = free_port();
        let path = |p: &Path| p.display().to_string();
        let args = [
            ["--port", "0"],
            ["--tls-port", &port.to_string()],
            ["--tls-cert-file", &path(&files.server_cert)],
            ["--tls-key-file", &path(&files.server_key)],
            ["--tls-ca-cert-file", &path(&files.ca)],
            [
                "--tls-auth-clients",
                if client_cert_required { "yes" } else { "no" },
            ],
            ["--requirepass", password],
        ]
        .concat()
        .into_iter()
        .map(str::to_string)
        .collect();
        Self::launch(port, args, Some(password.to_string()))
    }

    fn launch(port: u16, mut args: Vec<String>, tls_password: Option<String>) -> Self {
        let dir = temp_dir("redis");
        // The settings every private server has; `args` come after and win.
        let mut all: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--dir"]
            .into_iter()
            .map(str::to_string)
            .collect();
        all.push(dir.display().to_string());
        all.append(&mut args);
        let mut redis = OwnRedis {
            port,
            dir,
            child: None,
            args: all,
            tls_password,
        };
        redis.restart();
        redis
    }

    /// `redis://` to this server; `rediss://` with the password and the IP
    /// address for a TLS one (its certificate names both `localhost` and
    /// `127.0.0.1`).
    pub fn url(&self) -> String {
        match &self.tls_password {
            None => format!("redis://127.0.0.1:{}/0", self.port),
            Some(password) => format!("rediss://:{password}@127.0.0.1:{}/0", self.port),
        }
    }

    /// Starts (again) on the same port and data directory, and waits until
    /// it listens.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/services.sh installs it)");
        self.child = Some(child);
        wait_for_port(self.port, REDIS_BOOT, "own redis-server");
    }

    /// Kills the server (SIGKILL) and waits for it; what it wrote to its
    /// AOF stays for [`restart`](Self::restart).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP) until [`resume`](Self::resume): a
    /// replica that stops acknowledging, a primary that stops answering.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`pause`](Self::pause)d server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            assert!(
                send_signal(sig, &c.id().to_string()),
                "kill {sig} own redis"
            );
        }
    }

    /// A connection of the test's own to this server, without a reply
    /// timeout (a `DEBUG SLEEP` on it takes as long as it takes).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let settings = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection_with_config(&settings)
            .await
            .expect("own redis connection")
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long a private Redis Cluster may take to agree on its slots.
const CLUSTER_BOOT: Duration = Duration::from_secs(60);

/// A private Redis Cluster: `masters` masters with `replicas` replicas
/// each, every node an [`OwnRedis`] with cluster mode on (its bus on a free
/// port of its own), joined by `redis-cli --cluster create`. Killed and
/// removed on drop.
pub struct OwnRedisCluster {
    /// Every node, the masters first.
    pub nodes: Vec<OwnRedis>,
}

impl OwnRedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node
    /// says `cluster_state:ok`.
    pub fn start(masters: usize, replicas: usize) -> Self {
        let nodes: Vec<OwnRedis> = (0..masters * (1 + replicas))
            .map(|_| {
                let bus = free_port().to_string();
                OwnRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "2000",
                    "--appendonly",
                    "no",
                ])
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create
            .arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes");
        run_ok(
            &mut create,
            "redis-cli --cluster create",
            "redis-cli must be installed",
        );
        let cluster = OwnRedisCluster { nodes };
        let deadline = Instant::now() + CLUSTER_BOOT;
        // The nodes learn the slots by gossip: poll each until it agrees.
        for n in &cluster.nodes {
            loop {
                let out = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "own Redis Cluster not ok within {CLUSTER_BOOT:?}"
                );
                std::thread::sleep(PORT_POLL);
            }
        }
        cluster
    }

    /// Runs `redis-cli ARGS` on every node (e.g. `SCRIPT FLUSH`).
    pub fn on_every_node(&self, args: &[&str]) {
        for n in &self.nodes {
            run_ok(
                Command::new("redis-cli")
                    .args(["-p", &n.port.to_string()])
                    .args(args),
                "redis-cli on a cluster node",
                "redis-cli must be installed",
            );
        }
    }

    /// `redis-cli -p PORT ARGS` on one node: its output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = run_ok(
            Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args),
            "redis-cli on a cluster node",
            "redis-cli must be installed",
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The index in [`nodes`](Self::nodes) of the first master, once all
    /// its replicas have every write it took (`INFO replication` offsets).
    pub fn replicated_master(&self, within: Duration) -> usize {
        let i = self
            .nodes
            .iter()
            .position(|n| self.cli(n.port, &["ROLE"]).starts_with("master"))
            .expect("a master");
        let deadline = Instant::now() + within;
        loop {
            let info = self.cli(self.nodes[i].port, &["INFO", "replication"]);
            let field = |name: &str| -> Vec<String> {
                info.lines()
                    .filter_map(|l| l.trim().strip_prefix(name).map(str::to_string))
                    .collect()
            };
            let master = field("master_repl_offset:");
            let replicas: Vec<String> = field("slave")
                .into_iter()
                .filter_map(|l| {
                    l.split(',')
                        .find_map(|kv| kv.strip_prefix("offset=").map(str::to_string))
                })
                .collect();
            if !replicas.is_empty() && replicas.iter().all(|o| master.contains(o)) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "replicas never caught up: {info}"
            );
            std::thread::sleep(PORT_POLL);
        }
    }

    /// `redis+cluster://` with every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

/// A private RabbitMQ node: its own node name, ports, home (Erlang cookie)
/// and data directory, no plugins. Plain AMQP, for tests that make the
/// broker misbehave (a memory alarm), or TLS only
/// ([`start_tls`](Self::start_tls)). Starting blocks for 10 to 30 s on a
/// loaded 2-core machine. Killed and removed on drop.
pub struct OwnRabbit {
    /// The AMQP (or AMQPS) port.
    pub port: u16,
    /// The Erlang node name, `kairos-test-PORT@localhost`.
    pub node: String,
    dir: PathBuf,
    child: Child,
    tls: bool,
}

impl OwnRabbit {
    /// A node with a plain AMQP listener on a free port.
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// A node that only speaks TLS, with the certificates of `files`.
    /// `client_cert_required`: the node asks for a client certificate
    /// signed by the CA and refuses a client without one.
    pub fn start_tls(files: &TlsFiles, client_cert_required: bool) -> Self {
        let path = |p: &Path| p.display().to_string();
        let verify = if client_cert_required {
            "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
        } else {
            "ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
        };
        let listener = |port: u16| {
            format!(
                "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n{verify}loopback_users.guest = true\n",
                path(&files.ca),
                path(&files.server_cert),
                path(&files.server_key),
            )
        };
        Self::launch(Some(&listener))
    }

    /// Starts a node; `tls_config` writes its `rabbitmq.conf` for the AMQP
    /// port (none: the defaults, a plain listener). Waits until the port
    /// accepts connections.
    fn launch(tls_config: Option<&dyn Fn(u16) -> String>) -> Self {
        let port = free_port();
        let dist_port = free_port();
        let node = format!("kairos-test-{port}@localhost");
        let dir = temp_dir("rabbit");
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("home dir");
        // The node and `rabbitmqctl` read the cookie from HOME; writing it
        // first gives both the same one.
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("kairos-test-{port}")).expect("cookie");
        restrict_to_owner(&cookie);
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        if let Some(config) = tls_config {
            std::fs::write(dir.join("rabbitmq.conf"), config(port)).expect("rabbitmq.conf");
        }
        let child = Command::new(Path::new(RABBIT_BIN).join("rabbitmq-server"))
            .envs(rabbit_env(&dir, &node))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            // Absent files (plain node) mean the defaults.
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server must be installed (scripts/services.sh installs it)");
        let rabbit = OwnRabbit {
            port,
            node,
            dir,
            child,
            tls: tls_config.is_some(),
        };
        wait_for_port(port, RABBIT_BOOT, "own RabbitMQ node");
        rabbit
    }

    /// `amqp://` as guest, or `amqps://` to `localhost` (the name in the
    /// certificate) for a TLS node; guest is allowed from loopback.
    pub fn url(&self) -> String {
        if self.tls {
            format!("amqps://guest:guest@localhost:{}/%2f", self.port)
        } else {
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
        }
    }

    /// Runs `rabbitmqctl -n NODE ARGS` against this node only, and asserts
    /// that it succeeded. Blocking.
    pub fn ctl(&self, args: &[&str]) {
        run_ok(
            Command::new(Path::new(RABBIT_BIN).join("rabbitmqctl"))
                .envs(rabbit_env(&self.dir, &self.node))
                .args(["-n", &self.node])
                .args(args),
            &format!("rabbitmqctl {args:?}"),
            "run rabbitmqctl",
        );
    }

    /// A memory alarm: the node blocks every connection that publishes.
    pub fn block_publishers(&self) {
        self.ctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
    }

    /// Back to the default watermark: the alarm clears.
    pub fn unblock_publishers(&self) {
        self.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    }

    /// The node's own log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log").join(format!("{}.log", self.node)))
            .unwrap_or_default()
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        // A graceful `rabbitmqctl stop` takes up to 20 s on a busy machine,
        // and the node's data is thrown away: kill the Erlang VM whose pid
        // the node wrote. Before it wrote one, only a stop reaches the VM.
        let pid_file = self.dir.join("mnesia").join(format!("{}.pid", self.node));
        let killed =
            std::fs::read_to_string(pid_file).is_ok_and(|pid| send_signal("-KILL", pid.trim()));
        if !killed {
            let _ = Command::new(Path::new(RABBIT_BIN).join("rabbitmqctl"))
                .envs(rabbit_env(&self.dir, &self.node))
                .args(["-n", &self.node, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The environment that ties `rabbitmq-server` and `rabbitmqctl` to one
/// node: its name, and the home that holds its Erlang cookie.
fn rabbit_env(dir: &Path, node: &str) -> [(&'static str, String); 2] {
    [
        ("HOME", dir.join("home").display().to_string()),
        ("RABBITMQ_NODENAME", node.to_string()),
    ]
}

/// Erlang refuses a cookie file that others can read.
fn restrict_to_owner(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400));
}
