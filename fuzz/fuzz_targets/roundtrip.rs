//! Fuzz target `roundtrip`: see `mqtt_fuzz::checks`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::roundtrip_input(data));
