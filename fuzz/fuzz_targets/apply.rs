#![no_main]
//! `cargo fuzz run apply`: see coalesce_fuzz::apply.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coalesce_fuzz::apply::run(data));
