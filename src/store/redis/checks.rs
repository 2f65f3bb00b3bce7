//! What a node checks of its Redis: the replication, persistence and eviction of every primary
//! (`INFO replication`, `INFO persistence`, `INFO memory`, `CONFIG GET appendfsync`). Before it
//! starts ([`check`]): logged once, and refused when weaker than `database.min_replicas` or
//! `database.require_aof` ask, or when Redis may evict keys. While it runs ([`watch`], every
//! `database.check_interval`): a primary that turns off its append-only file or starts to evict
//! (changed by hand, or a failover promoted a replica set up otherwise) stops new orders until
//! it is mended ([`Fitness`]).

use super::conn::Connections;
use crate::config::DatabaseConfig;
use crate::store::StoreError;
use deadpool_redis::redis::{self, FromRedisValue, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tracing::{debug, error, info, warn};

/// Longest wait between two attempts to read a Redis that does not answer yet.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How long a start waits for `database.min_replicas` replicas to connect before it refuses.
pub const REPLICAS_WAIT: Duration = Duration::from_secs(10);

/// The replication and persistence of a Redis primary a node writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisInfo {
    /// The primary's address on a Redis Cluster; empty on a single Redis.
    pub primary: String,
    /// `master` or `slave`, as `INFO replication` says.
    pub role: String,
    pub connected_replicas: usize,
    pub aof_enabled: bool,
    /// `always`, `everysec` or `no`; `None` when `CONFIG GET` is refused (renamed or disabled).
    pub appendfsync: Option<String>,
    /// The memory limit in bytes (0: none) and what Redis does at it, as `INFO memory` says;
    /// `None` from a server whose `INFO` does not say.
    pub maxmemory: Option<(u64, String)>,
}

/// The `field:value` lines of an `INFO` answer; section headers (`# Replication`) are skipped.
fn fields(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.trim_end().split_once(':'))
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    fields(text).find_map(|(key, value)| (key == name).then_some(value))
}

impl RedisInfo {
    /// Reads the answers to `INFO replication`, `INFO persistence` and `INFO memory`.
    pub fn parse(
        replication: &str,
        persistence: &str,
        memory: &str,
        appendfsync: Option<String>,
    ) -> Result<RedisInfo, StoreError> {
        let missing = |name: &str| StoreError::Corrupt(format!("redis INFO has no `{name}` field"));
        let role = field(replication, "role").ok_or_else(|| missing("role"))?;
        let replicas = field(replication, "connected_slaves").unwrap_or("0");
        let connected_replicas = replicas
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("connected_slaves `{replicas}`")))?;
        let aof = field(persistence, "aof_enabled").ok_or_else(|| missing("aof_enabled"))?;
        let maxmemory = match (
            field(memory, "maxmemory"),
            field(memory, "maxmemory_policy"),
        ) {
            (Some(bytes), Some(policy)) => Some((
                bytes
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("maxmemory `{bytes}`")))?,
                policy.to_string(),
            )),
            _ => None,
        };
        Ok(RedisInfo {
            primary: String::new(),
            role: role.to_string(),
            connected_replicas,
            aof_enabled: aof == "1",
            appendfsync,
            maxmemory,
        })
    }

    /// `redis`, or `redis primary <address>` on a Redis Cluster: what messages call it.
    fn name(&self) -> String {
        if self.primary.is_empty() {
            "redis".to_string()
        } else {
            format!("redis primary {}", self.primary)
        }
    }

    /// The eviction policy, when it is not `noeviction`: at its memory limit, Redis would drop
    /// keys (orders, their index entries, idempotency keys) instead of refusing writes.
    pub fn evicting_policy(&self) -> Option<&str> {
        match &self.maxmemory {
            Some((_, policy)) if policy != "noeviction" => Some(policy),
            _ => None,
        }
    }

    /// Why a node configured with `database` must not start on this Redis, if it must not.
    pub fn shortfall(&self, database: &DatabaseConfig) -> Option<String> {
        if self.connected_replicas < database.min_replicas {
            return Some(format!(
                "{} has {} connected replicas but database.min_replicas = {}: every write would fail; \
                 attach replicas (replicaof) or lower database.min_replicas",
                self.name(),
                self.connected_replicas,
                database.min_replicas
            ));
        }
        self.unfit(database)
    }

    /// Why this Redis cannot keep orders as `database` asks, whatever the moment: its
    /// append-only file is off against `require_aof`, or it may evict keys. (Too few replicas
    /// is not: every write waits for them and fails while they are missing.)
    pub fn unfit(&self, database: &DatabaseConfig) -> Option<String> {
        if database.require_aof && !self.aof_enabled {
            return Some(format!(
                "{} has its append-only file off but database.require_aof = true: \
                 start it with --appendonly yes (and --appendfsync always for every write on disk)",
                self.name()
            ));
        }
        if let (Some((limit @ 1.., _)), Some(policy)) = (&self.maxmemory, self.evicting_policy()) {
            return Some(format!(
                "{} may evict keys (maxmemory {limit} bytes, maxmemory-policy {policy}): when \
                 full it would drop orders, their index entries or idempotency keys; set \
                 maxmemory-policy noeviction (a full redis then refuses writes, and the node \
                 answers 503 until it has room)",
                self.name()
            ));
        }
        None
    }
}

