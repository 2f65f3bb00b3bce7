//! The API over https (`server.tls_cert`, `server.tls_key`): a client trusting the CA submits
//! and reads orders, plain http and a client without the CA get nothing, a new certificate is
//! served after SIGHUP, nodes that serve https ask each other for figures and hand orders to
//! each other over https (`cluster.ca_file`), and the bench drives an https node. Certificates
//! are made here (rcgen, see [`Pki`]); the files that stop a node at start are in `config.rs`.

use crate::cluster::{cluster_turn, wait_formed, SECRET};
use crate::config::assert_refused;
use crate::harness::{pretty, unique_user, Node, RedisServer, POLL};
use crate::history::assert_completed;
use crate::metrics::{scrape, value};
use crate::redis_tls::Pki;
use crate::security::{bearer, Tokens, ALICE};
use reqwest::Method;
use std::path::Path;
use std::time::Duration;

/// How long short orders may take to finish, or a node to log what it did.
const WITHIN: Duration = Duration::from_secs(30);

/// The `[server]` lines that serve https with `pki`'s server certificate.
fn server_lines(pki: &Pki) -> String {
    format!(
        "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    )
}

/// A client that trusts only the CA in `ca_file`, for https; with `None`, the platform's roots
/// are not loaded either, so no certificate is trusted.
fn client_trusting(ca_file: Option<&Path>) -> reqwest::Client {
    match ca_file {
        Some(path) => order_process_testkit::http::https_client(path, None),
        None => order_process_testkit::http::client_builder()
            .tls_built_in_root_certs(false)
            .build()
            .expect("build a client"),
    }
}

/// Whether `client` gets a 200 heartbeat from `url`.
async fn heartbeat_ok(client: &reqwest::Client, url: &str) -> bool {
    let url = format!("{url}/diagnostic/heartbeat");
    matches!(client.get(url).send().await, Ok(response) if response.status() == 200)
}

/// Waits until `node`'s log has a line with `needle`.
async fn wait_logged(node: &Node, needle: &str) {
    let found = order_process_testkit::poll::until(WITHIN, POLL, || {
        std::future::ready(node.log().contains(needle).then_some(()))
    })
    .await;
    assert!(
        found.is_some(),
        "no log line with {needle:?} within {WITHIN:?}\n{}",
        node.log_tail()
    );
}

#[tokio::test]
async fn a_node_serves_its_api_over_https_and_a_new_certificate_after_sighup() {
    let pki = Pki::new();
    let config = format!(
        "{}[simulate]\nduration = \"20ms\"\nfailure_rate = 0.0\n",
        server_lines(&pki)
    );
    let node = Node::start_https(&config, &pki.path("ca.pem")).await;
    assert!(node.base.starts_with("https://"), "{}", node.base);
    let user = unique_user("https");
    let id = node
        .create_order(&user, &serde_json::json!({ "n": 1 }))
        .await;
    assert_completed(&node.wait_terminal(&user, &id, WITHIN).await);
    let view = node.cluster().await;
    let reached = view["nodes"][0]["connection_string"].as_str();
    assert_eq!(
        reached,
        Some(format!("https://127.0.0.1:{}", node.port).as_str()),
        "{}",
        pretty(&view)
    );

    // Plain http on the same port, and https without trusting the CA, get no answer.
    let plain = format!("http://127.0.0.1:{}", node.port);
    assert!(!heartbeat_ok(&client_trusting(None), &plain).await);
    assert!(!heartbeat_ok(&client_trusting(None), &node.base).await);

    // A certificate from another CA, written over the files: served after SIGHUP.
    let other = Pki::new();
    for name in ["server.pem", "server.key"] {
        std::fs::copy(other.path(name), pki.path(name)).expect("replace the certificate");
    }
    let (old_ca, new_ca) = (pki.path("ca.pem"), other.path("ca.pem"));
    assert!(heartbeat_ok(&client_trusting(Some(&old_ca)), &node.base).await);
    node.signal("HUP");
    wait_logged(&node, "https certificate reloaded").await;
    // New clients: one that had a session could resume it, which shows no certificate.
    assert!(heartbeat_ok(&client_trusting(Some(&new_ca)), &node.base).await);
    assert!(!heartbeat_ok(&client_trusting(Some(&old_ca)), &node.base).await);
}

/// The client CA (`server.tls_client_ca`) is read again on SIGHUP: written over with another
/// CA, that CA's clients are served and the old one's refused from the next handshake.
#[tokio::test]
async fn a_new_client_ca_is_used_after_sighup() {
    let (pki, other) = (Pki::new(), Pki::new());
    let clients_ca = pki.path("clients-ca.pem");
    std::fs::copy(pki.path("ca.pem"), &clients_ca).expect("copy the CA");
    let config = format!(
        "{}tls_client_ca = \"{}\"\n",
        server_lines(&pki),
        clients_ca.display()
    );
    let ca = pki.path("ca.pem");
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let node = Node::start_mutual_tls(&config, &ca, &cert, &key).await;
    let client_of = |pki: &Pki| {
        let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
        order_process_testkit::http::https_client(&ca, Some((&cert, &key)))
    };
    assert!(heartbeat_ok(&client_of(&pki), &node.base).await);
    assert!(!heartbeat_ok(&client_of(&other), &node.base).await);

    std::fs::copy(other.path("ca.pem"), &clients_ca).expect("replace the client CA");
    node.signal("HUP");
    wait_logged(&node, "https certificate reloaded").await;
    assert!(heartbeat_ok(&client_of(&other), &node.base).await);
    assert!(!heartbeat_ok(&client_of(&pki), &node.base).await);
}

#[tokio::test]
async fn nodes_serving_https_hand_orders_over_to_each_other_over_https() {
    two_https_nodes_hand_orders_over(false).await;
}

/// With `server.tls_client_ca`, a caller without a client certificate from its CA gets no
/// answer, one with it is served, and nodes show their own certificates to each other.
#[tokio::test]
async fn nodes_requiring_client_certificates_show_theirs_to_each_other() {
    two_https_nodes_hand_orders_over(true).await;
}

/// Two nodes on Redis serving https (`mutual`: requiring client certificates, and serving the
/// `node` certificate, good for both ends): the console's overview of one gets the other's
/// figures, and the first, told to stop, hands its orders to the second.
async fn two_https_nodes_hand_orders_over(mutual: bool) {
    let _turn = cluster_turn().await;
    let pki = Pki::new();
    let redis = RedisServer::start();
    let ca = pki.path("ca.pem");
    let server = match mutual {
        true => format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
            pki.path("node.pem").display(),
            pki.path("node.key").display(),
            ca.display()
        ),
        false => server_lines(&pki),
    };
    let config = |seeds: &[u16]| {
        let seeds: Vec<String> = seeds
            .iter()
            .map(|port| format!("\"127.0.0.1:{port}\""))
            .collect();
        format!(
            "{server}shutdown_grace = \"1s\"\n[simulate]\nduration = \"1s\"\nfailure_rate = 0.0\n\
             [database]\nurl = \"{}\"\ntimeout = \"1s\"\n\
             [cluster]\nsecret = \"{SECRET}\"\nseeds = [{}]\nca_file = \"{}\"\n",
            redis.url(),
            seeds.join(", "),
            ca.display()
        )
    };
    let start = |config: String| {
        let (ca, cert, key) = (ca.clone(), pki.path("client.pem"), pki.path("client.key"));
        async move {
            match mutual {
                true => Node::start_mutual_tls(&config, &ca, &cert, &key).await,
                false => Node::start_https(&config, &ca).await,
            }
        }
    };
    let first = start(config(&[])).await;
    let second = start(config(&[first.port])).await;
    // Trusting the CA is enough only when no client certificate is asked for.
    let anonymous = heartbeat_ok(&client_trusting(Some(&ca)), &first.base).await;
    assert_eq!(anonymous, !mutual, "a caller without a client certificate");
    if mutual {
        // One from another CA is refused too; the node counts both by reason.
        let other = Pki::new();
        let (cert, key) = (other.path("client.pem"), other.path("client.key"));
        let stranger = order_process_testkit::http::https_client(&ca, Some((&cert, &key)));
        assert!(
            !heartbeat_ok(&stranger, &first.base).await,
            "another CA's client"
        );
        for reason in ["no_client_certificate", "bad_client_certificate"] {
            let series =
                format!("order_process_tls_handshake_failures_total{{reason=\"{reason}\"}}");
            let counted = order_process_testkit::poll::until(WITHIN, POLL, || async {
                (value(&scrape(&first).await, &series) >= 1.0).then_some(())
            })
            .await;
            assert!(counted.is_some(), "{series} never counted");
        }
    }
    let mut nodes = vec![first, second];
    wait_formed(&nodes, 2).await;
    let view = nodes[1].cluster().await;
    for node in view["nodes"].as_array().into_iter().flatten() {
        let reached = node["connection_string"].as_str().unwrap_or_default();
        assert!(reached.starts_with("https://"), "{}", pretty(&view));
    }
    // The console's overview asks the peer for its figures, over https.
    let reply = nodes[1]
        .call(Method::GET, "/diagnostic/overview")
        .send()
        .await;
    let overview = nodes[1].expect_json(&reply, 200, "GET /diagnostic/overview");
    assert_eq!(overview["nodes_answered"], 2, "{}", pretty(&overview));

    // Orders of five 1 s steps on the first node; told to stop, it finishes the steps running
    // (for up to shutdown_grace) and hands the rest to the second, over https.
    let user = unique_user("https-handover");
    let mut ids = Vec::new();
    for index in 0..4 {
        let order = serde_json::json!({ "n": index });
        ids.push(nodes[0].create_order(&user, &order).await);
    }
    let mut leaving = nodes.remove(0);
    leaving.term();
    let status = leaving.wait_exit(WITHIN).await;
    assert!(status.success(), "{status}\n{}", leaving.log_tail());
    assert!(
        leaving.log().contains("handed unfinished orders over"),
        "no hand-over over https\n{}",
        leaving.log_tail()
    );
    for id in &ids {
        assert_completed(&nodes[0].wait_terminal(&user, id, WITHIN).await);
    }
}

