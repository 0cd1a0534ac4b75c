//! Counts written on the per-transaction path, without locked instructions when they can
//! be done without.
//!
//! An atomic add (`lock xadd`) costs about 20 cycles and drains the store buffer; a
//! pgbench `-S` transaction made 45 locked instructions (callgrind, with the lock-prefixed
//! addresses from `objdump`), 11 of them our own counters. With one runtime thread, the
//! default below 8 cores, every write to these counts comes from that thread (the metrics
//! and admin endpoints run on it too and only read them), so a plain load and store is
//! exact. With more threads they are atomic adds. `main` says which when it builds the
//! runtime; until then (and in unit tests) the atomic add is used.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use metrics::Counter;

static ONE_WRITER: AtomicBool = AtomicBool::new(false);

/// Declares that every count below is written from one thread from now on (a
/// current-thread runtime). Call before any session runs.
pub fn one_writer() {
    ONE_WRITER.store(true, Relaxed);
}

fn one() -> bool {
    ONE_WRITER.load(Relaxed)
}

pub fn add(a: &AtomicU64, n: u64) {
    if one() {
        a.store(a.load(Relaxed).wrapping_add(n), Relaxed);
    } else {
        a.fetch_add(n, Relaxed);
    }
}

pub fn inc(a: &AtomicUsize) {
    if one() {
        a.store(a.load(Relaxed).wrapping_add(1), Relaxed);
    } else {
        a.fetch_add(1, Relaxed);
    }
}

pub fn dec(a: &AtomicUsize) {
    if one() {
        a.store(a.load(Relaxed).wrapping_sub(1), Relaxed);
    } else {
        a.fetch_sub(1, Relaxed);
    }
}

/// A Prometheus counter counted locally and handed to the registry when the metrics are
/// scraped (`publish`) and when it is dropped (a reload replaced its host), so the
/// exposition is the same as counting into the registry directly. The registry's counter
/// costs two locked adds and three pointer hops per increment.
pub struct Tally {
    pending: AtomicU64,
    counter: Counter,
}

impl Tally {
    pub fn new(counter: Counter) -> Tally {
        Tally {
            pending: AtomicU64::new(0),
            counter,
        }
    }

    pub fn increment(&self) {
        add(&self.pending, 1);
    }

    /// Moves what was counted since the last call into the registry. Runs on the runtime
    /// (the scrape is a task), so with one writer it cannot fall between an increment's
    /// load and store.
    pub fn publish(&self) {
        let n = self.pending.swap(0, Relaxed);
        if n > 0 {
            self.counter.increment(n);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reach_the_registry_on_publish_and_on_drop() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let count = || {
            handle
                .render()
                .lines()
                .find_map(|l| l.strip_prefix("t_total ").map(str::to_string))
        };
        metrics::with_local_recorder(&recorder, || {
            let t = Tally::new(metrics::counter!("t_total"));
            t.increment();
            t.increment();
            assert_eq!(
                count().as_deref(),
                Some("0"),
                "nothing reaches the registry before a publish"
            );
            t.publish();
            assert_eq!(count().as_deref(), Some("2"));
            t.increment();
            drop(t);
        });
        assert_eq!(count().as_deref(), Some("3"));
    }

    #[test]
    fn adds_are_exact_from_many_threads_in_the_default_mode() {
        // ONE_WRITER stays false in unit tests: the atomic adds.
        let a = std::sync::Arc::new(AtomicU64::new(0));
        let b = std::sync::Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (a, b) = (a.clone(), b.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        add(&a, 2);
                        inc(&b);
                        inc(&b);
                        dec(&b);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(a.load(Relaxed), 80_000);
        assert_eq!(b.load(Relaxed), 40_000);
    }
}
