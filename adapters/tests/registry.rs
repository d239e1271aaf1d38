//! The adapter registry: compare-and-set generations, LRU eviction by count and by
//! bytes, handles outliving their entry, stacks, and sequences generating on four
//! threads while a fifth keeps loading, replacing and unloading adapters.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use graft_adapters::delta::f32_weight;
use graft_adapters::registry::{AdapterInfo, RegistryStats};
use graft_adapters::{
    Adapter, AdapterError, AdapterFormat, AdapterStack, Generation, LoraDelta, Registry,
    RegistryError, RegistryLimits, TensorDelta,
};
use graft_runtime::kv_cache::KvType;
use graft_runtime::model::{
    sequence_batch, BatchDeltas, BatchToken, LinearDelta, Model, Proj, Scratch,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = common::conformance().join("models/llama-gqa-F32.gguf");
        Model::load(&path, None).unwrap()
    })
}

/// A random in-memory LoRA adapter of `rank` on `projs` of every layer; entries are
/// uniform in [-amp, amp] so that it visibly changes greedy output.
fn lora(seed: u64, rank: usize, projs: &[Proj], amp: f32) -> Adapter {
    let m = model();
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut adapter = Adapter::new(
        AdapterFormat::Memory,
        format!("memory:{seed}").into(),
        c.n_layer,
    );
    for layer in 0..c.n_layer {
        for &proj in projs {
            let (out, inp) = graft_adapters::delta::projection_shape(c, proj);
            let mut rand_vec =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-amp..amp)).collect() };
            let a = f32_weight(rank, inp, &rand_vec(rank * inp)).unwrap();
            let b = f32_weight(out, rank, &rand_vec(out * rank)).unwrap();
            let delta = LoraDelta {
                a,
                b,
                scale: 1.0,
                dora_factor: None,
            };
            adapter
                .insert(c, layer, proj, TensorDelta::Lora(delta))
                .unwrap();
        }
    }
    adapter
}

/// A small adapter (rank `rank` on Q only) whose byte size is known.
fn small(seed: u64, rank: usize) -> Adapter {
    lora(seed, rank, &[Proj::Q], 0.1)
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of `n` tokens with every token going through `delta`;
/// `on_step` runs after each forward step (the prefill included).
fn generate(
    delta: Option<&dyn LinearDelta>,
    prompt: &[u32],
    n: usize,
    mut on_step: impl FnMut(),
) -> Vec<u32> {
    let m = model();
    let mut cache = m.new_cache(prompt.len() + n + 1, KvType::F16);
    let mut scratch = Scratch::default();
    let mut step = |batch: &[BatchToken]| {
        let deltas = delta.map(|d| BatchDeltas::uniform(d, batch.len()));
        let logits = m
            .forward_adapted(batch, &mut cache, &mut scratch, deltas.as_ref())
            .unwrap();
        on_step();
        argmax(logits.row(0))
    };
    let mut next = step(&sequence_batch(prompt, 0, 0, false));
    let mut out = vec![next];
    for pos in prompt.len()..prompt.len() + n - 1 {
        next = step(&[BatchToken {
            token: next,
            pos,
            seq: 0,
            logits: true,
        }]);
        out.push(next);
    }
    out
}

fn registry_err(e: AdapterError) -> RegistryError {
    match e {
        AdapterError::Registry(r) => r,
        other => panic!("expected a registry error, got {other}"),
    }
}

fn names(list: &[AdapterInfo]) -> Vec<&str> {
    list.iter().map(|i| &*i.name).collect()
}

#[test]
fn registry_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Registry>();
    check::<graft_adapters::AdapterHandle>();
}

