//! Who is calling: the [`Authenticator`] turns a request's [`Credentials`] (its
//! `Authorization` header, and the client certificate its connection showed) into a
//! [`Principal`] (a user name and a [`Role`]), or a 401.
//!
//! Two modes (`auth.mode`):
//! - `tokens`: `Authorization: Bearer <token>`. The tokens file holds only the SHA-256 of each
//!   token, with its user, role and optional expiry; a presented token is hashed and compared
//!   with every entry in constant time. A request without the header whose connection showed a
//!   client certificate (`server.tls_client_ca`) is the user its `[[certificate]]` entry names
//!   by the certificate's subject common name. The file is re-read on SIGHUP
//!   ([`Authenticator::reload`]); a bad file then keeps the entries in force.
//! - `header`: development only, as the original system did: the header's value is the user
//!   name, unchecked, and nobody is an admin.
//!
//! Tokens never reach a log line: errors name entries by their position and user, not by hash.
//!
//! The tokens file (TOML):
//!
//! ```toml
//! [[token]]
//! user = "alice"
//! role = "user"                     # "user" (the default) or "admin"
//! sha256 = "<64 hex digits>"        # order-process hash-token <token>
//! expires = "2027-01-01T00:00:00Z"  # optional, RFC 3339; 401 after it
//! revoked = false                   # optional; true refuses the token
//!
//! [[certificate]]
//! common_name = "billing"           # the client certificate's subject CN
//! user = "billing"                  # optional; the common name by default
//! role = "admin"                    # "user" (the default) or "admin"
//! revoked = false                   # optional; true refuses the certificate's callers
//! ```

use super::limits::{InFlight, RateLimiter};
use super::tls::CertificateName;
use super::ApiError;
use crate::config::{AuthMode, Config, ConfigError};
use crate::secret::constant_time_eq;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use warp::http::StatusCode;
use warp::Filter;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submits, reads, lists and cancels its own orders.
    User,
    /// Also reads and lists anyone's orders, retries parked rollbacks and calls the service
    /// endpoints.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// 403 unless the caller is an admin.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("{what} needs the admin role"),
            ))
        }
    }
}

/// The SHA-256 of a token, as the 64 lowercase hex digits the tokens file holds.
pub fn hash_token(token: &str) -> String {
    to_hex(&Sha256::digest(token.as_bytes()))
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

fn from_hex(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (index, pair) in digits.chunks_exact(2).enumerate() {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        bytes[index] = u8::try_from(high * 16 + low).ok()?;
    }
    Some(bytes)
}

/// One token, as checked.
#[derive(Debug, Clone)]
struct Entry {
    user: String,
    role: Role,
    hash: [u8; 32],
    expires: Option<DateTime<Utc>>,
    revoked: bool,
}

/// One certificate entry, as checked.
#[derive(Debug, Clone)]
struct CertificateEntry {
    common_name: String,
    user: String,
    role: Role,
    revoked: bool,
}

/// A tokens file, as checked.
#[derive(Debug, Default)]
struct Entries {
    tokens: Vec<Entry>,
    certificates: Vec<CertificateEntry>,
}

/// How many entries of each kind a tokens file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub tokens: usize,
    pub certificates: usize,
}

