//! `sigil-agent api ...` and `healthcheck`: Workload API clients for people and scripts.
//!
//! The socket: `--socket-path`, else `SPIFFE_ENDPOINT_SOCKET` (a malformed value is an error,
//! WE-9 to WE-11), else the default socket.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use sigil_core::{EndpointAddress, X509Bundle};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::{
    JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest, X509svidResponse,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::DEFAULT_SOCKET_PATH;
use crate::node::write_private;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document per result.
    Json,
}

pub(super) type Client = SpiffeWorkloadApiClient<
    InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn add_header(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    request.metadata_mut().insert(
        crate::workload_api::SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}

/// The socket to use (see the module docs).
pub fn socket_path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let env = std::env::var(sigil_core::endpoint::ENDPOINT_SOCKET_ENV).ok();
    match EndpointAddress::resolve(None, env.as_deref()) {
        None => Ok(PathBuf::from(DEFAULT_SOCKET_PATH)),
        Some(Ok(address)) => address.unix_path().map(Path::to_owned).ok_or_else(|| {
            anyhow!(
                "SPIFFE_ENDPOINT_SOCKET names a tcp address; this client speaks unix sockets only"
            )
        }),
        Some(Err(e)) => bail!(
            "SPIFFE_ENDPOINT_SOCKET={:?} is invalid: {e}",
            env.unwrap_or_default()
        ),
    }
}

pub(super) async fn connect(path: &Path) -> anyhow::Result<Client> {
    let socket = path.to_owned();
    let channel = Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|_| {
            anyhow!(
                "cannot reach the Workload API at {}: is the agent running? (start it with `sigil-agent run`)",
                path.display()
            )
        })?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel,
        add_header as fn(_) -> _,
    ))
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", code_name(e.code()), e.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Unimplemented => "unimplemented",
        _ => "error",
    }
}

fn rfc3339(t: SystemTime) -> String {
    sigil_core::time::format_rfc3339(sigil_core::time::unix_seconds(t))
}

fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// A readable and a JSON summary of each SVID of a response.
fn summarize(response: &X509svidResponse) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    for svid in &response.svids {
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.x509_svid)
            .context("the agent sent an invalid certificate")?;
        let time = |t: i64| sigil_core::time::from_unix_seconds(t).unwrap_or(UNIX_EPOCH);
        let nb = time(leaf.validity().not_before.timestamp());
        let na = time(leaf.validity().not_after.timestamp());
        let serial = leaf.raw_serial_as_string().replace(':', "").to_lowercase();
        let td = sigil_core::SpiffeId::new(&svid.spiffe_id)
            .map(|id| id.trust_domain().to_string())
            .unwrap_or_default();
        let text = format!(
            "SPIFFE ID:    {}\nSerial:       {serial}\nValid from:   {}\nValid until:  {}\nTrust domain: {td}\nIssuer:       {}\n{}",
            svid.spiffe_id,
            rfc3339(nb),
            rfc3339(na),
            leaf.issuer(),
            if svid.hint.is_empty() {
                String::new()
            } else {
                format!("Hint:         {}\n", svid.hint)
            },
        );
        let json = serde_json::json!({
            "id": svid.spiffe_id,
            "spiffe_id": svid.spiffe_id,
            "serial": serial,
            "not_before": rfc3339(nb),
            "not_after": rfc3339(na),
            "trust_domain": td,
            "hint": svid.hint,
        });
        out.push((text, json));
    }
    Ok(out)
}

/// `api fetch x509`.
pub async fn fetch_x509(socket: &Path, write: Option<&Path>, output: Output) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    let response = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .message()
        .await
        .map_err(status)?
        .ok_or_else(|| anyhow!("the agent closed the stream without an answer"))?;
    if let Some(dir) = write {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (i, svid) in response.svids.iter().enumerate() {
            let td = sigil_core::SpiffeId::new(&svid.spiffe_id)?.trust_domain();
            let chain = X509Bundle::from_der(td.clone(), &svid.x509_svid)?;
            let bundle = X509Bundle::from_der(td, &svid.bundle)?;
            std::fs::write(dir.join(format!("svid.{i}.pem")), chain.to_pem())?;
            let key = pem_block("PRIVATE KEY", &svid.x509_svid_key);
            write_private(&dir.join(format!("svid.{i}.key")), key.as_bytes())?;
            std::fs::write(dir.join(format!("bundle.{i}.pem")), bundle.to_pem())?;
        }
    }
    for (i, (text, json)) in summarize(&response)?.into_iter().enumerate() {
        match output {
            Output::Text => out(&format!("{}{text}", if i > 0 { "\n" } else { "" }))?,
            Output::Json => out(&format!("{json}\n"))?,
        }
    }
    if let (Some(dir), Output::Text) = (write, output) {
        out(&format!(
            "\nWrote svid.N.pem, svid.N.key and bundle.N.pem to {}\n",
            dir.display()
        ))?;
    }
    Ok(())
}

pub(super) fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// `api fetch jwt`.
pub async fn fetch_jwt(
    socket: &Path,
    audience: Vec<String>,
    spiffe_id: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    let response = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience,
            spiffe_id: spiffe_id.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner();
    for svid in response.svids {
        match output {
            Output::Text => out(&format!(
                "SPIFFE ID: {}\nToken:     {}\n",
                svid.spiffe_id, svid.svid
            ))?,
            Output::Json => out(&format!(
                "{}\n",
                serde_json::json!({"id": svid.spiffe_id, "spiffe_id": svid.spiffe_id, "token": svid.svid, "hint": svid.hint})
            ))?,
        }
    }
    Ok(())
}

/// `api validate jwt`.
pub async fn validate_jwt(
    socket: &Path,
    audience: String,
    token: String,
    output: Output,
) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    let response = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience,
            svid: token,
        })
        .await
        .map_err(status)?
        .into_inner();
    match output {
        Output::Text => out(&format!("Valid JWT-SVID for {}\n", response.spiffe_id))?,
        Output::Json => out(&format!(
            "{}\n",
            serde_json::json!({"id": response.spiffe_id, "spiffe_id": response.spiffe_id, "valid": true})
        ))?,
    }
    Ok(())
}

/// `api watch`: prints every update of the X509-SVID stream.
pub async fn watch(socket: &Path, output: Output) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(status)?
        .into_inner();
    while let Some(response) = stream.message().await.map_err(status)? {
        for (text, json) in summarize(&response)? {
            match output {
                Output::Text => out(&format!("{text}\n"))?,
                Output::Json => out(&format!("{json}\n"))?,
            }
        }
    }
    Ok(())
}

/// `healthcheck`: the Workload API answers (an identity is not required).
pub async fn healthcheck(socket: &Path, output: Output) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    match client.fetch_x509svid(X509svidRequest {}).await {
        Ok(_) => {}
        Err(e) if e.code() == tonic::Code::PermissionDenied => {}
        Err(e) => return Err(status(e)),
    }
    match output {
        Output::Text => out("agent is healthy\n"),
        Output::Json => out("{\"healthy\":true}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000)),
            "2027-01-15T08:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
