#![no_main]
libfuzzer_sys::fuzz_target!(|input: (bool, Vec<u8>, Vec<u8>)| {
    let (v5, cuts, data) = input;
    let protocol = if v5 { mqtt_proto::Protocol::V5 } else { mqtt_proto::Protocol::V3_1_1 };
    mqtt_fuzz::decode_fragmented(protocol, &cuts, &data);
});