impl Entries {
    fn counts(&self) -> Counts {
        Counts {
            tokens: self.tokens.len(),
            certificates: self.certificates.len(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<RawEntry>,
    #[serde(default)]
    certificate: Vec<RawCertificate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    common_name: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default = "default_role")]
    role: Role,
    #[serde(default)]
    revoked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    user: String,
    #[serde(default = "default_role")]
    role: Role,
    sha256: String,
    #[serde(default)]
    expires: Option<toml::Value>,
    #[serde(default)]
    revoked: bool,
}

fn default_role() -> Role {
    Role::User
}

/// Why a tokens file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokensError(String);

/// Parses a tokens file's text. Errors name the entry (`token[2]` and its user, or
/// `certificate[0]` and its common name), never a hash.
fn parse_tokens(text: &str) -> Result<Entries, TokensError> {
    let raw: RawFile = toml::from_str(text).map_err(|error| {
        TokensError(format!(
            "not a tokens file: {}",
            error.message().trim().replace('\n', " ")
        ))
    })?;
    let mut entries: Vec<Entry> = Vec::with_capacity(raw.token.len());
    for (index, raw) in raw.token.into_iter().enumerate() {
        let user = raw.user.trim().to_string();
        let name = format!("token[{index}] (user `{user}`)");
        if user.is_empty() {
            return Err(TokensError(format!("token[{index}]: user is empty")));
        }
        let hash = from_hex(raw.sha256.trim()).ok_or_else(|| {
            TokensError(format!(
                "{name}: sha256 must be 64 hex digits (order-process hash-token <token>)"
            ))
        })?;
        let expires = match raw.expires {
            None => None,
            Some(value) => {
                let text = match value {
                    toml::Value::String(text) => text,
                    toml::Value::Datetime(time) => time.to_string(),
                    other => {
                        return Err(TokensError(format!(
                            "{name}: expires must be an RFC 3339 time, not {}",
                            other.type_str()
                        )))
                    }
                };
                let time = DateTime::parse_from_rfc3339(&text).map_err(|_| {
                    TokensError(format!(
                        "{name}: expires `{text}` is not an RFC 3339 time with an offset, like 2027-01-01T00:00:00Z"
                    ))
                })?;
                Some(time.with_timezone(&Utc))
            }
        };
        if entries
            .iter()
            .any(|other| constant_time_eq(&other.hash, &hash))
        {
            return Err(TokensError(format!(
                "{name}: the same token is listed twice"
            )));
        }
        entries.push(Entry {
            user,
            role: raw.role,
            hash,
            expires,
            revoked: raw.revoked,
        });
    }
    let mut certificates: Vec<CertificateEntry> = Vec::with_capacity(raw.certificate.len());
    for (index, raw) in raw.certificate.into_iter().enumerate() {
        let common_name = raw.common_name.trim().to_string();
        if common_name.is_empty() {
            return Err(TokensError(format!(
                "certificate[{index}]: common_name is empty"
            )));
        }
        let name = format!("certificate[{index}] (common name `{common_name}`)");
        if certificates
            .iter()
            .any(|other| other.common_name == common_name)
        {
            return Err(TokensError(format!("{name}: listed twice")));
        }
        let user = match raw.user.map(|user| user.trim().to_string()) {
            None => common_name.clone(),
            Some(user) if user.is_empty() => {
                return Err(TokensError(format!("{name}: user is empty")))
            }
            Some(user) => user,
        };
        certificates.push(CertificateEntry {
            common_name,
            user,
            role: raw.role,
            revoked: raw.revoked,
        });
    }
    Ok(Entries {
        tokens: entries,
        certificates,
    })
}

/// Checks a tokens file's text; the number of entries, or what is wrong. (For the fuzz targets
/// and tools; the node reads files with [`Authenticator::new`].)
pub fn check_tokens(text: &str) -> Result<Counts, TokensError> {
    parse_tokens(text).map(|entries| entries.counts())
}

fn read_tokens(path: &Path) -> Result<Entries, TokensError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| TokensError(format!("cannot read {}: {error}", path.display())))?;
    parse_tokens(&text)
        .map_err(|TokensError(problem)| TokensError(format!("{}: {problem}", path.display())))
}

/// Checks callers; shared by every handler.
pub struct Authenticator {
    mode: AuthMode,
    path: PathBuf,
    /// Swapped whole on reload, so a check sees the old table or the new one, never a mix.
    tokens: RwLock<Arc<Entries>>,
}

