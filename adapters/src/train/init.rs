//! A new model from nothing: a SentencePiece-style BPE vocabulary learned from a
//! corpus (llama.cpp's `llama` tokenizer runs it: pieces scored by merge order, byte
//! fallback) and a randomly initialised Llama-architecture GGUF to pretrain.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use graft_quant::GgmlType;
use graft_runtime::gguf::{GgufValue, GgufWriter};
use rand::{Rng, SeedableRng};

use super::TrainError;

/// SentencePiece's word-boundary marker (a space, and the start of text).
const SPACE: char = '\u{2581}';

/// A vocabulary in llama.cpp's `llama` (SPM) form.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    /// GGUF token types: 1 normal, 2 unknown, 3 control, 6 byte.
    pub types: Vec<i32>,
}

pub const UNK: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;

/// Learns `size` tokens from `texts`: control tokens, the 256 byte-fallback tokens,
/// every character seen (plus printable ASCII), then BPE merges of the most frequent
/// adjacent pair inside words (ties broken by the pair's text, so it is
/// deterministic). Merged pieces score `-rank`, so llama.cpp's tokenizer, which
/// merges the highest-scoring pair first, replays the merges in order.
pub fn train_vocab(texts: &[String], size: usize) -> Vocab {
    let mut v = Vocab {
        tokens: vec!["<unk>".into(), "<s>".into(), "</s>".into()],
        scores: vec![0.0; 3],
        types: vec![2, 3, 3],
    };
    for b in 0..=255u8 {
        v.tokens.push(format!("<0x{b:02X}>"));
        v.scores.push(0.0);
        v.types.push(6);
    }
    // Words as the tokenizer sees them: spaces become the marker, which starts a word.
    let mut words: HashMap<Vec<String>, u64> = HashMap::new();
    let mut chars: BTreeSet<char> = (' '..='~')
        .map(|c| if c == ' ' { SPACE } else { c })
        .collect();
    for t in texts {
        let spm: String = format!(" {t}").replace(' ', &SPACE.to_string());
        for w in split_words(&spm) {
            let syms: Vec<String> = w.chars().map(String::from).collect();
            chars.extend(w.chars());
            *words.entry(syms).or_default() += 1;
        }
    }
    for c in &chars {
        v.tokens.push(c.to_string());
        v.scores.push(-1e6);
        v.types.push(1);
    }
    let mut known: BTreeSet<String> = v.tokens.iter().cloned().collect();
    let mut words: Vec<(Vec<String>, u64)> = words.into_iter().collect();
    words.sort();
    let mut rank = 0f32;
    while v.tokens.len() < size {
        let mut pairs: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (syms, n) in &words {
            for w in syms.windows(2) {
                *pairs.entry((w[0].clone(), w[1].clone())).or_default() += n;
            }
        }
        // Highest count; the BTreeMap order makes ties deterministic.
        let Some(((a, b), count)) = pairs
            .into_iter()
            .filter(|((a, b), _)| !known.contains(&format!("{a}{b}")))
            .max_by(|x, y| x.1.cmp(&y.1).then_with(|| y.0.cmp(&x.0)))
        else {
            break;
        };
        if count < 2 {
            break;
        }
        let merged = format!("{a}{b}");
        for (syms, _) in &mut words {
            let mut i = 0;
            while i + 1 < syms.len() {
                if syms[i] == a && syms[i + 1] == b {
                    syms[i] = merged.clone();
                    syms.remove(i + 1);
                }
                i += 1;
            }
        }
        rank += 1.0;
        known.insert(merged.clone());
        v.tokens.push(merged);
        v.scores.push(-rank);
        v.types.push(1);
    }
    v
}

