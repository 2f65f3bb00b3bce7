//! A real `redis-server` on a free port (of loopback, or of an address given with the command
//! that starts it inside a network namespace) with an append-only file in its own directory,
//! killed by pid when dropped. It can be SIGKILLed and started again on the same port and
//! directory to play a Redis crash (what it had not written to its append-only file is gone).
//! [`RedisServer::start_tls`] starts one that also serves TLS on a second port,
//! [`RedisServer::start_tls_only`] one that serves TLS only (replicating over TLS), and
//! [`RedisSentinel::start_tls`] a sentinel that speaks TLS only, to clients and to the servers.

use crate::process::{append, Proc};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a starting redis-server may take to answer PING (it answers LOADING while it reads
/// its append-only file).
const STARTUP: Duration = Duration::from_secs(20);

/// Where the server keeps its files: a temp dir removed on drop, or a directory of the caller.
enum Dir {
    Temp(TempDir),
    Kept(PathBuf),
}

pub struct RedisServer {
    pub port: u16,
    /// The address it listens on.
    pub host: IpAddr,
    /// The command that runs `redis-server` (empty: run it directly).
    launcher: Vec<String>,
    dir: Dir,
    appendfsync: String,
    /// The TLS port and its files, when the server serves TLS too.
    tls: Option<(u16, TlsFiles)>,
    /// It serves TLS only, on `port` (no plain port), and replicates over TLS.
    tls_only: bool,
    process: Option<Proc>,
}

/// What a [`RedisServer`] serves TLS with (PEM files), and whether it requires a client
/// certificate signed by `ca_file` (`tls-auth-clients yes`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    pub auth_clients: bool,
    /// The certificate and key it shows when it connects out (a replica to its primary, a
    /// sentinel to anything) and `redis-cli` shows it; without, `cert_file` and `key_file`.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// The certificate and key shown when connecting to a server with these files.
    fn client_pair(&self) -> (&Path, &Path) {
        match &self.client {
            Some((cert, key)) => (cert, key),
            None => (&self.cert_file, &self.key_file),
        }
    }

    /// The `redis-cli` arguments that reach a server with these files.
    pub(crate) fn cli_args(&self) -> Vec<String> {
        let (cert, key) = self.client_pair();
        let path = |path: &Path| path.display().to_string();
        vec![
            "--tls".to_string(),
            "--cacert".to_string(),
            path(&self.ca_file),
            "--cert".to_string(),
            path(cert),
            "--key".to_string(),
            path(key),
        ]
    }

    /// The `tls-…` settings of a server or sentinel with these files, as (name, value).
    pub(crate) fn settings(&self) -> Vec<(&'static str, String)> {
        let (cert, key) = self.client_pair();
        let path = |path: &Path| path.display().to_string();
        let auth_clients = if self.auth_clients { "yes" } else { "no" };
        vec![
            ("tls-cert-file", path(&self.cert_file)),
            ("tls-key-file", path(&self.key_file)),
            ("tls-ca-cert-file", path(&self.ca_file)),
            ("tls-client-cert-file", path(cert)),
            ("tls-client-key-file", path(key)),
            ("tls-auth-clients", auth_clients.to_string()),
        ]
    }
}

impl RedisServer {
    /// Starts one in a temp dir with `appendfsync always`; fails the test if it cannot.
    pub fn start() -> RedisServer {
        let started = tempfile::tempdir().and_then(|dir| {
            Self::launch_new(
                Dir::Temp(dir),
                "always",
                IpAddr::from([127, 0, 0, 1]),
                Vec::new(),
            )
        });
        started.unwrap_or_else(|error| {
            panic!("cannot start redis-server (scripts/test installs it): {error}")
        })
    }

    /// Starts one keeping its files in `dir` (created if needed), with this `appendfsync`.
    pub fn try_start(dir: PathBuf, appendfsync: &str) -> std::io::Result<RedisServer> {
        Self::try_start_on(dir, appendfsync, IpAddr::from([127, 0, 0, 1]), Vec::new())
    }

