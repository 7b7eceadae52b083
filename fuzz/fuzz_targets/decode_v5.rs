#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt_fuzz::decode_stream(mqtt_proto::Protocol::V5, data));
