//! Merging adapters into base weights: in memory (float bases, undoable) and into a new
//! GGUF file, checked against the same adapters applied unmerged in the forward pass.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use graft_adapters::delta::{f32_weight, projection_shape};
use graft_adapters::merge::{MergedTensor, KEY_MERGED_ADAPTERS};
use graft_adapters::{
    merge_into, merge_to_gguf, unmerge, Adapter, AdapterError, AdapterFormat, AdapterStack,
    LoraDelta, OutType, SparseDelta, TensorDelta,
};
use graft_quant::{quantize_matrix, GgmlType};
use graft_runtime::gguf::{GgufFile, GgufValue, GgufWriter};
use graft_runtime::kv_cache::KvType;
use graft_runtime::model::{
    sequence_batch, BatchDeltas, LinearDelta, Model, Proj, Scratch, Weight,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOKENS: [u32; 12] = [
    1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203,
];

fn model_path(name: &str) -> PathBuf {
    common::conformance().join("models").join(name)
}

fn load(name: &str) -> Model {
    Model::load_gguf(&model_path(name)).unwrap()
}

/// Tokens inside the suite's 512-piece vocabulary.
fn tokens(model: &Model) -> Vec<u32> {
    TOKENS
        .iter()
        .map(|&t| t % model.config.n_vocab as u32)
        .collect()
}

/// Logits at every position of `tokens` (F32 KV cache: an F16 cache would round
/// K/V and turn float noise between two equal models into F16 steps).
fn logits(model: &Model, tokens: &[u32], delta: Option<&dyn LinearDelta>) -> Vec<f32> {
    let mut cache = model.new_cache(tokens.len() + 1, KvType::F32);
    let batch = sequence_batch(tokens, 0, 0, true);
    let deltas = delta.map(|d| BatchDeltas::uniform(d, batch.len()));
    model
        .forward_adapted(&batch, &mut cache, &mut Scratch::default(), deltas.as_ref())
        .unwrap()
        .data
}

/// Projections `stack` changes.
fn touched(model: &Model, stack: &AdapterStack) -> usize {
    (0..model.layers.len())
        .map(|li| Proj::ALL.iter().filter(|&&p| stack.touches(li, p)).count())
        .sum()
}

/// max |a - b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max_b = b.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let max_d = a
        .iter()
        .zip(b)
        .fold(0f32, |m, (&x, &y)| m.max((x - y).abs()));
    max_d / max_b
}

fn uniform(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-amp..amp)).collect()
}

/// Root mean square of a base weight, to size deltas relative to it.
fn rms(w: &Weight) -> f32 {
    let v = w.to_f32().unwrap();
    (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
}

/// A random LoRA (rank `rank`) on all seven projections of every layer, with
/// `scale * B A` about `strength` times the size of the base weights; with `dora`,
/// positive per-row DoRA factors.
fn random_adapter(model: &Model, seed: u64, rank: usize, strength: f32, dora: bool) -> Adapter {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = &model.config;
    let mut adapter = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    for (li, layer) in model.layers.iter().enumerate() {
        for p in Proj::ALL {
            let (out, inp) = projection_shape(c, p);
            // Entries of B A have variance rank * var(a) * var(b) = rank * amp^4 / 9.
            let target = strength * rms(layer.proj(p));
            let amp = (9.0 * target * target / rank as f32).sqrt().sqrt();
            let a = f32_weight(rank, inp, &uniform(&mut rng, rank * inp, amp)).unwrap();
            let b = f32_weight(out, rank, &uniform(&mut rng, out * rank, amp)).unwrap();
            let dora_factor = dora.then(|| (0..out).map(|_| rng.gen_range(0.6..1.4)).collect());
            let delta = TensorDelta::Lora(LoraDelta {
                a,
                b,
                scale: 0.5,
                dora_factor,
            });
            adapter.insert(c, li, p, delta).unwrap();
        }
    }
    adapter
}

/// Every projection weight of the model as f32.
fn projections(model: &Model) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (li, l) in model.layers.iter().enumerate() {
        for p in Proj::ALL {
            out.push((p.gguf_weight(li), l.proj(p).to_f32().unwrap()));
        }
    }
    out
}

