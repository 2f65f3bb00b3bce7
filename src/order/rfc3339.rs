//! RFC 3339 text of the times in orders, written into a buffer on the stack instead of through
//! `fmt`: every commit of an order writes a dozen of them. The text is exactly chrono's, so stored
//! orders and answers read the same as before: [`serialize`] writes what chrono's own `Serialize`
//! does (a fraction of 0, 3, 6 or 9 digits, as the time needs), [`micros`] what
//! `to_rfc3339_opts(SecondsFormat::Micros, true)` does. Years outside 0–9999 are left to chrono.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::{Serialize, Serializer};

/// The longest text written: `9999-12-31T23:59:60.999999999Z`.
const LONGEST: usize = 30;

/// How many digits of the second's fraction are written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fraction {
    /// None, 3, 6 or 9: as few as show the time exactly (chrono's `SecondsFormat::AutoSi`).
    Shortest,
    /// Always 6.
    Micros,
}

/// Each number below 100 as its two decimal digits.
const PAIRS: [[u8; 2]; 100] = {
    let mut pairs = [[0; 2]; 100];
    let mut number = 0;
    while number < 100 {
        pairs[number] = [b'0' + (number / 10) as u8, b'0' + (number % 10) as u8];
        number += 1;
    }
    pairs
};

/// `value`'s last two decimal digits.
fn two(value: u32) -> [u8; 2] {
    PAIRS[(value % 100) as usize]
}

/// The length of `YYYY-MM-DDTHH:MM:SS`, which every text starts with.
const HEAD: usize = 19;

/// Text being written into a fixed buffer.
struct Text {
    bytes: [u8; LONGEST],
    len: usize,
}

impl Text {
    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    /// `value`'s last two decimal digits.
    fn two(&mut self, value: u32) {
        let [tens, ones] = two(value);
        self.push(tens);
        self.push(ones);
    }

    fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(self.bytes.get(..self.len)?).ok()
    }
}

/// The text of `time`, or `None` for a year outside 0–9999 (chrono writes those with a sign).
/// Its parts are read from the naive UTC date and time once: each of `DateTime`'s own accessors
/// (`year()`, `hour()`, …) works out the local date and time again. The digits come two at a
/// time from a table: a dozen times are written at every commit of an order.
fn write(time: &DateTime<Utc>, fraction: Fraction) -> Option<Text> {
    let naive = time.naive_utc();
    let date = naive.date();
    let year = u32::try_from(date.year())
        .ok()
        .filter(|year| *year <= 9999)?;
    let seconds = naive.time().num_seconds_from_midnight();
    let mut second = seconds % 60;
    let mut nano = naive.time().nanosecond();
    // A leap second is kept as a nanosecond count past 1e9, and written as second 60.
    if nano >= 1_000_000_000 {
        second += 1;
        nano -= 1_000_000_000;
    }
    let ([y0, y1], [y2, y3]) = (two(year / 100), two(year));
    let ([mo0, mo1], [d0, d1]) = (two(date.month()), two(date.day()));
    let ([h0, h1], [mi0, mi1], [s0, s1]) =
        (two(seconds / 3600), two(seconds / 60 % 60), two(second));
    let head: [u8; HEAD] = [
        y0, y1, y2, y3, b'-', mo0, mo1, b'-', d0, d1, b'T', h0, h1, b':', mi0, mi1, b':', s0, s1,
    ];
    let mut text = Text {
        bytes: [0; LONGEST],
        len: HEAD,
    };
    text.bytes[..HEAD].copy_from_slice(&head);
    let micros = |text: &mut Text, micro: u32| {
        text.push(b'.');
        text.two(micro / 10_000);
        text.two(micro / 100);
        text.two(micro);
    };
    match fraction {
        Fraction::Micros => micros(&mut text, nano / 1_000),
        Fraction::Shortest if nano == 0 => {}
        Fraction::Shortest if nano.is_multiple_of(1_000_000) => {
            let milli = nano / 1_000_000;
            text.push(b'.');
            text.push(b'0' + (milli / 100) as u8);
            text.two(milli);
        }
        Fraction::Shortest if nano.is_multiple_of(1_000) => micros(&mut text, nano / 1_000),
        Fraction::Shortest => {
            text.push(b'.');
            text.push(b'0' + (nano / 100_000_000) as u8);
            text.two(nano / 1_000_000);
            text.two(nano / 10_000);
            text.two(nano / 100);
            text.two(nano);
        }
    }
    text.push(b'Z');
    Some(text)
}

