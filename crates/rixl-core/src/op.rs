//! Transfer operations.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A one-sided operation, seen from the initiator (NIXL's `nixl_xfer_op_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum XferOp {
    /// Remote → local: the initiator's memory receives the target's bytes.
    Read = 0,
    /// Local → remote: the target's memory receives the initiator's bytes.
    Write = 1,
}

impl XferOp {
    /// `"READ"` or `"WRITE"`.
    pub const fn name(self) -> &'static str {
        match self {
            XferOp::Read => "READ",
            XferOp::Write => "WRITE",
        }
    }
}

impl fmt::Display for XferOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for XferOp {
    type Err = Error;

    /// Exactly `READ` or `WRITE`, as NIXL's Python API (which raises `KeyError` otherwise).
    fn from_str(s: &str) -> Result<XferOp, Error> {
        match s {
            "READ" => Ok(XferOp::Read),
            "WRITE" => Ok(XferOp::Write),
            _ => Err(Error::invalid_param(format!(
                "unknown transfer operation {s:?} (expected \"READ\" or \"WRITE\")"
            ))),
        }
    }
}
