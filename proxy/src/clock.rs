//! A coarse monotonic clock for the per-transaction path.
//!
//! `Instant::now()` reads the TSC (through the hypervisor's clock page on a VM); the
//! coarse clock is one load from the vDSO page, at the kernel tick's resolution (1–4 ms).
//! Right for what is measured in seconds: how long a pooled connection sat idle.

/// Milliseconds since an arbitrary point (boot), monotonic.
pub fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists on every
    // Linux since 2.6.32 and cannot fail with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::coarse_ms;

    #[test]
    fn coarse_clock_moves_forward_with_the_real_one() {
        let start = std::time::Instant::now();
        let a = coarse_ms();
        while start.elapsed() < std::time::Duration::from_millis(30) {
            std::hint::spin_loop();
        }
        let b = coarse_ms();
        // 30 ms passed; the coarse clock may lag by up to one tick (≤ 10 ms at HZ=100).
        assert!(
            (20..=60).contains(&(b - a)),
            "coarse clock moved {} ms",
            b - a
        );
    }
}
