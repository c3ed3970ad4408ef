//! When each key last queued a last-used note: the rate limit that makes recording use cost a
//! few atomic loads on most requests. A fixed table beside the cache (128 KiB, whatever the
//! number of keys) rather than a counter in every cached verdict.
//!
//! The table is 2,048 buckets of 8 slots, each bucket one cache line. A slot holds a key's tag
//! (30 bits of its digest) and the time (Unix seconds) of its last note. A key looks for its
//! tag in its bucket (chosen by 11 other bits of its digest): found and noted less than an
//! interval ago, the use is not noted; otherwise the key claims its slot (or the bucket's
//! oldest) with a compare-and-swap and the use is noted.
//!
//! Invariant (the last-used rule, as with a counter per key): a key's use is noted at most once
//! per interval, and at least once in every interval in which it is used, while at most 8 keys
//! of its bucket are noted within one interval. Concurrent requests with one key note it once
//! (one compare-and-swap wins; the losers look again and find it noted). What sharing changes:
//! - more than 8 keys of one bucket noted within an interval evict one another, so some uses
//!   are noted more often than once per interval (never less often); the flusher merges each
//!   interval's notes by digest, so the store is still written at most once per key per
//!   interval, and only the queue holds the extra notes;
//! - two keys with the same bucket and tag (41 digest bits) count as one: between them one use
//!   is noted per interval, so one of them may go unnoted. Among 10,000 keys used within one
//!   interval, some such pair exists with probability about 2 in 100,000.
//!
//! Tested by the unit tests below (collisions, eviction, a concurrent race).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::key::KeyDigest;

const BUCKETS: usize = 2_048;
const WAYS: usize = 8;
/// Times are kept in the low 34 bits (Unix seconds until the year 2514), the tag above them.
const TIME_BITS: u32 = 34;
const TIME: u64 = (1 << TIME_BITS) - 1;
const TAG: u32 = (1 << (64 - TIME_BITS)) - 1;
/// Compare-and-swap rounds before a use is noted anyway (so contention errs towards noting).
/// A round fails only when another request claimed the slot it picked; while a bucket fills,
/// that happens at most once per slot.
const ROUNDS: usize = 2 * WAYS;

#[repr(align(64))]
struct Bucket([AtomicU64; WAYS]);

/// Last-note times, by key digest.
pub(super) struct LastNoted {
    buckets: Box<[Bucket]>,
}

