//! Delta types attached to base projections, the [`Adapter`] that holds one per
//! (layer, projection), and how they are applied inside the forward pass.

use std::path::PathBuf;
use std::sync::Arc;

use graft_quant::kernels;
use graft_runtime::model::{DeltaError, LinearDelta, ModelConfig, Proj, Weight};

use crate::error::{AdapterError, Result};

/// A low-rank delta `scale * B A` (LoRA), optionally with a DoRA magnitude.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    /// `[rank, in]`, in the type the file stores (F32, F16, BF16 or a quant type).
    pub a: Weight,
    /// `[out, rank]`.
    pub b: Weight,
    /// alpha / rank (or alpha / sqrt(rank) for rsLoRA), times any per-file scale.
    pub scale: f32,
    /// DoRA: per-output-row factor `m / ||W + scale B A||_row`, computed against the
    /// base weights at load.
    pub dora_factor: Option<Vec<f32>>,
}

impl LoraDelta {
    pub fn rank(&self) -> usize {
        self.a.rows
    }

    /// `[out, in]` dense `scale * B A` in f32 (merging, tests).
    pub fn dense(&self) -> Result<Vec<f32>> {
        let a = self
            .a
            .to_f32()
            .map_err(|e| AdapterError::quant("lora_a", e))?;
        let b = self
            .b
            .to_f32()
            .map_err(|e| AdapterError::quant("lora_b", e))?;
        let (r, cols, rows) = (self.a.rows, self.a.cols, self.b.rows);
        let mut out = vec![0f32; rows * cols];
        for (o, row) in out.chunks_exact_mut(cols).enumerate() {
            for j in 0..r {
                let bj = b[o * r + j] * self.scale;
                if bj != 0.0 {
                    for (v, &aa) in row.iter_mut().zip(&a[j * cols..(j + 1) * cols]) {
                        *v += bj * aa;
                    }
                }
            }
        }
        Ok(out)
    }

    fn bytes(&self) -> usize {
        self.a.data().len()
            + self.b.data().len()
            + self.dora_factor.as_ref().map_or(0, |f| f.len() * 4)
    }

