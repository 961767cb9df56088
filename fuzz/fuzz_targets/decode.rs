#![no_main]
//! `cargo fuzz run decode`: see coalesce_fuzz::decode.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coalesce_fuzz::decode::run(data));
