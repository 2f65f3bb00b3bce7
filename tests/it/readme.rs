//! The README's API examples ("Using it") against a live node started as they were made (200 ms
//! simulated steps). Every `$ curl` command whose answer the README shows whole (no `…` in it, no
//! `<id>` to fill in) is sent as curl sends it, to the test node instead of `localhost:8080`,
//! and the answer must match the README's: the status (with `-i`), every field by name at every
//! depth, no more and no fewer, each value of the same JSON type (a time with its digits in the
//! same places), and the values that do not change from run to run (step names, states,
//! payloads, failures, errors, `jq` output). An order id an example names is the one an earlier
//! example's answer gave, mapped to the id the node gave in its place; an id no earlier example
//! made is of an order whose answer the README shows, which is made first with that order's
//! payload.
//!
//! The worked example of "Connecting your services" runs too, on the README's `[steps.Processing]`
//! section against a scripted service answering as the example says: the calls must come in the
//! order shown, with the headers and bodies shown (and no header it leaves out but those every
//! HTTP client sends), and the order must end with the failure and attempts shown.
//! So does the completion webhook's example, on the README's `[notify]` section against a
//! receiver that is busy once: the order's `notification` must be the one shown.

use crate::harness::*;
use order_process_testkit::{Answer, Scripted};
use reqwest::Method;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

/// The part of the README whose examples are checked.
const SECTION: (&str, &str) = (
    "\n## Using it\n",
    "\n## What happens when things go wrong\n",
);

/// Fields whose values are the same in every run of the examples; every other field is checked
/// by name and JSON type only (ids, times, counts).
const STABLE: [&str; 15] = [
    "state",
    "generation",
    "attempts_made",
    "retries",
    "attempt",
    "rollback",
    "current_step",
    "step_name",
    "payload",
    "failure",
    "rollback_state",
    "error",
    "status",
    "service_name",
    "role",
];

/// One `$ command` of an example and the lines the README shows it printing.
#[derive(Debug)]
struct Example {
    command: String,
    output: Vec<String>,
}

/// The `$ ` commands of the ```sh blocks in `text`, each with its output lines.
fn examples(text: &str) -> Vec<Example> {
    let mut found: Vec<Example> = Vec::new();
    let mut in_block = false;
    let mut continued = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continued = false;
            continue;
        }
        if !in_block {
            continue;
        }
        match found.last_mut() {
            Some(example) if continued => {
                example.command.push(' ');
                example.command.push_str(line.trim_start());
            }
            _ if line.starts_with("$ ") => found.push(Example {
                command: line[2..].to_string(),
                output: Vec::new(),
            }),
            Some(example) => example.output.push(line.to_string()),
            None => {}
        }
        continued = line.ends_with('\\');
        if continued {
            if let Some(example) = found.last_mut() {
                example.command.pop();
                let trimmed = example.command.trim_end().len();
                example.command.truncate(trimmed);
            }
        }
    }
    found
}

/// `command` split into words as a shell does with quotes ('…' and "…"); an unquoted `|` is a
/// word of its own.
fn words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in command.chars() {
        match (quote, c) {
            (Some(open), c) if c == open => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, ' ') => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    assert!(
        quote.is_none(),
        "unclosed quote in README command: {command}"
    );
    words.extend(word);
    words
}

/// A curl command of the README, as this test sends it.
#[derive(Debug, Default)]
struct Curl {
    method: Option<String>,
    headers: Vec<(String, String)>,
    data: Option<String>,
    include: bool,
    /// Path and query, after `localhost:8080`.
    target: String,
    /// `jq -r .FIELD` after a pipe: the field printed.
    jq_field: Option<String>,
}

