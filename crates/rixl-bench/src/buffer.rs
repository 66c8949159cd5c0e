//! The benchmark's memory: one heap buffer per side, aligned for O_DIRECT.
//!
//! The initiator's buffer and the target's (in-process for LOOPBACK, in the target process for
//! SHM and TCP) are both of this type, so that the same slot arithmetic ([`crate::layout`])
//! addresses either, and so that POSIX runs with `--storage_enable_direct` can transfer from and
//! to it.

/// A heap buffer whose usable part starts on a 4096-byte boundary (O_DIRECT needs it).
#[derive(Debug)]
pub struct Buffer {
    data: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buffer {
    pub fn new(len: usize, fill: u8) -> Buffer {
        let data = vec![fill; len + 4096];
        let off = (4096 - data.as_ptr() as usize % 4096) % 4096;
        Buffer { data, off, len }
    }
    pub fn addr(&self) -> u64 {
        self.data[self.off..].as_ptr() as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.off..self.off + self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.off..self.off + self.len]
    }
}
