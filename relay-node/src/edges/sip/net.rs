//! IP address blocks for the peers' `sources`.

use std::net::IpAddr;

/// An IP address or a CIDR block (`10.0.0.0/8`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Self { addr, prefix })
    }

    /// A single address.
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IpNet;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn blocks_contain_their_addresses_only() {
        let n = IpNet::parse("10.1.0.0/16");
        assert!(n.is_some_and(|n| n.contains(ip("10.1.200.3"))));
        assert!(n.is_some_and(|n| !n.contains(ip("10.2.0.1"))));
        assert_eq!(
            IpNet::parse("127.0.0.1"),
            Some(IpNet::host(ip("127.0.0.1")))
        );
        let h = IpNet::host(ip("127.0.0.1"));
        assert!(h.contains(ip("::ffff:127.0.0.1")));
        assert!(!h.contains(ip("127.0.0.2")));
        assert!(IpNet::parse("0.0.0.0/0").is_some_and(|n| n.contains(ip("8.8.8.8"))));
        let v6 = IpNet::parse("2001:db8::/32");
        assert!(v6.is_some_and(|n| n.contains(ip("2001:db8:1::5"))));
        assert!(v6.is_some_and(|n| !n.contains(ip("2001:db9::1"))));
        for bad in ["10.0.0.0/33", "host.example", "::/129", ""] {
            assert!(IpNet::parse(bad).is_none(), "{bad}");
        }
    }
}
