//! Network interface names from flags and from the kernel.

use std::ffi::CString;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const MAX_NAME: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IfaceError {
    #[error("interface name {0:?} is invalid (1-15 bytes, no '/', whitespace or NUL)")]
    InvalidName(String),
    #[error("no interface named {0:?} in this network namespace")]
    NotFound(String),
}

/// Checks `name` the way the kernel's dev_valid_name does.
pub fn validate(name: &str) -> Result<(), IfaceError> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(IfaceError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// The interface index of `name` in the current network namespace.
pub fn index(name: &str) -> Result<u32, IfaceError> {
    validate(name)?;
    let c = CString::new(name).map_err(|_| IfaceError::InvalidName(name.to_owned()))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(IfaceError::NotFound(name.to_owned())),
        i => Ok(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["eth0", "veth1a2b3c4", "a", "123456789012345"] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "1234567890123456",
            "a/b",
            "a b",
            "a\0b",
            ".",
            "..",
            "a:1",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn loopback_exists_unknown_does_not() {
        assert!(index("lo").is_ok());
        assert_eq!(
            index("nosuchif0"),
            Err(IfaceError::NotFound("nosuchif0".into()))
        );
    }
}
