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
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // compile_fds does not emit rerun-if-changed lines itself.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
