//! Request coalescing inside one process: a singleflight with a settle delay, a result TTL and
//! cancellation that counts waiters. The `Fetch` RPC routes every (stream, key) to its shard's
//! leader, so one [`Flights`] on that leader collapses the calls of the whole cluster.
//!
//! - The first caller of a key starts a flight: after `settle` (callers arriving meanwhile
//!   join it), the upstream `call` runs once; every waiter gets a clone of its result and
//!   whether it was shared by more than one caller.
//! - The call returns its result with a TTL (chosen per result, so errors need not be
//!   cached): the result stays cached that long and later callers get it without a call.
//! - A waiter that goes away (its RPC was cancelled) never cancels the call for the others.
//!   Only when no waiter is left *and* the settle delay is still running is the flight
//!   dropped; once the call has started it completes (and fills the cache).
//! - Tagged: a caller may name the tag its result must carry ([`Flights::get_tagged`]; the
//!   `Fetch` RPC passes the shard leader's epoch). A flight or cached result of another tag is
//!   neither joined nor served: a new flight replaces it. A replaced flight that is already
//!   calling completes for its own waiters but fills no cache.
//! - Bounded: at most `max_keys` keys in flight or cached; past that, expired entries are
//!   swept and a new key is refused with [`FlightError::Full`].

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How a caller got its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// It started the flight (the upstream call was made for it).
    Called,
    /// It joined a flight another caller started.
    Joined,
    /// From the cache, within the TTL.
    Cached,
}

/// One caller's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched<T> {
    pub value: T,
    /// More than one caller got this result (always true for a cached one).
    pub shared: bool,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlightError {
    #[error("too many keys in flight or cached ({0}); retry later")]
    Full(usize),
    #[error("the upstream call was abandoned (it panicked)")]
    Abandoned,
}

/// Flights and cached results by key, each with a tag `G` (none by default).
pub struct Flights<K, T, G = ()> {
    slots: Arc<Mutex<HashMap<K, Slot<T, G>>>>,
    max_keys: usize,
}

impl<K, T, G> std::fmt::Debug for Flights<K, T, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").field("keys", &lock(&self.slots).len()).field("max_keys", &self.max_keys).finish()
    }
}

impl<K, T, G> Clone for Flights<K, T, G> {
    fn clone(&self) -> Self {
        Self { slots: self.slots.clone(), max_keys: self.max_keys }
    }
}

enum Slot<T, G> {
    Flying(Arc<Flight<T, G>>),
    Cached { value: T, until: Instant, tag: G },
}

struct Flight<T, G> {
    /// The tag its result carries: only callers naming the same tag join it.
    tag: G,
    result: watch::Receiver<Option<(T, bool)>>,
    state: Mutex<FlightState>,
}

#[derive(Default)]
struct FlightState {
    /// Callers waiting now.
    waiters: usize,
    /// Callers that ever joined (for `shared`).
    joined: usize,
    /// The upstream call has started: nothing cancels it any more.
    calling: bool,
    cancelled: bool,
    task: Option<tokio::task::AbortHandle>,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<K, T> Flights<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// The result for `key`: cached, joined, or from a new flight that waits `settle` and then
    /// runs `call` once (on the Tokio runtime, so it outlives this caller). `call` yields the
    /// result and how long to cache it.
    pub async fn get<F, Fut>(&self, key: K, settle: Duration, call: F) -> Result<Fetched<T>, FlightError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = (T, Duration)> + Send + 'static,
    {
        self.get_tagged(key, (), settle, call).await
    }
}

