//! Dirty-page bitmaps: one bit per 4 KiB page, in u64 words as KVM returns
//! them, and the runs of set bits that become page ranges on the wire.

/// A dirty bitmap of one memory region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    pub fn new(pages: usize) -> DirtyBitmap {
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// All pages set.
    pub fn full(pages: usize) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(pages);
        b.words.fill(u64::MAX);
        b.trim();
        b
    }

    /// From KVM's or vm-memory's words; bits past `pages` are ignored.
    pub fn from_words(words: Vec<u64>, pages: usize) -> DirtyBitmap {
        let mut words = words;
        words.resize(pages.div_ceil(64), 0);
        let mut b = DirtyBitmap { words, pages };
        b.trim();
        b
    }

    fn trim(&mut self) {
        let extra = self.words.len() * 64 - self.pages;
        if extra > 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= u64::MAX >> extra;
            }
        }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn set(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    pub fn is_set(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// ORs `other` into this one (KVM's log with the VMM's own writes).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Clears the bits set in `other` (pages that need not be sent).
    pub fn subtract(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Runs of set bits as (first page, page count), each at most `max_run` pages.
    pub fn runs(&self, max_run: usize) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut start: Option<usize> = None;
        for (w, &word) in self.words.iter().enumerate() {
            if word == 0 && start.is_none() {
                continue;
            }
            if word == u64::MAX && start.is_some() {
                // The whole word continues the current run (split below).
                continue;
            }
            for bit in 0..64 {
                let page = w * 64 + bit;
                if page >= self.pages {
                    break;
                }
                let set = word & (1 << bit) != 0;
                match (set, start) {
                    (true, None) => start = Some(page),
                    (false, Some(s)) => {
                        runs.push((s, page - s));
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(s) = start {
            runs.push((s, self.pages - s));
        }
        let max_run = max_run.max(1);
        runs.into_iter()
            .flat_map(|(s, n)| {
                (0..n.div_ceil(max_run))
                    .map(move |i| (s + i * max_run, (n - i * max_run).min(max_run)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_counts() {
        let mut a = DirtyBitmap::new(200);
        for p in [0, 1, 2, 63, 64, 65, 130, 199] {
            a.set(p);
        }
        assert_eq!(a.runs(1000), vec![(0, 3), (63, 3), (130, 1), (199, 1)]);
        assert_eq!(
            a.runs(2),
            vec![(0, 2), (2, 1), (63, 2), (65, 1), (130, 1), (199, 1)]
        );
        assert_eq!(a.count(), 8);
        let mut b = DirtyBitmap::new(200);
        b.set(100);
        a.merge(&b);
        assert!(a.is_set(100));
        a.subtract(&b);
        assert!(!a.is_set(100));
        let full = DirtyBitmap::full(130);
        assert_eq!(full.count(), 130);
        assert_eq!(full.runs(64), vec![(0, 64), (64, 64), (128, 2)]);
        // Bits beyond the region from KVM's rounding are dropped.
        let w = DirtyBitmap::from_words(vec![u64::MAX, u64::MAX], 70);
        assert_eq!(w.count(), 70);
        assert!(DirtyBitmap::new(10).is_empty());
    }
}
