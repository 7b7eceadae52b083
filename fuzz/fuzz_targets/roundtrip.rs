#![no_main]
libfuzzer_sys::fuzz_target!(|input: (mqtt_proto::Protocol, mqtt_proto::Packet)| {
    mqtt_fuzz::roundtrip(input.0, &input.1);
});