impl<K, T, G> Flights<K, T, G>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
    G: PartialEq + Clone + Send + Sync + 'static,
{
    pub fn new(max_keys: usize) -> Self {
        Self { slots: Arc::new(Mutex::new(HashMap::new())), max_keys: max_keys.max(1) }
    }

    /// Keys in flight or cached (expired ones included until swept).
    pub fn len(&self) -> usize {
        lock(&self.slots).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`Flights::get`] for results tagged `tag`: a cached result or a flight of `key` with
    /// another tag is replaced by a new flight (`call` must produce a result for `tag`).
    pub async fn get_tagged<F, Fut>(&self, key: K, tag: G, settle: Duration, call: F) -> Result<Fetched<T>, FlightError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = (T, Duration)> + Send + 'static,
    {
        let (flight, origin) = {
            let mut slots = lock(&self.slots);
            let now = Instant::now();
            match slots.get(&key) {
                Some(Slot::Cached { value, until, tag: t }) if *until > now && *t == tag => {
                    return Ok(Fetched { value: value.clone(), shared: true, origin: Origin::Cached });
                }
                Some(Slot::Flying(f)) if f.tag == tag => {
                    let f = f.clone();
                    let mut st = lock(&f.state);
                    st.waiters += 1;
                    st.joined += 1;
                    drop(st);
                    (f, Origin::Joined)
                }
                _ => {
                    if slots.len() >= self.max_keys && !slots.contains_key(&key) {
                        slots.retain(|_, s| !matches!(s, Slot::Cached { until, .. } if *until <= now));
                        if slots.len() >= self.max_keys {
                            return Err(FlightError::Full(self.max_keys));
                        }
                    }
                    let f = self.start(&mut slots, key.clone(), tag, settle, call);
                    (f, Origin::Called)
                }
            }
        };
        let mut waiter = Waiter { flights: self, key, flight, done: false };
        let mut rx = waiter.flight.result.clone();
        let outcome = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        waiter.done = true;
        match outcome {
            Ok(Some((value, shared))) => Ok(Fetched { value, shared, origin }),
            _ => Err(FlightError::Abandoned),
        }
    }

    /// A new flight for `key`, in place of whatever the slot held.
    fn start<F, Fut>(
        &self,
        slots: &mut HashMap<K, Slot<T, G>>,
        key: K,
        tag: G,
        settle: Duration,
        call: F,
    ) -> Arc<Flight<T, G>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = (T, Duration)> + Send + 'static,
    {
        let (tx, rx) = watch::channel(None);
        let flight = Arc::new(Flight {
            tag,
            result: rx,
            state: Mutex::new(FlightState { waiters: 1, joined: 1, ..FlightState::default() }),
        });
        slots.insert(key.clone(), Slot::Flying(flight.clone()));
        let (all, mine) = (self.slots.clone(), flight.clone());
        let task = tokio::spawn(async move {
            if !settle.is_zero() {
                tokio::time::sleep(settle).await;
            }
            {
                let mut st = lock(&mine.state);
                if st.cancelled {
                    return;
                }
                st.calling = true;
            }
            let value = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(call())).await;
            // Publish under the slots lock: no caller can join after `shared` is decided.
            let mut slots = lock(&all);
            let Ok((value, ttl)) = value else {
                // Its waiters see the channel close (`Abandoned`); the next caller starts anew.
                if matches!(slots.get(&key), Some(Slot::Flying(f)) if Arc::ptr_eq(f, &mine)) {
                    slots.remove(&key);
                }
                return;
            };
            let shared = lock(&mine.state).joined > 1;
            if matches!(slots.get(&key), Some(Slot::Flying(f)) if Arc::ptr_eq(f, &mine)) {
                if ttl.is_zero() {
                    slots.remove(&key);
                } else {
                    let tag = mine.tag.clone();
                    slots.insert(key, Slot::Cached { value: value.clone(), until: Instant::now() + ttl, tag });
                }
            }
            let _ = tx.send(Some((value, shared)));
        });
        lock(&flight.state).task = Some(task.abort_handle());
        flight
    }
}

/// A caller's place in a flight; dropping it before the result arrived (a cancelled RPC)
/// gives the place up, and the last one to leave during the settle delay cancels the flight.
struct Waiter<'a, K, T, G>
where
    K: Hash + Eq,
{
    flights: &'a Flights<K, T, G>,
    key: K,
    flight: Arc<Flight<T, G>>,
    done: bool,
}