impl Authenticator {
    /// In tokens mode, reads the tokens file; a missing or bad file is a config error.
    pub fn new(mode: AuthMode, tokens_file: &Path) -> Result<Self, ConfigError> {
        let tokens = match mode {
            AuthMode::Header => Entries::default(),
            AuthMode::Tokens => read_tokens(tokens_file)
                .map_err(|error| ConfigError::new("auth.tokens_file", error.to_string()))?,
        };
        match mode {
            AuthMode::Header => tracing::warn!(
                "auth.mode is header: the Authorization header names the user unchecked; for development only"
            ),
            AuthMode::Tokens => tracing::info!(
                tokens = tokens.tokens.len(),
                certificates = tokens.certificates.len(),
                file = %tokens_file.display(),
                "tokens loaded"
            ),
        }
        Ok(Authenticator {
            mode,
            path: tokens_file.to_path_buf(),
            tokens: RwLock::new(Arc::new(tokens)),
        })
    }

    /// Whether callers must present a token (tokens mode).
    pub fn checks_tokens(&self) -> bool {
        self.mode == AuthMode::Tokens
    }

    /// Header mode, for tests of the handlers.
    pub fn header_mode() -> Self {
        Authenticator {
            mode: AuthMode::Header,
            path: PathBuf::new(),
            tokens: RwLock::new(Arc::new(Entries::default())),
        }
    }

    /// Whether the tokens file names client certificates.
    pub fn names_certificates(&self) -> bool {
        !self.current().certificates.is_empty()
    }

    /// Re-reads the tokens file; on error the entries in force stay. Returns how many were read.
    pub fn reload(&self) -> Result<Counts, TokensError> {
        if self.mode != AuthMode::Tokens {
            return Ok(Entries::default().counts());
        }
        let fresh = Arc::new(read_tokens(&self.path)?);
        let count = fresh.counts();
        match self.tokens.write() {
            Ok(mut tokens) => *tokens = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(count)
    }

    fn current(&self) -> Arc<Entries> {
        match self.tokens.read() {
            Ok(tokens) => Arc::clone(&tokens),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The caller of a request, or a 401: by its token when it sent an `Authorization` header,
    /// else (tokens mode) by the entry of its client certificate.
    pub fn caller(&self, credentials: &Credentials) -> Result<Principal, ApiError> {
        match (&credentials.authorization, &credentials.certificate) {
            (None, Some(_)) if self.mode == AuthMode::Tokens && credentials.cross_site_write => {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "a write another site's page made is not taken on a client certificate: send a token",
                ))
            }
            (None, Some(name)) if self.mode == AuthMode::Tokens => self.by_certificate(name),
            (authorization, _) => self.authenticate(authorization.as_deref()),
        }
    }

    fn by_certificate(&self, name: &CertificateName) -> Result<Principal, ApiError> {
        let entries = self.current();
        let entry = entries
            .certificates
            .iter()
            .find(|entry| entry.common_name.as_str() == &*name.0);
        match entry {
            Some(entry) if !entry.revoked => Ok(Principal {
                user: entry.user.clone(),
                role: entry.role,
            }),
            Some(_) => Err(unauthorized("client certificate revoked")),
            None => Err(unauthorized(
                "missing Authorization: Bearer <token> header, and no [[certificate]] entry for the client certificate's common name",
            )),
        }
    }

    /// The caller named by an `Authorization` header value, or a 401.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal, ApiError> {
        self.authenticate_at(header, Utc::now())
    }

