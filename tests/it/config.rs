//! Startup errors: a bad config file or flag exits with code 64 and one line on stderr naming
//! the key; a port already in use is a clean non-zero exit with a message, never a panic.

use std::fs;
use std::net::TcpListener;
use std::process::ExitStatus;
use std::time::Duration;

use crate::harness::{port as free_port, spawn, tail};

/// How the binary ended and what it wrote to stderr.
pub(crate) struct Outcome {
    pub status: ExitStatus,
    pub stderr: String,
}

/// Runs the binary with `config` (if any) as `--config`, a temp `--data-dir`, a free `--listen`
/// port unless `args` has its own, then `args`; waits for it to exit (it must, within 20 s).
pub(crate) async fn run_to_exit(config: Option<&str>, args: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let mut full_args: Vec<String> = Vec::new();
    if let Some(config) = config {
        let path = dir.path().join("config.toml");
        fs::write(&path, config).expect("write config.toml");
        full_args.extend(["--config".to_string(), path.display().to_string()]);
    }
    full_args.extend([
        "--data-dir".to_string(),
        dir.path().join("data").display().to_string(),
    ]);
    if !args.contains(&"--listen") {
        full_args.extend(["--listen".to_string(), format!("127.0.0.1:{}", free_port())]);
    }
    full_args.extend(args.iter().map(|arg| arg.to_string()));

    let stdout = dir.path().join("stdout.log");
    let stderr = dir.path().join("stderr.log");
    let mut process = spawn(&full_args, &stdout, &stderr);
    let Some(status) = process.wait_exit(Duration::from_secs(20)).await else {
        panic!(
            "the binary kept running with {full_args:?}; expected it to exit\n{}\n{}",
            tail(&stderr, 40),
            tail(&stdout, 40)
        );
    };
    Outcome {
        status,
        stderr: fs::read_to_string(&stderr).unwrap_or_default(),
    }
}

/// Asserts exit code 64 and exactly one line on stderr that mentions `needle`, and no panic.
fn assert_usage_error(outcome: &Outcome, needle: &str, what: &str) {
    let Outcome { status, stderr } = outcome;
    assert_eq!(
        status.code(),
        Some(64),
        "{what}: exit code ({status}); stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "{what}: the binary panicked; stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one line on stderr, got:\n{stderr}"
    );
    assert!(
        stderr.contains(needle),
        "{what}: stderr should name {needle:?}, got:\n{stderr}"
    );
}

#[tokio::test]
async fn wrong_type_in_config_exits_64_naming_the_key() {
    let outcome = run_to_exit(Some("[pipeline]\nworkers = \"lots\"\n"), &[]).await;
    assert_usage_error(&outcome, "workers", "[pipeline] workers = \"lots\"");
}

#[tokio::test]
async fn unknown_config_key_exits_64_naming_the_key() {
    let outcome = run_to_exit(Some("[pipeline]\nwrokers = 4\n"), &[]).await;
    assert_usage_error(&outcome, "wrokers", "misspelled key [pipeline] wrokers");
    let outcome = run_to_exit(Some("[bogus_section]\nx = 1\n"), &[]).await;
    assert_usage_error(&outcome, "bogus_section", "unknown section [bogus_section]");
}

#[tokio::test]
async fn invalid_duration_in_config_exits_64_naming_the_key() {
    let outcome = run_to_exit(Some("[simulate]\nduration = \"soon\"\n"), &[]).await;
    assert_usage_error(&outcome, "duration", "[simulate] duration = \"soon\"");
}

#[tokio::test]
async fn unsafe_auth_settings_exit_64_naming_the_key() {
    // Header mode trusts any Authorization header: refused on a non-loopback listener, both when
    // asked for and as the default. The config is refused before anything is bound.
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let outcome = run_to_exit(Some("[auth]\nmode = \"header\"\n"), &["--listen", &listen]).await;
    assert_usage_error(
        &outcome,
        "auth.allow_insecure_header",
        "header mode on 0.0.0.0",
    );
    let outcome = run_to_exit(None, &["--listen", &listen]).await;
    assert_usage_error(&outcome, "auth.tokens_file", "no tokens file on 0.0.0.0");
    // Tokens mode with a tokens file that cannot be read or parsed.
    let outcome = run_to_exit(
        Some("[auth]\nmode = \"tokens\"\ntokens_file = \"/nonexistent/tokens.toml\"\n"),
        &[],
    )
    .await;
    assert_usage_error(&outcome, "auth.tokens_file", "a missing tokens file");
}

#[tokio::test]
async fn malformed_toml_exits_64() {
    let outcome = run_to_exit(Some("[server\nlisten = \n"), &[]).await;
    assert_eq!(
        outcome.status.code(),
        Some(64),
        "malformed TOML: {}; stderr:\n{}",
        outcome.status,
        outcome.stderr
    );
    assert!(
        !outcome.stderr.trim().is_empty(),
        "malformed TOML: stderr is empty"
    );
    assert!(
        !outcome.stderr.contains("panicked"),
        "malformed TOML: panicked:\n{}",
        outcome.stderr
    );
}