impl<K: Hash + Eq, T, G> Drop for Waiter<'_, K, T, G> {
    fn drop(&mut self) {
        let mut slots = lock(&self.flights.slots);
        let mut st = lock(&self.flight.state);
        st.waiters -= 1;
        if self.done || st.waiters > 0 || st.calling {
            return;
        }
        st.cancelled = true;
        if let Some(task) = st.task.take() {
            task.abort();
        }
        drop(st);
        if matches!(slots.get(&self.key), Some(Slot::Flying(f)) if Arc::ptr_eq(f, &self.flight)) {
            slots.remove(&self.key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const NO: Duration = Duration::ZERO;

    type Call = std::pin::Pin<Box<dyn Future<Output = (String, Duration)> + Send>>;

    /// An upstream that counts calls and answers "<key>#<n>" after `delay`, cached for `ttl`.
    fn upstream(calls: &Arc<AtomicUsize>, key: &str, delay: Duration) -> impl FnOnce() -> Call + Send + 'static {
        cached(calls, key, delay, NO)
    }

    fn cached(
        calls: &Arc<AtomicUsize>,
        key: &str,
        delay: Duration,
        ttl: Duration,
    ) -> impl FnOnce() -> Call + Send + 'static {
        let (calls, key) = (calls.clone(), key.to_owned());
        move || {
            Box::pin(async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(delay).await;
                (format!("{key}#{n}"), ttl)
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_call_per_key() {
        let flights = Flights::<String, String>::new(100);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200 {
            let (f, calls) = (flights.clone(), calls.clone());
            let key = format!("k{}", i % 10);
            tasks.push(tokio::spawn(async move {
                let up = upstream(&calls, &key, Duration::from_millis(50));
                (key.clone(), f.get(key, NO, up).await.unwrap())
            }));
        }
        let mut called = 0;
        for t in tasks {
            let (key, got) = t.await.unwrap();
            assert!(got.value.starts_with(&format!("{key}#")), "{got:?}");
            assert!(got.shared);
            called += usize::from(got.origin == Origin::Called);
        }
        assert_eq!((calls.load(Ordering::SeqCst), called), (10, 10));
        assert!(flights.is_empty(), "no TTL: nothing stays");
    }

    #[tokio::test(start_paused = true)]
    async fn callers_during_the_settle_delay_join_and_later_ones_start_anew() {
        let flights = Flights::<&str, String>::new(10);
        let calls = Arc::new(AtomicUsize::new(0));
        let settle = Duration::from_secs(30);
        let first = tokio::spawn({
            let (f, up) = (flights.clone(), upstream(&calls, "a", NO));
            async move { f.get("a", settle, up).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing called while settling");
        let late = flights.get("a", settle, upstream(&calls, "a", NO)).await.unwrap();
        assert_eq!((late.value.as_str(), late.origin, late.shared), ("a#1", Origin::Joined, true));
        assert_eq!(first.await.unwrap().origin, Origin::Called);
        let next = flights.get("a", settle, upstream(&calls, "a", NO)).await.unwrap();
        assert_eq!((next.value.as_str(), next.shared), ("a#2", false), "a flight after the last one calls again");
    }

    #[tokio::test(start_paused = true)]
    async fn the_ttl_serves_from_cache_then_expires() {
        let flights = Flights::<&str, String>::new(10);
        let calls = Arc::new(AtomicUsize::new(0));
        let ttl = Duration::from_secs(5);
        let a = flights.get("a", NO, cached(&calls, "a", NO, ttl)).await.unwrap();
        assert_eq!((a.origin, a.shared), (Origin::Called, false));
        tokio::time::sleep(Duration::from_secs(4)).await;
        let b = flights.get("a", NO, cached(&calls, "a", NO, ttl)).await.unwrap();
        assert_eq!((b.value.as_str(), b.origin), ("a#1", Origin::Cached));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c = flights.get("a", NO, cached(&calls, "a", NO, ttl)).await.unwrap();
        assert_eq!((c.value.as_str(), c.origin), ("a#2", Origin::Called));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_does_not_cancel_the_others() {
        let flights = Flights::<&str, String>::new(10);
        let calls = Arc::new(AtomicUsize::new(0));
        let settle = Duration::from_secs(1);
        // The starter goes away during the settle delay; the joiner still gets the one call.
        let starter = tokio::spawn({
            let (f, up) = (flights.clone(), upstream(&calls, "a", NO));
            async move { f.get("a", settle, up).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let joiner = tokio::spawn({
            let (f, up) = (flights.clone(), upstream(&calls, "a", NO));
            async move { f.get("a", settle, up).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        starter.abort();
        let got = joiner.await.unwrap().unwrap();
        assert_eq!((got.value.as_str(), got.origin, got.shared), ("a#1", Origin::Joined, true));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_waiter_leaving_during_settle_cancels_but_not_once_calling() {
        let flights = Flights::<&str, String>::new(10);
        let calls = Arc::new(AtomicUsize::new(0));
        let settle = Duration::from_secs(1);
        let gone = tokio::spawn({
            let (f, up) = (flights.clone(), upstream(&calls, "a", NO));
            async move { f.get("a", settle, up).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        gone.abort();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!((calls.load(Ordering::SeqCst), flights.len()), (0, 0), "cancelled before the call");

        // Leaving once the call runs: it completes and fills the cache for the next caller.
        let ttl = Duration::from_secs(60);
        let leaves = tokio::spawn({
            let (f, up) = (flights.clone(), cached(&calls, "b", Duration::from_secs(1), ttl));
            async move { f.get("b", NO, up).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        leaves.abort();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let next = flights.get("b", NO, upstream(&calls, "b", NO)).await.unwrap();
        assert_eq!((next.value.as_str(), next.origin), ("b#1", Origin::Cached));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_call_fails_its_waiters_and_the_next_caller_starts_anew() {
        let flights = Flights::<&str, String>::new(10);
        let boom = || async {
            let none: Option<Duration> = std::hint::black_box(None);
            (String::from("never"), none.expect("upstream client bug"))
        };
        assert_eq!(flights.get("a", NO, boom).await.unwrap_err(), FlightError::Abandoned);
        assert!(flights.is_empty());
        let calls = Arc::new(AtomicUsize::new(0));
        assert_eq!(flights.get("a", NO, upstream(&calls, "a", NO)).await.unwrap().value, "a#1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flight_or_result_of_another_tag_is_neither_joined_nor_served() {
        let flights = Flights::<&str, String, u64>::new(10);
        let calls = Arc::new(AtomicUsize::new(0));
        let (delay, ttl) = (Duration::from_secs(1), Duration::from_secs(60));
        // A tag-1 flight is calling when a tag-2 caller comes: it starts its own call.
        let first = tokio::spawn({
            let (f, up) = (flights.clone(), cached(&calls, "a", delay, ttl));
            async move { f.get_tagged("a", 1, NO, up).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = flights.get_tagged("a", 2, NO, cached(&calls, "a", delay, ttl)).await.unwrap();
        assert_eq!((second.value.as_str(), second.origin, second.shared), ("a#2", Origin::Called, false));
        let first = first.await.unwrap().unwrap();
        assert_eq!((first.value.as_str(), first.origin), ("a#1", Origin::Called), "its own waiter still gets it");
        assert_eq!(flights.len(), 1);
        // Only the replacing flight filled the cache; a caller of the old tag calls again.
        let again = flights.get_tagged("a", 2, NO, cached(&calls, "a", NO, ttl)).await.unwrap();
        assert_eq!((again.value.as_str(), again.origin), ("a#2", Origin::Cached));
        let old = flights.get_tagged("a", 1, NO, cached(&calls, "a", NO, ttl)).await.unwrap();
        assert_eq!((old.value.as_str(), old.origin), ("a#3", Origin::Called));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_bounded() {
        let flights = Flights::<u32, String>::new(2);
        let calls = Arc::new(AtomicUsize::new(0));
        let ttl = Duration::from_secs(1);
        for k in 0..2 {
            flights.get(k, NO, cached(&calls, "k", NO, ttl)).await.unwrap();
        }
        let err = flights.get(2, NO, cached(&calls, "k", NO, ttl)).await.unwrap_err();
        assert_eq!(err, FlightError::Full(2));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(flights.get(2, NO, cached(&calls, "k", NO, ttl)).await.is_ok(), "expired entries are swept");
    }
}
