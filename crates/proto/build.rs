//! Generates Rust from `proto/coalesce/v1/*.proto` with a vendored protoc (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["coalesce/v1/peer.proto", "coalesce/v1/coalesce.proto"].map(|f| root.join(f));
    // Relative paths (resolved against this package's directory): two checkouts that share a
    // target directory (CI's clean clone and a working tree) then each notice their own edits.
    for f in ["coalesce/v1/peer.proto", "coalesce/v1/coalesce.proto"] {
        println!("cargo:rerun-if-changed=../../proto/{f}");
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // For gRPC server reflection on the client port.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    config.file_descriptor_set_path(out.join("coalesce_descriptor.bin"));
    // Undecodable messages are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
    tonic_prost_build::configure().codec_path("crate::codec::Codec").compile_with_config(config, &files, &[root])?;
    Ok(())
}
