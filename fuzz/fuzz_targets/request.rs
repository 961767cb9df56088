#![no_main]
//! `cargo fuzz run request`: see coalesce_fuzz::request.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coalesce_fuzz::request::run(data));
