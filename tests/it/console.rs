//! The console at `GET /`, driven in headless Chromium over the DevTools protocol against three
//! nodes on one Redis with orders flowing: its charts have data points, its cluster table shows
//! every node, an order looked up shows its steps as a timeline, and a parked rollback is
//! retried with a click on the page. Screenshots are kept at `<target dir>/console-*.png`.
//! Skipped, with a notice, when no Chromium is installed (scripts/test installs it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use order_process_testkit::{Answer, Scripted};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::cluster::{cluster_turn, node_config, wait_formed};
use crate::harness::{pretty, unique_user, Node, RedisServer, POLL, TERMINAL};

/// Longest the browser may take to start, or a page check to come true.
const BROWSER_DEADLINE: Duration = Duration::from_secs(30);

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

/// Headless Chromium showing one page, spoken to over the DevTools protocol.
struct Browser {
    process: tokio::process::Child,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium on `url` and connects to that page's DevTools socket.
    async fn open(binary: &Path, url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("a profile dir");
        let process = tokio::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1200,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it chose into the profile once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + BROWSER_DEADLINE;
        let port: u16 = loop {
            let port = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|text| text.lines().next().and_then(|line| line.parse().ok()));
            if let Some(port) = port {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "chromium opened no DevTools port"
            );
            tokio::time::sleep(POLL).await;
        };
        let page_socket = loop {
            let targets: Value = match reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
                .await
                .ok()
                .map(|reply| reply.json())
            {
                Some(json) => json.await.unwrap_or(Value::Null),
                None => Value::Null,
            };
            let page = targets.as_array().and_then(|targets| {
                targets
                    .iter()
                    .find(|target| target["type"] == "page")
                    .and_then(|target| target["webSocketDebuggerUrl"].as_str())
                    .map(str::to_string)
            });
            if let Some(page) = page {
                break page;
            }
            assert!(Instant::now() < deadline, "chromium shows no page target");
            tokio::time::sleep(POLL).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(page_socket.as_str())
            .await
            .expect("the page's DevTools socket");
        Browser {
            process,
            socket,
            next_id: 0,
            _profile: profile,
        }
    }