    /// Like [`RedisServer::try_start`], listening on `host` and started by `launcher` followed by
    /// `redis-server …` (such as `scripts/netns exec NET HOST`, which must exec it so that the
    /// pid killed is the server's). Protected mode is off on any address but loopback, so other
    /// hosts may connect.
    pub fn try_start_on(
        dir: PathBuf,
        appendfsync: &str,
        host: IpAddr,
        launcher: Vec<String>,
    ) -> std::io::Result<RedisServer> {
        std::fs::create_dir_all(&dir)?;
        Self::launch_new(Dir::Kept(dir), appendfsync, host, launcher)
    }

    fn launch_new(
        dir: Dir,
        appendfsync: &str,
        host: IpAddr,
        launcher: Vec<String>,
    ) -> std::io::Result<RedisServer> {
        let mut server = RedisServer {
            port: crate::free_port()?,
            host,
            launcher,
            dir,
            appendfsync: appendfsync.to_string(),
            tls: None,
            tls_only: false,
            process: None,
        };
        server.launch()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.host, self.port)
    }

    pub fn dir(&self) -> &Path {
        match &self.dir {
            Dir::Temp(dir) => dir.path(),
            Dir::Kept(dir) => dir,
        }
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    fn launch(&mut self) -> std::io::Result<()> {
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg("redis-server");
                command
            }
            None => Command::new("redis-server"),
        };
        let protected = if self.host.is_loopback() { "yes" } else { "no" };
        let plain_port = if self.tls_only { 0 } else { self.port };
        let child = command
            .args(["--port", &plain_port.to_string()])
            .args([
                "--bind",
                &self.host.to_string(),
                "--protected-mode",
                protected,
            ])
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", &self.appendfsync])
            .args(self.tls_args())
            .arg("--dir")
            .arg(self.dir())
            .stdin(Stdio::null())
            .stdout(append(&self.dir().join("redis.log"))?)
            .stderr(Stdio::null())
            .spawn()?;
        self.process = Some(Proc::from_child(child));
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            if let Some(status) = self.process.as_mut().and_then(Proc::try_exit) {
                return Err(std::io::Error::other(format!(
                    "redis-server on {}:{} exited at start: {status}",
                    self.host, self.port
                )));
            }
            std::thread::sleep(crate::POLL);
        }
        Err(std::io::Error::other(format!(
            "redis-server on {}:{} did not answer PING within {STARTUP:?}",
            self.host, self.port
        )))
    }

    /// True when Redis answers PING right now.
    pub fn ping(&self) -> bool {
        if self.tls_only {
            return cli_with(self.host, self.port, self.cli_tls(), &["PING"]).as_deref()
                == Some("PONG");
        }
        let address = SocketAddr::from((self.host, self.port));
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(500))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
    }

    /// Runs `redis-cli` against this server and returns its answer, trimmed. Panics when
    /// redis-cli cannot run or fails: for tests.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(self.cli_tls().map(TlsFiles::cli_args).unwrap_or_default())
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Sends a signal by name (`STOP`, `CONT`, …) to redis-server; true when it was delivered.
    pub fn signal(&self, name: &str) -> bool {
        self.process
            .as_ref()
            .is_some_and(|process| process.signal(name))
    }

    /// How redis-server exited, once it has exited on its own (`None` while it runs).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(Proc::try_exit)
    }

    /// SIGKILLs Redis (its append-only file stays for the next start).
    pub fn kill(&mut self) {
        drop(self.process.take());
    }

    /// Starts Redis again on the same port and directory; fails the test if it cannot.
    pub fn restart(&mut self) {
        if let Err(error) = self.try_restart() {
            panic!("cannot restart redis-server: {error}");
        }
    }

    /// Starts Redis again on the same port and directory, reading its append-only file.
    pub fn try_restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.launch()
    }
}

