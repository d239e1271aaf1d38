//! A registry of named adapters that can be loaded, replaced and unloaded at runtime
//! from any thread while sequences keep generating.
//!
//! Design:
//! - Every version of an adapter lives in an `Arc<Adapter>`. [`Registry::get`] hands
//!   out an [`AdapterHandle`] (name, [`Generation`], the `Arc`), and a sequence keeps
//!   that handle for its whole life: replacing, unloading or evicting the name only
//!   drops the registry's reference, so a running sequence keeps the exact version it
//!   started with, and the memory (or memory map) of an old version goes away when
//!   its last sequence ends.
//! - One `Mutex` guards the name map. Critical sections only move `Arc`s and
//!   counters: loading from disk ([`Registry::load_file`]) happens before the lock is
//!   taken, and old versions and evicted entries are dropped (and logged) after it is
//!   released, since dropping a mapped adapter unmaps memory. `get` takes the same
//!   lock because it updates recency; a read-write lock would not help there.
//! - Each publication (insert, successful replace) takes the next number of a
//!   per-registry counter, under the lock: generations therefore never repeat, even
//!   for a name that was unloaded and inserted again, and their order is the order
//!   of publication. [`Registry::replace`] is a compare-and-set on the name's
//!   current generation, so two writers racing to update one name cannot silently
//!   overwrite each other.
//! - Limits: after a publication, the least recently used entries (by `get`,
//!   `resolve` or publication) other than the one just published are evicted until
//!   both the count and the byte budget ([`Adapter::bytes`], mapped bytes included)
//!   hold. An adapter larger than the whole budget is refused with nothing changed.
//! - Zero-copy: the registry never copies adapter data; it takes an `Adapter` (or an
//!   `Arc<Adapter>`) as built by the loader, whose tensors may view a memory-mapped
//!   file ([`graft_runtime::model::Weight::shared`]).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use graft_runtime::model::Model;

use crate::delta::{Adapter, AdapterFormat, AdapterStack};
use crate::error::{AdapterError, Result};

/// The version number of a published adapter; unique within a registry and
/// increasing in the order of publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a registry operation was refused; the registry is unchanged in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("no adapter named {name:?} is loaded")]
    NotLoaded { name: String },
    /// A compare-and-set replace lost: the name is at another generation (or gone).
    #[error("{name:?} is at generation {}, expected {expected}", current.map_or("none (not loaded)".to_owned(), |g| g.to_string()))]
    GenerationMismatch {
        name: String,
        expected: Generation,
        current: Option<Generation>,
    },
    #[error("{name:?} needs {bytes} bytes, more than the registry's whole budget of {max_bytes}")]
    TooLarge {
        name: String,
        bytes: usize,
        max_bytes: usize,
    },
    #[error("cannot hold {name:?}: the registry's limit is 0 adapters")]
    NoCapacity { name: String },
    #[error("adapter names must not be empty")]
    EmptyName,
}

/// Bounds on what the registry keeps loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    pub max_adapters: usize,
    /// Sum of [`Adapter::bytes`] over the loaded adapters.
    pub max_bytes: usize,
}

impl RegistryLimits {
    pub fn unlimited() -> Self {
        RegistryLimits {
            max_adapters: usize::MAX,
            max_bytes: usize::MAX,
        }
    }
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self::unlimited()
    }
}

/// One version of a named adapter, as a sequence holds it. Cloning is cheap; the
/// version stays alive (and usable) as long as any clone does, whatever happens to
/// the name in the registry.
#[derive(Debug, Clone)]
pub struct AdapterHandle {
    pub name: Arc<str>,
    pub generation: Generation,
    /// Pass `&*handle.adapter` to `BatchDeltas`: sequences sharing one version then
    /// share one delta group.
    pub adapter: Arc<Adapter>,
}

/// One loaded adapter, as [`Registry::list`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub name: Arc<str>,
    pub generation: Generation,
    pub bytes: usize,
    pub format: AdapterFormat,
    pub source: std::path::PathBuf,
}

/// Counters since the registry was created, and what it holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub adapters: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
    /// Successful inserts (new names and overwrites).
    pub inserts: u64,
    /// Successful compare-and-set replaces.
    pub replaces: u64,
    /// Compare-and-set replaces that lost.
    pub conflicts: u64,
    pub unloads: u64,
    pub evictions: u64,
}

struct Entry {
    name: Arc<str>,
    generation: Generation,
    adapter: Arc<Adapter>,
    bytes: usize,
    /// Value of `Inner::clock` at the last use; larger is more recent.
    last_used: u64,
}

