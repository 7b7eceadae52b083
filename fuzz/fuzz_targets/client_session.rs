//! Fuzz target `client_session`: see `mqtt_fuzz::client_session`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::client_session(data));
