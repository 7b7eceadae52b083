//! Fuzz target `broker_store`: see `mqtt_fuzz::broker_store`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::broker_store(data));
