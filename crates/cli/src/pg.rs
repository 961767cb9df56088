//! A throw-away PostgreSQL server for tests and benchmarks: `initdb` into a temporary directory,
//! listening only on a Unix socket inside it (no TCP port to collide on), stopped and deleted
//! on drop; [`TempPostgres::start_tls`] also listens on loopback TCP with TLS, its certificate
//! signed by a throw-away CA ([`TempPostgres::ca_file`]). Needs the server binaries (Debian's `postgresql` package, which `scripts/setup.sh`
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
    /// With TLS: the loopback TCP port.
    tcp_port: Option<u16>,
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
        Self::start_with(false)
    }

    /// [`TempPostgres::start`], also listening on 127.0.0.1 (a free port: [`TempPostgres::tcp_url`])
    /// with `ssl = on`. Its certificate names `localhost` only (not the address), so a client
    /// connecting to `127.0.0.1` can tell `sslmode=verify-ca` from `verify-full`.
    pub fn start_tls() -> anyhow::Result<TempPostgres> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> anyhow::Result<TempPostgres> {
        let bin = find_bin()?;
        let dir = tempfile::Builder::new().prefix("coalesce-pg").tempdir()?;
        let as_postgres = id(&["-u"])? == 0;
        let owner = if as_postgres { Some((id(&["-u", "postgres"])?, id(&["-g", "postgres"])?)) } else { None };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        // A free port, for TCP (between this probe and the server's bind another process could
        // take it; the server then fails to start and says so).
        let tcp_port = if tls { Some(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) } else { None };
        // The port only names the socket file unless TLS is on.
        let pg = TempPostgres { dir, bin, as_postgres, port: tcp_port.unwrap_or(5432), tcp_port };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &["-D", &data.to_string_lossy(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        )?;
        let mut opts =
            format!("-c listen_addresses='' -k {} -p {} -c max_connections=100", pg.dir.path().display(), pg.port);
        if tls {
            let (cert, key) = pg.write_certificates(owner)?;
            opts = format!(
                "-c listen_addresses=127.0.0.1 -k {} -p {} -c max_connections=100 -c ssl=on -c ssl_cert_file={} \
                 -c ssl_key_file={}",
                pg.dir.path().display(),
                pg.port,
                cert.display(),
                key.display()
            );
        }
        let log = pg.dir.path().join("log");
        pg.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-l", &log.to_string_lossy(), "-o", &opts, "-w", "-t", "30", "start"],
        )?;
        pg.wait_ready(Duration::from_secs(30))?;
        Ok(pg)
    }

    /// A CA (`ca.pem`) and the server's certificate and key, signed by it for `localhost`.
    fn write_certificates(&self, owner: Option<(u32, u32)>) -> anyhow::Result<(PathBuf, PathBuf)> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, "Coalesce test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &issuer)?;
        let (cert_path, key_path) = (self.dir.path().join("server.crt"), self.dir.path().join("server.key"));
        std::fs::write(self.ca_file(), ca_cert.pem())?;
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            for p in [&cert_path, &key_path] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
            }
        }
        Ok((cert_path, key_path))
    }

    /// With TLS: the CA certificate (PEM) that signed the server's.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// With TLS: a libpq connection string over loopback TCP to `host` (`127.0.0.1` or
    /// `localhost`), without `sslmode` (add it).
    pub fn tcp_url(&self, host: &str) -> Option<String> {
        self.tcp_port.map(|p| format!("host={host} port={p} user=postgres dbname=postgres"))
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
