#![no_main]
//! `cargo fuzz run snapshot`: see coalesce_fuzz::snapshot.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coalesce_fuzz::snapshot::run(data));
