//! llama2.c checkpoints (Karpathy's `run.c` / `export.py`): the legacy format (a
//! 7 × i32 header) and version 1 (a 256-byte header with magic "ak42"), all weights
//! f32 little-endian.
//!
//! Legacy: `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`
//! (a negative `vocab_size` means the classifier is stored separately), then
//! token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3 (each for all layers),
//! rms_final, two unused `seq_len * head_size / 2` freq_cis tables, and wcls when
//! unshared. Version 1: u32 magic 0x616b3432, i32 version 1, the same seven ints
//! (`vocab_size` positive), u8 shared_classifier, zero padding to 256 bytes; then
//! rms_att, rms_ffn, rms_final, token_embedding, wq, wk, wv, wo, w1, w2, w3 and wcls
//! when unshared (no freq_cis).
//!
//! llama2.c rotates adjacent pairs `(i, i+1)` within each head (`run.c`: `head_dim =
//! i % head_size`, `freq = 10000^(-head_dim/head_size)`) and its `model.py` rotates
//! the same pairs, so wq/wk rows are already in GGUF llama order: the model maps to
//! [`RopeStyle::Normal`] without any row permutation, rope base 10000, RMSNorm eps
//! 1e-5, SwiGLU with w1 = gate, w3 = up, w2 = down.
//!
//! [`Model::load`] picks this reader for files named `*.bin` that do not start with
//! the GGUF magic; [`Model::load_llama2c`] reads one explicitly. The whole header is
//! validated (positive sizes, head counts that divide, the exact file length, no
//! overflow) before any weight is touched; weights stay zero-copy in a memory map
//! unless a load-time quantization type is requested.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;

use graft_quant::{quantize_matrix, GgmlType};

use super::{
    Arch, Bytes, Model, ModelConfig, ModelError, RopeScaling, RopeStyle, TensorSource, Weight,
};

/// "ak42" read as a little-endian u32.
pub const LLAMA2C_MAGIC: u32 = 0x616b_3432;
/// Header bytes of the legacy format (7 × i32).
pub const LEGACY_HEADER_LEN: usize = 28;
/// Header bytes of version 1.
pub const V1_HEADER_LEN: usize = 256;

const ROPE_BASE: f32 = 10000.0;
const RMS_EPS: f32 = 1e-5;

/// Which llama2.c checkpoint layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Llama2cVersion {
    /// `run.c`'s original format: 7 × i32 header, negative vocab = unshared classifier.
    Legacy,
    /// `export.py --version 1`: 256-byte "ak42" header, norms first.
    V1,
}

#[derive(Debug, thiserror::Error)]
pub enum Llama2cError {
    #[error("{file}: {op}: {source}")]
    Io {
        file: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{file}: llama2.c header field {field}: found {found}, expected {expected}")]
    Header {
        file: String,
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error("{file}: llama2.c header sizes overflow computing the size of {array}")]
    Overflow { file: String, array: &'static str },
    #[error("{file}: truncated llama2.c checkpoint: {found} bytes, the header implies {expected}")]
    Truncated {
        file: String,
        found: u64,
        expected: u64,
    },
    #[error("{file}: llama2.c checkpoint too long: {found} bytes, the header implies {expected}")]
    TooLong {
        file: String,
        found: u64,
        expected: u64,
    },
    #[error("{file}: llama2.c cannot express {property}: found {found}, expected {expected}")]
    Unexpressible {
        file: String,
        property: &'static str,
        found: String,
        expected: String,
    },
}

/// A validated llama2.c header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Llama2cHeader {
    pub version: Llama2cVersion,
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
    /// The classifier is the token embedding (no wcls in the file).
    pub shared_classifier: bool,
}

/// One stored array, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Embd,
    AttnNorm(usize),
    Wq(usize),
    Wk(usize),
    Wv(usize),
    Wo(usize),
    FfnNorm(usize),
    W1(usize),
    W2(usize),
    W3(usize),
    FinalNorm,
    /// The two unused legacy freq_cis tables, together.
    FreqCis,
    Output,
}

