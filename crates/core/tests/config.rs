//! The committed example configs parse and validate.

use coalesce_core::merge::MergeOp;
use coalesce_core::stream::{KeyOverflow, OverflowPolicy, StreamsFile};

#[test]
fn example_streams_file_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/examples/streams.toml");
    let text = std::fs::read_to_string(path).expect("example config exists");
    let table = StreamsFile::parse(&text)
        .and_then(|f| f.validate(&["file", "postgres", "http", "grpc"]))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let names: Vec<&str> = table.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        ["account-changes", "alert-groups", "page-visitors", "profile-patches", "query-counts", "query-latency"]
    );
    let acct = table.get("account-changes").unwrap();
    assert_eq!(acct.rules.op, MergeOp::Latest);
    assert_eq!(acct.rules.window.debounce_ms, Some(30_000));
    assert_eq!(acct.rules.window.staleness_bound_ms(), 120_000);
    assert_eq!(table.get("alert-groups").unwrap().rules.overflow, OverflowPolicy::FlushEarly);
    assert_eq!(table.get("profile-patches").unwrap().rules.key_overflow, KeyOverflow::Reject);
    assert_eq!(table.get("alert-groups").unwrap().rules.key_overflow, KeyOverflow::FlushEarly, "the default");
    assert_eq!(table.limits().max_keys, 1_000_000);
}
