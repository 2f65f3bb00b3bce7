//! The `order-process` binary: flags, config, logging, runtime; everything else is in the library.

#![forbid(unsafe_code)]

use argh::FromArgs;
use order_process::config::{Config, ConfigError, LogFormat, Overrides};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of the C library's malloc: the node makes and frees many small buffers per
/// order (requests, JSON, Redis commands), which it serves in fewer instructions. Its 2.x line
/// (the crate's `v2` feature): the crate asks for every block as an aligned one, and the 3.x
/// line over-allocates such a block whenever its size is over 1 KB and not a power of two.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a bad flag or config (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(FromArgs)]
/// A clustered order-processing service. With no arguments: one node on 127.0.0.1:8080 with its
/// store in ./data.
struct Args {
    /// path of a TOML config file (see config/order-process.toml)
    #[argh(option)]
    config: Option<PathBuf>,
    /// address to serve HTTP on, e.g. 127.0.0.1:8080
    #[argh(option)]
    listen: Option<String>,
    /// directory for the node id and the embedded store
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// log level or filter: error, warn, info, debug, trace
    #[argh(option)]
    log_level: Option<String>,
    /// host:port of a cluster member to join (repeatable); needs --redis, database.url or database.sentinels
    #[argh(option)]
    join: Vec<String>,
    /// redis://host:port of the shared store; makes this node a cluster member
    #[argh(option)]
    redis: Option<String>,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Bench(order_process_bench::BenchArgs),
    HashToken(HashTokenArgs),
    CheckConfig(CheckConfigArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "check-config")]
/// check the config (--config, and the other options as a node would take them) and every file it
/// names, as a node does before it starts: the tokens file, the TLS files, Redis's password file;
/// contacts nothing. Exits 0 when a node would start with it, 64 (and says why) when it would
/// refuse it
struct CheckConfigArgs {
    /// check this tokens file in place of the config's auth.tokens_file (one about to replace it)
    #[argh(option)]
    tokens_file: Option<PathBuf>,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "hash-token")]
/// print the SHA-256 of a token for the tokens file (auth.tokens_file), or with --user a whole
/// [[token]] entry to append to it; the token is read from standard input when not given, so it
/// stays out of the shell history
struct HashTokenArgs {
    /// the user name the token stands for; prints a whole entry
    #[argh(option)]
    user: Option<String>,
    /// the role of the entry: user (the default) or admin
    #[argh(option, default = "String::from(\"user\")")]
    role: String,
    /// when the token stops working, RFC 3339 (e.g. 2027-01-01T00:00:00Z)
    #[argh(option)]
    expires: Option<String>,
    /// the token; read from standard input when absent
    #[argh(positional)]
    token: Option<String>,
}

/// `order-process hash-token`: prints a hash or a tokens-file entry.
fn hash_token(args: HashTokenArgs) -> ExitCode {
    use order_process::api::auth::{check_expires, entry_text, hash_token, Role};
    let token = match args.token {
        Some(token) => token,
        None => {
            let mut line = String::new();
            if let Err(error) = std::io::stdin().read_line(&mut line) {
                eprintln!("order-process: cannot read the token from standard input: {error}");
                return ExitCode::FAILURE;
            }
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    if token.trim().is_empty() || token.trim() != token || token.contains(char::is_whitespace) {
        eprintln!("order-process: the token must be non-empty, without spaces");
        return ExitCode::from(EXIT_USAGE);
    }
    let role = match args.role.as_str() {
        "user" => Role::User,
        "admin" => Role::Admin,
        other => {
            eprintln!("order-process: --role must be user or admin, not `{other}`");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(expires) = &args.expires {
        if let Err(problem) = check_expires(expires) {
            eprintln!("order-process: --expires: {problem}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    match args.user {
        Some(user) if !user.trim().is_empty() => {
            print!(
                "{}",
                entry_text(&token, user.trim(), role, args.expires.as_deref())
            )
        }
        Some(_) => {
            eprintln!("order-process: --user must not be empty");
            return ExitCode::from(EXIT_USAGE);
        }
        None => println!("{}", hash_token(&token)),
    }
    ExitCode::SUCCESS
}

/// `order-process check-config`: what a node checks before it starts, without starting one.
fn check_config(mut config: Config, args: CheckConfigArgs) -> ExitCode {
    if let Some(tokens_file) = args.tokens_file {
        config.auth.tokens_file = tokens_file;
    }
    // Some of what is checked builds clients that expect a runtime around them.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("order-process: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async { order_process::node::check(&config) }) {
        Ok(()) => {
            println!("order-process: config ok");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("order-process: {error:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().collect();
    let command = raw.first().map(String::as_str).unwrap_or("order-process");
    let rest: Vec<&str> = raw.iter().skip(1).map(String::as_str).collect();
    let args = match Args::from_args(&[command], &rest) {
        Ok(args) => args,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    println!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("order-process: {}", early.output.trim());
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    let check = match args.command {
        Some(Command::Bench(bench)) => return order_process_bench::main(bench),
        Some(Command::HashToken(hash)) => return hash_token(hash),
        Some(Command::CheckConfig(check)) => Some(check),
        None => None,
    };
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        log_level: args.log_level,
        join: args.join,
        redis: args.redis,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("order-process: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(check) = check {
        return check_config(config, check);
    }
    init_tracing(&config);
    // Before the runtime: the exporter sends from a thread of its own with a blocking client.
    let exporter = match order_process::trace::spans::install(&config.telemetry) {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("order-process: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = match config.server.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        threads => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("order-process: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let listen = config.server.listen;
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("order-process: cannot listen on {listen}: {error}");
                return ExitCode::FAILURE;
            }
        };
        match order_process::node::run(config, listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) if error.downcast_ref::<ConfigError>().is_some() => {
                eprintln!("order-process: {error:#}");
                ExitCode::from(EXIT_USAGE)
            }
            Err(error) => {
                eprintln!("order-process: {error:#}");
                ExitCode::FAILURE
            }
        }
    });
    // The spans of the last orders go out before the process ends.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    code
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        // Each line carries the fields of the span it was logged in (an order's `order_id` and
        // `trace_id`) under "span", and the spans around it under "spans".
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed at once, not on first poll, so a
/// signal that comes while the node is still starting (waiting for its lease, say) is kept for
/// the node to act on instead of killing the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    // SIGHUP reloads the tokens file once the node runs; until then (a reload sent while the
    // node waits for Redis or its lease) it must not end the process, as by default it would.
    // A handler, once installed, stays for the life of the process.
    if let Err(error) = signal(SignalKind::hangup()) {
        tracing::error!(error = %error, signal = "SIGHUP", "cannot listen for the signal");
    }
    async move {
        let received = |stream: std::io::Result<tokio::signal::unix::Signal>,
                        name: &'static str| async move {
            match stream {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(error) => {
                    tracing::error!(error = %error, signal = name, "cannot listen for the signal");
                    std::future::pending::<()>().await;
                }
            }
        };
        // Whichever signal comes first starts the drain.
        tokio::select! {
            _ = received(terminate, "SIGTERM") => tracing::info!("received SIGTERM"),
            _ = received(interrupt, "SIGINT") => tracing::info!("received SIGINT"),
        }
    }
}
