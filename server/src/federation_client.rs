//! Fetching a federated trust domain's bundle from its bundle endpoint: one HTTPS GET, within a
//! time limit and a size limit, authenticated as the relationship's profile says.
//!
//! - `https_web` (F-7): the server certificate is checked against the system roots (read
//!   through rustls-native-certs, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`) and must
//!   name the URL's host.
//! - `https_spiffe` (F-8): the server certificate must be an X509-SVID, valid against the
//!   bundle of its trust domain that the caller supplies, with exactly the configured SPIFFE ID.
//!
//! Redirects are not followed (F-9 is a SHOULD): a 3xx answer is a failed fetch that names its
//! `Location`, so the operator can point the relationship there. Never falls back from one
//! profile to the other (F-5).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use sigil_core::tls::{SharedBundles, SpiffeServerVerifier};
use sigil_core::x509_svid::Authorizer;
use sigil_core::{SpiffeId, X509Bundle};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The largest bundle accepted, in bytes.
pub(crate) const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// How long one fetch (connect, handshake, request, whole body) may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A bundle endpoint URL, checked (F-6): `https`, a host, no userinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointUrl {
    uri: http::Uri,
    host: String,
    port: u16,
}

impl EndpointUrl {
    /// Parses and checks `text`.
    ///
    /// # Errors
    ///
    /// Why it is not a bundle endpoint URL.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{text:?}: a bundle endpoint URL must be https://"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{text:?}: a bundle endpoint URL must not carry userinfo (user:password@)"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?}: no host"));
        }
        // What follows the host must be nothing, or a port from 1 to 65535 (`http::Uri` takes
        // `h:99999` and would connect to 443).
        let after_host = authority
            .as_str()
            .get(authority.host().len()..)
            .unwrap_or_default();
        if !after_host.is_empty()
            && after_host
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .is_none_or(|p| p == 0)
        {
            return Err(format!(
                "{text:?}: the port is not a number from 1 to 65535"
            ));
        }
        Ok(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
            uri,
        })
    }

    fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }

    fn host_header(&self) -> String {
        self.uri
            .authority()
            .map_or_else(|| self.host.clone(), |a| a.as_str().to_owned())
    }
}

impl std::fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.uri)
    }
}

/// How the endpoint's certificate is checked.
pub(crate) enum Authentication {
    /// Web PKI, system roots.
    Web,
    /// An X509-SVID with `id`, valid against `bundle` (the bundle of `id`'s trust domain).
    Spiffe {
        /// The endpoint's SPIFFE ID.
        id: SpiffeId,
        /// The authorities of its trust domain.
        bundle: X509Bundle,
    },
}

/// GETs `url`, authenticated as `auth` says; the body of a 200 answer.
///
/// # Errors
///
/// Why not, in words for `federation show` and the log.
pub(crate) async fn fetch(
    url: &EndpointUrl,
    auth: Authentication,
    timeout: Duration,
) -> Result<Bytes, String> {
    match tokio::time::timeout(timeout, fetch_inner(url, auth)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no complete answer within {}s",
            timeout.as_secs_f64()
        )),
    }
}

async fn fetch_inner(url: &EndpointUrl, auth: Authentication) -> Result<Bytes, String> {
    let config = client_config(auth)?;
    let server_name =
        ServerName::try_from(url.host.clone()).map_err(|e| format!("host {:?}: {e}", url.host))?;
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {}", tls_error_text(&e)))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    // Aborted however this ends (the time limit drops this future at any await).
    let connection = AbortOnDrop(tokio::spawn(connection));
    let request = hyper::Request::get(url.path_and_query())
        .header(hyper::header::HOST, url.host_header())
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "sigil-server")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status();
    if status.is_redirection() {
        let location = response
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| "(none)".to_owned(), |l| truncated(l, 200));
        return Err(format!(
            "the endpoint redirects ({status}, Location {location}); redirects are not followed: \
             point the relationship at the final URL"
        ));
    }
    if status != hyper::StatusCode::OK {
        return Err(format!("the endpoint answered {status}"));
    }
    let body = Limited::new(response.into_body(), MAX_BUNDLE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("the answer is larger than {MAX_BUNDLE_BYTES} bytes")
            } else {
                format!("reading the answer: {e}")
            }
        })?
        .to_bytes();
    drop(connection);
    Ok(body)
}

/// Aborts the task when dropped.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// At most `max` characters of `text` (what a remote endpoint says goes into the log and the
/// store).
fn truncated(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

fn client_config(auth: Authentication) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut config = match auth {
        Authentication::Web => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
        Authentication::Spiffe { id, bundle } => {
            let verifier = SpiffeServerVerifier::new(
                SharedBundles::from_bundle(bundle),
                Authorizer::exact(id),
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The system's root certificates, read once per process (until they are found, every fetch
/// tries: a machine without them yet may get them).
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    if let Some(roots) = ROOTS.get() {
        return Ok(roots.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "no system root certificates to check an https_web endpoint with \
             (install ca-certificates, or set SSL_CERT_FILE){}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join("; "))
            }
        ));
    }
    Ok(ROOTS.get_or_init(|| Arc::new(roots)).clone())
}

/// The reason inside a rustls error, without the io wrapping.
fn tls_error_text(error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls.to_string(),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f6_endpoint_urls_are_https_without_userinfo() {
        let url = EndpointUrl::parse("https://bundle.example.org:8443/td/bundle?x=1").unwrap();
        assert_eq!(url.host, "bundle.example.org");
        assert_eq!(url.port, 8443);
        assert_eq!(url.path_and_query(), "/td/bundle?x=1");
        let url = EndpointUrl::parse("https://127.0.0.1").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path_and_query()),
            ("127.0.0.1", 443, "/")
        );
        let url = EndpointUrl::parse("https://[::1]:9/").unwrap();
        assert_eq!(url.host, "::1");
        for (bad, why) in [
            ("http://bundle.example.org/", "must be https"),
            ("https://user:pw@bundle.example.org/", "userinfo"),
            ("https://user@bundle.example.org/", "userinfo"),
            ("bundle.example.org", "must be https"),
            ("https:///x", "not a URL"),
            ("not a url", "not a URL"),
            ("https://h:99999/", "port"),
            ("https://h:0/", "port"),
        ] {
            let err = EndpointUrl::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
