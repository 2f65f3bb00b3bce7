//! Redis over TLS and with an ACL user, against real `redis-server` processes: a node on
//! `rediss://` trusting a CA made here (rcgen), client certificates for a Redis that requires
//! them, and an ACL user whose password comes from `database.password_file` (or the URL) and
//! never shows in the node's log, with the least rights a cluster needs (Redis's `ACL LOG`
//! checked to have refused nothing). A node that cannot get in says why in its log and keeps
//! trying, without panicking. Every process is killed by pid when its guard drops, also when a
//! test fails; temp dirs go with them.

use crate::cluster::SECRET;
use crate::harness::{port, spawn, tail, unique_user, Node, Proc, RedisServer, POLL};
use crate::history::assert_completed;
use order_process_testkit::redis::{RedisSentinel, TlsFiles};
use order_process_testkit::RedisCluster;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;

/// How long orders of short steps may take to finish.
const FINISH: Duration = Duration::from_secs(30);
/// How long a node that cannot get in may take to say so in its log.
const COMPLAINT: Duration = Duration::from_secs(20);

/// A CA, a server certificate for 127.0.0.1, client certificates (`client`, `billing`,
/// `stranger`, each its file name's common name) and a node certificate for 127.0.0.1 good for
/// both (what a node requiring client certificates shows its peers), all PEM files in a temp
/// dir. The https tests use it too.
pub(crate) struct Pki {
    dir: TempDir,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "order-process test ca");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("self-signed ca");
        let write = |name: &str, text: String| {
            std::fs::write(dir.path().join(name), text).expect("write a pem file")
        };
        write("ca.pem", ca.pem());
        let local = || vec!["127.0.0.1".to_string(), "localhost".to_string()];
        for (name, names, usages) in [
            ("server", local(), vec![ExtendedKeyUsagePurpose::ServerAuth]),
            (
                "client",
                vec!["order-process".to_string()],
                vec![ExtendedKeyUsagePurpose::ClientAuth],
            ),
            (
                "node",
                local(),
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            ),
            // Two more callers' certificates, known by their common names (see `https.rs`).
            (
                "billing",
                vec!["billing".to_string()],
                vec![ExtendedKeyUsagePurpose::ClientAuth],
            ),
            (
                "stranger",
                vec!["stranger".to_string()],
                vec![ExtendedKeyUsagePurpose::ClientAuth],
            ),
        ] {
            let key = KeyPair::generate().expect("a key");
            let mut params = CertificateParams::new(names).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = usages;
            let certificate = params.signed_by(&key, &ca).expect("signed by the ca");
            write(&format!("{name}.pem"), certificate.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Pki { dir }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What redis-server and redis-sentinel serve TLS with; they show the client certificate
    /// when they connect out (a replica to its primary, a sentinel to anything).
    pub(crate) fn server_files(&self, auth_clients: bool) -> TlsFiles {
        TlsFiles {
            cert_file: self.path("server.pem"),
            key_file: self.path("server.key"),
            ca_file: self.path("ca.pem"),
            auth_clients,
            client: Some((self.path("client.pem"), self.path("client.key"))),
        }
    }

    /// The `ca_file` line of a node's `[database]`.
    pub(crate) fn ca_line(&self) -> String {
        format!("ca_file = \"{}\"\n", self.path("ca.pem").display())
    }

    /// The `client_cert` and `client_key` lines of a node's `[database]`.
    pub(crate) fn client_lines(&self) -> String {
        format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"\n",
            self.path("client.pem").display(),
            self.path("client.key").display()
        )
    }
}

/// A node config on Redis with these `[database]` lines, steps of 50 ms that never fail.
fn node_config(database: &str) -> String {
    format!(
        "[simulate]\nduration = \"50ms\"\nfailure_rate = 0.0\n\
         [database]\n{database}timeout = \"1s\"\n\
         [cluster]\nsecret = \"{SECRET}\"\n"
    )
}

/// Starts a node with these `[database]` lines and sees a few orders through it.
async fn node_completing_orders(database: &str) -> Node {
    let node = Node::start(&node_config(database)).await;
    orders_complete(&node).await;
    node
}

