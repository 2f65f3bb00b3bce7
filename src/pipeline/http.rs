//! The built-in `http` handler: each attempt POSTs the order as JSON to the step's URL (to run it)
//! or its rollback URL (to undo it), with an `Idempotency-Key` header and the order's ownership
//! epoch (`Order-Epoch`).
//!
//! A 2xx answer is success, and its JSON body becomes the step's output. A 4xx is a permanent
//! failure whose text becomes the reason, except the "busy" ones (408, 425, 429); those, a 5xx, a
//! timeout or a connection error are worth a retry, and a 429 or 503 may say when in its
//! `Retry-After`. Redirects are not followed (a POST turned into a GET would lose the order). The
//! handler makes one attempt per call; the executor owns the retries and their schedule.
//!
//! https is rustls with the `ring` provider: the server's certificate is checked against the
//! system's roots (or a bundled set on a host with none) plus the step's `ca_file`, and a step
//! may present a client certificate. Steps with the same TLS files share one client.

use super::client::{target, CallError, Client, Target};
use super::handler::{StepContext, StepDone, StepError, StepHandler};
use super::retry::RetryPolicy;
use crate::config::{ConfigError, HttpSettings, NotifySettings, StepTls};
use crate::order::{nests_deeper_than, write_step_call, Output, Step, MAX_OUTPUT_DEPTH};
use anyhow::Context;
use async_trait::async_trait;
use hyper::header::{HeaderName, HeaderValue, RETRY_AFTER};
use hyper::HeaderMap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// The most of a response body that is read; a longer success body is not kept as output.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The most of a failure text kept as a reason.
const MAX_REASON_CHARS: usize = 500;

/// The HTTP clients of a node's `http` steps: one per distinct TLS setting, so steps with the
/// same files share their pooled connections.
#[derive(Default)]
pub struct Clients {
    /// The trusted roots without a step's own CA, read when the first https step needs them.
    roots: Option<RootCertStore>,
    /// By TLS files, and whether the client talks to an https URL at all.
    built: HashMap<(StepTls, bool), Client>,
}

impl Clients {
    /// The client for `step`'s settings. A TLS file that became unreadable since the config
    /// was checked is a [`ConfigError`].
    pub fn for_step(&mut self, step: Step, settings: &HttpSettings) -> anyhow::Result<Client> {
        let https = std::iter::once(&settings.url)
            .chain(&settings.rollback_url)
            .any(|url| url.scheme() == "https");
        self.get(&settings.tls, https, &format!("steps.{step}"))
    }

    /// The client of the completion webhook: its TLS files, if any, as a step's.
    pub fn for_notify(&mut self, settings: &NotifySettings) -> anyhow::Result<Client> {
        self.get(&settings.tls, settings.url.scheme() == "https", "notify")
    }

    fn get(&mut self, files: &StepTls, https: bool, section: &str) -> anyhow::Result<Client> {
        let id = (files.clone(), https);
        if let Some(client) = self.built.get(&id) {
            return Ok(client.clone());
        }
        // Plain http calls never check a certificate: no need to read the system's roots.
        let roots = match https {
            true => self.roots.get_or_insert_with(default_roots).clone(),
            false => RootCertStore::empty(),
        };
        let client = Client::new(tls_config(files, roots, section)?)
            .context("cannot build the HTTP client")?;
        self.built.insert(id, client.clone());
        Ok(client)
    }
}