/// The text of one primary's answer to an `INFO` or `CONFIG GET`: an error answer is an error.
fn answer_text<T: FromRedisValue>(answer: Value, what: &str) -> Result<T, StoreError> {
    T::from_redis_value(answer).map_err(|error| StoreError::Unavailable(format!("{what}: {error}")))
}

/// The answer of `primary` among `answers`.
fn answer_of(
    answers: &mut Vec<(String, Value)>,
    primary: &str,
    what: &str,
) -> Result<String, StoreError> {
    let at = answers
        .iter()
        .position(|(address, _)| address == primary)
        .ok_or_else(|| StoreError::Unavailable(format!("no answer to {what} from {primary}")))?;
    answer_text(answers.swap_remove(at).1, what)
}

/// Reads the replication, persistence and eviction of every primary `connections` write to
/// (the one Redis, or the primary Sentinel names; each primary of a Redis Cluster).
pub async fn read(connections: &Connections) -> Result<Vec<RedisInfo>, StoreError> {
    let info = |section: &'static str| {
        let mut command = redis::cmd("INFO");
        command.arg(section);
        async move { connections.query_primaries(&command).await }
    };
    let replication = info("replication").await?;
    let mut persistence = info("persistence").await?;
    let mut memory = info("memory").await?;
    // CONFIG is often renamed or disabled on managed Redis: then appendfsync is just unknown
    // (logged as such at start; at debug here, as a running node reads it again and again).
    let mut config = redis::cmd("CONFIG");
    config.arg("GET").arg("appendfsync");
    let mut appendfsync = match connections.query_primaries(&config).await {
        Ok(answers) => answers,
        Err(error) => {
            debug!(error = %error, "cannot read redis appendfsync (CONFIG GET refused)");
            Vec::new()
        }
    };
    let mut infos = Vec::with_capacity(replication.len());
    for (primary, replication) in replication {
        let replication: String = answer_text(replication, "INFO replication")?;
        let persistence = answer_of(&mut persistence, &primary, "INFO persistence")?;
        let memory = answer_of(&mut memory, &primary, "INFO memory")?;
        let fsync = appendfsync
            .iter()
            .position(|(address, _)| *address == primary)
            .map(|at| appendfsync.swap_remove(at).1)
            .and_then(|pair| Vec::<String>::from_redis_value(pair).ok())
            .and_then(|pair| pair.into_iter().nth(1));
        let mut info = RedisInfo::parse(&replication, &persistence, &memory, fsync)?;
        info.primary = primary;
        infos.push(info);
    }
    Ok(infos)
}