impl Slot {
    /// graft (GGUF) tensor name, None for the unused freq_cis tables.
    fn name(self) -> Option<String> {
        Some(match self {
            Slot::Embd => "token_embd.weight".to_owned(),
            Slot::AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
            Slot::Wq(i) => format!("blk.{i}.attn_q.weight"),
            Slot::Wk(i) => format!("blk.{i}.attn_k.weight"),
            Slot::Wv(i) => format!("blk.{i}.attn_v.weight"),
            Slot::Wo(i) => format!("blk.{i}.attn_output.weight"),
            Slot::FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
            Slot::W1(i) => format!("blk.{i}.ffn_gate.weight"),
            Slot::W2(i) => format!("blk.{i}.ffn_down.weight"),
            Slot::W3(i) => format!("blk.{i}.ffn_up.weight"),
            Slot::FinalNorm => "output_norm.weight".to_owned(),
            Slot::FreqCis => return None,
            Slot::Output => "output.weight".to_owned(),
        })
    }
}

impl Llama2cHeader {
    pub fn header_len(&self) -> usize {
        match self.version {
            Llama2cVersion::Legacy => LEGACY_HEADER_LEN,
            Llama2cVersion::V1 => V1_HEADER_LEN,
        }
    }

    pub fn head_size(&self) -> usize {
        self.dim / self.n_heads
    }

    pub fn kv_dim(&self) -> usize {
        self.head_size() * self.n_kv_heads
    }

    /// ggml dims (`[cols, rows]`, or `[len]`) of a slot.
    fn dims(&self, slot: Slot) -> Vec<u64> {
        let (d, ff, kv, v) = (
            self.dim as u64,
            self.hidden_dim as u64,
            self.kv_dim() as u64,
            self.vocab_size as u64,
        );
        match slot {
            Slot::Embd | Slot::Output => vec![d, v],
            Slot::AttnNorm(_) | Slot::FfnNorm(_) | Slot::FinalNorm => vec![d],
            Slot::Wq(_) | Slot::Wo(_) => vec![d, d],
            Slot::Wk(_) | Slot::Wv(_) => vec![d, kv],
            Slot::W1(_) | Slot::W3(_) => vec![d, ff],
            Slot::W2(_) => vec![ff, d],
            Slot::FreqCis => vec![self.head_size() as u64, self.seq_len as u64],
        }
    }

    /// The stored arrays in file order.
    fn slots(&self) -> Vec<Slot> {
        let l = self.n_layers;
        let per = |f: fn(usize) -> Slot| (0..l).map(f).collect::<Vec<_>>();
        let mut s = Vec::with_capacity(9 * l + 4);
        match self.version {
            Llama2cVersion::Legacy => {
                s.push(Slot::Embd);
                for f in [
                    Slot::AttnNorm,
                    Slot::Wq,
                    Slot::Wk,
                    Slot::Wv,
                    Slot::Wo,
                    Slot::FfnNorm,
                    Slot::W1,
                    Slot::W2,
                    Slot::W3,
                ] {
                    s.extend(per(f));
                }
                s.push(Slot::FinalNorm);
                s.push(Slot::FreqCis);
            }
            Llama2cVersion::V1 => {
                s.extend(per(Slot::AttnNorm));
                s.extend(per(Slot::FfnNorm));
                s.push(Slot::FinalNorm);
                s.push(Slot::Embd);
                for f in [
                    Slot::Wq,
                    Slot::Wk,
                    Slot::Wv,
                    Slot::Wo,
                    Slot::W1,
                    Slot::W2,
                    Slot::W3,
                ] {
                    s.extend(per(f));
                }
            }
        }
        if !self.shared_classifier {
            s.push(Slot::Output);
        }
        s
    }

    /// (slot, byte offset, byte length) of every array in file order. Only call once
    /// [`Self::file_len`] succeeded (it bounds the sizes; this enumerates every layer).
    fn layout(&self) -> Vec<(Slot, u64, u64)> {
        let mut off = self.header_len() as u64;
        let mut out = Vec::new();
        for slot in self.slots() {
            let len = self
                .dims(slot)
                .iter()
                .fold(4u64, |a, &d| a.saturating_mul(d));
            out.push((slot, off, len));
            off = off.saturating_add(len);
        }
        out
    }

