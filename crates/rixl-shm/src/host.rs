//! Same-host detection and connection info.
//!
//! Two agents can use SHM only if `process_vm_*` can reach the peer's pid: same kernel (boot id)
//! and same pid namespace (the pid means the same process). A hostname is not enough: containers
//! share hostnames across machines and differ on one machine.

use rixl_core::codec::{Reader, Writer};
use rixl_core::{Error, Result};

/// Who we are, as far as cross-process memory access is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdentity {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// Inode of `/proc/self/ns/pid`.
    pub pid_ns: u64,
}

impl HostIdentity {
    /// This process's identity.
    pub fn current() -> Result<HostIdentity> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map_err(|e| Error::from_io(rixl_core::ErrorKind::Backend, "reading the boot id", &e))?
            .trim()
            .to_owned();
        let ns = std::fs::read_link("/proc/self/ns/pid").map_err(|e| {
            Error::from_io(
                rixl_core::ErrorKind::Backend,
                "reading the pid namespace",
                &e,
            )
        })?;
        // The link reads "pid:[4026531836]".
        let pid_ns = ns
            .to_string_lossy()
            .trim_start_matches("pid:[")
            .trim_end_matches(']')
            .parse()
            .unwrap_or(0);
        Ok(HostIdentity { boot_id, pid_ns })
    }
}

/// What an SHM backend publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Host identity of the publisher.
    pub host: HostIdentity,
    /// Its pid.
    pub pid: u32,
    /// Its control socket.
    pub socket: String,
}

const VERSION: u8 = 1;

impl ConnInfo {
    /// Encodes the info.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(VERSION);
        w.str(&self.host.boot_id);
        w.varint(self.host.pid_ns);
        w.varint(u64::from(self.pid));
        w.str(&self.socket);
        w.finish()
    }

    /// Decodes untrusted info.
    pub fn decode(b: &[u8]) -> Result<ConnInfo> {
        let mut r = Reader::new(b, "SHM connection info");
        let v = r.u8()?;
        if v != VERSION {
            return Err(r.error(format!("version {v} not supported")));
        }
        let boot_id = r.str(64)?.to_owned();
        let pid_ns = r.varint()?;
        let pid = u32::try_from(r.varint()?).map_err(|_| r.error("pid out of range"))?;
        let socket = r.str(4096)?.to_owned();
        r.finish()?;
        if pid == 0 || socket.is_empty() {
            return Err(Error::mismatch("SHM connection info has no pid or socket"));
        }
        Ok(ConnInfo {
            host: HostIdentity { boot_id, pid_ns },
            pid,
            socket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_round_trip() {
        let host = HostIdentity::current().unwrap();
        assert_eq!(host.boot_id.len(), 36);
        let c = ConnInfo {
            host,
            pid: 42,
            socket: "/tmp/x.sock".into(),
        };
        assert_eq!(ConnInfo::decode(&c.encode()).unwrap(), c);
        let b = c.encode();
        for cut in 0..b.len() {
            assert!(ConnInfo::decode(&b[..cut]).is_err());
        }
    }
}