/// Runs `redis-cli -h host -p port args…`, over TLS with `tls`, and returns its answer,
/// trimmed; `None` when redis-cli cannot run, fails, or the server does not answer within 2 s.
pub(crate) fn cli_with(
    host: IpAddr,
    port: u16,
    tls: Option<&TlsFiles>,
    args: &[&str],
) -> Option<String> {
    let output = Command::new("timeout")
        .args([
            "2",
            "redis-cli",
            "-h",
            &host.to_string(),
            "-p",
            &port.to_string(),
        ])
        .args(tls.map(TlsFiles::cli_args).unwrap_or_default())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    answer_of(&output)
}

/// Runs `redis-cli -p port args…` and returns its answer, trimmed; `None` when redis-cli cannot
/// run or fails.
pub(crate) fn cli_at(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    answer_of(&output)
}

/// What redis-cli answered, trimmed; `None` when it failed.
fn answer_of(output: &std::process::Output) -> Option<String> {
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The value of `field` in an answer of `redis-cli` made of `field:value` lines (`INFO`) or of
/// alternating field and value lines (`SENTINEL MASTER`).
fn field_of(answer: &str, field: &str) -> Option<String> {
    let lines: Vec<&str> = answer.lines().map(str::trim).collect();
    lines
        .iter()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .or_else(|| {
            let at = lines.iter().position(|line| *line == field)?;
            lines.get(at + 1).copied()
        })
        .map(str::to_string)
}

impl RedisServer {
    /// Starts one in a temp dir (like [`RedisServer::start`]) as a replica of `primary`, and
    /// returns once its link to the primary is up. Fails the test if it cannot.
    pub fn start_replica_of(primary: &RedisServer) -> RedisServer {
        let replica = RedisServer::start();
        let port = primary.port.to_string();
        replica.cli(&["REPLICAOF", &primary.host.to_string(), &port]);
        let deadline = Instant::now() + STARTUP;
        while replica
            .info_field("replication", "master_link_status")
            .as_deref()
            != Some("up")
        {
            assert!(
                Instant::now() < deadline,
                "replica on port {} did not connect to its primary on port {port} within {STARTUP:?}",
                replica.port
            );
            std::thread::sleep(crate::POLL);
        }
        replica
    }

    /// One field of `INFO section` (`role`, `connected_slaves`, …), if Redis answers.
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let answer = cli_with(self.host, self.port, self.cli_tls(), &["INFO", section])?;
        field_of(&answer, field)
    }

    /// The TLS files `redis-cli` needs to reach `port`: those of a server that serves TLS only.
    fn cli_tls(&self) -> Option<&TlsFiles> {
        match &self.tls {
            Some((_, files)) if self.tls_only => Some(files),
            _ => None,
        }
    }
}

/// A real `redis-sentinel` on a free loopback port watching one primary under a name, with
/// short timings (down after 1 s) so that a failover takes a few seconds. Its config file (which
/// Sentinel rewrites) lives in a temp dir; the process is killed by pid when dropped, before the
/// dir is removed.
pub struct RedisSentinel {
    pub port: u16,
    /// It speaks TLS only, with these files.
    tls: Option<TlsFiles>,
    process: Proc,
    dir: TempDir,
}

impl RedisSentinel {
    /// Starts one watching `primary` as `name`; `quorum` sentinels must agree it is down.
    /// Returns once it answers PING. Fails the test if it cannot.
    pub fn start(primary: &RedisServer, name: &str, quorum: usize) -> RedisSentinel {
        Self::try_start(primary, name, quorum, "", None).unwrap_or_else(|error| {
            panic!("cannot start redis-sentinel (scripts/test installs it): {error}")
        })
    }

