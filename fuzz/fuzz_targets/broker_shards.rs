//! Fuzz target `broker_shards`: see `mqtt_fuzz::broker_shards`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::broker_shards(data));
