//! Clients of the three APIs, as their real users reach them: the admin API over its Unix
//! socket, the Workload API over the agent's socket (with the `workload.spiffe.io` header), and
//! the node API over TCP with mTLS as a simulated agent (join-token attestation, then its SVID).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil_core::tls::{SharedBundles, SpiffeServerVerifier};
use sigil_core::x509_svid::Authorizer;
use sigil_core::{SpiffeId, TrustDomain, X509Bundle};
use sigil_proto::admin::admin_client::AdminClient;
use sigil_proto::admin::{self, entry_result};
use sigil_proto::node::AttestAgentRequest;
use sigil_proto::node::node_client::NodeClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// The trust domain of every server the harness runs.
pub(crate) const TRUST_DOMAIN: &str = "bench.example";

/// The largest Workload API answer the harness reads (an agent with 10,000 identities for one
/// workload answers with about 11 MB).
const MAX_WORKLOAD_MESSAGE: usize = 64 * 1024 * 1024;

/// A tonic channel over a fresh connection to the Unix socket at `path`.
pub(crate) async fn unix_channel(path: PathBuf) -> anyhow::Result<Channel> {
    sigil_proto::client::unix_channel(path)
        .await
        .context("cannot connect over the unix socket")
}

/// An admin API client over a fresh connection.
pub(crate) async fn admin(socket: PathBuf) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(unix_channel(socket).await?)
        .max_decoding_message_size(MAX_WORKLOAD_MESSAGE)
        .max_encoding_message_size(MAX_WORKLOAD_MESSAGE))
}

/// A Workload API client.
pub(crate) type WorkloadClient = sigil_proto::client::WorkloadApiClient;

/// A Workload API client over a fresh connection to `socket`.
pub(crate) async fn workload(socket: PathBuf) -> anyhow::Result<WorkloadClient> {
    Ok(sigil_proto::client::workload_api(socket)
        .await
        .context("cannot connect to the workload api")?
        .max_decoding_message_size(MAX_WORKLOAD_MESSAGE))
}

/// The harness's trust domain.
pub(crate) fn trust_domain() -> anyhow::Result<TrustDomain> {
    Ok(TrustDomain::new(TRUST_DOMAIN)?)
}

/// A PKCS#10 CSR (DER) for `key`, with an empty subject (the server ignores it).
pub(crate) fn csr(key: &KeyPair) -> anyhow::Result<Vec<u8>> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// A node API client: the server must present `spiffe://TD/sigil/server` chaining to
/// `bundle`; `identity` is the client SVID to present (none for `AttestAgent`).
pub(crate) async fn node(
    addr: SocketAddr,
    bundle: &X509Bundle,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<NodeClient<Channel>> {
    if !addr.ip().is_loopback() {
        bail!("the harness only talks to loopback addresses, not {addr}");
    }
    let server_id = trust_domain()?.id(["sigil", "server"])?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            SharedBundles::from_bundle(bundle.clone()),
            Authorizer::exact(server_id),
        )));
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("sigil-server")?;
    let channel = Endpoint::try_from("http://sigil-server")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .context("cannot connect to the node api")?;
    Ok(NodeClient::new(channel)
        .max_decoding_message_size(MAX_WORKLOAD_MESSAGE)
        .max_encoding_message_size(MAX_WORKLOAD_MESSAGE))
}

/// A simulated agent: attested over the real node API with a join token; it holds its SVID.
#[derive(Debug)]
pub(crate) struct SimAgent {
    /// Its SPIFFE ID.
    pub(crate) id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

// === impl SimAgent ===

impl SimAgent {
    /// Attests with `token` through `attest` (a client without a certificate).
    pub(crate) async fn attest(
        attest: &mut NodeClient<Channel>,
        token: &str,
    ) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let svid = attest
            .attest_agent(AttestAgentRequest {
                join_token: token.to_owned(),
                csr: csr(&key)?,
            })
            .await?
            .into_inner()
            .svid
            .context("no svid in the attestation answer")?;
        let chain = X509Bundle::from_der(trust_domain()?, &svid.cert_chain)?
            .authorities()
            .to_vec();
        Ok(Self {
            id: SpiffeId::new(&svid.spiffe_id)?,
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// A node API client presenting this agent's SVID (its own connection).
    pub(crate) async fn client(
        &self,
        addr: SocketAddr,
        bundle: &X509Bundle,
    ) -> anyhow::Result<NodeClient<Channel>> {
        node(
            addr,
            bundle,
            Some((
                self.chain.clone(),
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )),
        )
        .await
    }
}

/// A registration entry for the admin API.
pub(crate) fn entry(spiffe_id: &str, parent_id: &str, selectors: &[String]) -> admin::Entry {
    admin::Entry {
        spiffe_id: spiffe_id.to_owned(),
        parent_id: parent_id.to_owned(),
        selectors: selectors.to_vec(),
        ..Default::default()
    }
}

/// Creates `entries` in one call; every one must succeed.
pub(crate) async fn create_entries(
    admin: &mut AdminClient<Channel>,
    entries: Vec<admin::Entry>,
) -> anyhow::Result<Vec<admin::Entry>> {
    let results = admin
        .create_entries(admin::CreateEntriesRequest { entries })
        .await?
        .into_inner()
        .results;
    results
        .into_iter()
        .map(|r| match r.result {
            Some(entry_result::Result::Entry(e)) => Ok(e),
            Some(entry_result::Result::Error(e)) => bail!("entry refused: {}", e.message),
            None => bail!("entry result missing"),
        })
        .collect()
}

/// A join token; returns it and the SPIFFE ID the agent that uses it will get.
pub(crate) async fn join_token(
    admin: &mut AdminClient<Channel>,
) -> anyhow::Result<(String, String)> {
    let token = admin
        .generate_join_token(admin::GenerateJoinTokenRequest {
            ttl_seconds: 3600,
            spiffe_id: String::new(),
        })
        .await?
        .into_inner();
    Ok((token.token, token.agent_spiffe_id))
}

/// The trust domain's X.509 bundle, through the admin API.
pub(crate) async fn bundle(admin: &mut AdminClient<Channel>) -> anyhow::Result<X509Bundle> {
    let pem = admin
        .get_bundle(admin::GetBundleRequest {})
        .await?
        .into_inner()
        .pem;
    Ok(X509Bundle::from_pem(trust_domain()?, pem.as_bytes())?)
}
