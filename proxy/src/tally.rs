//! Counts written on the per-transaction path, without locked instructions when they can
//! be done without.
//!
//! An atomic add (`lock xadd`) costs about 20 cycles and drains the store buffer; a
//! pgbench `-S` transaction made 45 locked instructions (callgrind, with the lock-prefixed
//! addresses from `objdump`), 11 of them our own counters. With one runtime thread, the
//! default below 8 cores, every access to these counts happens on that thread (sessions,
//! the admin console and the `/metrics` task are all tasks of that runtime), so a plain
//! load and store is exact. With more threads they are atomic adds. `main` says which
//! when it builds the runtime; until then (and in unit tests) the atomic add is used.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

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

/// A Prometheus counter counted locally and handed to the registry by `publish_all`
/// (before every scrape) and when it is dropped, so the exposition is the same as
/// counting into the registry directly. The registry's counter costs two locked adds and
/// three pointer hops per increment.
///
/// Every live tally is published, not only those of the current configuration: a host
/// of a replaced generation keeps counting for the sessions still on it until they move.
pub struct Tally(Arc<Pending>);

struct Pending {
    count: AtomicU64,
    counter: Counter,
}

impl Pending {
    fn publish(&self) {
        let n = self.count.swap(0, Relaxed);
        if n > 0 {
            self.counter.increment(n);
        }
    }
}

/// Every tally made and not yet dropped.
static LIVE: Mutex<Vec<Weak<Pending>>> = Mutex::new(Vec::new());

/// `LIVE`, locked, without the tallies dropped since the last look.
fn live() -> std::sync::MutexGuard<'static, Vec<Weak<Pending>>> {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live
}

impl Tally {
    pub fn new(counter: Counter) -> Tally {
        let pending = Arc::new(Pending {
            count: AtomicU64::new(0),
            counter,
        });
        live().push(Arc::downgrade(&pending));
        Tally(pending)
    }

    pub fn increment(&self) {
        add(&self.0.count, 1);
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.0.publish();
    }
}

/// Moves what every live tally counted since the last call into the registry. Called by
/// the `/metrics` task, on the runtime, so with one writer it cannot fall between an
/// increment's load and store.
pub fn publish_all() {
    // Upgraded under the lock, published after it: a publish may reach the recorder.
    let live: Vec<Arc<Pending>> = live().iter().filter_map(Weak::upgrade).collect();
    for pending in live {
        pending.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test, because `publish_all` publishes every tally in the process.
    #[test]
    fn counts_reach_the_registry_on_publish_and_on_drop() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let count = |name: &str| {
            handle
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
        };
        metrics::with_local_recorder(&recorder, || {
            let current = Tally::new(metrics::counter!("current_total"));
            // A host of a replaced configuration, still in use.
            let replaced = Tally::new(metrics::counter!("replaced_total"));
            current.increment();
            current.increment();
            replaced.increment();
            assert_eq!(
                count("current_total").as_deref(),
                Some("0"),
                "nothing reaches the registry before a publish"
            );
            publish_all();
            assert_eq!(count("current_total").as_deref(), Some("2"));
            assert_eq!(count("replaced_total").as_deref(), Some("1"));
            publish_all();
            assert_eq!(
                count("current_total").as_deref(),
                Some("2"),
                "published once"
            );
            replaced.increment();
            drop(replaced);
            assert_eq!(count("replaced_total").as_deref(), Some("2"), "on drop");
            current.increment();
            publish_all();
            assert_eq!(count("current_total").as_deref(), Some("3"));
            assert_eq!(count("replaced_total").as_deref(), Some("2"));
        });
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
