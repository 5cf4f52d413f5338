//! PROXY protocol v2 (the binary header a TCP load balancer such as HAProxy, an AWS NLB or
//! Envoy puts before the client's bytes) and the list of upstreams trusted to send it.
//!
//! Invariants:
//! - Pure and panic-free on any input: it parses bytes from the network.
//! - The header is only honoured from a trusted upstream (the caller checks
//!   [`TrustedNets::contains`] on the socket's peer before parsing); the address it carries
//!   then replaces the socket's peer for per-IP limits, logs and records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that opens every v2 header.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

/// Largest header accepted (fixed part + addresses + TLVs).
pub const MAX_HEADER: usize = 16 + 536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY v2 signature")]
    NoSignature,
    #[error("unsupported PROXY protocol version or command")]
    BadVersion,
    #[error("PROXY header too long or truncated address block")]
    BadLength,
}

/// A parsed header: the original client's address (`None` for a LOCAL header — the proxy's
/// own health check — or an address family we do not relay, such as UNIX), and the header's
/// length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub source: Option<SocketAddr>,
    pub len: usize,
}

/// Parses a v2 header at the start of `buf`. `Ok(None)`: more bytes are needed.
pub fn parse_v2(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let n = buf.len().min(SIGNATURE.len());
    if buf[..n] != SIGNATURE[..n] {
        return Err(ProxyError::NoSignature);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadVersion);
    }
    let local = match ver_cmd & 0x0F {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::BadVersion),
    };
    let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_HEADER {
        return Err(ProxyError::BadLength);
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[16..len];
    let source = if local {
        None
    } else {
        match buf[13] {
            // TCP over IPv4: src addr, dst addr, src port, dst port.
            0x11 => {
                let a = body.get(..12).ok_or(ProxyError::BadLength)?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])))
            }
            // TCP over IPv6.
            0x21 => {
                let a = body.get(..36).ok_or(ProxyError::BadLength)?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[..16]);
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), u16::from_be_bytes([a[32], a[33]])))
            }
            // UNSPEC, UDP, UNIX: keep the socket's own address.
            _ => None,
        }
    };
    Ok(Some(Header { source, len }))
}

/// Networks (CIDR) whose connections may carry a PROXY header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedNets(Vec<(IpAddr, u8)>);

impl TrustedNets {
    /// Parses entries such as `10.0.0.0/8`, `192.0.2.7` (a single host) or `fd00::/8`.
    pub fn parse(entries: &[String]) -> Result<TrustedNets, String> {
        entries.iter().map(|e| parse_cidr(e)).collect::<Result<_, _>>().map(TrustedNets)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|&(net, bits)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), bits),
            _ => false,
        })
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = (bits / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xFFu8 << (8 - rest);
        a[full] & mask == b[full] & mask
    }
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let ip: IpAddr =
        addr.trim().parse().map_err(|_| format!("{s:?} is not an IP address or CIDR network"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        Some(b) => {
            b.trim().parse::<u8>().ok().filter(|&b| b <= max).ok_or(format!("{s:?}: bad prefix length"))?
        }
        None => max,
    };
    Ok((ip, bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_header(src: [u8; 4], port: u16) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&[127, 0, 0, 1]);
        h.extend_from_slice(&port.to_be_bytes());
        h.extend_from_slice(&7600u16.to_be_bytes());
        h
    }

    #[test]
    fn parses_tcp4_at_every_split() {
        let mut h = v4_header([203, 0, 113, 7], 4242);
        h.extend_from_slice(b"GET / HTTP/1.1\r\n");
        for cut in 0..28 {
            assert_eq!(parse_v2(&h[..cut]), Ok(None), "cut {cut}");
        }
        let p = parse_v2(&h).unwrap().unwrap();
        assert_eq!(p, Header { source: Some("203.0.113.7:4242".parse().unwrap()), len: 28 });
    }

    #[test]
    fn parses_tcp6_local_and_tlvs() {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36 + 5]);
        h.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(&[0; 16]);
        h.extend_from_slice(&[0x12, 0x34, 0, 80]);
        h.extend_from_slice(&[0x04, 0, 2, 0xAA, 0xBB]); // a TLV, skipped
        let p = parse_v2(&h).unwrap().unwrap();
        assert_eq!(p.source, Some("[2001:db8::1]:4660".parse().unwrap()));
        assert_eq!(p.len, h.len());
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse_v2(&local).unwrap().unwrap(), Header { source: None, len: 16 });
    }

    #[test]
    fn refuses_what_is_not_a_v2_header() {
        assert_eq!(parse_v2(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NoSignature));
        assert_eq!(parse_v2(b"PROXY TCP4 1.2.3.4"), Err(ProxyError::NoSignature));
        let mut h = v4_header([1, 2, 3, 4], 1);
        h[12] = 0x11;
        assert_eq!(parse_v2(&h), Err(ProxyError::BadVersion));
        let mut h = v4_header([1, 2, 3, 4], 1);
        h[15] = 4; // claims 4 address bytes for TCP4
        h.truncate(20);
        assert_eq!(parse_v2(&h), Err(ProxyError::BadLength));
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse_v2(&h), Err(ProxyError::BadLength));
    }

    #[test]
    fn trusted_networks() {
        let t = TrustedNets::parse(&["10.0.0.0/8".into(), "192.0.2.7".into(), "fd00::/8".into()]).unwrap();
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(!t.contains("11.1.2.3".parse().unwrap()));
        assert!(t.contains("192.0.2.7".parse().unwrap()));
        assert!(!t.contains("192.0.2.8".parse().unwrap()));
        assert!(t.contains("fd12::1".parse().unwrap()));
        assert!(t.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(TrustedNets::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedNets::parse(&["nonsense".into()]).is_err());
        let odd = TrustedNets::parse(&["10.0.0.0/12".into()]).unwrap();
        assert!(odd.contains("10.15.255.255".parse().unwrap()));
        assert!(!odd.contains("10.16.0.0".parse().unwrap()));
    }
}
