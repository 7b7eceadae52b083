//! Fuzz target `broker`: see `mqtt_fuzz::broker`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::broker(data));
