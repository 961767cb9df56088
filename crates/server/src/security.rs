//! TLS on both ports, bearer tokens with roles on the client and HTTP ports, and the rule that
//! nothing listens beyond loopback unauthenticated unless the config says so explicitly.
//!
//! - **Client port**: TLS with the node's certificate when `[tls.client]` is set; with
//!   `client_ca`, clients must also present a certificate signed by it.
//! - **Peer port**: mutual TLS when `[tls.peer]` is set — every node presents its certificate
//!   and accepts only peers whose certificate is signed by `ca` (both directions), and each
//!   certificate must name its node: a peer's certificate is checked against the node it
//!   speaks for on every call ([`coalesce_raft::tls`]). Certificates of both ports are re-read
//!   every `tls.reload_interval` and swapped in when they change.
//! - **Off loopback** ([`check_exposure`]): a peer port beyond loopback needs `[tls.peer]` or
//!   `node.insecure_peer = true`; a client or HTTP port beyond loopback needs
//!   `[[auth.tokens]]` or `node.insecure = true`. Either flag is logged loudly at start.
//! - **Tokens** (`[[auth.tokens]]`): when any is configured, every call on the client port
//!   but health and reflection needs `authorization: Bearer <token>`; the method decides the
//!   role: `Ingest` and `IngestStream` need *producer*, `Subscribe`, `Ack` and `Fetch`
//!   *consumer*, `Status` any role,
//!   every `Admin` method *admin*. Missing or unknown tokens get UNAUTHENTICATED, a token
//!   without the role PERMISSION_DENIED. Tokens are read from files or environment variables
//!   (never from the config itself), kept only as SHA-256 digests, and never logged.
//!
//! Libraries: rustls (through tonic's `tls-ring`), sha2, tower (the per-method check).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use coalesce_raft::tls::{Certs, TlsFiles};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `[tls]`: certificates for the two ports (PEM files, relative to the config file; `{node}` in
/// a path stands for the node's name, so one config serves every pod of a StatefulSet).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub client: Option<ClientPortTls>,
    #[serde(default)]
    pub peer: Option<PeerPortTls>,
    /// How often the certificate files are re-read (rotated certificates are picked up without
    /// a restart).
    #[serde(with = "humantime_serde", default = "default_reload_interval")]
    pub reload_interval: std::time::Duration,
}

fn default_reload_interval() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self { client: None, peer: None, reload_interval: default_reload_interval() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPortTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mutual TLS on the client port).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerPortTls {
    /// This node's certificate: served on the peer port and presented to peers.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signs every node's certificate.
    pub ca: PathBuf,
    /// Refused with an explanation: peers' certificates are checked against the node name
    /// (one certificate per node), never a shared name.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `[auth]`: bearer tokens and their roles.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (appears in logs instead of the token).
    pub name: String,
    /// A file holding the token (surrounding whitespace ignored)…
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// …or an environment variable holding it.
    #[serde(default)]
    pub token_env: Option<String>,
    pub roles: Vec<Role>,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Producer,
    Consumer,
    Admin,
}

fn full_path(base: &Path, path: &Path) -> PathBuf {
    if path.is_relative() { base.join(path) } else { path.to_owned() }
}

fn read(base: &Path, path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let full = full_path(base, path);
    std::fs::read(&full).map_err(|e| format!("{what} {}: {e}", full.display()))
}

/// The certificates of both ports, loaded from the files (and reloadable).
#[derive(Debug, Clone, Default)]
pub struct LoadedTls {
    pub client: Option<Arc<Certs>>,
    pub peer: Option<Arc<Certs>>,
}

impl TlsConfig {
    /// Reads every certificate and key (paths relative to `base`, `{node}` replaced by `node`),
    /// checking that the peer certificate is `node`'s among the `cluster`'s nodes.
    pub fn load(&self, base: &Path, node: &str, cluster: &[String]) -> Result<LoadedTls, String> {
        let path = |p: &Path| PathBuf::from(full_path(base, p).to_string_lossy().replace("{node}", node));
        let mut out = LoadedTls::default();
        if self.reload_interval < std::time::Duration::from_secs(1) {
            return Err(format!("tls.reload_interval must be at least 1s, got {:?}", self.reload_interval));
        }
        if let Some(c) = &self.client {
            let files =
                TlsFiles { cert: path(&c.cert), key: path(&c.key), ca: c.client_ca.as_deref().map(path), node: None };
            out.client = Some(Certs::load("client", files)?);
        }
        if let Some(p) = &self.peer {
            if let Some(name) = &p.server_name {
                return Err(format!(
                    "tls.peer.server_name ({name:?}) is no longer supported: each node's certificate must name that \
                     node (its name as a DNS subject alternative name), and peers are checked against it; see \
                     docs/security.md"
                ));
            }
            let files = TlsFiles {
                cert: path(&p.cert),
                key: path(&p.key),
                ca: Some(path(&p.ca)),
                node: Some((node.to_owned(), cluster.to_vec())),
            };
            out.peer = Some(Certs::load("peer", files)?);
        }
        Ok(out)
    }
}

