//! TLS on both gRPC ports: certificates that reload without a restart, and peer identities
//! bound to node names.
//!
//! - [`Certs`] holds one port's certificate, key and (optionally) CA, read from PEM files.
//!   [`Certs::watch`] re-reads them periodically and swaps them in when they change and parse
//!   (a Kubernetes Secret volume or cert-manager rotates them in place); a bad file is logged
//!   and counted, and the previous certificates stay in use. New handshakes use the new
//!   certificates; open connections keep theirs.
//! - [`incoming`] accepts TCP connections and completes TLS handshakes off the accept loop
//!   (bounded in number and time), handing tonic streams whose [`ConnInfo`] carries the
//!   client's certificate identity ([`PeerIdentity`]). Every port takes its connections from
//!   it, TLS or not, so it is also where their bounds are kept ([`crate::connections`]).
//! - [`Connector`] dials a peer and checks that its certificate names the node dialed: the TLS
//!   server name is the node's *name* (e.g. `coalesce-1`), not the host in its address, so a
//!   certificate issued for another node does not pass.
//!
//! **Identity rule.** A node's certificate names the node: its name is a DNS subject
//! alternative name (or the subject CN) of the certificate, and it names no other node of the
//! cluster. A certificate whose extended key usage excludes `serverAuth` (a client-only
//! certificate) is never a peer, even from the same CA.
//!
//! Libraries: rustls with the ring provider (as tonic's `tls-ring`), tokio-rustls,
//! rustls-pki-types (PEM), x509-parser (names and expiry of a certificate).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::connections::{Calls, ConnLimits, HostCounts, Lifetime, Slot, TrackCalls};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes in progress at once on one port. A connection beyond it evicts the oldest
/// pending handshake rather than being refused: a flood of idle connections from many addresses
/// then only delays callers that complete their handshakes (in milliseconds) if it replaces the
/// whole set faster than that, instead of locking them out.
const MAX_HANDSHAKES: usize = 1024;
/// Handshakes in progress at once from one IP address; beyond it, closed at once.
const MAX_HANDSHAKES_PER_IP: usize = 8;

/// Where one port's certificates live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This node's certificate chain (leaf first).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signs the certificates this port accepts from the other side (peers, or
    /// clients when client certificates are required).
    pub ca: Option<PathBuf>,
    /// On the peer port: the node this certificate must speak for, among the cluster's nodes
    /// (checked at load and at every reload, so a wrong file never replaces a right one).
    pub node: Option<(String, Vec<String>)>,
}

/// What one load of the files produced.
#[derive(Debug)]
struct Material {
    /// The files' bytes, to notice a change.
    raw: Vec<Vec<u8>>,
    key: Arc<CertifiedKey>,
    /// Chain checks against the CA: client certificates (server side) and the dialed peer's
    /// certificate (client side).
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    server_verifier: Option<Arc<dyn ServerCertVerifier>>,
    /// The leaf certificate's expiry (Unix seconds).
    not_after: i64,
}