    /// Total file length the header implies, computed without enumerating layers
    /// (n_layers may be anything up to i32::MAX before the length is checked).
    pub fn file_len(&self, file: &str) -> Result<u64, Llama2cError> {
        let (d, ff, l, kv, v) = (
            self.dim as u64,
            self.hidden_dim as u64,
            self.n_layers as u64,
            self.kv_dim() as u64,
            self.vocab_size as u64,
        );
        let mut arrays: Vec<(&'static str, [u64; 3])> = vec![
            ("token_embedding", [v, d, 1]),
            ("rms_att", [l, d, 1]),
            ("wq", [l, d, d]),
            ("wk", [l, kv, d]),
            ("wv", [l, kv, d]),
            ("wo", [l, d, d]),
            ("rms_ffn", [l, d, 1]),
            ("w1", [l, ff, d]),
            ("w2", [l, d, ff]),
            ("w3", [l, ff, d]),
            ("rms_final", [d, 1, 1]),
        ];
        if self.version == Llama2cVersion::Legacy {
            arrays.push((
                "freq_cis",
                [self.seq_len as u64, self.head_size() as u64, 1],
            ));
        }
        if !self.shared_classifier {
            arrays.push(("wcls", [v, d, 1]));
        }
        arrays
            .iter()
            .try_fold(self.header_len() as u64, |total, (array, dims)| {
                dims.iter()
                    .try_fold(4u64, |a, &x| a.checked_mul(x))
                    .and_then(|n| total.checked_add(n))
                    .ok_or_else(|| Llama2cError::Overflow {
                        file: file.to_owned(),
                        array,
                    })
            })
    }

    /// Parses and validates the header of `bytes` (the whole file: its length must be
    /// exactly what the header implies). `file` names it in errors.
    pub fn parse(bytes: &[u8], file: &str) -> Result<Llama2cHeader, Llama2cError> {
        let found_len = bytes.len() as u64;
        let truncated = |expected: usize| Llama2cError::Truncated {
            file: file.to_owned(),
            found: found_len,
            expected: expected as u64,
        };
        let header_err =
            |field: &'static str, found: String, expected: String| Llama2cError::Header {
                file: file.to_owned(),
                field,
                found,
                expected,
            };
        let word = |i: usize| -> Option<[u8; 4]> { bytes.get(4 * i..4 * i + 4)?.try_into().ok() };
        let first = word(0).ok_or_else(|| truncated(LEGACY_HEADER_LEN))?;
        let (version, params_at) = if u32::from_le_bytes(first) == LLAMA2C_MAGIC {
            if bytes.len() < V1_HEADER_LEN {
                return Err(truncated(V1_HEADER_LEN));
            }
            let v = word(1).map_or(0, i32::from_le_bytes);
            if v != 1 {
                return Err(header_err("version", v.to_string(), "1".to_owned()));
            }
            (Llama2cVersion::V1, 2)
        } else {
            if bytes.len() < LEGACY_HEADER_LEN {
                return Err(truncated(LEGACY_HEADER_LEN));
            }
            // A legacy header starts with dim; four printable ASCII bytes would mean a
            // dim above 538 million, so this is a magic number, and not ours.
            if first.iter().all(|b| b.is_ascii_graphic()) {
                return Err(header_err(
                    "magic",
                    format!(
                        "{:?} (0x{:08x})",
                        String::from_utf8_lossy(&first),
                        u32::from_le_bytes(first)
                    ),
                    format!("0x{LLAMA2C_MAGIC:08x} \"ak42\" (version 1) or a legacy header's dim"),
                ));
            }
            (Llama2cVersion::Legacy, 0)
        };
        let p = |i: usize| word(params_at + i).map_or(0, i32::from_le_bytes);
        let names = [
            "dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "seq_len",
        ];
        let mut vals = [0usize; 7];
        for (i, (name, v)) in names.iter().zip(vals.iter_mut()).enumerate() {
            let raw = p(i);
            // Legacy vocab_size: the sign is the shared-classifier flag.
            let signed_ok = i == 5 && version == Llama2cVersion::Legacy;
            let mag = if signed_ok || raw > 0 {
                raw.unsigned_abs()
            } else {
                0
            };
            if mag == 0 {
                let expected = if i == 5 && version == Llama2cVersion::Legacy {
                    "a non-zero value (negative: unshared classifier)"
                } else {
                    "a positive value"
                };
                return Err(header_err(name, raw.to_string(), expected.to_owned()));
            }
            *v = mag as usize;
        }
        let [dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len] = vals;
        let shared_classifier = match version {
            Llama2cVersion::Legacy => p(5) > 0,
            Llama2cVersion::V1 => match bytes.get(36).copied().unwrap_or(0) {
                0 => false,
                1 => true,
                b => {
                    return Err(header_err(
                        "shared_classifier",
                        b.to_string(),
                        "0 or 1".to_owned(),
                    ))
                }
            },
        };
        if !dim.is_multiple_of(n_heads) {
            return Err(header_err(
                "n_heads",
                n_heads.to_string(),
                format!("a divisor of dim {dim}"),
            ));
        }
        if !(dim / n_heads).is_multiple_of(2) {
            return Err(header_err(
                "dim",
                dim.to_string(),
                format!("n_heads {n_heads} x an even head size (RoPE rotates pairs)"),
            ));
        }
        if n_kv_heads > n_heads || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(header_err(
                "n_kv_heads",
                n_kv_heads.to_string(),
                format!("a divisor of n_heads {n_heads}"),
            ));
        }
        let h = Llama2cHeader {
            version,
            dim,
            hidden_dim,
            n_layers,
            n_heads,
            n_kv_heads,
            vocab_size,
            seq_len,
            shared_classifier,
        };
        let expected = h.file_len(file)?;
        if found_len < expected {
            return Err(Llama2cError::Truncated {
                file: file.to_owned(),
                found: found_len,
                expected,
            });
        }
        if found_len > expected {
            return Err(Llama2cError::TooLong {
                file: file.to_owned(),
                found: found_len,
                expected,
            });
        }
        Ok(h)
    }

    /// The graft configuration of this checkpoint.
    pub fn model_config(&self) -> ModelConfig {
        let head_dim = self.head_size();
        ModelConfig {
            arch: Arch::Llama,
            n_vocab: self.vocab_size,
            n_embd: self.dim,
            n_layer: self.n_layers,
            n_ff: self.hidden_dim,
            n_head: self.n_heads,
            n_head_kv: self.n_kv_heads,
            head_dim,
            n_rot: head_dim,
            rope_base: ROPE_BASE,
            rope_scaling: RopeScaling::None,
            rope_style: RopeStyle::Normal,
            rms_eps: RMS_EPS,
            n_ctx_train: self.seq_len,
        }
    }
}

