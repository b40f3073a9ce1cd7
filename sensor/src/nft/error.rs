//! The nftables response's error: what failed and what to do about it, including the
//! kernel's errno mapped to a hint, and which message of a batch the kernel refused.

use std::io;

use super::{layout::SET_SIZE, uapi::*};

/// Failure of an nftables operation; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The process may not change the firewall of its network namespace.
    #[error(
        "nftables {op} needs CAP_NET_ADMIN: run the sensor as root or add the NET_ADMIN capability \
         (Kubernetes: securityContext.capabilities.add: [NET_ADMIN])"
    )]
    Permission {
        /// What was being done.
        op: &'static str,
    },
    /// The kernel has no nf_tables (or no netlink for it).
    #[error(
        "nf_tables is not available in this kernel ({source}): load the module (modprobe nf_tables) \
         or turn the native nftables response off"
    )]
    Unavailable {
        /// The socket error.
        source: io::Error,
    },
    /// A name nf_tables would refuse.
    #[error("invalid nftables table name {0:?}: use 1 to 255 characters, no NUL")]
    InvalidName(String),
    /// The ban set has reached [`SET_SIZE`] elements.
    #[error(
        "nftables set {set} in table inet {table} is full ({SET_SIZE} elements): lower ban durations \
         or widen the ignore list; the ban was not added"
    )]
    SetFull {
        /// Table name.
        table: String,
        /// Set name.
        set: &'static str,
    },
    /// The kernel refused a request.
    #[error("the kernel refused nftables {op} on table inet {table}: {source}; {hint}")]
    Kernel {
        /// What was being done.
        op: &'static str,
        /// Table name.
        table: String,
        /// The errno the kernel answered.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// Talking to the kernel failed (socket I/O, timeout).
    #[error(
        "netlink I/O failed during nftables {op}: {source}; check that nf_tables works here (nft list tables)"
    )]
    Io {
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The kernel's reply could not be read.
    #[error(
        "malformed nf_tables reply during {op}: {detail}; this is a bug, please report it with the kernel version"
    )]
    Protocol {
        /// What was being done.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// The kernel refused one message of a batch: says which, and keeps the errno.
#[derive(Debug, thiserror::Error)]
#[error("{os} (in {cmd})")]
pub struct RefusedMsg {
    pub cmd: &'static str,
    pub os: io::Error,
}

/// The errno of an error from a batch commit or a dump.
pub fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<RefusedMsg>())
            .and_then(|r| r.os.raw_os_error())
    })
}

impl NftError {
    /// The error for a kernel answer `source` to `op` on `table`, with what to do about it.
    pub fn kernel(table: &str, op: &'static str, source: io::Error) -> Self {
        let errno = errno_of(&source).unwrap_or(0);
        if errno == EPERM || errno == EACCES {
            return NftError::Permission { op };
        }
        if source.kind() == io::ErrorKind::WouldBlock || source.kind() == io::ErrorKind::TimedOut {
            return NftError::Io { op, source };
        }
        let hint = match errno {
            ENOENT => {
                "the table, a set or a chain is missing (deleted by someone else?): call reconcile to recreate it"
            }
            EEXIST => {
                "an object of the same name exists with other properties: delete the table (nft delete table inet NAME) and let the sensor recreate it"
            }
            EBUSY => "the object is in use or being changed concurrently: retry",
            EOPNOTSUPP => {
                "this kernel lacks an nf_tables feature used here (sets with timeouts, dynset, ct): use a kernel with CONFIG_NFT_DYNSET/NFT_CT or disable the tripwire"
            }
            ERANGE => "a timeout is too large for the kernel: use a shorter ban duration or none",
            EINVAL => {
                "the kernel rejected the request as invalid: check the kernel version (5.x or later) and report this"
            }
            _ => "check `nft list table inet NAME` and the kernel log",
        };
        NftError::Kernel {
            op,
            table: table.to_owned(),
            source,
            hint,
        }
    }
}