fn curl(command: &str) -> Curl {
    let words = words(command);
    let mut parsed = Curl::default();
    let mut rest = words.iter();
    assert_eq!(
        rest.next().map(String::as_str),
        Some("curl"),
        "README command not curl: {command}"
    );
    while let Some(word) = rest.next() {
        let mut value = || {
            rest.next()
                .cloned()
                .unwrap_or_else(|| panic!("{word} without its value in: {command}"))
        };
        match word.as_str() {
            "-X" => parsed.method = Some(value()),
            "-d" => parsed.data = Some(value()),
            "-H" => {
                let header = value();
                let (name, text) = header
                    .split_once(':')
                    .unwrap_or_else(|| panic!("header without a colon in: {command}"));
                parsed
                    .headers
                    .push((name.trim().to_string(), text.trim().to_string()));
            }
            "-i" => parsed.include = true,
            "-s" => {}
            "|" => {
                let jq: Vec<&str> = rest.by_ref().map(String::as_str).collect();
                match jq.as_slice() {
                    ["jq", "-r", field] if field.starts_with('.') => {
                        parsed.jq_field = Some(field[1..].to_string());
                    }
                    _ => panic!("a pipe this test does not know, in: {command}"),
                }
                break;
            }
            url if url.starts_with("localhost:8080") => {
                parsed.target = url["localhost:8080".len()..].to_string();
            }
            other => panic!("curl option {other:?} this test does not know, in: {command}"),
        }
    }
    assert!(
        !parsed.target.is_empty(),
        "no localhost:8080 URL in: {command}"
    );
    parsed
}

/// The order ids (UUIDs) in `text`.
fn uuids(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let shape = |at: usize| {
        (0..36).all(|i| match i {
            8 | 13 | 18 | 23 => bytes.get(at + i) == Some(&b'-'),
            _ => bytes.get(at + i).is_some_and(u8::is_ascii_hexdigit),
        })
    };
    let mut at = 0;
    while at + 36 <= bytes.len() {
        if shape(at) {
            found.push(text[at..at + 36].to_string());
            at += 36;
        } else {
            at += 1;
        }
    }
    found
}

/// Whether `text` is an RFC 3339 time in UTC (`2026-12-07T14:14:28.681801Z`).
fn is_time(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 20
        && bytes.get(10) == Some(&b'T')
        && text.ends_with('Z')
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4] == b'-'
}

/// Checks `real` against the README's `expected` at `path`; `ids` maps the README's order ids
/// to the node's.
fn same(expected: &Value, real: &Value, path: &str, ids: &mut HashMap<String, String>) {
    match (expected, real) {
        (Value::Object(want), Value::Object(got)) => {
            let (want_keys, got_keys): (BTreeSet<_>, BTreeSet<_>) =
                (want.keys().collect(), got.keys().collect());
            assert_eq!(
                want_keys, got_keys,
                "{path}: the README shows other fields than the node answers\nREADME: {expected}\nnode:   {real}"
            );
            for (key, value) in want {
                let at = format!("{path}.{key}");
                if key == "order_id" {
                    let (Some(readme_id), Some(node_id)) = (value.as_str(), got[key].as_str())
                    else {
                        panic!(
                            "{at}: not a string in README or node: {value} / {}",
                            got[key]
                        );
                    };
                    // One README id for one order of the node, both ways: an idempotent repeat
                    // must show the id the first answer showed.
                    if let Some((other, _)) = ids
                        .iter()
                        .find(|(other, mapped)| *mapped == node_id && *other != readme_id)
                    {
                        panic!("{at}: the README shows {readme_id}, but the node answered its order {other} again");
                    }
                    let mapped = ids
                        .entry(readme_id.to_string())
                        .or_insert_with(|| node_id.to_string());
                    assert_eq!(
                        mapped, node_id,
                        "{at}: the README's order {readme_id} is the node's {mapped}, answered {node_id}"
                    );
                } else if STABLE.contains(&key.as_str()) {
                    assert_eq!(value, &got[key], "{at}: README and node differ");
                } else {
                    same(value, &got[key], &at, ids);
                }
            }
        }
        (Value::Array(want), Value::Array(got)) => {
            assert_eq!(
                want.len(),
                got.len(),
                "{path}: the README shows {} entries, the node answers {}\nREADME: {expected}\nnode:   {real}",
                want.len(),
                got.len()
            );
            for (index, (want, got)) in want.iter().zip(got).enumerate() {
                same(want, got, &format!("{path}[{index}]"), ids);
            }
        }
        // A time is written as the README writes it: the same digits in the same places (RFC
        // 3339, to the microsecond).
        (Value::String(want), Value::String(got)) if is_time(want) => {
            let shape = |text: &str| text.replace(|c: char| c.is_ascii_digit(), "0");
            assert_eq!(
                shape(want),
                shape(got),
                "{path}: the README shows the time {want}, the node answers {got}"
            );
        }
        (want, got) => {
            let kind = |value: &Value| std::mem::discriminant(value);
            assert_eq!(
                kind(want),
                kind(got),
                "{path}: the README shows {want}, the node answers {got}"
            );
        }
    }
}

