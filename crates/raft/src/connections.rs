//! Bounds on the connections of one listening port, kept where connections are accepted
//! ([`crate::tls::incoming`], the accept loop of the client, peer and HTTP ports).
//!
//! ```text
//!  accept ──► max_connections or max_connections_per_ip reached? ──yes──► reset at once;
//!    │        (TLS: checked before and after the handshake,            counted, logged at
//!    │         which has bounds of its own)                            most every 10 s
//!    ▼ no
//!  a slot, held until the connection closes
//!    │
//!    ├─ no byte within first_byte_timeout ──────────────────────────► closed, counted
//!    └─ no call open for idle_timeout (counted by [`TrackCallsLayer`]) ► closed, counted
//! ```
//!
//! What each bound protects against (the incident: ~21,000 connections that sent nothing, or
//! only the HTTP/2 preface, took all 20k file descriptors of a node, which then could accept
//! neither peers nor clients nor open RocksDB files):
//!
//! - **`max_connections`**: the process's file descriptors. A flood from any number of
//!   addresses fills one port, never the process: the other ports and RocksDB keep theirs.
//!   A connection over it is accepted and reset at once rather than left in the kernel's
//!   backlog: the backlog would queue real callers behind the flood with no deadline, and
//!   the reset is counted, tells the caller at once, and keeps the backlog moving for when a
//!   slot frees.
//! - **`max_connections_per_ip`**: one host — an attacker, or a client leaking
//!   connections — cannot take a whole port from the others.
//! - **`first_byte_timeout`**: connections that connect and say nothing (after the TLS
//!   handshake, on a TLS port: the handshake has its own timeout).
//! - **`idle_timeout`**: connections that said something and then nothing: an HTTP/2 preface
//!   and no call, an abandoned client channel, an HTTP/1 keep-alive connection between
//!   requests, a request header trickled forever (slowloris). A connection is busy while a
//!   call is open on it, bytes or not: a subscription that receives nothing for an hour is
//!   never cut. (A dead client holding a call open is found by HTTP/2 keepalive pings, set on
//!   the gRPC servers, not here.)
//!
//! The timeouts are checked when the connection is read, which its server does whenever it
//! waits for the other end (an HTTP/2 connection always; an HTTP/1 one between requests). A
//! connection closed by them is dropped without an HTTP/2 GOAWAY (the server, not this
//! wrapper, owns the protocol): a call a client starts in the same instant fails as
//! UNAVAILABLE and is retried on a new connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::metrics::{CONNECTION_LIMIT, CONNECTIONS, CONNECTIONS_REFUSED, CONNECTIONS_TIMED_OUT};

/// How often a port logs the connections it refused (each is counted in the metrics).
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// The bounds of one listening port (see the module docs for what each protects against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once; a new one beyond it is reset at once.
    pub max_connections: usize,
    /// Connections open at once from one IP address; beyond it, reset at once.
    pub max_connections_per_ip: usize,
    /// A connection that sends no byte this long after it was accepted (after its TLS
    /// handshake) is closed.
    pub first_byte_timeout: Duration,
    /// A connection with no call open this long is closed; `None`: never. Calls are counted
    /// by [`TrackCallsLayer`], which the port's server must then have (without it every
    /// connection counts as idle).
    pub idle_timeout: Option<Duration>,
}

/// Why a connection was refused (the `reason` label of `coalesce_net_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::MaxConnections, Refusal::MaxConnectionsPerIp];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// Why a connection was closed by a timeout (the `reason` label of
/// `coalesce_net_connections_timed_out_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    FirstByte,
    Idle,
}

impl Expiry {
    pub const ALL: [Expiry; 2] = [Expiry::FirstByte, Expiry::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            Expiry::FirstByte => "first_byte",
            Expiry::Idle => "idle",
        }
    }

    fn error(self) -> std::io::Error {
        let why = match self {
            Expiry::FirstByte => "the connection sent nothing within the first-byte timeout",
            Expiry::Idle => "the connection had no call open for the idle timeout",
        };
        std::io::Error::new(std::io::ErrorKind::TimedOut, why)
    }
}

/// How many of something (connections, handshakes) each host holds; a host holding none is
/// not kept.
#[derive(Debug, Default)]
pub(crate) struct HostCounts(HashMap<IpAddr, usize>);

