//! Which virtual tensors draw from which pool, and the pure functions training needs:
//! [`expand`] (pools -> tensors), [`scatter_grad`] (tensor gradients -> pool
//! gradients, its adjoint) and the gradient scaler.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::OnceLock;

use graft_runtime::model::{Arch, ModelConfig, Proj};
use rayon::prelude::*;

use super::fold::{RandomFold, Run, SplitMix64};
use crate::delta::{f32_weight, projection_shape, Adapter, AdapterFormat, DenseDelta};
use crate::delta::{LoraDelta, TensorDelta};
use crate::error::{AdapterError, Result};

/// The reference implementation's default seed.
pub const DEFAULT_SEED: u64 = 123321;

/// What the pools parameterise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RpsMode {
    /// RPS-LoRA: every adapted projection gets `alpha / rank * B A`, with all A drawn
    /// from pool `z_a` (random init) and all B from pool `z_b` (zero init).
    Lora { rank: usize, alpha: f32 },
    /// RPS-Delta: every adapted projection gets a dense `ΔW` drawn from one
    /// zero-initialised pool `z`.
    Delta,
}

impl RpsMode {
    /// The pools' names (and the file's tensor names), in pool order.
    pub fn pool_names(&self) -> &'static [&'static str] {
        match self {
            RpsMode::Lora { .. } => &["z_a", "z_b"],
            RpsMode::Delta => &["z"],
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            RpsMode::Lora { .. } => "lora",
            RpsMode::Delta => "delta",
        }
    }
}

/// What a virtual tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// LoRA A, `[rank, in]`, pool 0.
    A,
    /// LoRA B, `[out, rank]`, pool 1.
    B,
    /// A dense delta, `[out, in]`, pool 0.
    Delta,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::A, Role::B, Role::Delta];

    pub fn name(self) -> &'static str {
        match self {
            Role::A => "a",
            Role::B => "b",
            Role::Delta => "delta",
        }
    }

    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The pool it draws from.
    pub fn pool(self) -> usize {
        match self {
            Role::B => 1,
            Role::A | Role::Delta => 0,
        }
    }

    /// Suffix of the tensor's name after the base weight's GGUF name.
    pub fn suffix(self) -> &'static str {
        match self {
            Role::A => ".lora_a",
            Role::B => ".lora_b",
            Role::Delta => ".delta",
        }
    }
}

/// How a slot's gradient is divided (`S_j`; `c_j` positions map to slot `j`, `A_j`
/// is the sum and `Q_j` the sum of squares of their lambdas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaler {
    /// `S_j = A_j^2 / c_j` (the reference's default).
    V1,
    /// `S_j = Q_j`.
    V5,
    /// `S_j = 1`.
    None,
}

impl Scaler {
    pub const ALL: [Scaler; 3] = [Scaler::V1, Scaler::V5, Scaler::None];

    pub fn name(self) -> &'static str {
        match self {
            Scaler::V1 => "v1",
            Scaler::V5 => "v5",
            Scaler::None => "none",
        }
    }

    pub fn from_name(s: &str) -> Option<Scaler> {
        Scaler::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// The number of trainable floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// `m` slots in all (split between the pools of RPS-LoRA).
    Slots(u64),
    /// `rho = m / n` in `(0, 1]`; `m = round(rho * n)`.
    Ratio(f64),
}

/// The knobs of [`RpsLayout::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct RpsConfig {
    pub mode: RpsMode,
    pub budget: Budget,
    /// Seeds the maps (pool `q` uses `seed + q`), not the initial values.
    pub seed: u64,
    pub scaler: Scaler,
    /// RPS-LoRA: the fraction of the budget given to `z_a`, in `(0, 1)`; `None`
    /// gives `sum d_in : sum d_out` (both pools then share at the same rho).
    pub split_a: Option<f64>,
}

impl RpsConfig {
    /// RPS-LoRA with the default seed, scaler v1 and pool split.
    pub fn lora(rank: usize, alpha: f32, budget: Budget) -> Self {
        RpsConfig {
            mode: RpsMode::Lora { rank, alpha },
            budget,
            seed: DEFAULT_SEED,
            scaler: Scaler::V1,
            split_a: None,
        }
    }

    /// RPS-Delta with the default seed and scaler v1.
    pub fn delta(budget: Budget) -> Self {
        RpsConfig {
            mode: RpsMode::Delta,
            budget,
            seed: DEFAULT_SEED,
            scaler: Scaler::V1,
            split_a: None,
        }
    }
}