/// With client certificates required, the tokens file's `[[certificate]]` entries name a
/// caller that sends no token by its certificate's common name: it submits, reads and lists its
/// own orders as its entry's user, an admin's certificate reads anyone's and the admin-only and
/// cluster-internal routes; a certificate without an entry, or a revoked one, is a 401; a token
/// sent over the same connection names the caller instead.
#[tokio::test]
async fn a_client_certificate_names_the_caller_that_sends_no_token() {
    let pki = Pki::new();
    let tokens = Tokens::with_certificates(
        &[(ALICE, "alice", "user", "")],
        "[[certificate]]\ncommon_name = \"client\"\nuser = \"shop\"\n\
         [[certificate]]\ncommon_name = \"node\"\nrole = \"admin\"\n\
         [[certificate]]\ncommon_name = \"billing\"\nrevoked = true\n",
    );
    let ca = pki.path("ca.pem");
    let config = format!(
        "{}tls_client_ca = \"{}\"\n{}",
        server_lines(&pki),
        ca.display(),
        tokens.config("")
    );
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let node = Node::start_mutual_tls(&config, &ca, &cert, &key).await;
    let showing = |name: &str| {
        let (cert, key) = (
            pki.path(&format!("{name}.pem")),
            pki.path(&format!("{name}.key")),
        );
        order_process_testkit::http::https_client(&ca, Some((&cert, &key)))
    };
    let (shop, admin) = (showing("client"), showing("node"));
    let call = |client: &reqwest::Client, method: Method, path: &str, token: Option<&str>| {
        let mut request = client
            .request(method.clone(), format!("{}{path}", node.base))
            .header("Content-Type", "application/json");
        if let Some(token) = token {
            request = request.header("Authorization", bearer(token));
        }
        if method == Method::POST {
            request = request.body("{}");
        }
        async move {
            let response = request.send().await.expect("an answer");
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.expect("a JSON body");
            (status, body)
        }
    };

    let (status, created) = call(&shop, Method::POST, "/orders", None).await;
    assert_eq!(status, 201, "the shop's certificate submits: {created}");
    let id = created["order_id"]
        .as_str()
        .expect("an order id")
        .to_string();
    let (status, listed) = call(&shop, Method::GET, "/orders", None).await;
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> = listed["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .filter_map(|order| order["order_id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()], "the shop lists its own order");
    // A write that another site's page made in a browser holding the certificate is refused;
    // the console's own (same-origin) writes are not.
    for (site, expected) in [
        ("cross-site", 403),
        ("same-site", 403),
        ("same-origin", 201),
    ] {
        let reply = shop
            .post(format!("{}/orders", node.base))
            .header("Sec-Fetch-Site", site)
            .header("Content-Type", "text/plain")
            .body("{}")
            .send()
            .await
            .expect("an answer");
        assert_eq!(reply.status().as_u16(), expected, "{site}");
    }
    let reply = shop
        .post(format!("{}/orders", node.base))
        .header("Sec-Fetch-Site", "cross-site")
        .header("Authorization", bearer(ALICE))
        .body("{}")
        .send()
        .await
        .expect("an answer");
    assert_eq!(
        reply.status().as_u16(),
        201,
        "a token is no ambient credential"
    );
    let path = format!("/orders/{id}");
    assert_eq!(call(&shop, Method::GET, &path, None).await.0, 200);
    // The same connection with alice's token is alice, who does not see the shop's order.
    assert_eq!(call(&shop, Method::GET, &path, Some(ALICE)).await.0, 404);
    let (status, hers) = call(&shop, Method::POST, "/orders", Some(ALICE)).await;
    assert_eq!(status, 201, "{hers}");
    let hers = format!("/orders/{}", hers["order_id"].as_str().expect("an id"));
    assert_eq!(call(&shop, Method::GET, &hers, None).await.0, 404);
    // The admin's certificate reads anyone's order and the admin-only routes; the shop's not.
    assert_eq!(call(&admin, Method::GET, &path, None).await.0, 200);
    assert_eq!(call(&admin, Method::GET, &hers, None).await.0, 200);
    assert_eq!(
        call(&admin, Method::GET, "/diagnostic/parked", None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&shop, Method::GET, "/diagnostic/parked", None).await.0,
        403
    );
    // A backup costs a copy of the store: another site's page cannot have a browser holding
    // the admin's certificate ask for one, though it is a GET.
    for (site, expected) in [
        ("cross-site", 403),
        ("same-site", 403),
        ("same-origin", 200),
    ] {
        let reply = admin
            .get(format!("{}/service/backup", node.base))
            .header("Sec-Fetch-Site", site)
            .send()
            .await
            .expect("an answer");
        assert_eq!(reply.status().as_u16(), expected, "a backup asked {site}");
    }
    for name in ["billing", "stranger"] {
        let (status, refused) = call(&showing(name), Method::POST, "/orders", None).await;
        assert_eq!(status, 401, "{name}'s certificate: {refused}");
        assert!(refused["error"].is_string(), "{refused}");
    }
    // The cluster-internal routes take an admin's certificate as they take an admin's token (a
    // lone node then has no view: 409); a certificate without an entry, as a peer's node
    // certificate usually is, is told of the missing cluster secret.
    let service = "/service/nodes/anyone/orders";
    assert_eq!(call(&admin, Method::GET, service, None).await.0, 409);
    assert_eq!(call(&shop, Method::GET, service, None).await.0, 403);
    let (status, refused) = call(&showing("stranger"), Method::GET, service, None).await;
    assert_eq!(status, 401, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|error| error.contains("x-cluster-secret")),
        "{refused}"
    );
}

