//! A throwaway PostgreSQL server for tests (feature `postgres`).
//!
//! ```ignore
//! use oncely_testkit::postgres::PostgresServer;
//!
//! #[tokio::test]
//! async fn my_test() {
//!     let server = PostgresServer::shared().await;
//!     let url = server.fresh_database().await; // an empty database of this test's own
//!     // … connect to `url` …
//! }
//! ```
//!
//! # Where the server comes from
//!
//! - `ONCELY_TEST_POSTGRES_URL` set: that server (a URL naming a database the tests may
//!   create databases from, as a role allowed to `CREATE DATABASE`). Nothing is started;
//!   [`PostgresServer::stop`] and [`PostgresServer::start_again`] are refused.
//! - otherwise: `initdb` into a temporary directory and `postgres` on 127.0.0.1 on a free
//!   port, its socket in that directory too. The binaries are looked up on `PATH`, then in
//!   `/usr/lib/postgresql/*/bin` (Debian's `postgresql-NN` packages), newest first. When
//!   the tests run as root, both run as the `postgres` OS user (PostgreSQL refuses root),
//!   and the directory is handed to that user.
//!
//! The server runs with its defaults for durability (`fsync = on`, `synchronous_commit =
//! on`): tests of what survives a crash need them. Only `initdb` skips its own fsync
//! (`--no-sync`), which costs nothing a test relies on.
//!
//! # TLS
//!
//! [`PostgresServer::start_tls`] starts a server with `ssl=on` and a certificate from a
//! [`Pki`] (a right one, or a wrong one on purpose), and optionally requires client
//! certificates (`hostssl … clientcert=verify-ca` in `pg_hba.conf`).
//! [`PostgresServer::shared_tls`] is this process's shared TLS server. The certificate and
//! key are copied into the data directory, owned by the server's user and readable by it
//! alone (PostgreSQL refuses a key file others can read); the CA is copied beside it
//! ([`PostgresServer::ca_file`]) for clients. Such a server's [`url`](PostgresServer::url)
//! asks for `sslmode=require` (encrypted, the certificate unchecked, so that a server with a
//! wrong certificate still comes up), with the CA's client certificate when one is
//! required; tests write their own `sslmode=verify-full&sslrootcert=…`.
//!
//! # Lifetime
//!
//! [`PostgresServer::shared`] starts one server per test process, on first use, and keeps
//! it in a static, which Rust never drops. So that it still stops when the process ends
//! (passed, failed, or killed), every server has a *reaper*: a `sh` child that blocks
//! reading a pipe from this process. The pipe closes when this process exits, however it
//! exits; the reaper then stops `postgres` (immediate shutdown) and removes the directory.
//! A server from [`PostgresServer::start`] does the same when dropped.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::PgConnection;
use tokio::sync::OnceCell;

use crate::tls::{CertFiles, ClientAuth, Pki};

/// The variable naming an existing server to use instead of starting one.
pub const URL_VARIABLE: &str = "ONCELY_TEST_POSTGRES_URL";

/// How long a starting server may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// A PostgreSQL server for tests: started here, or the one `ONCELY_TEST_POSTGRES_URL` names.
pub struct PostgresServer {
    /// `postgres://…/postgres`: the maintenance database.
    url: String,
    local: Option<Mutex<Local>>,
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer").field("url", &self.url).field("local", &self.local.is_some()).finish()
    }
}

/// A server this process started.
struct Local {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    /// The running `postgres`, while it runs.
    postgres: Option<Child>,
    /// The reaper's stdin: one line per started postmaster's pid; EOF stops it.
    reaper: Option<(Child, ChildStdin)>,
    /// `ssl=on`, with the files [`Local::install_tls`] wrote.
    tls: bool,
}

/// The TLS files in the server's directory: in the data directory the server's own
/// (`server.crt`, `server.key`, and `root.crt`, the CA its clients' certificates must come
/// from); beside it, copies for clients.
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
const CLIENT_CA: &str = "root.crt";
const CA_COPY: &str = "ca.pem";
const CLIENT_CERT: &str = "client.pem";
const CLIENT_KEY: &str = "client.key";

static SHARED: OnceCell<PostgresServer> = OnceCell::const_new();

