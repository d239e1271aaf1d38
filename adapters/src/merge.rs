//! Merging adapters into base weights.
//!
//! - [`merge_into`] / [`unmerge`]: in memory, for float bases (F32, F16, BF16). The
//!   merged weights are new owned buffers (the base may be a read-only map); the
//!   [`MergeRecord`] remembers which weights it produced, so unmerging checks that it is
//!   handed the same model in the same state.
//! - [`merge_to_gguf`]: any base GGUF, written to a new file: each adapted tensor is
//!   dequantized, the deltas added, and requantized; every other tensor and all
//!   metadata are copied byte for byte, one tensor in memory at a time.
//!
//! Both follow the forward pass's order for a stack (see `AdapterStack`'s
//! `LinearDelta` impl): members apply one after another; an additive member at user
//! scale `u` adds `u ΔW`, a DoRA member (row factors `f`) does
//! `W <- W + u (f ⊙ (W + ΔW) - W)`, which rescales what the members before it added.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use graft_quant::{dequantize_matrix, kernels, quantize_matrix, GgmlType};
use graft_runtime::gguf::{GgufArray, GgufFile, GgufValue, GgufWriter, TensorInfo};
use graft_runtime::model::{Model, ModelConfig, ModelError, Proj, Weight};
use graft_runtime::quantize::FileType;
use rayon::prelude::*;

use crate::delta::{AdapterStack, DenseDelta, LoraDelta, SparseDelta, TensorDelta};
use crate::error::{AdapterError, Result};

/// Metadata key listing the adapters merged into a file (`source@scale`), appended to
/// when a merged file is merged again. Unknown keys are ignored by loaders.
pub const KEY_MERGED_ADAPTERS: &str = "graft.merged_adapters";

/// A DoRA member can be undone arithmetically only if every row factor
/// `1 - u + u f` is at least this far from zero (dividing by it amplifies rounding);
/// otherwise the record keeps the original weight.
const MIN_DORA_GAIN: f32 = 1e-2;

/// One stack member as it acts on one tensor.
struct Step<'a> {
    source: &'a Path,
    delta: &'a TensorDelta,
    scale: f32,
}

/// The members of `stack` that change projection `proj` of `layer`, in stack order.
/// Members at scale 0 are left out, as the forward pass skips them.
fn steps(stack: &AdapterStack, layer: usize, proj: Proj) -> Vec<Step<'_>> {
    stack
        .layers
        .iter()
        .filter(|(_, u)| *u != 0.0)
        .filter_map(|(a, u)| {
            a.get(layer, proj).map(|delta| Step {
                source: &a.source,
                delta,
                scale: *u,
            })
        })
        .collect()
}

fn source_name(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "<in-memory adapter>".to_owned()
    } else {
        p.display().to_string()
    }
}

/// Checks that `step` fits a `rows` x `cols` base weight and is internally
/// consistent, so that applying it cannot fail on sizes.
fn check_step(tensor: &str, step: &Step, rows: usize, cols: usize) -> Result<()> {
    let file = source_name(step.source);
    let err = |what: String| AdapterError::tensor(&file, tensor, what);
    if !step.scale.is_finite() {
        return Err(err(format!("user scale {} is not finite", step.scale)));
    }
    let found = step.delta.shape();
    if found != (rows, cols) {
        return Err(AdapterError::Shape {
            file: file.clone(),
            tensor: tensor.to_owned(),
            found: vec![found.0, found.1],
            expected: vec![rows, cols],
        });
    }
    match step.delta {
        TensorDelta::Lora(l) => check_lora(l, rows).map_err(err),
        TensorDelta::Sparse(s) => check_sparse(s).map_err(err),
        TensorDelta::Dense(d) if !d.scale.is_finite() => {
            Err(err(format!("dense delta scale {} is not finite", d.scale)))
        }
        TensorDelta::Dense(_) => Ok(()),
    }
}

fn check_lora(l: &LoraDelta, rows: usize) -> std::result::Result<(), String> {
    if l.a.rows != l.b.cols {
        return Err(format!(
            "lora_a has rank {} but lora_b has rank {}",
            l.a.rows, l.b.cols
        ));
    }
    if !l.scale.is_finite() {
        return Err(format!("LoRA scale {} is not finite", l.scale));
    }
    if let Some(f) = &l.dora_factor {
        if f.len() != rows {
            return Err(format!(
                "DoRA factor has {} values, expected one per output row ({rows})",
                f.len()
            ));
        }
    }
    Ok(())
}