/// Submits a few orders and waits until every one has completed.
async fn orders_complete(node: &Node) {
    let user = unique_user("tls");
    let mut ids = Vec::new();
    for index in 0..3 {
        let reply = node
            .post_order(&user, &serde_json::json!({ "n": index }).to_string())
            .await;
        let body = node.expect_json(&reply, 201, "POST /orders");
        ids.push(body["order_id"].as_str().expect("order_id").to_string());
    }
    for id in &ids {
        let order = order_process_testkit::poll::until(FINISH, POLL, || async {
            let reply = node.get_order(&user, id).await;
            let order = reply.try_json().filter(|_| reply.status == 200)?;
            (!order["complete_time"].is_null()).then_some(order)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "order {id} not finished within {FINISH:?}\n{}",
                node.log_tail()
            )
        });
        assert_completed(&order);
    }
}

/// A node process that is not expected to become ready (it cannot get into its Redis): its
/// config, data and log in a temp dir, the process killed by pid when dropped.
pub(crate) struct Unready {
    process: Proc,
    dir: TempDir,
}

impl Unready {
    pub(crate) fn start(config: &str) -> Unready {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).expect("write config.toml");
        let args = [
            "--config".to_string(),
            path.display().to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{}", port()),
            "--data-dir".to_string(),
            dir.path().join("data").display().to_string(),
        ];
        let log = dir.path().join("node.log");
        let process = spawn(&args, &log, &log);
        Unready { process, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Waits until the log has a line with all of `needles`, while the process keeps running
    /// (it retries) and never panics; returns that line.
    pub(crate) async fn complains(&mut self, needles: &[&str]) -> String {
        let log = self.dir.path().join("node.log");
        let found = order_process_testkit::poll::until(COMPLAINT, POLL, || {
            let line = self
                .log()
                .lines()
                .find(|line| needles.iter().all(|needle| line.contains(needle)))
                .map(str::to_string);
            std::future::ready(line)
        })
        .await;
        let Some(line) = found else {
            panic!(
                "no log line with {needles:?} within {COMPLAINT:?}\n{}",
                tail(&log, 40)
            );
        };
        assert!(
            self.process.try_exit().is_none(),
            "the node exited instead of retrying\n{}",
            tail(&log, 40)
        );
        assert!(
            !self.log().contains("panicked"),
            "the node panicked\n{}",
            tail(&log, 40)
        );
        line
    }
}

#[tokio::test]
async fn a_node_on_rediss_with_a_private_ca_completes_orders_and_without_it_says_why() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(pki.server_files(false));
    let url = redis.tls_url();
    let node = node_completing_orders(&format!("url = \"{url}\"\n{}", pki.ca_line())).await;
    // The orders are in this Redis, which the node reached on its TLS port only.
    let keys: usize = redis.cli(&["DBSIZE"]).parse().expect("DBSIZE");
    assert!(keys > 0, "no keys in redis\n{}", node.log_tail());

    // Without ca_file the private CA is unknown: the server's certificate is refused.
    let mut untrusting = Unready::start(&node_config(&format!("url = \"{url}\"\n")));
    untrusting
        .complains(&["cannot read redis", "UnknownIssuer"])
        .await;
}

#[tokio::test]
async fn a_redis_that_requires_client_certificates_admits_a_node_with_one_only() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(pki.server_files(true));
    let url = redis.tls_url();
    node_completing_orders(&format!(
        "url = \"{url}\"\n{}{}",
        pki.ca_line(),
        pki.client_lines()
    ))
    .await;

    let mut without = Unready::start(&node_config(&format!("url = \"{url}\"\n{}", pki.ca_line())));
    // Redis ends the handshake with an alert the node logs.
    without
        .complains(&["cannot read redis", "CertificateRequired"])
        .await;
}