impl PostgresServer {
    /// The server of this test process, started on first use (see the [module docs](self)).
    ///
    /// # Panics
    /// When no server can be started (no binaries, `initdb` fails, it does not come up).
    pub async fn shared() -> &'static PostgresServer {
        SHARED
            .get_or_init(|| async {
                match std::env::var(URL_VARIABLE) {
                    Ok(url) if !url.is_empty() => PostgresServer { url, local: None },
                    _ => Self::start().await,
                }
            })
            .await
    }

    /// A server of the caller's own, always started here (never the external one): for
    /// tests that stop and restart it. Stopped and removed when dropped.
    ///
    /// # Panics
    /// When no server can be started.
    pub async fn start() -> PostgresServer {
        Self::start_with(None).await
    }

    /// The TLS server of this test process, started on first use: a certificate for
    /// `127.0.0.1`/`localhost` from a CA of its own ([`ca_file`](Self::ca_file)), client
    /// certificates optional. Always started here, never the external server.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub async fn shared_tls() -> &'static PostgresServer {
        static SHARED_TLS: OnceCell<PostgresServer> = OnceCell::const_new();
        SHARED_TLS
            .get_or_init(|| async {
                let pki = Pki::new();
                Self::start_tls(&pki, &pki.server, ClientAuth::Optional).await
            })
            .await
    }

    /// A server of the caller's own with `ssl=on`, presenting `cert` (one of `pki`'s, or a
    /// wrong one), trusting `pki`'s CA for client certificates, and with
    /// [`ClientAuth::Required`] accepting only TLS connections with a client certificate
    /// from it (`hostssl all all 127.0.0.1/32 trust clientcert=verify-ca`; no plain
    /// `host` line). See the [module docs](self#tls).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub async fn start_tls(pki: &Pki, cert: &CertFiles, auth: ClientAuth) -> PostgresServer {
        Self::start_with(Some((pki, cert, auth))).await
    }

    async fn start_with(tls: Option<(&Pki, &CertFiles, ClientAuth)>) -> PostgresServer {
        let bin = find_binaries().unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries (initdb, postgres) on PATH or in /usr/lib/postgresql/*/bin; \
                 install them (Debian: apt-get install postgresql) or set {URL_VARIABLE}"
            )
        });
        let owner = server_owner();
        let started = tokio::task::spawn_blocking(move || init(&bin, owner)).await.expect("initdb task");
        let mut local = started.unwrap_or_else(|e| panic!("cannot initialise a PostgreSQL data directory: {e}"));
        let mut query = String::new();
        if let Some((pki, cert, auth)) = tls {
            local.install_tls(pki, cert, auth).unwrap_or_else(|e| panic!("cannot set up TLS for postgres: {e}"));
            query.push_str("?sslmode=require");
            if auth == ClientAuth::Required {
                let (cert, key) = (local.dir.join(CLIENT_CERT), local.dir.join(CLIENT_KEY));
                query.push_str(&format!("&sslcert={}&sslkey={}", cert.display(), key.display()));
            }
        }
        let mut attempts = 0;
        loop {
            local.launch().unwrap_or_else(|e| panic!("cannot start postgres: {e}"));
            let url = format!("postgres://postgres@127.0.0.1:{}/postgres{query}", local.port);
            let mut server = PostgresServer { url, local: Some(Mutex::new(local)) };
            match server.ready().await {
                Ok(()) => return server,
                // The free port was taken before the server bound it (by any process's
                // outgoing connection, say): the server exited at once; a new port.
                Err(why) if attempts < 3 && why.contains("Address already in use") => {
                    attempts += 1;
                    let Some(taken) = server.local.take() else { panic!("{why}") };
                    local = taken.into_inner().unwrap_or_else(PoisonError::into_inner);
                    local.halt();
                    local.port = free_port().unwrap_or_else(|e| panic!("no free port: {e}"));
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    /// The URL of the maintenance database (`postgres`). Tests should not put tables in
    /// it; use [`fresh_database`](Self::fresh_database).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A TLS server's copy of the CA that issued its certificate (and the client
    /// certificates it accepts); `None` for a plain-text or external server.
    pub fn ca_file(&self) -> Option<PathBuf> {
        let local = lock(self.local.as_ref()?);
        local.tls.then(|| local.dir.join(CA_COPY))
    }

    /// The port on 127.0.0.1 of a server started here; `None` for an external one.
    pub fn port(&self) -> Option<u16> {
        self.local.as_ref().map(|local| lock(local).port)
    }

    /// Creates an empty database of its own and returns its URL.
    ///
    /// # Panics
    /// When the server does not answer.
    pub async fn fresh_database(&self) -> String {
        let name = unique_name("oncely_test");
        let mut conn = PgConnection::connect(&self.url).await.expect("connect to the test server");
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("CREATE DATABASE");
        let _ = conn.close().await;
        with_database(&self.url, &name)
    }

    /// Stops the server as a crash would (immediate shutdown: no checkpoint; what was
    /// committed is recovered from the WAL at the next start). Returns once it exited.
    ///
    /// # Panics
    /// For the external server, or when the server does not stop.
    pub fn stop(&self) {
        let mut local = self.local();
        local.halt();
    }

    /// Starts a stopped server again on the same port and waits until it accepts
    /// connections.
    ///
    /// # Panics
    /// For the external server, or when it does not come up.
    pub async fn start_again(&self) {
        self.local().launch().unwrap_or_else(|e| panic!("cannot restart postgres: {e}"));
        self.wait_ready().await;
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        lock(self.local.as_ref().unwrap_or_else(|| panic!("the server named by {URL_VARIABLE} cannot be stopped")))
    }

    /// Polls a connection until one succeeds; panics with the server's log otherwise.
    async fn wait_ready(&self) {
        if let Err(why) = self.ready().await {
            panic!("{why}");
        }
    }

    /// Polls a connection until one succeeds; the server's log when it exits or does not
    /// answer in time.
    async fn ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            match PgConnection::connect(&self.url).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(error) => {
                    let exited = self.local.as_ref().and_then(|local| lock(local).exited());
                    if exited.is_some() || Instant::now() >= deadline {
                        let log = self.local.as_ref().map(|local| lock(local).log()).unwrap_or_default();
                        return Err(format!("PostgreSQL did not come up ({error}; exit: {exited:?}); its log:\n{log}"));
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(local) = &self.local {
            lock(local).shut_down();
        }
    }
}

impl Local {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes the server's certificate, key and CA into the data directory (owned by the
    /// server's user, the key readable by it alone), copies of the CA and the client
    /// certificate beside it for clients, and for [`ClientAuth::Required`] a `pg_hba.conf`
    /// that takes only TLS connections with a client certificate from the CA.
    fn install_tls(&mut self, pki: &Pki, cert: &CertFiles, auth: ClientAuth) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data();
        let files = [
            (&cert.cert, data.join(SERVER_CERT)),
            (&cert.key, data.join(SERVER_KEY)),
            (&pki.ca_file(), data.join(CLIENT_CA)),
            (&pki.ca_file(), self.dir.join(CA_COPY)),
            (&pki.client.cert, self.dir.join(CLIENT_CERT)),
            (&pki.client.key, self.dir.join(CLIENT_KEY)),
        ];
        for (source, target) in files {
            std::fs::copy(source, &target)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::chown(&target, Some(uid), Some(gid))?;
            }
        }
        if auth == ClientAuth::Required {
            let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust clientcert=verify-ca\n";
            std::fs::write(data.join("pg_hba.conf"), hba)?;
        }
        self.tls = true;
        Ok(())
    }

    /// Starts `postgres` in the foreground of a child of ours and tells the reaper its pid.
    fn launch(&mut self) -> std::io::Result<()> {
        if self.postgres.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid))?;
        }
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(&self.dir)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            // Enough connections for several pools and gateways at once.
            .args(["-c", "max_connections=300", "-c", "fsync=on", "-c", "synchronous_commit=on"])
            .args(if self.tls {
                [
                    "-c",
                    "ssl=on",
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                    "-c",
                    "ssl_ca_file=root.crt",
                ]
                .as_slice()
            } else {
                &[]
            })
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C on the test run must not shut it down under
            // the tests; the reaper stops it when this process is gone.
            .process_group(0);
        as_owner(&mut command, self.owner);
        let child = command.spawn()?;
        let pid = child.id();
        self.postgres = Some(child);
        if let Some((_, stdin)) = self.reaper.as_mut() {
            writeln!(stdin, "{pid}")?;
            stdin.flush()?;
        }
        Ok(())
    }

    /// The exit status of a `postgres` that stopped by itself.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.postgres.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// Immediate shutdown (SIGQUIT) and wait for the exit.
    fn halt(&mut self) {
        let Some(mut child) = self.postgres.take() else { return };
        let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.wait();
    }

    /// Stops the server and lets the reaper remove the directory.
    fn shut_down(&mut self) {
        self.halt();
        if let Some((mut reaper, stdin)) = self.reaper.take() {
            drop(stdin);
            let _ = reaper.wait();
        }
    }
}

/// The reaper: records the pids it is sent; at EOF, stops the last one and removes the
/// directory. Runs as the directory's owner, in a process group of its own and deaf to
/// the usual termination signals, so that a signal to the test's process group (Ctrl-C,
/// `timeout`) cannot stop it before it has cleaned up.
const REAPER: &str = r#"
trap '' HUP INT TERM
pid=""
while read -r line; do pid="$line"; done
if [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null; then
    i=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$1"
"#;

/// `initdb` into a new temporary directory (owned by the server's user) and start the
/// reaper. Blocking.
fn init(bin: &Path, owner: Option<(u32, u32)>) -> std::io::Result<Local> {
    let dir = tempfile::Builder::new().prefix("oncely-pg-").tempdir()?.keep();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
    }
    // The reaper first, so that a failure below still removes the directory.
    let mut reaper = Command::new("sh");
    reaper
        .args(["-c", REAPER, "oncely-pg-reaper"])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0);
    as_owner(&mut reaper, owner);
    let mut reaper = reaper.spawn()?;
    let stdin = reaper.stdin.take().ok_or_else(|| std::io::Error::other("no reaper stdin"))?;
    let mut local = Local {
        dir: dir.clone(),
        bin: bin.to_path_buf(),
        port: free_port()?,
        owner,
        postgres: None,
        reaper: None,
        tls: false,
    };
    local.reaper = Some((reaper, stdin));

    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(local.data())
        .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"])
        .stdin(Stdio::null());
    as_owner(&mut initdb, owner);
    let output = initdb.output()?;
    if !output.status.success() {
        let mut message = String::from_utf8_lossy(&output.stdout).into_owned();
        message.push_str(&String::from_utf8_lossy(&output.stderr));
        local.shut_down();
        return Err(std::io::Error::other(format!("initdb failed ({}): {message}", output.status)));
    }
    Ok(local)
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

/// The uid and gid of the `postgres` OS user when this process runs as root (PostgreSQL
/// refuses to run as root); `None` otherwise (the server runs as the current user).
fn server_owner() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    // Root owns /proc/self when root runs this process.
    let me = std::fs::metadata("/proc/self").ok()?.uid();
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let found = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    });
    Some(found.unwrap_or_else(|| {
        panic!("running as root, and there is no `postgres` OS user to run the test server as (useradd postgres)")
    }))
}

/// The directory holding `initdb` and `postgres`: on `PATH` (through symlinks, as
/// Debian's are not), else the newest `/usr/lib/postgresql/NN/bin`.
fn find_binaries() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                // Resolve symlinks so `postgres` finds its own installation's files.
                let real = std::fs::canonicalize(dir.join("postgres")).ok()?;
                return real.parent().map(Path::to_path_buf).filter(|d| has_both(d)).or(Some(dir));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn lock(local: &Mutex<Local>) -> MutexGuard<'_, Local> {
    local.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `url` with its database (the path) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_end..].find('/').map_or(base.len(), |i| authority_end + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A name no other call in any process makes: `prefix`, this process's id, a counter
/// and the time. Letters, digits and underscores only, at most 63 bytes, so it is a valid
/// unquoted PostgreSQL identifier (table or database name) for a short `prefix`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(with_database("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(with_database("postgres://u@h:1/db?sslmode=disable", "x"), "postgres://u@h:1/x?sslmode=disable");
    }

    #[test]
    fn unique_names_are_identifiers() {
        let a = unique_name("t");
        assert_ne!(a, unique_name("t"));
        assert!(a.len() <= 63 && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{a}");
    }
}