/// Replaces every projection weight by an owned copy (as an HF or llama2.c load
/// gives), so that unmerging has to recompute instead of restoring the file map.
fn make_owned(model: &mut Model) {
    for l in &mut model.layers {
        for p in Proj::ALL {
            let w = l.proj_mut(p);
            *w = Weight::owned(w.ty, w.rows, w.cols, w.data().to_vec()).unwrap();
        }
    }
}

/// Max over projections of (max |restored - original| / max |original|).
fn max_weight_rel(model: &Model, original: &[(String, Vec<f32>)]) -> f32 {
    projections(model)
        .iter()
        .zip(original)
        .map(|((n, a), (m, b))| {
            assert_eq!(n, m);
            rel(a, b)
        })
        .fold(0f32, f32::max)
}

/// Merge in memory, compare logits with the unmerged adapter, unmerge, compare weights.
/// Returns (merged vs unmerged logits, base vs unmerged logits, unmerge weight error).
fn merge_roundtrip(model: &mut Model, stack: &AdapterStack, owned: bool) -> (f32, f32, f32) {
    if owned {
        make_owned(model);
    }
    let toks = tokens(model);
    let base = logits(model, &toks, None);
    let unmerged = logits(model, &toks, Some(stack));
    let original = projections(model);

    let record = merge_into(model, stack).unwrap();
    assert_eq!(record.len(), touched(model, stack));
    if owned {
        assert_eq!(record.kept_originals(), 0, "owned weights are recomputed");
    } else {
        assert_eq!(
            record.kept_originals(),
            record.len(),
            "mapped weights are kept"
        );
    }
    for (li, l) in model.layers.iter().enumerate() {
        for p in Proj::ALL {
            if stack.touches(li, p) {
                assert!(!l.proj(p).is_mapped(), "merged weights are owned buffers");
            }
        }
    }
    let merged = logits(model, &toks, None);
    unmerge(model, record).unwrap();
    let restored = logits(model, &toks, None);
    assert_eq!(restored.len(), base.len());
    (
        rel(&merged, &unmerged),
        rel(&base, &unmerged),
        max_weight_rel(model, &original),
    )
}

fn check_f32_merge(name: &str, seed: u64) {
    for owned in [false, true] {
        let mut model = load(name);
        let adapter = Arc::new(random_adapter(&model, seed, 8, 0.3, false));
        let stack = AdapterStack::single(adapter, 1.0);
        let (merged, effect, unmerge_err) = merge_roundtrip(&mut model, &stack, owned);
        eprintln!(
            "{name} owned={owned}: merged vs unmerged {merged:.2e}, adapter effect {effect:.2e}, unmerge {unmerge_err:.2e}"
        );
        assert!(
            effect > 1e-2,
            "the adapter changes the logits ({effect:.2e})"
        );
        assert!(merged <= 1e-5, "merged vs unmerged logits: {merged:.2e}");
        if owned {
            assert!(unmerge_err <= 1e-6, "unmerge: {unmerge_err:.2e}");
        } else {
            assert_eq!(unmerge_err, 0.0, "mapped weights come back bit for bit");
        }
    }
}

#[test]
fn merged_f32_llama_equals_unmerged() {
    check_f32_merge("llama-gqa-F32.gguf", 1);
}

#[test]
fn merged_f32_qwen2_equals_unmerged() {
    check_f32_merge("qwen2-F32.gguf", 2);
}

#[test]
fn merged_f32_restored_weights_are_the_original_buffers() {
    let mut model = load("llama-gqa-F32.gguf");
    let before: Vec<*const u8> = model
        .layers
        .iter()
        .flat_map(|l| Proj::ALL.map(|p| l.proj(p).data().as_ptr()))
        .collect();
    let stack = AdapterStack::single(Arc::new(random_adapter(&model, 3, 4, 0.3, false)), 1.0);
    let record = merge_into(&mut model, &stack).unwrap();
    unmerge(&mut model, record).unwrap();
    for (l, chunk) in model.layers.iter().zip(before.chunks(Proj::ALL.len())) {
        for (p, &ptr) in Proj::ALL.iter().zip(chunk) {
            assert!(l.proj(*p).is_mapped());
            assert_eq!(l.proj(*p).data().as_ptr(), ptr);
        }
    }
}

