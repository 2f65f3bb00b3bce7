//! RFC 3339 times as the API writes them.

use chrono::{DateTime, FixedOffset, NaiveDate};
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
    utc_text(text)
}

/// The time `text` gives, if it is RFC 3339 in UTC.
pub fn utc_text(text: &str) -> Result<DateTime<FixedOffset>, String> {
    if let Some(time) = api_form(text) {
        return Ok(time);
    }
    let time = DateTime::parse_from_rfc3339(text)
        .map_err(|error| format!("{text:?} is not RFC 3339: {error}"))?;
    if time.offset().local_minus_utc() != 0 {
        return Err(format!("{text:?} is not UTC"));
    }
    Ok(time)
}

/// A time in the form the API writes, `2026-11-26T05:21:00.741673Z` (up to nine digits of
/// fraction, or none), read at a fraction of the cost of chrono's general parser; `None` for any
/// other form (and for a leap second), which chrono's parser then reads.
fn api_form(text: &str) -> Option<DateTime<FixedOffset>> {
    let bytes = text.as_bytes();
    let digit = |at: usize| -> Option<u32> {
        let byte = *bytes.get(at)?;
        byte.is_ascii_digit().then(|| u32::from(byte - b'0'))
    };
    let two = |at: usize| Some(digit(at)? * 10 + digit(at + 1)?);
    let separated = bytes.len() >= 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
        && bytes[16] == b':';
    if !separated {
        return None;
    }
    let year = two(0)? * 100 + two(2)?;
    let (month, day, hour, minute, second) = (two(5)?, two(8)?, two(11)?, two(14)?, two(17)?);
    let mut nanos = 0;
    let mut at = 19;
    if bytes[at] == b'.' {
        at += 1;
        let mut scale = 1_000_000_000;
        while let Some(value) = digit(at) {
            scale /= 10;
            if scale == 0 {
                return None;
            }
            nanos += value * scale;
            at += 1;
        }
        if at == 20 {
            return None;
        }
    }
    if at + 1 != bytes.len() || bytes[at] != b'Z' || second > 59 {
        return None;
    }
    let naive = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?
        .and_hms_nano_opt(hour, minute, second, nanos)?;
    Some(DateTime::from_naive_utc_and_offset(
        naive,
        FixedOffset::east_opt(0)?,
    ))
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

    #[test]
    fn the_api_form_reads_as_chrono_reads_it_and_leaves_every_other_form_to_chrono() {
        let chrono = |text: &str| DateTime::parse_from_rfc3339(text).ok();
        for fraction in ["", ".5", ".741673", ".000000001", ".123456789"] {
            let text = format!("2026-11-26T05:21:00{fraction}Z");
            assert!(api_form(&text).is_some(), "{text}");
            assert_eq!(api_form(&text), chrono(&text), "{text}");
        }
        // Every character of a few times swapped for each of a set: where the fast reading
        // reads a time, it is chrono's.
        let bases = [
            "2026-11-26T05:21:00.741673Z",
            "2024-02-29T23:59:59Z",
            "0000-01-01T00:00:00.1234567891Z",
        ];
        let swaps = b"0123456789-:.TtZz +x";
        let mut read = 0;
        for base in bases {
            for at in 0..base.len() {
                for &swap in swaps {
                    let mut bytes = base.as_bytes().to_vec();
                    bytes[at] = swap;
                    let text = String::from_utf8(bytes).unwrap();
                    if let Some(time) = api_form(&text) {
                        read += 1;
                        assert_eq!(Some(time), chrono(&text), "{text}");
                    }
                }
            }
        }
        assert!(read > 200, "{read}");
        for other in [
            "2026-02-30T00:00:00Z",
            "2026-11-26T24:00:00Z",
            "2026-11-26T05:21:60Z",
            "2026-11-26T05:21:00.Z",
            "2026-11-26T05:21:00+00:00",
            "2026-11-26t05:21:00z",
            "2026-11-26T05:21:00.1234567890Z",
        ] {
            assert_eq!(api_form(other), None, "{other}");
        }
        assert!(utc(&serde_json::json!("2026-11-26T05:21:00+00:00")).is_ok());
        assert!(utc(&serde_json::json!("2026-11-26T05:21:60Z")).is_ok());
    }
}
