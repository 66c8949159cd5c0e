//! TCP backend wire formats on arbitrary bytes: frame headers, hellos and connection infos
//! never panic, and a header that parses re-encodes to the same bytes' meaning.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rixl_tcp::wire::{ConnInfo, Header, Hello, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.get(..HEADER_LEN) {
        let head: &[u8; HEADER_LEN] = head.try_into().expect("length checked");
        if let Ok(h) = Header::parse(head) {
            let again = Header::parse(&h.encode()).expect("re-encoded header parses");
            assert_eq!(again.encode(), h.encode());
        }
    }
    let _ = Hello::decode(data);
    let _ = ConnInfo::decode(data);
});