#[tokio::test]
async fn bad_https_settings_exit_64_naming_the_key() {
    let pki = Pki::new();
    let other = Pki::new();
    let path = |pki: &Pki, name: &str| pki.path(name).display().to_string();
    let not_pem = pki.path("not-pem");
    std::fs::write(&not_pem, "hello\n").expect("write a file");
    let not_pem = not_pem.display().to_string();
    for (config, needle) in [
        (
            format!("[server]\ntls_cert = \"{}\"\n", path(&pki, "server.pem")),
            "server.tls_key",
        ),
        (
            format!("[server]\ntls_key = \"{}\"\n", path(&pki, "server.key")),
            "server.tls_cert",
        ),
        (
            format!(
                "[server]\ntls_cert = \"{not_pem}\"\ntls_key = \"{}\"\n",
                path(&pki, "server.key")
            ),
            "server.tls_cert",
        ),
        (
            format!(
                "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path(&pki, "server.pem"),
                path(&other, "server.key")
            ),
            "does not go with server.tls_cert",
        ),
        (
            format!("[cluster]\nca_file = \"{}\"\n", path(&pki, "ca.pem")),
            "cluster.ca_file",
        ),
        (
            format!("[server]\ntls_client_ca = \"{}\"\n", path(&pki, "ca.pem")),
            "server.tls_client_ca",
        ),
        (
            format!(
                "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{not_pem}\"\n",
                path(&pki, "server.pem"),
                path(&pki, "server.key")
            ),
            "server.tls_client_ca",
        ),
    ] {
        assert_refused(&config, needle).await;
    }
}