#[tokio::test]
async fn bad_listen_flag_exits_64() {
    let outcome = run_to_exit(None, &["--listen", "notanaddr"]).await;
    assert_usage_error(&outcome, "listen", "--listen notanaddr");
}

#[tokio::test]
async fn unknown_flag_exits_64() {
    let outcome = run_to_exit(None, &["--no-such-flag"]).await;
    assert_eq!(
        outcome.status.code(),
        Some(64),
        "--no-such-flag: {}; stderr:\n{}",
        outcome.status,
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("no-such-flag"),
        "--no-such-flag: stderr should name it:\n{}",
        outcome.stderr
    );
}

#[tokio::test]
async fn port_in_use_exits_non_zero_without_panicking() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    let address = taken.local_addr().expect("local address").to_string();
    let outcome = run_to_exit(None, &["--listen", &address]).await;
    assert!(
        !outcome.status.success(),
        "started on a port in use ({address}); stderr:\n{}",
        outcome.stderr
    );
    assert!(
        !outcome.stderr.trim().is_empty(),
        "port in use: no message on stderr"
    );
    assert!(
        !outcome.stderr.contains("panicked"),
        "port in use: panicked:\n{}",
        outcome.stderr
    );
    drop(taken);
}

#[tokio::test]
async fn bad_http_step_sections_exit_64_naming_the_step_and_key() {
    for (section, needle) in [
        ("handler = \"grpc\"\n", "steps.Processing.handler"),
        (
            "handler = \"http\"\nurl = \"charge please\"\n",
            "steps.Processing.url",
        ),
        (
            "handler = \"http\"\nurl = \"http://127.0.0.1:9/charge\"\ntimeout = \"0s\"\n",
            "steps.Processing.timeout",
        ),
    ] {
        let config = format!("[steps.Processing]\n{section}");
        let outcome = run_to_exit(Some(&config), &[]).await;
        assert_usage_error(&outcome, needle, &config);
    }
}

/// Asserts that a cluster node with these `[database]` lines exits with 64 naming `needle`.
async fn assert_database_refused(database: &str, needle: &str) {
    let config = format!("[cluster]\nsecret = \"0123456789abcdef\"\n[database]\n{database}");
    let outcome = run_to_exit(Some(&config), &[]).await;
    assert_usage_error(&outcome, needle, &config);
}

#[tokio::test]
async fn bad_sentinel_and_replica_settings_exit_64_naming_the_key() {
    for (database, needle) in [
        (
            "url = \"redis://127.0.0.1:6379\"\nsentinels = [\"127.0.0.1:26379\"]\nmaster_name = \"orders\"\n",
            "database.sentinels",
        ),
        ("sentinels = [\"127.0.0.1:26379\"]\n", "database.master_name"),
        (
            "sentinels = [\"127.0.0.1\"]\nmaster_name = \"orders\"\n",
            "database.sentinels",
        ),
        ("master_name = \"orders\"\n", "database.master_name"),
        ("min_replicas = 1\n", "database.min_replicas"),
        ("require_aof = true\n", "database.require_aof"),
    ] {
        assert_database_refused(database, needle).await;
    }
}

#[tokio::test]
async fn bad_redis_tls_and_login_settings_exit_64_naming_the_key() {
    let files = tempfile::tempdir().expect("create a temp dir");
    let file = |name: &str| {
        let path = files.path().join(name);
        fs::write(&path, "x\n").expect("write a file");
        path.display().to_string()
    };
    let (ca, cert, key, password) = (file("ca.pem"), file("c.pem"), file("c.key"), file("pw"));
    let missing = files.path().join("missing").display().to_string();
    for (database, needle) in [
        (
            format!("url = \"redis://127.0.0.1:6379\"\nca_file = \"{ca}\"\n"),
            "database.ca_file",
        ),
        (
            format!("sentinels = [\"127.0.0.1:26379\"]\nmaster_name = \"m\"\nca_file = \"{ca}\"\n"),
            "database.ca_file",
        ),
        (
            format!("url = \"rediss://127.0.0.1:6379\"\nclient_cert = \"{cert}\"\n"),
            "database.client_key",
        ),
        (
            format!("url = \"rediss://127.0.0.1:6379\"\nclient_key = \"{key}\"\n"),
            "database.client_cert",
        ),
        (
            format!("url = \"rediss://127.0.0.1:6379\"\nca_file = \"{missing}\"\n"),
            "database.ca_file",
        ),
        (
            format!("url = \"redis://app:pw@127.0.0.1:6379\"\npassword_file = \"{password}\"\n"),
            "database.password_file",
        ),
        (
            format!("url = \"redis://127.0.0.1:6379\"\npassword_file = \"{missing}\"\n"),
            "database.password_file",
        ),
        (
            "url = \"redis://127.0.0.1:6379\"\nusername = \"app\"\n".to_string(),
            "database.username",
        ),
        (
            format!("password_file = \"{password}\"\n"),
            "database.password_file",
        ),
    ] {
        assert_database_refused(&database, needle).await;
    }
}

