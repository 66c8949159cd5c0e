//! The metadata blob: what one agent publishes so that others can reach its memory.
//!
//! Layout (version 1, all integers LEB128 varints unless noted):
//!
//! ```text
//! magic  "RIXLMD"            6 bytes
//! version                    1 byte  (= 1)
//! agent name                 len + UTF-8 (1..=1024 bytes)
//! connection infos           count, then per backend: name (len + UTF-8), info (len + bytes)
//! sections                   count, then per (backend, memory type):
//!     backend name           len + UTF-8
//!     memory type            1 byte (NIXL's numbering)
//!     registrations          count, then per registration, sorted by (dev, addr):
//!         dev                varint
//!         addr               zigzag(addr - end of previous registration on the same dev)
//!         len                varint
//!         public data        len + bytes (backend-specific: keys, handles; often empty)
//! ```
//!
//! Delta-coding addresses keeps a published DRAM registration at 4–12 bytes plus the backend's
//! public data (NIXL with UCX spends ~44). Decoding is atomic and total: it either returns a
//! fully checked [`AgentMetadata`] or a [`Mismatch`](crate::ErrorKind::Mismatch) error naming the
//! byte offset, never a panic and never an allocation larger than the input justifies. Blobs from
//! NIXL (magic `nixlSerDes|`) are recognised and refused with a message saying so.

use crate::codec::{Reader, Writer};
use crate::desc::Desc;
use crate::error::{Error, Result};
use crate::mem::MemType;

/// First bytes of every RIXL metadata blob.
pub const MAGIC: &[u8; 6] = b"RIXLMD";
/// The version this build writes and reads.
pub const VERSION: u8 = 1;
/// Longest agent name accepted.
pub const MAX_AGENT_NAME: usize = 1024;
/// Longest backend name accepted.
pub const MAX_BACKEND_NAME: usize = 64;
/// Largest connection-info or public-data field accepted.
pub const MAX_FIELD: usize = 1 << 20;

/// One backend's connection information (addresses, endpoint blobs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Backend name, e.g. `"TCP"`.
    pub backend: String,
    /// Backend-specific bytes.
    pub info: Vec<u8>,
}

/// One published registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedRegion {
    /// The registered range.
    pub desc: Desc,
    /// The backend's public data for it (e.g. a remote key); empty for most backends.
    pub public: Vec<u8>,
}

/// The registrations one backend publishes for one memory type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataSection {
    /// Backend name.
    pub backend: String,
    /// Memory type of every region in the section.
    pub mem: MemType,
    /// The regions.
    pub regions: Vec<PublishedRegion>,
}

/// A decoded metadata blob: full, or partial (a subset of regions and/or connection info).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AgentMetadata {
    /// The publishing agent's name.
    pub agent: String,
    /// Connection info per remote-capable backend (may be empty in a partial blob).
    pub conn: Vec<ConnInfo>,
    /// Published registrations.
    pub sections: Vec<MetadataSection>,
}

impl AgentMetadata {
    /// Encodes the blob. Regions are written sorted by `(dev, addr)`, whatever their order here.
    pub fn encode(&self) -> Vec<u8> {
        let regions: usize = self.sections.iter().map(|s| s.regions.len()).sum();
        let mut w = Writer::with_capacity(64 + self.agent.len() + regions * 8);
        w.raw(MAGIC);
        w.u8(VERSION);
        w.str(&self.agent);
        w.varint(self.conn.len() as u64);
        for c in &self.conn {
            w.str(&c.backend);
            w.bytes(&c.info);
        }
        w.varint(self.sections.len() as u64);
        let mut order: Vec<usize> = Vec::new();
        for s in &self.sections {
            w.str(&s.backend);
            w.u8(s.mem.as_u8());
            w.varint(s.regions.len() as u64);
            order.clear();
            order.extend(0..s.regions.len());
            order.sort_by_key(|&i| (s.regions[i].desc.dev, s.regions[i].desc.addr));
            let mut prev: Option<(u64, u64)> = None; // (dev, end)
            for &i in &order {
                let r = &s.regions[i];
                let base = match prev {
                    Some((dev, end)) if dev == r.desc.dev => end,
                    _ => 0,
                };
                w.varint(r.desc.dev);
                w.zigzag(r.desc.addr.wrapping_sub(base) as i64);
                w.varint(r.desc.len);
                w.bytes(&r.public);
                prev = Some((r.desc.dev, r.desc.addr.wrapping_add(r.desc.len)));
            }
        }
        w.finish()
    }

