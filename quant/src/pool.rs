//! A persistent team of threads for decode-sized parallel work.
//!
//! A one-token forward step runs about 200 small matrix-vector products, each a few
//! to a few tens of microseconds of work. Called from outside rayon's pool (the
//! engine or CLI thread), every rayon fork-join injects a job, wakes parked workers
//! through futexes and puts the caller to sleep until they are done: measured at
//! about a tenth of decode time on smollm2-135m. The team instead keeps `threads - 1`
//! helper threads that spin briefly on an atomic after each job, so the next job
//! starts with a cache-line transfer instead of a wake-up, and the calling thread
//! works as the first member instead of sleeping (ggml's threadpool does the same).
//!
//! - Helpers spin for at most `SPIN` (200 us) after their last job, then park: an idle
//!   process burns no core.
//! - Tasks are claimed from an atomic counter, so a helper that is descheduled (a
//!   busy machine) leaves its share to the others; the caller waits only for the
//!   helpers that actually joined the job, never for one that is asleep.
//! - The team has as many members as rayon's global pool (`graft --threads N`), and
//!   one job runs at a time: concurrent callers (several engines) take turns, each
//!   job using every member, so the process never runs more than N compute threads
//!   for this work. Callers that are themselves rayon workers keep using rayon.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle helper spins before parking. Between the jobs of one decode step
/// the caller does a few microseconds of serial work (norms, RoPE, residuals), so
/// helpers stay awake for a whole step; after the last step they sleep.
const SPIN: Duration = Duration::from_micros(200);

/// `state` layout: bit 0 = closed (no more helpers may join), bits 1..16 = helpers
/// joined, bits 16.. = job epoch (48 bits: never wraps in practice).
const CLOSED: u64 = 1;
const JOINED_ONE: u64 = 2;
const JOINED_MASK: u64 = 0xfffe;
const EPOCH_SHIFT: u32 = 16;
/// Helpers beyond this would overflow the joined count.
const MAX_HELPERS: usize = (JOINED_MASK >> 1) as usize;

fn epoch(s: u64) -> u64 {
    s >> EPOCH_SHIFT
}

thread_local! {
    /// Set on helper threads, and on a caller while it works on its own job: parallel
    /// calls made from inside a task run inline instead of waiting for the team.
    static IN_TEAM: Cell<bool> = const { Cell::new(false) };
}

/// One parallel call: `f(i)` for every `i < n`, tasks claimed through `next`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Claims and runs tasks until none is left. A panicking task stops the job and
    /// its payload is kept for the caller to resume.
    fn work(&self) {
        let r = catch_unwind(AssertUnwindSafe(|| loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                break;
            }
            (self.f)(i);
        }));
        if let Err(payload) = r {
            self.next.store(self.n, Ordering::Relaxed);
            let mut slot = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
            slot.get_or_insert(payload);
        }
    }
}

/// What the caller and helpers share.
struct Shared {
    state: AtomicU64,
    /// The current job (a `*const Job` on the caller's stack), valid while a helper
    /// that joined its epoch has not yet counted itself in `finished`.
    job: AtomicPtr<()>,
    /// Helpers of the current epoch that are done with its job.
    finished: AtomicUsize,
    /// Per helper: parked or about to park (the caller must unpark it).
    sleeping: Vec<AtomicBool>,
    shutdown: AtomicBool,
}

/// A team of `helpers + 1` members (the caller is the first).
pub struct Team {
    shared: Arc<Shared>,
    /// The next epoch; the lock also makes jobs run one at a time.
    epoch: Mutex<u64>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
}

