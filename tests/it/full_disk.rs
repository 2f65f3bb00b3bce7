//! A full disk. The embedded store's: a node whose data dir is a small tmpfs answers `DEGRADED`
//! once its store cannot write, not only when it cannot read; while the disk stays full it
//! reopens its file less and less often, and once there is room again it writes again without a
//! restart, the orders accepted before finishing. Redis's: with `appendfsync always` Redis exits
//! at its first write that does not fit, and with `everysec` it stays up refusing writes
//! (`MISCONF`) until there is room; in both, submissions meanwhile are answered 503, and every
//! order accepted before or during it finishes once Redis writes again. A backup of the
//! embedded store is refused (507) without the room for it. Mounting needs root;
//! without it the tests say so and pass.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::Method;

use crate::harness::{simulate, unique_user, Node, RedisServer, Reply, POLL, TERMINAL};
use crate::history::assert_completed;
use order_process_testkit::poll::until;

/// How long the store may take to notice (a write failing, then a heartbeat's probe).
const NOTICE: Duration = Duration::from_secs(20);

/// A tmpfs mounted for the test, unmounted (lazily, as the node may still hold its file) when
/// dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`; `None` when this process may not mount.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !is_root() {
            return None;
        }
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs on {}", dir.display());
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Writes to `path` until the file system is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0x5a_u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    // What is left is smaller than a chunk.
    while file.write_all(&[0x5a]).is_ok() {}
}

async fn heartbeat(node: &Node) -> Reply {
    node.call(Method::GET, "/diagnostic/heartbeat").send().await
}

fn degraded(reply: &Reply) -> bool {
    reply.status == 503 && reply.text.contains("DEGRADED")
}

#[tokio::test]
async fn the_embedded_store_on_a_full_disk_is_degraded_then_writes_again_once_it_has_room() {
    let Some(full) = FullEmbedded::start().await else {
        return;
    };
    // A backup, written in the data dir first, is not begun there.
    let reply = full.node.call(Method::GET, "/service/backup").send().await;
    full.node
        .expect_error(&reply, 507, "a backup with the data dir full");
    // redb fails every access of its handle once a write failed on the disk: the store opens
    // its file again, without a restart, and once there is room the orders accepted go on.
    full.make_room_and_finish().await;
}

#[tokio::test]
async fn the_embedded_store_on_a_disk_that_stays_full_reopens_its_file_less_and_less_often() {
    let Some(mut full) = FullEmbedded::start().await else {
        return;
    };
    // Each order that needs the file to grow fails on the disk still full once the file is
    // open again: every reopen waits twice as long as the one before.
    let pauses = submit_until(
        &full.node,
        &full.user,
        &padded(),
        &mut full.accepted,
        "three reopens of the store file",
        || async {
            let pauses = reopen_pauses(&full.node.log());
            (pauses.len() >= 3).then_some(pauses)
        },
    )
    .await;
    assert_eq!(
        pauses[..3],
        [0, 1000, 2000],
        "pauses (ms) before each reopen: {pauses:?}"
    );
    assert!(degraded(&heartbeat(&full.node).await));
    full.make_room_and_finish().await;
}