    /// Like [`RedisSentinel::start`], logging in to the primary (and its replicas) as the ACL
    /// user `user` with `password`.
    pub fn start_with_login(
        primary: &RedisServer,
        name: &str,
        quorum: usize,
        user: &str,
        password: &str,
    ) -> RedisSentinel {
        let login =
            format!("sentinel auth-user {name} {user}\nsentinel auth-pass {name} {password}\n");
        Self::try_start(primary, name, quorum, &login, None).unwrap_or_else(|error| {
            panic!("cannot start redis-sentinel (scripts/test installs it): {error}")
        })
    }

    /// Like [`RedisSentinel::start`], speaking TLS only with `files`, to its clients, to the
    /// servers (which must serve TLS only, see [`RedisServer::start_tls_only`]) and to the other
    /// sentinels.
    pub fn start_tls(
        primary: &RedisServer,
        name: &str,
        quorum: usize,
        files: TlsFiles,
    ) -> RedisSentinel {
        Self::try_start(primary, name, quorum, "", Some(files)).unwrap_or_else(|error| {
            panic!("cannot start redis-sentinel with TLS (scripts/test installs it): {error}")
        })
    }

    /// Starts one with `extra` lines at the end of its config file, over TLS only with `tls`.
    fn try_start(
        primary: &RedisServer,
        name: &str,
        quorum: usize,
        extra: &str,
        tls: Option<TlsFiles>,
    ) -> std::io::Result<RedisSentinel> {
        let dir = tempfile::tempdir()?;
        let port = crate::free_port()?;
        let config = dir.path().join("sentinel.conf");
        let listen = match &tls {
            None => format!("port {port}\n"),
            Some(files) => {
                let settings: String = files
                    .settings()
                    .into_iter()
                    .map(|(name, value)| format!("{name} {value}\n"))
                    .collect();
                format!("port 0\ntls-port {port}\ntls-replication yes\n{settings}")
            }
        };
        std::fs::write(
            &config,
            format!(
                "{listen}bind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                 sentinel monitor {name} {host} {primary_port} {quorum}\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 4000\n\
                 sentinel parallel-syncs {name} 1\n{extra}",
                dir = dir.path().display(),
                host = primary.host,
                primary_port = primary.port,
            ),
        )?;
        let log = dir.path().join("sentinel.log");
        let child = Command::new("redis-sentinel")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(append(&log)?)
            .stderr(append(&log)?)
            .spawn()?;
        let mut sentinel = RedisSentinel {
            port,
            tls,
            process: Proc::from_child(child),
            dir,
        };
        let deadline = Instant::now() + STARTUP;
        while sentinel.cli(&["PING"]).as_deref() != Some("PONG") {
            if let Some(status) = sentinel.process.try_exit() {
                return Err(std::io::Error::other(format!(
                    "redis-sentinel on port {port} exited at start: {status}\n{}",
                    crate::tail(&log, 20)
                )));
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "redis-sentinel on port {port} did not answer PING within {STARTUP:?}"
                )));
            }
            std::thread::sleep(crate::POLL);
        }
        Ok(sentinel)
    }

    /// `127.0.0.1:PORT`, as a node's `database.sentinels` names it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port of the primary this sentinel names for `name` now.
    pub fn primary_port(&self, name: &str) -> Option<u16> {
        let answer = self.cli(&["SENTINEL", "get-master-addr-by-name", name])?;
        answer.lines().nth(1)?.trim().parse().ok()
    }

    /// True once this sentinel knows `sentinels` other sentinels and `replicas` replicas of `name`.
    pub fn knows(&self, name: &str, sentinels: usize, replicas: usize) -> bool {
        let Some(master) = self.cli(&["SENTINEL", "MASTER", name]) else {
            return false;
        };
        let count = |field: &str| field_of(&master, field).and_then(|value| value.parse().ok());
        count("num-other-sentinels") == Some(sentinels) && count("num-slaves") == Some(replicas)
    }

    /// Runs `redis-cli` against this sentinel (over TLS if it speaks TLS); `None` when it fails.
    fn cli(&self, args: &[&str]) -> Option<String> {
        cli_with(
            IpAddr::from([127, 0, 0, 1]),
            self.port,
            self.tls.as_ref(),
            args,
        )
    }

    /// The sentinel's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        crate::tail(&self.dir.path().join("sentinel.log"), 40)
    }
}