/// Half-precision bases: merged weights are rounded to the base type, so merged logits
/// match the unmerged adapter only to that type's accuracy; arithmetic unmerge of
/// owned weights lands within about one rounding step of the original (measured and
/// bounded here; mapped weights come back exactly).
fn check_half_merge(name: &str, logit_tol: f32, ulp: f32) {
    for owned in [false, true] {
        let mut model = load(name);
        let adapter = Arc::new(random_adapter(&model, 4, 8, 0.3, false));
        let stack = AdapterStack::single(adapter, 1.0);
        let (merged, effect, unmerge_err) = merge_roundtrip(&mut model, &stack, owned);
        eprintln!(
            "{name} owned={owned}: merged vs unmerged {merged:.2e}, adapter effect {effect:.2e}, unmerge {unmerge_err:.2e}"
        );
        assert!(effect > 1e-2);
        assert!(merged <= logit_tol, "{name}: {merged:.2e}");
        if owned {
            // One ulp of the largest element, relative to it.
            assert!(unmerge_err <= ulp, "unmerge: {unmerge_err:.2e}");
        } else {
            assert_eq!(unmerge_err, 0.0);
        }
    }
}

#[test]
fn merged_f16_within_f16_rounding() {
    check_half_merge("qwen2-F16.gguf", common::tolerance("F16").0, 1.0 / 1024.0);
}

#[test]
fn merged_bf16_within_bf16_rounding() {
    check_half_merge(
        "llama-gqa-BF16.gguf",
        common::tolerance("BF16").0,
        1.0 / 128.0,
    );
}

/// F16 bits as a position on the number line (consecutive values differ by 1, both
/// zeros map to 0).
fn f16_ordinal(bits: u16) -> i32 {
    let mag = i32::from(bits & 0x7fff);
    if bits & 0x8000 != 0 {
        -mag
    } else {
        mag
    }
}

#[test]
fn merged_f16_unmerge_ulps() {
    let mut model = load("qwen2-F16.gguf");
    make_owned(&mut model);
    let original = projections(&model);
    let stack = AdapterStack::single(Arc::new(random_adapter(&model, 5, 8, 0.3, false)), 1.0);
    let record = merge_into(&mut model, &stack).unwrap();
    let merged = projections(&model);
    unmerge(&mut model, record).unwrap();
    let restored = projections(&model);
    let (mut total, mut exact, mut max_ulp) = (0usize, 0usize, 0i32);
    for ((r, o), m) in restored.iter().zip(&original).zip(&merged) {
        for ((&r, &o), &m) in r.1.iter().zip(&o.1).zip(&m.1) {
            total += 1;
            exact += usize::from(r.to_bits() == o.to_bits());
            let (rb, ob) = (
                half::f16::from_f32(r).to_bits(),
                half::f16::from_f32(o).to_bits(),
            );
            max_ulp = max_ulp.max((f16_ordinal(rb) - f16_ordinal(ob)).abs());
            // Unmerging starts from the F16-rounded merged value: the error is that
            // rounding (half an ulp of |m|) plus the final rounding (half an ulp of
            // |o|), F16 ulps being at most 2^-10 of the value (2^-24 when subnormal).
            let bound = (m.abs() + o.abs()) / 2048.0 + 2f32.powi(-24);
            assert!(
                (r - o).abs() <= bound * 1.0001,
                "restored {r}, original {o}, merged {m}"
            );
        }
    }
    let frac = exact as f64 / total as f64;
    eprintln!("F16 unmerge: {frac:.4} of values bit-exact, max {max_ulp} ulp of the original");
    assert!(frac > 0.5, "most values come back exactly ({frac:.4})");
}

