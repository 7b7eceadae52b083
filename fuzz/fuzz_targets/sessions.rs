//! Fuzz target `sessions`: see `mqtt_fuzz::sessions`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::sessions(data));
