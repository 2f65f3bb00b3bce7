//! Property tests of request parsing: whatever a client sends (header values, query strings,
//! bodies) the parsers answer with a value or an error, never a panic, and the cheap nesting
//! scan agrees with the parsed value's depth.

use super::auth::{Authenticator, Role};
use super::limits::{depth, nests_deeper_than};
use super::orders::{parse_list_query, parse_wait};
use crate::config::{AuthMode, Config};
use proptest::prelude::*;
use std::collections::HashMap;
use warp::http::StatusCode;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[\\[\\]{}\"\\\\a-z ]{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(12, 64, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z\\[{\"]{0,4}", inner, 0..4)
                .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

fn query() -> impl Strategy<Value = HashMap<String, String>> {
    let key = prop_oneof![
        Just("limit".to_string()),
        Just("cursor".to_string()),
        Just("current_step".to_string()),
        Just("rollback_state".to_string()),
        Just("user".to_string()),
        Just("wait".to_string()),
        "[a-z_]{0,8}",
    ];
    let value = prop_oneof![
        "[0-9]{0,4}",
        "[0-9a-f-]{0,60}",
        "[0-9]{1,3}(ms|s|m|h)",
        Just("Processing".to_string()),
        Just("incomplete".to_string()),
        any::<String>(),
    ];
    prop::collection::hash_map(key, value, 0..5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn nesting_scan_agrees_with_the_parsed_depth(value in json_value(), max in 0usize..14) {
        let text = serde_json::to_vec(&value).unwrap();
        prop_assert_eq!(nests_deeper_than(&text, max), depth(&value) > max);
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        prop_assert_eq!(nests_deeper_than(&pretty, max), depth(&value) > max);
    }

    #[test]
    fn bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), max in 0usize..40) {
        let deep = nests_deeper_than(&bytes, max);
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            // Valid JSON: the scan is exact.
            prop_assert_eq!(deep, depth(&value) > max);
        }
    }

    #[test]
    fn queries_never_panic(params in query()) {
        let _ = parse_list_query(&params);
        if let Ok(Some(wait)) = parse_wait(&params) {
            prop_assert!(wait <= std::time::Duration::from_secs(60));
        }
    }

    #[test]
    fn authorization_headers_never_panic_and_unknown_tokens_are_401(header in any::<Option<String>>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, super::auth::entry_text("known-token", "alice", Role::User, None)).unwrap();
        let tokens = Authenticator::new(AuthMode::Tokens, &path).unwrap();
        match tokens.authenticate(header.as_deref()) {
            Ok(principal) => prop_assert_eq!(principal.user, "alice"),
            Err(error) => prop_assert_eq!(error.status, StatusCode::UNAUTHORIZED),
        }
        let _ = Authenticator::header_mode().authenticate(header.as_deref());
    }

    #[test]
    fn config_text_never_panics(text in any::<String>()) {
        if let Ok(config) = Config::from_toml(&text) {
            let _ = config.validate();
        }
    }

    #[test]
    fn config_like_text_never_panics(text in "(\\[(server|limits|auth|pipeline|steps\\.Processing)\\]\n)?([a-z_]{1,12} = (\"[a-z0-9.:/ ]{0,12}\"|[0-9.-]{1,6}|true|\\[\\])\n){0,4}") {
        if let Ok(config) = Config::from_toml(&text) {
            let _ = config.validate();
        }
    }
}
