//! Ethernet addresses as people write them (`02:42:0a:2a:00:02`): the one
//! parser and the one formatter, for the agent, meshctl, gossip and tests.
//! Map values keep plain `[u8; 6]` (repr(C)); wrap them to print or parse.

use core::{fmt, str::FromStr};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Not six colon-separated hex octets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMac;

impl fmt::Display for BadMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a MAC address (six hex octets separated by ':')")
    }
}

impl FromStr for Mac {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let mut mac = [0u8; 6];
        let mut parts = s.trim().split(':');
        for b in mac.iter_mut() {
            let p = parts.next().ok_or(BadMac)?;
            if p.is_empty() || p.len() > 2 {
                return Err(BadMac);
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| BadMac)?;
        }
        match parts.next() {
            None => Ok(Mac(mac)),
            Some(_) => Err(BadMac),
        }
    }
}

impl From<[u8; 6]> for Mac {
    fn from(m: [u8; 6]) -> Self {
        Mac(m)
    }
}