/// Whether [`Model::load`] reads `path` as a llama2.c checkpoint: a `.bin` extension
/// and no GGUF magic (a GGUF file named `.bin` still loads as GGUF).
pub fn is_llama2c_path(path: &Path) -> bool {
    let bin = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("bin"));
    if !bin {
        return false;
    }
    !crate::gguf::has_gguf_magic(path)
}

struct Llama2cSource {
    name: String,
    data: Arc<dyn AsRef<[u8]> + Send + Sync>,
    /// graft name -> (ggml dims, byte offset, byte length).
    tensors: HashMap<String, (Vec<u64>, usize, usize)>,
    quantize: Option<GgmlType>,
}

impl Llama2cSource {
    fn new(
        name: String,
        data: Arc<dyn AsRef<[u8]> + Send + Sync>,
        quantize: Option<GgmlType>,
    ) -> Result<(Llama2cHeader, Llama2cSource), ModelError> {
        let bytes: &[u8] = (*data).as_ref();
        let header = Llama2cHeader::parse(bytes, &name)?;
        let layout = header.layout();
        let mut tensors = HashMap::new();
        for (slot, off, len) in layout {
            if let Some(n) = slot.name() {
                // parse() checked the file length, so every range fits in usize.
                let (off, len) = (
                    usize::try_from(off).unwrap_or(usize::MAX),
                    usize::try_from(len).unwrap_or(0),
                );
                tensors.insert(n, (header.dims(slot), off, len));
            }
        }
        Ok((
            header,
            Llama2cSource {
                name,
                data,
                tensors,
                quantize,
            },
        ))
    }
}

impl TensorSource for Llama2cSource {
    fn file(&self) -> &str {
        &self.name
    }

