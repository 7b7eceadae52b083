//! Fuzz target `decode_v5`: see `mqtt_fuzz::checks`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::decode_v5(data));
