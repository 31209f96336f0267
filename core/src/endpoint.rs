//! Workload API endpoint addresses: the `SPIFFE_ENDPOINT_SOCKET` format
//! ([SPIFFE Workload Endpoint §4], WE-8 to WE-11).
//!
//! Two forms exist: `unix:///abs/path/to/socket` (also `unix:/abs/path`) and `tcp://IP:PORT`.
//! The parser is as strict as the standard: no authority on `unix:`, no DNS names on `tcp:`, no
//! query, fragment or userinfo anywhere. (go-spiffe accepts `unix://host/path`; Sigil does not.)
//!
//! [SPIFFE Workload Endpoint §4]: https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE_Workload_Endpoint.md

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The environment variable that names the Workload API endpoint (WE-8).
pub const ENDPOINT_SOCKET_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Why a string is not a valid Workload API endpoint address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The address is empty.
    #[error("endpoint address cannot be empty")]
    Empty,
    /// The scheme is neither `unix` nor `tcp` (WE-9).
    #[error("endpoint address scheme must be unix or tcp")]
    UnsupportedScheme,
    /// The address has a query component.
    #[error("endpoint address cannot have a query")]
    Query,
    /// The address has a fragment component.
    #[error("endpoint address cannot have a fragment")]
    Fragment,
    /// A `unix:` address names a host or userinfo (WE-10).
    #[error("unix endpoint address cannot have an authority (use unix:///absolute/path)")]
    UnixAuthority,
    /// A `unix:` address has a relative or empty path (WE-10).
    #[error("unix endpoint address must have an absolute path")]
    UnixRelativePath,
    /// A `unix:` path has an invalid percent-encoding.
    #[error("unix endpoint address has an invalid percent-encoding")]
    BadPercentEncoding,
    /// A `tcp:` address is not of the form `tcp://IP:PORT` (WE-11).
    #[error("tcp endpoint address must be tcp://IP:PORT, with an IP address and nothing else")]
    TcpForm,
    /// A `tcp:` address has userinfo (WE-11).
    #[error("tcp endpoint address cannot have userinfo")]
    TcpUserInfo,
    /// A `tcp:` address has a path (WE-11).
    #[error("tcp endpoint address cannot have a path")]
    TcpPath,
    /// A `tcp:` host is a DNS name rather than an IP address (WE-11).
    #[error("tcp endpoint address host must be an IP address, not a name")]
    TcpHostNotIp,
    /// A `tcp:` address has no port, or port 0 (WE-11).
    #[error("tcp endpoint address must have a non-zero port")]
    TcpPort,
}

/// Where a Workload API endpoint listens.
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndpointAddress {
    /// A Unix domain socket at an absolute path.
    Unix(PathBuf),
    /// A TCP address (an IP address and a port).
    Tcp(SocketAddr),
}

// === impl EndpointAddress ===

impl EndpointAddress {
    /// Parses an address in the `SPIFFE_ENDPOINT_SOCKET` format (WE-9 to WE-11).
    pub fn parse(address: &str) -> Result<Self, EndpointError> {
        if address.is_empty() {
            return Err(EndpointError::Empty);
        }
        if address.contains('#') {
            return Err(EndpointError::Fragment);
        }
        if address.contains('?') {
            return Err(EndpointError::Query);
        }
        if let Some(rest) = address.strip_prefix("unix:") {
            return parse_unix(rest);
        }
        if let Some(rest) = address.strip_prefix("tcp:") {
            return parse_tcp(rest);
        }
        Err(EndpointError::UnsupportedScheme)
    }

    /// Picks the endpoint the way clients must (WE-8): the explicitly configured address if there
    /// is one, else the value of `SPIFFE_ENDPOINT_SOCKET` (passed in, so that this stays a pure
    /// function), else `None`.
    pub fn resolve(
        explicit: Option<&str>,
        env_value: Option<&str>,
    ) -> Option<Result<Self, EndpointError>> {
        explicit.or(env_value).map(Self::parse)
    }

    /// A `unix:` address for a socket path, which must be absolute.
    pub fn unix(path: impl Into<PathBuf>) -> Result<Self, EndpointError> {
        let path = path.into();
        if !path.is_absolute() {
            return Err(EndpointError::UnixRelativePath);
        }
        Ok(Self::Unix(path))
    }

    /// The socket path, for a `unix:` address.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Self::Unix(path) => Some(path),
            Self::Tcp(_) => None,
        }
    }
}

