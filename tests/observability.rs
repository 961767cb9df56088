//! Observability against a real Prometheus (Debian's `prometheus`, installed by
//! scripts/setup.sh): it scrapes a 3-node cluster under load every second and evaluates the
//! alert rules of `deploy/k8s/base/prometheusrule.yaml`. The dashboard's coalesce-ratio and
//! staleness queries must return sane values; every rule must evaluate without error; no page
//! must fire on a healthy cluster; every metric the dashboard and the alerts name must exist in
//! a scrape; `promtool check rules` and `promtool check metrics` must pass. The probes
//! (`/livez`, `/readyz`) answer as documented.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::Cluster;

const STREAMS: &str = "[sinks.lines]\nkind = \"file\"\npath = \"../outputs-{node}.jsonl\"\n\n\
                       [streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"500ms\" }\nsinks = [\"lines\"]\n";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A program installed by scripts/setup.sh.
fn installed(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/setup.sh (it installs Debian's prometheus package)");
}

/// The PrometheusRule's `spec` as a plain Prometheus rule file (its lines after `spec:`,
/// dedented), so the rules CI checks are exactly the ones deployed.
fn rule_file() -> String {
    let text = std::fs::read_to_string(repo().join("deploy/k8s/base/prometheusrule.yaml")).unwrap();
    let mut lines = text.lines().skip_while(|l| *l != "spec:");
    assert_eq!(lines.next(), Some("spec:"), "prometheusrule.yaml has a top-level spec");
    lines.map(|l| l.strip_prefix("  ").unwrap_or(l)).collect::<Vec<_>>().join("\n") + "\n"
}

/// Every `coalesce_*` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("coalesce_") {
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/' || c == '-' || c == '.') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Families (and their histogram series) listed by `# TYPE` lines of a scrape.
/// Metrics the alerts use that a node exports only for its TLS ports.
const ONLY_WITH_TLS: &[&str] = &["coalesce_tls_cert_expiry_timestamp_seconds", "coalesce_tls_reloads_total"];

fn scraped_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[String], rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
        let targets = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
        std::fs::write(
            dir.path().join("prometheus.yaml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['rules.yaml']\n\
                 scrape_configs:\n  - job_name: coalesce\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        let port = coalesce_cli::local::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(installed("prometheus"))
            .arg(format!("--config.file={}", dir.path().join("prometheus.yaml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    /// The result vector of an instant query (empty on errors, which are printed).
    async fn query(&self, http: &reqwest::Client, q: &str) -> Vec<serde_json::Value> {
        let r = http.get(format!("{}/api/v1/query", self.url)).query(&[("query", q)]).send().await;
        let Ok(r) = r else { return Vec::new() };
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if body["status"] != "success" {
            eprintln!("query {q:?}: {body}");
        }
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of an instant query, if it has exactly one finite one.
    async fn scalar(&self, http: &reqwest::Client, q: &str) -> Option<f64> {
        let result = self.query(http, q).await;
        let [one] = result.as_slice() else { return None };
        let v: f64 = one["value"][1].as_str()?.parse().ok()?;
        v.is_finite().then_some(v)
    }
}

/// Polls `f` until it returns `Some`, or panics naming `what` after `within`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A dashboard panel's first query, with Grafana's `$__rate_interval` set to `interval`.
fn dashboard_query(dashboard: &serde_json::Value, title: &str, target: usize, interval: &str) -> String {
    let panel = dashboard["panels"].as_array().unwrap().iter().find(|p| p["title"] == title).unwrap();
    panel["targets"][target]["expr"].as_str().unwrap().replace("$__rate_interval", interval)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_loaded_cluster_and_checks_the_rules() {
    let seed = harness::seed();
    let cluster = Cluster::start(3, 4, STREAMS);
    cluster.wait_ready(Duration::from_secs(30)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let nodes: Vec<String> = cluster.local.nodes.iter().map(|n| n.http_addr.clone()).collect();

    // Probes: live at once, ready once every local shard has a leader.
    for addr in &nodes {
        let live = http.get(format!("http://{addr}/livez")).send().await.unwrap();
        assert_eq!(live.status(), 200, "{addr}/livez");
        eventually(&format!("{addr}/readyz answers 200"), Duration::from_secs(30), || async {
            let r = http.get(format!("http://{addr}/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }

    // Every probe and scrape path the Kubernetes manifests use exists on the node's HTTP port.
    let python = std::env::var("COALESCE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python).arg(repo().join("deploy/check.py")).arg("--print-probes").output().unwrap();
    assert!(out.status.success(), "deploy/check.py --print-probes: {}", String::from_utf8_lossy(&out.stderr));
    let probes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(probes.len() >= 2, "{probes:?}");
    for p in &probes {
        assert_eq!(p["port"], 7402, "the manifests use the HTTP port of deploy/examples/node.toml: {p}");
        let path = p["path"].as_str().unwrap();
        let r = http.get(format!("http://{}{path}", nodes[0])).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {path} (from the manifests)");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..3).map(|i| cluster.client(i)).collect();
    let producer = tokio::spawn(harness::produce(clients, seed, stop.clone()));

    let rules = rule_file();
    let prometheus = Prometheus::start(&nodes, &rules);
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/coalesce.json")).unwrap()).unwrap();
    eventually("Prometheus scrapes all three nodes", Duration::from_secs(60), || async {
        let up = prometheus.scalar(&http, "count(up{job=\"coalesce\"} == 1)").await?;
        (up == 3.0).then_some(())
    })
    .await;

    // The dashboard's executive queries over a 10 s rate window, once it has data.
    let ratio_q = dashboard_query(&dashboard, "Coalesce ratio", 0, "10s");
    let ratio = eventually("the coalesce ratio query returns a value", Duration::from_secs(60), || {
        prometheus.scalar(&http, &ratio_q)
    })
    .await;
    // 50 events per request over 1000 keys and 4 shards, 500 ms windows: several events per output.
    assert!((1.0..1000.0).contains(&ratio), "coalesce ratio {ratio} ({ratio_q})");
    let p99_q = dashboard_query(&dashboard, "Staleness at delivery p95 / p99", 1, "10s");
    let p99 = eventually("the staleness p99 query returns a value", Duration::from_secs(60), || {
        prometheus.scalar(&http, &p99_q)
    })
    .await;
    // Windows are 500 ms; delivery follows at once: well under the 30 s SLO.
    assert!(p99 > 0.0 && p99 < 30.0, "staleness p99 {p99} s ({p99_q})");
    // The process panel: one series per node, each with a resident memory.
    let rss_q = dashboard_query(&dashboard, "Process: CPU and memory per node", 1, "10s");
    let rss = prometheus.query(&http, &rss_q).await;
    assert_eq!(rss.len(), 3, "a memory series per node ({rss_q}): {rss:?}");
    let led = prometheus.scalar(&http, "sum(coalesce_raft_shards_led)").await;
    assert_eq!(led, Some(4.0), "every shard has a leader");
    let saved = dashboard_query(&dashboard, "Downstream writes saved per second", 0, "10s");
    let saved = prometheus.scalar(&http, &saved).await.unwrap_or(0.0);
    assert!(saved > 0.0, "writes saved per second: {saved}");

    // Every rule evaluated without error; no page fires on a healthy cluster.
    let rule_health = eventually("every rule has been evaluated", Duration::from_secs(30), || async {
        let r = http.get(format!("{}/api/v1/rules", prometheus.url)).send().await.ok()?;
        let body: serde_json::Value = r.json().await.ok()?;
        let rules: Vec<serde_json::Value> = body["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated =
            !rules.is_empty() && rules.iter().all(|r| r["lastEvaluation"].as_str() != Some("0001-01-01T00:00:00Z"));
        evaluated.then_some(rules)
    })
    .await;
    assert!(rule_health.len() >= 10, "the alert rules were loaded: {}", rule_health.len());
    for r in &rule_health {
        assert_eq!(r["health"], "ok", "rule {} evaluates: {}", r["name"], r["lastError"]);
    }
    let paging = prometheus.query(&http, "ALERTS{alertstate=\"firing\", severity=\"page\"}").await;
    assert!(paging.is_empty(), "no page on a healthy cluster: {paging:?}");

    stop.store(true, Ordering::Relaxed);
    let (_, requests, _) = producer.await.unwrap();
    assert!(requests > 0);

    // Every metric the dashboard and the alerts use exists in a scrape of some node.
    let mut scraped = BTreeSet::new();
    let mut scrapes = Vec::new();
    for addr in &nodes {
        let text = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
        scraped.extend(scraped_names(&text));
        scrapes.push(text);
    }
    let mut used = metric_names(&rules);
    used.extend(metric_names(&dashboard.to_string()));
    assert!(used.len() > 20, "the dashboard and rules name metrics: {used:?}");
    // Certificate metrics exist only on nodes with TLS (tests/security.rs checks them there).
    let missing: Vec<&String> =
        used.iter().filter(|n| !scraped.contains(*n) && !ONLY_WITH_TLS.contains(&n.as_str())).collect();
    assert!(missing.is_empty(), "named in the dashboard or alerts but not exported: {missing:?}");
    // The standard process metrics, which the dashboard's process panel reads.
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
        assert!(scraped.contains(name), "{name} is exported");
    }

    // promtool: the rules and a scrape pass its checks.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), &rules).unwrap();
    let out = Command::new(installed("promtool"))
        .arg("check")
        .arg("rules")
        .arg(dir.path().join("rules.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for scrape in &scrapes {
        let mut child = Command::new(installed("promtool"))
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_run_time_and_readiness_drops_on_shutdown() {
    let mut cluster = Cluster::start(3, 2, STREAMS);
    cluster.wait_ready(Duration::from_secs(30)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let addr = cluster.local.nodes[2].http_addr.clone();
    let url = format!("http://{addr}/loglevel");
    let set = http.put(&url).body("info,coalesce_raft=debug").send().await.unwrap();
    assert_eq!(set.status(), 200);
    assert_eq!(http.get(&url).send().await.unwrap().text().await.unwrap().trim(), "info,coalesce_raft=debug");
    let bad = http.put(&url).body("info,[[[").send().await.unwrap();
    assert_eq!(bad.status(), 400, "a malformed filter is refused");
    assert_eq!(http.get(&url).send().await.unwrap().text().await.unwrap().trim(), "info,coalesce_raft=debug");

    // SIGTERM: readiness turns false ("shutting down") while the node hands its shards off;
    // the HTTP port stays up until the very end. With both peers paused the hand-off cannot
    // finish, so the node waits out its bounded grace and the window is seconds long.
    eventually("node 2 is ready", Duration::from_secs(30), || async {
        let r = http.get(format!("http://{addr}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    cluster.signal(0, "STOP");
    cluster.signal(1, "STOP");
    cluster.signal(2, "TERM");
    let why = eventually("/readyz answers 503 after SIGTERM", Duration::from_secs(10), || async {
        let r = http.get(format!("http://{addr}/readyz")).send().await.ok()?;
        let status = r.status();
        let body = r.text().await.ok()?;
        (status == 503 && body.contains("shutting down")).then_some(body)
    })
    .await;
    eprintln!("/readyz during shutdown: {}", why.trim());
    assert_eq!(
        http.get(format!("http://{addr}/livez")).send().await.unwrap().status(),
        200,
        "still live while stopping"
    );
    cluster.signal(0, "CONT");
    cluster.signal(1, "CONT");
    cluster.terminate(2, Duration::from_secs(20));
}
