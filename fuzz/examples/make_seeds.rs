//! Writes the hand-made seeds (coalesce_fuzz::seeds) to `fuzz/corpus/<target>/seed-<name>`.
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`; files the fuzzer added
//! beside them are left alone.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in coalesce_fuzz::seeds::all() {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), &bytes)?;
        }
    }
    // The shipped example configs are seeds of the config target too.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (name, path) in [
        ("example-streams", "deploy/examples/streams.toml"),
        ("example-write-coalescing", "deploy/examples/cases/write-coalescing.toml"),
        ("example-rate-limited-api", "deploy/examples/cases/rate-limited-api.toml"),
        ("example-alert-digest", "deploy/examples/cases/alert-digest.toml"),
        ("example-bulk-postgres", "deploy/examples/cases/bulk-postgres.toml"),
        ("example-k8s", "deploy/k8s/base/config/streams.toml"),
    ] {
        std::fs::copy(root.join(path), corpus.join("streams_config").join(format!("seed-{name}")))?;
    }
    Ok(())
}