/// One port's certificates, reloadable (see the module docs).
#[derive(Debug)]
pub struct Certs {
    /// `peer` or `client`: names the port in logs and metrics.
    port: &'static str,
    files: TlsFiles,
    current: RwLock<Arc<Material>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl Certs {
    /// Reads and checks the files (paths as given: resolve them before).
    pub fn load(port: &'static str, files: TlsFiles) -> Result<Arc<Self>, String> {
        let material = Self::read_material(port, &files)?;
        set_expiry(port, material.not_after);
        for result in ["reloaded", "failed"] {
            crate::metrics::TLS_RELOADS.with_label_values(&[port, result]);
        }
        crate::metrics::TLS_HANDSHAKE_FAILURES.with_label_values(&[port]);
        Ok(Arc::new(Self { port, files, current: RwLock::new(Arc::new(material)) }))
    }

    fn read_material(port: &str, files: &TlsFiles) -> Result<Material, String> {
        let cert_pem = read(&files.cert, &format!("tls.{port}.cert"))?;
        let key_pem = read(&files.key, &format!("tls.{port}.key"))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("tls.{port}.cert {}: {e}", files.cert.display()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| format!("tls.{port}.cert {}: no certificate in the file", files.cert.display()))?;
        let names = Names::of(leaf).map_err(|e| format!("tls.{port}.cert {}: {e}", files.cert.display()))?;
        if let Some((me, cluster)) = &files.node {
            match names.node(cluster.iter().map(String::as_str)) {
                Ok(n) if n.eq_ignore_ascii_case(me) => {}
                Ok(n) => {
                    return Err(format!(
                        "tls.{port}.cert {}: the certificate is node {n}'s, not {me}'s",
                        files.cert.display()
                    ));
                }
                Err(e) => return Err(format!("tls.{port}.cert {}: {e}; this node is {me}", files.cert.display())),
            }
        }
        let not_after = names.not_after;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("tls.{port}.key {}: {e}", files.key.display()))?;
        let key = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| format!("tls.{port}.key {}: {e} (does it match the certificate?)", files.key.display()))?;
        let mut raw = vec![cert_pem, key_pem];
        let (mut client_verifier, mut server_verifier) = (None, None);
        if let Some(ca) = &files.ca {
            let ca_pem = read(ca, &format!("tls.{port}.ca"))?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca_pem) {
                let c = c.map_err(|e| format!("tls.{port}.ca {}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("tls.{port}.ca {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("tls.{port}.ca {}: no certificate in the file", ca.display()));
            }
            let roots = Arc::new(roots);
            client_verifier = Some(
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                    .build()
                    .map_err(|e| format!("tls.{port}.ca {}: {e}", ca.display()))?,
            );
            server_verifier = Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| format!("tls.{port}.ca {}: {e}", ca.display()))?
                    as Arc<dyn ServerCertVerifier>,
            );
            raw.push(ca_pem);
        }
        Ok(Material { raw, key: Arc::new(key), client_verifier, server_verifier, not_after })
    }

    fn now(&self) -> Arc<Material> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the files; swaps them in when they changed and load. `Ok(true)`: reloaded.
    pub fn reload(&self) -> Result<bool, String> {
        let material = Self::read_material(self.port, &self.files)?;
        if material.raw == self.now().raw {
            return Ok(false);
        }
        set_expiry(self.port, material.not_after);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
        Ok(true)
    }

    /// Reloads every `every` until `stop` resolves (see the module docs).
    pub async fn watch(self: Arc<Self>, every: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            let this = self.clone();
            let outcome = tokio::task::spawn_blocking(move || this.reload()).await;
            match outcome {
                Ok(Ok(true)) => {
                    crate::metrics::TLS_RELOADS.with_label_values(&[self.port, "reloaded"]).inc();
                    tracing::info!(port = self.port, "TLS certificates reloaded");
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    crate::metrics::TLS_RELOADS.with_label_values(&[self.port, "failed"]).inc();
                    tracing::error!(port = self.port, %error, "TLS certificates not reloaded; the previous ones stay in use");
                }
                Err(e) => tracing::error!(port = self.port, error = %e, "TLS reload task failed"),
            }
        }
    }

    /// Whether a CA is configured (client certificates are required on the server side).
    pub fn has_ca(&self) -> bool {
        self.files.ca.is_some()
    }

    /// A server configuration that always presents the current certificate and, with a CA,
    /// requires client certificates it signed.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"));
        let builder = if self.has_ca() {
            builder.with_client_cert_verifier(Arc::new(Reloading(self.clone())))
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_cert_resolver(Arc::new(Reloading(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session would skip checking the client's chain
        // against a CA reloaded since (and connections here are long-lived anyway).
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }

    /// A client configuration presenting the current certificate and checking the server's
    /// against the CA (which must be configured).
    pub fn client_config(self: &Arc<Self>) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Reloading(self.clone())))
            .with_client_cert_resolver(Arc::new(Reloading(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

fn set_expiry(port: &str, not_after: i64) {
    crate::metrics::TLS_CERT_EXPIRY.with_label_values(&[port]).set(not_after);
}

/// The current certificates, as rustls resolvers and verifiers. Verification is webpki's,
/// against the CA loaded last.
#[derive(Debug)]
struct Reloading(Arc<Certs>);

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.now().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Reloading {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.now().key.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn no_ca() -> rustls::Error {
    rustls::Error::General("no CA is configured".into())
}

/// The handshake-signature methods both verifier traits require: rustls' own checks with the
/// ring provider's algorithms (they do not depend on the CA).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider().signature_verification_algorithms.supported_schemes()
        }
    };
}

impl ClientCertVerifier for Reloading {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints (they would borrow from certificates that may be swapped): a client sends
        // the certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verifier = self.0.now().client_verifier.clone().ok_or_else(no_ca)?;
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    handshake_signatures!();
}

impl ServerCertVerifier for Reloading {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verifier = self.0.now().server_verifier.clone().ok_or_else(no_ca)?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    handshake_signatures!();
}

/// The names a certificate carries and what it may be used for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// DNS subject alternative names, or the subject common names when it has none.
    pub names: Vec<String>,
    /// Whether the certificate may serve TLS (no extended key usage, or one with `serverAuth`).
    pub server_auth: bool,
    not_after: i64,
}

impl Names {
    /// Reads a DER certificate's names.
    pub fn of(der: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let GeneralName::DNSName(d) = n {
                    names.push((*d).to_owned());
                }
            }
        }
        // The subject CN counts only without DNS names (RFC 6125, as TLS clients do).
        if names.is_empty() {
            for cn in cert.subject().iter_common_name() {
                if let Ok(s) = cn.as_str() {
                    names.push(s.to_owned());
                }
            }
        }
        let server_auth = match cert.extended_key_usage() {
            Ok(Some(eku)) => eku.value.server_auth || eku.value.any,
            Ok(None) => true,
            Err(_) => false,
        };
        Ok(Self { names, server_auth, not_after: cert.validity().not_after.timestamp() })
    }

    /// The one node of `nodes` this certificate speaks for (see the module docs).
    pub fn node<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) -> Result<&'a str, String> {
        if !self.server_auth {
            return Err(format!(
                "the certificate ({}) is a client certificate (its extended key usage excludes serverAuth), not a \
                 node's",
                self.list()
            ));
        }
        let named: Vec<&str> =
            nodes.into_iter().filter(|n| self.names.iter().any(|c| c.eq_ignore_ascii_case(n))).collect();
        match named.as_slice() {
            [one] => Ok(one),
            [] => Err(format!("the certificate ({}) names no node of this cluster", self.list())),
            many => Err(format!("the certificate names several nodes ({}): each node needs its own", many.join(", "))),
        }
    }

    fn list(&self) -> String {
        if self.names.is_empty() { "no names".to_owned() } else { format!("names {}", self.names.join(", ")) }
    }
}