/// Reads the Redis's replication and persistence, retrying until it answers, and logs them;
/// fails when they are weaker than `database` asks. Too few replicas is waited out for
/// [`REPLICAS_WAIT`] first: right after a failover the promoted primary has none for a moment,
/// until the others follow it.
pub async fn check(connections: &Connections, database: &DatabaseConfig) -> anyhow::Result<()> {
    // From Redis's first answer: a Redis just back (restarted, or promoted after a failover)
    // has had no time for its replicas to connect.
    let mut answered: Option<tokio::time::Instant> = None;
    let mut delay = Duration::from_millis(100);
    let mut logged = false;
    loop {
        let infos = match read(connections).await {
            Ok(infos) => infos,
            Err(error) => {
                warn!(error = %error, "cannot read redis replication and persistence, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
                continue;
            }
        };
        let answered = *answered.get_or_insert_with(tokio::time::Instant::now);
        if !logged {
            infos.iter().for_each(|info| log(info, database));
            logged = true;
        }
        let Some((info, problem)) = infos
            .iter()
            .find_map(|info| Some((info, info.shortfall(database)?)))
        else {
            return Ok(());
        };
        let replicas_short = info.connected_replicas < database.min_replicas;
        if !replicas_short || info.unfit(database).is_some() || answered.elapsed() >= REPLICAS_WAIT
        {
            return Err(anyhow::anyhow!("refusing to start: {problem}"));
        }
        warn!(
            connected_replicas = info.connected_replicas,
            min_replicas = database.min_replicas,
            "fewer redis replicas connected than database.min_replicas; waiting for them"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Logs what a start found of one primary.
fn log(info: &RedisInfo, database: &DatabaseConfig) {
    let (maxmemory, policy) = match &info.maxmemory {
        Some((bytes, policy)) => (Some(*bytes), policy.as_str()),
        None => (None, "unknown"),
    };
    // On a Redis Cluster, one line per primary, each with its address; on one Redis, one line.
    let span = (!info.primary.is_empty())
        .then(|| tracing::info_span!("redis", primary = %info.primary).entered());
    info!(
        role = %info.role,
        connected_replicas = info.connected_replicas,
        aof_enabled = info.aof_enabled,
        appendfsync = info.appendfsync.as_deref().unwrap_or("unknown"),
        min_replicas = database.min_replicas,
        maxmemory = ?maxmemory,
        maxmemory_policy = policy,
        "redis replication, persistence and memory"
    );
    if info.role != "master" {
        warn!(role = %info.role, "redis is not a primary: writes will fail until it is one");
    }
    if let (Some(policy), Some(0)) = (info.evicting_policy(), maxmemory) {
        warn!(
            maxmemory_policy = policy,
            "redis would evict orders once it is given a maxmemory: set maxmemory-policy noeviction"
        );
    }
    drop(span);
}

/// Whether the Redis can keep orders as the config asks, as the last check found: while it
/// cannot, the store refuses new orders (503) and its health check fails; orders already
/// accepted go on.
#[derive(Debug, Default)]
pub struct Fitness {
    unfit: AtomicBool,
    problem: RwLock<Option<Arc<str>>>,
}

impl Fitness {
    /// What is wrong with the Redis, if anything.
    pub fn problem(&self) -> Option<Arc<str>> {
        if !self.unfit.load(Ordering::Acquire) {
            return None;
        }
        self.problem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, problem: Option<&str>) {
        let mut held = self.problem.write().unwrap_or_else(PoisonError::into_inner);
        *held = problem.map(Arc::from);
        self.unfit.store(problem.is_some(), Ordering::Release);
    }
}

/// Reads every primary each `database.check_interval` and keeps `fitness` up to date, logging
/// each change (an error when the Redis can no longer keep orders as configured). A check that
/// cannot read Redis changes nothing: its writes fail by themselves while it is away.
pub async fn watch(connections: Arc<Connections>, database: DatabaseConfig, fitness: Arc<Fitness>) {
    let mut every = tokio::time::interval(database.check_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the start has just checked.
    every.tick().await;
    loop {
        every.tick().await;
        let infos = match read(&connections).await {
            Ok(infos) => infos,
            Err(error) => {
                debug!(error = %error, "cannot read redis persistence and memory, checking again later");
                continue;
            }
        };
        let problem = infos.iter().find_map(|info| info.unfit(&database));
        let before = fitness.problem();
        match (&before, &problem) {
            (before, Some(problem)) if before.as_deref() != Some(problem.as_str()) => error!(
                problem = %problem,
                "redis cannot keep orders as configured: new orders are refused until it can"
            ),
            (Some(_), None) => {
                info!("redis keeps orders as configured again: new orders are accepted")
            }
            _ => {}
        }
        fitness.set(problem.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::{Fitness, RedisInfo};
    use crate::config::DatabaseConfig;

    const REPLICATION: &str = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
        slave0:ip=127.0.0.1,port=6380,state=online,offset=42,lag=0\r\nmaster_repl_offset:42\r\n";
    const PERSISTENCE: &str =
        "# Persistence\r\nloading:0\r\naof_enabled:0\r\naof_rewrite_in_progress:0\r\n";
    const MEMORY: &str = "# Memory\r\nused_memory:1024\r\nmaxmemory:0\r\n\
        maxmemory_human:0B\r\nmaxmemory_policy:noeviction\r\n";

    #[test]
    fn info_answers_give_role_replicas_and_aof() {
        let info =
            RedisInfo::parse(REPLICATION, PERSISTENCE, MEMORY, Some("everysec".into())).unwrap();
        assert_eq!(
            info,
            RedisInfo {
                primary: String::new(),
                role: "master".into(),
                connected_replicas: 1,
                aof_enabled: false,
                appendfsync: Some("everysec".into()),
                maxmemory: Some((0, "noeviction".into())),
            }
        );
        let with_aof = PERSISTENCE.replace("aof_enabled:0", "aof_enabled:1");
        assert!(
            RedisInfo::parse(REPLICATION, &with_aof, MEMORY, None)
                .unwrap()
                .aof_enabled
        );
        assert!(RedisInfo::parse("", PERSISTENCE, MEMORY, None).is_err());
        assert!(RedisInfo::parse(REPLICATION, "", MEMORY, None).is_err());
        let replica = RedisInfo::parse(
            "role:slave\r\nmaster_host:10.0.0.2\r\n",
            PERSISTENCE,
            MEMORY,
            None,
        )
        .unwrap();
        assert_eq!(
            (replica.role.as_str(), replica.connected_replicas),
            ("slave", 0)
        );
    }

    #[test]
    fn a_redis_weaker_than_the_config_is_refused() {
        let info = RedisInfo::parse(REPLICATION, PERSISTENCE, MEMORY, None).unwrap();
        let mut database = DatabaseConfig::default();
        assert_eq!(info.shortfall(&database), None);
        database.min_replicas = 1;
        assert_eq!(info.shortfall(&database), None);
        database.min_replicas = 2;
        let problem = info.shortfall(&database).unwrap();
        assert!(problem.contains("1 connected replicas"), "{problem}");
        assert!(problem.contains("database.min_replicas = 2"), "{problem}");
        // Too few replicas stops a start, not a running node (its writes wait for them).
        assert_eq!(info.unfit(&database), None);
        database.min_replicas = 0;
        database.require_aof = true;
        let problem = info.shortfall(&database).unwrap();
        assert!(problem.contains("database.require_aof"), "{problem}");
        assert_eq!(info.unfit(&database).as_deref(), Some(problem.as_str()));
        assert!(problem.starts_with("redis has"), "{problem}");
        let named = RedisInfo {
            primary: "10.0.0.3:6379".into(),
            ..info.clone()
        };
        let problem = named.unfit(&database).unwrap();
        assert!(
            problem.starts_with("redis primary 10.0.0.3:6379 has"),
            "{problem}"
        );
        let aof = RedisInfo {
            aof_enabled: true,
            ..info
        };
        assert_eq!(aof.shortfall(&database), None);
    }

    #[test]
    fn a_redis_that_may_evict_keys_is_refused() {
        let database = DatabaseConfig::default();
        let with = |maxmemory: &str, policy: &str| {
            let memory = MEMORY
                .replace("maxmemory:0", &format!("maxmemory:{maxmemory}"))
                .replace("policy:noeviction", &format!("policy:{policy}"));
            RedisInfo::parse(REPLICATION, PERSISTENCE, &memory, None).unwrap()
        };
        for policy in [
            "allkeys-lru",
            "volatile-lru",
            "allkeys-random",
            "volatile-ttl",
        ] {
            let info = with("104857600", policy);
            assert_eq!(info.evicting_policy(), Some(policy));
            let problem = info.shortfall(&database).unwrap();
            assert!(problem.contains(policy), "{problem}");
            assert!(problem.contains("noeviction"), "{problem}");
            // Without a memory limit nothing is evicted (yet): started, with a warning.
            assert_eq!(with("0", policy).shortfall(&database), None);
        }
        assert_eq!(with("104857600", "noeviction").shortfall(&database), None);
        assert_eq!(with("104857600", "noeviction").evicting_policy(), None);
        // A server whose INFO does not say is not refused for it.
        let unknown = RedisInfo::parse(REPLICATION, PERSISTENCE, "# Memory\r\n", None).unwrap();
        assert_eq!(unknown.maxmemory, None);
        assert_eq!(unknown.shortfall(&database), None);
        assert!(RedisInfo::parse(
            REPLICATION,
            PERSISTENCE,
            &MEMORY.replace("maxmemory:0", "maxmemory:x"),
            None
        )
        .is_err());
    }

    #[test]
    fn fitness_says_the_last_problem_found() {
        let fitness = Fitness::default();
        assert_eq!(fitness.problem(), None);
        fitness.set(Some("redis may evict keys"));
        assert_eq!(fitness.problem().as_deref(), Some("redis may evict keys"));
        fitness.set(None);
        assert_eq!(fitness.problem(), None);
    }
}