impl Team {
    /// Starts `helpers` helper threads (capped at 32767). Fails if the OS refuses a
    /// thread; helpers already started are stopped again.
    pub fn new(helpers: usize) -> std::io::Result<Team> {
        let helpers = helpers.min(MAX_HELPERS);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(CLOSED),
            job: AtomicPtr::new(std::ptr::null_mut()),
            finished: AtomicUsize::new(0),
            sleeping: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
            shutdown: AtomicBool::new(false),
        });
        let mut team = Team {
            shared,
            epoch: Mutex::new(1),
            threads: Vec::with_capacity(helpers),
            handles: Vec::with_capacity(helpers),
        };
        for id in 0..helpers {
            let sh = team.shared.clone();
            // Drop stops and joins what was started if this fails.
            let h = thread::Builder::new()
                .name(format!("graft-team-{}", id + 1))
                .spawn(move || helper(&sh, id))?;
            team.threads.push(h.thread().clone());
            team.handles.push(h);
        }
        Ok(team)
    }

    /// Members, the caller included.
    pub fn size(&self) -> usize {
        self.threads.len() + 1
    }

    /// Runs `f(i)` for every `i < n` on the calling thread and whichever helpers are
    /// awake to join, and returns when all are done. A panic in a task is resumed
    /// here once no helper touches the job any more. Calls from inside a task run
    /// inline.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.threads.is_empty() || IN_TEAM.with(Cell::get) {
            (0..n).for_each(f);
            return;
        }
        let mut epoch = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        let sh = &*self.shared;
        sh.job
            .store(&job as *const Job as *mut (), Ordering::Relaxed);
        sh.finished.store(0, Ordering::Relaxed);
        // SeqCst pairs with the helper's SeqCst `sleeping` store and state load: either
        // the helper sees this epoch before parking, or this thread sees it sleeping.
        sh.state.store(*epoch << EPOCH_SHIFT, Ordering::SeqCst);
        *epoch += 1;
        for (t, sleeping) in self.threads.iter().zip(&sh.sleeping) {
            if sleeping.load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        IN_TEAM.with(|c| c.set(true));
        job.work();
        IN_TEAM.with(|c| c.set(false));
        // No helper may join from here on; wait for those that did.
        let joined = ((sh.state.fetch_or(CLOSED, Ordering::AcqRel) & JOINED_MASK) >> 1) as usize;
        let mut spins = 0u32;
        while sh.finished.load(Ordering::Acquire) < joined {
            spins += 1;
            // A task is at most tens of microseconds (kernels::TASK_MAX_BYTES); waiting
            // longer (~64 ns per pause on Zen 4) means the helper was descheduled
            // mid-task: let it have the core.
            if spins < 1 << 9 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        sh.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        drop(epoch);
        let payload = job
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(p) = payload {
            resume_unwind(p);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for t in &self.threads {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A helper's life: wait for an epoch it has not seen, join it if still open, work.
fn helper(sh: &Shared, id: usize) {
    IN_TEAM.with(|c| c.set(true));
    let mut seen = epoch(sh.state.load(Ordering::Acquire));
    while let Some(mut s) = wait_for_job(sh, id, seen) {
        seen = epoch(s);
        while s & CLOSED == 0 && epoch(s) == seen {
            match sh.state.compare_exchange_weak(
                s,
                s + JOINED_ONE,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    let ptr = sh.job.load(Ordering::Relaxed) as *const Job;
                    // SAFETY: `ptr` was stored before this epoch was published (the
                    // acquire CAS above synchronises with that release), and the
                    // caller keeps the Job alive on its stack until `finished` counts
                    // every helper that joined this epoch; this helper joined and
                    // increments `finished` only after its last use of `job`.
                    let job = unsafe { &*ptr };
                    job.work();
                    sh.finished.fetch_add(1, Ordering::Release);
                    break;
                }
                Err(cur) => s = cur,
            }
        }
    }
}

/// Spins, then parks, until the state's epoch differs from `seen`; `None` on shutdown.
fn wait_for_job(sh: &Shared, id: usize, seen: u64) -> Option<u64> {
    let mut start = Instant::now();
    let mut spins = 0u32;
    loop {
        let s = sh.state.load(Ordering::Acquire);
        if epoch(s) != seen {
            return Some(s);
        }
        if sh.shutdown.load(Ordering::Relaxed) {
            return None;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        let flag = sh.sleeping.get(id)?;
        flag.store(true, Ordering::SeqCst);
        // An unpark between these lines leaves a token: park then returns at once.
        if epoch(sh.state.load(Ordering::SeqCst)) == seen && !sh.shutdown.load(Ordering::SeqCst) {
            thread::park();
        }
        flag.store(false, Ordering::Relaxed);
        start = Instant::now();
    }
}

/// The process's team: one member per thread of rayon's global pool, started on
/// first use; `None` for a one-thread pool or if the OS refused a thread.
fn global() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<Team>> = OnceLock::new();
    TEAM.get_or_init(|| {
        let n = rayon::current_num_threads();
        if n <= 1 {
            return None;
        }
        match Team::new(n - 1) {
            Ok(t) => Some(t),
            Err(e) => {
                // rayon still works: this only costs speed
                eprintln!("graft: cannot start the decode thread team ({e}); using rayon");
                None
            }
        }
    })
    .as_ref()
}

/// How parallel work from the current thread runs.
enum Mode {
    Inline,
    Rayon,
    Team(&'static Team),
}

fn mode() -> Mode {
    if IN_TEAM.with(Cell::get) {
        return Mode::Inline;
    }
    if rayon::current_thread_index().is_some() {
        // A rayon worker: its pool may be another than the global one, and its
        // siblings may be busy with other parts of the same fork-join.
        return Mode::Rayon;
    }
    if rayon::current_num_threads() <= 1 {
        return Mode::Inline;
    }
    global().map_or(Mode::Rayon, Mode::Team)
}

/// Whether parallel work from this thread goes to the team (or runs inline) rather
/// than to rayon. Callers that would split independent products with `rayon::join`
/// should then run them one after another, each one on the whole team.
pub fn prefers_team() -> bool {
    !matches!(mode(), Mode::Rayon)
}

/// Threads that parallel work from this thread is spread over.
pub fn current_num_threads() -> usize {
    match mode() {
        Mode::Inline => 1,
        Mode::Rayon => rayon::current_num_threads(),
        Mode::Team(t) => t.size(),
    }
}

/// Runs `f(i)` for every `i < n` in parallel: on the team when called from outside
/// rayon's pool, else with rayon.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync + Send) {
    match mode() {
        Mode::Inline => (0..n).for_each(f),
        Mode::Rayon => (0..n).into_par_iter().for_each(f),
        Mode::Team(t) => t.run(n, &f),
    }
}

/// Runs `f(i, chunk)` for every `chunk`-sized piece of `data` (the last may be
/// shorter), in parallel like [`for_each`]. `chunk` 0 counts as 1.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk = chunk.max(1);
    match mode() {
        Mode::Inline => data
            .chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c)),
        Mode::Rayon => data
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c)),
        Mode::Team(t) => {
            // Each piece is claimed by exactly one task, so its lock never waits.
            let pieces: Vec<Mutex<&mut [T]>> = data.chunks_mut(chunk).map(Mutex::new).collect();
            t.run(pieces.len(), &|i| {
                if let Some(p) = pieces.get(i) {
                    let mut g = p.lock().unwrap_or_else(PoisonError::into_inner);
                    f(i, &mut g);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn runs_every_task_once() {
        let team = Team::new(3).unwrap();
        assert_eq!(team.size(), 4);
        for n in [0, 1, 2, 5, 64, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            team.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn many_jobs_in_a_row_and_after_parking() {
        let team = Team::new(2).unwrap();
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            team.run(7, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
            if round % 500 == 0 {
                // long enough for every helper to park
                thread::sleep(SPIN * 5);
            }
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 21);
    }

    #[test]
    fn concurrent_callers_take_turns() {
        let team = Team::new(2).unwrap();
        let total = AtomicUsize::new(0);
        thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..300 {
                        team.run(10, &|i| {
                            total.fetch_add(i + 1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 300 * 55);
    }

    #[test]
    fn nested_calls_run_inline() {
        let team = Team::new(2).unwrap();
        let total = AtomicUsize::new(0);
        team.run(4, &|_| {
            team.run(3, &|j| {
                total.fetch_add(j + 1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 6);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_survives() {
        let team = Team::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(16, &|i| {
                if i == 9 {
                    panic!("task 9");
                }
            })
        }));
        let msg = r.unwrap_err();
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"task 9"));
        let total = AtomicUsize::new(0);
        team.run(16, &|i| {
            total.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 120);
    }

    #[test]
    fn chunks_cover_the_slice() {
        let mut v = vec![0usize; 1001];
        for_each_chunk_mut(&mut v, 100, |i, c| {
            for (j, x) in c.iter_mut().enumerate() {
                *x = i * 100 + j;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));
        let hits: Vec<AtomicU32> = (0..37).map(|_| AtomicU32::new(0)).collect();
        for_each(37, |i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
}