impl LastNoted {
    pub(super) fn new() -> Self {
        LastNoted {
            buckets: (0..BUCKETS)
                .map(|_| Bucket(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }

    /// Whether the use of `digest`'s key at `now` (Unix seconds) is to be noted: if it was not
    /// noted in the last `interval` seconds. A `true` records `now` as the key's last note.
    pub(super) fn claim(&self, digest: &KeyDigest, now: u64, interval: u64) -> bool {
        let d = &digest.0;
        // Digests are uniformly random. The verifier's stripes use bytes 0 and 1; these use
        // bits of bytes 2 to 7, so a stripe's keys spread over all buckets.
        let bucket = &self.buckets[usize::from(u16::from_le_bytes([d[2], d[3]])) % BUCKETS].0;
        let tag = u64::from(u32::from_le_bytes([d[4], d[5], d[6], d[7]]) & TAG) << TIME_BITS;
        let now = now.min(TIME);
        let claimed = tag | now;
        for _ in 0..ROUNDS {
            // This key's slot, else the slot noted longest ago (an empty one reads as time 0).
            let mut pick = (0, bucket[0].load(Ordering::Relaxed));
            for (i, slot) in bucket.iter().enumerate() {
                let v = slot.load(Ordering::Relaxed);
                if v & !TIME == tag {
                    if now < (v & TIME).saturating_add(interval) {
                        return false;
                    }
                    pick = (i, v);
                    break;
                }
                if v & TIME < pick.1 & TIME {
                    pick = (i, v);
                }
            }
            if bucket[pick.0]
                .compare_exchange(pick.1, claimed, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
            // Another request changed the slot: look again (it may have noted this key).
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A digest in bucket `bucket` with tag `tag`; `rest` fills the bytes neither reads.
    fn digest(bucket: u16, tag: u32, rest: u8) -> KeyDigest {
        let mut d = [rest; 32];
        d[2..4].copy_from_slice(&bucket.to_le_bytes());
        d[4..8].copy_from_slice(&tag.to_le_bytes());
        KeyDigest(d)
    }

    #[test]
    fn a_key_is_noted_once_per_interval_beside_the_keys_of_its_bucket() {
        let t = LastNoted::new();
        let (a, b) = (digest(7, 1, 0), digest(7, 2, 0));
        // Two keys of one bucket keep separate times.
        assert!(t.claim(&a, 100, 10));
        assert!(t.claim(&b, 101, 10));
        assert!(!t.claim(&a, 102, 10));
        assert!(!t.claim(&b, 110, 10));
        assert!(t.claim(&a, 110, 10));
        assert!(t.claim(&b, 111, 10));
        assert!(!t.claim(&a, 119, 10));
        // A full bucket (8 keys) still holds each key's time.
        let keys: Vec<_> = (1..=8).map(|tag| digest(9, tag, 0)).collect();
        for k in &keys {
            assert!(t.claim(k, 200, 10));
        }
        for k in &keys {
            assert!(
                !t.claim(k, 205, 10),
                "a key of a full bucket was noted twice"
            );
        }
        for k in &keys {
            assert!(t.claim(k, 210, 10), "a key of a full bucket was not noted");
        }
    }

    #[test]
    fn an_overfull_bucket_notes_more_often_never_less() {
        let t = LastNoted::new();
        let keys: Vec<_> = (1..=9).map(|tag| digest(3, tag, 0)).collect();
        // Nine keys of one bucket, used in turn every second for three intervals.
        let mut total = 0;
        for start in [100, 110, 120] {
            let mut notes = vec![0; keys.len()];
            for now in start..start + 10 {
                for (k, n) in keys.iter().zip(&mut notes) {
                    *n += usize::from(t.claim(k, now, 10));
                }
            }
            assert!(
                notes.iter().all(|&n| n >= 1),
                "a key went unnoted: {notes:?}"
            );
            total += notes.iter().sum::<usize>();
        }
        // Evictions cost extra notes (with a slot each, it would be 27).
        assert!(total > 27, "{total}");
    }

    #[test]
    fn keys_sharing_bucket_and_tag_share_one_time() {
        let t = LastNoted::new();
        let (a, b) = (digest(5, 42, 0), digest(5, 42, 1));
        assert!(t.claim(&a, 100, 10));
        // The documented cost of sharing: b's use within a's interval is not noted.
        assert!(!t.claim(&b, 105, 10));
        assert!(t.claim(&b, 110, 10));
        // The tag is 30 bits: digests differing above them share it too.
        let c = digest(5, 42 | 1 << 30, 0);
        assert!(!t.claim(&c, 115, 10));
    }

    #[test]
    fn times_stay_within_their_bits() {
        let t = LastNoted::new();
        let a = digest(1, TAG, 0);
        assert!(t.claim(&a, u64::MAX, 10));
        assert!(!t.claim(&a, u64::MAX, 10));
        // A later key of the bucket does not read a's tag as its own.
        assert!(t.claim(&digest(1, 0, 0), 0, 0));
    }

    #[test]
    fn concurrent_requests_note_each_key_once() {
        let t = Arc::new(LastNoted::new());
        // Eight keys filling one bucket and one key elsewhere, each claimed by four threads at
        // once, many times over.
        for round in 0..200u64 {
            let keys: Vec<_> = (1..=8)
                .map(|tag| digest(11, tag, 0))
                .chain([digest(12, 1, 0)])
                .collect();
            let counts: Arc<Vec<AtomicUsize>> =
                Arc::new(keys.iter().map(|_| AtomicUsize::new(0)).collect());
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let now = 1_000 + round * 10;
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (t, keys, counts, barrier) =
                        (t.clone(), keys.clone(), counts.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        for (k, c) in keys.iter().zip(counts.iter()) {
                            if t.claim(k, now, 10) {
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for th in threads {
                th.join().unwrap();
            }
            let counts: Vec<_> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            assert!(counts.iter().all(|&c| c == 1), "round {round}: {counts:?}");
        }
    }
}
