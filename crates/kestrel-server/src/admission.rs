//! The bounded queue: the server admits at most `max_running + max_waiting`
//! sequences at once and answers 503 beyond that, so a burst cannot grow the
//! engine's queue (and the memory of waiting prompts) without limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Slots held by one request (one per sequence: `n` times its prompts);
/// given back when dropped, i.e. when the response or its stream ends.
#[derive(Debug)]
pub struct Admission {
    counter: Arc<AtomicUsize>,
    slots: usize,
}

impl Admission {
    /// Takes `slots` if that keeps the total within `capacity`.
    pub fn try_acquire(counter: &Arc<AtomicUsize>, slots: usize, capacity: usize) -> Option<Admission> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let total = held.checked_add(slots)?;
                (total <= capacity).then_some(total)
            })
            .ok()
            .map(|_| Admission {
                counter: counter.clone(),
                slots,
            })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.slots, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let c = Arc::new(AtomicUsize::new(0));
        let a = Admission::try_acquire(&c, 2, 3).expect("2 of 3");
        assert!(Admission::try_acquire(&c, 2, 3).is_none());
        let b = Admission::try_acquire(&c, 1, 3).expect("3 of 3");
        assert_eq!(c.load(Ordering::SeqCst), 3);
        drop(a);
        assert_eq!(c.load(Ordering::SeqCst), 1);
        drop(b);
        assert_eq!(c.load(Ordering::SeqCst), 0);
        assert!(Admission::try_acquire(&c, 4, 3).is_none());
    }
}
