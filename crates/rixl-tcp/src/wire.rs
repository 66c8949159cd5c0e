//! The TCP backend's wire format: fixed 48-byte little-endian frame headers, each optionally
//! followed by `len` payload bytes.
//!
//! ```text
//!  0 u8  magic 0xA7         1 u8  kind            2 u16 flags          4 u32 len (payload bytes)
//!  8 u64 id (request id; responses name the request they answer)
//! 16 u64 token (target region)   24 u64 addr (target address)   32 u64 size   40 u64 post
//! ```
//!
//! A connection starts with a `Hello` (initiator → target, payload: [`Hello`]) and a `HelloAck`
//! (target → initiator, `size` = status). The protocol version lives in the hello, so a peer of
//! another version is refused before any data moves; the per-frame magic byte catches a stream
//! that lost its framing.
//!
//! Every header is untrusted: [`Header::parse`] checks the magic, the kind, the flags and the
//! payload length *for that kind* before anything is allocated or written, so a frame claiming
//! a huge length is refused without reading it. Which kinds may travel in which direction is
//! checked by the two ends (the target accepts only requests, the initiator only responses).

use rixl_core::codec::{Reader, Writer};
use rixl_core::{Error, Result};

/// Protocol version carried in the hello. 2: standalone notifications are not acknowledged
/// ([`F_NOACK`]). 3: READs may ask for paced answers ([`F_PACED`]).
pub const VERSION: u16 = 3;
/// First byte of every frame.
pub const MAGIC: u8 = 0xA7;
/// Size of a frame header.
pub const HEADER_LEN: usize = 48;
/// Largest data payload of one WRITE or DATA frame (the initiator cuts larger segments).
pub const MAX_DATA: u64 = 64 << 20;
/// Largest notification.
pub const MAX_NOTIF: u32 = 16 << 20;
/// Largest hello.
pub const MAX_HELLO: u32 = 64 << 10;
/// Largest error message.
pub const MAX_ERR: u32 = 4096;

/// Flag: the frame is one part of a post whose notification waits for all its parts.
pub const F_COUNTED: u16 = 1;
/// Flag (notifications only): a standalone notification, which the target does not
/// acknowledge. Nothing waits for it, and an acknowledgement would cost a TCP segment on each
/// side and a wake-up of the initiator's reader thread per notification.
pub const F_NOACK: u16 = 2;
/// Flag (READs only): the READ belongs to a long stream of data the initiator asked for on
/// this connection, which the target sends through a small socket buffer (`sock::pace`).
pub const F_PACED: u16 = 4;
const KNOWN_FLAGS: u16 = F_COUNTED | F_NOACK | F_PACED;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Initiator → target: who I am, whom I want (payload [`Hello`]).
    Hello = 1,
    /// Target → initiator: `size` = 0 accepted, else an [`ErrCode`]; payload = message.
    HelloAck = 2,
    /// Initiator → target: write `len` payload bytes at `addr` in region `token`.
    Write = 3,
    /// Initiator → target: send back `size` bytes from `addr` in region `token`.
    Read = 4,
    /// Initiator → target: a notification (payload); `size` = number of counted parts of post
    /// `post` that must be served first (0: deliver now).
    Notif = 5,
    /// Initiator → target: closing on purpose.
    Bye = 6,
    /// Target → initiator: every request up to and including `id` on this connection succeeded.
    Ack = 7,
    /// Target → initiator: the data of READ `id` (payload), which also acknowledges all earlier
    /// requests on this connection.
    Data = 8,
    /// Target → initiator: request `id` failed (`size` = [`ErrCode`], payload = message); all
    /// earlier requests on this connection succeeded.
    Err = 9,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Write,
            4 => Kind::Read,
            5 => Kind::Notif,
            6 => Kind::Bye,
            7 => Kind::Ack,
            8 => Kind::Data,
            9 => Kind::Err,
            _ => return None,
        })
    }
}

/// Why the target refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrCode {
    /// The range is not inside one of the target's live registrations.
    NotFound = 1,
    /// The request was malformed.
    InvalidParam = 2,
    /// Version or identity mismatch in the hello.
    Mismatch = 3,
    /// Anything else on the target's side.
    Backend = 4,
}

