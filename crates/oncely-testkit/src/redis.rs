//! Real Redis servers for tests: a standalone `redis-server` and a 3-master Redis Cluster,
//! started on loopback in a temporary directory and killed when the test process exits.
//!
//! ```no_run
//! # async fn demo() {
//! let server = oncely_testkit::redis::RedisServer::shared();
//! let url = server.url(); // redis://127.0.0.1:PORT
//! # let _ = url;
//! # }
//! ```
//!
//! `ONCELY_TEST_REDIS_URL` (and `ONCELY_TEST_REDIS_CLUSTER_URL`, as
//! `redis+cluster://host:port,…`) point the shared instances at servers someone else runs
//! instead. Tests isolate themselves with a key prefix of their own, so one server per
//! test process is enough.
//!
//! The binaries come from `PATH` (`apt-get install redis-server redis-tools`).
//!
//! # TLS
//!
//! [`RedisServer::start_tls`] and [`RedisCluster::start_tls`] start servers that speak TLS
//! only (`--port 0 --tls-port P`; the cluster bus and replication over TLS too), with
//! certificates from a [`Pki`]: `rediss://` URLs. The files are copied into the server's
//! directory, so the [`Pki`] may be dropped once the server runs; [`RedisServer::ca_file`]
//! names the copy of the CA. Admin commands ([`RedisServer::command`]) then go through
//! `redis-cli --tls`, with the test CA's client certificate and without checking the
//! server's (which may be a wrong one on purpose). [`RedisServer::shared_tls`] and
//! [`RedisCluster::shared_tls`] are the process's shared TLS instances (never external ones).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::TiedProcess;
pub use crate::tls::ClientAuth;
use crate::tls::{CertFiles, Pki};

/// How long a server gets to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `redis-server` on loopback, killed when it is dropped or the test process exits.
pub struct RedisServer {
    // Dropped first: the server stops before its directory is removed.
    process: Mutex<Option<TiedProcess>>,
    port: u16,
    dir: Option<tempfile::TempDir>,
    extra: Vec<String>,
    external: Option<String>,
    /// A TLS-only server: how it treats client certificates (its files are in `dir`).
    tls: Option<ClientAuth>,
}

/// The names of the TLS files in a server's directory.
const TLS_FILES: [&str; 5] = ["tls-ca.pem", "tls-server.pem", "tls-server.key", "tls-client.pem", "tls-client.key"];