#[test]
fn merged_dora_equals_unmerged() {
    for (name, u) in [("llama-gqa-F32.gguf", 1.0), ("qwen2-F32.gguf", 0.7)] {
        for owned in [false, true] {
            let mut model = load(name);
            let adapter = Arc::new(random_adapter(&model, 6, 8, 0.3, true));
            let stack = AdapterStack::single(adapter, u);
            let (merged, effect, unmerge_err) = merge_roundtrip(&mut model, &stack, owned);
            eprintln!(
                "DoRA {name} u={u} owned={owned}: merged vs unmerged {merged:.2e}, effect {effect:.2e}, unmerge {unmerge_err:.2e}"
            );
            assert!(effect > 1e-2);
            assert!(merged <= 1e-5, "merged vs unmerged: {merged:.2e}");
            assert!(unmerge_err <= 1e-6, "unmerge: {unmerge_err:.2e}");
        }
    }
}

/// A DoRA member whose row gain `1 - u + u f` is zero cannot be undone by arithmetic:
/// the record keeps the original instead.
#[test]
fn irreversible_dora_keeps_the_original() {
    let mut model = load("llama-gqa-F32.gguf");
    make_owned(&mut model);
    let original = projections(&model);
    let mut adapter = random_adapter(&model, 7, 4, 0.3, false);
    let c = model.config.clone();
    let (out, inp) = projection_shape(&c, Proj::V);
    let mut rng = StdRng::seed_from_u64(8);
    let delta = TensorDelta::Lora(LoraDelta {
        a: f32_weight(4, inp, &uniform(&mut rng, 4 * inp, 0.1)).unwrap(),
        b: f32_weight(out, 4, &uniform(&mut rng, out * 4, 0.1)).unwrap(),
        scale: 1.0,
        // u = 2: gain 1 - 2 + 2 * 0.5 = 0 on every row.
        dora_factor: Some(vec![0.5; out]),
    });
    adapter.insert(&c, 1, Proj::V, delta).unwrap();
    let stack = AdapterStack::single(Arc::new(adapter), 2.0);
    let record = merge_into(&mut model, &stack).unwrap();
    assert_eq!(record.kept_originals(), 1);
    unmerge(&mut model, record).unwrap();
    assert!(max_weight_rel(&model, &original) <= 1e-6);
}

#[test]
fn stack_merges_as_sum() {
    let mut model = load("llama-gqa-F32.gguf");
    let a = Arc::new(random_adapter(&model, 9, 8, 0.3, false));
    let b = Arc::new(random_adapter(&model, 10, 4, 0.3, false));
    // A third member at scale 0 contributes nothing.
    let z = Arc::new(random_adapter(&model, 11, 4, 5.0, false));
    let (sa, sb) = (0.5f32, -1.25f32);
    let stack = AdapterStack::new(vec![(a.clone(), sa), (z, 0.0), (b.clone(), sb)]);
    let toks = tokens(&model);
    let unmerged = logits(&model, &toks, Some(&stack));
    let original = projections(&model);

    let record = merge_into(&mut model, &stack).unwrap();
    let merged = logits(&model, &toks, None);
    let r = rel(&merged, &unmerged);
    eprintln!("stack: merged vs unmerged {r:.2e}");
    assert!(r <= 1e-5, "{r:.2e}");
    // Each weight is the base plus the scaled sum of the dense deltas.
    for ((name, base), (li, p)) in original
        .iter()
        .zip((0..model.layers.len()).flat_map(|li| Proj::ALL.map(move |p| (li, p))))
    {
        let da = a.get(li, p).unwrap().dense().unwrap();
        let db = b.get(li, p).unwrap().dense().unwrap();
        let expected: Vec<f32> = base
            .iter()
            .zip(&da)
            .zip(&db)
            .map(|((w, x), y)| w + sa * x + sb * y)
            .collect();
        let got = model.layers[li].proj(p).to_f32().unwrap();
        let e = rel(&got, &expected);
        assert!(e <= 1e-6, "{name}: {e:.2e}");
    }
    unmerge(&mut model, record).unwrap();
    assert_eq!(max_weight_rel(&model, &original), 0.0);
}

