//! Metadata-listener frames on arbitrary bytes, with and without a shared secret.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rixl::listener::read_frame;

fuzz_target!(|data: &[u8]| {
    let _ = read_frame(&mut &data[..], None);
    let _ = read_frame(&mut &data[..], Some(b"secret"));
});
