//! Connecting to the APIs Sigil serves on Unix sockets: the SPIFFE Workload API (the agent's)
//! and the admin API (the server's). One place for what every client of them needs: a tonic
//! channel over a Unix socket, and the `workload.spiffe.io: true` header the Workload API
//! requires of every call (SPIFFE Workload Endpoint, section 6.2).

use std::path::PathBuf;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

/// The interceptor that adds the Workload API's security header.
pub type SecurityHeader = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// A Workload API client that sends the security header on every call.
pub type WorkloadApiClient = SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>;

/// Adds `workload.spiffe.io: true` to `request`.
///
/// # Errors
///
/// Never; the signature is tonic's interceptor's.
pub fn security_header(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}

/// A tonic channel over a new connection to the Unix socket at `path` (reconnecting to the
/// same path when the connection breaks).
///
/// # Errors
///
/// The socket cannot be connected to.
pub async fn unix_channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

/// A Workload API client over a new connection to the agent's socket at `path`.
///
/// # Errors
///
/// The socket cannot be connected to.
pub async fn workload_api(
    path: impl Into<PathBuf>,
) -> Result<WorkloadApiClient, tonic::transport::Error> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        unix_channel(path).await?,
        security_header as SecurityHeader,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn the_security_header_is_added() {
        let request = security_header(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("workload.spiffe.io").unwrap(),
            "true"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(workload_api(dir.path().join("none.sock")).await.is_err());
    }
}