/// `time` as chrono's `Serialize` writes it.
pub fn serialize<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    match write(time, Fraction::Shortest) {
        Some(text) => match text.as_str() {
            Some(text) => serializer.serialize_str(text),
            None => time.serialize(serializer),
        },
        None => time.serialize(serializer),
    }
}

/// `time` as [`serialize`] (`Shortest`) or [`micros`] (`Micros`) writes it into JSON (quoted),
/// at the end of `out`.
pub fn write_json(
    out: &mut Vec<u8>,
    time: &DateTime<Utc>,
    fraction: Fraction,
) -> Result<(), serde_json::Error> {
    match write(time, fraction) {
        Some(text) => {
            out.push(b'"');
            out.extend_from_slice(text.bytes.get(..text.len).unwrap_or_default());
            out.push(b'"');
            Ok(())
        }
        None => match fraction {
            Fraction::Shortest => serialize(time, &mut serde_json::Serializer::new(out)),
            Fraction::Micros => micros(time, &mut serde_json::Serializer::new(out)),
        },
    }
}

/// An optional time as serde writes an `Option` of one, the time as [`serialize`] does.
pub fn option<S: Serializer>(
    time: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => serializer.serialize_some(&Shortest(time)),
        None => serializer.serialize_none(),
    }
}

/// A time that serializes as [`serialize`] writes it.
struct Shortest<'a>(&'a DateTime<Utc>);

impl Serialize for Shortest<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize(self.0, serializer)
    }
}

/// `time` with microseconds, as `to_rfc3339_opts(SecondsFormat::Micros, true)` writes it.
pub fn micros<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    match write(time, Fraction::Micros) {
        Some(text) => match text.as_str() {
            Some(text) => serializer.serialize_str(text),
            None => serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::Micros, true)),
        },
        None => serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::Micros, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone};
    use proptest::prelude::*;

    fn chrono_json(time: &DateTime<Utc>) -> String {
        serde_json::to_string(time).unwrap()
    }

    fn ours(time: &DateTime<Utc>) -> String {
        let mut out = Vec::new();
        serialize(time, &mut serde_json::Serializer::new(&mut out)).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn ours_micros(time: &DateTime<Utc>) -> String {
        let mut out = Vec::new();
        micros(time, &mut serde_json::Serializer::new(&mut out)).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn written(time: &DateTime<Utc>, fraction: Fraction) -> String {
        let mut out = Vec::new();
        write_json(&mut out, time, fraction).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn chrono_micros(time: &DateTime<Utc>) -> String {
        format!("\"{}\"", time.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    #[test]
    fn writes_what_chrono_writes_for_every_fraction_and_the_edges() {
        let base = Utc.with_ymd_and_hms(2026, 12, 2, 3, 4, 5).unwrap();
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        let times = [
            base,
            base + chrono::Duration::milliseconds(7),
            base + chrono::Duration::microseconds(7),
            base + chrono::Duration::nanoseconds(7),
            base + chrono::Duration::nanoseconds(120_000_000),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap()
                + chrono::Duration::nanoseconds(999_999_999),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            leap,
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
        ];
        for time in times {
            assert_eq!(ours(&time), chrono_json(&time), "{time:?}");
            assert_eq!(ours_micros(&time), chrono_micros(&time), "{time:?}");
            assert_eq!(written(&time, Fraction::Shortest), chrono_json(&time));
            assert_eq!(written(&time, Fraction::Micros), chrono_micros(&time));
        }
    }

    proptest! {
        #[test]
        fn writes_what_chrono_writes(seconds in -62_167_219_200i64..253_402_300_800i64, nanos in 0u32..2_000_000_000u32, round in 0u8..3) {
            let nanos = match round {
                0 => nanos / 1_000_000 * 1_000_000,
                1 => nanos / 1_000 * 1_000,
                _ => nanos,
            };
            // A nanosecond count past 1e9 is a leap second, which chrono allows only at :59.
            if let Some(time) = DateTime::from_timestamp(seconds, nanos) {
                prop_assert_eq!(ours(&time), chrono_json(&time));
                prop_assert_eq!(ours_micros(&time), chrono_micros(&time));
                prop_assert_eq!(written(&time, Fraction::Shortest), chrono_json(&time));
                prop_assert_eq!(written(&time, Fraction::Micros), chrono_micros(&time));
                let option = Some(time);
                let mut out = Vec::new();
                super::option(&option, &mut serde_json::Serializer::new(&mut out)).unwrap();
                prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&option).unwrap());
            }
        }
    }
}
