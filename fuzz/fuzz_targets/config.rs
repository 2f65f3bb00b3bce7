//! Config files and tokens files: any text gives a value or an error naming the problem, never
//! a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use order_process::api::auth::check_tokens;
use order_process::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        let _ = config.validate();
    }
    let _ = check_tokens(text);
});