/// A Redis Cluster speaking TLS only (to clients, on its bus, between primary and replica) and
/// requiring client certificates: a node with `tls = true`, the CA and a client certificate
/// completes orders on every primary, the ones it learned from the cluster too; one without a
/// client certificate is refused and says why.
#[tokio::test]
async fn a_node_on_a_redis_cluster_over_tls_completes_orders_on_every_primary() {
    let pki = Pki::new();
    let cluster = RedisCluster::try_start_tls(3, 0, pki.server_files(true))
        .unwrap_or_else(|error| panic!("cannot start a redis cluster over TLS: {error}"));
    // Only the first node named: the node learns the other two from it.
    let first = cluster.addresses().remove(0);
    let nodes = format!(
        "cluster_nodes = [\"{first}\"]\ntls = true\n{}",
        pki.ca_line()
    );
    let node = node_completing_orders(&format!("{nodes}{}", pki.client_lines())).await;
    // 30 orders over 64 shards, a third of them on each primary: every primary gets some, or
    // one is missed once in 60,000 runs.
    for _ in 0..9 {
        orders_complete(&node).await;
    }
    for port in cluster.primaries() {
        let keys: usize = cluster
            .cli(port, &["DBSIZE"])
            .and_then(|keys| keys.parse().ok())
            .unwrap_or_default();
        assert!(
            keys > 0,
            "no keys on the primary on port {port}\n{}\n{}",
            cluster.view(),
            node.log_tail()
        );
    }

    let mut without = Unready::start(&node_config(&nodes));
    without.complains(&["CertificateRequired"]).await;
}

/// A primary of a Redis Cluster over TLS SIGKILLed under load: the node reaches the replica
/// promoted in its place over TLS as well, and every order answered 201 finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_on_a_redis_cluster_over_tls_loses_no_acknowledged_order() {
    let _turn = crate::cluster::cluster_turn().await;
    let pki = Pki::new();
    let cluster = RedisCluster::try_start_tls(3, 1, pki.server_files(true))
        .unwrap_or_else(|error| panic!("cannot start a redis cluster over TLS: {error}"));
    // The default timeout (2 s): a debug-built node opening cluster connections over TLS (a
    // handshake with each of six nodes) beside eight busy loops missed the 1 s of the plain
    // variant in two runs of three, and passed with 2 s.
    let tls = format!(
        "tls = true\ntimeout = \"2s\"\n{}{}",
        pki.ca_line(),
        pki.client_lines()
    );
    crate::redis_cluster::primary_killed_under_load(cluster, 0, &tls).await;
}

/// The rules of the node's ACL user, as the README gives them: its keys, every command but
/// Redis's dangerous ones, and of those the three it reads its Redis with.
const NODE_ACL: [&str; 6] = [
    "~op:*",
    "+@all",
    "-@dangerous",
    "+info",
    "+role",
    "+config|get",
];

/// The rules of a sentinel's ACL user, as Redis's documentation gives them.
const SENTINEL_ACL: [&str; 13] = [
    "&__sentinel__:hello",
    "+multi",
    "+slaveof",
    "+ping",
    "+exec",
    "+subscribe",
    "+config|rewrite",
    "+role",
    "+publish",
    "+info",
    "+client|setname",
    "+client|kill",
    "+script|kill",
];

/// A plain Redis with the ACL users `app` (the node's rules, [`NODE_ACL`]), `sentinel` (a
/// sentinel's) and `admin` (everything, for the test's own look), all with `password`, and the
/// default user switched off.
fn redis_with_acl_user(password: &str) -> RedisServer {
    let redis = RedisServer::start();
    let rule = format!(">{password}");
    let set = |user: &str, rules: &[&str]| {
        let args = [&["ACL", "SETUSER", user, "on", &rule], rules].concat();
        assert_eq!(redis.cli(&args), "OK", "ACL SETUSER {user}");
    };
    set("app", &NODE_ACL);
    set("sentinel", &SENTINEL_ACL);
    set("admin", &["~*", "&*", "+@all"]);
    assert_eq!(redis.cli(&["ACL", "SETUSER", "default", "off"]), "OK");
    redis
}

/// `redis-cli` arguments that log in as `admin` (see [`redis_with_acl_user`]), then `args`.
fn as_admin<'a>(password: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    [
        &["--user", "admin", "--pass", password, "--no-auth-warning"],
        args,
    ]
    .concat()
}

/// Asserts that Redis refused nothing to any user (`ACL LOG` is empty).
fn assert_nothing_refused(redis: &RedisServer, password: &str, log: &str) {
    let refused = redis.cli(&as_admin(password, &["ACL", "LOG"]));
    assert!(
        refused.trim().is_empty(),
        "redis refused commands:\n{refused}\n{log}"
    );
}