#[tokio::test]
async fn a_bad_redis_url_exits_64_without_showing_its_password() {
    let password = "pw-do-not-show-7f3a";
    for url in [
        format!("redis://app:{password}@127.0.0.1:notaport"),
        format!("redis://app:{password}@"),
    ] {
        let config =
            format!("[cluster]\nsecret = \"0123456789abcdef\"\n[database]\nurl = \"{url}\"\n");
        let outcome = run_to_exit(Some(&config), &[]).await;
        assert_usage_error(&outcome, "database.url", &url);
        assert!(
            !outcome.stderr.contains(password),
            "the password is shown: {}",
            outcome.stderr
        );
        let outcome = run_to_exit(None, &["--redis", &url]).await;
        assert_usage_error(&outcome, "database.url", &url);
        assert!(
            !outcome.stderr.contains(password),
            "the password is shown: {}",
            outcome.stderr
        );
    }
}

#[tokio::test]
async fn unreadable_tls_files_exit_64_naming_the_key() {
    // The files exist but hold no PEM of the right kind: refused at start, before any connect.
    let files = tempfile::tempdir().expect("create a temp dir");
    let path = files.path().join("not-pem");
    fs::write(&path, "hello\n").expect("write a file");
    let file = path.display().to_string();
    for (database, needle) in [
        (format!("ca_file = \"{file}\"\n"), "database.ca_file"),
        (
            format!("client_cert = \"{file}\"\nclient_key = \"{file}\"\n"),
            "database.client_cert",
        ),
    ] {
        let config = format!(
            "[cluster]\nsecret = \"0123456789abcdef\"\n[database]\nurl = \"rediss://127.0.0.1:9\"\n{database}"
        );
        assert_refused(&config, needle).await;
    }
}

/// Asserts that the binary with `config` exits with 64 naming `needle`, without a panic.
pub(crate) async fn assert_refused(config: &str, needle: &str) {
    assert_refused_with(config, &[], needle).await;
}

/// Asserts that the binary with `config` and `args` exits with 64 naming `needle`, without a
/// panic.
async fn assert_refused_with(config: &str, args: &[&str], needle: &str) {
    let outcome = run_to_exit(Some(config), args).await;
    assert_eq!(
        outcome.status.code(),
        Some(64),
        "{config} {args:?}: stderr:\n{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains(needle) && !outcome.stderr.contains("panicked"),
        "{config} {args:?}: stderr should name {needle}:\n{}",
        outcome.stderr
    );
}

/// `check-config` checks what a node checks before it starts (the config, the tokens file, the
/// TLS files, Redis's address) and exits: 0 when a node would start, 64 naming what it would
/// refuse. It contacts nothing: an unreachable Redis is no reason to refuse.
#[tokio::test]
async fn check_config_says_whether_a_node_would_start_without_starting_one() {
    let files = tempfile::tempdir().expect("create a temp dir");
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        fs::write(&path, text).expect("write a file");
        path.display().to_string()
    };
    let hash = "a".repeat(64);
    let good_tokens = write(
        "tokens.toml",
        &format!("[[token]]\nuser = \"alice\"\nsha256 = \"{hash}\"\n"),
    );
    let bad_tokens = write(
        "next-tokens.toml",
        &format!("[[token]]\nuser = \"alice\"\nsha256 = \"{hash}\"\nexpires = 5\n"),
    );
    let not_pem = write("not-pem", "hello\n");
    let tokens = |file: &str| format!("[auth]\nmode = \"tokens\"\ntokens_file = \"{file}\"\n");
    let redis =
        "[cluster]\nsecret = \"0123456789abcdef\"\n[database]\nurl = \"redis://127.0.0.1:9\"\n";

    for config in [String::new(), tokens(&good_tokens), redis.to_string()] {
        let outcome = run_to_exit(Some(&config), &["check-config"]).await;
        assert_eq!(
            outcome.status.code(),
            Some(0),
            "{config}: stderr:\n{}",
            outcome.stderr
        );
    }
    for (config, args, needle) in [
        (tokens(&bad_tokens), vec!["check-config"], "RFC 3339"),
        (
            tokens(&good_tokens),
            vec!["check-config", "--tokens-file", &bad_tokens],
            "RFC 3339",
        ),
        (
            format!("[server]\ntls_cert = \"{not_pem}\"\ntls_key = \"{not_pem}\"\n"),
            vec!["check-config"],
            "server.tls_cert",
        ),
        (
            format!(
                "[cluster]\nsecret = \"0123456789abcdef\"\n[database]\nurl = \"rediss://127.0.0.1:9\"\nca_file = \"{not_pem}\"\n"
            ),
            vec!["check-config"],
            "database.ca_file",
        ),
        (
            "[pipeline]\nworkers = 0\n".to_string(),
            vec!["check-config"],
            "pipeline.workers",
        ),
    ] {
        assert_refused_with(&config, &args, needle).await;
    }
}
