//! Frames on the per-peer Unix socket: `[u32 LE payload length][u8 kind][payload]`.
//!
//! The socket only carries control traffic (who I am, the notification ring, notifications too
//! large for the ring, doorbells, goodbye); data never crosses it. Every frame from a peer is untrusted: lengths are bounded before anything is
//! allocated and unknown kinds end the connection.

use std::io::{self, Write};

/// Largest payload accepted (a notification is small; this bounds a hostile peer).
pub const MAX_PAYLOAD: usize = 16 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// First frame on a connection: the sender's agent name.
    Hello = 1,
    /// A notification from the connection's sender.
    Notif = 2,
    /// The sender closes on purpose (it dropped our metadata); not a failure.
    Bye = 3,
    /// Nothing but a wake-up: records wait in the notification ring.
    Doorbell = 4,
    /// After the hello: the sender's notification ring, `[u32 fd][u64 data bytes]` (LE), to
    /// open through `/proc/<sender pid>/fd/<fd>`.
    Ring = 5,
    /// The receiver's answer to `Ring` (the only frame that travels back): one byte, 1 if it
    /// mapped the ring, 0 if notifications must stay on the socket.
    RingAck = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Hello),
            2 => Some(Kind::Notif),
            3 => Some(Kind::Bye),
            4 => Some(Kind::Doorbell),
            5 => Some(Kind::Ring),
            6 => Some(Kind::RingAck),
            _ => None,
        }
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("payload of {} bytes exceeds {MAX_PAYLOAD}", payload.len()),
        ));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[4] = kind as u8;
    if payload.len() <= 256 {
        // One write: small notifications are the latency-critical case.
        let mut buf = [0u8; 261];
        buf[..5].copy_from_slice(&head);
        buf[5..5 + payload.len()].copy_from_slice(payload);
        w.write_all(&buf[..5 + payload.len()])
    } else {
        w.write_all(&head)?;
        w.write_all(payload)
    }
}

/// Parses the frame at the front of `buf`: `Ok(None)` if it is not complete yet, else its kind,
/// where its payload starts and where it ends.
pub fn parse(buf: &[u8]) -> io::Result<Option<(Kind, usize, usize)>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let kind = Kind::from_u8(buf[4]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", buf[4]),
        )
    })?;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame claims {len} bytes, more than {MAX_PAYLOAD}"),
        ));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    Ok(Some((kind, 5, 5 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Hello, b"agent").unwrap();
        write_frame(&mut v, Kind::Notif, &[7u8; 1000]).unwrap();
        write_frame(&mut v, Kind::Notif, b"").unwrap();
        let mut off = 0;
        let mut got = Vec::new();
        while let Some((k, start, stop)) = parse(&v[off..]).unwrap() {
            got.push((k, v[off + start..off + stop].to_vec()));
            off += stop;
        }
        assert_eq!(off, v.len());
        assert_eq!(got[0], (Kind::Hello, b"agent".to_vec()));
        assert_eq!(got[1].1.len(), 1000);
        assert_eq!(got[2], (Kind::Notif, vec![]));
        assert!(write_frame(&mut v, Kind::Notif, &vec![0; MAX_PAYLOAD + 1]).is_err());
    }

    #[test]
    fn parse_handles_partial_and_bad_frames() {
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Notif, b"abc").unwrap();
        for cut in 0..v.len() {
            assert!(parse(&v[..cut]).unwrap().is_none(), "prefix {cut}");
        }
        assert_eq!(parse(&v).unwrap(), Some((Kind::Notif, 5, 8)));
        assert!(parse(&[0, 0, 0, 0, 9]).is_err());
        assert!(parse(&[0xff, 0xff, 0xff, 0x7f, 2]).is_err());
        let mut x: u64 = 99;
        for n in 0..3000usize {
            let b: Vec<u8> = (0..n % 40)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse(&b);
        }
    }
}
