//! VXLAN overlay constants (RFC 7348).

/// IANA-assigned VXLAN UDP destination port.
pub const VXLAN_PORT: u16 = 4789;
