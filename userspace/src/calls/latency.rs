//! Call durations (`pyprobe calls --latency`): percentiles from the
//! kernel's log-linear histograms.
//!
//! The BPF side notes the time when a frame starts (or resumes) and adds the
//! time to its exit to a per-code [`Histogram`] whose buckets are 1/8 of a
//! power of two wide ([`calls::latency_bucket`]). A percentile is known to
//! its bucket, and reported as the bucket's middle: within 6.25% of the
//! true value. The maximum and the mean are exact.

use pyprobe_common::calls::{self, Histogram};
use serde::Serialize;

/// Duration statistics of one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Calls timed: starts and resumptions that reached a timed exit
    /// (3.11+: a return or a yield; frames left by an exception are not
    /// timed).
    pub timed: u64,
    /// Median, ns (the middle of its bucket).
    pub p50_ns: u64,
    /// 99th percentile, ns (the middle of its bucket).
    pub p99_ns: u64,
    /// Longest, ns (exact).
    pub max_ns: u64,
    /// Mean, ns (exact, rounded down).
    pub mean_ns: u64,
}

impl Latency {
    /// Statistics of a histogram; `None` if it timed nothing.
    pub fn of(hist: &Histogram) -> Option<Self> {
        if hist.count == 0 {
            return None;
        }
        Some(Self {
            timed: hist.count,
            p50_ns: percentile(hist, 50.0),
            p99_ns: percentile(hist, 99.0),
            max_ns: hist.max_ns,
            mean_ns: hist.total_ns / hist.count,
        })
    }
}

/// The `q`th percentile (0 < q <= 100) of a non-empty histogram: the
/// middle of the bucket holding the call of rank ceil(q% of the calls),
/// never above the maximum; the maximum itself (exact) when that rank is
/// the last (one call, or p99 of fewer than 100).
pub fn percentile(hist: &Histogram, q: f64) -> u64 {
    let total: u64 = hist.buckets.iter().map(|&n| u64::from(n)).sum();
    let rank = ((q / 100.0) * total as f64).ceil().max(1.0) as u64;
    if rank >= total {
        return hist.max_ns;
    }
    let mut seen = 0u64;
    for (b, &n) in hist.buckets.iter().enumerate() {
        seen += u64::from(n);
        if seen >= rank {
            let (lower, upper) = calls::latency_bucket_range(b as u32);
            let middle = if upper - lower == 1 {
                lower
            } else {
                lower + (upper - lower) / 2
            };
            return middle.min(hist.max_ns);
        }
    }
    hist.max_ns
}

/// A duration for people: `850ns`, `12.3µs`, `4.56ms`, `1.23s`.
pub fn human(ns: u64) -> String {
    let v = ns as f64;
    let (value, unit) = if ns < 1_000 {
        return format!("{ns}ns");
    } else if ns < 1_000_000 {
        (v / 1e3, "µs")
    } else if ns < 1_000_000_000 {
        (v / 1e6, "ms")
    } else {
        (v / 1e9, "s")
    };
    if value < 10.0 {
        format!("{value:.2}{unit}")
    } else if value < 100.0 {
        format!("{value:.1}{unit}")
    } else {
        format!("{value:.0}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyprobe_common::calls::{LATENCY_BUCKETS, latency_bucket, latency_bucket_range};

    fn record(hist: &mut Histogram, ns: u64) {
        hist.buckets[latency_bucket(ns) as usize] += 1;
        hist.count += 1;
        hist.total_ns += ns;
        hist.max_ns = hist.max_ns.max(ns);
    }

    #[test]
    fn every_duration_lands_in_the_bucket_that_holds_it() {
        let mut last = 0;
        for ns in 0..5000u64 {
            let b = latency_bucket(ns);
            assert!(b >= last, "buckets grow with durations");
            last = b;
        }
        for ns in (0..5000u64).chain((12..42).map(|e| (1u64 << e) - 1)).chain(
            (12..42)
                .flat_map(|e| [1u64 << e, (1u64 << e) + (1u64 << (e - 4)) * 3])
                .chain([3_000_000_007, 20_123_456]),
        ) {
            let b = latency_bucket(ns);
            let (lower, upper) = latency_bucket_range(b);
            assert!(
                lower <= ns && ns < upper,
                "{ns} in bucket {b} = {lower}..{upper}"
            );
            // 1/8 of an octave: the middle is within 6.25%.
            if ns >= 8 {
                assert!((upper - lower) * 8 <= lower, "{ns}: {lower}..{upper}");
            }
        }
        // Consecutive buckets tile the line.
        for b in 0..LATENCY_BUCKETS as u32 - 1 {
            assert_eq!(latency_bucket_range(b).1, latency_bucket_range(b + 1).0);
        }
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS as u32 - 1);
        assert_eq!(latency_bucket_range(LATENCY_BUCKETS as u32 - 1).1, 1 << 42);
    }

    #[test]
    fn percentiles_come_from_the_bucket_of_their_rank() {
        let mut hist = Histogram::default();
        // 20 calls of 5 ms and one of 40 ms.
        for _ in 0..20 {
            record(&mut hist, 5_000_000);
        }
        record(&mut hist, 40_000_000);
        let l = Latency::of(&hist).unwrap();
        assert_eq!(l.timed, 21);
        assert_eq!(l.max_ns, 40_000_000);
        assert_eq!(l.mean_ns, 140_000_000 / 21);
        // 5 ms is in 4.718592..5.242880 ms: middle 4.980736 ms.
        assert_eq!(l.p50_ns, 4_980_736);
        // Rank ceil(20.79) = 21, the last: the maximum, exact.
        assert_eq!(l.p99_ns, 40_000_000);
        // One call: every percentile is that call.
        let mut one = Histogram::default();
        record(&mut one, 37_800_000);
        assert_eq!(percentile(&one, 50.0), 37_800_000);
        // A bucket's middle above the maximum gives the maximum: ranks
        // 1-2 of 3 are in 37.748736..41.943040 ms, whose middle is
        // 39.845888 ms.
        let mut three = Histogram::default();
        for ns in [37_800_000, 37_900_000, 38_000_000] {
            record(&mut three, ns);
        }
        assert_eq!(percentile(&three, 50.0), 38_000_000);
        record(&mut three, 41_000_000);
        assert_eq!(percentile(&three, 50.0), 39_845_888);
        assert_eq!(Latency::of(&Histogram::default()), None);

        let mut small = Histogram::default();
        for ns in [3, 3, 3, 9, 10] {
            record(&mut small, ns);
        }
        assert_eq!(percentile(&small, 50.0), 3);
        assert_eq!(percentile(&small, 80.0), 9);
        assert_eq!(percentile(&small, 99.0), 10);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(850), "850ns");
        assert_eq!(human(12_345), "12.3µs");
        assert_eq!(human(4_560_000), "4.56ms");
        assert_eq!(human(123_400_000), "123ms");
        assert_eq!(human(1_230_000_000), "1.23s");
    }
}