#[tokio::test]
async fn readme_api_examples_answer_as_shown() {
    let readme = include_str!("../../README.md");
    let start = readme.find(SECTION.0).expect("the README's \"Using it\"");
    let end = start
        + readme[start..]
            .find(SECTION.1)
            .expect("the section after it");
    let node = Node::start(&simulate("200ms")).await;
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut checked = 0;
    for example in examples(&readme[start..end]) {
        let shown = example.output.join("\n");
        if shown.trim().is_empty() || shown.contains('…') || example.command.contains('<') {
            continue;
        }
        let curl = curl(&example.command);
        let what = format!("README: $ {}", example.command);
        let mut output = example.output.iter().map(String::as_str);
        let status = match curl.include {
            true => {
                let line = output.next().unwrap_or_default();
                let code = line
                    .strip_prefix("HTTP/1.1 ")
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|code| code.parse::<u16>().ok());
                Some(code.unwrap_or_else(|| panic!("{what}: no status line in its output")))
            }
            false => None,
        };
        let body: String = output.collect::<Vec<_>>().join("\n");
        let user = curl
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
            .map(|(_, value)| value.clone());
        let expected: Option<Value> = match (&curl.jq_field, body.trim()) {
            (Some(_), _) | (None, "") => None,
            (None, text) => Some(
                serde_json::from_str(text)
                    .unwrap_or_else(|error| panic!("{what}: its output is not JSON: {error}")),
            ),
        };
        // The orders the command names: made by an earlier example, or made now as the
        // order the README shows it answering.
        let mut target = curl.target.clone();
        for readme_id in uuids(&curl.target) {
            if !ids.contains_key(&readme_id) {
                let shown = expected
                    .as_ref()
                    .filter(|order| order["order_id"] == readme_id.as_str())
                    .unwrap_or_else(|| panic!("{what}: names an order no earlier example made"));
                let user = user.as_deref().expect("an Authorization header");
                let made = node.create_order(user, &shown["payload"]).await;
                ids.insert(readme_id.clone(), made);
            }
            let node_id = &ids[&readme_id];
            if let (Some(order), Some(user)) = (&expected, &user) {
                if order.get("complete_time").is_some() {
                    node.wait_terminal(user, node_id, TERMINAL).await;
                }
            }
            target = target.replace(&readme_id, node_id);
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let method = curl.method.as_deref().unwrap_or(match curl.data {
            Some(_) => "POST",
            None => "GET",
        });
        let method = Method::from_bytes(method.as_bytes())
            .unwrap_or_else(|error| panic!("{what}: method {method}: {error}"));
        let mut call = node.call(method, path);
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            call = call.query(name, value);
        }
        for (name, value) in &curl.headers {
            call = call.header(name, value);
        }
        if let Some(data) = &curl.data {
            // As curl sends `-d`: form-encoded, unless a header says otherwise.
            call = call.body(data.clone());
            if !curl
                .headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
            {
                call = call.header("Content-Type", "application/x-www-form-urlencoded");
            }
        }
        let reply = call.send().await;
        match status {
            Some(status) => assert_eq!(reply.status, status, "{what}: got {reply}"),
            None => assert!((200..300).contains(&reply.status), "{what}: got {reply}"),
        }
        let real = reply.try_json();
        match (&curl.jq_field, expected) {
            (Some(field), _) => {
                let value = real
                    .as_ref()
                    .and_then(|real| real.get(field))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{what}: no text field {field} in {reply}"));
                assert_eq!(value, body.trim(), "{what}: jq prints another value");
            }
            (None, Some(expected)) => {
                let real =
                    real.unwrap_or_else(|| panic!("{what}: the answer is not JSON: {reply}"));
                same(&expected, &real, &what, &mut ids);
            }
            (None, None) => {}
        }
        checked += 1;
    }
    // The examples shown whole: submit, its idempotent repeat, a traced order and its trace id,
    // a completed and a failed order, a refused cancel, heartbeat, cluster, two errors.
    assert!(
        checked >= 12,
        "only {checked} README examples checked: the section lost its examples, or this test \
         no longer finds them"
    );
}