fn check_sparse(s: &SparseDelta) -> std::result::Result<(), String> {
    let n = s.values.len();
    if s.row_ptr.len() != s.rows + 1 || s.col_idx.len() != n {
        return Err(format!(
            "sparse delta has {} row offsets and {} column indices for {} rows and {n} values",
            s.row_ptr.len(),
            s.col_idx.len(),
            s.rows
        ));
    }
    if s.row_ptr.first() != Some(&0)
        || s.row_ptr.windows(2).any(|w| w[0] > w[1])
        || s.row_ptr.last().map(|&e| e as usize) != Some(n)
    {
        return Err(format!(
            "sparse delta row offsets are not ascending from 0 to {n}"
        ));
    }
    if let Some(c) = s.col_idx.iter().find(|&&c| c as usize >= s.cols) {
        return Err(format!(
            "sparse delta column index {c}, expected below {}",
            s.cols
        ));
    }
    if !s.scale.is_finite() {
        return Err(format!("sparse delta scale {} is not finite", s.scale));
    }
    Ok(())
}

/// Whether `steps` can be undone by arithmetic on the merged values.
fn reversible(steps: &[Step]) -> bool {
    steps.iter().all(|st| match st.delta {
        TensorDelta::Lora(LoraDelta {
            dora_factor: Some(f),
            ..
        }) => f.iter().all(|&fv| {
            let g = 1.0 - st.scale + st.scale * fv;
            g.is_finite() && g.abs() >= MIN_DORA_GAIN
        }),
        _ => true,
    })
}

/// `w` (`rows` x `cols`, row-major) with every step applied in order, or undone in
/// reverse order when `inverse`. Steps must have passed [`check_step`].
fn apply_steps(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    steps: &[Step],
    inverse: bool,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let mut run = |st: &Step| match st.delta {
        TensorDelta::Lora(l) => apply_lora(w, cols, l, st.scale, inverse),
        TensorDelta::Sparse(s) => {
            apply_sparse(w, cols, s, st.scale, inverse);
            Ok(())
        }
        TensorDelta::Dense(d) => apply_dense(w, d, st.scale, inverse),
    };
    if inverse {
        steps.iter().rev().try_for_each(&mut run)
    } else {
        steps.iter().try_for_each(&mut run)
    }
}

/// One LoRA/DoRA member at user scale `u`, row by row in parallel: the row of
/// `scale * B A` is built as `LoraDelta::dense` builds it, then added (or, for DoRA,
/// mixed as the forward pass does).
fn apply_lora(w: &mut [f32], cols: usize, l: &LoraDelta, u: f32, inverse: bool) -> Result<()> {
    let a = l.a.to_f32().map_err(|e| AdapterError::quant("lora_a", e))?;
    let b = l.b.to_f32().map_err(|e| AdapterError::quant("lora_b", e))?;
    let r = l.rank();
    let dora = l.dora_factor.as_deref();
    w.par_chunks_mut(cols).enumerate().for_each_init(
        || vec![0f32; cols],
        |d, (o, row)| {
            d.fill(0.0);
            let b_row = b.get(o * r..(o + 1) * r).unwrap_or(&[]);
            for (&bv, a_row) in b_row.iter().zip(a.chunks_exact(cols)) {
                let bj = bv * l.scale;
                if bj != 0.0 {
                    for (dv, &av) in d.iter_mut().zip(a_row) {
                        *dv += bj * av;
                    }
                }
            }
            match dora.and_then(|f| f.get(o)) {
                None => {
                    let s = if inverse { -u } else { u };
                    for (wv, &dv) in row.iter_mut().zip(d.iter()) {
                        *wv += s * dv;
                    }
                }
                Some(&f) if !inverse => {
                    for (wv, &dv) in row.iter_mut().zip(d.iter()) {
                        *wv += u * (f * (*wv + dv) - *wv);
                    }
                }
                Some(&f) => {
                    // W' = (1 - u + u f) W + u f D, solved for W.
                    let g = 1.0 - u + u * f;
                    for (wv, &dv) in row.iter_mut().zip(d.iter()) {
                        *wv = (*wv - u * f * dv) / g;
                    }
                }
            }
        },
    );
    Ok(())
}

