//! Bounds-checked little-endian primitives shared by every RIXL wire format.
//!
//! Everything a peer sends is untrusted. [`Reader`] never indexes past its input, never
//! allocates more than the input could possibly describe, and reports every problem as
//! [`ErrorKind::Mismatch`](crate::ErrorKind::Mismatch) with the offset where decoding stopped.
//! Integers are LEB128 varints (small numbers such as lengths, device ids and address deltas take
//! one or two bytes, which is how a published registration stays within a few bytes).

use crate::error::{Error, Result};

/// Appends encoded values to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Writer {
        Writer::default()
    }

    /// A writer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }

    /// Raw bytes, no length prefix.
    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// A LEB128 varint.
    pub fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    /// A signed value, zigzag-encoded as a varint.
    pub fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    /// A varint length followed by the bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.raw(b);
    }

    /// A UTF-8 string, as [`Writer::bytes`].
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads values written by [`Writer`] from untrusted input.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; `what` names the format in error messages ("metadata blob").
    pub fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, pos: 0, what }
    }

    /// An error at the current position.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::mismatch(format!(
            "malformed {} at byte {}: {msg}",
            self.what, self.pos
        ))
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.error(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }

    /// `n` raw bytes.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "needs {n} bytes, only {} left (truncated?)",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.raw(1)?[0])
    }

    /// A LEB128 varint of at most 10 bytes that fits in 64 bits.
    pub fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(self.error("varint overflows 64 bits"));
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.error("varint longer than 10 bytes"))
    }

    /// A zigzag-encoded signed varint.
    pub fn zigzag(&mut self) -> Result<i64> {
        let u = self.varint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    /// A count of items that each take at least `min_item_bytes`; refuses counts the remaining
    /// input cannot hold, so a forged count never causes a huge allocation.
    pub fn count(&mut self, min_item_bytes: usize) -> Result<usize> {
        let n = self.varint()?;
        let max = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > max {
            return Err(self.error(format!(
                "claims {n} items but only {} bytes remain",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    /// Length-prefixed bytes of at most `limit` bytes.
    pub fn bytes(&mut self, limit: usize) -> Result<&'a [u8]> {
        let n = self.varint()?;
        if n > limit as u64 {
            return Err(self.error(format!("field of {n} bytes exceeds the limit of {limit}")));
        }
        self.raw(n as usize)
    }

    /// A length-prefixed UTF-8 string of at most `limit` bytes.
    pub fn str(&mut self, limit: usize) -> Result<&'a str> {
        let b = self.bytes(limit)?;
        std::str::from_utf8(b).map_err(|_| self.error("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varints_round_trip(v: u64, s: i64) {
            let mut w = Writer::new();
            w.varint(v);
            w.zigzag(s);
            let b = w.finish();
            let mut r = Reader::new(&b, "test");
            prop_assert_eq!(r.varint().unwrap(), v);
            prop_assert_eq!(r.zigzag().unwrap(), s);
            prop_assert!(r.finish().is_ok());
        }
    }

    #[test]
    fn rejects_overlong_and_truncated() {
        let mut r = Reader::new(&[0xff; 11], "test");
        assert!(r.varint().is_err());
        let mut r = Reader::new(
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            "t",
        );
        assert!(r.varint().is_err());
        let mut r = Reader::new(&[0x80], "test");
        assert!(r.varint().is_err());
        let mut r = Reader::new(&[5, 1, 2], "test");
        let e = r.bytes(100).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Mismatch);
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut r = Reader::new(&[0xff, 0xff, 0x03], "test");
        assert!(r.count(1).is_err());
    }
}
