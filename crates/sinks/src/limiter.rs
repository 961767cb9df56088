//! A request-rate ceiling that holds in every window of the given length, as the receiver
//! sees it.
//!
//! A request occupies its slot from when it is sent until one window after its answer came
//! back; a new request is admitted only while fewer than `limit` slots are occupied. Because
//! the receiver sees each request somewhere between its send and its answer, no window of the
//! receiver's clock can see more than `limit` requests, whatever the network delays — which a
//! token bucket (bursts on top of the rate) or a limiter that stamps only send times cannot
//! promise. The limit can change at any time (leadership moves between nodes change a node's
//! share) without forgetting recent requests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct State {
    limit: u32,
    in_flight: u32,
    /// Answer times of finished requests within the last window, oldest first.
    finished: VecDeque<Instant>,
}

/// Admits at most `limit` requests per sliding `window`.
#[derive(Debug, Clone)]
pub struct WindowLimiter {
    window: Duration,
    state: Arc<Mutex<State>>,
}

/// An admitted request; dropping it records when its answer came back.
#[derive(Debug)]
pub struct Permit {
    state: Arc<Mutex<State>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_flight -= 1;
        s.finished.push_back(Instant::now());
    }
}

impl WindowLimiter {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self { window, state: Arc::new(Mutex::new(State { limit, in_flight: 0, finished: VecDeque::new() })) }
    }

    /// Changes the ceiling; requests already counted stay counted.
    pub fn set_limit(&self, limit: u32) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limit = limit;
    }

    /// The current ceiling.
    pub fn limit(&self) -> u32 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limit
    }

    /// Waits until a request may be sent. Hold the permit until its answer has arrived.
    pub async fn acquire(&self) -> Permit {
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                while s.finished.front().is_some_and(|t| *t + self.window <= now) {
                    s.finished.pop_front();
                }
                let used = s.in_flight as usize + s.finished.len();
                if used < s.limit as usize {
                    s.in_flight += 1;
                    return Permit { state: Arc::clone(&self.state) };
                }
                // A slot frees when the oldest finished request leaves the window; in-flight
                // ones free nothing until they finish (poll again shortly).
                match s.finished.front() {
                    Some(t) => (*t + self.window).saturating_duration_since(now).max(Duration::from_millis(1)),
                    None => Duration::from_millis(5),
                }
            };
            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Requests in every window of the limiter's length: at most the limit.
    fn max_in_any_window(times: &[Instant], window: Duration) -> usize {
        (0..times.len()).map(|i| times[i..].iter().take_while(|t| **t < times[i] + window).count()).max().unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_window() {
        let limiter = WindowLimiter::new(10, Duration::from_secs(1));
        let mut sent = Vec::new();
        for i in 0..45 {
            let p = limiter.acquire().await;
            sent.push(Instant::now());
            // answers take 0-30 ms
            tokio::time::sleep(Duration::from_millis((i * 7) % 30)).await;
            drop(p);
        }
        assert_eq!(max_in_any_window(&sent, Duration::from_secs(1)), 10);
        // 45 requests at 10 per window need at least four more windows after the first
        assert!(sent[44] - sent[0] >= Duration::from_secs(4), "{:?}", sent[44] - sent[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_ceiling_and_limit_changes_apply() {
        let limiter = WindowLimiter::new(20, Duration::from_secs(1));
        let times = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (l, times) = (limiter.clone(), Arc::clone(&times));
                tokio::spawn(async move {
                    for _ in 0..25 {
                        let _p = l.acquire().await;
                        times.lock().unwrap().push(Instant::now());
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        limiter.set_limit(5);
        for t in tasks {
            t.await.unwrap();
        }
        let mut times = times.lock().unwrap().clone();
        times.sort();
        assert_eq!(times.len(), 100);
        assert!(max_in_any_window(&times, Duration::from_secs(1)) <= 20);
        let late: Vec<_> = times.iter().copied().filter(|t| *t >= times[0] + Duration::from_millis(2600)).collect();
        assert!(max_in_any_window(&late, Duration::from_secs(1)) <= 5);
    }
}