fn apply_sparse(w: &mut [f32], cols: usize, s: &SparseDelta, u: f32, inverse: bool) {
    let k = if inverse { -(s.scale * u) } else { s.scale * u };
    w.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let (Some(&lo), Some(&hi)) = (s.row_ptr.get(r), s.row_ptr.get(r + 1)) else {
            return;
        };
        let (lo, hi) = (lo as usize, hi as usize);
        let idx = s.col_idx.get(lo..hi).unwrap_or(&[]);
        let val = s.values.get(lo..hi).unwrap_or(&[]);
        for (&c, &v) in idx.iter().zip(val) {
            if let Some(wv) = row.get_mut(c as usize) {
                *wv += k * v;
            }
        }
    });
}

fn apply_dense(w: &mut [f32], d: &DenseDelta, u: f32, inverse: bool) -> Result<()> {
    let k = if inverse { -(d.scale * u) } else { d.scale * u };
    let dv =
        d.w.to_f32()
            .map_err(|e| AdapterError::quant("dense delta", e))?;
    w.par_iter_mut().zip(dv.par_iter()).for_each(|(wv, &x)| {
        *wv += k * x;
    });
    Ok(())
}

fn is_float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// `w` with `steps` applied (or undone), stored back in `w`'s own type.
fn transformed_weight(w: &Weight, tensor: &str, steps: &[Step], inverse: bool) -> Result<Weight> {
    let ctx = |e| AdapterError::quant(tensor, e);
    let mut values = w.to_f32().map_err(ctx)?;
    apply_steps(&mut values, w.rows, w.cols, steps, inverse)?;
    let bytes = quantize_matrix(w.ty, &values, w.cols).map_err(ctx)?;
    Weight::owned(w.ty, w.rows, w.cols, bytes).map_err(ctx)
}

/// What [`merge_into`] changed, to undo it with [`unmerge`].
#[derive(Debug)]
pub struct MergeRecord {
    stack: AdapterStack,
    tensors: Vec<MergedWeight>,
}

#[derive(Debug)]
struct MergedWeight {
    layer: usize,
    proj: Proj,
    /// The weight merging put into the model (shares its buffer, so the buffer's
    /// address identifies it while the record lives).
    merged: Weight,
    /// The base weight, kept when it costs no memory (a file map) or when the merge
    /// cannot be undone arithmetically; otherwise unmerging recomputes it.
    original: Option<Weight>,
}

impl MergeRecord {
    /// The stack that was merged.
    pub fn stack(&self) -> &AdapterStack {
        &self.stack
    }

    /// (layer, projection) of every merged weight.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, Proj)> + '_ {
        self.tensors.iter().map(|t| (t.layer, t.proj))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// How many weights unmerging restores from a kept copy (bit-exact) rather than
    /// recomputes (`W' - ΔW`, exact up to float rounding).
    pub fn kept_originals(&self) -> usize {
        self.tensors.iter().filter(|t| t.original.is_some()).count()
    }

    /// Checks that `model` still holds exactly the weights this record merged into it
    /// (same model, not changed or unmerged since). [`unmerge`] does this first; call it
    /// yourself to keep the record when it fails.
    pub fn check(&self, model: &Model) -> Result<()> {
        for t in &self.tensors {
            let name = t.proj.gguf_weight(t.layer);
            let current = model.layers.get(t.layer).map(|l| l.proj(t.proj));
            let same = current.is_some_and(|w| {
                w.ty == t.merged.ty
                    && w.rows == t.merged.rows
                    && w.cols == t.merged.cols
                    && std::ptr::eq(w.data().as_ptr(), t.merged.data().as_ptr())
            });
            if !same {
                return Err(AdapterError::Merge(format!(
                    "tensor {name} is not the weight this merge produced: a different model, or \
                     the weight was replaced or unmerged since"
                )));
            }
        }
        Ok(())
    }
}