impl ErrCode {
    /// The code for `v` (unknown codes read as `Backend`).
    pub fn from_u64(v: u64) -> ErrCode {
        match v {
            1 => ErrCode::NotFound,
            2 => ErrCode::InvalidParam,
            3 => ErrCode::Mismatch,
            _ => ErrCode::Backend,
        }
    }

    /// The error this code means, with the target's message.
    pub fn to_error(self, msg: &str) -> Error {
        let msg = format!("the target refused the request: {msg}");
        match self {
            ErrCode::NotFound => Error::not_found(msg),
            ErrCode::InvalidParam => Error::invalid_param(msg),
            ErrCode::Mismatch => Error::mismatch(msg),
            ErrCode::Backend => Error::backend(msg),
        }
    }
}

/// Why a header was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
// The names read as what they are ("bad magic"); clippy only objects when the module is
// private, i.e. in builds without the `internals` feature.
#[allow(clippy::enum_variant_names)]
pub enum WireError {
    /// The first byte is not [`MAGIC`].
    BadMagic(u8),
    /// Unknown kind.
    BadKind(u8),
    /// Unknown flag bits.
    BadFlags(u16),
    /// A payload (or requested size) this kind may not have.
    BadLength { kind: Kind, len: u64 },
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::BadMagic(m) => write!(f, "bad frame magic {m:#04x}"),
            WireError::BadKind(k) => write!(f, "unknown frame kind {k}"),
            WireError::BadFlags(x) => write!(f, "unknown frame flags {x:#06x}"),
            WireError::BadLength { kind, len } => {
                write!(f, "a {kind:?} frame cannot carry {len} bytes")
            }
        }
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Flag bits.
    pub flags: u16,
    /// Payload bytes following the header.
    pub len: u32,
    /// Request id.
    pub id: u64,
    /// Target region token.
    pub token: u64,
    /// Target address.
    pub addr: u64,
    /// Kind-specific size (READ: bytes requested; NOTIF: parts to wait for; ERR: code).
    pub size: u64,
    /// Post id (for counted parts and their notification).
    pub post: u64,
}

impl Header {
    /// A header of `kind` with every other field zero.
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            len: 0,
            id: 0,
            token: 0,
            addr: 0,
            size: 0,
            post: 0,
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = MAGIC;
        b[1] = self.kind as u8;
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.token.to_le_bytes());
        b[24..32].copy_from_slice(&self.addr.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        b[40..48].copy_from_slice(&self.post.to_le_bytes());
        b
    }

    /// Decodes and bounds-checks an untrusted header.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if b[0] != MAGIC {
            return Err(WireError::BadMagic(b[0]));
        }
        let kind = Kind::from_u8(b[1]).ok_or(WireError::BadKind(b[1]))?;
        let flags = u16::from_le_bytes([b[2], b[3]]);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::BadFlags(flags));
        }
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let h = Header {
            kind,
            flags,
            len,
            id: u64_at(8),
            token: u64_at(16),
            addr: u64_at(24),
            size: u64_at(32),
            post: u64_at(40),
        };
        let len64 = u64::from(len);
        if (flags & F_NOACK != 0 && kind != Kind::Notif)
            || (flags & F_PACED != 0 && kind != Kind::Read)
        {
            return Err(WireError::BadFlags(flags));
        }
        let ok = match kind {
            Kind::Hello => len <= MAX_HELLO,
            Kind::HelloAck | Kind::Err => len <= MAX_ERR,
            Kind::Write | Kind::Data => len > 0 && len64 <= MAX_DATA,
            Kind::Read => len == 0 && h.size > 0 && h.size <= MAX_DATA,
            Kind::Notif => len <= MAX_NOTIF,
            Kind::Bye | Kind::Ack => len == 0,
        };
        if !ok {
            let len = if kind == Kind::Read { h.size } else { len64 };
            return Err(WireError::BadLength { kind, len });
        }
        Ok(h)
    }
}

