//! A skewed wall clock for one node: libfaketime preloaded into the node's process with a fixed
//! offset (`FAKETIME="+20s"`). Only the wall clock moves; the monotonic clock, which timers and
//! timeouts use, is left alone, as a clock step by NTP or an operator would leave it.

use std::path::PathBuf;

/// Where Debian's `faketime` package puts the library (the multithreaded build).
const CANDIDATES: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
];

/// The libfaketime library, if installed.
pub fn libfaketime() -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

/// The environment that runs a process with its wall clock `offset_secs` ahead (or behind, when
/// negative).
pub fn skewed(library: &std::path::Path, offset_secs: i64) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), library.display().to_string()),
        ("FAKETIME".into(), format!("{offset_secs:+}s")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
    ]
}

/// How a node's log says, after a launch marker, that its clock runs off by an offset
/// (`==== clock +20s ====`).
pub const MARKER: &str = "==== clock ";

/// The offset, in seconds, of the clock that `env` ([`skewed`]) gives a process, if any.
pub fn offset(env: &[(String, String)]) -> Option<i64> {
    env.iter()
        .find(|(name, _)| name == "FAKETIME")
        .and_then(|(_, value)| value.trim_end_matches('s').parse().ok())
}

/// The offset a log line written by [`MARKER`] gives.
pub fn marked_offset(line: &str) -> Option<i64> {
    line.strip_prefix(MARKER)?
        .strip_suffix("s ====")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_given_is_the_offset_read_back() {
        for seconds in [-30, -5, 7, 30] {
            let env = skewed(std::path::Path::new("/lib/x.so"), seconds);
            assert_eq!(offset(&env), Some(seconds));
            let line = format!("{MARKER}{seconds:+}s ====");
            assert_eq!(marked_offset(&line), Some(seconds));
        }
        assert_eq!(offset(&[]), None);
        assert_eq!(marked_offset("==== launch 2 ===="), None);
    }
}
