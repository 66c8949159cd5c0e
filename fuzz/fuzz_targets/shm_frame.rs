//! SHM control-socket frames on arbitrary bytes: parsing a stream of frames never panics and
//! never reads past the buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rixl_shm::wire::parse;

fuzz_target!(|data: &[u8]| {
    let mut off = 0;
    while let Ok(Some((_, start, stop))) = parse(&data[off..]) {
        assert!(start <= stop && off + stop <= data.len());
        off += stop;
    }
});