#[test]
fn generations_increase_and_never_repeat() {
    let reg = Registry::new(RegistryLimits::unlimited());
    let a1 = Arc::new(small(1, 2));
    let g1 = reg.insert("a", a1.clone()).unwrap();
    let g2 = reg.insert("b", small(2, 2)).unwrap();
    assert!(g2 > g1);
    let h = reg.get("a").unwrap();
    assert_eq!((&*h.name, h.generation), ("a", g1));
    assert!(
        Arc::ptr_eq(&h.adapter, &a1),
        "get hands out the inserted Arc"
    );

    // Overwriting a name gives a new generation.
    let g3 = reg.insert("a", small(3, 2)).unwrap();
    assert!(g3 > g2);
    assert_eq!(reg.generation("a"), Some(g3));

    // Unloaded then inserted again: still a fresh generation.
    reg.unload("a").unwrap();
    assert_eq!(reg.generation("a"), None);
    assert!(reg.get("a").is_none());
    let g4 = reg.insert("a", a1.clone()).unwrap();
    assert!(g4 > g3);
    assert_ne!(g4, g1, "same adapter re-inserted, still a new generation");

    // Unloading an unknown name is a typed error.
    let e = registry_err(reg.unload("zzz").unwrap_err());
    assert_eq!(e, RegistryError::NotLoaded { name: "zzz".into() });
    assert_eq!(
        registry_err(reg.insert("", small(4, 2)).unwrap_err()),
        RegistryError::EmptyName
    );

    let s = reg.stats();
    assert_eq!((s.adapters, s.inserts, s.unloads), (2, 4, 1));
    assert_eq!(
        s.bytes,
        reg.list().iter().map(|i| i.bytes).sum::<usize>(),
        "stats bytes is the sum of the entries"
    );
}

#[test]
fn replace_is_compare_and_set() {
    let reg = Registry::new(RegistryLimits::unlimited());
    let g1 = reg.insert("a", small(1, 2)).unwrap();
    let v2 = Arc::new(small(2, 2));
    let g2 = reg.replace("a", g1, v2.clone()).unwrap();
    assert!(g2 > g1);
    assert!(Arc::ptr_eq(&reg.get("a").unwrap().adapter, &v2));

    // A stale expectation loses, names the current generation and changes nothing.
    let e = registry_err(reg.replace("a", g1, small(3, 2)).unwrap_err());
    assert_eq!(
        e,
        RegistryError::GenerationMismatch {
            name: "a".into(),
            expected: g1,
            current: Some(g2),
        }
    );
    assert!(e.to_string().contains(&g2.to_string()), "{e}");
    let h = reg.get("a").unwrap();
    assert_eq!(h.generation, g2);
    assert!(Arc::ptr_eq(&h.adapter, &v2));

    // A name that is gone: the current generation is none.
    reg.unload("a").unwrap();
    let e = registry_err(reg.replace("a", g2, small(4, 2)).unwrap_err());
    assert_eq!(
        e,
        RegistryError::GenerationMismatch {
            name: "a".into(),
            expected: g2,
            current: None,
        }
    );
    assert!(!reg.contains("a"));

    let s = reg.stats();
    assert_eq!((s.replaces, s.conflicts, s.adapters, s.bytes), (1, 2, 0, 0));
}

#[test]
fn lru_eviction_by_count() {
    let reg = Registry::new(RegistryLimits {
        max_adapters: 2,
        max_bytes: usize::MAX,
    });
    reg.insert("a", small(1, 2)).unwrap();
    reg.insert("b", small(2, 2)).unwrap();
    assert_eq!(names(&reg.list()), ["b", "a"], "most recently used first");
    // Using "a" makes "b" the least recently used.
    let held_b = reg.get("b").unwrap();
    reg.get("a").unwrap();
    assert_eq!(names(&reg.list()), ["a", "b"]);
    reg.insert("c", small(3, 2)).unwrap();
    assert_eq!(names(&reg.list()), ["c", "a"]);
    assert!(reg.get("b").is_none());
    assert_eq!(reg.stats().evictions, 1);
    // The evicted version still works through a handle taken before.
    assert_eq!(held_b.adapter.len(), model().config.n_layer);

    // Replacing counts as a use: after replacing "a", "c" is the oldest.
    let ga = reg.generation("a").unwrap();
    reg.replace("a", ga, small(4, 2)).unwrap();
    reg.insert("d", small(5, 2)).unwrap();
    assert_eq!(names(&reg.list()), ["d", "a"]);
    // `generation` and `list` do not count as uses.
    reg.generation("a");
    reg.list();
    reg.insert("e", small(6, 2)).unwrap();
    assert_eq!(names(&reg.list()), ["e", "d"]);
    let s = reg.stats();
    assert_eq!((s.adapters, s.evictions), (2, 3));
}

