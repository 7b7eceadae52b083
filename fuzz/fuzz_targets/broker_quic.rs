//! Fuzz target `broker_quic`: see `mqtt_fuzz::broker_quic`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::broker_quic(data));