/// One virtual tensor: element `i` (row-major) sits at position `offset + i` of its
/// pool's virtual array and is `lambda * xi(p) * z[h(p)]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VirtualTensor {
    pub layer: usize,
    pub proj: Proj,
    pub role: Role,
    pub rows: usize,
    pub cols: usize,
    pub offset: u64,
    pub lambda: f32,
}

impl VirtualTensor {
    /// Number of elements (checked not to overflow when the layout was built).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `blk.N.<stem>.weight.lora_a` / `.lora_b` / `.delta`.
    pub fn name(&self) -> String {
        format!(
            "{}{}",
            self.proj.gguf_weight(self.layer),
            self.role.suffix()
        )
    }

    pub fn pool(&self) -> usize {
        self.role.pool()
    }
}

/// One pool: `m` slots shared by `n` virtual positions.
#[derive(Debug, Clone)]
pub struct PoolMap {
    name: &'static str,
    n: u64,
    fold: RandomFold,
}

impl PoolMap {
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn m(&self) -> u64 {
        self.fold.m()
    }

    pub fn n(&self) -> u64 {
        self.n
    }

    pub fn fold(&self) -> &RandomFold {
        &self.fold
    }
}

/// The seed of pool `q`'s map.
pub fn pool_seed(seed: u64, q: usize) -> u64 {
    seed.wrapping_add(q as u64)
}

/// A complete STABLE-RPS parameterisation of some projections of one base model.
#[derive(Debug, Clone)]
pub struct RpsLayout {
    arch: Arch,
    mode: RpsMode,
    seed: u64,
    scaler: Scaler,
    pools: Vec<PoolMap>,
    tensors: Vec<VirtualTensor>,
    /// `S_j` of every pool, computed on first use (loading for inference never needs it).
    scale: OnceLock<Vec<Vec<f32>>>,
}

impl PartialEq for RpsLayout {
    fn eq(&self, o: &Self) -> bool {
        let pools = |l: &Self| -> Vec<(&str, u64, u64, u64)> {
            l.pools
                .iter()
                .map(|p| (p.name, p.m(), p.n, p.fold.seed()))
                .collect()
        };
        self.arch == o.arch
            && self.mode == o.mode
            && self.seed == o.seed
            && self.scaler == o.scaler
            && pools(self) == pools(o)
            && self.tensors == o.tensors
    }
}

impl RpsLayout {
    /// The layout adapting `targets` in every layer of `config` (see
    /// [`RpsLayout::with_targets`]).
    pub fn new(config: &ModelConfig, targets: &[Proj], rps: &RpsConfig) -> Result<Self> {
        let t: Vec<(usize, Proj)> = (0..config.n_layer)
            .flat_map(|l| targets.iter().map(move |&p| (l, p)))
            .collect();
        Self::with_targets(config, &t, rps)
    }