impl FromStr for EndpointAddress {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Prints the canonical form, `unix:///path` (percent-encoding bytes that need it) or
/// `tcp://IP:PORT`, which [`EndpointAddress::parse`] reads back to the same address.
impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => {
                f.write_str("unix://")?;
                for &b in path.as_os_str().as_bytes() {
                    if is_path_byte(b) {
                        write!(f, "{}", char::from(b))?;
                    } else {
                        write!(f, "%{b:02X}")?;
                    }
                }
                Ok(())
            }
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

impl fmt::Debug for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EndpointAddress({self})")
    }
}

// === parsing ===

/// `rest` is everything after `unix:`: either `//` + empty authority + absolute path, or an
/// absolute path directly.
fn parse_unix(rest: &str) -> Result<EndpointAddress, EndpointError> {
    let path = match rest.strip_prefix("//") {
        Some(after) => {
            if !after.starts_with('/') {
                // `unix://host/path`, `unix://u@/p` or `unix://`: an authority, or nothing.
                return Err(if after.is_empty() {
                    EndpointError::UnixRelativePath
                } else {
                    EndpointError::UnixAuthority
                });
            }
            after
        }
        None => rest,
    };
    if !path.starts_with('/') {
        return Err(EndpointError::UnixRelativePath);
    }
    let bytes = percent_decode(path)?;
    Ok(EndpointAddress::Unix(PathBuf::from(OsString::from_vec(
        bytes,
    ))))
}

fn parse_tcp(rest: &str) -> Result<EndpointAddress, EndpointError> {
    let authority = rest.strip_prefix("//").ok_or(EndpointError::TcpForm)?;
    let (authority, path) = match authority.find('/') {
        Some(i) => authority.split_at(i),
        None => (authority, ""),
    };
    if !path.is_empty() {
        return Err(EndpointError::TcpPath);
    }
    if authority.contains('@') {
        return Err(EndpointError::TcpUserInfo);
    }
    if let Ok(addr) = SocketAddr::from_str(authority) {
        if addr.port() == 0 {
            return Err(EndpointError::TcpPort);
        }
        return Ok(EndpointAddress::Tcp(addr));
    }
    // Not IP:PORT. Say which half is wrong.
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, rest)) => (host, rest.strip_prefix(':')),
            None => return Err(EndpointError::TcpForm),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(EndpointError::TcpForm);
    }
    if host.parse::<IpAddr>().is_err() {
        return Err(EndpointError::TcpHostNotIp);
    }
    match port.map(str::parse::<u16>) {
        // A valid IP and a valid port that still do not form IP:PORT (an unbracketed IPv6).
        Some(Ok(_)) => Err(EndpointError::TcpForm),
        _ => Err(EndpointError::TcpPort),
    }
}