#[test]
fn sparse_delta_merges() {
    let mut model = load("qwen2-F32.gguf");
    let c = model.config.clone();
    let mut adapter = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let mut rng = StdRng::seed_from_u64(12);
    for li in 0..c.n_layer {
        for p in [Proj::Q, Proj::Down] {
            let (out, inp) = projection_shape(&c, p);
            let amp = 2.0 * rms(model.layers[li].proj(p));
            let mut idx: Vec<u32> = (0..(out * inp) as u32)
                .filter(|i| i % 37 == li as u32)
                .collect();
            idx.dedup();
            let vals = uniform(&mut rng, idx.len(), amp);
            let d = SparseDelta::from_flat(out, inp, &idx, &vals, 0.8).unwrap();
            adapter.insert(&c, li, p, TensorDelta::Sparse(d)).unwrap();
        }
    }
    let stack = AdapterStack::single(Arc::new(adapter), 1.5);
    let (merged, effect, unmerge_err) = merge_roundtrip(&mut model, &stack, true);
    eprintln!(
        "sparse: merged vs unmerged {merged:.2e}, effect {effect:.2e}, unmerge {unmerge_err:.2e}"
    );
    assert!(effect > 1e-3);
    assert!(merged <= 1e-5);
    assert!(unmerge_err <= 1e-6);
}

#[test]
fn quantized_base_in_memory_is_refused() {
    let mut model = load("llama-gqa-Q8_0.gguf");
    let stack = AdapterStack::single(Arc::new(random_adapter(&model, 13, 4, 0.3, false)), 1.0);
    let before: Vec<Vec<u8>> = model
        .layers
        .iter()
        .flat_map(|l| Proj::ALL.map(|p| l.proj(p).data().to_vec()))
        .collect();
    let err = merge_into(&mut model, &stack).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            AdapterError::QuantizedBase {
                ty: GgmlType::Q8_0,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("graft merge") && msg.contains("float"),
        "{msg}"
    );
    let after: Vec<Vec<u8>> = model
        .layers
        .iter()
        .flat_map(|l| Proj::ALL.map(|p| l.proj(p).data().to_vec()))
        .collect();
    assert_eq!(before, after);
    assert!(model
        .layers
        .iter()
        .all(|l| Proj::ALL.iter().all(|&p| l.proj(p).is_mapped())));
}

/// One quantized weight late in the model: nothing earlier is modified either.
#[test]
fn merge_validates_every_weight_before_changing_any() {
    let mut model = load("llama-gqa-F32.gguf");
    let stack = AdapterStack::single(Arc::new(random_adapter(&model, 14, 4, 0.3, false)), 1.0);
    let last = model.layers.len() - 1;
    let w = model.layers[last].proj(Proj::Down).clone();
    let q = quantize_matrix(GgmlType::Q8_0, &w.to_f32().unwrap(), w.cols).unwrap();
    *model.layers[last].proj_mut(Proj::Down) =
        Weight::owned(GgmlType::Q8_0, w.rows, w.cols, q).unwrap();
    let before: Vec<*const u8> = model
        .layers
        .iter()
        .flat_map(|l| Proj::ALL.map(|p| l.proj(p).data().as_ptr()))
        .collect();
    let err = merge_into(&mut model, &stack).unwrap_err();
    assert!(
        err.to_string().contains(&Proj::Down.gguf_weight(last)),
        "{err}"
    );
    let after: Vec<*const u8> = model
        .layers
        .iter()
        .flat_map(|l| Proj::ALL.map(|p| l.proj(p).data().as_ptr()))
        .collect();
    assert_eq!(before, after);
}

#[test]
fn unmerge_refuses_another_model() {
    let mut a = load("llama-gqa-F32.gguf");
    let mut b = load("llama-gqa-F32.gguf");
    let stack = AdapterStack::single(Arc::new(random_adapter(&a, 15, 4, 0.3, false)), 1.0);
    let record = merge_into(&mut a, &stack).unwrap();
    let err = record.check(&b).unwrap_err();
    assert!(
        err.to_string()
            .contains("not the weight this merge produced"),
        "{err}"
    );
    let b_before = projections(&b);
    assert!(unmerge(&mut b, record).is_err());
    assert_eq!(max_weight_rel(&b, &b_before), 0.0);
    // `a` stays merged (its record is gone), and merging again stacks on top.
    let toks = tokens(&a);
    let merged = logits(&a, &toks, None);
    let record2 = merge_into(&mut a, &stack).unwrap();
    assert!(rel(&logits(&a, &toks, None), &merged) > 1e-3);
    unmerge(&mut a, record2).unwrap();
    assert!(rel(&logits(&a, &toks, None), &merged) <= 1e-5);
}