/// Merges `stack` into the float weights of `model`: `W <- W + Σ u ΔW` (DoRA members
/// as in the forward pass), each result stored in the weight's own type as a new owned
/// buffer. All weights are validated and computed before any is replaced, so on error
/// the model is unchanged; a quantized base weight gives
/// [`AdapterError::QuantizedBase`].
///
/// With F16/BF16 weights the merged values are rounded to that type, so the merged
/// model differs from the unmerged adapter by that rounding.
pub fn merge_into(model: &mut Model, stack: &AdapterStack) -> Result<MergeRecord> {
    let n_layer = model.layers.len();
    for (a, _) in &stack.layers {
        if a.n_layer() != n_layer {
            return Err(AdapterError::Merge(format!(
                "{} was built for {} layers, the model has {n_layer}",
                source_name(&a.source),
                a.n_layer()
            )));
        }
    }
    // Validate everything first: nothing is modified unless all of it can be merged.
    let mut plan = Vec::new();
    for (li, layer) in model.layers.iter().enumerate() {
        for p in Proj::ALL {
            let st = steps(stack, li, p);
            if st.is_empty() {
                continue;
            }
            let w = layer.proj(p);
            let name = p.gguf_weight(li);
            if !is_float(w.ty) {
                return Err(AdapterError::QuantizedBase {
                    tensor: name,
                    ty: w.ty,
                });
            }
            for s in &st {
                check_step(&name, s, w.rows, w.cols)?;
            }
            if w.rows > 0 && w.cols > 0 {
                plan.push((li, p));
            }
        }
    }
    let mut tensors = Vec::with_capacity(plan.len());
    for (li, p) in plan {
        let Some(w) = model.layers.get(li).map(|l| l.proj(p)) else {
            continue;
        };
        let name = p.gguf_weight(li);
        let st = steps(stack, li, p);
        let merged = transformed_weight(w, &name, &st, false)?;
        let keep = w.is_mapped() || !reversible(&st);
        tracing::debug!(tensor = %name, ty = %w.ty, kept = keep, "merged");
        tensors.push(MergedWeight {
            layer: li,
            proj: p,
            merged,
            original: keep.then(|| w.clone()),
        });
    }
    for t in &tensors {
        if let Some(l) = model.layers.get_mut(t.layer) {
            *l.proj_mut(t.proj) = t.merged.clone();
        }
    }
    tracing::info!(
        tensors = tensors.len(),
        adapters = stack.layers.len(),
        "merged adapters into the model in memory"
    );
    Ok(MergeRecord {
        stack: stack.clone(),
        tensors,
    })
}

/// Undoes [`merge_into`]: weights that were file maps (or that a DoRA member made
/// irreversible) get their original back bit for bit; the others are recomputed as
/// `W' - ΔW` in f32 and stored in their type. For F32 that is the original within
/// float rounding (about 1e-7 of the tensor's largest value). For F16/BF16 the merged
/// value was rounded to that type, so an element can be off by up to half a unit in
/// the last place of the merged value plus half of its own (measured on the suite's
/// qwen2 F16 model with a LoRA of 0.3x the weights' size: 90% of values bit-exact,
/// largest error 4.5e-4 of the tensor's largest value). Fails, leaving the model
/// unchanged, when `model` is not in the state the merge left it in (see
/// [`MergeRecord::check`]).
pub fn unmerge(model: &mut Model, record: MergeRecord) -> Result<()> {
    record.check(model)?;
    let mut restored = Vec::with_capacity(record.tensors.len());
    for t in &record.tensors {
        let w = match &t.original {
            Some(o) => o.clone(),
            None => {
                let name = t.proj.gguf_weight(t.layer);
                let st = steps(&record.stack, t.layer, t.proj);
                transformed_weight(&t.merged, &name, &st, true)?
            }
        };
        restored.push(w);
    }
    for (t, w) in record.tensors.iter().zip(restored) {
        if let Some(l) = model.layers.get_mut(t.layer) {
            *l.proj_mut(t.proj) = w;
        }
    }
    tracing::info!(tensors = record.tensors.len(), "unmerged adapters");
    Ok(())
}

/// Tensor types of the merged file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutType {
    /// Each adapted tensor keeps the base's type.
    #[default]
    Keep,
    /// Adapted tensors get this type (tensors whose rows it cannot hold keep theirs).
    Type(GgmlType),
}

impl From<GgmlType> for OutType {
    fn from(ty: GgmlType) -> Self {
        OutType::Type(ty)
    }
}

impl From<FileType> for OutType {
    /// The recipe's main type, for every adapted tensor.
    fn from(f: FileType) -> Self {
        OutType::Type(f.default_type())
    }
}

/// One adapted tensor of a merged file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedTensor {
    pub name: String,
    /// Type in the base.
    pub from: GgmlType,
    /// Type written.
    pub to: GgmlType,
    /// The requested type could not hold a row of this tensor (row length not a
    /// multiple of its block), so it kept `from`.
    pub fell_back: bool,
}