impl RedisServer {
    /// Starts one in a temp dir (like [`RedisServer::start`]) that also serves TLS with `files`
    /// on a port of its own ([`RedisServer::tls_url`]). The plain port stays open for
    /// [`RedisServer::ping`] and [`RedisServer::cli`]. Fails the test if it cannot.
    pub fn start_tls(files: TlsFiles) -> RedisServer {
        let started = tempfile::tempdir().and_then(|dir| {
            let mut server = RedisServer {
                port: crate::free_port()?,
                host: IpAddr::from([127, 0, 0, 1]),
                launcher: Vec::new(),
                dir: Dir::Temp(dir),
                appendfsync: "always".to_string(),
                tls: Some((crate::free_port()?, files)),
                tls_only: false,
                process: None,
            };
            server.launch()?;
            Ok(server)
        });
        started.unwrap_or_else(|error| {
            panic!("cannot start redis-server with TLS (scripts/test installs it): {error}")
        })
    }

    /// Starts one in a temp dir (like [`RedisServer::start`]) that serves TLS only, with
    /// `files`, on [`RedisServer::port`], and replicates over TLS: as a replica of `primary`
    /// (another such server) when given, returning once its link to it is up. Fails the test if
    /// it cannot.
    pub fn start_tls_only(files: TlsFiles, primary: Option<&RedisServer>) -> RedisServer {
        let started = tempfile::tempdir().and_then(|dir| {
            let port = crate::free_port()?;
            let launcher = match primary {
                Some(primary) => as_replica(&[], primary.address()),
                None => Vec::new(),
            };
            let mut server = RedisServer {
                port,
                host: IpAddr::from([127, 0, 0, 1]),
                launcher,
                dir: Dir::Temp(dir),
                appendfsync: "always".to_string(),
                tls: Some((port, files)),
                tls_only: true,
                process: None,
            };
            server.launch()?;
            Ok(server)
        });
        let server = started.unwrap_or_else(|error| {
            panic!("cannot start redis-server with TLS only (scripts/test installs it): {error}")
        });
        let deadline = Instant::now() + STARTUP;
        while primary.is_some()
            && server
                .info_field("replication", "master_link_status")
                .as_deref()
                != Some("up")
        {
            assert!(
                Instant::now() < deadline,
                "TLS replica on port {} did not connect to its primary within {STARTUP:?}\n{}",
                server.port,
                crate::tail(&server.dir().join("redis.log"), 20)
            );
            std::thread::sleep(crate::POLL);
        }
        server
    }

    /// `rediss://HOST:TLS_PORT`; panics on a server started without TLS.
    pub fn tls_url(&self) -> String {
        let (port, _) = self
            .tls
            .as_ref()
            .expect("tls_url() of a redis-server started without TLS");
        format!("rediss://{}:{port}", self.host)
    }

    /// The `--tls-…` arguments of a TLS server; none for a plain one.
    fn tls_args(&self) -> Vec<String> {
        let Some((port, files)) = &self.tls else {
            return Vec::new();
        };
        let mut settings = files.settings();
        settings.push(("tls-port", port.to_string()));
        if self.tls_only {
            settings.push(("tls-replication", "yes".to_string()));
        }
        settings
            .into_iter()
            .flat_map(|(name, value)| [format!("--{name}"), value])
            .collect()
    }
}

/// The script of the launcher that starts a server as a replica: `sh -c SCRIPT sh HOST PORT`
/// followed by `redis-server …` runs that with `--replicaof HOST PORT` added, keeping the pid.
const AS_REPLICA: &str = "host=$1 port=$2; shift 2; exec \"$@\" --replicaof \"$host\" \"$port\"";

