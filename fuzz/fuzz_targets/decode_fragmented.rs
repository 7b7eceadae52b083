//! Fuzz target `decode_fragmented`: see `mqtt_fuzz::checks`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::fragmented(data));