/// The hello's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the initiator.
    pub version: u16,
    /// The initiator's agent name.
    pub from: String,
    /// The initiator's backend instance (its conn info nonce): binds the name to a connection.
    pub from_nonce: u64,
    /// The agent the initiator wants to reach.
    pub to: String,
    /// The instance it expects (from the target's conn info): a restarted target is refused.
    pub to_nonce: u64,
    /// Index of this connection among the initiator's connections to the target.
    pub conn: u32,
}

impl Hello {
    /// Encodes the hello.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.varint(u64::from(self.version));
        w.str(&self.from);
        w.varint(self.from_nonce);
        w.str(&self.to);
        w.varint(self.to_nonce);
        w.varint(u64::from(self.conn));
        w.finish()
    }

    /// Decodes an untrusted hello.
    pub fn decode(b: &[u8]) -> Result<Hello> {
        let mut r = Reader::new(b, "TCP hello");
        let version = r.varint()?;
        let version = u16::try_from(version).map_err(|_| r.error("version out of range"))?;
        let from = r.str(1024)?.to_owned();
        let from_nonce = r.varint()?;
        let to = r.str(1024)?.to_owned();
        let to_nonce = r.varint()?;
        let conn = u32::try_from(r.varint()?).map_err(|_| r.error("connection index"))?;
        r.finish()?;
        if from.is_empty() {
            return Err(r.error("empty agent name"));
        }
        Ok(Hello {
            version,
            from,
            from_nonce,
            to,
            to_nonce,
            conn,
        })
    }
}

/// What a TCP backend publishes in its agent's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Random per backend instance: tells a restarted agent from the one whose metadata we hold.
    pub nonce: u64,
    /// The listening port.
    pub port: u16,
    /// Addresses to try, in order.
    pub addrs: Vec<std::net::IpAddr>,
}

const CONN_INFO_VERSION: u8 = 1;