/// Writes `password` and a line break to a file in `dir`; returns its path.
fn password_file(dir: &Path, password: &str) -> PathBuf {
    let path = dir.join("redis-password");
    std::fs::write(&path, format!("{password}\n")).expect("write the password file");
    path
}

#[tokio::test]
async fn an_acl_user_logs_in_with_its_password_file_and_the_password_is_never_logged() {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let redis = redis_with_acl_user(&password);
    let files = tempfile::tempdir().expect("create a temp dir");
    let good = password_file(files.path(), &password);
    let node = node_completing_orders(&format!(
        "url = \"{}\"\nusername = \"app\"\npassword_file = \"{}\"\n",
        redis.url(),
        good.display()
    ))
    .await;
    // The node really logged in as app: the default user is off.
    let authed = [
        "--user",
        "app",
        "--pass",
        password.as_str(),
        "--no-auth-warning",
    ];
    let keys: usize = redis
        .cli(&[&authed[..], &["DBSIZE"]].concat())
        .parse()
        .expect("DBSIZE");
    assert!(keys > 0, "no keys in redis\n{}", node.log_tail());
    assert!(
        !node.log().contains(&password),
        "the password is in the node's log\n{}",
        node.log_tail()
    );
    assert_nothing_refused(&redis, &password, &node.log_tail());

    // A wrong password: Redis refuses the login, the node says so and keeps trying.
    let wrong_dir = tempfile::tempdir().expect("create a temp dir");
    let wrong = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let wrong_file = password_file(wrong_dir.path(), &wrong);
    let mut refused = Unready::start(&node_config(&format!(
        "url = \"{}\"\nusername = \"app\"\npassword_file = \"{}\"\n",
        redis.url(),
        wrong_file.display()
    )));
    refused
        .complains(&["cannot read redis", "Password authentication failed"])
        .await;
    let log = refused.log();
    assert!(
        !log.contains(&wrong) && !log.contains(&password),
        "a password is in the node's log:\n{log}"
    );
}

#[tokio::test]
async fn an_acl_user_and_password_in_the_url_work_and_are_never_logged() {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let redis = redis_with_acl_user(&password);
    let url = format!("redis://app:{password}@127.0.0.1:{}", redis.port);
    let node = node_completing_orders(&format!("url = \"{url}\"\n")).await;
    assert!(
        !node.log().contains(&password),
        "the password is in the node's log\n{}",
        node.log_tail()
    );
    assert_nothing_refused(&redis, &password, &node.log_tail());
}

#[tokio::test]
async fn with_sentinel_the_acl_user_logs_in_to_the_primary() {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let primary = redis_with_acl_user(&password);
    let sentinel = RedisSentinel::start_with_login(&primary, "orders", 1, "sentinel", &password);
    let files = tempfile::tempdir().expect("create a temp dir");
    let good = password_file(files.path(), &password);
    let database = |file: &Path| {
        format!(
            "sentinels = [\"{}\"]\nmaster_name = \"orders\"\nusername = \"app\"\npassword_file = \"{}\"\n",
            sentinel.address(),
            file.display()
        )
    };
    let node = node_completing_orders(&database(&good)).await;
    assert!(
        node.log().contains("redis primary found through sentinel"),
        "the node did not go through the sentinel\n{}",
        node.log_tail()
    );
    assert!(
        !node.log().contains(&password),
        "the password is in the node's log\n{}",
        node.log_tail()
    );
    assert_nothing_refused(&primary, &password, &node.log_tail());

    let wrong_dir = tempfile::tempdir().expect("create a temp dir");
    let wrong = password_file(
        wrong_dir.path(),
        &format!("pw-{}", uuid::Uuid::new_v4().simple()),
    );
    let mut refused = Unready::start(&node_config(&database(&wrong)));
    refused
        .complains(&["cannot read redis", "Password authentication failed"])
        .await;
}

