//! Compiles `caduceus/fl/v1/federation.proto` with protox (pure Rust; no system `protoc`) and generates
//! prost messages plus tonic client and server code.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "caduceus/fl/v1/federation.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".caduceus.fl.v1.DataChunk")
        .compile_fds(fds)?;
    Ok(())
}
