//! Any datagram at the listen port: dropped or handled, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshd_tunnel::{Device, PrivateKey};

fuzz_target!(|data: &[u8]| {
    let dev = Device::new(PrivateKey::from_bytes([7; 32]), 1);
    let table = dev.table();
    let mut out = vec![0u8; data.len().max(256)];
    let from = "198.18.0.9:51820".parse().unwrap();
    let _ = dev.decapsulate(&table, from, data, &mut out);
});
