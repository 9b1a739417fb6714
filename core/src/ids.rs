//! Id allocation for VIP slots and backend entries.

use std::collections::VecDeque;

/// Ids handed out fresh first, then the longest-freed first, so a just-removed id (which
/// stale connection-table entries may still name) is reused as late as possible.
#[derive(Clone, Debug)]
pub struct IdPool {
    next_fresh: u32,
    limit: u32,
    freed: VecDeque<u32>,
}

impl IdPool {
    #[must_use]
    pub const fn new(limit: u32) -> Self {
        Self {
            next_fresh: 0,
            limit,
            freed: VecDeque::new(),
        }
    }

    /// The next id to hand out, if any is free.
    pub fn take(&mut self) -> Option<u32> {
        if self.next_fresh < self.limit {
            self.next_fresh += 1;
            return Some(self.next_fresh - 1);
        }
        self.freed.pop_front()
    }

    /// How many ids [`Self::take`] can still hand out.
    #[must_use]
    pub fn available(&self) -> usize {
        (self.limit - self.next_fresh) as usize + self.freed.len()
    }

    /// Frees `id`; it is handed out again after every id freed before it.
    pub fn give_back(&mut self, id: u32) {
        self.freed.push_back(id);
    }

    /// Takes a particular id (one recorded by a previous agent), if it is free.
    pub fn take_exact(&mut self, id: u32) -> Option<u32> {
        if id >= self.limit {
            return None;
        }
        if id >= self.next_fresh {
            self.freed.extend(self.next_fresh..id);
            self.next_fresh = id + 1;
            return Some(id);
        }
        let at = self.freed.iter().position(|f| *f == id)?;
        self.freed.remove(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_pool_takes_recorded_ids() {
        let mut pool = IdPool::new(8);
        assert_eq!(pool.take_exact(3), Some(3));
        assert_eq!(pool.take_exact(3), None);
        assert_eq!(pool.take(), Some(4));
        assert_eq!(pool.take_exact(1), Some(1));
        assert_eq!(pool.take_exact(9), None);
        let rest: Vec<_> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(rest, vec![5, 6, 7, 0, 2]);
    }

    #[test]
    fn id_pool_reuses_longest_freed_last() {
        let mut pool = IdPool::new(3);
        assert_eq!(
            (pool.take(), pool.take(), pool.take()),
            (Some(0), Some(1), Some(2))
        );
        assert_eq!(pool.take(), None);
        pool.give_back(1);
        pool.give_back(0);
        assert_eq!(pool.take(), Some(1));
        assert_eq!(pool.take(), Some(0));
    }
}