    /// Sends one DevTools command and returns its result (events in between are skipped).
    async fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket
            .send(Message::Text(message.into()))
            .await
            .expect("send to chromium");
        let deadline = Instant::now() + BROWSER_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer from chromium to {method}"))
                .unwrap_or_else(|| panic!("chromium closed the socket during {method}"))
                .expect("a DevTools frame");
            let Message::Text(text) = frame else { continue };
            let answer: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if answer["id"] == json!(id) {
                assert!(
                    answer.get("error").is_none(),
                    "{method} failed: {}",
                    pretty(&answer)
                );
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page (awaiting a promise) and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "`{expression}` threw: {}",
            pretty(&result)
        );
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is true; `what` names the check in the failure.
    async fn wait_true(&mut self, expression: &str, what: &str) {
        let deadline = Instant::now() + BROWSER_DEADLINE;
        loop {
            if self.eval(expression).await == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body.innerText").await;
                panic!("the console never showed {what}; page text:\n{text}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Clicks the element `selector` names as a user would: scrolled into view, then a mouse
    /// press and release at its centre.
    async fn click(&mut self, selector: &str) {
        let centre = self
            .eval(&format!(
                "(() => {{ const node = document.querySelector({selector:?}); if (!node) return null; \
                 node.scrollIntoView({{block: 'center'}}); const box = node.getBoundingClientRect(); \
                 return [box.x + box.width / 2, box.y + box.height / 2]; }})()"
            ))
            .await;
        let (x, y) = match (centre[0].as_f64(), centre[1].as_f64()) {
            (Some(x), Some(y)) => (x, y),
            _ => panic!("nothing to click at {selector}"),
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.command(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    /// Types `text` into the input `selector` names and presses Enter, as a user would. A click
    /// lands where the field was when it was measured, and a refresh of the page in between can
    /// move it: the field is clicked until it has the focus, its text selected so the typing
    /// replaces it.
    async fn type_into(&mut self, selector: &str, text: &str) {
        let focused = format!(
            "(() => {{ const node = document.querySelector({selector:?}); \
             if (node === null || document.activeElement !== node) return false; \
             node.select(); return true; }})()"
        );
        let mut tries = 0;
        loop {
            self.click(selector).await;
            if self.eval(&focused).await == Value::Bool(true) {
                break;
            }
            tries += 1;
            assert!(tries < 20, "{selector} never took the focus from a click");
        }
        self.command("Input.insertText", json!({"text": text}))
            .await;
        for kind in ["keyDown", "keyUp"] {
            self.command(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"}),
            )
            .await;
        }
    }

    /// Saves a PNG of the whole page at `path`; returns its size in bytes.
    async fn screenshot(&mut self, path: &Path) -> usize {
        let shot = self
            .command(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .expect("a base64 screenshot");
        std::fs::write(path, &png).expect("write the screenshot");
        png.len()
    }

    /// Closes the browser and waits for it to exit (killed if it does not).
    async fn close(mut self) {
        let _ = self.command("Browser.close", json!({})).await;
        if tokio::time::timeout(Duration::from_secs(10), self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.kill().await;
        }
    }
}

/// The node config with Processing on the scripted shop (its refund is its rollback), every
/// other step simulated, and the completion webhook sent to the shop too, without retries.
fn shop_config(redis: &RedisServer, shop: &Scripted, seeds: &[u16]) -> String {
    format!(
        "{}[steps.Processing]\nhandler = \"http\"\nurl = \"{base}/charge\"\n\
         rollback_url = \"{base}/refund\"\ntimeout = \"5s\"\nretries = 1\nbackoff = \"50ms\"\n\
         backoff_max = \"50ms\"\n\
         [notify]\nurl = \"{base}/notify\"\nsecret = \"console-webhook-secret\"\nretries = 0\n",
        node_config(redis, "20ms", seeds),
        base = shop.base()
    )
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .to_path_buf()
}

#[tokio::test]
async fn console_shows_the_cluster_its_flow_an_orders_story_and_retries_a_parked_rollback() {
    let Some(binary) = chromium() else {
        eprintln!("NOTICE: console test skipped: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let shop = Scripted::start().await;
    // The first two refunds fail: the one order that fails after its charge is parked, and
    // its retry (from the page) finds the refund service back, slow to answer once (its call
    // times out after 5 s and is retried), so the page shows the order rolling back.
    let mut refunds = vec![Answer::Status(500, "ledger down".into()); 2];
    refunds.push(Answer::Hang);
    shop.queue("/refund", refunds);
    let first = Node::start(&shop_config(&redis, &shop, &[])).await;
    let seed = first.port;
    let mut nodes = vec![first];
    for _ in 0..2 {
        nodes.push(Node::start(&shop_config(&redis, &shop, &[seed])).await);
    }
    wait_formed(&nodes, 3).await;

    let user = unique_user("console");
    // The first order's webhook is refused (400, which is not retried): its story offers to
    // send it again.
    shop.queue("/notify", vec![Answer::Status(400, "unknown shop".into())]);
    let done = nodes[0].create_order(&user, &json!({"sku": "A1"})).await;
    nodes[0]
        .wait_for(&user, &done, TERMINAL, "its webhook failed", |order| {
            order["notification"]["state"] == "failed"
        })
        .await;
    // Orders keep flowing into every node while the console is open.
    let flowing = Arc::new(AtomicBool::new(true));
    let bases: Vec<String> = nodes.iter().map(|node| node.base.clone()).collect();
    let feeder = {
        let (flowing, user) = (Arc::clone(&flowing), user.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut turn = 0usize;
            while flowing.load(Ordering::Relaxed) {
                let base = &bases[turn % bases.len()];
                let _ = client
                    .post(format!("{base}/orders"))
                    .header("authorization", &user)
                    .json(&json!({"sku": "C1", "n": turn}))
                    .send()
                    .await;
                turn += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Parked on another node than the one the browser asks.
    let owner = unique_user("parker");
    let parked = nodes[1]
        .create_order(
            &owner,
            &json!({"sku": "P1", "simulate": {"fail_at": "Post-Processing"}}),
        )
        .await;
    nodes[1]
        .wait_for(&owner, &parked, TERMINAL, "parked", |order| {
            order["rollback_state"] == "incomplete"
        })
        .await;

    // curl-like clients still get the welcome text; a browser gets the console.
    let plain = nodes[0].call(Method::GET, "/").send().await;
    assert_eq!(plain.text, "Welcome to Order Processing System!");
    let html = nodes[0]
        .call(Method::GET, "/")
        .header("Accept", "text/html")
        .send()
        .await;
    assert_eq!(html.status, 200);
    assert!(
        html.text.len() < 64 * 1024,
        "the console is {} bytes",
        html.text.len()
    );
    for outside in [
        "<script src",
        "<link",
        "@import",
        "url(http",
        "fetch(\"http",
    ] {
        assert!(
            !html.text.contains(outside),
            "the console loads something from elsewhere ({outside})"
        );
    }

    let started = Instant::now();
    let mut browser = Browser::open(&binary, &format!("{}/", nodes[0].base)).await;
    browser
        .command(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;

    // The cluster: three live nodes, all answering, one leader.
    browser
        .wait_true(
            "document.querySelectorAll('#nodes tbody tr').length === 3 && \
             document.querySelectorAll('#nodes td.live').length === 3 && \
             document.querySelector('#cluster-note').textContent.startsWith('3 of 3 nodes answered')",
            "three live nodes that answer",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#nodes td.ok').length")
            .await,
        json!(1),
        "one leader"
    );
    // The flow: orders per second and step latencies have points.
    browser
        .wait_true(
            "['accepted', 'completed'].every((name) => \
               Number(document.querySelector(`#flow-throughput polyline[data-series=${name}]`)?.dataset.points) > 0) && \
             Number(document.querySelector('#flow-latency polyline[data-series=\"Processing p99\"]')?.dataset.points) > 0 && \
             document.querySelector('#flow-note').textContent.startsWith('3 node(s) counted')",
            "charts with data points from three nodes",
        )
        .await;
    browser
        .wait_true(
            "document.querySelector('#error').textContent === ''",
            "no refresh error",
        )
        .await;
    let overview = target_dir().join("console-overview.png");
    let size = browser.screenshot(&overview).await;
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        overview.display()
    );

    // An order's story: in header mode the user's name goes where a token would.
    browser.type_into("#token", &user).await;
    browser.type_into("#order-id", &done).await;
    browser
        .wait_true(
            "document.querySelectorAll('#timeline .tl-step').length === 5 && \
             document.querySelector('#story-step').textContent.startsWith('Completed') && \
             [...document.querySelectorAll('#timeline .tl-name small')].slice(0, 4).every((n) => n.textContent.startsWith('on '))",
            "the completed order's five steps, each with the node that ran it",
        )
        .await;
    // Its webhook was refused: the story says so, and a click has it sent again.
    browser
        .wait_true(
            "document.querySelector('#story-webhook')?.textContent.startsWith('failed · 1 attempt: ')",
            "the refused webhook",
        )
        .await;
    browser.click("#order button.resend").await;
    browser
        .wait_true(
            "document.querySelector('#action-result').textContent.includes('to be sent again')",
            "the webhook to be sent again",
        )
        .await;
    nodes[0]
        .wait_for(&user, &done, TERMINAL, "its webhook delivered", |order| {
            order["notification"]["state"] == "delivered"
        })
        .await;
    browser.click("#order button.quiet").await;
    browser
        .wait_true(
            "document.querySelector('#story-webhook')?.textContent.startsWith('delivered · 2 attempts') && \
             document.querySelector('#order button.resend') === null",
            "the webhook delivered",
        )
        .await;

    // The parked rollback, retried with a click.
    let row = format!("#parked tbody tr[data-order=\"{parked}\"] button.retry");
    browser
        .wait_true(
            &format!("document.querySelector({row:?}) !== null"),
            "the parked rollback listed",
        )
        .await;
    browser
        .click(&format!("#parked tbody tr[data-order=\"{parked}\"] a"))
        .await;
    browser
        .wait_true(
            &format!(
                "document.querySelector('#story-id')?.textContent === {parked:?} && \
                 document.querySelector('#story-rollback')?.textContent.startsWith('incomplete') && \
                 document.querySelectorAll('#timeline .tl-rollback').length >= 1"
            ),
            "the parked order's story",
        )
        .await;
    let story = target_dir().join("console-order.png");
    browser.screenshot(&story).await;
    browser.click(&row).await;
    browser
        .wait_true(
            "document.querySelector('#action-result').textContent.includes('retried')",
            "the retry accepted",
        )
        .await;
    // Rolling back: nothing runs forward any more, and there is nothing to cancel.
    browser
        .wait_true(
            "document.querySelector('#story-step')?.textContent === 'Failed' && \
             document.querySelector('#story-rollback') === null && \
             document.querySelector('#order button.cancel') === null && \
             document.querySelector('#timeline .tl-bar.running') === null",
            "the order rolling back, shown without a running step or a cancel button",
        )
        .await;
    let order = nodes[1]
        .wait_for(&owner, &parked, TERMINAL, "rolled back", |order| {
            order["rollback_state"] == "complete"
        })
        .await;
    assert_eq!(order["current_step"], "Failed", "{}", pretty(&order));
    assert_eq!(
        shop.calls_to("/refund").len(),
        4,
        "two failed refunds, then the retried one, timed out once"
    );
    browser
        .wait_true(
            &format!("document.querySelector({row:?}) === null"),
            "the retried order gone from the parked list",
        )
        .await;
    // The story shows the finished rollback once refreshed.
    browser.click("#order button.quiet").await;
    browser
        .wait_true(
            "document.querySelector('#story-rollback')?.textContent.startsWith('complete')",
            "the rollback complete",
        )
        .await;
    // A Redis that may evict keys: the nodes refuse new orders, and the page says so, until
    // it is mended.
    browser
        .wait_true(
            "document.querySelector('#store-note').textContent === '' && \
             document.querySelector('#store-note').offsetParent === null",
            "no store note while the store is well",
        )
        .await;
    assert_eq!(redis.cli(&["CONFIG", "SET", "maxmemory", "1gb"]), "OK");
    assert_eq!(
        redis.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]),
        "OK"
    );
    browser
        .wait_true(
            "document.querySelector('#store-note').textContent.includes('maxmemory-policy allkeys-lru') && \
             document.querySelector('#store-note').offsetParent !== null",
            "a store note naming the eviction policy",
        )
        .await;
    assert_eq!(
        redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    browser
        .wait_true(
            "document.querySelector('#store-note').textContent === ''",
            "the store note gone once redis is mended",
        )
        .await;
    // Opened from a link that names an order (`/#<id>`): its story, asked for once the page
    // knows the node's auth mode (in header mode the name goes bare, not as a token).
    for url in [
        "about:blank".to_string(),
        format!("{}/#{done}", nodes[0].base),
    ] {
        browser
            .command("Page.navigate", json!({ "url": url }))
            .await;
    }
    browser
        .wait_true(
            &format!(
                "document.querySelector('#story-id')?.textContent === {done:?} && \
                 document.querySelectorAll('#timeline .tl-step').length === 5"
            ),
            "the story of the order the link names",
        )
        .await;
    // A link whose fragment is no valid escape still gets the page.
    for url in ["about:blank".to_string(), format!("{}/#%", nodes[0].base)] {
        browser
            .command("Page.navigate", json!({ "url": url }))
            .await;
    }
    browser
        .wait_true(
            "Number(document.body?.dataset.refreshed || 0) > 0 && \
             document.querySelectorAll('#nodes tbody tr').length === 3",
            "the page refreshed after a link with a bad escape",
        )
        .await;
    eprintln!(
        "console screenshots: {} {} (browser part {:?})",
        overview.display(),
        story.display(),
        started.elapsed()
    );
    browser.close().await;
    flowing.store(false, Ordering::Relaxed);
    let _ = feeder.await;

    // A node that does not answer shows as such, and the totals are of those that answered.
    let paused = nodes[2].heartbeat().await["service_id"]
        .as_str()
        .expect("service_id")
        .to_string();
    nodes[2].signal("STOP");
    let deadline = Instant::now() + BROWSER_DEADLINE;
    let view = loop {
        let view = nodes[0].expect_json(
            &nodes[0]
                .call(Method::GET, "/diagnostic/overview")
                .send()
                .await,
            200,
            "GET /diagnostic/overview",
        );
        let row = view["nodes"]
            .as_array()
            .and_then(|rows| rows.iter().find(|row| row["name"] == paused.as_str()))
            .cloned()
            .unwrap_or(Value::Null);
        if row["answered"] == json!(false) {
            assert!(row.get("figures").is_none(), "{}", pretty(&row));
            assert!(row["problem"].is_string(), "{}", pretty(&row));
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "a paused node still answers:\n{}",
            pretty(&view)
        );
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(view["nodes_answered"], 2, "{}", pretty(&view));
    let answered: u64 = view["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["answered"] == json!(true))
        .map(|row| row["figures"]["totals"]["accepted"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(view["totals"]["accepted"], answered, "{}", pretty(&view));
    let flow = nodes[0].expect_json(
        &nodes[0]
            .call(Method::GET, "/diagnostic/flow?scope=cluster")
            .send()
            .await,
        200,
        "GET /diagnostic/flow?scope=cluster",
    );
    assert!(
        flow["nodes_answered"].as_u64() < Some(3),
        "{}",
        pretty(&flow)
    );
    nodes[2].signal("CONT");
}