impl HostCounts {
    pub(crate) fn get(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).copied().unwrap_or(0)
    }

    pub(crate) fn add(&mut self, ip: IpAddr) {
        *self.0.entry(ip).or_default() += 1;
    }

    pub(crate) fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.0.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&ip);
            }
        }
    }

    #[cfg(test)]
    fn hosts(&self) -> usize {
        self.0.len()
    }
}

/// The connections open on a port, in all and per address: pure bookkeeping.
#[derive(Debug, Default)]
struct Book {
    open: usize,
    per_ip: HostCounts,
}

impl Book {
    /// Whether one more connection from `ip` fits. The address's own bound is checked first:
    /// when one address holds its whole share, that is the reason worth reporting.
    fn check(&self, ip: IpAddr, limits: &ConnLimits) -> Result<(), Refusal> {
        if self.per_ip.get(ip) >= limits.max_connections_per_ip {
            return Err(Refusal::MaxConnectionsPerIp);
        }
        if self.open >= limits.max_connections {
            return Err(Refusal::MaxConnections);
        }
        Ok(())
    }

    fn admit(&mut self, ip: IpAddr, limits: &ConnLimits) -> Result<(), Refusal> {
        self.check(ip, limits)?;
        self.open += 1;
        self.per_ip.add(ip);
        Ok(())
    }

    fn release(&mut self, ip: IpAddr) {
        self.open = self.open.saturating_sub(1);
        self.per_ip.release(ip);
    }
}

/// Lets one message through per period and counts the ones held back.
#[derive(Debug)]
pub(crate) struct LogEvery {
    period: Duration,
    /// When the last message went out, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogEvery {
    pub(crate) fn new(period: Duration) -> Self {
        Self { period, state: Mutex::new((None, 0)) }
    }

    /// `Some(held back since the last one)` when this occurrence is to be logged.
    pub(crate) fn hit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.0 {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }
}

/// One port's connections: the bookkeeping behind its bounds, and its metrics.
#[derive(Debug)]
pub(crate) struct Port {
    /// `client`, `peer` or `http`: the `port` label.
    name: &'static str,
    limits: ConnLimits,
    book: Mutex<Book>,
    refusals: LogEvery,
}

/// The key a remote address is bounded by. IPv4 clients of a dual-stack listener arrive as
/// IPv4-mapped IPv6 addresses: one host, one key. An IPv6 host is its /64 (the smallest prefix
/// a network hands one site; one host can pick any address in it, so a bound per full address
/// would bound nothing).
pub(crate) fn host(remote: SocketAddr) -> IpAddr {
    match remote.ip().to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

impl Port {
    pub(crate) fn new(name: &'static str, limits: ConnLimits) -> Arc<Self> {
        CONNECTION_LIMIT.with_label_values(&[name]).set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
        CONNECTIONS.with_label_values(&[name]).set(0);
        for r in Refusal::ALL {
            CONNECTIONS_REFUSED.with_label_values(&[name, r.as_str()]);
        }
        for e in Expiry::ALL {
            CONNECTIONS_TIMED_OUT.with_label_values(&[name, e.as_str()]);
        }
        Arc::new(Self { name, limits, book: Mutex::default(), refusals: LogEvery::new(REFUSALS_LOGGED_EVERY) })
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a connection from `remote` would be admitted now (on a TLS port: before a
    /// handshake is spent on it). A `false` is counted and logged as a refusal.
    pub(crate) fn has_room(&self, remote: SocketAddr) -> bool {
        let checked = self.book().check(host(remote), &self.limits);
        checked.map_err(|why| self.refused(why, remote)).is_ok()
    }

    /// A slot for a connection from `remote`, or `None` (counted and logged): reset it.
    pub(crate) fn admit(self: &Arc<Self>, remote: SocketAddr) -> Option<Slot> {
        let ip = host(remote);
        let admitted = {
            let mut book = self.book();
            let r = book.admit(ip, &self.limits);
            CONNECTIONS.with_label_values(&[self.name]).set(i64::try_from(book.open).unwrap_or(i64::MAX));
            r
        };
        match admitted {
            Ok(()) => Some(Slot { port: self.clone(), ip }),
            Err(why) => {
                self.refused(why, remote);
                None
            }
        }
    }

    fn refused(&self, why: Refusal, remote: SocketAddr) {
        CONNECTIONS_REFUSED.with_label_values(&[self.name, why.as_str()]).inc();
        if let Some(held_back) = self.refusals.hit(Instant::now()) {
            let limit = match why {
                Refusal::MaxConnections => self.limits.max_connections,
                Refusal::MaxConnectionsPerIp => self.limits.max_connections_per_ip,
            };
            tracing::warn!(
                port = self.name,
                reason = why.as_str(),
                limit,
                %remote,
                refused_before_unlogged = held_back,
                "connection refused: the port is at its connection limit (refusals are counted in \
                 coalesce_net_connections_refused_total and logged at most every 10 s)"
            );
        }
    }
}

/// A connection's place in its [`Port`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    port: Arc<Port>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut book = self.port.book();
        book.release(self.ip);
        CONNECTIONS.with_label_values(&[self.port.name]).set(i64::try_from(book.open).unwrap_or(i64::MAX));
    }
}

/// The calls open on one connection, and since when none has been. Shared by the connection
/// (which checks it) and [`TrackCalls`] (which finds it through [`crate::tls::ConnInfo`]).
#[derive(Debug)]
pub(crate) struct Calls {
    base: Instant,
    open: AtomicUsize,
    /// Milliseconds after `base` when the last call ended (or the first byte arrived).
    idle_since_ms: AtomicU64,
}

impl Calls {
    fn new(base: Instant) -> Arc<Self> {
        Arc::new(Self { base, open: AtomicUsize::new(0), idle_since_ms: AtomicU64::new(0) })
    }

    fn start(self: &Arc<Self>) -> CallGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    fn mark_idle(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.base).as_millis();
        self.idle_since_ms.store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Release);
    }

    /// Calls open now, and since when none has been.
    fn observe(&self) -> (usize, Instant) {
        let open = self.open.load(Ordering::Acquire);
        (open, self.base + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }
}

