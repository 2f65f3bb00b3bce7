//! RFC 3339 times as the API writes them.

use chrono::{DateTime, FixedOffset};
use serde_json::Value;

/// The time in a JSON string, if it is one in RFC 3339.
pub fn rfc3339(value: &Value) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(value.as_str()?).ok()
}

/// The time in a JSON string, if it is RFC 3339 in UTC (the only zone the API writes).
pub fn utc(value: &Value) -> Result<DateTime<FixedOffset>, String> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("expected an RFC 3339 string, got {value}"))?;
    let time = DateTime::parse_from_rfc3339(text)
        .map_err(|error| format!("{text:?} is not RFC 3339: {error}"))?;
    if time.offset().local_minus_utc() != 0 {
        return Err(format!("{text:?} is not UTC"));
    }
    Ok(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_and_refuses_the_rest() {
        let at = serde_json::json!("2026-11-26T05:21:00.741673Z");
        assert!(rfc3339(&at).is_some());
        assert!(utc(&at).is_ok());
        assert!(utc(&serde_json::json!("2026-11-26T05:21:00+01:00")).is_err());
        assert!(utc(&serde_json::json!("yesterday")).is_err());
        assert!(rfc3339(&serde_json::json!(12)).is_none());
    }
}