    /// Decodes and checks a blob from an untrusted source.
    pub fn decode(blob: &[u8]) -> Result<AgentMetadata> {
        if blob.starts_with(b"nixlSerDes") {
            return Err(Error::mismatch(
                "this is a NIXL metadata blob; RIXL agents exchange RIXL metadata only",
            ));
        }
        let mut r = Reader::new(blob, "metadata blob");
        if r.raw(MAGIC.len()).ok() != Some(&MAGIC[..]) {
            return Err(Error::mismatch(
                "not a RIXL metadata blob (bad magic; truncated or garbage)",
            ));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(r.error(format!(
                "version {version} is not supported (this build reads version {VERSION})"
            )));
        }
        let agent = r.str(MAX_AGENT_NAME)?;
        if agent.is_empty() {
            return Err(r.error("empty agent name"));
        }
        let nconn = r.count(2)?;
        let mut conn = Vec::with_capacity(nconn);
        for _ in 0..nconn {
            let backend = r.str(MAX_BACKEND_NAME)?.to_owned();
            if backend.is_empty() || conn.iter().any(|c: &ConnInfo| c.backend == backend) {
                return Err(r.error(format!("empty or repeated backend {backend:?}")));
            }
            let info = r.bytes(MAX_FIELD)?.to_vec();
            conn.push(ConnInfo { backend, info });
        }
        let nsec = r.count(3)?;
        let mut sections: Vec<MetadataSection> = Vec::with_capacity(nsec);
        for _ in 0..nsec {
            let backend = r.str(MAX_BACKEND_NAME)?.to_owned();
            let mem_raw = r.u8()?;
            let mem = MemType::from_u8(mem_raw)
                .ok_or_else(|| r.error(format!("unknown memory type {mem_raw}")))?;
            if backend.is_empty()
                || sections
                    .iter()
                    .any(|s| s.backend == backend && s.mem == mem)
            {
                return Err(r.error(format!("empty or repeated section {backend:?}/{mem}")));
            }
            let n = r.count(4)?;
            let mut regions = Vec::with_capacity(n);
            let mut prev: Option<(u64, u64)> = None;
            let mut prev_key: Option<(u64, u64)> = None;
            for _ in 0..n {
                let dev = r.varint()?;
                let delta = r.zigzag()?;
                let len = r.varint()?;
                let public = r.bytes(MAX_FIELD)?.to_vec();
                let base = match prev {
                    Some((pdev, end)) if pdev == dev => end,
                    _ => 0,
                };
                let addr = base.wrapping_add(delta as u64);
                // The encoding is canonical: regions come sorted by (dev, addr), so a blob
                // decodes to exactly what re-encodes to it.
                if prev_key.is_some_and(|k| k > (dev, addr)) {
                    return Err(r.error("registrations are not sorted by (device, address)"));
                }
                prev_key = Some((dev, addr));
                let desc = Desc::new(addr, len, dev);
                if desc.end().is_none() || (len == 0 && !mem.is_storage()) {
                    return Err(r.error(format!(
                        "invalid registration (addr {addr:#x}, len {len}, dev {dev})"
                    )));
                }
                prev = Some((dev, addr.wrapping_add(len)));
                regions.push(PublishedRegion { desc, public });
            }
            sections.push(MetadataSection {
                backend,
                mem,
                regions,
            });
        }
        r.finish()?;
        Ok(AgentMetadata {
            agent: agent.to_owned(),
            conn,
            sections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> AgentMetadata {
        AgentMetadata {
            agent: "decode-0".into(),
            conn: vec![ConnInfo {
                backend: "LOOPBACK".into(),
                info: vec![1, 2, 3],
            }],
            sections: vec![MetadataSection {
                backend: "LOOPBACK".into(),
                mem: MemType::Dram,
                regions: (0..64)
                    .map(|i| PublishedRegion {
                        desc: Desc::new(0x7f00_0000_0000 + i * 4096, 4096, 0),
                        public: vec![],
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn round_trip_and_size() {
        let md = sample();
        let blob = md.encode();
        assert_eq!(AgentMetadata::decode(&blob).unwrap(), md);
        let empty = AgentMetadata {
            sections: vec![MetadataSection {
                regions: vec![],
                ..md.sections[0].clone()
            }],
            ..md.clone()
        };
        let per_reg = (blob.len() - empty.encode().len()) as f64 / 64.0;
        assert!(
            per_reg <= 6.0,
            "{per_reg} bytes per contiguous registration"
        );
    }

    #[test]
    fn refuses_nixl_and_garbage() {
        let e = AgentMetadata::decode(b"nixlSerDes|Agent...").unwrap_err();
        assert!(e.to_string().contains("NIXL metadata"), "{e}");
        assert_eq!(e.kind(), crate::ErrorKind::Mismatch);
        assert!(AgentMetadata::decode(b"").is_err());
        let mut blob = sample().encode();
        blob.push(0);
        assert!(AgentMetadata::decode(&blob)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let blob = sample().encode();
        for cut in 0..blob.len() {
            assert!(
                AgentMetadata::decode(&blob[..cut]).is_err(),
                "prefix of {cut} accepted"
            );
        }
        let mut v2 = sample().encode();
        v2[6] = 2;
        assert!(AgentMetadata::decode(&v2)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
    }

    #[test]
    fn refuses_unsorted_regions() {
        // Found by the metadata_blob fuzz target: a blob whose regions are out of order
        // decoded, then re-encoded (sorted) to a different value. Decoding now refuses it.
        let mut w = crate::codec::Writer::new();
        w.raw(MAGIC);
        w.u8(VERSION);
        w.str("peer");
        w.varint(0);
        w.varint(1);
        w.str("LOOPBACK");
        w.u8(MemType::Dram.as_u8());
        w.varint(2);
        for (addr_delta, len) in [(0x2000i64, 16u64), (-0x1010, 16)] {
            w.varint(0);
            w.zigzag(addr_delta);
            w.varint(len);
            w.bytes(b"");
        }
        let e = AgentMetadata::decode(&w.finish()).unwrap_err();
        assert!(e.to_string().contains("not sorted"), "{e}");
    }

    fn arb_metadata() -> impl Strategy<Value = AgentMetadata> {
        let region = (
            any::<u64>(),
            1u64..1 << 40,
            0u64..4,
            proptest::collection::vec(any::<u8>(), 0..12),
        )
            .prop_map(|(a, l, d, p)| PublishedRegion {
                desc: Desc::new(a >> 1, l, d),
                public: p,
            });
        let section = (
            "[A-Z_]{1,10}",
            0u8..5,
            proptest::collection::vec(region, 0..20),
        )
            .prop_map(|(b, m, mut regions)| {
                regions.sort_by_key(|r| (r.desc.dev, r.desc.addr));
                let mem = MemType::from_u8(m).unwrap();
                MetadataSection {
                    backend: b,
                    mem,
                    regions,
                }
            });
        (
            "[a-z0-9-]{1,20}",
            proptest::collection::btree_map(
                "[A-Z]{1,8}",
                proptest::collection::vec(any::<u8>(), 0..40),
                0..3,
            ),
            proptest::collection::vec(section, 0..4),
        )
            .prop_map(|(agent, conn, mut sections)| {
                let mut seen = std::collections::HashSet::new();
                sections.retain(|s| seen.insert((s.backend.clone(), s.mem)));
                AgentMetadata {
                    agent,
                    conn: conn
                        .into_iter()
                        .map(|(backend, info)| ConnInfo { backend, info })
                        .collect(),
                    sections,
                }
            })
    }

    proptest! {
        #[test]
        fn any_metadata_round_trips(md in arb_metadata()) {
            let blob = md.encode();
            prop_assert_eq!(AgentMetadata::decode(&blob).unwrap(), md);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AgentMetadata::decode(&bytes);
            let mut with_magic = b"RIXLMD\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = AgentMetadata::decode(&with_magic);
        }

        #[test]
        fn mutated_blobs_never_panic(md in arb_metadata(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut blob = md.encode();
            for (pos, val) in flips {
                let i = pos % blob.len();
                blob[i] = val;
            }
            let _ = AgentMetadata::decode(&blob);
        }
    }
}