#[test]
fn lru_eviction_by_bytes() {
    // Bytes are proportional to rank (Q only, F32): a=2, b=2, c=4, big=6 units.
    let (a, b, c, big) = (small(1, 2), small(2, 2), small(3, 4), small(4, 6));
    let (sa, sb, sc, sbig) = (a.bytes(), b.bytes(), c.bytes(), big.bytes());
    assert!(sa > 0 && sb == sa && sc == 2 * sa && sbig == 3 * sa);
    let budget = sa + sb + sc;
    let reg = Registry::new(RegistryLimits {
        max_adapters: 100,
        max_bytes: budget,
    });
    reg.insert("a", a).unwrap();
    reg.insert("b", b).unwrap();
    reg.insert("c", c).unwrap();
    assert_eq!(reg.stats().bytes, budget);
    assert_eq!(reg.stats().evictions, 0);
    reg.get("a").unwrap();
    // Order of use now: b (oldest), c, a. big needs 6 of 8 units: evicting b
    // frees 2 (not enough), then c frees 4; a stays.
    reg.insert("big", big).unwrap();
    assert_eq!(names(&reg.list()), ["big", "a"]);
    let s = reg.stats();
    assert_eq!((s.bytes, s.evictions), (sbig + sa, 2));
    assert_eq!(s.bytes, reg.list().iter().map(|i| i.bytes).sum::<usize>());
}

#[test]
fn adapter_filling_the_budget_evicts_all_others_but_stays() {
    let whole = small(9, 4);
    let reg = Registry::new(RegistryLimits {
        max_adapters: 10,
        max_bytes: whole.bytes(),
    });
    reg.insert("a", small(1, 1)).unwrap();
    reg.insert("b", small(2, 1)).unwrap();
    let g = reg.insert("whole", whole).unwrap();
    assert_eq!(names(&reg.list()), ["whole"]);
    assert_eq!(reg.generation("whole"), Some(g));
}

#[test]
fn too_large_is_refused_and_changes_nothing() {
    let (a, b, big) = (small(1, 2), small(2, 2), small(3, 8));
    let budget = a.bytes() + b.bytes();
    assert!(big.bytes() > budget);
    let big_bytes = big.bytes();
    let reg = Registry::new(RegistryLimits {
        max_adapters: 10,
        max_bytes: budget,
    });
    let ga = reg.insert("a", a).unwrap();
    reg.insert("b", b).unwrap();
    let (list, stats) = (reg.list(), reg.stats());

    let big = Arc::new(big);
    let e = registry_err(reg.insert("big", big.clone()).unwrap_err());
    assert_eq!(
        e,
        RegistryError::TooLarge {
            name: "big".into(),
            bytes: big_bytes,
            max_bytes: budget,
        }
    );
    // Nor as a replacement of a loaded name.
    let e = registry_err(reg.replace("a", ga, big.clone()).unwrap_err());
    assert!(matches!(e, RegistryError::TooLarge { .. }), "{e}");
    assert_eq!(reg.list(), list);
    assert_eq!(reg.stats(), stats);
    // The next publication still gets a generation above every earlier one.
    let g = reg.insert("c", small(4, 1)).unwrap();
    assert!(list.iter().all(|i| i.generation < g));

    let none = Registry::new(RegistryLimits {
        max_adapters: 0,
        max_bytes: usize::MAX,
    });
    assert!(matches!(
        registry_err(none.insert("a", small(5, 1)).unwrap_err()),
        RegistryError::NoCapacity { .. }
    ));
}