/// What [`merge_to_gguf`] wrote.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Adapted tensors, in file order.
    pub merged: Vec<MergedTensor>,
    /// Tensors copied unchanged.
    pub copied: usize,
    pub bytes_written: u64,
    /// The new `general.file_type`, when types changed.
    pub file_type: Option<FileType>,
}

impl MergeReport {
    /// Tensors that kept their type because the requested one could not hold a row.
    pub fn fallbacks(&self) -> impl Iterator<Item = &MergedTensor> {
        self.merged.iter().filter(|t| t.fell_back)
    }
}

/// One tensor of the output, in file order.
struct Planned<'f, 's> {
    info: &'f TensorInfo,
    adapted: Option<Adapted<'s>>,
}

struct Adapted<'s> {
    steps: Vec<Step<'s>>,
    rows: usize,
    cols: usize,
    to: GgmlType,
    fell_back: bool,
    n_bytes: usize,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Merges `stack` into the GGUF model `base` and writes the result to `out`: all
/// metadata and every tensor no adapter touches are copied byte for byte; each adapted
/// projection is dequantized, merged as [`merge_into`] merges, and quantized to
/// `out_type`. `general.file_type` changes only when tensor types do, and
/// [`KEY_MERGED_ADAPTERS`] lists the merged adapters. The file is written beside `out`
/// and renamed into place when complete, so a failure leaves no partial model.
pub fn merge_to_gguf(
    base: &Path,
    stack: &AdapterStack,
    out_type: OutType,
    out: &Path,
) -> Result<MergeReport> {
    let base_name = base.display().to_string();
    let tmp = partial_path(out);
    if same_file(base, out) || same_file(base, &tmp) {
        return Err(AdapterError::Merge(format!(
            "output {} would overwrite the base model {base_name}; write to a new file",
            out.display()
        )));
    }
    if let OutType::Type(t) = out_type {
        if !kernels::supports(t) {
            return Err(AdapterError::Merge(format!(
                "output type {t} has no compute kernel, so the merged model could not be run"
            )));
        }
    }
    let file = GgufFile::open(base)?;
    let vocab_fallback = file
        .tensor("token_embd.weight")
        .map_or(0, |t| t.n_rows() as usize);
    let config = ModelConfig::from_gguf(&file, vocab_fallback).map_err(ModelError::from)?;
    let plan = plan_merge(&file, &base_name, &config, stack, out_type)?;

    let changed = plan
        .iter()
        .any(|p| p.adapted.as_ref().is_some_and(|a| a.to != p.info.ty));
    // The first recipe with that main type (Q4_K -> Q4_K_S): untouched tensors keep
    // theirs, so the file is "mostly" that type, as general.file_type means.
    let file_type = match out_type {
        OutType::Type(t) if changed => FileType::ALL
            .iter()
            .copied()
            .find(|f| f.default_type() == t),
        _ => None,
    };

    // Placeholders of the right size let the writer lay out the header; their bytes
    // are never written (see `Prefix`), and the zeroed allocation is never touched.
    let max_adapted = plan
        .iter()
        .filter_map(|p| p.adapted.as_ref().map(|a| a.n_bytes))
        .max()
        .unwrap_or(0);
    let zeros = vec![0u8; max_adapted];
    let writer = header_writer(&file, stack, &plan, file_type, &zeros)?;

    tracing::info!(
        base = %base_name,
        out = %out.display(),
        adapted = plan.iter().filter(|p| p.adapted.is_some()).count(),
        tensors = plan.len(),
        "merging adapters into a new GGUF"
    );
    let written = write_merged(&file, &writer, &plan, &tmp).and_then(|n| {
        std::fs::rename(&tmp, out).map_err(|source| AdapterError::Io {
            file: out.display().to_string(),
            source,
        })?;
        Ok(n)
    });
    let bytes_written = match written {
        Ok(n) => n,
        Err(e) => {
            // Best effort: the partial file is useless either way.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };

    let mut report = MergeReport {
        bytes_written,
        file_type,
        ..MergeReport::default()
    };
    for p in &plan {
        match &p.adapted {
            Some(a) => report.merged.push(MergedTensor {
                name: p.info.name.clone(),
                from: p.info.ty,
                to: a.to,
                fell_back: a.fell_back,
            }),
            None => report.copied += 1,
        }
    }
    tracing::info!(
        out = %out.display(),
        merged = report.merged.len(),
        copied = report.copied,
        bytes = bytes_written,
        "merged model written"
    );
    Ok(report)
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Which tensors each adapter changes and into what type, all validated against the
/// base before anything is written.
fn plan_merge<'f, 's>(
    file: &'f GgufFile,
    base_name: &str,
    config: &ModelConfig,
    stack: &'s AdapterStack,
    out_type: OutType,
) -> Result<Vec<Planned<'f, 's>>> {
    for (a, u) in &stack.layers {
        if a.n_layer() != config.n_layer {
            return Err(AdapterError::Merge(format!(
                "{} was built for {} layers, {base_name} has {}",
                source_name(&a.source),
                a.n_layer(),
                config.n_layer
            )));
        }
        if *u == 0.0 {
            continue;
        }
        for (layer, proj, _) in a.iter() {
            let name = proj.gguf_weight(layer);
            if file.tensor(&name).is_none() {
                return Err(AdapterError::tensor(
                    base_name,
                    &name,
                    format!(
                        "{} has a delta for it but the base has no such tensor",
                        source_name(&a.source)
                    ),
                ));
            }
        }
    }
    let mut plan = Vec::with_capacity(file.tensors().len());
    for info in file.tensors() {
        let st = Proj::parse_gguf_weight(&info.name)
            .map(|(layer, proj)| steps(stack, layer, proj))
            .unwrap_or_default();
        if st.is_empty() {
            plan.push(Planned {
                info,
                adapted: None,
            });
            continue;
        }
        let bad = |what: String| AdapterError::tensor(base_name, &info.name, what);
        let (cols, rows) = match info.dims.as_slice() {
            &[c, r] => (
                usize::try_from(c).map_err(|_| bad(format!("row length {c} too large")))?,
                usize::try_from(r).map_err(|_| bad(format!("{r} rows too many")))?,
            ),
            d => return Err(bad(format!("dims {d:?}, expected a matrix"))),
        };
        for s in &st {
            check_step(&info.name, s, rows, cols)?;
        }
        let (to, fell_back) = match out_type {
            OutType::Keep => (info.ty, false),
            OutType::Type(t) if cols % t.block_size() == 0 => (t, false),
            OutType::Type(t) => {
                tracing::warn!(
                    tensor = %info.name,
                    row = cols,
                    block = t.block_size(),
                    kept = %info.ty,
                    "rows are not a multiple of {t}'s block; keeping the base type"
                );
                (info.ty, true)
            }
        };
        let n_bytes = to
            .row_size(cols)
            .ok()
            .and_then(|rb| rb.checked_mul(rows))
            .ok_or_else(|| bad(format!("{rows} x {cols} of {to} overflows")))?;
        plan.push(Planned {
            info,
            adapted: Some(Adapted {
                steps: st,
                rows,
                cols,
                to,
                fell_back,
                n_bytes,
            }),
        });
    }
    Ok(plan)
}

/// The base's metadata (with `general.file_type` and [`KEY_MERGED_ADAPTERS`] updated)
/// and the output's tensor infos; adapted tensors borrow zeros of their output size.
fn header_writer<'a>(
    file: &'a GgufFile,
    stack: &AdapterStack,
    plan: &[Planned],
    file_type: Option<FileType>,
    zeros: &'a [u8],
) -> Result<GgufWriter<'a>> {
    let merged_names: Vec<String> = stack
        .layers
        .iter()
        .map(|(a, u)| format!("{}@{u}", source_name(&a.source)))
        .collect();
    let mut w = GgufWriter::new();
    w.set_version(file.version())?;
    let (mut has_ftype, mut has_merged) = (false, false);
    for (k, v) in file.metadata() {
        let v = match k.as_str() {
            "general.file_type" => {
                has_ftype = true;
                match file_type {
                    Some(f) => GgufValue::U32(f.id()),
                    None => v.clone(),
                }
            }
            KEY_MERGED_ADAPTERS => {
                has_merged = true;
                let mut list = v
                    .as_array()
                    .and_then(GgufArray::as_strings)
                    .map(<[String]>::to_vec)
                    .unwrap_or_default();
                list.extend(merged_names.iter().cloned());
                GgufValue::Array(GgufArray::String(list))
            }
            _ => v.clone(),
        };
        w.add_kv(k.clone(), v)?;
    }
    if let (Some(f), false) = (file_type, has_ftype) {
        w.add_kv("general.file_type", GgufValue::U32(f.id()))?;
    }
    if !has_merged {
        w.add_kv(
            KEY_MERGED_ADAPTERS,
            GgufValue::Array(GgufArray::String(merged_names)),
        )?;
    }
    for p in plan {
        let (ty, data): (GgmlType, &[u8]) = match &p.adapted {
            None => (p.info.ty, file.tensor_data(p.info)),
            Some(a) => (a.to, zeros.get(..a.n_bytes).unwrap_or(&[])),
        };
        w.add_tensor(p.info.name.clone(), ty, &p.info.dims, data)?;
    }
    Ok(w)
}

/// Passes the first `left` bytes through and drops the rest: the header of
/// `GgufWriter::write_to` without its tensor data, which is streamed separately.
struct Prefix<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for Prefix<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = usize::try_from(self.left).map_or(buf.len(), |l| l.min(buf.len()));
        if n > 0 {
            self.inner.write_all(buf.get(..n).unwrap_or(buf))?;
            self.left -= n as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn padding(len: u64, alignment: u64) -> u64 {
    (alignment - len % alignment) % alignment
}

fn write_zeros<W: Write>(w: &mut W, mut n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(ZEROS.get(..k).unwrap_or(&[]))?;
        n -= k as u64;
    }
    Ok(())
}

/// Writes the header, then each tensor's data in order (adapted ones merged one at a
/// time), then checks the file reads back with the planned layout.
fn write_merged(file: &GgufFile, writer: &GgufWriter, plan: &[Planned], tmp: &Path) -> Result<u64> {
    let tmp_name = tmp.display().to_string();
    let io = |source| AdapterError::Io {
        file: tmp_name.clone(),
        source,
    };
    let alignment = writer.alignment();
    let data_len = plan.iter().try_fold(0u64, |acc, p| {
        let n = p.adapted.as_ref().map_or(p.info.n_bytes, |a| a.n_bytes) as u64;
        acc.checked_add(n + padding(n, alignment))
    });
    let total = writer.file_size()?;
    let meta_len = data_len
        .and_then(|d| total.checked_sub(d))
        .ok_or_else(|| AdapterError::invalid(&tmp_name, "output size overflows"))?;

    let mut w = BufWriter::with_capacity(1 << 20, File::create(tmp).map_err(io)?);
    writer.write_to(Prefix {
        inner: &mut w,
        left: meta_len,
    })?;
    let mut offsets = Vec::with_capacity(plan.len());
    let mut offset = 0u64;
    for (i, p) in plan.iter().enumerate() {
        let data: Cow<[u8]> = match &p.adapted {
            None => Cow::Borrowed(file.tensor_data(p.info)),
            Some(a) => {
                let ctx = |e| AdapterError::quant(p.info.name.as_str(), e);
                let mut values =
                    dequantize_matrix(p.info.ty, file.tensor_data(p.info), a.cols).map_err(ctx)?;
                apply_steps(&mut values, a.rows, a.cols, &a.steps, false)?;
                let bytes = quantize_matrix(a.to, &values, a.cols).map_err(ctx)?;
                tracing::info!(
                    tensor = %p.info.name,
                    from = %p.info.ty,
                    to = %a.to,
                    index = i + 1,
                    count = plan.len(),
                    "merged tensor"
                );
                Cow::Owned(bytes)
            }
        };
        let n = data.len() as u64;
        w.write_all(&data).map_err(io)?;
        write_zeros(&mut w, padding(n, alignment)).map_err(io)?;
        offsets.push(offset);
        offset += n + padding(n, alignment);
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    drop(f);

    // The header came from the writer and the data from this loop: make sure they
    // agree before the file replaces anything.
    let check = GgufFile::open(tmp)?;
    let layout_ok = check.tensors().len() == plan.len()
        && check
            .tensors()
            .iter()
            .zip(plan)
            .zip(&offsets)
            .all(|((t, p), &o)| {
                let n = p.adapted.as_ref().map_or(p.info.n_bytes, |a| a.n_bytes);
                t.name == p.info.name && t.offset == o && t.n_bytes == n
            });
    if !layout_ok || meta_len + offset != total {
        return Err(AdapterError::invalid(
            &tmp_name,
            "the written tensor layout does not match the header",
        ));
    }
    Ok(total)
}