/// One open call; it ends when dropped.
#[derive(Debug)]
pub(crate) struct CallGuard(Arc<Calls>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        // The time first, then the count: whoever reads the count at zero reads this time.
        self.0.mark_idle(Instant::now());
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection's state means for it at `now` (pure: the timeout rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Expired(Expiry),
    /// Nothing to do before then (it may have changed by then: check again).
    CheckAt(Instant),
    /// No timeout applies any more.
    Never,
}

/// A connection's state, as the timeouts see it.
#[derive(Debug, Clone, Copy)]
struct Observed {
    accepted: Instant,
    first_byte: bool,
    open_calls: usize,
    idle_since: Instant,
}

fn verdict(limits: &ConnLimits, o: Observed, now: Instant) -> Verdict {
    if !o.first_byte {
        let deadline = o.accepted + limits.first_byte_timeout;
        return if now >= deadline { Verdict::Expired(Expiry::FirstByte) } else { Verdict::CheckAt(deadline) };
    }
    let Some(idle) = limits.idle_timeout else { return Verdict::Never };
    if o.open_calls > 0 {
        // Busy: look again in a while; the idle time then counts from when its last call ended.
        return Verdict::CheckAt(now + idle);
    }
    let deadline = o.idle_since + idle;
    if now >= deadline { Verdict::Expired(Expiry::Idle) } else { Verdict::CheckAt(deadline) }
}

