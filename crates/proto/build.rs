//! Generates the gRPC code; protoc comes from the vendored crate so a build needs nothing installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY of intent: build scripts are single-threaded here.
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure().compile_protos(&["proto/ssp.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/ssp.proto");
    Ok(())
}