/// `order-process bench` drives an https node, trusting the CA in `--ca-file`, and one that
/// requires client certificates, showing `--client-cert`; without the CA, or without the
/// certificate a node asks for, no order is accepted.
#[tokio::test]
async fn the_bench_drives_https_nodes_trusting_its_ca_file_with_its_client_certificate() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let steps = "[simulate]\nduration = \"0s\"\nfailure_rate = 0.0\n";
    let plain = Node::start_https(&format!("{}{steps}", server_lines(&pki)), &ca).await;
    let mutual = format!(
        "{}tls_client_ca = \"{}\"\n{steps}",
        server_lines(&pki),
        ca.display()
    );
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let mutual = Node::start_mutual_tls(&mutual, &ca, &cert, &key).await;
    let run = |node: &Node, flags: &[(&str, &Path)]| {
        let mut command = tokio::process::Command::new(crate::harness::BIN);
        command.args(["bench", "--url", &node.base, "--json", "--orders", "200"]);
        command.args(["--concurrency", "8", "--timeout", "60s"]);
        for (flag, path) in flags {
            command.arg(flag).arg(path);
        }
        command.output()
    };
    let identity = [("--client-cert", cert.as_path()), ("--client-key", &key)];
    let with_ca = [("--ca-file", ca.as_path())];
    for (node, flags) in [
        (&plain, &with_ca[..]),
        (&mutual, &[&with_ca[..], &identity[..]].concat()),
    ] {
        let output = run(node, flags).await.expect("run the bench");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}\n{}", node.log_tail());
        let summary: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON summary");
        assert_eq!(summary["completed"], 200, "{summary}");
        assert_eq!(summary["lost"], 0, "{summary}");
    }
    for (node, flags) in [(&plain, &identity[..]), (&mutual, &with_ca[..])] {
        let output = run(node, flags).await.expect("run the bench");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON summary");
        assert_eq!(summary["submitted"], 0, "{summary}");
        let errors = summary["http_errors"].as_object().into_iter().flatten();
        let refused: u64 = errors.filter_map(|(_, count)| count.as_u64()).sum();
        assert!(refused > 0, "{summary}");
    }
}
