//! The heartbeat on a full disk: a node whose data dir is a small tmpfs answers `DEGRADED` once
//! its store cannot write, not only when it cannot read, and `OK` again once restarted with room
//! on the disk. Mounting needs root; without it the test says so and passes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::Method;

use crate::harness::{simulate, unique_user, Node, Reply, POLL};

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
async fn heartbeat_is_degraded_while_the_store_cannot_write() {
    let mut node = Node::start(&simulate("10ms")).await;
    // The node's data dir becomes a small tmpfs: stop it, mount, start it again on it.
    node.kill();
    let Some(_tmpfs) = Tmpfs::mount(&node.data_dir(), "16m") else {
        eprintln!("not root: cannot mount a tmpfs, full-disk heartbeat test skipped");
        return;
    };
    node.restart().await;
    assert_eq!(node.heartbeat().await["status"], "OK");

    let filler = node.data_dir().join("filler");
    fill(&filler);
    let user = unique_user("full");
    let body = format!(r#"{{"padding":"{}"}}"#, "x".repeat(4096));
    let mut last = heartbeat(&node).await;
    let deadline = tokio::time::Instant::now() + NOTICE;
    // Writes go on (orders submitted) until the store finds the disk full.
    while !degraded(&last) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "heartbeat still {} on a full disk: {}\n{}",
            last.status,
            last.text,
            node.log_tail()
        );
        node.post_order(&user, &body).await;
        tokio::time::sleep(POLL).await;
        last = heartbeat(&node).await;
    }

    // The store latches a failed write (the file may not match what it holds in memory): it is
    // reopened by a restart once there is room again.
    std::fs::remove_file(&filler).expect("remove the filler");
    assert!(
        degraded(&heartbeat(&node).await),
        "still degraded until restarted"
    );
    node.restart().await;
    assert_eq!(node.heartbeat().await["status"], "OK");
    node.kill();
}
