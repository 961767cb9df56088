//! The committed example node config parses and validates (with the certificates and tokens
//! it names, made here); bad configs fail with errors that name the field; a node refuses
//! unauthenticated ports beyond loopback.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use coalesce_server::config::{Config, ConfigError, Loaded};
use coalesce_server::security::TlsConfig;

fn shipped_examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/examples"))
}

/// deploy/examples in a temporary directory, with the certificates and
/// tokens it names (as `coalescectl certs` writes them).
fn example() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", shipped_examples().display()))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(copied.success(), "copying deploy/examples");
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(tls.join("nodes")).unwrap();
    std::fs::create_dir_all(tls.join("tokens")).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(tls.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["coalesce-0".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    std::fs::write(tls.join("nodes/coalesce-0.pem"), cert.pem()).unwrap();
    std::fs::write(tls.join("nodes/coalesce-0.key"), key.serialize_pem()).unwrap();
    for t in ["ingest", "ops"] {
        std::fs::write(tls.join(format!("tokens/{t}.token")), format!("{t}-token-0123456789abcdef")).unwrap();
    }
    let path = dir.path().join("node.toml");
    (dir, path)
}

fn finish(path: &Path, edit: impl Fn(&mut Config)) -> Result<Loaded, ConfigError> {
    let mut config: Config = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut config);
    config.finish(path.parent().unwrap())
}

/// The example directory (with its certificates and tokens), kept for the whole test run.
fn example_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    DIR.get_or_init(example).0.path()
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
    let slow = |t: &mut String| {
        *t = t.replace("snapshot_send_bytes_per_second = 0", "snapshot_send_bytes_per_second = 1000");
    };
    assert!(err(slow).contains("raft.snapshot_send_bytes_per_second"));
    let none = |t: &mut String| *t = t.replace("snapshot_concurrent_receives = 2", "snapshot_concurrent_receives = 0");
    assert!(err(none).contains("raft.snapshot_concurrent_receives"));
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

#[test]
fn the_example_config_loads() {
    let (_dir, path) = example();
    let loaded = Config::load(&path).unwrap();
    assert!(loaded.tls.peer.is_some() && loaded.tls.client.is_some() && loaded.auth.enabled());
    let c = &loaded.config;
    assert_eq!(c.node.http_listen, Some("0.0.0.0:7402".parse().unwrap()));
    assert_eq!(c.kubernetes.renew_interval, Duration::from_secs(2));
    assert_eq!(c.kubernetes.leases, None, "detected, not forced");
    assert_eq!(c.cluster.nodes.len(), 3);
}

#[test]
fn a_too_short_lease_renewal_is_refused() {
    let (_dir, path) = example();
    let err = finish(&path, |c| c.kubernetes.renew_interval = Duration::from_millis(10)).unwrap_err().to_string();
    assert!(err.contains("kubernetes.renew_interval must be at least 100ms"), "{err}");
}

#[test]
fn unauthenticated_ports_beyond_loopback_need_an_explicit_flag() {
    let (_dir, path) = example();
    let err = finish(&path, |c| c.tls.peer = None).unwrap_err().to_string();
    assert!(err.starts_with("node.peer_listen: 0.0.0.0:7401 is not a loopback address"), "{err}");
    assert!(err.contains("node.insecure_peer = true"), "{err}");
    let loaded = finish(&path, |c| {
        c.tls.peer = None;
        c.node.insecure_peer = true;
    })
    .unwrap();
    assert!(loaded.tls.peer.is_none());
    let err = finish(&path, |c| c.auth.tokens.clear()).unwrap_err().to_string();
    assert!(err.starts_with("node.client_listen: 0.0.0.0:7400 is not a loopback address"), "{err}");
    let err = finish(&path, |c| {
        c.auth.tokens.clear();
        c.node.client_listen = "127.0.0.1:7400".parse().unwrap();
    })
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("node.http_listen: 0.0.0.0:7402"), "the HTTP port counts too: {err}");
    finish(&path, |c| {
        c.auth.tokens.clear();
        c.node.insecure = true;
    })
    .unwrap();
    // Loopback needs nothing.
    finish(&path, |c| {
        c.auth.tokens.clear();
        c.tls = TlsConfig::default();
        c.node.peer_listen = "127.0.0.1:7401".parse().unwrap();
        c.node.client_listen = "127.0.0.1:7400".parse().unwrap();
        c.node.http_listen = Some("[::1]:7402".parse().unwrap());
    })
    .unwrap();
}

#[test]
fn peer_certificates_must_name_their_node() {
    let (_dir, path) = example();
    let err = finish(&path, |c| {
        c.tls.peer.as_mut().unwrap().server_name = Some("coalesce-peers".into());
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("server_name") && err.contains("no longer supported"), "{err}");
    let err = finish(&path, |c| c.cluster.nodes[1].name = "node 1".into()).unwrap_err().to_string();
    assert!(err.contains("must be DNS names"), "{err}");
    let err = finish(&path, |c| c.node.name = "coalesce-1".into()).unwrap_err().to_string();
    assert!(err.contains("coalesce-1.pem"), "{{node}} names this node's files: {err}");
}

/// The connection bounds of each port: the client port's from `[api]`, the others' from
/// `[node]` (as the example sets them, which are the defaults); refused values name the field.
#[test]
fn connection_bounds_come_from_api_and_node() {
    use coalesce_raft::connections::ConnLimits;
    let loaded = Config::load(&example_dir().join("node.toml")).expect("example node config is valid");
    let c = &loaded.config;
    assert_eq!(
        c.client_connections(),
        ConnLimits {
            max_connections: 4096,
            max_connections_per_ip: 512,
            first_byte_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(300)),
        }
    );
    let defaults: Config = toml::from_str(
        &std::fs::read_to_string(example_dir().join("node.toml"))
            .expect("example")
            .lines()
            .filter(|l| !l.contains("connection") && !l.contains("max_connections"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .expect("the example without its connection keys");
    assert_eq!(defaults.client_connections(), c.client_connections(), "the example sets the defaults");
    assert_eq!((c.peer_connections().max_connections, c.peer_connections().idle_timeout), (1024, None));
    assert_eq!((c.http_connections().max_connections, c.http_connections().max_connections_per_ip), (256, 64));
    assert_eq!(defaults.peer_connections(), c.peer_connections());
    assert_eq!(defaults.http_connections(), c.http_connections());

    assert!(err(|t| *t = t.replace("max_connections = 4096", "max_connections = 0")).contains("api.max_connections"));
    assert!(
        err(|t| *t = t.replace("http_max_connections = 256", "http_max_connections = 0"))
            .contains("node.http_max_connections")
    );
    assert!(
        err(|t| *t = t.replace("connection_idle_timeout = \"5m\"", "connection_idle_timeout = \"500ms\""))
            .contains("api.connection_idle_timeout")
    );
    let text = std::fs::read_to_string(example_dir().join("node.toml"))
        .expect("example")
        .replace("connection_idle_timeout = \"5m\"", "connection_idle_timeout = \"0s\"");
    let never: Config = toml::from_str(&text).expect("node config");
    assert_eq!(never.client_connections().idle_timeout, None, "0s: never");
}