    /// The layout adapting the (layer, projection) pairs `targets` (duplicates
    /// ignored). Tensors are ordered by layer, then projection (`Proj::ALL` order),
    /// then A before B, and laid out back to back in their pool.
    ///
    /// RPS-LoRA lambdas: `1` for B; for A `sqrt(d_min / d_in)` (`d_min` the smallest
    /// `d_in` of the targets), so that with `z_a ~ U(-s0, s0)`, `s0 = 1 / sqrt(d_min)`
    /// ([`RpsLayout::init_pools`]) every A starts like LoRA's, `U(-1/sqrt(d_in),
    /// 1/sqrt(d_in))`, and lambda stays at most 1. RPS-Delta lambdas are 1.
    pub fn with_targets(
        config: &ModelConfig,
        targets: &[(usize, Proj)],
        rps: &RpsConfig,
    ) -> Result<Self> {
        let err = |w: String| AdapterError::invalid("RPS layout", w);
        let targets: BTreeSet<(usize, Proj)> = targets.iter().copied().collect();
        if targets.is_empty() {
            return Err(err("no target projections".into()));
        }
        if let RpsMode::Lora { rank: 0, .. } = rps.mode {
            return Err(err("rank 0, expected at least 1".into()));
        }
        let mut tensors = Vec::new();
        let mut n = vec![0u64; rps.mode.pool_names().len()];
        let mut push =
            |tensors: &mut Vec<VirtualTensor>, layer, proj, role: Role, rows, cols, lambda| {
                let q = role.pool();
                tensors.push(VirtualTensor {
                    layer,
                    proj,
                    role,
                    rows,
                    cols,
                    offset: n[q],
                    lambda,
                });
                // Saturating: an absurd rank is refused by `from_parts` below.
                n[q] = n[q].saturating_add(rows.saturating_mul(cols) as u64);
            };
        match rps.mode {
            RpsMode::Lora { rank, .. } => {
                let d_min = targets
                    .iter()
                    .map(|&(_, p)| projection_shape(config, p).1)
                    .min()
                    .unwrap_or(1)
                    .max(1);
                for &(layer, proj) in &targets {
                    let (out, inp) = projection_shape(config, proj);
                    let lambda_a = (d_min as f64 / inp.max(1) as f64).sqrt() as f32;
                    push(&mut tensors, layer, proj, Role::A, rank, inp, lambda_a);
                    push(&mut tensors, layer, proj, Role::B, out, rank, 1.0);
                }
            }
            RpsMode::Delta => {
                for &(layer, proj) in &targets {
                    let (out, inp) = projection_shape(config, proj);
                    push(&mut tensors, layer, proj, Role::Delta, out, inp, 1.0);
                }
            }
        }
        let n_total: u64 = n.iter().sum();
        let m = match rps.budget {
            Budget::Slots(m) => m,
            Budget::Ratio(rho) if rho > 0.0 && rho <= 1.0 => {
                ((rho * n_total as f64).round() as u64).max(1)
            }
            Budget::Ratio(rho) => return Err(err(format!("rho {rho}, expected 0 < rho <= 1"))),
        };
        if m == 0 || m > n_total {
            return Err(err(format!(
                "budget of {m} slots, expected 1..={n_total} (the virtual parameters)"
            )));
        }
        let slots = match (rps.mode, n.as_slice()) {
            (RpsMode::Lora { .. }, &[n_a, n_b]) => {
                if m < 2 {
                    return Err(err(format!(
                        "budget of {m} slots, RPS-LoRA needs at least 2 (one per pool)"
                    )));
                }
                let m_a = match rps.split_a {
                    // n_a : n_b = sum d_in : sum d_out (same rank); integer rounding.
                    None => {
                        let (m, na, nt) = (m as u128, n_a as u128, n_total as u128);
                        ((2 * m * na + nt) / (2 * nt)) as u64
                    }
                    Some(f) if f > 0.0 && f < 1.0 => (m as f64 * f).round() as u64,
                    Some(f) => return Err(err(format!("split_a {f}, expected 0 < split_a < 1"))),
                };
                let m_a = m_a.clamp(1, m - 1).clamp(m.saturating_sub(n_b), n_a);
                vec![m_a, m - m_a]
            }
            _ => vec![m],
        };
        Self::from_parts(config, rps.mode, rps.seed, rps.scaler, &slots, tensors)
    }

    /// A layout from its parts, as a file stores them, checked against `config`:
    /// the mode's pools (`slots[q]` slots each, `1 <= m <= n`), every tensor in a
    /// layer the base has with the shape its role needs (`rank <= min(out, in)`),
    /// lambda finite and positive, no (layer, projection, role) twice, RPS-LoRA A and B
    /// in pairs, and each pool's tensors back to back from 0 in list order.
    pub fn from_parts(
        config: &ModelConfig,
        mode: RpsMode,
        seed: u64,
        scaler: Scaler,
        slots: &[u64],
        tensors: Vec<VirtualTensor>,
    ) -> Result<Self> {
        Self::checked(config, mode, seed, scaler, slots, tensors)
            .map_err(|w| AdapterError::invalid("RPS layout", w))
    }