/// The roots a server certificate is checked against: the system's (`/etc/ssl/certs`, or
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`), else, on a host that has none (a container or chroot),
/// the bundled Mozilla set.
pub(crate) fn default_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        warn!(error = %error, "cannot read some of the system's root certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        debug!(
            ignored,
            "some of the system's root certificates are not usable"
        );
    }
    if added == 0 {
        info!("no system root certificates found, https steps trust the bundled set");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

/// The TLS setup of steps with the files of `tls`: `roots` plus the certificates in `ca_file`,
/// and the client certificate if one is set. Errors name the key under `section`
/// (`steps.Processing`) and say what is wrong with its file.
pub fn tls_config(
    tls: &StepTls,
    mut roots: RootCertStore,
    section: &str,
) -> Result<rustls::ClientConfig, ConfigError> {
    let key = |field: &str| format!("{section}.{field}");
    if let Some(path) = &tls.ca_file {
        add_cas(&mut roots, &key("ca_file"), path)?;
    }
    let provider = Arc::new(crate::crypto::provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError::new(section, format!("cannot set up TLS: {error}")))?
        .with_root_certificates(roots);
    match (&tls.client_cert, &tls.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert_path), Some(key_path)) => {
            let chain = certificates(&key("client_cert"), cert_path)?;
            let bytes = read(&key("client_key"), key_path)?;
            let private = PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| {
                ConfigError::new(
                    key("client_key"),
                    format!("{} holds no PEM private key: {error}", key_path.display()),
                )
            })?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|error| {
                    ConfigError::new(
                        key("client_key"),
                        format!(
                            "{} does not go with client_cert {}: {error}",
                            key_path.display(),
                            cert_path.display()
                        ),
                    )
                })
        }
        (Some(_), None) => Err(ConfigError::new(
            key("client_key"),
            "required with client_cert: set both or neither",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            key("client_cert"),
            "required with client_key: set both or neither",
        )),
    }
}

/// Reads a file named by a config key.
pub(crate) fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|error| ConfigError::new(key, format!("cannot read {}: {error}", path.display())))
}

/// Adds to `roots` the CA certificates in the PEM file `path`, named by the config key `key`.
pub(crate) fn add_cas(
    roots: &mut RootCertStore,
    key: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    for certificate in certificates(key, path)? {
        roots.add(certificate).map_err(|error| {
            ConfigError::new(
                key,
                format!("{}: not a CA certificate: {error}", path.display()),
            )
        })?;
    }
    Ok(())
}

/// The PEM certificates in a file named by a config key; at least one.
pub(crate) fn certificates(
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certificates = CertificateDer::pem_slice_iter(&read(key, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ConfigError::new(key, format!("{}: bad PEM: {error}", path.display())))?;
    if certificates.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certificates)
}

/// The wait a `Retry-After` value asks for at `now`: delta-seconds, or an HTTP date (no wait
/// once it has passed). `None` when it is neither.
fn retry_after(text: &str, now: SystemTime) -> Option<Duration> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        // More seconds than a u64 holds is as good as forever; the policy caps it.
        return Some(text.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

pub struct Http {
    client: Client,
    settings: HttpSettings,
    /// `settings`' URLs, as each call's request takes them.
    url: Target,
    rollback_url: Option<Target>,
    /// Calls in flight to this step's service, when `concurrency` limits them.
    in_flight: Option<Semaphore>,
}

impl Http {
    /// The handler of `step`, calling its service with `client`.
    pub fn new(step: Step, client: Client, settings: HttpSettings) -> Result<Self, ConfigError> {
        let in_flight = settings
            .concurrency
            .map(|limit| Semaphore::new(limit.get()));
        Ok(Http {
            url: target(&format!("steps.{step}.url"), &settings.url)?,
            rollback_url: match &settings.rollback_url {
                Some(url) => Some(target(&format!("steps.{step}.rollback_url"), url)?),
                None => None,
            },
            client,
            settings,
            in_flight,
        })
    }

    async fn call(
        &self,
        url: &Target,
        context: &StepContext<'_>,
        rollback: bool,
    ) -> Result<StepDone, StepError> {
        let headers = [
            header(IDEMPOTENCY_KEY, context.idempotency_key())?,
            (ORDER_EPOCH, HeaderValue::from(context.order.epoch)),
            header(TRACEPARENT, context.traceparent())?,
        ]
        .into_iter()
        .chain(crate::trace::tracestate_header(context.order));
        // A payload that cannot be written now never can be: a permanent failure.
        let mut body = Vec::new();
        write_step_call(
            &mut body,
            context.order,
            context.step,
            context.attempt,
            rollback,
        )
        .map_err(|error| StepError::new(format!("cannot write the request: {error}")))?;
        let timeout = self.settings.timeout;
        let answer = self
            .client
            .post_json(url, headers, body, timeout, MAX_RESPONSE_BYTES)
            .await
            .map_err(|error| transport_error(error, timeout))?;
        match answer.status {
            200..=299 => Ok(StepDone {
                output: output(&answer.body, answer.truncated, context),
                status: Some(answer.status),
            }),
            status => Err(failed_answer(
                status,
                asked_wait(&answer.headers),
                &answer.body,
            )),
        }
    }
}

/// The headers of a call beside the client's own: `Idempotency-Key`, `Order-Epoch`,
/// `traceparent`.
pub(super) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub(super) const ORDER_EPOCH: HeaderName = HeaderName::from_static("order-epoch");
pub(super) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Header `name` with `value`; a value that cannot be sent fails the attempt for good.
pub(super) fn header(
    name: HeaderName,
    value: String,
) -> Result<(HeaderName, HeaderValue), StepError> {
    match HeaderValue::try_from(value) {
        Ok(value) => Ok((name, value)),
        Err(error) => Err(StepError::new(format!(
            "cannot send header {name}: {error}"
        ))),
    }
}

/// The wait a `Retry-After` header asks for, if there is one that can be read.
pub(super) fn asked_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| retry_after(text, SystemTime::now()))
}

/// What a non-2xx answer means: busy or not ready yet (timeout, too early, too many requests,
/// a 5xx) is worth a retry, after `asked` for a 429 or 503 that says how long; any other 4xx is
/// final.
pub(super) fn failed_answer(status: u16, asked: Option<Duration>, body: &[u8]) -> StepError {
    match status {
        408 | 425 | 429 | 500..=599 => {
            let wait = matches!(status, 429 | 503).then_some(asked).flatten();
            StepError::retryable(format!("HTTP {status}: {}", reason(status, body)))
                .with_status(status)
                .with_retry_after(wait)
        }
        400..=499 => StepError::new(reason(status, body)).with_status(status),
        _ => StepError::new(format!("unexpected HTTP {status}")).with_status(status),
    }
}

/// The step output in a 2xx body: its JSON, if it is JSON. Anything else is logged and dropped.
fn output(body: &[u8], truncated: bool, context: &StepContext<'_>) -> Option<Output> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    if truncated {
        warn!(order_id = %context.order.order_id, step = %context.step, limit = MAX_RESPONSE_BYTES, "step answer too large to keep as output");
        return None;
    }
    if nests_deeper_than(body, MAX_OUTPUT_DEPTH) {
        warn!(order_id = %context.order.order_id, step = %context.step, limit = MAX_OUTPUT_DEPTH, "step answer nests too deep to keep as output");
        return None;
    }
    match Output::read(body) {
        // `null` is no output: the order's stored form has no other way to say it.
        Ok(output) if output.text() == "null" => None,
        Ok(output) => Some(output),
        Err(error) => {
            warn!(order_id = %context.order.order_id, step = %context.step, error = %error, "step answer is not JSON, not kept as output");
            None
        }
    }
}

/// The reason a failed answer gives: its text, shortened, or the bare status without one.
pub(super) fn reason(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        shorten(text)
    }
}

/// A failure before a full answer arrived: always worth a retry.
pub(super) fn transport_error(error: CallError, timeout: Duration) -> StepError {
    match error {
        CallError::Timeout => StepError::retryable(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
        CallError::Failed { reason, status } => {
            let failure = StepError::retryable(shorten(&reason));
            match status {
                Some(status) => failure.with_status(status),
                None => failure,
            }
        }
    }
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_REASON_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[async_trait]
impl StepHandler for Http {
    async fn run(&self, context: &StepContext<'_>) -> Result<StepDone, StepError> {
        self.call(&self.url, context, false).await
    }

    async fn rollback(&self, context: &StepContext<'_>) -> Result<StepDone, StepError> {
        match &self.rollback_url {
            Some(url) => self.call(url, context, true).await,
            // Nothing to undo.
            None => Ok(StepDone::default()),
        }
    }

    fn room(&self, rollback: bool) -> Option<&Semaphore> {
        match rollback && self.rollback_url.is_none() {
            true => None,
            false => self.in_flight.as_ref(),
        }
    }

    fn retry_policy(&self, rollback: bool) -> Option<RetryPolicy> {
        if rollback && self.settings.rollback_url.is_none() {
            return None;
        }
        Some(RetryPolicy::from(&self.settings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::{Order, OrderId};

    fn settings(rollback_url: Option<&str>) -> HttpSettings {
        HttpSettings {
            url: reqwest::Url::parse("http://127.0.0.1:9/charge").unwrap(),
            rollback_url: rollback_url.map(|url| reqwest::Url::parse(url).unwrap()),
            timeout: Duration::from_secs(1),
            retries: 4,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            tls: StepTls::default(),
            concurrency: None,
        }
    }

    /// A client for plain http.
    fn plain() -> Client {
        let tls = tls_config(
            &StepTls::default(),
            RootCertStore::empty(),
            "steps.Processing",
        );
        Client::new(tls.unwrap()).unwrap()
    }

    /// An order to make requests for.
    fn order() -> Order {
        Order::new(
            OrderId::nil(),
            "alice".into(),
            serde_json::json!({}),
            "node".into(),
            chrono::Utc::now(),
        )
    }

    #[tokio::test]
    async fn without_rollback_url_there_is_nothing_to_undo() {
        let handler = Http::new(Step::Processing, plain(), settings(None)).unwrap();
        assert_eq!(handler.retry_policy(true), None);
        assert_eq!(handler.retry_policy(false).map(|p| p.retries), Some(4));
        let order = order();
        let context = StepContext::attempt(&order, Step::Processing, true, 1);
        assert_eq!(handler.rollback(&context).await, Ok(StepDone::default()));
        let refund = settings(Some("http://127.0.0.1:9/refund"));
        let with = Http::new(Step::Processing, plain(), refund).unwrap();
        assert!(with.retry_policy(true).is_some());
    }

    #[test]
    fn idempotency_keys_differ_between_run_and_rollback() {
        let order = order();
        let run = StepContext::attempt(&order, Step::Processing, false, 3);
        let undo = StepContext::attempt(&order, Step::Processing, true, 1);
        assert_eq!(
            run.idempotency_key(),
            format!("{}:Processing", OrderId::nil())
        );
        assert_eq!(
            undo.idempotency_key(),
            format!("{}:Processing:rollback", OrderId::nil())
        );
        let mut order = order;
        order.order_id = OrderId::from_u128(0x019a_f3c2_7d1e_7b44_8a6f_0c2d_9e8b_a1f5);
        let post = StepContext::attempt(&order, Step::PostProcessing, true, 2);
        assert_eq!(
            post.idempotency_key(),
            "019af3c2-7d1e-7b44-8a6f-0c2d9e8ba1f5:Post-Processing:rollback"
        );
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let wait = |text: &str| retry_after(text, now);
        assert_eq!(wait("1"), Some(Duration::from_secs(1)));
        assert_eq!(wait(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(wait("99999999999999999999999"), Some(Duration::MAX));
        // `now` is Wed, 21 Oct 2015 07:28:00 GMT.
        assert_eq!(
            wait("Wed, 21 Oct 2015 07:28:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(wait("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO));
        for bad in ["", "-1", "1.5", "soon", "Wed, 21 Oct 2015"] {
            assert_eq!(wait(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_answer_is_kept_as_output_when_it_is_json_other_than_null_and_not_too_deep() {
        let order = order();
        let context = StepContext::attempt(&order, Step::Processing, false, 1);
        let kept =
            |body: &str| output(body.as_bytes(), false, &context).map(|o| o.text().to_string());
        assert_eq!(kept(r#" {"id": 7} "#).as_deref(), Some(r#"{"id":7}"#));
        assert_eq!(kept("0").as_deref(), Some("0"));
        for none in ["", "  ", "null", " null\n", "not json"] {
            assert_eq!(kept(none), None, "{none:?}");
        }
        let nested = |depth: usize| "[".repeat(depth) + &"]".repeat(depth);
        assert!(kept(&nested(MAX_OUTPUT_DEPTH)).is_some());
        assert_eq!(kept(&nested(MAX_OUTPUT_DEPTH + 1)), None);
    }

    #[test]
    fn long_reasons_are_shortened_on_a_char_boundary() {
        let long = "é".repeat(MAX_REASON_CHARS + 10);
        let short = shorten(&long);
        assert_eq!(short.chars().count(), MAX_REASON_CHARS + 1);
        assert!(short.ends_with('…'));
        assert_eq!(shorten("fine"), "fine");
    }
}
