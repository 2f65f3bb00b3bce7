//! How a node reaches its Redis and proves who it is: the URL (`redis://` or `rediss://` for
//! TLS), the sentinels or the nodes of a Redis Cluster (over TLS with `database.tls`), an ACL
//! user and password (in the URL, or `database.username` and `database.password_file`), and the
//! TLS files of `[database]` (`ca_file`, `client_cert`, `client_key`). The files are read once, at start; a file that
//! cannot be read or holds no PEM of the right kind is a [`ConfigError`] naming its key.
//!
//! TLS is rustls (with the `ring` provider) as redis-rs's `tokio-rustls-comp` feature builds it:
//! without `ca_file` the server's certificate is checked against the platform's roots
//! (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`), read on each connect.
//!
//! No password reaches a message: URLs are shown with their user information masked
//! ([`redacted`]), and redis-rs's own errors name no password.

use crate::config::{ConfigError, DatabaseConfig};
use deadpool_redis::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use deadpool_redis::redis::{
    Client, ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    RedisConnectionInfo, TlsCertificates, TlsMode,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// `url` with everything before the last `@` of its authority (user and password) replaced by
/// `***`, so that it can be shown in a message.
pub fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_string(),
        },
    }
}

/// Parses a Redis URL; the error names `key` and shows the URL masked.
pub fn parse_url(key: &str, url: &str) -> Result<ConnectionInfo, ConfigError> {
    url.into_connection_info().map_err(|error| {
        ConfigError::new(
            key,
            format!("`{}` is not a redis URL: {error}", redacted(url)),
        )
    })
}

/// True when the URL asks for TLS.
pub fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

/// Reads a file named by a config key.
fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|error| ConfigError::new(key, format!("cannot read {}: {error}", path.display())))
}

/// The password in `database.password_file`, without its trailing line break.
fn read_password(path: &Path) -> Result<String, ConfigError> {
    let key = "database.password_file";
    let bytes = read(key, path)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| ConfigError::new(key, format!("{} is not UTF-8 text", path.display())))?;
    let password = text
        .strip_suffix('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(password.to_string())
}