    fn get(&self, name: &str) -> Result<Option<(Vec<u64>, Weight)>, ModelError> {
        let Some((dims, start, len)) = self.tensors.get(name) else {
            return Ok(None);
        };
        let cols = dims.first().copied().unwrap_or(1) as usize;
        let rows = dims.get(1).copied().unwrap_or(1) as usize;
        let bytes = Bytes::Shared {
            buf: self.data.clone(),
            start: *start,
            len: *len,
        };
        let weight = match self.quantize {
            Some(t)
                if t != GgmlType::F32 && dims.len() == 2 && cols.is_multiple_of(t.block_size()) =>
            {
                let values: Vec<f32> = bytes
                    .as_slice()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let q = quantize_matrix(t, &values, cols).map_err(|source| ModelError::Quant {
                    file: self.name.clone(),
                    tensor: name.to_owned(),
                    source,
                })?;
                Weight {
                    ty: t,
                    rows,
                    cols,
                    bytes: Bytes::Owned(q.into()),
                }
            }
            _ => Weight {
                ty: GgmlType::F32,
                rows,
                cols,
                bytes,
            },
        };
        Ok(Some((dims.clone(), weight)))
    }
}

impl Model {
    /// Loads a llama2.c checkpoint (legacy or version 1), weights zero-copy from a
    /// memory map.
    pub fn load_llama2c(path: &Path) -> Result<Model, ModelError> {
        Self::load_llama2c_with(path, None)
    }

    /// [`Model::load_llama2c`], converting the weight matrices to `quantize` (when
    /// their rows are whole blocks of it) instead of keeping them f32.
    pub fn load_llama2c_with(path: &Path, quantize: Option<GgmlType>) -> Result<Model, ModelError> {
        let name = path.display().to_string();
        let io = |op, source| Llama2cError::Io {
            file: name.clone(),
            op,
            source,
        };
        let mut file = File::open(path).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        let data: Arc<dyn AsRef<[u8]> + Send + Sync> = if len < V1_HEADER_LEN as u64 {
            // Too small to hold any model (and mapping an empty file fails on some
            // platforms): read it, and let the parser report what is wrong.
            let mut v = Vec::new();
            file.read_to_end(&mut v).map_err(|e| io("read", e))?;
            Arc::new(v)
        } else {
            // SAFETY: the map is read-only and private, owned (through the Arc) by the
            // weights that borrow from it, so nothing in this process writes through
            // it. As for GGUF files, another process truncating or rewriting the file
            // while it is mapped is outside what we can guard against.
            Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("mmap", e))?)
        };
        Self::llama2c_from_shared(name, data, quantize)
    }

    /// Parses a llama2.c checkpoint held in memory (`name` labels errors). Never
    /// panics on malformed input.
    pub fn llama2c_from_bytes(bytes: Vec<u8>, name: &str) -> Result<Model, ModelError> {
        Self::llama2c_from_shared(name.to_owned(), Arc::new(bytes), None)
    }

    fn llama2c_from_shared(
        name: String,
        data: Arc<dyn AsRef<[u8]> + Send + Sync>,
        quantize: Option<GgmlType>,
    ) -> Result<Model, ModelError> {
        let (header, src) = Llama2cSource::new(name, data, quantize)?;
        Self::assemble(header.model_config(), &src)
    }
}