/// What a connection carries for its bounds: its slot, its calls and the timer of its
/// timeouts. [`crate::tls::Conn`] checks it on every read.
#[derive(Debug)]
pub(crate) struct Lifetime {
    slot: Slot,
    calls: Arc<Calls>,
    accepted: Instant,
    first_byte: bool,
    /// Set once a timeout closed the connection: every later read fails the same way.
    expired: Option<Expiry>,
    /// When to look at the timeouts next; `None`: never again.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Lifetime {
    pub(crate) fn new(slot: Slot) -> Self {
        let accepted = Instant::now();
        let deadline = accepted + slot.port.limits.first_byte_timeout;
        Self {
            slot,
            calls: Calls::new(accepted),
            accepted,
            first_byte: false,
            expired: None,
            timer: Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    pub(crate) fn calls(&self) -> Arc<Calls> {
        self.calls.clone()
    }

    /// Before a read: `Ready(error)` once a timeout has closed the connection. Registers the
    /// timer with `cx` otherwise.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        if let Some(why) = self.expired {
            return Poll::Ready(why.error());
        }
        let limits = self.slot.port.limits;
        loop {
            let Some(timer) = self.timer.as_mut() else { return Poll::Pending };
            ready!(timer.as_mut().poll(cx));
            let (open_calls, idle_since) = self.calls.observe();
            let seen = Observed { accepted: self.accepted, first_byte: self.first_byte, open_calls, idle_since };
            match verdict(&limits, seen, Instant::now()) {
                Verdict::CheckAt(at) => timer.as_mut().reset(at),
                Verdict::Never => self.timer = None,
                Verdict::Expired(why) => {
                    self.expired = Some(why);
                    self.timer = None;
                    CONNECTIONS_TIMED_OUT.with_label_values(&[self.slot.port.name, why.as_str()]).inc();
                    tracing::debug!(
                        port = self.slot.port.name,
                        reason = why.as_str(),
                        "connection closed by a timeout"
                    );
                    return Poll::Ready(why.error());
                }
            }
        }
    }

    /// After a read that returned bytes.
    pub(crate) fn saw_bytes(&mut self) {
        if self.first_byte {
            return;
        }
        self.first_byte = true;
        let now = Instant::now();
        self.calls.mark_idle(now);
        if let (Some(idle), Some(timer)) = (self.slot.port.limits.idle_timeout, self.timer.as_mut()) {
            timer.as_mut().reset(now + idle);
        } else {
            self.timer = None;
        }
    }
}

/// Counts the calls open on each connection, for its idle timeout: a tower layer for the
/// servers of ports with one. A call is open from its request to the end of its response
/// body (a subscription: until its stream ends).
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackCallsLayer;

impl<S> tower::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;

    fn layer(&self, inner: S) -> TrackCalls<S> {
        TrackCalls { inner, calls: None }
    }
}

/// See [`TrackCallsLayer`]. Finds the connection's calls in the request's
/// [`crate::tls::ConnInfo`] (tonic puts it there), or is made for one connection
/// ([`crate::tls::Conn::track_calls`]).
#[derive(Debug, Clone)]
pub struct TrackCalls<S> {
    inner: S,
    calls: Option<Arc<Calls>>,
}

impl<S> TrackCalls<S> {
    pub(crate) fn for_connection(inner: S, calls: Arc<Calls>) -> Self {
        Self { inner, calls: Some(calls) }
    }
}

impl<S, Req, Res> tower::Service<http::Request<Req>> for TrackCalls<S>
where
    S: tower::Service<http::Request<Req>, Response = http::Response<Res>>,
{
    type Response = http::Response<Tracked<Res>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Req>) -> Self::Future {
        let calls =
            self.calls.as_ref().or_else(|| request.extensions().get::<crate::tls::ConnInfo>().map(|c| &c.calls));
        let call = calls.map(Calls::start);
        TrackedFuture { response: Box::pin(self.inner.call(request)), call }
    }
}

/// The response of a tracked call; see [`TrackCalls`].
#[derive(Debug)]
pub struct TrackedFuture<F> {
    response: Pin<Box<F>>,
    call: Option<CallGuard>,
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<Tracked<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = ready!(this.response.as_mut().poll(cx))?;
        let call = this.call.take();
        Poll::Ready(Ok(response.map(|body| Tracked { body: Box::pin(body), _call: call })))
    }
}