/// The TLS files of `database`, read and checked to hold what their key says.
fn certificates(database: &DatabaseConfig) -> Result<TlsCertificates, ConfigError> {
    let certificate_pem = |key: &str, path: &Path| {
        let pem = read(key, path)?;
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| {
                ConfigError::new(key, format!("{}: bad PEM: {error}", path.display()))
            })?;
        if certificates.is_empty() {
            return Err(ConfigError::new(
                key,
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        Ok(pem)
    };
    let root_cert = match database.ca_file.as_os_str().is_empty() {
        true => None,
        false => Some(certificate_pem("database.ca_file", &database.ca_file)?),
    };
    let client_tls = match database.client_cert.as_os_str().is_empty() {
        true => None,
        false => {
            let client_cert = certificate_pem("database.client_cert", &database.client_cert)?;
            let key = "database.client_key";
            let client_key = read(key, &database.client_key)?;
            PrivateKeyDer::from_pem_slice(&client_key).map_err(|error| {
                ConfigError::new(
                    key,
                    format!(
                        "{} holds no PEM private key: {error}",
                        database.client_key.display()
                    ),
                )
            })?;
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// The ACL user and password of `database` added to `settings`: `database.username` and the
/// password in `database.password_file`, when set.
fn with_credentials(
    mut settings: RedisConnectionInfo,
    database: &DatabaseConfig,
) -> Result<RedisConnectionInfo, ConfigError> {
    if !database.password_file.as_os_str().is_empty() {
        settings = settings.set_password(read_password(&database.password_file)?);
    }
    if !database.username.is_empty() {
        settings = settings.set_username(&database.username);
    }
    Ok(settings)
}

/// Makes rustls use `ring`. rustls would pick it on its own as the only provider compiled in,
/// but a second one brought in by another crate would make that a panic at the first connect.
fn install_crypto_provider() {
    // An error only says a provider is installed already, which is as good.
    let _ = crate::crypto::provider().install_default();
}

/// Refuses `SSL_CERT_FILE` or `SSL_CERT_DIR` naming a path that is not there: redis-rs reads
/// the platform's roots on every TLS connect, even with `ca_file`, and fails the connect when
/// either names a missing path (a container or chroot that inherited them, say).
fn check_root_variables() -> Result<(), ConfigError> {
    for variable in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
        if let Some(path) = std::env::var_os(variable) {
            let path = Path::new(&path);
            if !path.exists() {
                return Err(ConfigError::new(
                    variable,
                    format!(
                        "{} does not exist, and every TLS connect to redis would fail reading it: \
                         unset {variable} or point it at the system's certificates",
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Where and how to connect to the one Redis of `database.url`: its address, TLS with the
/// configured files, and the ACL user and password.
pub fn direct(database: &DatabaseConfig) -> Result<ConnectionInfo, ConfigError> {
    let info = parse_url("database.url", &database.url)?;
    let settings = with_credentials(info.redis_settings().clone(), database)?;
    let info = info.set_redis_settings(settings);
    if !is_tls(&info) {
        return Ok(info);
    }
    check_root_variables()?;
    install_crypto_provider();
    let client = Client::build_with_tls(info, certificates(database)?).map_err(|error| {
        ConfigError::new(
            "database.url",
            format!(
                "cannot set up TLS for `{}`: {error}",
                redacted(&database.url)
            ),
        )
    })?;
    Ok(client.get_connection_info().clone())
}

/// How a node reaches every node of a Redis Cluster.
#[derive(Default)]
pub struct ClusterAccess {
    /// The ACL user and password it logs in with.
    pub login: RedisConnectionInfo,
    /// What it trusts and shows over TLS; `None` without TLS.
    pub tls: Option<TlsCertificates>,
}

/// How to reach every node of a Redis Cluster: logging in as `database.username` with the
/// password in `database.password_file`, and with `database.tls` over TLS, trusting `ca_file`
/// and showing `client_cert`.
pub fn cluster(database: &DatabaseConfig) -> Result<ClusterAccess, ConfigError> {
    let login = with_credentials(RedisConnectionInfo::default(), database)?;
    if !database.tls {
        return Ok(ClusterAccess { login, tls: None });
    }
    check_root_variables()?;
    install_crypto_provider();
    Ok(ClusterAccess {
        login,
        tls: Some(certificates(database)?),
    })
}

/// A client for the primary the sentinels of `database` name for `master_name`, logging in to it
/// as `database.username` with the password in `database.password_file` (the sentinels are asked
/// without one). With `database.tls` both the sentinels and the primary are reached over TLS,
/// trusting `ca_file` and showing `client_cert`, as a `rediss://` URL would.
pub fn sentinel(database: &DatabaseConfig) -> Result<SentinelClient, ConfigError> {
    let key = "database.sentinels";
    let scheme = if database.tls { "rediss" } else { "redis" };
    let addresses = database
        .sentinels
        .iter()
        .map(|address| {
            Ok(parse_url(key, &format!("{scheme}://{address}"))?
                .addr()
                .clone())
        })
        .collect::<Result<Vec<ConnectionAddr>, ConfigError>>()?;
    let mut builder =
        SentinelClientBuilder::new(addresses, &database.master_name, SentinelServerType::Master)
            .map_err(|error| ConfigError::new(key, error.to_string()))?;
    if !database.password_file.as_os_str().is_empty() {
        builder = builder.set_client_to_redis_password(read_password(&database.password_file)?);
    }
    if !database.username.is_empty() {
        builder = builder.set_client_to_redis_username(&database.username);
    }
    if database.tls {
        check_root_variables()?;
        install_crypto_provider();
        let certificates = certificates(database)?;
        builder = builder
            .set_client_to_sentinel_certificates(certificates.clone())
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_redis_certificates(certificates);
    }
    builder
        .build()
        .map_err(|error| ConfigError::new(key, format!("cannot set up the sentinels: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_show_no_credentials() {
        assert_eq!(
            redacted("redis://app:s3cret@10.0.0.2:6379/0"),
            "redis://***@10.0.0.2:6379/0"
        );
        assert_eq!(redacted("rediss://:p@ss@host:1"), "rediss://***@host:1");
        assert_eq!(redacted("redis://host:1"), "redis://host:1");
        assert_eq!(redacted("app:s3cret@host"), "***@host");
    }

    #[test]
    fn a_bad_url_error_shows_no_password() {
        for url in [
            "redis://app:s3cret@host:notaport",
            "redis://app:s3cret@",
            "rediss://app:s3cret@[::1",
        ] {
            let error = parse_url("database.url", url).unwrap_err();
            assert_eq!(error.key, "database.url");
            assert!(!error.to_string().contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn url_credentials_and_tls_are_parsed() {
        let info = parse_url("database.url", "rediss://app:s3cret@127.0.0.1:6380").unwrap();
        assert!(is_tls(&info));
        assert_eq!(info.redis_settings().username(), Some("app"));
        assert_eq!(info.redis_settings().password(), Some("s3cret"));
        let plain = parse_url("database.url", "redis://127.0.0.1:6379").unwrap();
        assert!(!is_tls(&plain));
        assert_eq!(plain.redis_settings().password(), None);
    }

    #[test]
    fn the_password_file_loses_its_trailing_line_break_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        for (text, password) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("s3cret", "s3cret"),
            (" s3 cret \n", " s3 cret "),
        ] {
            std::fs::write(&path, text).unwrap();
            assert_eq!(read_password(&path).unwrap(), password, "{text:?}");
        }
        std::fs::write(&path, "\n").unwrap();
        assert!(read_password(&path).unwrap_err().problem.contains("empty"));
        let missing = read_password(&dir.path().join("nothing")).unwrap_err();
        assert_eq!(missing.key, "database.password_file");
    }
}
