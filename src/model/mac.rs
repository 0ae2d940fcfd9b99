//! Ethernet addresses: how the bridge family recognizes a machine without
//! `meta ibrname` (DESIGN section 4).

use anyhow::{bail, Context};
use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A MAC address, written lowercase with colons as nft and Incus write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The group bit: broadcast and multicast destinations.
    pub fn is_group(self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<MacAddr> {
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            bail!("{text:?} is not a MAC address (six hex bytes with colons)");
        }
        let mut out = [0u8; 6];
        for (byte, part) in out.iter_mut().zip(parts) {
            if part.len() != 2 {
                bail!("{text:?} is not a MAC address (six hex bytes with colons)");
            }
            *byte = u8::from_str_radix(part, 16)
                .with_context(|| format!("{text:?} is not a MAC address"))?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_print_and_refuse() {
        let m: MacAddr = "10:66:6A:fb:0a:0a".parse().unwrap();
        assert_eq!(m.to_string(), "10:66:6a:fb:0a:0a");
        assert!(!m.is_group());
        assert!("ff:ff:ff:ff:ff:ff".parse::<MacAddr>().unwrap().is_group());
        for bad in [
            "10:66:6a:fb:0a",
            "10:66:6a:fb:0a:0g",
            "1:66:6a:fb:0a:0a0",
            "",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