impl ConnInfo {
    /// Encodes the info.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(CONN_INFO_VERSION);
        w.varint(self.nonce);
        w.varint(u64::from(self.port));
        w.varint(self.addrs.len() as u64);
        for a in &self.addrs {
            w.str(&a.to_string());
        }
        w.finish()
    }

    /// Decodes untrusted info.
    pub fn decode(b: &[u8]) -> Result<ConnInfo> {
        let mut r = Reader::new(b, "TCP connection info");
        let v = r.u8()?;
        if v != CONN_INFO_VERSION {
            return Err(r.error(format!("version {v} not supported")));
        }
        let nonce = r.varint()?;
        let port = u16::try_from(r.varint()?).map_err(|_| r.error("port out of range"))?;
        let n = r.count(2)?;
        if n == 0 || n > 64 {
            return Err(r.error(format!("{n} addresses")));
        }
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let s = r.str(64)?;
            addrs.push(
                s.parse()
                    .map_err(|_| r.error(format!("bad address {s:?}")))?,
            );
        }
        r.finish()?;
        if port == 0 {
            return Err(r.error("port 0"));
        }
        Ok(ConnInfo { nonce, port, addrs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: deterministic garbage without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn header_round_trip() {
        for kind in [Kind::Write, Kind::Data, Kind::Notif, Kind::Ack, Kind::Err] {
            let h = Header {
                kind,
                flags: F_COUNTED,
                len: if kind == Kind::Ack { 0 } else { 4096 },
                id: 7,
                token: 9,
                addr: 0xdead_beef,
                size: 3,
                post: 11,
            };
            assert_eq!(Header::parse(&h.encode()), Ok(h));
        }
        let mut r = Header::new(Kind::Read);
        r.size = 1 << 20;
        assert_eq!(Header::parse(&r.encode()), Ok(r));
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut w = Header::new(Kind::Write);
        w.len = u32::MAX; // huge claim
        assert!(matches!(
            Header::parse(&w.encode()),
            Err(WireError::BadLength { .. })
        ));
        w.len = 0; // empty write
        assert!(Header::parse(&w.encode()).is_err());
        let mut r = Header::new(Kind::Read);
        r.size = u64::MAX;
        assert!(Header::parse(&r.encode()).is_err());
        r.size = 0;
        assert!(Header::parse(&r.encode()).is_err());
        let mut a = Header::new(Kind::Ack);
        a.len = 1;
        assert!(Header::parse(&a.encode()).is_err());
        let mut b = Header::new(Kind::Ack).encode();
        b[0] = 0;
        assert_eq!(Header::parse(&b), Err(WireError::BadMagic(0)));
        b[0] = MAGIC;
        b[1] = 200;
        assert_eq!(Header::parse(&b), Err(WireError::BadKind(200)));
        b[1] = Kind::Ack as u8;
        b[2] = 0x80;
        assert!(matches!(Header::parse(&b), Err(WireError::BadFlags(_))));
    }

    #[test]
    fn only_notifications_may_skip_their_acknowledgement() {
        let mut n = Header::new(Kind::Notif);
        n.flags = F_NOACK;
        n.len = 3;
        assert_eq!(Header::parse(&n.encode()), Ok(n));
        for kind in [Kind::Write, Kind::Read, Kind::Ack, Kind::Data, Kind::Bye] {
            let mut h = Header::new(kind);
            h.flags = F_NOACK;
            h.len = u32::from(matches!(kind, Kind::Write | Kind::Data));
            h.size = u64::from(kind == Kind::Read);
            assert_eq!(
                Header::parse(&h.encode()),
                Err(WireError::BadFlags(F_NOACK)),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn only_reads_may_ask_for_paced_answers() {
        let mut r = Header::new(Kind::Read);
        r.flags = F_PACED | F_COUNTED;
        r.size = 1 << 20;
        assert_eq!(Header::parse(&r.encode()), Ok(r));
        for kind in [Kind::Write, Kind::Notif, Kind::Ack, Kind::Data, Kind::Bye] {
            let mut h = Header::new(kind);
            h.flags = F_PACED;
            h.len = u32::from(matches!(kind, Kind::Write | Kind::Data));
            assert_eq!(
                Header::parse(&h.encode()),
                Err(WireError::BadFlags(F_PACED)),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn random_garbage_never_panics_and_is_bounded() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for i in 0..200_000 {
            let mut b = [0u8; HEADER_LEN];
            for c in b.chunks_mut(8) {
                c.copy_from_slice(&rng.next().to_le_bytes()[..c.len()]);
            }
            // Half the time make the magic and kind plausible to reach the length checks.
            if i % 2 == 0 {
                b[0] = MAGIC;
                b[1] = (rng.next() % 10) as u8;
                b[2] = (rng.next() % 2) as u8;
                b[3] = 0;
            }
            if let Ok(h) = Header::parse(&b) {
                accepted += 1;
                assert!(u64::from(h.len) <= MAX_DATA.max(u64::from(MAX_NOTIF)));
                if h.kind == Kind::Read {
                    assert!(h.size <= MAX_DATA);
                }
                assert_eq!(h.encode(), b, "accepted headers re-encode identically");
            }
        }
        assert!(accepted > 0, "the generator reached the length checks");
        // Random bodies for the hello and conn info decoders.
        for n in 0..5_000 {
            let len = (rng.next() % 96) as usize;
            let v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = Hello::decode(&v);
            let _ = ConnInfo::decode(&v);
            let good = Hello {
                version: VERSION,
                from: "a".into(),
                from_nonce: n,
                to: "b".into(),
                to_nonce: 3,
                conn: 1,
            }
            .encode();
            let mut m = good.clone();
            let i = (rng.next() as usize) % m.len();
            m[i] = rng.next() as u8;
            let _ = Hello::decode(&m);
            for cut in 0..good.len() {
                assert!(Hello::decode(&good[..cut]).is_err());
            }
        }
    }

    #[test]
    fn conn_info_round_trip() {
        let c = ConnInfo {
            nonce: 77,
            port: 4242,
            addrs: vec!["10.1.2.3".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        };
        assert_eq!(ConnInfo::decode(&c.encode()).unwrap(), c);
        let b = c.encode();
        for cut in 0..b.len() {
            assert!(ConnInfo::decode(&b[..cut]).is_err());
        }
    }
}