/// What a connection on a TLS port knows about its client (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The client certificate's names, when it presented one (mandatory on the peer port).
    pub peer: Option<Arc<Names>>,
    /// The calls open on the connection, for its idle timeout
    /// ([`crate::connections::TrackCallsLayer`]).
    pub(crate) calls: Arc<Calls>,
}

impl ConnInfo {
    /// The connection info of a request, if it came over a TLS port.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Self> {
        request.extensions().get::<Self>()
    }
}

/// A connection accepted by [`incoming`]: plain TCP, or TLS once its handshake completed.
/// It holds its place among the port's connections until dropped, and its reads fail once it
/// has been silent or idle too long ([`crate::connections`]).
#[derive(Debug)]
pub struct Conn {
    /// Dropped first: the slot is free by the time the other end sees the connection close.
    life: Lifetime,
    io: Io,
    info: ConnInfo,
}

impl Conn {
    fn new(io: Io, remote: SocketAddr, peer: Option<Arc<Names>>, slot: Slot) -> Self {
        let life = Lifetime::new(slot);
        let info = ConnInfo { remote: Some(remote), peer, calls: life.calls() };
        Self { life, io, info }
    }

    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// `inner`, counting its calls as this connection's: for a server handed its connections
    /// one by one (tonic finds them through [`ConnInfo`] instead; see
    /// [`crate::connections::TrackCallsLayer`]).
    pub fn track_calls<S>(&self, inner: S) -> TrackCalls<S> {
        TrackCalls::for_connection(inner, self.info.calls.clone())
    }
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Poll::Ready(timed_out) = self.life.poll_expired(cx) {
            return Poll::Ready(Err(timed_out));
        }
        let before = buf.filled().len();
        let read = delegate!(self, s => s.poll_read(cx, buf));
        if buf.filled().len() > before {
            self.life.saw_bytes();
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The connections accepted on `listener` (with `TCP_NODELAY`; tonic's builder option does
/// not apply to a listener bound outside it, and Nagle would hold a response's last small frame
/// for the peer's delayed ACK), within `limits` ([`crate::connections`]; a connection over them
/// is reset at once). With `tls`, handshakes run concurrently off the accept loop, each within
/// [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES_PER_IP`] from one address (more are closed)
/// and [`MAX_HANDSHAKES`] in all (more evict the oldest); failed ones are counted and logged at
/// debug level. A TLS connection takes its place among the port's connections once its
/// handshake completes (so a flood of handshakes cannot lock out real callers: it evicts
/// itself), and is not handshaken at all while the port or its address is full. A port's
/// file descriptors are therefore at most `limits.max_connections` (plus, with TLS,
/// [`MAX_HANDSHAKES`]). The accept loop ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    port: &'static str,
    limits: ConnLimits,
) -> impl futures::Stream<Item = Result<Conn, std::io::Error>> {
    incoming_with(listener, tls, port, limits, MAX_HANDSHAKES)
}

/// Closes a refused connection with a reset: nothing is sent, and no TIME_WAIT is left behind.
fn refuse(tcp: &TcpStream) {
    let _ = tcp.set_zero_linger();
}

/// [`incoming`] with at most `max_handshakes` in progress.
fn incoming_with(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    port: &'static str,
    limits: ConnLimits,
    max_handshakes: usize,
) -> impl futures::Stream<Item = Result<Conn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Conn, std::io::Error>>(64);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let pending = Arc::new(Pending { max: max_handshakes, ..Pending::default() });
    let conns = crate::connections::Port::new(port, limits);
    let per_ip: Arc<std::sync::Mutex<HostCounts>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(port, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                let Some(slot) = conns.admit(remote) else {
                    refuse(&tcp);
                    continue;
                };
                if tx.send(Ok(Conn::new(Io::Plain(tcp), remote, None, slot))).await.is_err() {
                    return;
                }
                continue;
            };
            if !conns.has_room(remote) {
                refuse(&tcp);
                continue;
            }
            let Some(ip_slot) = IpSlot::take(&per_ip, crate::connections::host(remote)) else {
                crate::metrics::TLS_HANDSHAKE_FAILURES.with_label_values(&[port]).inc();
                tracing::debug!(port, %remote, "too many TLS handshakes from this address: connection closed");
                continue;
            };
            let (slot, evicted) = pending.admit(port);
            let tx = tx.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                let _slots = (slot, ip_slot);
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let outcome = tokio::select! {
                    r = handshake => r,
                    _ = evicted => {
                        tracing::debug!(port, %remote, "TLS handshake evicted by a newer connection");
                        return;
                    }
                };
                match outcome {
                    Ok(Ok(stream)) => {
                        // Full again while it shook hands: no place for it.
                        let Some(place) = conns.admit(remote) else {
                            refuse(stream.get_ref().0);
                            return;
                        };
                        let peer = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|leaf| Names::of(leaf).ok())
                            .map(Arc::new);
                        let _ = tx.send(Ok(Conn::new(Io::Tls(Box::new(stream)), remote, peer, place))).await;
                    }
                    Ok(Err(e)) => {
                        crate::metrics::TLS_HANDSHAKE_FAILURES.with_label_values(&[port]).inc();
                        tracing::debug!(port, %remote, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        crate::metrics::TLS_HANDSHAKE_FAILURES.with_label_values(&[port]).inc();
                        tracing::debug!(port, %remote, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether `name` can be checked against a certificate (a DNS name, e.g. `coalesce-0`).
pub fn is_certificate_name(name: &str) -> bool {
    matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)))
}

/// The handshakes in progress on one port, oldest first, each with the way to cancel it.
#[derive(Debug, Default)]
struct Pending {
    max: usize,
    next: std::sync::atomic::AtomicU64,
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>>,
}

impl Pending {
    /// Admits a handshake, evicting the oldest when `max` are in progress. The receiver fires
    /// when this one is evicted in turn.
    fn admit(self: &Arc<Self>, port: &'static str) -> (PendingSlot, tokio::sync::oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (cancel, cancelled) = tokio::sync::oneshot::channel();
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.len() >= self.max.max(1) {
            if let Some((_, oldest)) = q.pop_front() {
                crate::metrics::TLS_HANDSHAKE_FAILURES.with_label_values(&[port]).inc();
                let _ = oldest.send(());
            }
        }
        q.push_back((id, cancel));
        (PendingSlot { pending: self.clone(), id }, cancelled)
    }
}

/// A handshake in [`Pending`], removed when dropped.
struct PendingSlot {
    pending: Arc<Pending>,
    id: u64,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut q = self.pending.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.iter().position(|(id, _)| *id == self.id) {
            q.remove(i);
        }
    }
}

/// One handshake in progress from a host, released when dropped.
struct IpSlot {
    map: Arc<std::sync::Mutex<HostCounts>>,
    ip: std::net::IpAddr,
}

impl IpSlot {
    fn take(map: &Arc<std::sync::Mutex<HostCounts>>, ip: std::net::IpAddr) -> Option<Self> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(ip) >= MAX_HANDSHAKES_PER_IP {
            return None;
        }
        m.add(ip);
        Some(Self { map: map.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).release(self.ip);
    }
}

/// Dials a peer over TLS and checks that its certificate is the dialed node's by the same
/// rule a peer's client certificate is checked by ([`Names::node`] over the cluster's nodes),
/// after webpki checked it names the node: a tonic connector
/// (`Endpoint::connect_with_connector_lazy`).
#[derive(Debug, Clone)]
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    node: ServerName<'static>,
    name: String,
    cluster: Arc<Vec<String>>,
}