#[test]
fn readme_commands_split_as_a_shell_would() {
    let found = examples(
        "```sh\n$ curl -X POST -d '{\"a\": 1}' \\\n    -H 'traceparent: 00-x' localhost:8080/orders\n{\"order_id\":\"x\"}\n$ curl localhost:8080/diagnostic/heartbeat\n```\n```toml\n$ not a command\n```\n",
    );
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(
        found[0].command,
        "curl -X POST -d '{\"a\": 1}' -H 'traceparent: 00-x' localhost:8080/orders"
    );
    assert_eq!(found[0].output, vec!["{\"order_id\":\"x\"}"]);
    let parsed = curl(&found[0].command);
    assert_eq!(parsed.data.as_deref(), Some("{\"a\": 1}"));
    assert_eq!(
        parsed.headers,
        vec![("traceparent".to_string(), "00-x".to_string())]
    );
    assert_eq!(parsed.target, "/orders");
    let piped = curl("curl -s 'localhost:8080/orders/x?wait=1s' | jq -r .trace_id");
    assert_eq!(piped.target, "/orders/x?wait=1s");
    assert_eq!(piped.jq_field.as_deref(), Some("trace_id"));
    assert_eq!(
        uuids("/orders/01a250db-2449-7523-8558-f0801cebdbf4/cancel"),
        vec!["01a250db-2449-7523-8558-f0801cebdbf4"]
    );
}

/// The text of the first fenced block (```` ```LANG ````) after `heading` in `readme`.
fn block_after<'a>(readme: &'a str, heading: &str, lang: &str) -> &'a str {
    let at = readme
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in the README"));
    let fence = format!("\n```{lang}\n");
    let start = at
        + readme[at..]
            .find(&fence)
            .unwrap_or_else(|| panic!("no ```{lang} block after {heading:?}"))
        + fence.len();
    let end = start + readme[start..].find("\n```").expect("the block's end");
    &readme[start..end]
}

/// Headers every HTTP client sends, which the worked example leaves out.
const CLIENT_HEADERS: [&str; 5] = [
    "host",
    "user-agent",
    "accept",
    "content-type",
    "content-length",
];