/// The README's least-privilege ACL user ([`NODE_ACL`]) is enough for all a cluster does: two
/// nodes create, list, cancel and finish orders, read their Redis's persistence and eviction,
/// answer the console's views, take over a killed node's orders (a new leader repairs the
/// indexes) and purge orders past their retention, and Redis refuses none of it.
#[tokio::test]
async fn the_least_privilege_acl_user_is_enough_for_a_cluster() {
    let _turn = crate::cluster::cluster_turn().await;
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let redis = redis_with_acl_user(&password);
    let url = format!("redis://app:{password}@127.0.0.1:{}", redis.port);
    let mut nodes = crate::cluster::start_configured(2, |seeds| {
        let seeds: Vec<String> = seeds
            .iter()
            .map(|port| format!("\"127.0.0.1:{port}\""))
            .collect();
        format!(
            "[simulate]\nduration = \"1s\"\nfailure_rate = 0.0\n\
             [database]\nurl = \"{url}\"\ntimeout = \"1s\"\ncheck_interval = \"200ms\"\n\
             [orders]\nretention = \"5s\"\n\
             [cluster]\nsecret = \"{SECRET}\"\nseeds = [{}]\n",
            seeds.join(", ")
        )
    })
    .await;
    let user = unique_user("acl");
    let cancelled = nodes[1].create_order(&user, &serde_json::json!({})).await;
    let reply = nodes[1].cancel(&user, &cancelled).await;
    nodes[1].expect_json(&reply, 202, "POST /orders/{id}/cancel");
    let view = nodes[1].wait_terminal(&user, &cancelled, FINISH).await;
    assert_eq!(view["current_step"], "Failed", "{view}");
    let orders = crate::cluster::submit(&nodes[0], &user, 6).await;
    for path in [
        "/diagnostic/overview",
        "/diagnostic/stuck?older_than=1s",
        "/diagnostic/parked",
        "/diagnostic/set-aside",
    ] {
        let reply = nodes[1].call(reqwest::Method::GET, path).send().await;
        nodes[1].expect_json(&reply, 200, path);
    }
    crate::cluster::wait_started(&nodes[1], &user, &orders).await;
    nodes[0].kill();
    crate::cluster::wait_all_completed(&nodes[1], &user, &orders, FINISH).await;
    assert!(
        nodes[1].log().contains("took over orders"),
        "{}",
        nodes[1].log_tail()
    );
    let listed = nodes[1].list_all_ids(&user, &[]).await;
    assert!(listed.len() >= orders.len(), "{listed:?}");
    // Past their retention, the leader purges them: the first is gone.
    let first = &orders[0].id;
    order_process_testkit::poll::until(FINISH, POLL, || async {
        (nodes[1].get_order(&user, first).await.status == 404).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("order {first} not purged\n{}", nodes[1].log_tail()));
    assert_nothing_refused(&redis, &password, &nodes[1].log_tail());
}

/// On a Redis Cluster the same user, made on every primary, is enough too: the cluster client's
/// own commands (`CLUSTER SLOTS`) and the checks of every primary are among its rights.
#[tokio::test]
async fn the_least_privilege_acl_user_is_enough_on_a_redis_cluster() {
    let _turn = crate::cluster::cluster_turn().await;
    let cluster = RedisCluster::try_start(3, 0).expect("a redis cluster");
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let rule = format!(">{password}");
    let primaries = cluster.primaries();
    for port in &primaries {
        for (user, rules) in [
            ("app", &NODE_ACL[..]),
            ("admin", &["~*", "&*", "+@all"][..]),
        ] {
            let args = [&["ACL", "SETUSER", user, "on", &rule], rules].concat();
            assert_eq!(cluster.cli(*port, &args).as_deref(), Some("OK"));
        }
        let off = cluster.cli(*port, &["ACL", "SETUSER", "default", "off"]);
        assert_eq!(off.as_deref(), Some("OK"));
    }
    let files = tempfile::tempdir().expect("create a temp dir");
    let file = password_file(files.path(), &password);
    let nodes = cluster.database_config();
    let node = node_completing_orders(&format!(
        "{}username = \"app\"\npassword_file = \"{}\"\ncheck_interval = \"200ms\"\n",
        nodes.trim_start_matches("[database]\n"),
        file.display()
    ))
    .await;
    orders_complete(&node).await;
    for port in primaries {
        let refused = cluster.cli(port, &as_admin(&password, &["ACL", "LOG"]));
        assert_eq!(
            refused.as_deref().map(str::trim),
            Some(""),
            "the primary on {port} refused commands\n{}",
            node.log_tail()
        );
    }
}
