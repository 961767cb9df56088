//! The containers of a [`crate::local::LocalCluster`] run by Docker: one service per node in a
//! compose project written into the cluster's directory (`compose.yaml`), every node a
//! container of the Coalesce image (`deploy/docker/build-local.sh` builds one from cargo's
//! binaries, offline).
//!
//! The containers share the host's network (`network_mode: host`) and see the cluster directory
//! at its own path (a bind mount), so the node configs, data directories, ports and cuttable
//! peer links ([`crate::netproxy`]) of a process cluster work unchanged, and clients on the host
//! follow leaders by the addresses the nodes advertise. They run as the owner of the cluster
//! directory (the caller, who just created it), not the image's uid 10001, so both can write
//! there.
//!
//! `docker compose` (or `docker-compose`) creates the project and tears it down (`down -v`, also
//! on drop); faults address its containers with the `docker` CLI itself (`kill -s KILL`,
//! `pause`, `unpause`, `start`): the same operations `docker compose kill/pause/start <service>`
//! perform, without the compose front end's start-up time (~0.8 s per call for the Python
//! `docker-compose`), which would otherwise be counted in every measured failover. A node's log
//! is its container's (`docker logs`), copied to its `node-N.log` whenever it stops.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Which image to run, and what else the containers must see.
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    /// The Coalesce image, e.g. `coalesce:local`.
    pub image: String,
    /// Host directories the nodes need besides the cluster directory (e.g. a PostgreSQL socket
    /// directory named in a sink's URL), mounted at the same path.
    pub mounts: Vec<PathBuf>,
}

/// What one node's service runs.
#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) config: PathBuf,
    pub(crate) data_dir: PathBuf,
    pub(crate) env: Vec<(String, String)>,
}

/// One node's container.
#[derive(Debug)]
struct Container {
    service: String,
    name: String,
    /// `docker compose up` made it (a later start is `docker start`, on the same container).
    created: bool,
    /// Started and not since killed or stopped by us.
    running: bool,
}

/// A compose project of node containers.
#[derive(Debug)]
pub(crate) struct Project {
    compose: Vec<String>,
    name: String,
    file: PathBuf,
    containers: Vec<Container>,
    /// `up` was tried: there may be something to take down.
    upped: bool,
}

/// The compose front end: `docker compose` (v2), else `docker-compose` (v1).
fn compose_command() -> anyhow::Result<Vec<String>> {
    let works = |program: &str, args: &[&str]| {
        Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    };
    if works("docker", &["compose", "version"]) {
        Ok(vec!["docker".into(), "compose".into()])
    } else if works("docker-compose", &["version"]) {
        Ok(vec!["docker-compose".into()])
    } else {
        bail!("the compose backend needs `docker compose` or `docker-compose`; neither is installed")
    }
}

/// Runs a command, returning its stdout, or an error carrying its stderr.
fn output(mut cmd: Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    output(cmd)
}

/// Fails with what to do when Docker is unreachable or `image` is missing.
pub(crate) fn preflight(image: &str) -> anyhow::Result<Vec<String>> {
    docker(&["info", "--format", "{{.ServerVersion}}"])
        .context("the compose backend needs a reachable Docker engine (`docker info` failed)")?;
    let compose = compose_command()?;
    if docker(&["image", "inspect", "--format", "{{.Id}}", image]).is_err() {
        bail!(
            "image {image} not found: build it from the binaries cargo built with \
             `deploy/docker/build-local.sh --tag {image}` (nothing is pulled; see chaos/README.md)"
        );
    }
    Ok(compose)
}

/// A YAML double-quoted scalar (JSON's escapes are YAML's), with compose's `$` interpolation
/// escaped.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.replace('$', "$$")).to_string()
}

/// The compose file: one service per node.
fn compose_yaml(project: &str, opts: &ComposeOptions, dir: &Path, user: &str, services: &[Service]) -> String {
    let mut mounts = vec![dir.to_owned()];
    mounts.extend(opts.mounts.iter().cloned());
    let mut y = format!(
        "# Written by coalescectl (crates/cli/src/compose.rs) for one local cluster; torn down with it:\n\
         #   docker compose -p {project} -f {} down -v\n\
         services:\n",
        dir.join("compose.yaml").display()
    );
    for s in services {
        let command = ["coalesced".to_owned(), "--config".to_owned(), s.config.display().to_string()];
        y += &format!("  {}:\n", s.name);
        y += &format!("    image: {}\n", quote(&opts.image));
        y += &format!("    container_name: {}\n", quote(&format!("{project}-{}", s.name)));
        y += "    network_mode: host\n";
        y += &format!("    user: {}\n", quote(user));
        y += "    restart: \"no\"\n";
        y += &format!("    command: [{}]\n", command.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", "));
        y += "    environment:\n";
        // The image sets COALESCE_DATA_DIR, which would override the config's data_dir.
        y += &format!("      COALESCE_DATA_DIR: {}\n", quote(&s.data_dir.display().to_string()));
        for (k, v) in &s.env {
            y += &format!("      {k}: {}\n", quote(v));
        }
        y += "    volumes:\n";
        for m in &mounts {
            let m = quote(&m.display().to_string());
            y += &format!("      - type: bind\n        source: {m}\n        target: {m}\n");
        }
    }
    y
}