impl RedisServer {
    /// The server this test process shares: started on first use (or `ONCELY_TEST_REDIS_URL`).
    pub fn shared() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("ONCELY_TEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => RedisServer {
                port: 0,
                dir: None,
                extra: Vec::new(),
                process: Mutex::new(None),
                external: Some(url),
                tls: None,
            },
            _ => RedisServer::start(&[]),
        })
    }

    /// Starts a server of this test's own, with extra `redis-server` arguments (for
    /// example `["--appendonly", "yes", "--appendfsync", "always"]`).
    ///
    /// # Panics
    /// When `redis-server` is missing or does not answer within 30 s: a test setup failure.
    pub fn start(extra: &[&str]) -> RedisServer {
        let server = Self::unstarted(extra, None, false);
        server.restart();
        server
    }

    /// The TLS server this test process shares: started on first use, with a certificate
    /// for `127.0.0.1`/`localhost` from a CA of its own ([`ca_file`](Self::ca_file)),
    /// client certificates optional.
    pub fn shared_tls() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pki = Pki::new();
            RedisServer::start_tls(&pki, &pki.server, ClientAuth::Optional, &[])
        })
    }

    /// Starts a TLS-only server of this test's own that presents `cert` (one of `pki`'s,
    /// or a wrong one: expired, from another CA, for another name), trusts `pki`'s CA for
    /// client certificates and asks for them as `auth` says.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_tls(pki: &Pki, cert: &CertFiles, auth: ClientAuth, extra: &[&str]) -> RedisServer {
        let server = Self::unstarted(extra, Some((pki, cert, auth)), false);
        server.restart();
        server
    }

    fn unstarted(extra: &[&str], tls: Option<(&Pki, &CertFiles, ClientAuth)>, with_bus: bool) -> RedisServer {
        let dir = tempfile::tempdir().expect("a temporary directory for redis");
        if let Some((pki, cert, _)) = tls {
            let sources = [&pki.ca_file(), &cert.cert, &cert.key, &pki.client.cert, &pki.client.key];
            for (source, name) in sources.into_iter().zip(TLS_FILES) {
                let target = dir.path().join(name);
                std::fs::copy(source, &target)
                    .unwrap_or_else(|e| panic!("copy {} to {}: {e}", source.display(), target.display()));
            }
        }
        RedisServer {
            port: free_port_pair(with_bus),
            dir: Some(dir),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            process: Mutex::new(None),
            external: None,
            tls: tls.map(|(_, _, auth)| auth),
        }
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://127.0.0.1:PORT` for a TLS server.
    pub fn url(&self) -> String {
        match &self.external {
            Some(url) => url.clone(),
            None if self.tls.is_some() => format!("rediss://127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// A TLS server's copy of the CA certificate that issued its certificate (and the
    /// client certificates it accepts); `None` for a plain-text server.
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.tls_file(0)
    }

    fn tls_file(&self, index: usize) -> Option<std::path::PathBuf> {
        let dir = self.dir.as_ref()?;
        self.tls.map(|_| dir.path().join(TLS_FILES[index]))
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL: no save, no goodbye), as a crash would.
    pub fn kill(&self) {
        if let Some(process) = self.process.lock().expect("lock").take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port and directory (after [`kill`](Self::kill)),
    /// and waits until it answers `PING`.
    pub fn restart(&self) {
        let dir = self.dir.as_ref().expect("a server this test started").path();
        let mut command = Command::new("redis-server");
        let port = self.port.to_string();
        match self.tls {
            None => command.args(["--port", &port]),
            Some(auth) => {
                let [ca, cert, key, client_cert, client_key] = TLS_FILES.map(|name| dir.join(name));
                let auth = match auth {
                    ClientAuth::Optional => "optional",
                    ClientAuth::Required => "yes",
                };
                command
                    .args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", auth])
                    .args(["--tls-replication", "yes"])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca)
                    // What it presents when it connects out (the cluster bus, a primary): a
                    // client certificate, which a server certificate is not.
                    .arg("--tls-client-cert-file")
                    .arg(client_cert)
                    .arg("--tls-client-key-file")
                    .arg(client_key)
            }
        };
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--dir"])
            .arg(dir)
            .args(["--logfile", "redis.log", "--protected-mode", "no"])
            .args(&self.extra);
        // The directory outlives a server kept in a static; the watchdog removes it.
        let process = TiedProcess::spawn_cleaning(command, Some(dir));
        self.wait_for_ping();
        *self.process.lock().expect("lock") = Some(process);
    }

    /// Sends one command and returns the server's reply as text (for `INFO`, `CONFIG`),
    /// one element per line.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|e| panic!("redis command {args:?} on port {}: {e}", self.port))
    }

    fn try_command(&self, args: &[&str]) -> std::io::Result<String> {
        if self.tls.is_none() {
            return try_command(self.port, args);
        }
        let (cert, key) = (self.tls_file(3), self.tls_file(4));
        let output = Command::new("redis-cli")
            .args(["--tls", "--insecure", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--cert")
            .args(cert)
            .arg("--key")
            .args(key)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            return Err(std::io::Error::other(String::from_utf8_lossy(&output.stderr).into_owned()));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Polls `PING` until the server answers: readiness is a reply, not a sleep.
    fn wait_for_ping(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(reply) = self.try_command(&["PING"])
                && reply.starts_with("PONG")
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A 3-master Redis Cluster on loopback (no replicas), created with
/// `redis-cli --cluster create`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    external: Option<String>,
}

impl RedisCluster {
    /// The cluster this test process shares: created on first use (or
    /// `ONCELY_TEST_REDIS_CLUSTER_URL`).
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("ONCELY_TEST_REDIS_CLUSTER_URL") {
            Ok(url) if !url.is_empty() => RedisCluster { nodes: Vec::new(), external: Some(url) },
            _ => RedisCluster::start(),
        })
    }

    /// The TLS cluster this test process shares: created on first use, every node with a
    /// certificate for `127.0.0.1`/`localhost` from one CA of its own
    /// ([`RedisServer::ca_file`] of any node), client certificates optional.
    pub fn shared_tls() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pki = Pki::new();
            RedisCluster::start_tls(&pki, ClientAuth::Optional)
        })
    }

    /// Starts three cluster-enabled servers and joins them into one cluster.
    ///
    /// # Panics
    /// When the servers do not start or the cluster does not reach `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        Self::start_with(None)
    }

    /// As [`start`](Self::start), TLS only: clients, the cluster bus and replication, every
    /// node presenting `pki`'s server certificate.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_tls(pki: &Pki, auth: ClientAuth) -> RedisCluster {
        Self::start_with(Some((pki, auth)))
    }

    fn start_with(tls: Option<(&Pki, ClientAuth)>) -> RedisCluster {
        let mut extra =
            vec!["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"];
        if tls.is_some() {
            extra.extend(["--tls-cluster", "yes"]);
        }
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let server = RedisServer::unstarted(&extra, tls.map(|(pki, auth)| (pki, &pki.server, auth)), true);
                server.restart();
                server
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut create = Command::new("redis-cli");
        if let Some(node) = nodes.first().filter(|n| n.tls.is_some()) {
            create.arg("--tls").arg("--cacert").args(node.ca_file()).arg("--cert").args(node.tls_file(3));
            create.arg("--key").args(node.tls_file(4));
        }
        let output = create
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs (apt-get install redis-tools)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes, external: None };
        cluster.wait_until_ok();
        cluster
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3` (`rediss+cluster://` for a
    /// TLS cluster).
    pub fn url(&self) -> String {
        match &self.external {
            Some(url) => url.clone(),
            None => {
                let nodes: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
                let tls = self.nodes.first().is_some_and(|n| n.tls.is_some());
                format!("{}://{}", if tls { "rediss+cluster" } else { "redis+cluster" }, nodes.join(","))
            }
        }
    }

    /// The nodes, in the order they were created.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Moves `slot` to the node `to` (an index into [`nodes`](Self::nodes)), keys and all,
    /// the way `redis-cli --cluster reshard` does: [`begin_slot_move`](Self::begin_slot_move),
    /// then [`finish_slot_move`](Self::finish_slot_move). Clients that cached the old owner
    /// get `MOVED`.
    pub fn move_slot(&self, slot: u16, to: usize) {
        if let Some(from) = self.begin_slot_move(slot, to) {
            self.finish_slot_move(slot, from, to);
        }
    }

    /// Opens the migration of `slot` to node `to` (IMPORTING on the target, MIGRATING on
    /// the source) without moving any key: the state a slot is in during a reshard, where
    /// commands on missing keys are redirected with `ASK`. Returns the source's index, or
    /// `None` when `to` already owns the slot.
    pub fn begin_slot_move(&self, slot: u16, to: usize) -> Option<usize> {
        let slot_s = slot.to_string();
        let ids = self.ids();
        let from = self.owner_of(slot);
        if from == to {
            return None;
        }
        ok(slot, self.nodes[to].command(&["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &ids[from]]));
        ok(slot, self.nodes[from].command(&["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &ids[to]]));
        Some(from)
    }

    /// Finishes a migration begun by [`begin_slot_move`](Self::begin_slot_move): `MIGRATE`s
    /// the slot's keys, then assigns the slot to `to` on every node.
    pub fn finish_slot_move(&self, slot: u16, from: usize, to: usize) {
        let slot_s = slot.to_string();
        let ids = self.ids();
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        loop {
            let keys = source.command(&["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = target.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            let reply = source.command(&args);
            assert!(reply.starts_with("OK") || reply.starts_with("NOKEY"), "MIGRATE failed: {reply}");
        }
        for node in &self.nodes {
            ok(slot, node.command(&["CLUSTER", "SETSLOT", &slot_s, "NODE", &ids[to]]));
        }
        self.wait_until_ok();
    }

    fn ids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.command(&["CLUSTER", "MYID"]).trim().to_string()).collect()
    }

    /// The index of the node that owns `slot`.
    pub fn owner_of(&self, slot: u16) -> usize {
        // CLUSTER NODES: "<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <ranges…>".
        let nodes = self.nodes[0].command(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let range = range.trim_start_matches('[');
                match range.split_once('-') {
                    Some((a, b)) => {
                        matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                    }
                    None => range.parse::<u16>() == Ok(slot),
                }
            });
            if owns {
                let port = fields[1].split(['@', ':']).nth(1).and_then(|p| p.parse::<u16>().ok());
                if let Some(index) = self.nodes.iter().position(|n| Some(n.port) == port) {
                    return index;
                }
            }
        }
        panic!("no node owns slot {slot}: {nodes}");
    }

    fn wait_until_ok(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ok = self.nodes.iter().all(|n| n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not reach cluster_state:ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn ok(slot: u16, reply: String) {
    assert!(reply.starts_with("OK"), "CLUSTER SETSLOT {slot}: {reply}");
}

/// A port that is free now, and (for cluster nodes) whose bus port (+10000) is free too.
fn free_port_pair(with_bus: bool) -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("addr").port();
        if !with_bus {
            return port;
        }
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn try_command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)?;
    let mut reader = BufReader::new(stream);
    let mut out = String::new();
    read_reply(&mut reader, &mut out)?;
    Ok(out)
}

fn read_reply(reader: &mut BufReader<TcpStream>, out: &mut String) -> std::io::Result<()> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected reply {line:?}"));
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    match kind {
        "+" | ":" => {
            out.push_str(rest);
            out.push('\n');
        }
        "-" => {
            out.push_str(rest);
            out.push('\n');
        }
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len >= 0 {
                let mut buf = vec![0; len as usize + 2];
                reader.read_exact(&mut buf)?;
                out.push_str(&String::from_utf8_lossy(&buf[..len as usize]));
                out.push('\n');
            }
        }
        "*" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            for _ in 0..len.max(0) {
                read_reply(reader, out)?;
            }
        }
        _ => return Err(bad()),
    }
    Ok(())
}