#[test]
fn handles_survive_unload_replace_and_eviction() {
    let prompt = [1u32, 15, 320, 48, 211];
    let reg = Registry::new(RegistryLimits {
        max_adapters: 1,
        max_bytes: usize::MAX,
    });
    let g = reg
        .insert("a", lora(7, 8, &[Proj::Q, Proj::V, Proj::Up], 0.25))
        .unwrap();
    let h = reg.get("a").unwrap();
    let before = generate(Some(&*h.adapter), &prompt, 6, || {});
    let base = generate(None, &prompt, 6, || {});
    assert_ne!(before, base, "the adapter changes the output");

    reg.replace("a", g, small(8, 1)).unwrap();
    assert_eq!(generate(Some(&*h.adapter), &prompt, 6, || {}), before);
    let h2 = reg.get("a").unwrap();
    reg.insert("b", small(9, 1)).unwrap(); // evicts "a" (limit 1)
    assert!(!reg.contains("a"));
    reg.unload("b").unwrap();
    assert!(reg.is_empty());
    assert_eq!(generate(Some(&*h.adapter), &prompt, 6, || {}), before);
    assert_eq!(h.generation, g);
    assert_eq!(h2.adapter.len(), model().config.n_layer);
    // Only the handles hold the versions now.
    assert_eq!(Arc::strong_count(&h.adapter), 1);
    assert_eq!(Arc::strong_count(&h2.adapter), 1);
}

#[test]
fn resolve_builds_a_stack_of_current_versions() {
    let reg = Registry::new(RegistryLimits::unlimited());
    let (a, b) = (Arc::new(small(1, 2)), Arc::new(small(2, 2)));
    reg.insert("a", a.clone()).unwrap();
    let gb = reg.insert("b", small(3, 2)).unwrap();
    reg.replace("b", gb, b.clone()).unwrap();

    let stack: AdapterStack = reg.resolve(&[("b", 0.5), ("a", 1.0)]).unwrap();
    assert_eq!(stack.layers.len(), 2);
    assert!(Arc::ptr_eq(&stack.layers[0].0, &b) && stack.layers[0].1 == 0.5);
    assert!(Arc::ptr_eq(&stack.layers[1].0, &a) && stack.layers[1].1 == 1.0);
    // Resolving counts as a use, in member order: "a" is now the most recent.
    assert_eq!(names(&reg.list()), ["a", "b"]);

    let handles = reg.resolve_handles(&[("a", 1.0)]).unwrap();
    assert_eq!(handles[0].0.generation, reg.generation("a").unwrap());

    let e = registry_err(reg.resolve(&[("a", 1.0), ("missing", 1.0)]).unwrap_err());
    assert_eq!(
        e,
        RegistryError::NotLoaded {
            name: "missing".into()
        }
    );
    assert!(e.to_string().contains("missing"));
}

#[test]
fn load_file_runs_the_loader_and_inserts() {
    let reg = Registry::new(RegistryLimits::unlimited());
    let path = std::path::Path::new("/nonexistent/adapter.gguf");
    let g = reg
        .load_file("a", path, model(), |p, m| {
            assert_eq!(p, path);
            let mut a = small(1, 2);
            a.source = p.to_path_buf();
            assert_eq!(a.n_layer(), m.config.n_layer);
            Ok(a)
        })
        .unwrap();
    let info = &reg.list()[0];
    assert_eq!(
        (&*info.name, info.generation, info.source.as_path()),
        ("a", g, path)
    );

    // A loader error comes back as is and changes nothing.
    let before: RegistryStats = reg.stats();
    let e = reg
        .load_file("b", path, model(), |p, _| {
            Err(AdapterError::Invalid {
                file: p.display().to_string(),
                what: "broken".into(),
            })
        })
        .unwrap_err();
    assert!(e.to_string().contains("broken"), "{e}");
    // An adapter built for another layer count is refused.
    let e = reg
        .load_file("b", path, model(), |p, _| {
            Ok(Adapter::new(AdapterFormat::GgufLora, p.to_path_buf(), 5))
        })
        .unwrap_err();
    assert!(e.to_string().contains("layers"), "{e}");
    assert_eq!(reg.stats(), before);
    assert!(!reg.contains("b"));
}

