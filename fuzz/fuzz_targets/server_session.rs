//! Fuzz target `server_session`: see `mqtt_fuzz::server_session`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::server_session(data));
