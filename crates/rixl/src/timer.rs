//! One process-wide timer thread that wakes async tasks at deadlines.
//!
//! A request's deadline (`XferOptions::timeout`) has to end an awaited post even when nothing
//! else happens: the backend may never complete a post to a peer that stopped answering, and
//! nobody calls `status()`. Without an async runtime to borrow a timer from, something must
//! wake the task when the deadline passes, and polling for it would burn a core. So RIXL keeps
//! one thread for the whole process, started the first time a deadline is registered, that
//! sleeps on a condition variable until the earliest registered deadline and then wakes that
//! task's `Waker`; with nothing registered it sleeps until something is. The task's next poll
//! sees the deadline passed and expires the post (cancels it and reports `Timeout`), exactly as
//! `status()` would have.
//!
//! The deadlines live in an ordered map keyed by `(deadline, id)`: it is the min-heap the
//! thread needs (the earliest entry is the first key) and it also removes an entry in
//! `O(log n)`, which a binary heap cannot. A future that resolves before its deadline drops its
//! [`TimerEntry`], which removes it at once, so finished requests neither leave their wakers
//! (and the tasks those keep alive) behind nor grow the map, however long their timeouts are.
//! Wakers are woken after the lock is released.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::task::Waker;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    /// Registered deadlines, earliest first.
    entries: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
    /// Whether the thread is running (started lazily, at the first registration).
    started: bool,
}

#[derive(Debug, Default)]
struct Timer {
    state: Mutex<State>,
    /// Signalled when a registration becomes the earliest deadline.
    cond: Condvar,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<Timer> = OnceLock::new();
    TIMER.get_or_init(Timer::default)
}

/// A registered deadline: its waker is woken once the deadline passes, unless this entry is
/// dropped first (which unregisters it).
#[derive(Debug)]
pub(crate) struct TimerEntry {
    key: (Instant, u64),
}

impl TimerEntry {
    /// Wakes `waker` (from the timer thread) at `deadline`, or as soon as possible if it passed.
    pub fn register(deadline: Instant, waker: Waker) -> TimerEntry {
        let t = timer();
        let mut st = t.state.lock();
        let id = st.next_id;
        st.next_id += 1;
        let key = (deadline, id);
        st.entries.insert(key, waker);
        if !st.started {
            let spawned = std::thread::Builder::new()
                .name("rixl-timer".into())
                .spawn(run);
            match spawned {
                Ok(_) => st.started = true,
                Err(e) => {
                    // Never leave a task asleep for good: wake it now (it will register again
                    // and the next registration retries the thread).
                    tracing::error!("cannot start the RIXL timer thread: {e}");
                    let w = st.entries.remove(&key);
                    drop(st);
                    if let Some(w) = w {
                        w.wake();
                    }
                    return TimerEntry { key };
                }
            }
        } else if st.entries.first_key_value().is_some_and(|(k, _)| *k == key) {
            t.cond.notify_one();
        }
        TimerEntry { key }
    }
}

impl Drop for TimerEntry {
    fn drop(&mut self) {
        // The thread is not told: if this was the earliest entry it wakes once for nothing and
        // goes back to sleep until the next one.
        timer().state.lock().entries.remove(&self.key);
    }
}

/// The timer thread: sleeps until the earliest deadline, wakes what is due, forever.
fn run() {
    let t = timer();
    let mut due: Vec<Waker> = Vec::new();
    let mut st = t.state.lock();
    loop {
        let now = Instant::now();
        while let Some(entry) = st.entries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        if !due.is_empty() {
            // Wake outside the lock: a waker may poll the task inline and register again.
            drop(st);
            due.drain(..).for_each(Waker::wake);
            st = t.state.lock();
            continue;
        }
        match st.entries.first_key_value().map(|(k, _)| k.0) {
            Some(at) => {
                t.cond.wait_until(&mut st, at);
            }
            None => t.cond.wait(&mut st),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::task::Wake;
    use std::time::Duration;

    struct Report {
        index: usize,
        woken: AtomicUsize,
        tx: Mutex<mpsc::Sender<(usize, Instant)>>,
    }

    impl Wake for Report {
        fn wake(self: Arc<Self>) {
            self.woken.fetch_add(1, Ordering::SeqCst);
            let _ = self.tx.lock().send((self.index, Instant::now()));
        }
    }

    fn report(index: usize, tx: &mpsc::Sender<(usize, Instant)>) -> Arc<Report> {
        Arc::new(Report {
            index,
            woken: AtomicUsize::new(0),
            tx: Mutex::new(tx.clone()),
        })
    }

    #[test]
    fn many_deadlines_all_fire_and_none_early() {
        const N: usize = 200;
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        // Registered out of order (a later registration is often the earliest deadline), some
        // already past.
        let deadlines: Vec<Instant> = (0..N)
            .map(|i| start + Duration::from_millis(((i * 37) % 101) as u64 * 3))
            .collect();
        let reports: Vec<Arc<Report>> = (0..N).map(|i| report(i, &tx)).collect();
        let entries: Vec<TimerEntry> = (0..N)
            .map(|i| TimerEntry::register(deadlines[i], Waker::from(reports[i].clone())))
            .collect();
        assert_eq!(entries[7].key.0, deadlines[7]);
        let mut fired = [false; N];
        for _ in 0..N {
            let (i, at) = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("every deadline fires within 30 s");
            assert!(!fired[i], "entry {i} fired twice");
            fired[i] = true;
            assert!(at >= deadlines[i], "entry {i} fired before its deadline");
        }
        assert!(fired.iter().all(|f| *f));
        for r in &reports {
            assert_eq!(r.woken.load(Ordering::SeqCst), 1);
        }
        // Fired entries are gone: dropping them is a no-op.
        drop(entries);
        assert!(rx.recv_timeout(Duration::from_millis(20)).is_err());
    }

    #[test]
    fn a_dropped_entry_never_fires_and_an_earlier_one_preempts_the_sleep() {
        let (tx, rx) = mpsc::channel();
        let far = TimerEntry::register(
            Instant::now() + Duration::from_secs(3600),
            Waker::from(report(1, &tx)),
        );
        let cancelled = TimerEntry::register(
            Instant::now() + Duration::from_millis(30),
            Waker::from(report(2, &tx)),
        );
        drop(cancelled);
        // The thread sleeps towards the far deadline; a nearer one must wake it sooner.
        let near = TimerEntry::register(
            Instant::now() + Duration::from_millis(60),
            Waker::from(report(3, &tx)),
        );
        let (i, _) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the near deadline fires");
        assert_eq!(
            i, 3,
            "only the near entry fires (the cancelled one must not)"
        );
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        let far_key = far.key;
        drop((far, near));
        assert!(
            !timer().state.lock().entries.contains_key(&far_key),
            "a dropped entry is removed from the map"
        );
    }
}
