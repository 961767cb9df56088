//! Test-only failpoints: deliberate defects switched on by the environment variable
//! `COALESCE_FAILPOINTS` (comma-separated names), read once at start. They exist to prove that
//! the checks catch what they claim to catch (a checker that cannot fail proves nothing); never
//! set them in production — a node logs an error at start when any is on.
//!
//! | name | defect |
//! |---|---|
//! | `double_seal` | sealing emits every output twice, under two seqs (double counting) |
//! | `skip_validation` | commands are not validated before they are proposed or when a peer replicates them (apply still validates: the way to put an entry into the log that stops its group) |
//! | `runtime` | the HTTP port serves `PUT /failpoints/slow_disk` (every fsync takes longer: the chaos tool's slow-disk fault) |

use std::sync::LazyLock;

static ACTIVE: LazyLock<Vec<String>> = LazyLock::new(|| {
    let names: Vec<String> = std::env::var("COALESCE_FAILPOINTS")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if !names.is_empty() {
        tracing::error!(failpoints = ?names, "TEST-ONLY FAILPOINTS ARE ON: this node is deliberately broken");
    }
    names
});

/// Whether the failpoint `name` is on.
pub fn active(name: &str) -> bool {
    ACTIVE.iter().any(|n| n == name)
}

/// Reads the environment now (so the warning is logged at start, not at first use).
pub fn init() {
    LazyLock::force(&ACTIVE);
}