/// Sets `flag` when the thread owning it unwinds, so the others stop waiting on it.
struct OnPanic<'a>(&'a AtomicBool);

impl Drop for OnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Sets `flag` however the owning thread ends.
struct OnExit<'a>(&'a AtomicBool);

impl Drop for OnExit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Four threads generate greedy continuations, each on the adapter version it got
/// at its start, while a fifth performs 1000 inserts, compare-and-set replaces and
/// unloads (with evictions, the registry holding at most 3 of 4 names); every
/// continuation must equal the one computed alone, before, for its version.
#[test]
fn sequences_keep_their_version_under_concurrent_swaps() {
    const NAMES: [&str; 4] = ["alpha", "beta", "gamma", "delta"];
    const OPS: usize = 1000;
    const N_GEN: usize = 8;
    let prompt = [1u32, 15, 320, 48, 211];
    let projs = [Proj::Q, Proj::V, Proj::Up, Proj::Down];
    let versions: Vec<Arc<Adapter>> = (0..4u64)
        .map(|v| Arc::new(lora(100 + v, 8, &projs, 0.25)))
        .collect();
    let refs: Vec<Vec<u32>> = versions
        .iter()
        .map(|a| generate(Some(&**a), &prompt, N_GEN, || {}))
        .collect();
    let base = generate(None, &prompt, N_GEN, || {});
    for (i, r) in refs.iter().enumerate() {
        assert_ne!(*r, base, "version {i} must change the output");
        for (j, s) in refs.iter().enumerate().skip(i + 1) {
            assert_ne!(r, s, "versions {i} and {j} must differ in output");
        }
    }

    let reg = Registry::new(RegistryLimits {
        max_adapters: 3,
        max_bytes: usize::MAX,
    });
    // generation -> version. The writer holds the write lock across each
    // publication and records the new generation before releasing it; a reader
    // that got a handle of generation g got it after g was published, so by the
    // time its read lock is granted the entry for g is there.
    let version_of: RwLock<HashMap<Generation, usize>> = RwLock::new(HashMap::new());
    // Lookups and forward steps of the generators, which pace the writer.
    let progress = AtomicU64::new(0);
    let writer_done = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let verified = AtomicUsize::new(0);
    let overtaken = AtomicUsize::new(0);
    let ops_done = AtomicUsize::new(0);
    let per_version: Vec<AtomicUsize> = (0..versions.len()).map(|_| AtomicUsize::new(0)).collect();

    // Three names loaded before the threads start, so generation begins at once.
    for (v, name) in NAMES.iter().take(3).enumerate() {
        let g = reg.insert(name, versions[v].clone()).unwrap();
        version_of.write().unwrap().insert(g, v);
    }

    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (reg, version_of, versions, refs) = (&reg, &version_of, &versions, &refs);
            let (progress, writer_done, failed) = (&progress, &writer_done, &failed);
            let (verified, overtaken, per_version) = (&verified, &overtaken, &per_version);
            s.spawn(move || {
                let _guard = OnPanic(failed);
                let mut rng = StdRng::seed_from_u64(t);
                let mut seq = 0usize;
                while !writer_done.load(Ordering::SeqCst) && !failed.load(Ordering::SeqCst) {
                    let name = NAMES[rng.gen_range(0..NAMES.len())];
                    seq += 1;
                    // A miss is progress too: the writer must not wait on steps
                    // while every name happens to be unloaded.
                    progress.fetch_add(1, Ordering::SeqCst);
                    // Alternate plain handles and single-member stacks.
                    let (handle, stack) = if seq.is_multiple_of(2) {
                        match reg.get(name) {
                            Some(h) => (h, None),
                            None => continue,
                        }
                    } else {
                        match reg.resolve_handles(&[(name, 1.0)]) {
                            Ok(mut hs) => {
                                let (h, scale) = hs.remove(0);
                                let stack = AdapterStack::single(h.adapter.clone(), scale);
                                (h, Some(stack))
                            }
                            Err(e) => {
                                assert!(
                                    matches!(
                                        e,
                                        AdapterError::Registry(RegistryError::NotLoaded { .. })
                                    ),
                                    "{e}"
                                );
                                continue;
                            }
                        }
                    };
                    let v = *version_of
                        .read()
                        .unwrap()
                        .get(&handle.generation)
                        .unwrap_or_else(|| {
                            panic!("generation {} was never published", handle.generation)
                        });
                    assert!(
                        Arc::ptr_eq(&handle.adapter, &versions[v]),
                        "{name} generation {} is not version {v}",
                        handle.generation
                    );
                    let delta: &dyn LinearDelta = match &stack {
                        Some(st) => st,
                        None => &*handle.adapter,
                    };
                    let out = generate(Some(delta), &prompt, N_GEN, || {
                        progress.fetch_add(1, Ordering::SeqCst);
                    });
                    assert_eq!(
                        out, refs[v],
                        "thread {t}: {name} generation {} (version {v})",
                        handle.generation
                    );
                    if reg.generation(name) != Some(handle.generation) {
                        overtaken.fetch_add(1, Ordering::SeqCst);
                    }
                    verified.fetch_add(1, Ordering::SeqCst);
                    per_version[v].fetch_add(1, Ordering::SeqCst);
                }
            });
        }

        s.spawn(|| {
            let _done = OnExit(&writer_done);
            let mut rng = StdRng::seed_from_u64(99);
            let mut last = progress.load(Ordering::SeqCst);
            for op in 0..OPS {
                // Pace the swaps by the generators' progress (no clocks): at least
                // one lookup or forward step somewhere between two operations.
                while progress.load(Ordering::SeqCst) == last {
                    if failed.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::yield_now();
                }
                last = progress.load(Ordering::SeqCst);
                let name = NAMES[rng.gen_range(0..NAMES.len())];
                let v = rng.gen_range(0..versions.len());
                let mut map = version_of.write().unwrap();
                match op % 5 {
                    0 | 1 => {
                        let g = reg.insert(name, versions[v].clone()).unwrap();
                        map.insert(g, v);
                    }
                    2 | 3 => match reg.generation(name) {
                        Some(cur) => {
                            // Only this thread writes, so the CAS must win; a stale
                            // generation must lose.
                            if op % 10 == 3 {
                                let stale = Generation(cur.0 - 1);
                                let e = reg.replace(name, stale, versions[v].clone());
                                assert!(
                                    matches!(
                                        e,
                                        Err(AdapterError::Registry(
                                            RegistryError::GenerationMismatch { current, .. }
                                        )) if current == Some(cur)
                                    ),
                                    "{e:?}"
                                );
                            } else {
                                let g = reg.replace(name, cur, versions[v].clone()).unwrap();
                                assert!(g > cur);
                                map.insert(g, v);
                            }
                        }
                        None => {
                            let g = reg.insert(name, versions[v].clone()).unwrap();
                            map.insert(g, v);
                        }
                    },
                    _ => {
                        let loaded = reg.contains(name);
                        assert_eq!(reg.unload(name).is_ok(), loaded);
                    }
                }
                drop(map);
                assert!(reg.len() <= 3);
                ops_done.fetch_add(1, Ordering::SeqCst);
            }
        });
    });

    assert!(!failed.load(Ordering::SeqCst));
    let stats = reg.stats();
    let verified = verified.into_inner();
    let per_version: Vec<usize> = per_version.into_iter().map(|c| c.into_inner()).collect();
    eprintln!(
        "verified {verified} sequences {per_version:?} by version, {} overtaken; {stats:?}",
        overtaken.load(Ordering::SeqCst)
    );
    assert_eq!(ops_done.into_inner(), OPS, "the writer finished");
    assert!(stats.evictions > 0, "the count limit was exercised");
    assert!(
        per_version.iter().all(|&n| n > 0),
        "every version was generated with"
    );
    assert!(
        overtaken.into_inner() > 0,
        "some sequences finished on a version that was no longer current"
    );
}
