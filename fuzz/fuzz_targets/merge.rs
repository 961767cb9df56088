#![no_main]
//! `cargo fuzz run merge`: see coalesce_fuzz::merge.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coalesce_fuzz::merge::run(data));
