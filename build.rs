//! Compiles Milvus's vendored protocol definitions (proto/milvus, see its README) into the gRPC
//! client of the Milvus index backend. `protox` parses them in Rust, so no `protoc` is needed and
//! nothing is downloaded.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = "proto/milvus";
    println!("cargo:rerun-if-changed={dir}");
    let files = protox::compile([format!("{dir}/milvus.proto")], [dir])?;
    // No transport helpers: their `connect` constructor would clash with Milvus's own `Connect` RPC.
    tonic_prost_build::configure().build_server(false).build_transport(false).compile_fds(files)?;
    Ok(())
}
