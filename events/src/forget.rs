//! Forgetting a full in-memory map without stopping its holder.

use std::collections::HashMap;

/// Empties `map`, keeping its capacity, and frees its entries on a thread of
/// their own. For a map that remembers keys up to a bound and then starts
/// over, under a lock others wait on: freeing a hundred thousand keys (each
/// its own allocation) takes milliseconds, and every holder of the lock would
/// wait that long, where handing them over takes microseconds. Frees them on
/// this thread when no thread can be started.
pub fn start_over<K, V>(map: &mut HashMap<K, V>)
where
    K: Send + 'static,
    V: Send + 'static,
{
    let capacity = map.capacity();
    let full = std::mem::replace(map, HashMap::with_capacity(capacity));
    let freeing = std::thread::Builder::new()
        .name("forget".into())
        .spawn(move || drop(full));
    // On failure the closure, and the map with it, is dropped here.
    drop(freeing);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_map_starts_over_empty_with_its_capacity_and_its_entries_are_freed() {
        let held = Arc::new(());
        let mut map: HashMap<u32, Arc<()>> = (0..10_000).map(|n| (n, held.clone())).collect();
        let capacity = map.capacity();
        start_over(&mut map);
        assert!(map.is_empty());
        assert!(map.capacity() >= capacity);
        // Freed on the other thread: every clone is dropped soon.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while Arc::strong_count(&held) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(Arc::strong_count(&held), 1, "the entries were never freed");
    }
}
