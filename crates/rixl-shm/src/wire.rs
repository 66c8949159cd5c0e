//! Frames on the per-peer Unix socket: `[u32 LE payload length][u8 kind][payload]`.
//!
//! The socket only carries control traffic (who I am, notifications, goodbye); data never
//! crosses it. Every frame from a peer is untrusted: lengths are bounded before anything is
//! allocated and unknown kinds end the connection.

use std::io::{self, Read, Write};

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
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Hello),
            2 => Some(Kind::Notif),
            3 => Some(Kind::Bye),
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

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<Kind>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let kind = Kind::from_u8(head[4]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", head[4]),
        )
    })?;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame claims {len} bytes, more than {MAX_PAYLOAD}"),
        ));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(Some(kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Hello, b"agent").unwrap();
        write_frame(&mut v, Kind::Notif, &[7u8; 1000]).unwrap();
        write_frame(&mut v, Kind::Notif, b"").unwrap();
        let mut r = &v[..];
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(Kind::Hello));
        assert_eq!(buf, b"agent");
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(Kind::Notif));
        assert_eq!(buf.len(), 1000);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(Kind::Notif));
        assert!(buf.is_empty());
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), None);
        // Huge length, unknown kind, truncated body.
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0x7f, 2];
        assert!(read_frame(&mut r, &mut buf).is_err());
        let mut r: &[u8] = &[0, 0, 0, 0, 9];
        assert!(read_frame(&mut r, &mut buf).is_err());
        let mut r: &[u8] = &[4, 0, 0, 0, 2, 1];
        assert!(read_frame(&mut r, &mut buf).is_err());
        let mut r: &[u8] = &[4, 0];
        assert!(read_frame(&mut r, &mut buf).is_err());
    }
}
