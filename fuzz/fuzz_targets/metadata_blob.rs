//! The metadata codec on arbitrary bytes: never panics, and whatever decodes re-encodes to a
//! blob that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rixl_core::AgentMetadata;

fuzz_target!(|data: &[u8]| {
    if let Ok(md) = AgentMetadata::decode(data) {
        let again = AgentMetadata::decode(&md.encode()).expect("re-encoded blob decodes");
        assert_eq!(again, md);
    }
});
