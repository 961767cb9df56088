//! A throw-away PostgreSQL server for tests and benchmarks: `initdb` into a temporary directory,
//! listening only on a Unix socket inside it (no TCP port to collide on), stopped and deleted
//! on drop. Needs the server binaries (Debian's `postgresql` package, which `scripts/setup.sh`
//! installs); as root it runs as the `postgres` user, since the server refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running throw-away PostgreSQL server.
#[derive(Debug)]
pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
}

fn find_bin() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().context("PostgreSQL server binaries not found under /usr/lib/postgresql (run scripts/setup.sh)")
}

fn id(args: &[&str]) -> anyhow::Result<u32> {
    let out = Command::new("id").args(args).output().context("running id")?;
    String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("id {}", args.join(" ")))
}

impl TempPostgres {
    /// Creates and starts a server; returns once it accepts connections.
    pub fn start() -> anyhow::Result<TempPostgres> {
        let bin = find_bin()?;
        let dir = tempfile::Builder::new().prefix("coalesce-pg").tempdir()?;
        let as_postgres = id(&["-u"])? == 0;
        if as_postgres {
            let (uid, gid) = (id(&["-u", "postgres"])?, id(&["-g", "postgres"])?);
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        // The port only names the socket file; nothing listens on TCP.
        let pg = TempPostgres { dir, bin, as_postgres, port: 5432 };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &["-D", &data.to_string_lossy(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        )?;
        let opts =
            format!("-c listen_addresses='' -k {} -p {} -c max_connections=100", pg.dir.path().display(), pg.port);
        let log = pg.dir.path().join("log");
        pg.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-l", &log.to_string_lossy(), "-o", &opts, "-w", "-t", "30", "start"],
        )?;
        pg.wait_ready(Duration::from_secs(30))?;
        Ok(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = self.command(tool).args(args).current_dir(self.dir.path()).output()?;
        if !out.status.success() {
            bail!(
                "{tool} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", &self.socket_dir().to_string_lossy(), "-p", &self.port.to_string()])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("PostgreSQL not ready within {within:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The directory holding the server's socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A libpq connection string for the `postgres` database as the `postgres` user.
    pub fn url(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres", self.socket_dir().display(), self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// A connected client; its connection runs as a task on the current runtime.
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url()).await
    }
}

/// Connects to `url`, driving the connection in a task of the current runtime.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.command("pg_ctl").args(["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"]).output();
    }
}