    fn authenticate_at(
        &self,
        header: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Principal, ApiError> {
        match self.mode {
            // A bearer token sent here (a client set up for a node that checks tokens) would
            // become a user name, and so reach the logs and the store: refused instead.
            AuthMode::Header if header.and_then(bearer).is_some() => Err(unauthorized(
                "this node takes the user name itself as Authorization (auth.mode = \"header\"), \
                 not a bearer token",
            )),
            AuthMode::Header => header
                .map(str::trim)
                .filter(|value| !value.is_empty())
                .map(|user| Principal {
                    user: user.to_string(),
                    role: Role::User,
                })
                .ok_or_else(ApiError::unauthorized),
            AuthMode::Tokens => {
                let token = header
                    .and_then(bearer)
                    .ok_or_else(|| unauthorized("missing Authorization: Bearer <token> header"))?;
                let hash = Sha256::digest(token.as_bytes());
                let entries = self.current();
                // Every entry is compared, matched or not, so timing says nothing about which.
                let mut found: Option<&Entry> = None;
                for entry in entries.tokens.iter() {
                    if constant_time_eq(&entry.hash, &hash) {
                        found = Some(entry);
                    }
                }
                let entry = found
                    .filter(|entry| !entry.revoked)
                    .ok_or_else(|| unauthorized("invalid token"))?;
                if entry.expires.is_some_and(|expires| expires <= now) {
                    return Err(unauthorized("token expired"));
                }
                Ok(Principal {
                    user: entry.user.clone(),
                    role: entry.role,
                })
            }
        }
    }
}

/// What a request shows of who calls: its `Authorization` header, and the common name of the
/// client certificate its connection showed (put in the request's extensions by the server).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub authorization: Option<String>,
    pub certificate: Option<CertificateName>,
    /// A browser says the request is a write that another site's page made (`Sec-Fetch-Site`),
    /// carrying the certificate the browser shows on its own, as it would a cookie.
    pub cross_site_write: bool,
    /// A browser says another site's page made the request, whatever its method.
    pub cross_site: bool,
}

impl Credentials {
    /// These credentials for a read that costs as a write does (a backup): another site's page
    /// may not make it on a client certificate either.
    pub fn as_write(self) -> Self {
        Credentials {
            cross_site_write: self.cross_site,
            ..self
        }
    }

    /// Whether the caller showed anything to be known by.
    pub fn shown(&self) -> bool {
        self.authorization.is_some() || self.certificate.is_some()
    }
}

/// A request's [`Credentials`].
pub fn credentials() -> impl Filter<Extract = (Credentials,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::ext::optional::<CertificateName>())
        .and(warp::method())
        .and(warp::header::optional::<String>("sec-fetch-site"))
        .map(
            |authorization, certificate, method: warp::http::Method, site: Option<String>| {
                let cross_site = site.is_some_and(|site| site != "same-origin" && site != "none");
                Credentials {
                    authorization,
                    certificate,
                    cross_site_write: cross_site && !method.is_safe(),
                    cross_site,
                }
            },
        )
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message)
}

/// The token of a `Bearer <token>` header value (the scheme in any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Everything the handlers check before doing work: who calls, and the limits of
/// `[limits]`.
pub struct Security {
    pub auth: Arc<Authenticator>,
    pub rate: RateLimiter,
    pub in_flight: InFlight,
    pub body_read_timeout: Duration,
    pub max_depth: usize,
}

impl Security {
    /// Reads the tokens file in tokens mode; a missing or bad one is a config error.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let limits = &config.limits;
        Ok(Security {
            auth: Arc::new(Authenticator::new(
                config.auth_mode(),
                &config.auth.tokens_file,
            )?),
            rate: RateLimiter::new(
                limits.submit_rate,
                limits.submit_burst.get(),
                limits.rate_limit_users.get(),
            ),
            in_flight: InFlight::new(limits.max_in_flight_per_user.get()),
            body_read_timeout: limits.body_read_timeout,
            max_depth: limits.max_depth.get(),
        })
    }
}

/// Logs an admin action (or a cluster-internal call) on the `audit` target: who did what. The
/// names come from requests, so they are logged as strings (quoted and escaped in text logs):
/// none can forge a line of the log, or a field of its line.
pub fn audit(who: &str, role: &str, action: &str, target: &str) {
    tracing::info!(target: "audit", who, role, action, target, "admin action");
}

/// The tokens-file entry for a token, as `order-process hash-token` prints it.
pub fn entry_text(token: &str, user: &str, role: Role, expires: Option<&str>) -> String {
    let mut text = format!(
        "[[token]]\nuser = {}\nrole = \"{}\"\nsha256 = \"{}\"\n",
        toml::Value::String(user.to_string()),
        role.as_str(),
        hash_token(token)
    );
    if let Some(expires) = expires {
        text.push_str(&format!(
            "expires = {}\n",
            toml::Value::String(expires.to_string())
        ));
    }
    text
}

