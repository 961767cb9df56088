#![no_main]
//! `cargo fuzz run streams_config`: see coalesce_fuzz::config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coalesce_fuzz::config::run(data));