#[test]
fn adapter_for_another_depth_is_refused() {
    let mut model = load("llama-gqa-F32.gguf");
    let adapter = Adapter::new(
        AdapterFormat::Memory,
        PathBuf::new(),
        model.layers.len() + 1,
    );
    let stack = AdapterStack::single(Arc::new(adapter), 1.0);
    assert!(matches!(
        merge_into(&mut model, &stack),
        Err(AdapterError::Merge(_))
    ));
}

/// A scratch path under the target directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("merge-tests");
        std::fs::create_dir_all(&dir).unwrap();
        TempFile(dir.join(format!("{}-{name}", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn adapted_names(adapter: &Adapter) -> Vec<String> {
    adapter.iter().map(|(l, p, _)| p.gguf_weight(l)).collect()
}

/// Metadata and untouched tensors of `out` equal `base`'s, byte for byte (apart from
/// `general.file_type` when types changed and the merged-adapters key).
fn check_copied(base: &GgufFile, out: &GgufFile, adapted: &[String]) {
    let skip = |k: &str| k == KEY_MERGED_ADAPTERS || k == "general.file_type";
    let meta = |f: &GgufFile| -> Vec<(String, GgufValue)> {
        f.metadata()
            .iter()
            .filter(|(k, _)| !skip(k))
            .cloned()
            .collect()
    };
    assert_eq!(meta(base), meta(out));
    assert!(out.get(KEY_MERGED_ADAPTERS).is_some());
    assert_eq!(base.tensors().len(), out.tensors().len());
    for (t, u) in base.tensors().iter().zip(out.tensors()) {
        assert_eq!(t.name, u.name);
        assert_eq!(t.dims, u.dims);
        if !adapted.contains(&t.name) {
            assert_eq!(t.ty, u.ty, "{}", t.name);
            assert!(
                base.tensor_data(t) == out.tensor_data(u),
                "{} differs",
                t.name
            );
        }
    }
}

#[test]
fn merge_to_gguf_q8_0_keeps_types() {
    let base_path = model_path("llama-gqa-Q8_0.gguf");
    let base = load("llama-gqa-Q8_0.gguf");
    let adapter = Arc::new(random_adapter(&base, 16, 8, 0.3, false));
    let stack = AdapterStack::single(adapter.clone(), 0.8);
    let out = TempFile::new("q8_0-keep.gguf");
    let report = merge_to_gguf(&base_path, &stack, OutType::Keep, &out.0).unwrap();
    assert_eq!(report.merged.len(), adapter.len());
    assert!(report
        .merged
        .iter()
        .all(|t| t.from == GgmlType::Q8_0 && t.to == GgmlType::Q8_0 && !t.fell_back));
    assert_eq!(report.file_type, None);
    assert_eq!(
        report.bytes_written,
        std::fs::metadata(&out.0).unwrap().len()
    );

    let (bf, of) = (
        GgufFile::open(&base_path).unwrap(),
        GgufFile::open(&out.0).unwrap(),
    );
    check_copied(&bf, &of, &adapted_names(&adapter));
    assert_eq!(
        of.get_u32("general.file_type").unwrap(),
        bf.get_u32("general.file_type").unwrap()
    );
    assert_eq!(
        of.get_str_array(KEY_MERGED_ADAPTERS).unwrap(),
        ["<in-memory adapter>@0.8"]
    );

    let merged = Model::load_gguf(&out.0).unwrap();
    let toks = tokens(&base);
    let unmerged = logits(&base, &toks, Some(&stack));
    let ours = logits(&merged, &toks, None);
    let effect = rel(&logits(&base, &toks, None), &unmerged);
    let summary = common::compare_logits("Q8_0", &unmerged, &ours, base.config.n_vocab).unwrap();
    eprintln!("Q8_0 keep: {summary}, adapter effect {effect:.2e}");
    assert!(effect > 1e-2);
}

#[test]
fn merge_to_gguf_f32_to_q8_0() {
    let base_path = model_path("llama-gqa-F32.gguf");
    let base = load("llama-gqa-F32.gguf");
    let adapter = Arc::new(random_adapter(&base, 17, 8, 0.3, false));
    let stack = AdapterStack::single(adapter.clone(), 1.0);
    let out = TempFile::new("f32-to-q8_0.gguf");
    let report = merge_to_gguf(&base_path, &stack, GgmlType::Q8_0.into(), &out.0).unwrap();
    assert!(report
        .merged
        .iter()
        .all(|t| t.from == GgmlType::F32 && t.to == GgmlType::Q8_0));
    assert_eq!(report.file_type.map(|f| f.id()), Some(7));

    let (bf, of) = (
        GgufFile::open(&base_path).unwrap(),
        GgufFile::open(&out.0).unwrap(),
    );
    let names = adapted_names(&adapter);
    check_copied(&bf, &of, &names);
    assert_eq!(of.get_u32("general.file_type").unwrap(), 7);
    for n in &names {
        assert_eq!(of.tensor(n).unwrap().ty, GgmlType::Q8_0);
    }

    let merged = Model::load_gguf(&out.0).unwrap();
    let toks = tokens(&base);
    let unmerged = logits(&base, &toks, Some(&stack));
    let summary = common::compare_logits(
        "Q8_0",
        &unmerged,
        &logits(&merged, &toks, None),
        base.config.n_vocab,
    )
    .unwrap();
    eprintln!("F32 -> Q8_0: {summary}");
}

/// Keeping F32, the file holds exactly the weights the in-memory merge computes, for
/// a stack with a DoRA member too.
#[test]
fn merge_to_gguf_f32_keep_equals_in_memory_merge() {
    let base_path = model_path("qwen2-F32.gguf");
    let mut model = load("qwen2-F32.gguf");
    let a = Arc::new(random_adapter(&model, 18, 8, 0.3, false));
    let d = Arc::new(random_adapter(&model, 19, 4, 0.3, true));
    let stack = AdapterStack::new(vec![(a, 0.6), (d, 0.9)]);
    let out = TempFile::new("f32-keep.gguf");
    let report = merge_to_gguf(&base_path, &stack, OutType::Keep, &out.0).unwrap();
    assert_eq!(report.merged.len(), model.layers.len() * Proj::ALL.len());
    assert_eq!(report.file_type, None);
    let _record = merge_into(&mut model, &stack).unwrap();
    let file = Model::load_gguf(&out.0).unwrap();
    for (lm, lf) in model.layers.iter().zip(&file.layers) {
        for p in Proj::ALL {
            assert_eq!(lf.proj(p).ty, GgmlType::F32);
            assert!(lm.proj(p).data() == lf.proj(p).data(), "{p} differs");
        }
    }
    let toks = tokens(&model);
    assert_eq!(logits(&model, &toks, None), logits(&file, &toks, None));
}

/// A base whose FFN rows (288) Q4_K's 256-element blocks cannot hold: those tensors
/// keep their type, are reported, and the output still loads and runs.
#[test]
fn merge_to_gguf_falls_back_when_rows_do_not_fit() {
    let src = GgufFile::open(model_path("llama-gqa-F32.gguf")).unwrap();
    let n_ff = 288u64;
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        let v = if k == "llama.feed_forward_length" {
            GgufValue::U32(n_ff as u32)
        } else {
            v.clone()
        };
        w.add_kv(k.clone(), v).unwrap();
    }
    for t in src.tensors() {
        let data = src.tensor_data(t);
        let (dims, bytes): (Vec<u64>, Vec<u8>) =
            if t.name.contains("ffn_gate") || t.name.contains("ffn_up") {
                // [256, 512] -> first 288 rows.
                (
                    vec![t.dims[0], n_ff],
                    data[..(t.dims[0] * n_ff * 4) as usize].to_vec(),
                )
            } else if t.name.contains("ffn_down") {
                // [512, 256] -> first 288 columns of every row.
                let row = t.dims[0] as usize * 4;
                let b = data
                    .chunks_exact(row)
                    .flat_map(|r| r[..n_ff as usize * 4].to_vec())
                    .collect();
                (vec![n_ff, t.dims[1]], b)
            } else {
                (t.dims.clone(), data.to_vec())
            };
        w.add_tensor(t.name.clone(), t.ty, &dims, bytes).unwrap();
    }
    let base = TempFile::new("ff288-F32.gguf");
    w.write_file(&base.0).unwrap();
    let model = Model::load_gguf(&base.0).unwrap();
    assert_eq!(model.config.n_ff, n_ff as usize);

    let adapter = Arc::new(random_adapter(&model, 20, 4, 0.3, false));
    let stack = AdapterStack::single(adapter, 1.0);
    let out = TempFile::new("ff288-Q4_K.gguf");
    let report = merge_to_gguf(&base.0, &stack, GgmlType::Q4_K.into(), &out.0).unwrap();
    let fallbacks: Vec<&MergedTensor> = report.fallbacks().collect();
    assert_eq!(fallbacks.len(), model.layers.len());
    for t in &report.merged {
        let down = t.name.contains("ffn_down");
        assert_eq!(t.fell_back, down, "{}", t.name);
        assert_eq!(
            t.to,
            if down { GgmlType::F32 } else { GgmlType::Q4_K },
            "{}",
            t.name
        );
    }
    // Each tensor holds the in-memory merge of the same base, in its output type.
    let mut reference = Model::load_gguf(&base.0).unwrap();
    let _record = merge_into(&mut reference, &stack).unwrap();
    let merged = Model::load_gguf(&out.0).unwrap();
    for (lr, lm) in reference.layers.iter().zip(&merged.layers) {
        for p in Proj::ALL {
            let (r, m) = (lr.proj(p), lm.proj(p));
            let expected = quantize_matrix(m.ty, &r.to_f32().unwrap(), r.cols).unwrap();
            assert!(m.data() == expected.as_slice(), "{p} differs");
        }
    }
    let toks = tokens(&model);
    let out_logits = logits(&merged, &toks, None);
    assert!(out_logits.iter().all(|v| v.is_finite()));
    let unmerged = logits(&model, &toks, Some(&stack));
    eprintln!(
        "fallback: Q4_K/F32 merged file vs unmerged F32: rel {:.2e}",
        rel(&out_logits, &unmerged)
    );
}

#[test]
fn merge_to_gguf_refuses_to_overwrite_the_base() {
    let src = GgufFile::open(model_path("llama-gqa-F32.gguf")).unwrap();
    let base = TempFile::new("overwrite-base.gguf");
    GgufWriter::from_file(&src)
        .unwrap()
        .write_file(&base.0)
        .unwrap();
    let model = Model::load_gguf(&base.0).unwrap();
    let stack = AdapterStack::single(Arc::new(random_adapter(&model, 21, 4, 0.3, false)), 1.0);
    let before = std::fs::read(&base.0).unwrap();
    let err = merge_to_gguf(&base.0, &stack, OutType::Keep, &base.0).unwrap_err();
    assert!(err.to_string().contains("overwrite"), "{err}");
    assert_eq!(std::fs::read(&base.0).unwrap(), before);
}

#[test]
fn merge_to_gguf_rejects_a_mismatched_adapter_and_writes_nothing() {
    let base_path = model_path("llama-gqa-F32.gguf");
    let tied = load("llama-tied-F32.gguf");
    // Built for llama-tied (n_ff 768): shapes do not fit llama-gqa (n_ff 512).
    let stack = AdapterStack::single(Arc::new(random_adapter(&tied, 22, 4, 0.3, false)), 1.0);
    let out = TempFile::new("mismatch.gguf");
    let err = merge_to_gguf(&base_path, &stack, OutType::Keep, &out.0).unwrap_err();
    assert!(matches!(err, AdapterError::Shape { .. }), "{err}");
    assert!(!out.0.exists());
}
