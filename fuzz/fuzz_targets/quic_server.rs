//! Fuzz target `quic_server`: see `mqtt_fuzz::quic_server`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::quic_server(data));