impl Project {
    /// Checks Docker and the image, and writes `dir/compose.yaml` (nothing is started). `dir`
    /// must be absolute: it is mounted at the same path.
    pub(crate) fn create(
        dir: &Path,
        cluster: &str,
        opts: &ComposeOptions,
        services: &[Service],
    ) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let compose = preflight(&opts.image)?;
        let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        let user = format!("{}:{}", meta.uid(), meta.gid());
        let cluster: String =
            cluster.to_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        let name = format!("coalesce-{cluster}-{:08x}", rand::random::<u32>());
        let file = dir.join("compose.yaml");
        std::fs::write(&file, compose_yaml(&name, opts, dir, &user, services))
            .with_context(|| format!("writing {}", file.display()))?;
        let containers = services
            .iter()
            .map(|s| Container {
                service: s.name.clone(),
                name: format!("{name}-{}", s.name),
                created: false,
                running: false,
            })
            .collect();
        Ok(Self { compose, name, file, containers, upped: false })
    }

    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..]).arg("-p").arg(&self.name).arg("-f").arg(&self.file).args(args);
        output(cmd)
    }

    pub(crate) fn is_running(&self, i: usize) -> bool {
        self.containers[i].running
    }

    /// Creates and starts every node's container (those already created are started again).
    pub(crate) fn start_all(&mut self) -> anyhow::Result<()> {
        if self.containers.iter().all(|c| !c.created) {
            self.upped = true;
            self.compose(&["up", "-d"])?;
            for c in &mut self.containers {
                c.created = true;
                c.running = true;
            }
            return Ok(());
        }
        // One `docker start` for all the stopped ones (a whole-cluster restart), as compose would.
        let stopped: Vec<String> =
            self.containers.iter().filter(|c| c.created && !c.running).map(|c| c.name.clone()).collect();
        if !stopped.is_empty() {
            let mut start = vec!["start"];
            start.extend(stopped.iter().map(String::as_str));
            docker(&start)?;
            self.containers.iter_mut().filter(|c| c.created).for_each(|c| c.running = true);
        }
        let new: Vec<usize> = (0..self.containers.len()).filter(|i| !self.containers[*i].created).collect();
        new.into_iter().try_for_each(|i| self.start(i))
    }

    /// Starts node `i`'s container: created by compose the first time, the same one after.
    pub(crate) fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let c = &self.containers[i];
        if c.created {
            docker(&["start", &c.name])?;
        } else {
            let service = c.service.clone();
            self.upped = true;
            self.compose(&["up", "-d", "--no-deps", &service])?;
            self.containers[i].created = true;
        }
        self.containers[i].running = true;
        Ok(())
    }

    /// SIGKILLs node `i`'s container (a paused one too).
    pub(crate) fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let c = &mut self.containers[i];
        if !c.running {
            return Ok(());
        }
        c.running = false;
        docker(&["kill", "--signal", "KILL", &c.name]).map(|_| ())
    }

    /// Sends `signal` to node `i`'s process; SIGSTOP and SIGCONT freeze and thaw the whole
    /// container instead (`docker pause`/`unpause`: the cgroup freezer).
    pub(crate) fn signal(&self, i: usize, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        use nix::sys::signal::Signal;
        let c = &self.containers[i];
        if !c.running {
            return Ok(());
        }
        match signal {
            Signal::SIGSTOP => docker(&["pause", &c.name]).map(|_| ()),
            // Like SIGCONT to a running process, thawing a container that is not frozen is a no-op.
            Signal::SIGCONT => match docker(&["unpause", &c.name]) {
                Err(e) if format!("{e:#}").contains("is not paused") => Ok(()),
                r => r.map(|_| ()),
            },
            s => docker(&["kill", "--signal", s.as_str(), &c.name]).map(|_| ()),
        }
    }

    /// Whether node `i`'s container runs, and its exit code when it does not.
    fn state(&self, i: usize) -> anyhow::Result<(bool, i32)> {
        let out = docker(&["inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", &self.containers[i].name])?;
        let mut words = out.split_whitespace();
        let running = words.next() == Some("true");
        let code = words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
        Ok((running, code))
    }

    /// SIGTERMs node `i` and waits for a clean exit within `within` (SIGKILL after).
    pub(crate) fn terminate(&mut self, i: usize, within: Duration) -> anyhow::Result<()> {
        use nix::sys::signal::Signal;
        if !self.containers[i].running {
            return Ok(());
        }
        let started = Instant::now();
        self.signal(i, Signal::SIGCONT)?;
        self.signal(i, Signal::SIGTERM)?;
        self.containers[i].running = false;
        let name = self.containers[i].name.clone();
        loop {
            let (running, code) = self.state(i)?;
            if !running {
                if code != 0 {
                    bail!("{name} exited with code {code} after SIGTERM");
                }
                return Ok(());
            }
            if started.elapsed() > within {
                let _ = docker(&["kill", "--signal", "KILL", &name]);
                bail!("{name} did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops every running container (`docker stop`: SIGTERM, SIGKILL after `grace`).
    pub(crate) fn stop_all(&mut self, grace: Duration) -> anyhow::Result<()> {
        let names: Vec<String> = self.containers.iter().filter(|c| c.running).map(|c| c.name.clone()).collect();
        for c in &mut self.containers {
            c.running = false;
        }
        if names.is_empty() {
            return Ok(());
        }
        // A frozen container must thaw to handle SIGTERM (an error for those not paused).
        let mut unpause = vec!["unpause"];
        unpause.extend(names.iter().map(String::as_str));
        let _ = docker(&unpause);
        let secs = grace.as_secs().max(1).to_string();
        let mut stop = vec!["stop", "--time", secs.as_str()];
        stop.extend(names.iter().map(String::as_str));
        docker(&stop).map(|_| ())
    }

    /// Writes node `i`'s container log (everything since it was created; stdout and stderr)
    /// to `path`, replacing what was there.
    pub(crate) fn save_log(&self, i: usize, path: &Path) -> anyhow::Result<()> {
        let c = &self.containers[i];
        if !c.created {
            return Ok(());
        }
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let status = Command::new("docker")
            .args(["logs", &c.name])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .context("running docker logs")?;
        if !status.success() {
            bail!("docker logs {} failed ({status})", c.name);
        }
        Ok(())
    }

    /// Removes the containers and their anonymous volumes (`down -v`, no grace).
    pub(crate) fn down(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.containers.iter().map(|c| c.name.clone()).collect();
        for c in &mut self.containers {
            c.created = false;
            c.running = false;
        }
        if !std::mem::take(&mut self.upped) {
            return Ok(());
        }
        if let Err(e) = self.compose(&["down", "-v", "--timeout", "0"]) {
            // Whatever compose thinks of its project, the containers must go.
            let mut rm = vec!["rm", "--force", "--volumes"];
            rm.extend(names.iter().map(String::as_str));
            docker(&rm).with_context(|| format!("{e:#}; then removing the containers"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compose_file_runs_each_node_on_the_host_network_with_its_config_and_data() {
        let opts = ComposeOptions { image: "coalesce:local".into(), mounts: vec![PathBuf::from("/tmp/pg sock")] };
        let services = [Service {
            name: "coalesce-0".into(),
            config: PathBuf::from("/run/c/node-0.toml"),
            data_dir: PathBuf::from("/run/c/data-0"),
            env: vec![("RUST_LOG".into(), "info".into()), ("SECRET".into(), "a$b\"c".into())],
        }];
        let y = compose_yaml("coalesce-chaos-1", &opts, Path::new("/run/c"), "1000:1000", &services);
        for line in [
            "  coalesce-0:\n",
            "    image: \"coalesce:local\"\n",
            "    container_name: \"coalesce-chaos-1-coalesce-0\"\n",
            "    network_mode: host\n",
            "    user: \"1000:1000\"\n",
            "    command: [\"coalesced\", \"--config\", \"/run/c/node-0.toml\"]\n",
            "      COALESCE_DATA_DIR: \"/run/c/data-0\"\n",
            "      RUST_LOG: \"info\"\n",
            "      SECRET: \"a$$b\\\"c\"\n",
            "        source: \"/run/c\"\n        target: \"/run/c\"\n",
            "        source: \"/tmp/pg sock\"\n        target: \"/tmp/pg sock\"\n",
        ] {
            assert!(y.contains(line), "{line:?} not in:\n{y}");
        }
    }
}