/// Checks an expiry given to `hash-token --expires`.
pub fn check_expires(text: &str) -> Result<(), String> {
    DateTime::parse_from_rfc3339(text)
        .map(|_| ())
        .map_err(|_| format!("`{text}` is not an RFC 3339 time like 2027-01-01T00:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Authenticator {
        Authenticator {
            mode: AuthMode::Tokens,
            path: PathBuf::new(),
            tokens: RwLock::new(Arc::new(parse_tokens(text).unwrap())),
        }
    }

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            from_hex(&hash_token("abc")).map(|h| to_hex(&h)),
            Some(hash_token("abc"))
        );
        assert!(from_hex("zz").is_none());
        assert!(from_hex(&"g".repeat(64)).is_none());
    }

    #[test]
    fn tokens_mode_checks_hash_role_expiry_and_revocation() {
        let file = format!(
            "{}{}{}revoked = true\n{}expires = 2020-01-01T00:00:00Z\n{}expires = \"2999-01-01T00:00:00+02:00\"\n",
            entry_text("alice-token", "alice", Role::User, None),
            entry_text("root-token", "root", Role::Admin, None),
            entry_text("gone-token", "gone", Role::User, None),
            entry_text("old-token", "old", Role::User, None),
            entry_text("later-token", "later", Role::User, None),
        );
        let auth = tokens(&file);
        let check = |header: Option<&str>| auth.authenticate(header);
        assert_eq!(
            check(Some("Bearer alice-token")).unwrap(),
            Principal {
                user: "alice".into(),
                role: Role::User
            }
        );
        assert_eq!(
            check(Some("bearer  root-token ")).unwrap().role,
            Role::Admin
        );
        assert_eq!(check(Some("Bearer later-token")).unwrap().user, "later");
        for bad in [
            None,
            Some(""),
            Some("alice"),
            Some("alice-token"),
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic alice-token"),
            Some("Bearer alice-token2"),
            Some("Bearer gone-token"),
            Some("Bearer old-token"),
        ] {
            let error = check(bad).unwrap_err();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        assert_eq!(
            check(Some("Bearer old-token")).unwrap_err().message,
            "token expired"
        );
    }

    #[test]
    fn header_mode_trusts_the_header() {
        let auth = Authenticator::header_mode();
        assert_eq!(auth.authenticate(Some(" alice ")).unwrap().user, "alice");
        assert_eq!(auth.authenticate(Some("alice")).unwrap().role, Role::User);
        assert!(auth.authenticate(Some("  ")).is_err());
        assert!(auth.authenticate(None).is_err());
        let refused = auth.authenticate(Some("Bearer s3cret-token")).unwrap_err();
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert!(
            refused.message.contains("not a bearer token"),
            "{}",
            refused.message
        );
        assert_eq!(
            auth.authenticate(Some("bearer-fan")).unwrap().user,
            "bearer-fan",
            "a name is refused only as a bearer token"
        );
    }

    #[test]
    fn bad_files_are_refused_without_showing_hashes() {
        let hash = hash_token("t");
        for (text, needle) in [
            ("[[token]]\nuser = \"a\"\n", "sha256"),
            ("[[token]]\nuser = \"a\"\nsha256 = \"abc\"\n", "64 hex"),
            (&format!("[[token]]\nuser = \" \"\nsha256 = \"{hash}\"\n"), "user is empty"),
            (&format!("[[token]]\nuser = \"a\"\nrole = \"root\"\nsha256 = \"{hash}\"\n"), "root"),
            (&format!("[[token]]\nuser = \"a\"\nsha256 = \"{hash}\"\nexpires = 2020-01-01\n"), "offset"),
            (&format!("[[token]]\nuser = \"a\"\nsha256 = \"{hash}\"\nexpires = 5\n"), "RFC 3339"),
            (&format!("[[token]]\nuser = \"a\"\nsha256 = \"{hash}\"\n[[token]]\nuser = \"b\"\nsha256 = \"{hash}\"\n"), "twice"),
            ("[[token]]\nuser = \"a\"\nsha256 = \"x\"\nextra = 1\n", "extra"),
            ("nonsense", "not a tokens file"),
            ("[[certificate]]\ncommon_name = \" \"\n", "common_name is empty"),
            ("[[certificate]]\ncommon_name = \"a\"\nuser = \" \"\n", "user is empty"),
            ("[[certificate]]\ncommon_name = \"a\"\n[[certificate]]\ncommon_name = \"a\"\n", "listed twice"),
            ("[[certificate]]\nuser = \"a\"\n", "common_name"),
        ] {
            let error = parse_tokens(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text}: {error}");
            assert!(!error.contains(&hash), "{text}: {error}");
        }
        assert_eq!(
            parse_tokens("").unwrap().counts(),
            Counts {
                tokens: 0,
                certificates: 0
            }
        );
    }

    #[test]
    fn a_client_certificate_is_the_user_of_its_entry_when_no_token_is_sent() {
        let file = format!(
            "{}[[certificate]]\ncommon_name = \"billing\"\nrole = \"admin\"\n\
             [[certificate]]\ncommon_name = \"shop\"\nuser = \"alice\"\n\
             [[certificate]]\ncommon_name = \"gone\"\nrevoked = true\n",
            entry_text("alice-token", "alice", Role::User, None)
        );
        let auth = tokens(&file);
        let shown = |authorization: Option<&str>, name: Option<&str>| Credentials {
            authorization: authorization.map(String::from),
            certificate: name.map(|name| CertificateName(Arc::from(name))),
            cross_site_write: false,
            cross_site: false,
        };
        let principal = |user: &str, role| Principal {
            user: user.into(),
            role,
        };
        assert_eq!(
            auth.caller(&shown(None, Some("billing"))).unwrap(),
            principal("billing", Role::Admin)
        );
        assert_eq!(
            auth.caller(&shown(None, Some("shop"))).unwrap(),
            principal("alice", Role::User)
        );
        // A token, when sent, names the caller; a bad one is refused whatever the certificate.
        assert_eq!(
            auth.caller(&shown(Some("Bearer alice-token"), Some("billing")))
                .unwrap(),
            principal("alice", Role::User)
        );
        assert!(auth
            .caller(&shown(Some("Bearer nope"), Some("billing")))
            .is_err());
        for name in [Some("gone"), Some("stranger"), Some("Billing"), None] {
            let refused = auth.caller(&shown(None, name)).unwrap_err();
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{name:?}");
        }
        // Header mode knows callers by the header alone.
        assert!(Authenticator::header_mode()
            .caller(&shown(None, Some("billing")))
            .is_err());
        assert_eq!(
            check_tokens(&file),
            Ok(Counts {
                tokens: 1,
                certificates: 3
            })
        );
    }

    #[test]
    fn reload_swaps_tokens_and_keeps_them_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, entry_text("one", "alice", Role::User, None)).unwrap();
        let auth = Authenticator::new(AuthMode::Tokens, &path).unwrap();
        assert!(auth.authenticate(Some("Bearer one")).is_ok());
        std::fs::write(&path, entry_text("two", "alice", Role::User, None)).unwrap();
        assert_eq!(auth.reload().unwrap().tokens, 1);
        assert!(auth.authenticate(Some("Bearer one")).is_err());
        assert!(auth.authenticate(Some("Bearer two")).is_ok());
        std::fs::write(&path, "[[token]]\nuser = 3\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authenticate(Some("Bearer two")).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authenticate(Some("Bearer two")).is_ok());
        let missing = Authenticator::new(AuthMode::Tokens, &dir.path().join("none"));
        assert_eq!(
            missing.err().map(|error| error.key),
            Some("auth.tokens_file".into())
        );
    }
}