fn percent_decode(s: &str) -> Result<Vec<u8>, EndpointError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(EndpointError::BadPercentEncoding)?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Bytes that may appear unencoded in a URI path (RFC 3986 `pchar` and `/`, minus `%`).
fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'/' | b'-'
                | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use EndpointError as E;

    #[test]
    fn we_10_unix_accepted() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "WE-10 triple slash",
                "unix:///run/spire/agent.sock",
                "/run/spire/agent.sock",
            ),
            (
                "WE-10 single slash",
                "unix:/tmp/agent.sock",
                "/tmp/agent.sock",
            ),
            (
                "WE-10 percent-encoded space",
                "unix:///tmp/my%20dir/a.sock",
                "/tmp/my dir/a.sock",
            ),
        ];
        for (item, input, path) in cases {
            let addr = EndpointAddress::parse(input).unwrap_or_else(|e| panic!("{item}: {e}"));
            assert_eq!(addr.unix_path(), Some(Path::new(path)), "{item}");
            // Display then parse gives the same address back.
            assert_eq!(
                EndpointAddress::parse(&addr.to_string()).unwrap(),
                addr,
                "{item}"
            );
        }
    }

    #[test]
    fn we_10_unix_rejected() {
        let cases: &[(&str, &str, EndpointError)] = &[
            ("WE-10 host", "unix://host/path", E::UnixAuthority),
            ("WE-10 userinfo", "unix://u@/p", E::UnixAuthority),
            ("WE-10 relative", "unix:rel.sock", E::UnixRelativePath),
            ("WE-10 empty path", "unix://", E::UnixRelativePath),
            ("WE-10 bare scheme", "unix:", E::UnixRelativePath),
            ("WE-10 query", "unix:///p?x", E::Query),
            ("WE-10 fragment", "unix:///p#f", E::Fragment),
            ("WE-10 bad escape", "unix:///p%zz", E::BadPercentEncoding),
            ("WE-10 short escape", "unix:///p%2", E::BadPercentEncoding),
        ];
        for (item, input, want) in cases {
            assert_eq!(
                EndpointAddress::parse(input).as_ref(),
                Err(want),
                "{item}: {input}"
            );
        }
    }

    #[test]
    fn we_11_tcp_accepted() {
        let v4 = EndpointAddress::parse("tcp://127.0.0.1:8000").unwrap();
        assert_eq!(v4, EndpointAddress::Tcp("127.0.0.1:8000".parse().unwrap()));
        assert_eq!(v4.to_string(), "tcp://127.0.0.1:8000");
        let v6 = EndpointAddress::parse("tcp://[::1]:8000").unwrap();
        assert_eq!(v6, EndpointAddress::Tcp("[::1]:8000".parse().unwrap()));
        assert_eq!(EndpointAddress::parse(&v6.to_string()).unwrap(), v6);
        assert_eq!(v6.unix_path(), None);
    }

    #[test]
    fn we_11_tcp_rejected() {
        let cases: &[(&str, &str, EndpointError)] = &[
            ("WE-11 path", "tcp://127.0.0.1:8000/foo", E::TcpPath),
            ("WE-11 trailing slash", "tcp://127.0.0.1:8000/", E::TcpPath),
            ("WE-11 dns name", "tcp://localhost:8000", E::TcpHostNotIp),
            ("WE-11 no port", "tcp://127.0.0.1", E::TcpPort),
            ("WE-11 empty port", "tcp://127.0.0.1:", E::TcpPort),
            ("WE-11 port zero", "tcp://127.0.0.1:0", E::TcpPort),
            ("WE-11 port too big", "tcp://127.0.0.1:70000", E::TcpPort),
            ("WE-11 ipv6 no port", "tcp://[::1]", E::TcpPort),
            ("WE-11 userinfo", "tcp://u@127.0.0.1:8000", E::TcpUserInfo),
            ("WE-11 query", "tcp://127.0.0.1:8000?x", E::Query),
            ("WE-11 fragment", "tcp://127.0.0.1:8000#f", E::Fragment),
            ("WE-11 no slashes", "tcp:127.0.0.1:8000", E::TcpForm),
            ("WE-11 empty", "tcp://", E::TcpForm),
            ("WE-11 unbracketed ipv6", "tcp://::1:8000", E::TcpForm),
            ("WE-11 unclosed bracket", "tcp://[::1:8000", E::TcpForm),
            (
                "WE-11 dns name no port",
                "tcp://example.org",
                E::TcpHostNotIp,
            ),
        ];
        for (item, input, want) in cases {
            assert_eq!(
                EndpointAddress::parse(input).as_ref(),
                Err(want),
                "{item}: {input}"
            );
        }
    }

    #[test]
    fn we_9_only_unix_and_tcp() {
        for input in [
            "http://127.0.0.1:8000",
            "UNIX:///tmp/a.sock",
            "/tmp/agent.sock",
            "npipe:foo",
        ] {
            assert_eq!(
                EndpointAddress::parse(input),
                Err(E::UnsupportedScheme),
                "WE-9: {input}"
            );
        }
        assert_eq!(EndpointAddress::parse(""), Err(E::Empty));
    }

    #[test]
    fn we_8_explicit_configuration_wins_over_the_environment() {
        let explicit = "unix:///explicit.sock";
        let env = "unix:///env.sock";
        let got = EndpointAddress::resolve(Some(explicit), Some(env))
            .unwrap()
            .unwrap();
        assert_eq!(got.unix_path(), Some(Path::new("/explicit.sock")));
        let got = EndpointAddress::resolve(None, Some(env)).unwrap().unwrap();
        assert_eq!(got.unix_path(), Some(Path::new("/env.sock")));
        assert!(EndpointAddress::resolve(None, None).is_none());
        assert_eq!(
            EndpointAddress::resolve(None, Some("unix:rel")).unwrap(),
            Err(E::UnixRelativePath)
        );
    }

    #[test]
    fn unix_constructor_requires_absolute_path() {
        assert!(EndpointAddress::unix("/tmp/a.sock").is_ok());
        assert_eq!(EndpointAddress::unix("a.sock"), Err(E::UnixRelativePath));
        let odd = EndpointAddress::unix("/tmp/a b%?#.sock").unwrap();
        assert_eq!(odd.to_string(), "unix:///tmp/a%20b%25%3F%23.sock");
        assert_eq!(EndpointAddress::parse(&odd.to_string()).unwrap(), odd);
    }
}