/// Splits marker-joined text into words, each starting at a marker.
fn split_words(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c == SPACE && i > start {
            out.push(&s[start..i]);
            start = i;
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// Shape of a new Llama-architecture model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitConfig {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    pub rope_base: f32,
}

/// Writes a randomly initialised Llama GGUF (F32, tied embeddings) with `vocab` as its
/// tokenizer. Weights ~ N(0, 0.02), output projections of each block scaled down by
/// sqrt(2 n_layer) (GPT-2's residual init), norms 1.
pub fn write_init_model(
    c: &InitConfig,
    vocab: &Vocab,
    name: &str,
    seed: u64,
    path: &Path,
) -> Result<(), TrainError> {
    if c.n_head == 0
        || c.n_head_kv == 0
        || !c.n_embd.is_multiple_of(c.n_head)
        || !c.n_head.is_multiple_of(c.n_head_kv)
    {
        return Err(TrainError::Config(format!(
            "n_embd {} must split into n_head {} heads, grouped by n_head_kv {}",
            c.n_embd, c.n_head, c.n_head_kv
        )));
    }
    let file = path.display().to_string();
    let gerr = |e: graft_runtime::gguf::GgufError| TrainError::Config(format!("{file}: {e}"));
    let head_dim = c.n_embd / c.n_head;
    let kv = head_dim * c.n_head_kv;
    let n_vocab = vocab.tokens.len();
    let mut w = GgufWriter::new();
    let kvs: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("general.name", GgufValue::String(name.into())),
        ("llama.context_length", GgufValue::U32(c.n_ctx as u32)),
        ("llama.embedding_length", GgufValue::U32(c.n_embd as u32)),
        ("llama.block_count", GgufValue::U32(c.n_layer as u32)),
        ("llama.feed_forward_length", GgufValue::U32(c.n_ff as u32)),
        (
            "llama.attention.head_count",
            GgufValue::U32(c.n_head as u32),
        ),
        (
            "llama.attention.head_count_kv",
            GgufValue::U32(c.n_head_kv as u32),
        ),
        (
            "llama.rope.dimension_count",
            GgufValue::U32(head_dim as u32),
        ),
        ("llama.rope.freq_base", GgufValue::F32(c.rope_base)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
        ("llama.vocab_size", GgufValue::U32(n_vocab as u32)),
        ("tokenizer.ggml.model", GgufValue::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            GgufValue::from(vocab.tokens.clone()),
        ),
        (
            "tokenizer.ggml.scores",
            GgufValue::from(vocab.scores.clone()),
        ),
        (
            "tokenizer.ggml.token_type",
            GgufValue::from(vocab.types.clone()),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(BOS)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(EOS)),
        ("tokenizer.ggml.unknown_token_id", GgufValue::U32(UNK)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(true)),
        ("tokenizer.ggml.add_eos_token", GgufValue::Bool(false)),
        ("tokenizer.ggml.add_space_prefix", GgufValue::Bool(true)),
    ];
    for (k, v) in kvs {
        w.add_kv(k, v).map_err(gerr)?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut normal = |n: usize, std: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                // Box-Muller from two uniforms.
                let (u1, u2): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen_range(0.0..1.0));
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
                (z * std).to_le_bytes()
            })
            .collect()
    };
    let ones = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| 1f32.to_le_bytes()).collect() };
    let resid = 0.02 / (2.0 * c.n_layer as f32).sqrt();
    let mut tensors: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
    tensors.push((
        "token_embd.weight".into(),
        vec![c.n_embd as u64, n_vocab as u64],
        normal(n_vocab * c.n_embd, 0.02),
    ));
    for i in 0..c.n_layer {
        let mut m = |stem: &str, rows: usize, cols: usize, std: f32| {
            tensors.push((
                format!("blk.{i}.{stem}.weight"),
                vec![cols as u64, rows as u64],
                normal(rows * cols, std),
            ))
        };
        m("attn_q", c.n_embd, c.n_embd, 0.02);
        m("attn_k", kv, c.n_embd, 0.02);
        m("attn_v", kv, c.n_embd, 0.02);
        m("attn_output", c.n_embd, c.n_embd, resid);
        m("ffn_gate", c.n_ff, c.n_embd, 0.02);
        m("ffn_up", c.n_ff, c.n_embd, 0.02);
        m("ffn_down", c.n_embd, c.n_ff, resid);
        tensors.push((
            format!("blk.{i}.attn_norm.weight"),
            vec![c.n_embd as u64],
            ones(c.n_embd),
        ));
        tensors.push((
            format!("blk.{i}.ffn_norm.weight"),
            vec![c.n_embd as u64],
            ones(c.n_embd),
        ));
    }
    tensors.push((
        "output_norm.weight".into(),
        vec![c.n_embd as u64],
        ones(c.n_embd),
    ));
    for (name, dims, data) in tensors {
        w.add_tensor(name, GgmlType::F32, &dims, data)
            .map_err(gerr)?;
    }
    let bytes = w.to_bytes().map_err(gerr)?;
    crate::st_write::write_atomic(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_learns_frequent_words_whole() {
        let texts: Vec<String> = (0..50).map(|i| format!("the cat sat {i}")).collect();
        let v = train_vocab(&texts, 400);
        assert!(v.tokens.contains(&format!("{SPACE}the")));
        assert!(v.tokens.contains(&format!("{SPACE}cat")));
        assert_eq!(v.tokens.len(), v.scores.len());
        assert_eq!(train_vocab(&texts, 400), v);
        // Every merged piece's halves exist (llama.cpp can only reach it by merging).
        let n_fixed = v.types.iter().filter(|&&t| t != 1).count();
        assert!(n_fixed == 259);
    }
}
