//! Tables that give memory back after a peak. A `HashMap` keeps the
//! capacity of the most it ever held: a burst of sockets would leave its
//! buckets allocated for good, and the agent's memory would step up with
//! every new peak.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
};

/// Below this many buckets a table is left alone: too small to matter.
const MIN_CAPACITY: usize = 1024;

/// Shrinks `map` to twice its length when it uses less than a quarter of
/// its capacity: cheap to check on every tick, and a table that hovers
/// near a size is not rebuilt over and over.
pub fn shrink_sparse<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > MIN_CAPACITY && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_emptied_after_a_peak_gives_its_buckets_back() {
        let mut map: HashMap<u64, [u8; 64]> = HashMap::new();
        map.extend((0..100_000).map(|k| (k, [0; 64])));
        let peak = map.capacity();
        map.retain(|k, _| *k < 100);
        shrink_sparse(&mut map);
        assert!(
            map.capacity() <= MIN_CAPACITY,
            "{} of {peak}",
            map.capacity()
        );
        assert_eq!(map.len(), 100);
        // A table in use is left as it is.
        let mut busy: HashMap<u64, u8> = (0..10_000).map(|k| (k, 0)).collect();
        let cap = busy.capacity();
        shrink_sparse(&mut busy);
        assert_eq!(busy.capacity(), cap);
    }
}