/// `launcher` without the part that made it start a replica, if it has one.
fn without_replicaof(launcher: &[String]) -> Vec<String> {
    let cut = launcher
        .iter()
        .position(|part| part == AS_REPLICA)
        .map_or(launcher.len(), |at| at.saturating_sub(2));
    launcher[..cut].to_vec()
}

/// `launcher` made to start a replica of `primary` (`--replicaof`).
fn as_replica(launcher: &[String], primary: SocketAddr) -> Vec<String> {
    let mut launcher = without_replicaof(launcher);
    launcher.extend(
        ["sh", "-c", AS_REPLICA, "sh"]
            .into_iter()
            .map(str::to_string)
            .chain([primary.ip().to_string(), primary.port().to_string()]),
    );
    launcher
}

/// Runs `redis-cli -h host -p port args…` and returns its answer, trimmed; `None` when
/// redis-cli cannot run, fails, or the server does not answer within 2 s.
pub fn cli_on(host: IpAddr, port: u16, args: &[&str]) -> Option<String> {
    cli_with(host, port, None, args)
}

impl RedisServer {
    /// `host:port`.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((self.host, self.port))
    }

    /// Like [`RedisServer::try_start_on`], replicating `primary` from the start (`--replicaof`).
    pub fn try_start_replica_on(
        dir: PathBuf,
        appendfsync: &str,
        host: IpAddr,
        launcher: Vec<String>,
        primary: SocketAddr,
    ) -> std::io::Result<RedisServer> {
        Self::try_start_on(dir, appendfsync, host, as_replica(&launcher, primary))
    }

    /// The host is gone: SIGKILLs Redis and removes everything in its directory (append-only
    /// file, log), leaving it empty.
    pub fn kill_and_wipe(&mut self) -> std::io::Result<()> {
        self.kill();
        std::fs::remove_dir_all(self.dir())?;
        std::fs::create_dir_all(self.dir())
    }

    /// Starts it again on the same port and directory as a replica of `primary`
    /// (`--replicaof`): after [`RedisServer::kill_and_wipe`], a fresh, empty replica.
    pub fn try_restart_as_replica_of(&mut self, primary: SocketAddr) -> std::io::Result<()> {
        self.kill();
        self.launcher = as_replica(&self.launcher, primary);
        self.launch()
    }

    /// One field of `INFO section`, asked at its own address (also inside a network namespace
    /// reached over a bridge).
    pub fn info_on(&self, section: &str, field: &str) -> Option<String> {
        field_of(&cli_on(self.host, self.port, &["INFO", section])?, field)
    }

    /// True when it is a primary with `replicas` replicas online and caught up (lag of at most
    /// a second).
    pub fn has_replicas_online(&self, replicas: usize) -> bool {
        let Some(answer) = cli_on(self.host, self.port, &["INFO", "replication"]) else {
            return false;
        };
        let online = answer
            .lines()
            .filter(|line| line.starts_with("slave") && line.contains("state=online"))
            .filter(|line| {
                line.split(',')
                    .find_map(|part| part.strip_prefix("lag="))
                    .and_then(|lag| lag.trim().parse::<u64>().ok())
                    .is_some_and(|lag| lag <= 1)
            })
            .count();
        field_of(&answer, "role").as_deref() == Some("master") && online >= replicas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_launcher_adds_replicaof_once() {
        let primary = SocketAddr::from(([10, 0, 0, 2], 6379));
        let other = SocketAddr::from(([10, 0, 0, 3], 6380));
        let netns = vec!["netns".to_string(), "exec".into()];
        let once = as_replica(&netns, primary);
        assert_eq!(once[..2], netns[..]);
        assert_eq!(once[once.len() - 2..], ["10.0.0.2", "6379"]);
        let again = as_replica(&once, other);
        assert_eq!(again.len(), once.len());
        assert_eq!(again[again.len() - 2..], ["10.0.0.3", "6380"]);
        assert_eq!(without_replicaof(&again), netns);
        assert!(without_replicaof(&[]).is_empty());
    }
}