/// A response body that holds its call open until it is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: Pin<Box<B>>,
    _call: Option<CallGuard>,
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.get_mut().body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LIMITS: ConnLimits = ConnLimits {
        max_connections: 3,
        max_connections_per_ip: 2,
        first_byte_timeout: Duration::from_secs(10),
        idle_timeout: Some(Duration::from_secs(300)),
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_port_admits_up_to_its_bounds_and_frees_slots_on_release() {
        let mut book = Book::default();
        assert_eq!(book.admit(ip(1), &LIMITS), Ok(()));
        assert_eq!(book.admit(ip(1), &LIMITS), Ok(()));
        assert_eq!(book.admit(ip(1), &LIMITS), Err(Refusal::MaxConnectionsPerIp), "one address, two slots");
        assert_eq!(book.admit(ip(2), &LIMITS), Ok(()));
        assert_eq!(book.admit(ip(3), &LIMITS), Err(Refusal::MaxConnections), "three in all");
        assert_eq!(book.open, 3, "refusals take nothing");
        book.release(ip(1));
        assert_eq!(book.check(ip(3), &LIMITS), Ok(()));
        assert_eq!(book.admit(ip(1), &LIMITS), Ok(()), "the address's slot is back");
        for a in [1, 1, 2] {
            book.release(ip(a));
        }
        assert_eq!((book.open, book.per_ip.hosts()), (0, 0), "nothing kept for gone addresses");
    }

    #[test]
    fn an_address_at_its_own_bound_is_the_reason_given() {
        let mut book = Book::default();
        let limits = ConnLimits { max_connections: 2, ..LIMITS };
        book.admit(ip(1), &limits).unwrap();
        book.admit(ip(1), &limits).unwrap();
        assert_eq!(book.check(ip(1), &limits), Err(Refusal::MaxConnectionsPerIp));
        assert_eq!(book.check(ip(2), &limits), Err(Refusal::MaxConnections));
    }

    #[test]
    fn one_host_one_key_ipv4_mapped_or_plain_and_ipv6_by_its_64() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:5000".parse().unwrap();
        let plain: SocketAddr = "10.0.0.1:6000".parse().unwrap();
        assert_eq!(host(mapped), host(plain));
        // One IPv6 host is its /64.
        let a: SocketAddr = "[2001:db8:1:2:aaaa::1]:5".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:bbbb::9]:6".parse().unwrap();
        let other: SocketAddr = "[2001:db8:1:3::1]:5".parse().unwrap();
        assert_eq!(host(a), host(b));
        assert_ne!(host(a), host(other));
    }

    #[test]
    fn a_connection_must_speak_within_the_first_byte_timeout() {
        let t0 = Instant::now();
        let o = Observed { accepted: t0, first_byte: false, open_calls: 0, idle_since: t0 };
        assert_eq!(verdict(&LIMITS, o, t0), Verdict::CheckAt(t0 + Duration::from_secs(10)));
        assert_eq!(verdict(&LIMITS, o, t0 + Duration::from_secs(10)), Verdict::Expired(Expiry::FirstByte));
        let spoke = Observed { first_byte: true, idle_since: t0 + Duration::from_secs(9), ..o };
        assert_eq!(
            verdict(&LIMITS, spoke, t0 + Duration::from_secs(10)),
            Verdict::CheckAt(t0 + Duration::from_secs(309)),
            "then the idle timeout counts from the first byte"
        );
    }

    #[test]
    fn an_open_call_keeps_a_connection_however_long_it_is_quiet() {
        let t0 = Instant::now();
        let busy = Observed { accepted: t0, first_byte: true, open_calls: 1, idle_since: t0 };
        let much_later = t0 + Duration::from_secs(86_400);
        assert_eq!(verdict(&LIMITS, busy, much_later), Verdict::CheckAt(much_later + Duration::from_secs(300)));
        let ended = Observed { open_calls: 0, idle_since: much_later, ..busy };
        assert_eq!(
            verdict(&LIMITS, ended, much_later + Duration::from_secs(299)),
            Verdict::CheckAt(much_later + Duration::from_secs(300)),
            "idle from the end of its last call"
        );
        assert_eq!(verdict(&LIMITS, ended, much_later + Duration::from_secs(300)), Verdict::Expired(Expiry::Idle));
        let no_idle = ConnLimits { idle_timeout: None, ..LIMITS };
        assert_eq!(verdict(&no_idle, ended, much_later + Duration::from_secs(9_999)), Verdict::Never);
    }

    #[test]
    fn calls_are_counted_until_their_guards_drop() {
        let t0 = Instant::now();
        let calls = Calls::new(t0);
        let (a, b) = (calls.start(), calls.start());
        assert_eq!(calls.observe().0, 2);
        drop(a);
        drop(b);
        let (open, since) = calls.observe();
        assert_eq!(open, 0);
        assert!(since >= t0, "idle since the last call ended");
    }

    #[test]
    fn refusals_are_logged_once_per_period_with_the_count_held_back() {
        let log = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.hit(t0), Some(0));
        assert_eq!(log.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.hit(t0 + Duration::from_secs(9)), None);
        assert_eq!(log.hit(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(log.hit(t0 + Duration::from_secs(11)), None);
    }
}