impl Connector {
    /// A connector to the node called `node`, one of `cluster`.
    pub fn new(
        config: Arc<rustls::ClientConfig>,
        node: &str,
        cluster: Arc<Vec<String>>,
    ) -> Result<Self, crate::network::ChannelError> {
        let server = ServerName::try_from(node.to_owned())
            .map_err(|e| crate::network::ChannelError::BadName { node: node.to_owned(), detail: e.to_string() })?;
        Ok(Self { config, node: server, name: node.to_owned(), cluster })
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (config, node) = (self.config.clone(), self.node.clone());
        let (name, cluster) = (self.name.clone(), self.cluster.clone());
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no address in {uri}")))?;
            let tcp = TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(node, tcp).await?;
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| Names::of(c));
            let speaks_for = match leaf {
                Some(Ok(names)) => names.node(cluster.iter().map(String::as_str)).map(str::to_owned),
                Some(Err(e)) => Err(e),
                None => Err("no certificate".to_owned()),
            };
            let denied = |m: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, m);
            match speaks_for {
                Ok(n) if n.eq_ignore_ascii_case(&name) => Ok(hyper_util::rt::TokioIo::new(tls)),
                Ok(n) => Err(denied(format!("dialed {name}, answered with node {n}'s certificate"))),
                Err(e) => Err(denied(format!("dialed {name}: {e}"))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Bounds no test here reaches.
    const OPEN: ConnLimits = ConnLimits {
        max_connections: 1 << 20,
        max_connections_per_ip: 1 << 20,
        first_byte_timeout: Duration::from_secs(60),
        idle_timeout: None,
    };

    fn names(names: &[&str], server_auth: bool) -> Names {
        Names { names: names.iter().map(|s| (*s).to_owned()).collect(), server_auth, not_after: 0 }
    }

    /// A CA, and a function that writes a certificate it signed for `name` (valid `days`) as
    /// `<file>.pem`/`.key` in `dir`.
    fn ca(dir: &std::path::Path) -> impl Fn(&str, &str, i64) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(dir.join("ca.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
        let issuer = rcgen::Issuer::new(params, key);
        let dir = dir.to_owned();
        move |file: &str, name: &str, days: i64| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            // Valid from an hour ago for a year and `days`: not_after differs by whole days.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            let today = now - now % 86_400;
            p.not_before =
                rcgen::date_time_ymd(1975, 1, 1) + std::time::Duration::from_secs((now - 3_600 - 157_766_400) as u64);
            p.not_after = rcgen::date_time_ymd(1975, 1, 1)
                + std::time::Duration::from_secs((today + (365 + days) * 86_400 - 157_766_400) as u64);
            let cert = p.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        }
    }

    fn files(dir: &std::path::Path, file: &str) -> TlsFiles {
        TlsFiles {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
            ca: Some(dir.join("ca.pem")),
            node: None,
        }
    }

    #[test]
    fn changed_certificates_are_swapped_in_and_broken_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let issue = ca(dir.path());
        issue("n", "coalesce-0", 1);
        let certs = Certs::load("peer", files(dir.path(), "n")).unwrap();
        let first = certs.now().not_after;
        assert!(!certs.reload().unwrap(), "unchanged files are not reloaded");
        issue("n", "coalesce-0", 2);
        assert!(certs.reload().unwrap());
        assert_eq!(certs.now().not_after, first + 86_400);
        std::fs::write(dir.path().join("n.key"), "not a key").unwrap();
        let e = certs.reload().unwrap_err();
        assert!(e.contains("tls.peer.key"), "{e}");
        assert_eq!(certs.now().not_after, first + 86_400, "the previous certificates stay in use");
        issue("n", "coalesce-0", 2);
        issue("other", "coalesce-0", 3);
        std::fs::copy(dir.path().join("other.pem"), dir.path().join("n.pem")).unwrap();
        let e = certs.reload().unwrap_err();
        assert!(e.contains("does it match the certificate"), "a key of another certificate: {e}");
    }

    #[test]
    fn a_peer_certificate_must_be_this_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let issue = ca(dir.path());
        issue("n", "coalesce-0", 1);
        let cluster = ["coalesce-0", "coalesce-1"].map(String::from).to_vec();
        let mut f = files(dir.path(), "n");
        f.node = Some(("coalesce-1".into(), cluster.clone()));
        let e = Certs::load("peer", f.clone()).unwrap_err();
        assert!(e.contains("node coalesce-0's, not coalesce-1's"), "{e}");
        f.node = Some(("coalesce-0".into(), cluster));
        let certs = Certs::load("peer", f).unwrap();
        issue("n", "coalesce-1", 1);
        assert!(
            certs.reload().unwrap_err().contains("not coalesce-0's"),
            "a wrong certificate never replaces a right one"
        );
    }

    /// Serves TLS with `server`'s certificate; dials it as `client` expecting node `dialed`.
    async fn handshake(dir: &std::path::Path, server: &str, client: &str, dialed: &str) -> Result<Names, String> {
        use tower::Service;
        let server = Certs::load("peer", files(dir, server)).unwrap();
        let client = Certs::load("peer", files(dir, client)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(incoming(listener, Some(server.server_config()), "peer", OPEN));
        let cluster = Arc::new(["coalesce-0", "coalesce-1", "coalesce-2"].map(String::from).to_vec());
        let mut connector = Connector::new(client.client_config(), dialed, cluster).unwrap();
        let dial = connector.call(format!("http://{addr}").parse().unwrap());
        let accept = async {
            use futures::StreamExt;
            tokio::time::timeout(Duration::from_secs(2), conns.next()).await
        };
        let (dialed, accepted) = tokio::join!(dial, accept);
        dialed.map_err(|e| e.to_string())?;
        let conn = accepted.map_err(|_| "not accepted".to_owned())?.unwrap().unwrap();
        Ok((*conn.info.peer.unwrap()).clone())
    }

    #[tokio::test]
    async fn a_peer_is_dialed_by_its_node_name_and_its_client_certificate_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let issue = ca(dir.path());
        issue("a", "coalesce-0", 1);
        issue("b", "coalesce-1", 1);
        let names = handshake(dir.path(), "a", "b", "coalesce-0").await.unwrap();
        assert_eq!(names.node(["coalesce-0", "coalesce-1"]).unwrap(), "coalesce-1", "the caller is node 1");
        let e = handshake(dir.path(), "a", "b", "coalesce-2").await.unwrap_err();
        assert!(e.contains("not valid for name \"coalesce-2\""), "node 0 cannot answer for node 2: {e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_from_many_addresses_do_not_lock_out_a_real_handshake() {
        use futures::StreamExt;
        use tower::Service;
        let dir = tempfile::tempdir().unwrap();
        let issue = ca(dir.path());
        issue("a", "coalesce-0", 1);
        issue("b", "coalesce-1", 1);
        let server = Certs::load("peer", files(dir.path(), "a")).unwrap();
        let client = Certs::load("peer", files(dir.path(), "b")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(incoming_with(listener, Some(server.server_config()), "peer", OPEN, 16));
        // 48 connections that never say a word, 2 from each of 24 loopback addresses: three
        // times the handshake limit, each address within its own limit.
        let mut idle = Vec::new();
        for i in 0..48u8 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(std::net::SocketAddr::from(([127, 0, 9, 1 + i / 2], 0))).unwrap();
            idle.push(s.connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cluster = Arc::new(["coalesce-0", "coalesce-1"].map(String::from).to_vec());
        let mut connector = Connector::new(client.client_config(), "coalesce-0", cluster).unwrap();
        let dial = connector.call(format!("http://{addr}").parse().unwrap());
        let accept = tokio::time::timeout(Duration::from_secs(2), conns.next());
        let (dialed, accepted) = tokio::join!(dial, accept);
        assert!(dialed.is_ok(), "the real handshake completes: {:?}", dialed.err());
        assert!(accepted.unwrap().unwrap().is_ok());
        drop(idle);
    }

    /// A full port resets a new connection at once; a connection that never speaks is closed
    /// after the first-byte timeout, one that spoke stays.
    #[tokio::test]
    async fn a_full_port_resets_new_connections_and_silent_ones_are_closed() {
        use futures::StreamExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first_byte_timeout = Duration::from_secs(2);
        let limits =
            ConnLimits { max_connections: 2, max_connections_per_ip: 3, first_byte_timeout, idle_timeout: None };
        let mut conns = Box::pin(incoming(listener, None, "unit-full", limits));
        // Served as a server would: read until the connection fails or ends.
        tokio::spawn(async move {
            while let Some(Ok(mut c)) = conns.next().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 16];
                    while matches!(c.read(&mut b).await, Ok(n) if n > 0) {}
                });
            }
        });
        let mut spoke = TcpStream::connect(addr).await.unwrap();
        spoke.write_all(b"x").await.unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut over = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed = |r: std::io::Result<usize>| matches!(r, Ok(0) | Err(_));
        let r = tokio::time::timeout(Duration::from_secs(10), over.read(&mut buf)).await.unwrap();
        assert!(closed(r), "the third connection is closed");
        assert!(started.elapsed() < first_byte_timeout, "at once: {:?}", started.elapsed());
        let refused = crate::metrics::CONNECTIONS_REFUSED.with_label_values(&["unit-full", "max_connections"]);
        assert_eq!(refused.get(), 1);
        let r = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await.unwrap();
        assert!(closed(r), "the silent connection is closed");
        assert!(started.elapsed() >= first_byte_timeout, "by its timeout: {:?}", started.elapsed());
        let timed_out = crate::metrics::CONNECTIONS_TIMED_OUT.with_label_values(&["unit-full", "first_byte"]);
        assert_eq!(timed_out.get(), 1);
        assert!(
            matches!(spoke.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the connection that spoke is still open"
        );
    }

    #[test]
    fn a_certificate_speaks_for_exactly_one_node() {
        let nodes = ["coalesce-0", "coalesce-1", "coalesce-2"];
        let n = names(&["coalesce-1.peers.svc", "coalesce-1"], true);
        assert_eq!(n.node(nodes).unwrap(), "coalesce-1");
        let shared = names(&["coalesce-0", "coalesce-1", "coalesce-2"], true);
        assert!(shared.node(nodes).unwrap_err().contains("several nodes"));
        let other = names(&["producer-7"], true);
        assert!(other.node(nodes).unwrap_err().contains("names no node"));
        let client = names(&["coalesce-1"], false);
        assert!(client.node(nodes).unwrap_err().contains("client certificate"));
    }
}
