//! Any text as a configuration file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapcount_daemon::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, "fuzz.toml");
    }
});
