//! The crypto provider of every TLS connection a node makes or takes: the API over https, https
//! steps and webhooks, Redis over TLS.

/// rustls's `ring` provider: TLS 1.2 and 1.3 with key exchange over X25519, P-256 and P-384.
/// rustls deprecates it (from 0.23.48) as it offers no post-quantum key exchange, which only
/// rustls's aws-lc-rs provider has; that one is a second C crypto library to build into the
/// static binary, beside the `ring` the gossip's sealing uses already. One place, so that
/// changing it is one change.
#[allow(deprecated)]
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
