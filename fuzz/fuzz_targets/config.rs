//! Any config text: a config or an error naming the place, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = meshd_config::Config::parse(text, "fuzz.toml");
    }
});
