//! The committed example node config parses and validates; bad configs fail with errors that
//! name the field.

use std::path::Path;

use coalesce_server::config::Config;

fn example_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/examples"))
}

#[test]
fn example_node_config_is_valid() {
    let loaded = Config::load(&example_dir().join("node.toml")).expect("example node config is valid");
    assert_eq!(loaded.config.cluster.shards, 64);
    assert_eq!(loaded.config.cluster_spec().placement(0).len(), 3);
    assert_eq!(loaded.config.raft_timing().election_max_ms, 350);
    assert!(loaded.streams.get("query-counts").is_some());
}

fn err(mutate: impl Fn(&mut String)) -> String {
    let mut text = std::fs::read_to_string(example_dir().join("node.toml")).expect("example");
    mutate(&mut text);
    match toml::from_str::<Config>(&text) {
        Err(e) => e.to_string(),
        Ok(c) => c.finish(example_dir()).expect_err("should be invalid").to_string(),
    }
}

#[test]
fn invalid_configs_name_the_field() {
    assert!(err(|t| *t = t.replace("shards = 64", "shards = 0")).contains("cluster.shards"));
    assert!(err(|t| *t = t.replace("replication = 3", "replication = 4")).contains("cluster.replication"));
    assert!(
        err(|t| *t = t.replace("name = \"coalesce-0\"                 #", "name = \"nobody\" #")).contains("node.name")
    );
    assert!(err(|t| *t = t.replace("heartbeat = \"100ms\"", "heartbeat = \"1s\"")).contains("raft"));
    assert!(err(|t| t.push_str("\n[extra]\nx = 1\n")).contains("unknown field"));
    assert!(
        err(|t| *t = t.replace("streams_file = \"streams.toml\"", "streams_file = \"missing.toml\""))
            .contains("missing.toml")
    );
}

/// The four cases of DESIGN.md, as shipped in deploy/examples/cases: each validates with the
/// example node config (64 shards).
#[test]
fn example_cases_are_valid() {
    let node = std::fs::read_to_string(example_dir().join("node.toml")).expect("example");
    for case in ["write-coalescing", "rate-limited-api", "bulk-postgres", "alert-digest"] {
        let text = node.replace("streams_file = \"streams.toml\"", &format!("streams_file = \"cases/{case}.toml\""));
        let config: Config = toml::from_str(&text).expect("node config");
        let loaded = config.finish(example_dir()).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(!loaded.sinks.is_empty(), "{case} declares sinks");
        assert!(loaded.sinks.iter().all(|s| !s.streams.is_empty()), "{case}: every sink is fed");
    }
}

/// A stream's `fetch` table is checked with the streams file: the bridge needs a latest-wins
/// stream, and the example's fetch upstream loads.
#[test]
fn fetch_tables_are_checked() {
    let loaded = Config::load(&example_dir().join("node.toml")).expect("example node config is valid");
    let fetch = &loaded.fetch["account-changes"];
    assert_eq!((fetch.ttl.as_secs(), fetch.on_window_close), (1, false));

    let dir = tempfile::tempdir().expect("tempdir");
    let node = std::fs::read_to_string(example_dir().join("node.toml")).expect("example");
    std::fs::write(
        dir.path().join("streams.toml"),
        "[streams.counts]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1s\" }\n\n\
         [streams.counts.fetch]\nurl = \"http://api/{key}\"\non_window_close = true\n",
    )
    .expect("write");
    let config: Config = toml::from_str(&node).expect("node config");
    let e = config.finish(dir.path()).expect_err("a sum stream cannot bridge").to_string();
    assert!(e.contains("streams.counts.fetch: on_window_close replaces a latest-wins value"), "{e}");
}