/// Why a node will not start with its listeners where they are: a port beyond loopback
/// without authentication, unless the config explicitly allows it (see the module docs).
pub fn check_exposure(
    node: &crate::config::NodeConfig,
    tls: &LoadedTls,
    auth: &Auth,
) -> Result<(), (&'static str, String)> {
    if tls.peer.is_none() && !node.peer_listen.ip().is_loopback() && !node.insecure_peer {
        return Err((
            "node.peer_listen",
            format!(
                "{} is not a loopback address, and the peer port would accept anyone: configure [tls.peer] (mutual \
                 TLS with one certificate per node, docs/security.md), or set node.insecure_peer = true on a \
                 network only Coalesce nodes can reach",
                node.peer_listen
            ),
        ));
    }
    if !auth.enabled() && !node.insecure {
        let exposed = [("node.client_listen", Some(node.client_listen)), ("node.http_listen", node.http_listen)];
        for (field, addr) in exposed {
            if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
                return Err((
                    field,
                    format!(
                        "{addr} is not a loopback address, and without [[auth.tokens]] anyone could ingest, read and \
                         administer this cluster (and change its log level): configure tokens (docs/security.md), \
                         or set node.insecure = true on a trusted network"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The tokens a node accepts: SHA-256 of each, with its holder and roles.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Vec<([u8; 32], String, BTreeSet<Role>)>,
}

impl AuthConfig {
    /// Reads every token (files relative to `base`).
    pub fn load(&self, base: &Path) -> Result<Auth, String> {
        let mut tokens = Vec::new();
        for t in &self.tokens {
            let secret = match (&t.token_file, &t.token_env) {
                (Some(f), None) => String::from_utf8(read(base, f, &format!("auth.tokens {:?}: token_file", t.name))?)
                    .map_err(|_| format!("auth.tokens {:?}: the token file is not UTF-8", t.name))?,
                (None, Some(var)) => std::env::var(var)
                    .map_err(|_| format!("auth.tokens {:?}: environment variable {var} is not set", t.name))?,
                _ => return Err(format!("auth.tokens {:?}: set exactly one of token_file and token_env", t.name)),
            };
            let secret = secret.trim();
            if secret.len() < 16 {
                return Err(format!("auth.tokens {:?}: the token must be at least 16 characters", t.name));
            }
            if t.roles.is_empty() {
                return Err(format!(
                    "auth.tokens {:?}: roles must name at least one of producer, consumer, admin",
                    t.name
                ));
            }
            tokens.push((Sha256::digest(secret.as_bytes()).into(), t.name.clone(), t.roles.iter().copied().collect()));
        }
        Ok(Auth { tokens })
    }
}

impl Auth {
    /// Whether tokens are required at all.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The role a client-port method needs; `None` for methods open to everyone (health,
    /// reflection) and `Some(None)` for any valid token.
    fn required(path: &str) -> Option<Option<Role>> {
        let (service, method) = path.trim_start_matches('/').split_once('/')?;
        match (service, method) {
            ("coalesce.v1.Coalesce", "Ingest" | "IngestStream") => Some(Some(Role::Producer)),
            ("coalesce.v1.Coalesce", "Subscribe" | "Ack" | "Fetch") => Some(Some(Role::Consumer)),
            ("coalesce.v1.Coalesce", _) => Some(None),
            ("coalesce.v1.Admin", _) => Some(Some(Role::Admin)),
            _ => None,
        }
    }

    /// Checks a call to `path` with the `authorization` header value.
    pub fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), tonic::Status> {
        match Self::required(path) {
            Some(need) => self.check_role(need, path, authorization),
            None => Ok(()),
        }
    }

    /// The holder and roles of the token `authorization` carries, if tokens are configured
    /// and it is one of them.
    pub fn caller(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        if !self.enabled() {
            return None;
        }
        let token = bearer(authorization)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (_, holder, roles) = self.tokens.iter().find(|(d, _, _)| *d == digest)?;
        Some(Caller { holder: holder.clone(), roles: roles.clone() })
    }

    /// Checks that `authorization` carries a token with role `need` (any token for `None`)
    /// for `what` (named in the error).
    pub fn check_role(
        &self,
        need: Option<Role>,
        what: &str,
        authorization: Option<&[u8]>,
    ) -> Result<(), tonic::Status> {
        if !self.enabled() {
            return Ok(());
        }
        let path = what;
        let token = bearer(authorization)
            .ok_or_else(|| tonic::Status::unauthenticated("authorization: a bearer token is required"))?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (_, holder, roles) = self
            .tokens
            .iter()
            .find(|(d, _, _)| *d == digest)
            .ok_or_else(|| tonic::Status::unauthenticated("authorization: unknown token"))?;
        match need {
            Some(role) if !roles.contains(&role) => Err(tonic::Status::permission_denied(format!(
                "token {holder:?} lacks the {} role for {path}",
                format!("{role:?}").to_lowercase()
            ))),
            _ => Ok(()),
        }
    }
}

/// The token of an `authorization: Bearer <token>` header value.
fn bearer(authorization: Option<&[u8]>) -> Option<&str> {
    authorization
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
}

/// Who made a client-port call, as its token proves: put into the call's extensions by
/// [`AuthService`] once the token checked out. Absent when no tokens are configured — then
/// nobody is proven to be anyone, and a handler that needs a role for something must refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (`[[auth.tokens]] name`).
    pub holder: String,
    pub roles: BTreeSet<Role>,
}

impl Caller {
    /// The caller of `request`, if a token proved one.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }

    /// Whether `request` carries a valid token with the admin role.
    pub fn is_admin<T>(request: &tonic::Request<T>) -> bool {
        Self::of(request).is_some_and(|c| c.roles.contains(&Role::Admin))
    }
}

/// A tower layer that checks bearer tokens on the client port before any service sees the call.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Auth>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Auth>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, auth: Arc::clone(&self.auth) }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Auth>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<futures::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let auth = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        match self.auth.check(req.uri().path(), auth) {
            Ok(()) => {
                if let Some(caller) = self.auth.caller(auth) {
                    req.extensions_mut().insert(caller);
                }
                futures::future::Either::Right(self.inner.call(req))
            }
            Err(status) => futures::future::Either::Left(futures::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn auth() -> Auth {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p"), "producer-token-0123456789\n").unwrap();
        std::fs::write(dir.path().join("a"), "admin-token-0123456789").unwrap();
        let cfg: AuthConfig = toml::from_str(
            "[[tokens]]\nname = \"ingester\"\ntoken_file = \"p\"\nroles = [\"producer\"]\n\
             [[tokens]]\nname = \"ops\"\ntoken_file = \"a\"\nroles = [\"admin\", \"consumer\"]\n",
        )
        .unwrap();
        cfg.load(dir.path()).unwrap()
    }

    #[test]
    fn methods_need_their_roles() {
        let a = auth();
        let p = Some(b"Bearer producer-token-0123456789".as_slice());
        let o = Some(b"Bearer admin-token-0123456789".as_slice());
        assert!(a.check("/coalesce.v1.Coalesce/Ingest", p).is_ok());
        assert!(a.check("/coalesce.v1.Coalesce/IngestStream", p).is_ok());
        assert_eq!(a.check("/coalesce.v1.Coalesce/IngestStream", o).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(a.check("/coalesce.v1.Coalesce/Fetch", p).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(a.check("/coalesce.v1.Coalesce/Status", p).is_ok(), "any role may read status");
        assert_eq!(a.check("/coalesce.v1.Coalesce/Ack", p).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(a.check("/coalesce.v1.Admin/Drain", p).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(a.check("/coalesce.v1.Admin/Drain", o).is_ok());
        assert!(a.check("/coalesce.v1.Coalesce/Subscribe", o).is_ok());
        assert_eq!(a.check("/coalesce.v1.Coalesce/Ingest", None).unwrap_err().code(), tonic::Code::Unauthenticated);
        let wrong = Some(b"Bearer nope-nope-nope-nope".as_slice());
        assert_eq!(a.check("/coalesce.v1.Coalesce/Ingest", wrong).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(a.check("/grpc.health.v1.Health/Check", None).is_ok(), "health stays open for probes");
        let denied = a.check("/coalesce.v1.Admin/Drain", p).unwrap_err().message().to_owned();
        assert!(denied.contains("ingester") && !denied.contains("producer-token"), "{denied}");
    }

    #[test]
    fn bad_token_configs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("short"), "abc").unwrap();
        let load = |t: &str| toml::from_str::<AuthConfig>(t).unwrap().load(dir.path()).unwrap_err();
        assert!(load("[[tokens]]\nname = \"x\"\ntoken_file = \"short\"\nroles = [\"admin\"]").contains("16"));
        assert!(load("[[tokens]]\nname = \"x\"\ntoken_file = \"missing\"\nroles = [\"admin\"]").contains("missing"));
        assert!(load("[[tokens]]\nname = \"x\"\nroles = [\"admin\"]").contains("exactly one"));
        assert!(
            load("[[tokens]]\nname = \"x\"\ntoken_env = \"COALESCE_TEST_UNSET_VAR\"\nroles = [\"admin\"]")
                .contains("not set")
        );
    }
}
