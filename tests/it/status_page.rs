//! The HTML status page at `GET /`, driven in headless Chromium against a node with orders in
//! several states: it must list the node, the in-flight orders by step and the recent failures.
//! A screenshot is kept at `<target dir>/status-page.png`. Skipped, with a notice, when no
//! Chromium is installed (scripts/test installs it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{simulate, unique_user, Node, TERMINAL};

/// Longest a Chromium run may take before the test gives up on it.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(move |dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .find(|path| path.is_file())
}

/// Runs headless Chromium on `url` with `extra` arguments; returns its stdout.
async fn browse(browser: &Path, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().expect("a profile dir");
    let mut command = tokio::process::Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1100,900",
            // Virtual time runs the page's timers and waits for its fetches, so the first
            // refresh has rendered when the DOM is dumped.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(BROWSER_TIMEOUT, command.output())
        .await
        .expect("chromium finished in time")
        .expect("chromium ran");
    assert!(
        output.status.success(),
        "chromium failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn status_page_shows_nodes_steps_and_failures() {
    let Some(browser) = chromium() else {
        eprintln!(
            "NOTICE: status page test skipped: no chromium on PATH (apt-get install chromium)"
        );
        return;
    };
    // Post-Processing takes a minute, so orders wait there; failures happen at once.
    let config = format!(
        "{}\n[steps.Post-Processing]\nhandler = \"simulate\"\nduration = \"60s\"\n",
        simulate("10ms")
    );
    let node = Node::start(&config).await;
    let user = unique_user("status");
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(node.create_order(&user, &json!({"sku": "A1"})).await);
    }
    let mut failed = Vec::new();
    for step in ["Processing", "Pre-Processing"] {
        let body = json!({"simulate": {"fail_at": step}});
        failed.push(node.create_order(&user, &body).await);
    }
    for id in &waiting {
        node.wait_step(&user, id, "Post-Processing", TERMINAL).await;
    }
    for id in &failed {
        node.wait_terminal(&user, id, TERMINAL).await;
    }
    let service_id = node.heartbeat().await["service_id"]
        .as_str()
        .expect("service_id")
        .to_string();

    // curl-like clients still get the welcome text; a browser gets the page.
    let plain = node.call(Method::GET, "/").send().await;
    assert_eq!(plain.text, "Welcome to Order Processing System!");
    let html = node
        .call(Method::GET, "/")
        .header("Accept", "text/html,application/xhtml+xml")
        .send()
        .await;
    assert_eq!(html.status, 200);
    assert!(
        html.header("content-type")
            .is_some_and(|value| value.starts_with("text/html")),
        "{html}"
    );

    let url = format!("{}/", node.base);
    let dom = browse(&browser, &url, &["--dump-dom".to_string()]).await;
    let shows = |needle: &str, what: &str| {
        assert!(
            dom.contains(needle),
            "status page lacks {what} ({needle}):\n{dom}"
        );
    };
    shows(
        &format!(
            "\">{service_id}</td><td class=\"node-role leader\">leader</td>\
             <td class=\"node-liveness live\">live</td><td class=\"node-inflight num\">3</td>"
        ),
        "the node, its role, liveness and in-flight count",
    );
    shows(
        "<td class=\"step-name\">Post-Processing (in flight)</td><td class=\"step-count num\">3</td>",
        "three orders in Post-Processing",
    );
    shows(
        "<td class=\"step-name\">Failed (total)</td><td class=\"step-count num\">2</td>",
        "two failed orders",
    );
    for id in &failed {
        shows(
            &format!("<td class=\"failure-order\">{id}</td>"),
            "a failed order",
        );
    }
    shows(
        "<td class=\"failure-reason\">simulated failure</td>",
        "the reason",
    );
    assert!(
        dom.contains("<span id=\"error\"></span>"),
        "the page reports a refresh error:\n{dom}"
    );

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    browse(
        &browser,
        &url,
        &[format!("--screenshot={}", screenshot.display())],
    )
    .await;
    let size = std::fs::metadata(&screenshot)
        .map(|meta| meta.len())
        .unwrap_or(0);
    assert!(
        size > 1000,
        "screenshot {} is {size} bytes",
        screenshot.display()
    );
    eprintln!("status page screenshot: {}", screenshot.display());
}