/// Checks that `model` is something llama2.c can run, returning its header.
fn expressible(
    model: &Model,
    version: Llama2cVersion,
    file: &str,
) -> Result<Llama2cHeader, Llama2cError> {
    let c = &model.config;
    let refuse =
        |property: &'static str, found: String, expected: String| Llama2cError::Unexpressible {
            file: file.to_owned(),
            property,
            found,
            expected,
        };
    if let Some((i, which)) = model.layers.iter().enumerate().find_map(|(i, l)| {
        [(&l.bq, "q"), (&l.bk, "k"), (&l.bv, "v")]
            .into_iter()
            .find(|(b, _)| b.is_some())
            .map(|(_, w)| (i, w))
    }) {
        return Err(refuse(
            "attention biases",
            format!("a {which} bias in layer {i} (arch {})", c.arch.name()),
            "no biases".to_owned(),
        ));
    }
    if c.rope_style != RopeStyle::Normal {
        return Err(refuse(
            "rope style",
            format!("{:?}", c.rope_style),
            "Normal (adjacent pairs)".to_owned(),
        ));
    }
    if c.rope_base != ROPE_BASE {
        return Err(refuse(
            "rope base",
            c.rope_base.to_string(),
            ROPE_BASE.to_string(),
        ));
    }
    if c.rope_scaling != RopeScaling::None {
        return Err(refuse(
            "rope scaling",
            format!("{:?}", c.rope_scaling),
            "none".to_owned(),
        ));
    }
    if model.rope_freqs.is_some() {
        return Err(refuse(
            "rope frequency factors",
            "rope_freqs".to_owned(),
            "none".to_owned(),
        ));
    }
    if c.rms_eps != RMS_EPS {
        return Err(refuse(
            "rms_norm_eps",
            c.rms_eps.to_string(),
            RMS_EPS.to_string(),
        ));
    }
    if c.n_head == 0 || c.head_dim.checked_mul(c.n_head) != Some(c.n_embd) {
        return Err(refuse(
            "head_dim",
            c.head_dim.to_string(),
            format!("n_embd / n_head = {} / {}", c.n_embd, c.n_head),
        ));
    }
    if !c.head_dim.is_multiple_of(2) {
        return Err(refuse(
            "head_dim",
            c.head_dim.to_string(),
            "an even head size".to_owned(),
        ));
    }
    if c.n_rot != c.head_dim {
        return Err(refuse(
            "rope dimension count",
            c.n_rot.to_string(),
            format!("the head size {}", c.head_dim),
        ));
    }
    if c.n_head_kv == 0 || c.n_head_kv > c.n_head || !c.n_head.is_multiple_of(c.n_head_kv) {
        return Err(refuse(
            "n_head_kv",
            c.n_head_kv.to_string(),
            format!("a divisor of n_head {}", c.n_head),
        ));
    }
    if model.layers.len() != c.n_layer {
        return Err(refuse(
            "layer count",
            model.layers.len().to_string(),
            format!("n_layer {}", c.n_layer),
        ));
    }
    for (property, v) in [
        ("n_embd", c.n_embd),
        ("n_ff", c.n_ff),
        ("n_layer", c.n_layer),
        ("n_head", c.n_head),
        ("n_vocab", c.n_vocab),
        ("context length", c.n_ctx_train),
    ] {
        if v == 0 || i32::try_from(v).is_err() {
            return Err(refuse(
                property,
                v.to_string(),
                format!("a positive value <= {}", i32::MAX),
            ));
        }
    }
    let shared_classifier = same_weight(&model.output, &model.token_embd);
    Ok(Llama2cHeader {
        version,
        dim: c.n_embd,
        hidden_dim: c.n_ff,
        n_layers: c.n_layer,
        n_heads: c.n_head,
        n_kv_heads: c.n_head_kv,
        vocab_size: c.n_vocab,
        seq_len: c.n_ctx_train,
        shared_classifier,
    })
}

/// Whether two weights hold the same values (so the classifier can be shared).
fn same_weight(a: &Weight, b: &Weight) -> bool {
    if a.rows != b.rows || a.cols != b.cols {
        return false;
    }
    if a.ty == b.ty && a.data() == b.data() {
        return true;
    }
    match (a.to_f32(), b.to_f32()) {
        (Ok(x), Ok(y)) => x
            .iter()
            .map(|v| v.to_bits())
            .eq(y.iter().map(|v| v.to_bits())),
        _ => false,
    }
}

/// The model's values for a slot, as little-endian f32 bytes.
fn slot_bytes(model: &Model, slot: Slot, file: &str) -> Result<Vec<u8>, ModelError> {
    let layer = |i: usize| {
        model
            .layers
            .get(i)
            .ok_or_else(|| ModelError::MissingTensor {
                file: file.to_owned(),
                tensor: slot.name().unwrap_or_default(),
            })
    };
    let vec_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let weight: &Weight = match slot {
        // Streamed by write_to (it can be large: seq_len x head_size floats).
        Slot::FreqCis => return Ok(Vec::new()),
        Slot::AttnNorm(i) => return Ok(vec_bytes(&layer(i)?.attn_norm)),
        Slot::FfnNorm(i) => return Ok(vec_bytes(&layer(i)?.ffn_norm)),
        Slot::FinalNorm => return Ok(vec_bytes(&model.output_norm)),
        Slot::Embd => &model.token_embd,
        Slot::Output => &model.output,
        Slot::Wq(i) => &layer(i)?.wq,
        Slot::Wk(i) => &layer(i)?.wk,
        Slot::Wv(i) => &layer(i)?.wv,
        Slot::Wo(i) => &layer(i)?.wo,
        Slot::W1(i) => &layer(i)?.w_gate,
        Slot::W2(i) => &layer(i)?.w_down,
        Slot::W3(i) => &layer(i)?.w_up,
    };
    if weight.ty == GgmlType::F32 {
        return Ok(weight.data().to_vec());
    }
    let values = weight.to_f32().map_err(|source| ModelError::Quant {
        file: file.to_owned(),
        tensor: slot.name().unwrap_or_default(),
        source,
    })?;
    Ok(vec_bytes(&values))
}