/// An order large enough that the file must grow for it.
fn padded() -> String {
    format!(r#"{{"padding":"{}"}}"#, "x".repeat(4096))
}

/// The pauses (ms) the store's reopens of its file waited, from the node's log, in order.
fn reopen_pauses(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains("reopening it"))
        .filter_map(|line| {
            let after = &line[line.find("pause_ms")? + "pause_ms".len()..];
            let digits: String = after
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// A node on the embedded store whose data dir is a small tmpfs, filled until its heartbeat
/// said `DEGRADED`, with the orders it accepted meanwhile.
struct FullEmbedded {
    // Unmounted (lazily) when dropped, before the node: fields drop in order, and the node's temp
    // dir can only be removed whole once its data dir is no longer a mount point (the files the
    // node wrote there before the mount would stay behind).
    _tmpfs: Tmpfs,
    node: Node,
    filler: PathBuf,
    user: String,
    accepted: Vec<String>,
}

impl FullEmbedded {
    /// `None` when this process may not mount a tmpfs (the test then passes, saying so).
    async fn start() -> Option<FullEmbedded> {
        let mut node = Node::start(&simulate("10ms")).await;
        // The node's data dir becomes a small tmpfs: stop it, mount, start it again on it.
        node.kill();
        let Some(tmpfs) = Tmpfs::mount(&node.data_dir(), "16m") else {
            eprintln!("not root: cannot mount a tmpfs, full-disk test skipped");
            return None;
        };
        node.restart().await;
        assert_eq!(node.heartbeat().await["status"], "OK");

        let filler = node.data_dir().join("filler");
        fill(&filler);
        let user = unique_user("full");
        let mut accepted = Vec::new();
        submit_until(
            &node,
            &user,
            &padded(),
            &mut accepted,
            "heartbeat degraded",
            || async { degraded(&heartbeat(&node).await).then_some(()) },
        )
        .await;
        Some(FullEmbedded {
            _tmpfs: tmpfs,
            node,
            filler,
            user,
            accepted,
        })
    }

    /// Removes the filler; the node writes again on its own, every order accepted completes,
    /// and so do three more; after a restart all of them are still there.
    async fn make_room_and_finish(mut self) {
        std::fs::remove_file(&self.filler).expect("remove the filler");
        let (node, user) = (&mut self.node, &self.user);
        wait_heartbeat(node, "OK").await;
        assert_all_completed(node, user, &self.accepted).await;
        self.accepted.extend(submit(node, user, 3).await);
        assert_all_completed(node, user, &self.accepted).await;
        // All of it on the disk.
        node.restart().await;
        assert_all_completed(node, user, &self.accepted).await;
        node.kill();
    }
}

/// A node on the Redis at `url` with steps of `step`, looking for orders to resume every second.
fn redis_node_config(url: &str, step: &str) -> String {
    format!(
        "{}[pipeline]\nreconcile_interval = \"1s\"\n\
         [database]\nurl = \"{url}\"\n\
         [cluster]\nsecret = \"full-disk-test-secret\"\n",
        simulate(step)
    )
}

/// A tmpfs of `size` on a new temp dir, with a Redis keeping its append-only file there
/// (`appendfsync` as given), and a node on that Redis with steps of `step`; `None` without root.
/// Dropped in reverse order: the node, Redis, the tmpfs, the temp dir.
async fn redis_on_tmpfs(
    size: &str,
    appendfsync: &str,
    step: &str,
) -> Option<(tempfile::TempDir, Tmpfs, RedisServer, Node)> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let tmpfs = Tmpfs::mount(dir.path(), size)?;
    let redis = RedisServer::try_start(dir.path().join("redis"), appendfsync)
        .unwrap_or_else(|error| panic!("start redis-server on the tmpfs: {error}"));
    let node = Node::start(&redis_node_config(&redis.url(), step)).await;
    Some((dir, tmpfs, redis, node))
}

/// Submits `count` orders as `user`, each answered 201; their ids.
async fn submit(node: &Node, user: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(node.create_order(user, &serde_json::json!({})).await);
    }
    ids
}

/// Submits one order as `user` with `body`: its id when accepted (201); when not, asserts the answer is a
/// 503 with `Retry-After` and an `{"error": …}` body, and returns `None`.
async fn submit_or_shed(node: &Node, user: &str, body: &str) -> Option<String> {
    let reply = node.post_order(user, body).await;
    if reply.status == 201 {
        let created = node.expect_json(&reply, 201, "POST /orders");
        return created["order_id"].as_str().map(str::to_string);
    }
    node.expect_error(&reply, 503, "POST /orders while redis cannot write");
    assert!(
        reply.header("retry-after").is_some(),
        "a 503 without Retry-After: {reply}"
    );
    None
}

/// Submits orders as `user` with `body` one after another, adding those accepted to `accepted`, until
/// `done` answers; fails the test when it has not within [`NOTICE`].
async fn submit_until<T, F, Fut>(
    node: &Node,
    user: &str,
    body: &str,
    accepted: &mut Vec<String>,
    what: &str,
    mut done: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + NOTICE;
    loop {
        if let Some(answer) = done().await {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what} within {NOTICE:?} of the disk filling:\n{}",
            node.log_tail()
        );
        accepted.extend(submit_or_shed(node, user, body).await);
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until every order of `ids` completed with a legal history, and none was set aside.
async fn assert_all_completed(node: &Node, user: &str, ids: &[String]) {
    for id in ids {
        let order = node.wait_terminal(user, id, TERMINAL).await;
        assert_completed(&order);
    }
    let reply = node.call(Method::GET, "/diagnostic/set-aside").send().await;
    let aside = node.expect_json(&reply, 200, "GET /diagnostic/set-aside");
    let listed = aside["set_aside"].as_array().cloned().unwrap_or_default();
    for entry in listed {
        assert!(
            !ids.iter().any(|id| entry["order_id"] == id.as_str()),
            "an order accepted before the disk filled was set aside: {entry}"
        );
    }
}

/// Polls the heartbeat until `status` (`OK` or `DEGRADED`).
async fn wait_heartbeat(node: &Node, status: &str) {
    let seen = until(NOTICE, POLL, || async {
        let reply = heartbeat(node).await;
        (reply.try_json()?["status"] == status).then_some(())
    })
    .await;
    if seen.is_none() {
        panic!(
            "heartbeat not {status} within {NOTICE:?}: {}\n{}",
            heartbeat(node).await,
            node.log_tail()
        );
    }
}

#[tokio::test]
async fn redis_that_runs_out_of_disk_with_appendfsync_always_loses_no_accepted_order() {
    let Some((dir, _tmpfs, mut redis, node)) = redis_on_tmpfs("32m", "always", "100ms").await
    else {
        eprintln!("not root: cannot mount a tmpfs, full-disk redis test skipped");
        return;
    };
    let user = unique_user("redis-full");
    let mut accepted = submit(&node, &user, 10).await;

    // Redis cannot keep an acknowledged write it failed to fsync, so it exits at its first
    // write that does not fit (a step's commit, a submission, the heartbeat's probe).
    let filler = dir.path().join("filler");
    fill(&filler);
    let exited = submit_until(&node, &user, "{}", &mut accepted, "redis exited", || {
        std::future::ready(redis.try_exit())
    })
    .await;
    assert!(!exited.success(), "redis exited 0 on a full disk");
    wait_heartbeat(&node, "DEGRADED").await;
    assert_eq!(
        submit_or_shed(&node, &user, "{}").await,
        None,
        "accepted with redis gone"
    );

    // Room again, and Redis started again from its append-only file.
    std::fs::remove_file(&filler).expect("remove the filler");
    redis.restart();
    wait_heartbeat(&node, "OK").await;
    assert_all_completed(&node, &user, &accepted).await;
    accepted.extend(submit(&node, &user, 3).await);
    assert_all_completed(&node, &user, &accepted).await;
}

#[tokio::test]
async fn orders_running_while_redis_refuses_writes_on_a_full_disk_finish_once_it_has_room() {
    let Some((dir, _tmpfs, redis, node)) = redis_on_tmpfs("32m", "everysec", "300ms").await else {
        eprintln!("not root: cannot mount a tmpfs, full-disk redis test skipped");
        return;
    };
    let user = unique_user("redis-misconf");
    let mut accepted = submit(&node, &user, 10).await;

    // With `everysec` Redis stays up, answering reads and refusing writes (MISCONF) once it
    // failed to write its append-only file.
    let filler = dir.path().join("filler");
    fill(&filler);
    submit_until(
        &node,
        &user,
        "{}",
        &mut accepted,
        "heartbeat degraded",
        || async { degraded(&heartbeat(&node).await).then_some(()) },
    )
    .await;
    assert_eq!(
        submit_or_shed(&node, &user, "{}").await,
        None,
        "accepted while redis refuses writes"
    );
    // Orders that were running meet the refusal at their next commit, and retry it.
    let retried = until(NOTICE, POLL, || async {
        node.log()
            .contains("cannot commit transition")
            .then_some(())
    })
    .await;
    assert!(
        retried.is_some(),
        "no commit met the refusal:\n{}",
        node.log_tail()
    );
    // Up (it answers INFO; it refuses even PING meanwhile), and refusing for the disk.
    assert_eq!(
        redis
            .info_field("persistence", "aof_last_write_status")
            .as_deref(),
        Some("err"),
        "redis with appendfsync everysec is not up refusing writes"
    );

    // Redis finds the room on its own and takes writes again.
    std::fs::remove_file(&filler).expect("remove the filler");
    wait_heartbeat(&node, "OK").await;
    assert_all_completed(&node, &user, &accepted).await;
}
