//! mqttq (being written).
fn main() {}