    /// `y += user_scale * delta(x)` (DoRA: `y <- y + u * (f * (y + s B A x) - y)`).
    fn apply(&self, user_scale: f32, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), DeltaError> {
        let (r, out) = (self.rank(), self.b.rows);
        let mut t = vec![0f32; n * r];
        kernels::matmul(self.a.ty, self.a.data(), r, self.a.cols, x, n, &mut t)?;
        let s = match self.dora_factor {
            Some(_) => self.scale,
            None => self.scale * user_scale,
        };
        for v in &mut t {
            *v *= s;
        }
        let mut d = vec![0f32; n * out];
        kernels::matmul(self.b.ty, self.b.data(), out, r, &t, n, &mut d)?;
        match &self.dora_factor {
            None => {
                for (yv, dv) in y.iter_mut().zip(&d) {
                    *yv += dv;
                }
            }
            Some(f) => {
                for (yr, dr) in y.chunks_exact_mut(out).zip(d.chunks_exact(out)) {
                    for ((yv, &dv), &fv) in yr.iter_mut().zip(dr).zip(f) {
                        *yv += user_scale * (fv * (*yv + dv) - *yv);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A sparse delta: `values` at (row, col) positions, rows in CSR order.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseDelta {
    pub rows: usize,
    pub cols: usize,
    /// `rows + 1` offsets into `cols_idx`/`values`.
    pub row_ptr: Vec<u32>,
    pub col_idx: Vec<u32>,
    pub values: Vec<f32>,
    /// Multiplies every value (SaRA's merge alpha).
    pub scale: f32,
}

impl SparseDelta {
    /// From (flat row-major index, value) pairs of a `rows` x `cols` matrix; indices
    /// must be strictly increasing and in range.
    pub fn from_flat(
        rows: usize,
        cols: usize,
        indices: &[u32],
        values: &[f32],
        scale: f32,
    ) -> std::result::Result<SparseDelta, String> {
        if indices.len() != values.len() {
            return Err(format!(
                "{} indices but {} values",
                indices.len(),
                values.len()
            ));
        }
        let total = rows
            .checked_mul(cols)
            .ok_or_else(|| format!("shape {rows}x{cols} overflows"))?;
        let mut row_ptr = vec![0u32; rows + 1];
        let mut col_idx = Vec::with_capacity(indices.len());
        let mut prev: Option<u32> = None;
        for (k, &i) in indices.iter().enumerate() {
            if (i as usize) >= total {
                return Err(format!(
                    "index {k} is {i}, expected below {total} ({rows}x{cols})"
                ));
            }
            if prev.is_some_and(|p| i <= p) {
                return Err(format!(
                    "index {k} is {i}, expected above the previous one ({})",
                    prev.unwrap_or(0)
                ));
            }
            prev = Some(i);
            let (r, c) = (i as usize / cols, i as usize % cols);
            row_ptr[r + 1] += 1;
            col_idx.push(c as u32);
        }
        for r in 0..rows {
            row_ptr[r + 1] += row_ptr[r];
        }
        Ok(SparseDelta {
            rows,
            cols,
            row_ptr,
            col_idx,
            values: values.to_vec(),
            scale,
        })
    }

    /// Flat row-major indices, ascending.
    pub fn flat_indices(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.values.len());
        for r in 0..self.rows {
            for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                out.push((r * self.cols) as u32 + self.col_idx[k]);
            }
        }
        out
    }

    /// `[rows, cols]` dense `scale * values`.
    pub fn dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (i, v) in self.flat_indices().into_iter().zip(&self.values) {
            out[i as usize] = v * self.scale;
        }
        out
    }

    fn bytes(&self) -> usize {
        (self.row_ptr.len() + self.col_idx.len() + self.values.len()) * 4
    }

    pub(crate) fn apply(&self, user_scale: f32, x: &[f32], n: usize, y: &mut [f32]) {
        let s = self.scale * user_scale;
        for t in 0..n {
            let xr = &x[t * self.cols..(t + 1) * self.cols];
            let yr = &mut y[t * self.rows..(t + 1) * self.rows];
            for (r, yv) in yr.iter_mut().enumerate() {
                let (lo, hi) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
                let mut acc = 0f32;
                for (&c, &v) in self.col_idx[lo..hi].iter().zip(&self.values[lo..hi]) {
                    acc += v * xr[c as usize];
                }
                *yv += s * acc;
            }
        }
    }
}

/// A dense delta `scale * W` (`[out, in]`, F32), e.g. an expanded RPS-Delta pool.
#[derive(Debug, Clone)]
pub struct DenseDelta {
    /// `[out, in]`; F32 keeps `dense()` exact and the forward pass on the F32 kernel.
    pub w: Weight,
    pub scale: f32,
}

impl DenseDelta {
    /// `[out, in]` dense `scale * W` in f32.
    pub fn dense(&self) -> Result<Vec<f32>> {
        let mut w = self
            .w
            .to_f32()
            .map_err(|e| AdapterError::quant("dense delta", e))?;
        if self.scale != 1.0 {
            for v in &mut w {
                *v *= self.scale;
            }
        }
        Ok(w)
    }

    fn bytes(&self) -> usize {
        self.w.data().len()
    }

    fn apply(&self, user_scale: f32, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), DeltaError> {
        let mut d = vec![0f32; n * self.w.rows];
        kernels::matmul(
            self.w.ty,
            self.w.data(),
            self.w.rows,
            self.w.cols,
            x,
            n,
            &mut d,
        )?;
        let s = self.scale * user_scale;
        for (yv, dv) in y.iter_mut().zip(&d) {
            *yv += s * dv;
        }
        Ok(())
    }
}

/// The delta of one base projection.
#[derive(Debug, Clone)]
pub enum TensorDelta {
    Lora(LoraDelta),
    Sparse(SparseDelta),
    Dense(DenseDelta),
}

impl TensorDelta {
    /// `(out, in)` of the base weight it applies to.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            TensorDelta::Lora(l) => (l.b.rows, l.a.cols),
            TensorDelta::Sparse(s) => (s.rows, s.cols),
            TensorDelta::Dense(d) => (d.w.rows, d.w.cols),
        }
    }

    /// `[out, in]` dense delta in f32 (for DoRA: the additive part only).
    pub fn dense(&self) -> Result<Vec<f32>> {
        match self {
            TensorDelta::Lora(l) => l.dense(),
            TensorDelta::Sparse(s) => Ok(s.dense()),
            TensorDelta::Dense(d) => d.dense(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            TensorDelta::Lora(l) => l.bytes(),
            TensorDelta::Sparse(s) => s.bytes(),
            TensorDelta::Dense(d) => d.bytes(),
        }
    }

    /// `y` (base output rows) updated by this delta at `user_scale`.
    pub fn apply(
        &self,
        user_scale: f32,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), DeltaError> {
        if user_scale == 0.0 {
            return Ok(());
        }
        match self {
            TensorDelta::Lora(l) => l.apply(user_scale, x, n, y),
            TensorDelta::Sparse(s) => {
                s.apply(user_scale, x, n, y);
                Ok(())
            }
            TensorDelta::Dense(d) => d.apply(user_scale, x, n, y),
        }
    }
}

/// What kind of file an adapter came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    Peft,
    GgufLora,
    Sara,
    /// STABLE-RPS pools (`.rps`), expanded at load.
    Rps,
    /// Built in memory (merging, training).
    Memory,
}

/// A set of deltas for one base model, one slot per (layer, projection).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub format: AdapterFormat,
    /// Where it was loaded from (empty when built in memory).
    pub source: PathBuf,
    n_layer: usize,
    deltas: Vec<Option<TensorDelta>>,
}

impl Adapter {
    pub fn new(format: AdapterFormat, source: PathBuf, n_layer: usize) -> Self {
        Adapter {
            format,
            source,
            n_layer,
            deltas: vec![None; n_layer * Proj::ALL.len()],
        }
    }

    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    fn slot(&self, layer: usize, proj: Proj) -> Option<usize> {
        (layer < self.n_layer).then(|| layer * Proj::ALL.len() + proj.index())
    }