    pub(crate) fn checked(
        config: &ModelConfig,
        mode: RpsMode,
        seed: u64,
        scaler: Scaler,
        slots: &[u64],
        tensors: Vec<VirtualTensor>,
    ) -> std::result::Result<Self, String> {
        let names = mode.pool_names();
        if let RpsMode::Lora { rank, alpha } = mode {
            if rank == 0 {
                return Err("rank 0, expected at least 1".into());
            }
            if !alpha.is_finite() {
                return Err(format!("alpha {alpha}, expected a finite number"));
            }
        }
        if slots.len() != names.len() {
            return Err(format!(
                "{} pools, expected {} for mode {}",
                slots.len(),
                names.len(),
                mode.name()
            ));
        }
        if tensors.is_empty() {
            return Err("no virtual tensors".into());
        }
        let mut n = vec![0u64; names.len()];
        let mut seen = BTreeSet::new();
        let mut pairs: BTreeMap<(usize, Proj), [bool; 2]> = BTreeMap::new();
        for t in &tensors {
            let name = t.name();
            if t.layer >= config.n_layer {
                return Err(format!(
                    "tensor {name}: layer {}, expected below the base's {} layers",
                    t.layer, config.n_layer
                ));
            }
            let (out, inp) = projection_shape(config, t.proj);
            let expected = match (mode, t.role) {
                (RpsMode::Lora { rank, .. }, Role::A) => (rank, inp),
                (RpsMode::Lora { rank, .. }, Role::B) => (out, rank),
                (RpsMode::Delta, Role::Delta) => (out, inp),
                _ => {
                    return Err(format!(
                        "tensor {name}: role {}, expected {} in mode {}",
                        t.role.name(),
                        match mode {
                            RpsMode::Lora { .. } => "a or b",
                            RpsMode::Delta => "delta",
                        },
                        mode.name()
                    ))
                }
            };
            if let RpsMode::Lora { rank, .. } = mode {
                if rank > out.min(inp) {
                    return Err(format!(
                        "tensor {name}: rank {rank}, expected at most min(out, in) = {}",
                        out.min(inp)
                    ));
                }
                let slot = pairs.entry((t.layer, t.proj)).or_default();
                slot[t.role.pool()] = true;
            }
            if (t.rows, t.cols) != expected {
                return Err(format!(
                    "tensor {name}: shape [{}, {}], expected [{}, {}]",
                    t.rows, t.cols, expected.0, expected.1
                ));
            }
            if !(t.lambda.is_finite() && t.lambda > 0.0) {
                return Err(format!(
                    "tensor {name}: lambda {}, expected a finite number > 0",
                    t.lambda
                ));
            }
            if !seen.insert((t.layer, t.proj, t.role)) {
                return Err(format!("tensor {name} appears twice"));
            }
            let q = t.role.pool();
            if t.offset != n[q] {
                return Err(format!(
                    "tensor {name}: offset {}, expected {} (right after the previous tensor of pool {})",
                    t.offset, n[q], names[q]
                ));
            }
            let len = t
                .rows
                .checked_mul(t.cols)
                .and_then(|l| u64::try_from(l).ok())
                .ok_or_else(|| format!("tensor {name}: shape overflows"))?;
            n[q] = n[q]
                .checked_add(len)
                .ok_or_else(|| format!("tensor {name}: pool {} overflows", names[q]))?;
        }
        if let Some(((l, p), _)) = pairs.iter().find(|(_, v)| !(v[0] && v[1])) {
            return Err(format!(
                "{} has only one of lora_a / lora_b, expected both",
                p.gguf_weight(*l)
            ));
        }
        let mut pools = Vec::with_capacity(names.len());
        for (q, (&name, (&m, &n))) in names.iter().zip(slots.iter().zip(&n)).enumerate() {
            if m == 0 || m > n {
                return Err(format!(
                    "pool {name}: {m} slots, expected 1..={n} (its virtual length)"
                ));
            }
            let fold = RandomFold::new(m, pool_seed(seed, q))
                .ok_or_else(|| format!("pool {name}: {m} slots do not fit in memory"))?;
            pools.push(PoolMap { name, n, fold });
        }
        Ok(RpsLayout {
            arch: config.arch,
            mode,
            seed,
            scaler,
            pools,
            tensors,
            scale: OnceLock::new(),
        })
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn mode(&self) -> RpsMode {
        self.mode
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn scaler(&self) -> Scaler {
        self.scaler
    }

    pub fn pools(&self) -> &[PoolMap] {
        &self.pools
    }

    /// The virtual tensors, in order; expand / scatter_grad use this order.
    pub fn tensors(&self) -> &[VirtualTensor] {
        &self.tensors
    }

    /// Index of the tensor of (layer, projection, role).
    pub fn find(&self, layer: usize, proj: Proj, role: Role) -> Option<usize> {
        self.tensors
            .iter()
            .position(|t| t.layer == layer && t.proj == proj && t.role == role)
    }

    /// Trainable floats (`m` over all pools).
    pub fn n_slots(&self) -> u64 {
        self.pools.iter().map(PoolMap::m).sum()
    }

    /// Virtual parameters (`n` over all pools).
    pub fn n_virtual(&self) -> u64 {
        self.pools.iter().map(PoolMap::n).sum()
    }

    /// RPS-LoRA's `alpha / rank` (1 for RPS-Delta).
    pub fn lora_scale(&self) -> f32 {
        match self.mode {
            RpsMode::Lora { rank, alpha } => alpha / rank as f32,
            RpsMode::Delta => 1.0,
        }
    }

    /// RPS-LoRA: `s0`, the half-width of `z_a`'s uniform init, `1 / sqrt(d_min)` with
    /// `d_min` the smallest `d_in` of the A tensors. 0 for RPS-Delta.
    pub fn init_scale(&self) -> f32 {
        match self.mode {
            RpsMode::Lora { .. } => {
                let d_min = self
                    .tensors
                    .iter()
                    .filter(|t| t.role == Role::A)
                    .map(|t| t.cols)
                    .min()
                    .unwrap_or(1)
                    .max(1);
                (1.0 / (d_min as f64).sqrt()) as f32
            }
            RpsMode::Delta => 0.0,
        }
    }

    /// Initial pools: RPS-LoRA `z_a ~ U(-s0, s0)` (splitmix64 from `seed`, see
    /// [`RpsLayout::init_scale`]) and `z_b = 0`; RPS-Delta `z = 0`. So the initial
    /// delta is exactly zero.
    pub fn init_pools(&self, seed: u64) -> Vec<Vec<f32>> {
        let s0 = self.init_scale();
        let mut g = SplitMix64::new(seed);
        self.pools
            .iter()
            .enumerate()
            .map(|(q, p)| {
                let m = p.fold.tau().len();
                match (self.mode, q) {
                    (RpsMode::Lora { .. }, 0) => {
                        (0..m).map(|_| s0 * (2.0 * g.next_f32() - 1.0)).collect()
                    }
                    _ => vec![0f32; m],
                }
            })
            .collect()
    }

    /// Checks that `pools` has one slice of `m` values per pool.
    pub fn check_pools<P: AsRef<[f32]>>(&self, pools: &[P], what: &str) -> Result<()> {
        if pools.len() != self.pools.len() {
            return Err(AdapterError::invalid(
                what,
                format!("{} pools, expected {}", pools.len(), self.pools.len()),
            ));
        }
        for (p, z) in self.pools.iter().zip(pools) {
            if z.as_ref().len() as u64 != p.m() {
                return Err(AdapterError::invalid(
                    what,
                    format!(
                        "pool {} has {} values, expected {}",
                        p.name,
                        z.as_ref().len(),
                        p.m()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that `tensors` has one slice per virtual tensor, of its size.
    pub fn check_tensors<T: AsRef<[f32]>>(&self, tensors: &[T], what: &str) -> Result<()> {
        if tensors.len() != self.tensors.len() {
            return Err(AdapterError::invalid(
                what,
                format!("{} tensors, expected {}", tensors.len(), self.tensors.len()),
            ));
        }
        for (t, v) in self.tensors.iter().zip(tensors) {
            if v.as_ref().len() != t.len() {
                return Err(AdapterError::invalid(
                    what,
                    format!(
                        "tensor {} has {} values, expected {}x{}",
                        t.name(),
                        v.as_ref().len(),
                        t.rows,
                        t.cols
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `S_j` of every slot of every pool (all 1 for [`Scaler::None`]). Every slot has
    /// at least one position (fold 0 covers the pool) and lambdas are positive, so
    /// `S_j > 0`.
    pub fn scaler_values(&self) -> &[Vec<f32>] {
        self.scale
            .get_or_init(|| (0..self.pools.len()).map(|q| self.pool_scale(q)).collect())
    }

    fn pool_scale(&self, q: usize) -> Vec<f32> {
        let m = self.pools[q].fold.tau().len();
        if self.scaler == Scaler::None {
            return vec![1.0; m];
        }
        // (c_j, A_j) for v1, (_, Q_j) for v5, in f64. A run adds one lambda to a range
        // of slots, so they are piecewise constant: sweep the sorted run ends and fill
        // the pieces (O(m + runs log runs), no per-slot temporaries).
        let v1 = self.scaler == Scaler::V1;
        let runs = self.pool_runs(q);
        let mut out = vec![0f32; m];
        over_slots(&mut out, |chunk, lo| {
            let mut events: Vec<(usize, f64, f64)> = Vec::new();
            for (t, run) in clip(&runs, lo, lo + chunk.len()) {
                let l = self.tensors[t].lambda as f64;
                let add = if v1 { l } else { l * l };
                events.push((run.j, 1.0, add));
                events.push((run.j + run.len, -1.0, -add));
            }
            // Stable: equal slots keep run order, so the sums do not depend on chunking.
            events.sort_by_key(|e| e.0);
            let (mut c, mut a, mut pos) = (0f64, 0f64, 0usize);
            let value = |c: f64, a: f64| if v1 { a * a / c } else { a } as f32;
            for (k, dc, da) in events {
                if k > pos {
                    chunk[pos..k].fill(value(c, a));
                    pos = k;
                }
                c += dc;
                a += da;
            }
        });
        out
    }

    /// Divides every slot's gradient by its `S_j` (a no-op for [`Scaler::None`]).
    pub fn apply_scaler(&self, grads: &mut [Vec<f32>]) -> Result<()> {
        self.check_pools(grads, "RPS pool gradients")?;
        if self.scaler == Scaler::None {
            return Ok(());
        }
        for (g, s) in grads.iter_mut().zip(self.scaler_values()) {
            g.par_iter_mut().zip(s.par_iter()).for_each(|(g, &s)| {
                *g /= s;
            });
        }
        Ok(())
    }

    /// (tensor index, run) of every run of pool `q`.
    fn pool_runs(&self, q: usize) -> Vec<(usize, Run)> {
        let fold = &self.pools[q].fold;
        self.tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.pool() == q)
            .flat_map(|(i, t)| fold.runs(t.offset, t.len() as u64).map(move |r| (i, r)))
            .collect()
    }

    /// The adapter these pools give: RPS-LoRA as `TensorDelta::Lora` (F32 A and B,
    /// scale `alpha / rank`), RPS-Delta as `TensorDelta::Dense` (F32, scale 1).
    /// `config` must be the one the layout was built against.
    pub fn to_adapter<P: AsRef<[f32]> + Sync>(
        &self,
        config: &ModelConfig,
        pools: &[P],
        source: PathBuf,
    ) -> Result<Adapter> {
        self.check_pools(pools, "RPS pools")?;
        let wrap = |t: &VirtualTensor, values: &[f32]| f32_weight(t.rows, t.cols, values);
        // One unit per adapted projection: (tensor, partner B for LoRA).
        let units: Vec<(usize, Option<usize>)> = self
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.role != Role::B)
            .map(|(i, t)| {
                let b = (t.role == Role::A)
                    .then(|| self.find(t.layer, t.proj, Role::B))
                    .flatten();
                (i, b)
            })
            .collect();
        let scale = self.lora_scale();
        let deltas: Vec<Result<(usize, Proj, TensorDelta)>> = units
            .par_iter()
            .map(|&(i, b)| {
                let t = &self.tensors[i];
                let mut v = vec![0f32; t.len()];
                expand_tensor_into(self, i, pools, &mut v)?;
                let delta = match b {
                    None => TensorDelta::Dense(DenseDelta {
                        w: wrap(t, &v)?,
                        scale: 1.0,
                    }),
                    Some(b) => {
                        let tb = &self.tensors[b];
                        let mut vb = vec![0f32; tb.len()];
                        expand_tensor_into(self, b, pools, &mut vb)?;
                        TensorDelta::Lora(LoraDelta {
                            a: wrap(t, &v)?,
                            b: wrap(tb, &vb)?,
                            scale,
                            dora_factor: None,
                        })
                    }
                };
                Ok((t.layer, t.proj, delta))
            })
            .collect();
        let mut adapter = Adapter::new(AdapterFormat::Rps, source, config.n_layer);
        for d in deltas {
            let (layer, proj, delta) = d?;
            adapter.insert(config, layer, proj, delta)?;
        }
        Ok(adapter)
    }
}

/// Runs `f(chunk, lo)` on slot chunks `out[lo..lo + chunk.len()]` in parallel.
fn over_slots<T: Send>(out: &mut [T], f: impl Fn(&mut [T], usize) + Sync) {
    let chunk = out
        .len()
        .div_ceil(rayon::current_num_threads() * 4)
        .max(1 << 14);
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(c, slots)| f(slots, c * chunk));
}

/// The parts of `runs` that land on slots `lo..hi`, with `j` relative to `lo`. Each
/// slot sees its runs in the same order whatever the chunking, so sums do not depend
/// on the thread count.
fn clip(runs: &[(usize, Run)], lo: usize, hi: usize) -> impl Iterator<Item = (usize, Run)> + '_ {
    runs.iter().filter_map(move |&(t, run)| {
        let (s, e) = (run.j.max(lo), (run.j + run.len).min(hi));
        (s < e).then(|| {
            let d = s - run.j;
            let clipped = Run {
                i: run.i + d,
                r: run.r + d,
                j: s - lo,
                len: e - s,
                sigma: run.sigma,
            };
            (t, clipped)
        })
    })
}

/// Every virtual tensor's values, `W[i] = lambda * xi(p) * z[h(p)]`, in the layout's
/// tensor order.
pub fn expand<P: AsRef<[f32]> + Sync>(layout: &RpsLayout, pools: &[P]) -> Result<Vec<Vec<f32>>> {
    layout.check_pools(pools, "RPS pools")?;
    layout
        .tensors
        .par_iter()
        .enumerate()
        .map(|(i, t)| {
            let mut out = vec![0f32; t.len()];
            expand_tensor_into(layout, i, pools, &mut out)?;
            Ok(out)
        })
        .collect()
}

/// Tensor `t`'s values into `out` (its `rows * cols` elements), without allocating.
pub fn expand_tensor_into<P: AsRef<[f32]>>(
    layout: &RpsLayout,
    t: usize,
    pools: &[P],
    out: &mut [f32],
) -> Result<()> {
    layout.check_pools(pools, "RPS pools")?;
    let vt = layout.tensors.get(t).ok_or_else(|| {
        AdapterError::invalid(
            "RPS expand",
            format!("tensor {t}, expected below {}", layout.tensors.len()),
        )
    })?;
    if out.len() != vt.len() {
        return Err(AdapterError::invalid(
            "RPS expand",
            format!(
                "output for {} has {} values, expected {}",
                vt.name(),
                out.len(),
                vt.len()
            ),
        ));
    }
    let q = vt.pool();
    let (fold, z) = (&layout.pools[q].fold, pools[q].as_ref());
    let tau = fold.tau();
    // Runs stay inside the tensor, the pool and the sign table (see `Runs`), so the
    // slices below are in range once the sizes above are checked.
    for run in fold.runs(vt.offset, vt.len() as u64) {
        let coef = vt.lambda * run.sigma;
        let o = &mut out[run.i..run.i + run.len];
        let zs = &z[run.j..run.j + run.len];
        let ts = &tau[run.r..run.r + run.len];
        for ((o, &zv), &tv) in o.iter_mut().zip(zs).zip(ts) {
            *o = coef * tv * zv;
        }
    }
    Ok(())
}

/// The pools' gradients from the virtual tensors' gradients (the adjoint of
/// [`expand`]): `dz[j] = sum over p with h(p) = j of lambda * xi(p) * dW[p]`.
/// Unscaled; see [`RpsLayout::apply_scaler`].
pub fn scatter_grad<G: AsRef<[f32]> + Sync>(
    layout: &RpsLayout,
    grads: &[G],
) -> Result<Vec<Vec<f32>>> {
    layout.check_tensors(grads, "RPS tensor gradients")?;
    Ok((0..layout.pools.len())
        .map(|q| {
            let fold = &layout.pools[q].fold;
            let tau = fold.tau();
            let mut dz = vec![0f32; tau.len()];
            let runs = layout.pool_runs(q);
            over_slots(&mut dz, |chunk, lo| {
                for (t, run) in clip(&runs, lo, lo + chunk.len()) {
                    let coef = layout.tensors[t].lambda * run.sigma;
                    let g = &grads[t].as_ref()[run.i..run.i + run.len];
                    let ts = &tau[run.r..run.r + run.len];
                    let d = &mut chunk[run.j..run.j + run.len];
                    for ((d, &gv), &tv) in d.iter_mut().zip(g).zip(ts) {
                        *d += coef * tv * gv;
                    }
                }
            });
            dz
        })
        .collect())
}
