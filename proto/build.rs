//! Compiles `caduceus/fl/v1/federation.proto` (trainer ↔ aggregator) and `caduceus/fl/v1/site.proto`
//! (site agent ↔ coordinator) with protox (pure Rust; no system `protoc`) and generates prost messages
//! plus tonic client and server code.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["caduceus/fl/v1/federation.proto", "caduceus/fl/v1/site.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".caduceus.fl.v1.DataChunk")
        .compile_fds(fds)?;
    Ok(())
}
