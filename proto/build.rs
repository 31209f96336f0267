//! Generates the Rust code for Sigil's protos with protox, a pure-Rust protobuf compiler, so that
//! no `protoc` is needed to build or test.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "workload.proto",
        "sigil/node/v1/node.proto",
        "sigil/admin/v1/admin.proto",
        "sigil/audit/v1/audit.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    // Every (service, method) the protos define, for the servers' metrics: only these become
    // label values, whatever path a caller sends.
    let mut methods = String::from("&[\n");
    for file in &fds.file {
        let package = file.package.as_deref().unwrap_or_default();
        for service in &file.service {
            let name = service.name.as_deref().unwrap_or_default();
            let full = if package.is_empty() {
                name.to_owned()
            } else {
                format!("{package}.{name}")
            };
            for method in &service.method {
                methods.push_str(&format!(
                    "    ({full:?}, {:?}),\n",
                    method.name.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    methods.push_str("]\n");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("rpc_methods.rs"), methods)?;
    tonic_prost_build::configure()
        // A map in key order, so that one response always encodes to the same bytes: the
        // agent shares one encoding between the streams it goes to and compares encodings to
        // send only what changed.
        .btree_map(".X509SVIDResponse.federated_bundles")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // compile_fds does not emit rerun-if-changed lines itself.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