    pub fn get(&self, layer: usize, proj: Proj) -> Option<&TensorDelta> {
        self.slot(layer, proj)
            .and_then(|i| self.deltas.get(i))
            .and_then(Option::as_ref)
    }

    /// Attaches `delta` to `proj` of `layer`, checking its shape against `config`.
    pub fn insert(
        &mut self,
        config: &ModelConfig,
        layer: usize,
        proj: Proj,
        delta: TensorDelta,
    ) -> Result<()> {
        let name = proj.gguf_weight(layer);
        let expected = projection_shape(config, proj);
        let found = delta.shape();
        let slot = self.slot(layer, proj).ok_or_else(|| {
            AdapterError::tensor(
                self.source.display().to_string(),
                &name,
                format!("layer {layer} is beyond the base's {} layers", self.n_layer),
            )
        })?;
        if found != expected {
            return Err(AdapterError::Shape {
                file: self.source.display().to_string(),
                tensor: name,
                found: vec![found.0, found.1],
                expected: vec![expected.0, expected.1],
            });
        }
        if let TensorDelta::Lora(l) = &delta {
            if l.a.rows != l.b.cols {
                return Err(AdapterError::tensor(
                    self.source.display().to_string(),
                    &name,
                    format!(
                        "lora_a has rank {} but lora_b has rank {}",
                        l.a.rows, l.b.cols
                    ),
                ));
            }
        }
        self.deltas[slot] = Some(delta);
        Ok(())
    }

    /// (layer, projection, delta) of every attached delta.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Proj, &TensorDelta)> {
        self.deltas.iter().enumerate().filter_map(|(i, d)| {
            d.as_ref()
                .map(|d| (i / Proj::ALL.len(), Proj::ALL[i % Proj::ALL.len()], d))
        })
    }

    pub fn len(&self) -> usize {
        self.deltas.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory the deltas use (mapped bytes included), for the registry's budget.
    pub fn bytes(&self) -> usize {
        self.iter().map(|(_, _, d)| d.bytes()).sum()
    }
}

/// `(out, in)` of a projection of the base.
pub fn projection_shape(c: &ModelConfig, proj: Proj) -> (usize, usize) {
    let (d, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
    match proj {
        Proj::Q => (q, d),
        Proj::K | Proj::V => (kv, d),
        Proj::O => (d, q),
        Proj::Gate | Proj::Up => (ff, d),
        Proj::Down => (d, ff),
    }
}

impl TensorDelta {
    /// Whether applying it only adds a term independent of the base output.
    pub fn is_additive(&self) -> bool {
        !matches!(
            self,
            TensorDelta::Lora(LoraDelta {
                dora_factor: Some(_),
                ..
            })
        )
    }
}

impl LinearDelta for Adapter {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        self.get(layer, proj).is_some()
    }

    fn is_additive(&self, layer: usize, proj: Proj) -> bool {
        self.get(layer, proj).is_none_or(TensorDelta::is_additive)
    }

    fn apply(
        &self,
        layer: usize,
        proj: Proj,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), DeltaError> {
        match self.get(layer, proj) {
            Some(d) => d.apply(1.0, x, n, y),
            None => Ok(()),
        }
    }
}

/// Several adapters applied together, each at its own scale (`--adapter A:0.5`).
#[derive(Debug, Clone, Default)]
pub struct AdapterStack {
    pub layers: Vec<(Arc<Adapter>, f32)>,
}

impl AdapterStack {
    pub fn new(layers: Vec<(Arc<Adapter>, f32)>) -> Self {
        AdapterStack { layers }
    }

    pub fn single(adapter: Arc<Adapter>, scale: f32) -> Self {
        AdapterStack {
            layers: vec![(adapter, scale)],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl LinearDelta for AdapterStack {
    fn touches(&self, layer: usize, proj: Proj) -> bool {
        self.layers
            .iter()
            .any(|(a, s)| *s != 0.0 && a.touches(layer, proj))
    }

    fn is_additive(&self, layer: usize, proj: Proj) -> bool {
        self.layers
            .iter()
            .all(|(a, s)| *s == 0.0 || a.is_additive(layer, proj))
    }

    /// Applies each member in order; additive deltas commute, a DoRA member also
    /// rescales what the members before it added.
    fn apply(
        &self,
        layer: usize,
        proj: Proj,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), DeltaError> {
        for (a, s) in &self.layers {
            if let Some(d) = a.get(layer, proj) {
                d.apply(*s, x, n, y)?;
            }
        }
        Ok(())
    }
}

/// The F32 weight of `values` (`rows` x `cols`), for deltas built in memory.
pub fn f32_weight(rows: usize, cols: usize, values: &[f32]) -> Result<Weight> {
    Weight::from_f32(rows, cols, values).map_err(|e| AdapterError::quant("f32 weight", e))
}