impl Entry {
    fn handle(&self) -> AdapterHandle {
        AdapterHandle {
            name: self.name.clone(),
            generation: self.generation,
            adapter: self.adapter.clone(),
        }
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Arc<str>, Entry>,
    total_bytes: usize,
    /// Last generation handed out.
    generation: u64,
    /// Recency counter, bumped on every use.
    clock: u64,
    stats: RegistryStats,
}

impl Inner {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Publishes `adapter` under `name` (replacing any entry), then evicts least
    /// recently used others until the limits hold. Returns the new generation and
    /// what left the registry (the old version, evicted entries), to be dropped
    /// after the lock is released. The caller has checked the adapter fits alone.
    fn publish(
        &mut self,
        limits: &RegistryLimits,
        name: &str,
        adapter: Arc<Adapter>,
        bytes: usize,
    ) -> (Generation, Vec<Entry>, Vec<Entry>) {
        self.generation += 1;
        let generation = Generation(self.generation);
        let last_used = self.tick();
        let name: Arc<str> = Arc::from(name);
        let mut removed = Vec::new();
        if let Some(old) = self.entries.remove(&name) {
            self.total_bytes -= old.bytes;
            removed.push(old);
        }
        self.total_bytes += bytes;
        self.entries.insert(
            name.clone(),
            Entry {
                name: name.clone(),
                generation,
                adapter,
                bytes,
                last_used,
            },
        );
        let mut evicted = Vec::new();
        while self.entries.len() > limits.max_adapters || self.total_bytes > limits.max_bytes {
            let victim = self
                .entries
                .values()
                .filter(|e| e.name != name)
                .min_by_key(|e| e.last_used)
                .map(|e| e.name.clone());
            // Only the new entry left: it fits alone (checked by the caller).
            let Some(victim) = victim else { break };
            if let Some(e) = self.entries.remove(&victim) {
                self.total_bytes -= e.bytes;
                self.stats.evictions += 1;
                evicted.push(e);
            }
        }
        (generation, removed, evicted)
    }
}

/// Named adapters shared by every thread (use it through an `Arc<Registry>`).
pub struct Registry {
    limits: RegistryLimits,
    inner: Mutex<Inner>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Registry {
    pub fn new(limits: RegistryLimits) -> Self {
        Registry {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn limits(&self) -> RegistryLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held cannot leave the map half-updated in a
        // way that matters (every update finishes before anything can panic), so a
        // poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_fits(&self, name: &str, bytes: usize) -> Result<(), RegistryError> {
        if name.is_empty() {
            return Err(RegistryError::EmptyName);
        }
        if self.limits.max_adapters == 0 {
            return Err(RegistryError::NoCapacity {
                name: name.to_owned(),
            });
        }
        if bytes > self.limits.max_bytes {
            return Err(RegistryError::TooLarge {
                name: name.to_owned(),
                bytes,
                max_bytes: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    /// Publishes `adapter` under `name`, a new name or a new version of a loaded
    /// one (unconditionally; see [`Registry::replace`] for compare-and-set).
    /// Sequences holding the previous version keep it.
    pub fn insert(&self, name: &str, adapter: impl Into<Arc<Adapter>>) -> Result<Generation> {
        let adapter = adapter.into();
        let bytes = adapter.bytes();
        self.check_fits(name, bytes)?;
        let (generation, removed, evicted) = {
            let mut inner = self.lock();
            let out = inner.publish(&self.limits, name, adapter, bytes);
            inner.stats.inserts += 1;
            out
        };
        tracing::debug!(name, %generation, bytes, "adapter published");
        drop(removed);
        log_evicted(evicted);
        Ok(generation)
    }

    /// Publishes a new version of `name` only if its current generation is
    /// `expected`; otherwise fails with [`RegistryError::GenerationMismatch`] naming
    /// the current generation (`None` when the name is no longer loaded).
    pub fn replace(
        &self,
        name: &str,
        expected: Generation,
        adapter: impl Into<Arc<Adapter>>,
    ) -> Result<Generation> {
        let adapter = adapter.into();
        let bytes = adapter.bytes();
        self.check_fits(name, bytes)?;
        let (generation, removed, evicted) = {
            let mut inner = self.lock();
            let current = inner.entries.get(name).map(|e| e.generation);
            if current != Some(expected) {
                inner.stats.conflicts += 1;
                return Err(RegistryError::GenerationMismatch {
                    name: name.to_owned(),
                    expected,
                    current,
                }
                .into());
            }
            let out = inner.publish(&self.limits, name, adapter, bytes);
            inner.stats.replaces += 1;
            out
        };
        tracing::debug!(name, %generation, bytes, "adapter replaced");
        drop(removed);
        log_evicted(evicted);
        Ok(generation)
    }

    /// Removes `name`; sequences holding a handle keep their version.
    pub fn unload(&self, name: &str) -> Result<()> {
        let removed = {
            let mut inner = self.lock();
            let Some(e) = inner.entries.remove(name) else {
                return Err(RegistryError::NotLoaded {
                    name: name.to_owned(),
                }
                .into());
            };
            inner.total_bytes -= e.bytes;
            inner.stats.unloads += 1;
            e
        };
        tracing::debug!(name, generation = %removed.generation, "adapter unloaded");
        Ok(())
    }

    /// The current version of `name`, marked as most recently used.
    pub fn get(&self, name: &str) -> Option<AdapterHandle> {
        let mut inner = self.lock();
        let now = inner.tick();
        match inner.entries.get_mut(name) {
            Some(e) => {
                e.last_used = now;
                let h = e.handle();
                inner.stats.hits += 1;
                Some(h)
            }
            None => {
                inner.stats.misses += 1;
                None
            }
        }
    }

    /// The current generation of `name`, without counting as a use.
    pub fn generation(&self, name: &str) -> Option<Generation> {
        self.lock().entries.get(name).map(|e| e.generation)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().entries.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Loads an adapter with `loader` (outside the registry's lock, so other threads
    /// keep going during the disk work) and inserts it under `name`. The loader gets
    /// the base model to check shapes against (and compute DoRA factors).
    pub fn load_file<F>(
        &self,
        name: &str,
        path: &Path,
        model: &Model,
        loader: F,
    ) -> Result<Generation>
    where
        F: FnOnce(&Path, &Model) -> Result<Adapter>,
    {
        // Refuse before the disk work what would be refused after it anyway.
        self.check_fits(name, 0)?;
        let adapter = loader(path, model)?;
        if adapter.n_layer() != model.config.n_layer {
            return Err(AdapterError::invalid(
                path.display().to_string(),
                format!(
                    "adapter built for {} layers, the base has {}",
                    adapter.n_layer(),
                    model.config.n_layer
                ),
            ));
        }
        self.insert(name, adapter)
    }

    /// A stack of the current versions of `members` (name, scale), taken under one
    /// lock so it is a consistent snapshot; each member counts as used. Fails naming
    /// the first member that is not loaded.
    pub fn resolve<S: AsRef<str>>(&self, members: &[(S, f32)]) -> Result<AdapterStack> {
        Ok(AdapterStack::new(
            self.resolve_handles(members)?
                .into_iter()
                .map(|(h, s)| (h.adapter, s))
                .collect(),
        ))
    }

    /// [`Registry::resolve`], keeping each member's handle (name and generation).
    pub fn resolve_handles<S: AsRef<str>>(
        &self,
        members: &[(S, f32)],
    ) -> Result<Vec<(AdapterHandle, f32)>> {
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(members.len());
        for (name, scale) in members {
            let name = name.as_ref();
            let now = inner.tick();
            let Some(e) = inner.entries.get_mut(name) else {
                inner.stats.misses += 1;
                return Err(RegistryError::NotLoaded {
                    name: name.to_owned(),
                }
                .into());
            };
            e.last_used = now;
            out.push((e.handle(), *scale));
            inner.stats.hits += 1;
        }
        Ok(out)
    }

    /// The loaded adapters, most recently used first.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let mut entries: Vec<(u64, AdapterInfo)> = {
            let inner = self.lock();
            inner
                .entries
                .values()
                .map(|e| {
                    (
                        e.last_used,
                        AdapterInfo {
                            name: e.name.clone(),
                            generation: e.generation,
                            bytes: e.bytes,
                            format: e.adapter.format,
                            source: e.adapter.source.clone(),
                        },
                    )
                })
                .collect()
        };
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        entries.into_iter().map(|(_, i)| i).collect()
    }

    pub fn stats(&self) -> RegistryStats {
        let inner = self.lock();
        RegistryStats {
            adapters: inner.entries.len(),
            bytes: inner.total_bytes,
            ..inner.stats
        }
    }
}

fn log_evicted(evicted: Vec<Entry>) {
    for e in evicted {
        tracing::info!(
            name = &*e.name,
            generation = %e.generation,
            bytes = e.bytes,
            "adapter evicted (least recently used)"
        );
    }
}