fn write_to(
    model: &Model,
    h: &Llama2cHeader,
    out: &mut dyn Write,
    file: &str,
) -> Result<(), ModelError> {
    let version = h.version;
    h.file_len(file)?;
    let layout = h.layout();
    let io = |source| Llama2cError::Io {
        file: file.to_owned(),
        op: "write",
        source,
    };
    // expressible() checked every size fits an i32.
    let int = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    let vocab = match (version, h.shared_classifier) {
        (Llama2cVersion::Legacy, false) => -int(h.vocab_size),
        _ => int(h.vocab_size),
    };
    let params = [
        int(h.dim),
        int(h.hidden_dim),
        int(h.n_layers),
        int(h.n_heads),
        int(h.n_kv_heads),
        vocab,
        int(h.seq_len),
    ];
    let mut header: Vec<u8> = Vec::with_capacity(V1_HEADER_LEN);
    if version == Llama2cVersion::V1 {
        header.extend(LLAMA2C_MAGIC.to_le_bytes());
        header.extend(1i32.to_le_bytes());
    }
    header.extend(params.iter().flat_map(|p| p.to_le_bytes()));
    if version == Llama2cVersion::V1 {
        header.push(u8::from(h.shared_classifier));
        header.resize(V1_HEADER_LEN, 0);
    }
    out.write_all(&header).map_err(io)?;
    for (slot, _, len) in layout {
        if slot == Slot::FreqCis {
            let zeros = [0u8; 1 << 16];
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                out.write_all(zeros.get(..n).unwrap_or(&zeros))
                    .map_err(io)?;
                left -= n as u64;
            }
            continue;
        }
        let bytes = slot_bytes(model, slot, file)?;
        if bytes.len() as u64 != len {
            let dims = h.dims(slot);
            return Err(ModelError::Shape {
                file: file.to_owned(),
                tensor: slot.name().unwrap_or_default(),
                found: vec![bytes.len() as u64 / 4],
                expected: vec![dims.iter().product()],
            });
        }
        out.write_all(&bytes).map_err(io)?;
    }
    Ok(())
}

/// Serializes `model` as a llama2.c checkpoint in memory.
pub fn llama2c_to_bytes(model: &Model, version: Llama2cVersion) -> Result<Vec<u8>, ModelError> {
    let file = "<memory>";
    let h = expressible(model, version, file)?;
    let mut out = Vec::new();
    write_to(model, &h, &mut out, file)?;
    Ok(out)
}

/// Writes `model` as a llama2.c checkpoint: f32 weights (other types dequantized),
/// `seq_len` = the training context, zeros for the legacy format's unused freq_cis
/// tables, a shared classifier when the output weight equals the token embedding.
/// Refuses models llama2.c cannot express (attention biases, NEOX RoPE, rope base
/// other than 10000, RoPE scaling or frequency factors, partial rotary, head_dim other
/// than n_embd / n_head, RMSNorm eps other than 1e-5), naming the property; nothing is
/// written then.
pub fn write_llama2c(
    model: &Model,
    path: &Path,
    version: Llama2cVersion,
) -> Result<(), ModelError> {
    let name = path.display().to_string();
    let h = expressible(model, version, &name)?;
    let io = |op, source| Llama2cError::Io {
        file: name.clone(),
        op,
        source,
    };
    let file = File::create(path).map_err(|e| io("create", e))?;
    let mut w = BufWriter::new(file);
    let result = write_to(model, &h, &mut w, &name)
        .and_then(|()| w.flush().map_err(|e| ModelError::from(io("write", e))));
    if result.is_err() {
        drop(w);
        let _ = std::fs::remove_file(path);
    }
    result
}