#[tokio::test]
async fn readme_worked_example_calls_as_shown() {
    let readme = include_str!("../../README.md");
    // The step service as the example has it answer.
    let flat = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    let (charged, refused) = (
        r#"the charge answers `200 {"payment_id":"pay_8f3a"}`"#,
        "shipping answers `422 no courier for this address`",
    );
    assert!(
        flat.contains(charged) && flat.contains(refused),
        "the README's worked example no longer says how the service answers"
    );
    let shop = Scripted::start().await;
    shop.answer(
        "/charge",
        Answer::Status(200, r#"{"payment_id":"pay_8f3a"}"#.into()),
    );
    shop.answer(
        "/ship",
        Answer::Status(422, "no courier for this address".into()),
    );
    // The README's section for Processing, and Post-Processing as the example points it.
    let processing = block_after(readme, "\n## Connecting your services\n", "toml")
        .replace("http://127.0.0.1:9001", shop.base());
    let config = format!(
        "{}{processing}\n[steps.Post-Processing]\nhandler = \"http\"\nurl = \"{base}/ship\"\nrollback_url = \"{base}/cancel-shipment\"\n",
        simulate("200ms"),
        base = shop.base()
    );
    let node = Node::start(&config).await;
    let id = node
        .create_order("alice", &serde_json::json!({"sku": "A1", "qty": 2}))
        .await;
    let order = node.wait_terminal("alice", &id, TERMINAL).await;

    // The calls, in order: path, the headers shown, the body.
    let shown = block_after(readme, "\n### A worked example\n", "");
    let calls = shop.calls();
    let expected: Vec<&str> = shown.split("\n\n").collect();
    assert_eq!(
        calls
            .iter()
            .map(|call| call.path.as_str())
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|call| call
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("POST "))
            .collect::<Vec<_>>(),
        "the service was called otherwise than the README shows"
    );
    let readme_id = uuids(shown)
        .first()
        .cloned()
        .expect("an order id in the example");
    let trace_id = order["trace_id"].as_str().expect("the order's trace id");
    for (call, shown) in calls.iter().zip(&expected) {
        let shown = shown.replace(&readme_id, &id);
        let lines: Vec<&str> = shown.lines().collect();
        let (body, headers) = lines[1..].split_last().expect("headers and a body");
        let mut named = Vec::new();
        for header in headers {
            let (name, value) = header.split_once(": ").expect("a header line");
            let name = name.to_ascii_lowercase();
            let got = call
                .headers
                .iter()
                .find(|(got, _)| *got == name)
                .map(|(_, value)| value.as_str())
                .unwrap_or_else(|| {
                    panic!("{}: no {name} header; got {:?}", call.path, call.headers)
                });
            match name.as_str() {
                // A new span id per call, in the order's trace.
                "traceparent" => {
                    let parts: Vec<&str> = got.split('-').collect();
                    assert!(
                        parts.len() == 4 && parts[1] == trace_id && parts[2].len() == 16,
                        "{}: traceparent {got} is not of the order's trace {trace_id}",
                        call.path
                    );
                    assert_eq!(value.split('-').count(), 4, "README: {header}");
                }
                _ => assert_eq!(got, value, "{}: header {name}", call.path),
            }
            named.push(name);
        }
        for (name, _) in &call.headers {
            assert!(
                named.contains(name) || CLIENT_HEADERS.contains(&name.as_str()),
                "{}: the call sends {name}, which the README's example does not show",
                call.path
            );
        }
        let body: Value = serde_json::from_str(body).expect("the README's body is JSON");
        assert_eq!(
            call.body, body,
            "{}: the body differs from the README's",
            call.path
        );
    }

    // The failure and the Post-Processing entry's attempts, as the README shows them.
    let failure = readme
        .split_once("and the order ends `Failed` with `\"failure\": ")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(failure, _)| failure.replace('\n', " "))
        .expect("the worked example's failure");
    let failure: Value = serde_json::from_str(&failure).expect("the failure is JSON");
    assert_eq!(order["failure"], failure);
    let attempts = block_after(
        readme,
        "the `Post-Processing` entry shows its attempt",
        "json",
    );
    let attempts: Value =
        serde_json::from_str(&format!("{{{attempts}}}")).expect("the attempts are JSON");
    let entry = order["steps"]
        .as_array()
        .and_then(|steps| {
            steps
                .iter()
                .find(|step| step["step_name"] == "Post-Processing")
        })
        .expect("a Post-Processing entry");
    let mut ids = HashMap::new();
    same(
        &attempts["attempts"],
        &entry["attempts"],
        "README: the worked example's attempts",
        &mut ids,
    );
}

#[tokio::test]
async fn readme_webhook_example_is_what_an_order_shows() {
    let readme = include_str!("../../README.md");
    let flat = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(r#""status": 503, "error": "HTTP 503: busy""#),
        "the README's webhook example no longer has its receiver answer 503 busy first"
    );
    // The receiver: busy once, then 200.
    let shop = Scripted::start().await;
    shop.queue("/order-finished", vec![Answer::Status(503, "busy".into())]);
    let notify = block_after(readme, "\n### Completion webhooks\n", "toml")
        .replace("http://127.0.0.1:9002", shop.base());
    let node = Node::start(&format!("{}{notify}\n", simulate("200ms"))).await;
    let id = node.create_order("alice", &serde_json::json!({})).await;
    let order = node
        .wait_for("alice", &id, TERMINAL, "its webhook delivered", |order| {
            order["notification"]["state"] == "delivered"
        })
        .await;
    let shown = block_after(readme, "The order shows\nhow it went:", "json");
    let shown: Value =
        serde_json::from_str(&format!("{{{shown}}}")).expect("the README's notification is JSON");
    let mut ids = HashMap::new();
    same(
        &shown["notification"],
        &order["notification"],
        "README: the webhook example's notification",
        &mut ids,
    );
}
