#![no_main]
//! `cargo fuzz run peer`: see coalesce_fuzz::peer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coalesce_fuzz::peer::run(data));
