//! Authentication, roles and limits: tokens mode (wrong, missing, expired and revoked tokens
//! get 401), users confined to their own orders, admins reading anyone's, the service endpoint
//! refused without the cluster secret or an admin token, SIGHUP reloading the tokens file, the
//! per-user submission rate and in-flight caps (429 with Retry-After), payload nesting, slow
//! clients disconnected while others are served, `/diagnostic/summary` naming failed orders
//! and `/diagnostic/set-aside`, `/diagnostic/parked` and `/diagnostic/stuck` listing orders
//! only to an admin, a gossip member without a lease in Redis never sent the cluster secret, and
//! a node with another cluster secret not heard in gossip.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cluster::{
    cluster_turn, start_cluster, submit, wait_all_completed, wait_started, SECRET, TAKEOVER,
};
use crate::harness::{order_ids, simulate, unique_user, Node, RedisServer, POLL};

/// A tokens file in its own temp dir, written with entries made like `hash-token` makes them.
pub(crate) struct Tokens {
    dir: TempDir,
}

/// One entry: token, user, role, extra TOML lines.
type Entry<'a> = (&'a str, &'a str, &'a str, &'a str);

impl Tokens {
    pub(crate) fn new(entries: &[Entry<'_>]) -> Tokens {
        Tokens::with_certificates(entries, "")
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("tokens.toml")
    }

    /// These tokens, then `[[certificate]]` entries as `certificates` writes them.
    pub(crate) fn with_certificates(entries: &[Entry<'_>], certificates: &str) -> Tokens {
        let tokens = Tokens {
            dir: tempfile::tempdir().expect("create a temp dir"),
        };
        tokens.write_raw(&format!("{}{certificates}", text(entries)));
        tokens
    }

    pub(crate) fn write(&self, entries: &[Entry<'_>]) {
        self.write_raw(&text(entries));
    }

    /// Writes through a temp file and a rename, so the node never reads half a file.
    fn write_raw(&self, text: &str) {
        let temp = self.dir.path().join("tokens.toml.new");
        fs::write(&temp, text).expect("write the tokens file");
        fs::rename(&temp, self.path()).expect("rename the tokens file");
    }

    /// A node config: tokens mode with this file, plus `extra`.
    pub(crate) fn config(&self, extra: &str) -> String {
        format!(
            "{}[auth]\nmode = \"tokens\"\ntokens_file = \"{}\"\n{extra}",
            simulate("10ms"),
            self.path().display()
        )
    }
}

/// A tokens file's `[[token]]` entries.
fn text(entries: &[Entry<'_>]) -> String {
    let mut text = String::from("# test tokens\n");
    for (token, user, role, extra) in entries {
        text.push_str(&format!(
            "[[token]]\nuser = \"{user}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n{extra}\n",
            sha256_hex(token)
        ));
    }
    text
}

/// The hash the tokens file holds, computed by the binary itself (`hash-token`).
fn sha256_hex(token: &str) -> String {
    let output = std::process::Command::new(crate::harness::BIN)
        .args(["hash-token", token])
        .output()
        .expect("run order-process hash-token");
    assert!(output.status.success(), "hash-token failed: {output:?}");
    let hash = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert_eq!(hash.len(), 64, "hash-token printed {hash:?}");
    hash
}

pub(crate) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

pub(crate) const ALICE: &str = "alice-token-8c1f0e6b";
pub(crate) const BOB: &str = "bob-token-2d9a7c44";
pub(crate) const ROOT: &str = "root-token-51be09d3";
const EXPIRED: &str = "expired-token-77aa01";
const REVOKED: &str = "revoked-token-3f3f3f";

pub(crate) fn standard_tokens() -> Tokens {
    Tokens::new(&[
        (ALICE, "alice", "user", ""),
        (BOB, "bob", "user", ""),
        (ROOT, "root", "admin", ""),
        (EXPIRED, "old", "user", "expires = 2020-01-01T00:00:00Z"),
        (REVOKED, "gone", "user", "revoked = true"),
    ])
}

#[tokio::test]
async fn tokens_are_checked_and_roles_enforced() {
    let tokens = standard_tokens();
    let node = Node::start(&tokens.config("")).await;

    // 401: missing, wrong, header-mode style, expired, revoked.
    let reply = node.call(Method::POST, "/orders").body("{}").send().await;
    node.expect_error(&reply, 401, "POST /orders without Authorization");
    for (header, what) in [
        (bearer("wrong-token"), "a wrong token"),
        ("alice".to_string(), "a bare user name"),
        (ALICE.to_string(), "a token without Bearer"),
        (bearer(EXPIRED), "an expired token"),
        (bearer(REVOKED), "a revoked token"),
        (format!("Basic {ALICE}"), "another scheme"),
    ] {
        let reply = node.post_order(&header, "{}").await;
        node.expect_error(&reply, 401, &format!("POST /orders with {what}"));
        let reply = node.list(&header, &[]).await;
        node.expect_error(&reply, 401, &format!("GET /orders with {what}"));
    }
    let reply = node.post_order(&bearer(EXPIRED), "{}").await;
    assert!(reply.text.contains("expired"), "{reply}");

    // Users see and act on their own orders only: another's is a 404.
    let id = node
        .create_order(&bearer(ALICE), &json!({"sku": "A1"}))
        .await;
    node.expect_json(
        &node.get_order(&bearer(ALICE), &id).await,
        200,
        "alice reads her order",
    );
    node.expect_error(
        &node.get_order(&bearer(BOB), &id).await,
        404,
        "bob reads alice's order",
    );
    node.expect_error(
        &node.cancel(&bearer(BOB), &id).await,
        404,
        "bob cancels alice's order",
    );
    let reply = node
        .call(Method::POST, &format!("/orders/{id}/rollback"))
        .user(&bearer(BOB))
        .send()
        .await;
    node.expect_error(&reply, 404, "bob retries alice's rollback");
    let bobs = node.list(&bearer(BOB), &[]).await;
    let bobs = node.expect_json(&bobs, 200, "bob lists his orders");
    assert!(!order_ids(&bobs).contains(&id), "bob sees alice's order");

    // 403: a user at admin endpoints.
    let reply = node.list(&bearer(BOB), &[("user", "alice")]).await;
    node.expect_error(&reply, 403, "bob lists alice's orders");
    let transfer = json!({"service_id": "00000000-0000-4000-8000-000000000000"}).to_string();
    let reply = node
        .call(Method::POST, "/service/transfer")
        .user(&bearer(BOB))
        .body(transfer.clone())
        .send()
        .await;
    node.expect_error(&reply, 403, "bob calls /service/transfer");
    let noted = json!({"order_id": "00000000-0000-4000-8000-000000000000"}).to_string();
    let reply = node
        .call(Method::POST, "/service/cancels")
        .user(&bearer(BOB))
        .body(noted.clone())
        .send()
        .await;
    node.expect_error(&reply, 403, "bob calls /service/cancels");
    let reply = node
        .call(Method::POST, "/service/cancels")
        .body(noted.clone())
        .send()
        .await;
    node.expect_error(&reply, 401, "/service/cancels without the secret");
    let reply = node
        .call(Method::GET, "/service/backup")
        .user(&bearer(BOB))
        .send()
        .await;
    node.expect_error(&reply, 403, "bob takes a backup");
    let reply = node.call(Method::GET, "/service/backup").send().await;
    node.expect_error(&reply, 401, "a backup without a token");
    // 401: the service endpoint with neither the cluster secret nor a token.
    let reply = node
        .call(Method::POST, "/service/transfer")
        .body(transfer.clone())
        .send()
        .await;
    node.expect_error(&reply, 401, "/service/transfer without the secret");
    let reply = node
        .call(Method::POST, "/service/transfer")
        .header("X-Cluster-Secret", "guess")
        .body(transfer.clone())
        .send()
        .await;
    node.expect_error(&reply, 401, "/service/transfer with a wrong secret");

    // The admin reads and lists anyone's orders, and passes the service endpoint's check (this
    // node runs alone, so the transfer itself is a 409).
    let order = node.expect_json(
        &node.get_order(&bearer(ROOT), &id).await,
        200,
        "admin reads alice's order",
    );
    assert_eq!(order["order_id"], Value::String(id.clone()));
    // The same order named in capitals is audited under its id as the API spells it.
    let reply = node.get_order(&bearer(ROOT), &id.to_uppercase()).await;
    node.expect_json(
        &reply,
        200,
        "admin reads alice's order by its id in capitals",
    );
    // A name with a line break in it cannot forge a line of the log, nor one with spaces and
    // `=` a field of its line.
    let reply = node
        .list(&bearer(ROOT), &[("user", "eve\nforged audit line")])
        .await;
    node.expect_json(
        &reply,
        200,
        "admin lists a user with a line break in the name",
    );
    let reply = node
        .list(&bearer(ROOT), &[("user", "bob who=alice role=user")])
        .await;
    node.expect_json(&reply, 200, "admin lists a user with fields in the name");
    let listed = node.list(&bearer(ROOT), &[("user", "alice")]).await;
    let listed = node.expect_json(&listed, 200, "admin lists alice's orders");
    assert_eq!(order_ids(&listed), vec![id.clone()]);
    // And waits for them, one or many at once, and cancels them: this one has finished, so
    // that is a 409, not the 404 of an order the caller may not see.
    let reply = node
        .call(Method::GET, &format!("/orders/{id}?wait=10s"))
        .user(&bearer(ROOT))
        .send()
        .await;
    let waited = node.expect_json(&reply, 200, "admin waits for alice's order");
    assert_eq!(waited["current_step"], "Completed", "{waited}");
    let reply = node
        .call(Method::POST, "/orders/wait")
        .user(&bearer(ROOT))
        .body(json!({"order_ids": [id], "wait": "1s"}).to_string())
        .send()
        .await;
    let waited = node.expect_json(&reply, 200, "admin waits for alice's orders");
    assert_eq!(order_ids(&waited), vec![id.clone()]);
    node.expect_error(
        &node.cancel(&bearer(ROOT), &id).await,
        409,
        "admin cancels alice's finished order",
    );
    let reply = node
        .call(Method::POST, "/service/transfer")
        .user(&bearer(ROOT))
        .body(transfer)
        .send()
        .await;
    node.expect_error(&reply, 409, "admin calls /service/transfer on a lone node");
    let reply = node
        .call(Method::POST, "/service/cancels")
        .user(&bearer(ROOT))
        .body(noted)
        .send()
        .await;
    node.expect_error(&reply, 409, "admin calls /service/cancels on a lone node");
    let reply = node
        .call(Method::POST, &format!("/orders/{id}/rollback"))
        .user(&bearer(ROOT))
        .send()
        .await;
    node.expect_error(&reply, 409, "admin retries a rollback that is not parked");
    let reply = node
        .call(Method::GET, "/service/backup")
        .user(&bearer(ROOT))
        .send()
        .await;
    assert_eq!(reply.status, 200, "admin takes a backup: {reply}");

    // Diagnostics stay open.
    node.heartbeat().await;

    // Admin actions are audited with who and what; no token ever reaches the log.
    let log = node.log();
    let audit: Vec<&str> = log.lines().filter(|line| line.contains("audit")).collect();
    let reads = audit
        .iter()
        .filter(|line| line.contains("read order") && line.contains(id.as_str()))
        .count();
    assert_eq!(
        reads,
        4,
        "two reads, a wait and a wait for many:\n{}",
        audit.join("\n")
    );
    assert!(
        !log.lines().any(|line| line.starts_with("forged")),
        "a user name broke a log line:\n{}",
        audit.join("\n")
    );
    assert!(
        audit
            .iter()
            .any(|line| line.contains("target=\"bob who=alice role=user\"")),
        "a user name is not one quoted field:\n{}",
        audit.join("\n")
    );
    assert!(
        !audit.iter().any(|line| line
            .replace("\"bob who=alice role=user\"", "")
            .contains("who=alice")),
        "a user name forged a field:\n{}",
        audit.join("\n")
    );
    for action in [
        "read order",
        "list orders",
        "cancel order",
        "retry parked rollback",
        "backup",
    ] {
        assert!(
            audit
                .iter()
                .any(|line| line.contains(action) && line.contains("root")),
            "no audit line for {action}:\n{}",
            audit.join("\n")
        );
    }
    // The node logs at debug here; payloads appear only at trace.
    assert!(
        !log.contains("payload-marker-5c2e"),
        "the log contains an order payload"
    );
    for token in [ALICE, BOB, ROOT, EXPIRED, REVOKED] {
        assert!(!log.contains(token), "the log contains a token");
        assert!(
            !log.contains(&sha256_hex(token)),
            "the log contains a token hash"
        );
    }
}

/// An admin's long poll on another user's order that is still running tells the admin it
/// exists and runs: it is audited as a read of a finished one is.
#[tokio::test]
async fn an_admins_wait_on_a_running_order_is_audited() {
    let tokens = standard_tokens();
    let config = format!(
        "{}[auth]\nmode = \"tokens\"\ntokens_file = \"{}\"\n",
        simulate("1h"),
        tokens.path().display()
    );
    let node = Node::start(&config).await;
    let id = node.create_order(&bearer(ALICE), &json!({})).await;
    let reply = node
        .call(Method::POST, "/orders/wait")
        .user(&bearer(ROOT))
        .body(json!({"order_ids": [id], "wait": "0s"}).to_string())
        .send()
        .await;
    let waited = node.expect_json(&reply, 200, "admin waits for alice's running order");
    assert_eq!(waited["pending"], json!([id]), "{waited}");
    let log = node.log();
    assert!(
        log.lines().any(|line| line.contains("audit")
            && line.contains("wait for order")
            && line.contains(id.as_str())),
        "no audit line for the wait:\n{log}"
    );
}

#[tokio::test]
async fn the_summary_shows_recent_failures_only_to_an_admin() {
    let tokens = standard_tokens();
    let node = Node::start(&tokens.config("")).await;
    let id = node
        .create_order(
            &bearer(ALICE),
            &json!({"simulate": {"fail_at": "Processing"}}),
        )
        .await;
    node.wait_terminal(&bearer(ALICE), &id, Duration::from_secs(10))
        .await;

    // Without a token: the counts, no order ids or reasons (what the console shows).
    let reply = node.call(Method::GET, "/diagnostic/summary").send().await;
    let counts = node.expect_json(&reply, 200, "GET /diagnostic/summary without a token");
    assert_eq!(counts["totals"]["failed"], 1, "{counts}");
    assert!(counts.get("recent_failures").is_none(), "{counts}");
    assert!(!reply.text.contains(&id), "{reply}");

    let summary = |header: String| {
        node.call(Method::GET, "/diagnostic/summary")
            .header("authorization", &header)
            .send()
    };
    node.expect_error(&summary(bearer(ALICE)).await, 403, "a user's token");
    node.expect_error(&summary(bearer("wrong-token")).await, 401, "a wrong token");
    let full = node.expect_json(&summary(bearer(ROOT)).await, 200, "an admin's token");
    assert_eq!(
        full["recent_failures"][0]["order_id"],
        id.as_str(),
        "{full}"
    );
    assert_eq!(full["totals"], counts["totals"], "{full}");

    // The orders set aside are listed to an admin only.
    let set_aside = |header: Option<String>| {
        let call = node.call(Method::GET, "/diagnostic/set-aside");
        match header {
            Some(header) => call.header("authorization", &header).send(),
            None => call.send(),
        }
    };
    node.expect_error(&set_aside(None).await, 401, "set-aside without a token");
    node.expect_error(
        &set_aside(Some(bearer(ALICE))).await,
        403,
        "set-aside with a user's token",
    );
    let listed = node.expect_json(
        &set_aside(Some(bearer(ROOT))).await,
        200,
        "set-aside with an admin's token",
    );
    assert_eq!(listed["set_aside"], json!([]), "{listed}");

    // The console's lists of any user's orders are an admin's too; its cluster view and flow
    // are counts only, for anyone.
    for path in ["/diagnostic/parked", "/diagnostic/stuck?older_than=0s"] {
        let list = |header: Option<String>| {
            let call = node.call(Method::GET, path);
            match header {
                Some(header) => call.header("authorization", &header).send(),
                None => call.send(),
            }
        };
        node.expect_error(&list(None).await, 401, &format!("{path} without a token"));
        node.expect_error(
            &list(Some(bearer(ALICE))).await,
            403,
            &format!("{path} with a user's token"),
        );
        node.expect_json(
            &list(Some(bearer(ROOT))).await,
            200,
            &format!("{path} with an admin's token"),
        );
    }
    for path in ["/diagnostic/overview", "/diagnostic/flow?scope=cluster"] {
        let reply = node.call(Method::GET, path).send().await;
        let view = node.expect_json(&reply, 200, &format!("{path} without a token"));
        assert!(!reply.text.contains(&id), "{path} names an order: {view}");
    }
}

#[tokio::test]
async fn sighup_reloads_the_tokens_file() {
    let tokens = standard_tokens();
    let node = Node::start(&tokens.config("")).await;
    let carol = "carol-token-0e0e0e0e";
    node.create_order(&bearer(ALICE), &json!({})).await;
    node.expect_error(
        &node.list(&bearer(carol), &[]).await,
        401,
        "carol before she has a token",
    );

    // Revoke alice, add carol, and tell the node.
    tokens.write(&[
        (BOB, "bob", "user", ""),
        (carol, "carol", "user", ""),
        (ALICE, "alice", "user", "revoked = true"),
    ]);
    node.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = node.list(&bearer(ALICE), &[]).await;
        if reply.status == 401 {
            node.expect_error(&reply, 401, "alice after her token was revoked");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's revoked token still works 10 s after SIGHUP: {reply}\n{}",
            node.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    node.create_order(&bearer(carol), &json!({})).await;

    // A bad file on reload keeps the tokens in force and logs an error.
    tokens.write_raw("[[token]]\nuser = \"carol\"\nsha256 = \"not-a-hash\"\n");
    node.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log().contains("cannot reload tokens") {
        assert!(
            Instant::now() < deadline,
            "no reload error logged within 10 s\n{}",
            node.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    node.create_order(&bearer(carol), &json!({})).await;
    node.expect_error(
        &node.list(&bearer(ALICE), &[]).await,
        401,
        "alice after a failed reload",
    );
    // The node survived both signals.
    node.heartbeat().await;
}

#[tokio::test]
async fn submissions_are_rate_limited_per_user_and_payloads_bounded() {
    let node = Node::start(&format!(
        "{}[limits]\nsubmit_rate = 0.1\nsubmit_burst = 3\nmax_depth = 8\n",
        simulate("10ms")
    ))
    .await;
    let alice = unique_user("alice");
    for _ in 0..3 {
        node.create_order(&alice, &json!({})).await;
    }
    let reply = node.post_order(&alice, "{}").await;
    node.expect_error(&reply, 429, "a submission past the burst");
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {reply:?}"));
    // One submission every 10 s: the fourth waits for most of that.
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}");
    // Another user has a bucket of their own; reading is not limited.
    let bob = unique_user("bob");
    let id = node.create_order(&bob, &json!({})).await;
    node.order(&bob, &id).await;
    node.expect_json(
        &node.list(&alice, &[]).await,
        200,
        "alice lists while limited",
    );

    // Nesting deeper than max_depth (8) is a 400; the body itself is one level.
    let deep = format!("{{\"a\": {}1{}}}", "[".repeat(8), "]".repeat(8));
    let reply = node.post_order(&bob, &deep).await;
    node.expect_error(&reply, 400, "a payload nested 9 deep");
    assert!(reply.text.contains("deeper"), "{reply}");
    let ok = format!("{{\"a\": {}1{}}}", "[".repeat(7), "]".repeat(7));
    node.expect_json(
        &node.post_order(&bob, &ok).await,
        201,
        "a payload nested 8 deep",
    );
}

#[tokio::test]
async fn unfinished_orders_per_user_are_capped() {
    let node = Node::start(&format!(
        "{}[limits]\nmax_in_flight_per_user = 2\n",
        simulate("2s")
    ))
    .await;
    let alice = unique_user("alice");
    let first = node.create_order(&alice, &json!({})).await;
    node.create_order(&alice, &json!({})).await;
    let reply = node.post_order(&alice, "{}").await;
    node.expect_error(&reply, 429, "a third unfinished order");
    assert!(reply.header("retry-after").is_some(), "{reply:?}");
    node.create_order(&unique_user("bob"), &json!({})).await;
    // A finished order frees its place.
    node.expect_json(&node.cancel(&alice, &first).await, 202, "cancel");
    node.wait_terminal(&alice, &first, Duration::from_secs(30))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = node.post_order(&alice, "{}").await;
        if reply.status == 201 {
            break;
        }
        node.expect_error(&reply, 429, "while the cancelled order winds down");
        assert!(
            Instant::now() < deadline,
            "still capped after an order ended"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn a_client_hanging_up_after_its_submission_is_capped_all_the_same() {
    let node = Node::start(&format!(
        "{}[limits]\nmax_in_flight_per_user = 2\n",
        simulate("30s")
    ))
    .await;
    let alice = unique_user("alice");
    let address = format!("127.0.0.1:{}", node.port);
    // Each submission's connection is closed as soon as its body is sent, before the answer.
    for _ in 0..5 {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        let request = format!(
            "POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {alice}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        drop(stream);
    }
    // Submissions answered in full go on until the cap refuses one.
    let mut refused = false;
    for _ in 0..10 {
        let reply = node.post_order(&alice, "{}").await;
        if reply.status == 429 {
            refused = true;
            break;
        }
        node.expect_json(&reply, 201, "a submission under the cap");
    }
    assert!(refused, "never capped");
    let ids = node.list_all_ids(&alice, &[]).await;
    assert!(
        ids.len() <= 2,
        "{} unfinished orders with max_in_flight_per_user = 2",
        ids.len()
    );
}

/// Sends `bytes` one at a time, `gap` apart, until the peer closes or `within` passes; returns
/// when the write side failed (the connection was closed), if it did.
async fn trickle(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    bytes: Vec<u8>,
    gap: Duration,
) -> Option<Instant> {
    for byte in bytes {
        if writer.write_all(&[byte]).await.is_err() {
            return Some(Instant::now());
        }
        tokio::time::sleep(gap).await;
    }
    None
}

/// Reads until EOF or error, at most `within`; the bytes read and when the read side ended.
async fn read_to_close(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    within: Duration,
) -> (Vec<u8>, Option<Instant>) {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, reader.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (received, Some(Instant::now())),
            Ok(Ok(count)) => received.extend_from_slice(&buffer[..count]),
            Err(_) => return (received, None),
        }
    }
}

#[tokio::test]
async fn slow_clients_are_disconnected_while_others_are_served() {
    let node = Node::start(&format!(
        "{}[limits]\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"\n",
        simulate("10ms")
    ))
    .await;
    let user = unique_user("alice");
    let address = format!("127.0.0.1:{}", node.port);
    let started = Instant::now();

    // Slow headers: 10 clients each sending a byte every 200 ms (a 30 s request if let be).
    let mut slow = Vec::new();
    for _ in 0..10 {
        let stream = TcpStream::connect(&address).await.expect("connect");
        let (reader, writer) = stream.into_split();
        let request = format!(
            "POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {user}\r\nContent-Type: application/json\r\nX-Padding: {}\r\n\r\n",
            "p".repeat(120)
        );
        slow.push((
            tokio::spawn(trickle(
                writer,
                request.into_bytes(),
                Duration::from_millis(200),
            )),
            tokio::spawn(read_to_close(reader, Duration::from_secs(8))),
        ));
    }
    // Slow body: the headers at once, then a 100-byte body a byte every 200 ms.
    let stream = TcpStream::connect(&address).await.expect("connect");
    let (reader, mut writer) = stream.into_split();
    writer
        .write_all(
            format!(
                "POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {user}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("send headers");
    let body = format!("{{\"pad\": \"{}\"}}", "x".repeat(89)).into_bytes();
    assert_eq!(body.len(), 100);
    let slow_body = (
        tokio::spawn(trickle(writer, body, Duration::from_millis(200))),
        tokio::spawn(read_to_close(reader, Duration::from_secs(8))),
    );

    // Silent: connected, and nothing sent, or the first bytes of HTTP/2's preface.
    let mut silent = Vec::new();
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let stream = TcpStream::connect(&address).await.expect("connect");
        let (reader, mut writer) = stream.into_split();
        writer.write_all(opening).await.expect("send the opening");
        silent.push((
            writer,
            tokio::spawn(read_to_close(reader, Duration::from_secs(8))),
        ));
    }
    // Not reading: a thousand requests for the 60 KB OpenAPI document (more than the sockets'
    // buffers hold), none of the answers read.
    let stream = TcpStream::connect(&address).await.expect("connect");
    let (reader, mut writer) = stream.into_split();
    let requests = "GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(1000);
    writer
        .write_all(requests.as_bytes())
        .await
        .expect("send the requests");
    let unread = (reader, writer);

    // Meanwhile others are served.
    let id = node.create_order(&user, &json!({})).await;
    node.order(&user, &id).await;
    node.heartbeat().await;

    for (index, (writer, reader)) in slow.into_iter().enumerate() {
        let (received, closed) = reader.await.expect("reader task");
        let closed = closed.unwrap_or_else(|| {
            panic!(
                "slow-header client {index} still connected after 8 s; got {:?}\n{}",
                String::from_utf8_lossy(&received),
                node.log_tail()
            )
        });
        let after = closed.duration_since(started);
        assert!(
            after < Duration::from_secs(5),
            "slow-header client {index} closed only after {after:?}"
        );
        writer.abort();
    }
    let (received, closed) = slow_body.1.await.expect("reader task");
    let text = String::from_utf8_lossy(&received).to_string();
    let closed = closed.unwrap_or_else(|| {
        panic!(
            "slow-body client still connected after 8 s; got {text:?}\n{}",
            node.log_tail()
        )
    });
    assert!(
        closed.duration_since(started) < Duration::from_secs(5),
        "slow-body client closed only after {:?}",
        closed.duration_since(started)
    );
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "slow body: expected a 408 before the close, got {text:?}"
    );
    assert!(
        text.contains("\"error\""),
        "408 without a JSON error: {text:?}"
    );
    slow_body.0.abort();
    for (index, (writer, reader)) in silent.into_iter().enumerate() {
        let (_, closed) = reader.await.expect("reader task");
        let closed =
            closed.unwrap_or_else(|| panic!("silent client {index} still connected after 8 s"));
        assert!(
            closed.duration_since(started) < Duration::from_secs(5),
            "silent client {index} closed only after {:?}",
            closed.duration_since(started)
        );
        drop(writer);
    }
    // The client that never read: once it reads, the connection ends long before the last
    // answer, the node having given up on it when its writes stalled.
    let (mut reader, writer) = unread;
    tokio::time::sleep_until((started + Duration::from_secs(4)).into()).await;
    let mut taken = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut taken)).await;
    drop(writer);
    let answers = String::from_utf8_lossy(&taken)
        .matches("HTTP/1.1 200")
        .count();
    assert!(
        read.is_ok() && answers < 1000,
        "the unread connection was kept: {answers} answers, {read:?}"
    );

    // And the node still serves.
    node.create_order(&user, &json!({})).await;
}

/// A stranger on the gossip network (a real node with the cluster secret, but on its own Redis)
/// that advertises itself with no orders in flight is never picked to take over a dead node's
/// orders: it holds no liveness lease in the cluster's Redis. The busy survivor takes them over.
#[tokio::test]
async fn a_gossip_member_without_a_lease_is_never_sent_a_transfer() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, "2s").await;
    let own_redis = RedisServer::start();
    let stranger = Node::start(&format!(
        "[log]\nlevel = \"debug\"\n[database]\nurl = \"{}\"\n[cluster]\nsecret = \"{SECRET}\"\nseeds = [\"127.0.0.1:{}\"]\n",
        own_redis.url(),
        nodes[0].port
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes[0].cluster().await["nodes"]
        .as_array()
        .map_or(0, |seen| {
            seen.iter().filter(|node| node["connected"] == true).count()
        })
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "the stranger never joined gossip"
        );
        tokio::time::sleep(POLL).await;
    }

    // The survivor is busy, so the idle stranger would be the first choice by orders in flight.
    let user = unique_user("stranger");
    let busy = submit(&nodes[0], &user, 5).await;
    let orders = submit(&nodes[1], &user, 10).await;
    wait_started(&nodes[0], &user, &orders).await;
    let mut nodes = nodes;
    nodes[1].kill();
    wait_all_completed(&nodes[0], &user, &orders, TAKEOVER).await;
    wait_all_completed(&nodes[0], &user, &busy, TAKEOVER).await;
    assert!(
        nodes[0].log().contains("took over orders"),
        "no takeover logged"
    );
    let log = stranger.log();
    assert!(
        !log.contains("/service/transfer"),
        "the stranger was sent a transfer request:\n{log}"
    );
}

/// Gossip is sealed with the cluster secret: a node on the same Redis with a mistyped secret,
/// naming a member as its seed, is not heard (the member drops its datagrams, says so and
/// counts them), and neither lists the other.
#[tokio::test]
async fn a_node_with_another_secret_is_not_heard_in_gossip() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 1, "2s").await;
    let stranger = Node::start(&format!(
        "[database]\nurl = \"{}\"\n[cluster]\nsecret = \"not-the-cluster-secret\"\nseeds = [\"127.0.0.1:{}\"]\n",
        redis.url(),
        nodes[0].port
    ))
    .await;
    let dropped = "dropped gossip datagrams not sealed with this cluster's secret";
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes[0].log().contains(dropped) {
        assert!(
            Instant::now() < deadline,
            "the member never dropped the stranger's gossip\n{}",
            nodes[0].log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    let dropped = crate::metrics::value(
        &crate::metrics::scrape(&nodes[0]).await,
        "order_process_gossip_dropped_total",
    );
    assert!(dropped >= 1.0, "dropped datagrams counted: {dropped}");
    // Watched over six rounds of gossip (500 ms each): neither ever knows the other, where plain
    // gossip has them know each other within a round or two.
    let watched = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watched {
        for (node, what) in [(&nodes[0], "the member"), (&stranger, "the stranger")] {
            let view = node.cluster().await;
            let known = view["nodes"].as_array().map_or(0, Vec::len);
            assert_eq!(known, 1, "{what} knows another node: {view}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Past `limits.max_connections` open connections, a new one waits to be served until one of
/// them closes.
#[tokio::test]
async fn connections_past_the_limit_wait_for_one_to_close() {
    let node = Node::start(&format!(
        "{}[limits]\nmax_connections = 2\nheader_read_timeout = \"30s\"\n",
        simulate("10ms")
    ))
    .await;
    let address = format!("127.0.0.1:{}", node.port);
    // Two idle connections, each proven served so that it holds its place.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        stream
            .write_all(b"GET /diagnostic/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("send");
        let mut buffer = [0u8; 512];
        let count = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(String::from_utf8_lossy(&buffer[..count]).starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    let waiting = tokio::spawn({
        let address = address.clone();
        async move {
            let mut stream = TcpStream::connect(&address).await.expect("connect");
            stream
                .write_all(
                    b"GET /diagnostic/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                )
                .await
                .expect("send");
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.expect("read");
            (Instant::now(), String::from_utf8_lossy(&answer).to_string())
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served at once"
    );
    let closed = Instant::now();
    drop(held.pop());
    let (answered, answer) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a place is free")
        .expect("the client task");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answered >= closed);
}

/// In header mode on loopback, a request naming the node by another host (a page that rebound
/// its own name to 127.0.0.1) is refused before it reaches any route; loopback names pass. What
/// counts is the listener, not the address the node advertises to peers.
#[tokio::test]
async fn a_header_mode_node_on_loopback_serves_only_loopback_hosts() {
    let advertised = format!(
        "{}\n[cluster]\nadvertise = \"192.0.2.10:8080\"\n",
        simulate("10ms")
    );
    for config in [simulate("10ms"), advertised] {
        let node = Node::start(&config).await;
        let address = format!("127.0.0.1:{}", node.port);
        let ask = |host: String| {
            let address = address.clone();
            async move {
                let mut stream = TcpStream::connect(&address).await.expect("connect");
                let request = format!(
                    "GET /orders HTTP/1.1\r\nHost: {host}\r\nAuthorization: alice\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).await.expect("send");
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).await.expect("read");
                String::from_utf8_lossy(&answer).to_string()
            }
        };
        let port = node.port;
        for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
            let answer = ask(host.clone()).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
        }
        for host in [
            format!("rebound.example:{port}"),
            "evil.example".to_string(),
        ] {
            let answer = ask(host.clone()).await;
            assert!(
                answer.starts_with("HTTP/1.1 403"),
                "{config}\n{host}: {answer}"
            );
            assert!(answer.contains("\"error\""), "{host}: {answer}");
        }
    }
}
