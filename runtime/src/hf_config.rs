//! Hugging Face `config.json` for the `llama` and `qwen2` model types, and the
//! HF -> GGUF tensor-name mapping and Q/K row permutation that llama.cpp's
//! `convert_hf_to_gguf.py` applies.
//!
//! Fields are read one by one from the JSON object so that a bad value is
//! reported by field name with what was found and what was expected. Fields
//! graft does not use (`architectures`, `hidden_act`, qwen2's
//! `use_sliding_window`/`sliding_window`/`max_window_layers`, ...) are ignored.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Errors reading a `config.json`. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum HfConfigError {
    #[error("{file}: {source}", file = .file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a valid JSON object: {message}", file = .file.display())]
    Json { file: PathBuf, message: String },
    #[error(
        "{file}: unsupported model_type {found}, expected one of \"llama\", \"qwen2\"",
        file = .file.display()
    )]
    UnsupportedModelType { file: PathBuf, found: String },
    #[error("{file}: missing required field `{field}`", file = .file.display())]
    Missing { file: PathBuf, field: &'static str },
    #[error(
        "{file}: field `{field}`: found {found}, expected {expected}",
        file = .file.display()
    )]
    Invalid {
        file: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
    },
}

type Result<T> = std::result::Result<T, HfConfigError>;

/// Supported HF model types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelType {
    Llama,
    Qwen2,
}

impl ModelType {
    /// The `model_type` string, which is also the GGUF `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Qwen2 => "qwen2",
        }
    }

    /// Whether llama.cpp's converter permutes Q/K rows for this architecture
    /// (GGUF `llama` uses adjacent-pair RoPE; `qwen2` keeps NEOX order).
    pub fn permutes_qk(self) -> bool {
        matches!(self, ModelType::Llama)
    }
}

impl fmt::Display for ModelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `rope_scaling.rope_type` (or the older `type`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RopeScalingType {
    Default,
    Linear,
    Dynamic,
    Yarn,
    LongRope,
    Llama3,
    /// Any other value, kept verbatim; the runtime decides whether to refuse it.
    Other(String),
}

impl RopeScalingType {
    fn parse(s: &str) -> Self {
        match s {
            "default" => RopeScalingType::Default,
            "linear" => RopeScalingType::Linear,
            "dynamic" => RopeScalingType::Dynamic,
            "yarn" => RopeScalingType::Yarn,
            "longrope" => RopeScalingType::LongRope,
            "llama3" => RopeScalingType::Llama3,
            other => RopeScalingType::Other(other.to_string()),
        }
    }
}

/// `rope_scaling` object. Fields a given type requires are checked present
/// (linear, dynamic, yarn: `factor`; llama3: all four).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeScaling {
    pub rope_type: RopeScalingType,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// A validated `config.json` of a llama or qwen2 model.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub model_type: ModelType,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// `head_dim` if given, else `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// Defaults to 10000.
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub vocab_size: usize,
    /// Defaults to false.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases: always for qwen2; llama's
    /// `attention_bias` (default false).
    pub qkv_bias: bool,
    /// Whether o_proj has a bias (llama's `attention_bias`; never for qwen2).
    pub o_bias: bool,
    /// llama's `mlp_bias` (default false; never for qwen2).
    pub mlp_bias: bool,
    /// `bos_token_id`: absent/null -> empty, int -> one, list -> all.
    pub bos_token_ids: Vec<u32>,
    /// `eos_token_id`: absent/null -> empty, int -> one, list -> all.
    pub eos_token_ids: Vec<u32>,
    pub torch_dtype: Option<String>,
}

impl HfConfig {
    /// Reads `config.json`; `path` is the file or the model directory.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| HfConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// Parses and validates config JSON; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let obj: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| HfConfigError::Json {
                file: file.to_path_buf(),
                message: e.to_string(),
            })?;
        let r = Reader { obj: &obj, file };

        let model_type = match obj.get("model_type") {
            Some(Value::String(s)) if s == "llama" => ModelType::Llama,
            Some(Value::String(s)) if s == "qwen2" => ModelType::Qwen2,
            Some(v) => {
                return Err(HfConfigError::UnsupportedModelType {
                    file: file.to_path_buf(),
                    found: v.to_string(),
                })
            }
            None => return Err(r.missing("model_type")),
        };

        let hidden_size = r.positive("hidden_size")?;
        let intermediate_size = r.positive("intermediate_size")?;
        let num_hidden_layers = r.positive("num_hidden_layers")?;
        let num_attention_heads = r.positive("num_attention_heads")?;
        let num_key_value_heads = r
            .opt_positive("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let vocab_size = r.positive("vocab_size")?;
        let max_position_embeddings = r.positive("max_position_embeddings")?;

        let head_dim = match r.opt_positive("head_dim")? {
            Some(hd) => hd,
            None => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(r.invalid(
                        "num_attention_heads",
                        num_attention_heads.to_string(),
                        format!(
                            "a divisor of hidden_size ({hidden_size}) when head_dim is not given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(r.invalid(
                "head_dim",
                head_dim.to_string(),
                "an even head dimension (RoPE rotates pairs)".to_string(),
            ));
        }
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(r.invalid(
                "num_key_value_heads",
                num_key_value_heads.to_string(),
                format!("a divisor of num_attention_heads ({num_attention_heads})"),
            ));
        }

        let rms_norm_eps = match r.opt_f64("rms_norm_eps")? {
            Some(e) if e > 0.0 => e,
            Some(e) => {
                return Err(r.invalid("rms_norm_eps", e.to_string(), "a positive number".into()))
            }
            None => return Err(r.missing("rms_norm_eps")),
        };
        let rope_theta = match r.opt_f64("rope_theta")? {
            Some(t) if t > 0.0 => t,
            Some(t) => {
                return Err(r.invalid("rope_theta", t.to_string(), "a positive number".into()))
            }
            None => 10000.0,
        };
        let rope_scaling = r.rope_scaling()?;
        let tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match model_type {
            ModelType::Llama => {
                let attention_bias = r.opt_bool("attention_bias")?.unwrap_or(false);
                let mlp_bias = r.opt_bool("mlp_bias")?.unwrap_or(false);
                (attention_bias, attention_bias, mlp_bias)
            }
            ModelType::Qwen2 => (true, false, false),
        };
        let bos_token_ids = r.token_ids("bos_token_id")?;
        let eos_token_ids = r.token_ids("eos_token_id")?;
        let torch_dtype = match obj.get("torch_dtype") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(r.invalid("torch_dtype", v.to_string(), "a string".into())),
        };

        Ok(HfConfig {
            model_type,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            vocab_size,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            bos_token_ids,
            eos_token_ids,
            torch_dtype,
        })
    }

    /// The first `bos_token_id`, if any.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_ids.first().copied()
    }

    /// The first `eos_token_id`, if any.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_ids.first().copied()
    }

    /// Rows of the q projection: `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Rows of the k and v projections: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// For an HF tensor name, the head count to pass to [`permute_qk_rows`]
    /// when converting it to GGUF order: `Some(num_attention_heads)` for
    /// `q_proj` weight/bias and `Some(num_key_value_heads)` for `k_proj`
    /// weight/bias of a llama model; `None` for everything else (and for every
    /// qwen2 tensor, which keeps HF order).
    pub fn qk_permute_heads(&self, hf_name: &str) -> Option<usize> {
        if !self.model_type.permutes_qk() {
            return None;
        }
        let (_, rest) = split_layer(hf_name)?;
        match rest {
            "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => Some(self.num_attention_heads),
            "self_attn.k_proj.weight" | "self_attn.k_proj.bias" => Some(self.num_key_value_heads),
            _ => None,
        }
    }
}

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    file: &'a Path,
}

impl Reader<'_> {
    fn missing(&self, field: &'static str) -> HfConfigError {
        HfConfigError::Missing {
            file: self.file.to_path_buf(),
            field,
        }
    }

    fn invalid(&self, field: &'static str, found: String, expected: String) -> HfConfigError {
        HfConfigError::Invalid {
            file: self.file.to_path_buf(),
            field,
            found,
            expected,
        }
    }

    fn opt_positive(&self, field: &'static str) -> Result<Option<usize>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(self.invalid(field, v.to_string(), "a positive integer".into())),
            },
        }
    }

    fn positive(&self, field: &'static str) -> Result<usize> {
        self.opt_positive(field)?.ok_or_else(|| self.missing(field))
    }

    fn opt_f64(&self, field: &'static str) -> Result<Option<f64>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.invalid(field, v.to_string(), "a finite number".into())),
            },
        }
    }

    fn opt_bool(&self, field: &'static str) -> Result<Option<bool>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(field, v.to_string(), "true or false".into())),
        }
    }

    fn token_ids(&self, field: &'static str) -> Result<Vec<u32>> {
        let bad = |v: &Value| {
            self.invalid(
                field,
                v.to_string(),
                "a token id (u32), a list of token ids, or null".into(),
            )
        };
        let id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                items.iter().map(|v| id(v).ok_or_else(|| bad(v))).collect()
            }
            Some(v) => id(v).map(|n| vec![n]).ok_or_else(|| bad(v)),
        }
    }

    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        const FIELD: &str = "rope_scaling";
        let obj = match self.obj.get(FIELD) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(o)) => o,
            Some(v) => return Err(self.invalid(FIELD, v.to_string(), "null or an object".into())),
        };
        let sub = Reader {
            obj,
            file: self.file,
        };
        let type_value = obj.get("rope_type").or_else(|| obj.get("type"));
        let rope_type = match type_value {
            Some(Value::String(s)) => RopeScalingType::parse(s),
            Some(v) => {
                return Err(self.invalid(
                    "rope_scaling.rope_type",
                    v.to_string(),
                    "a string".into(),
                ))
            }
            None => {
                return Err(self.invalid(
                    "rope_scaling.rope_type",
                    "nothing".into(),
                    "`rope_type` or `type` (linear, dynamic, yarn, llama3, ...)".into(),
                ))
            }
        };
        let positive = |name: &'static str, full: &'static str| -> Result<Option<f64>> {
            match sub.opt_f64(name) {
                Ok(Some(x)) if x > 0.0 => Ok(Some(x)),
                Ok(Some(x)) => Err(self.invalid(full, x.to_string(), "a positive number".into())),
                Ok(None) => Ok(None),
                Err(_) => {
                    Err(self.invalid(full, value_text(obj.get(name)), "a finite number".into()))
                }
            }
        };
        let factor = positive("factor", "rope_scaling.factor")?;
        let low_freq_factor = positive("low_freq_factor", "rope_scaling.low_freq_factor")?;
        let high_freq_factor = positive("high_freq_factor", "rope_scaling.high_freq_factor")?;
        let original_max_position_embeddings = sub
            .opt_positive("original_max_position_embeddings")
            .map_err(|_| {
                self.invalid(
                    "rope_scaling.original_max_position_embeddings",
                    value_text(obj.get("original_max_position_embeddings")),
                    "a positive integer".into(),
                )
            })?;

        let need = |present: bool, name: &'static str| -> Result<()> {
            if present {
                Ok(())
            } else {
                Err(HfConfigError::Missing {
                    file: self.file.to_path_buf(),
                    field: name,
                })
            }
        };
        match rope_type {
            RopeScalingType::Linear | RopeScalingType::Dynamic | RopeScalingType::Yarn => {
                need(factor.is_some(), "rope_scaling.factor")?;
            }
            RopeScalingType::Llama3 => {
                need(factor.is_some(), "rope_scaling.factor")?;
                need(low_freq_factor.is_some(), "rope_scaling.low_freq_factor")?;
                need(high_freq_factor.is_some(), "rope_scaling.high_freq_factor")?;
                need(
                    original_max_position_embeddings.is_some(),
                    "rope_scaling.original_max_position_embeddings",
                )?;
                if let (Some(lo), Some(hi)) = (low_freq_factor, high_freq_factor) {
                    if hi <= lo {
                        return Err(self.invalid(
                            "rope_scaling.high_freq_factor",
                            hi.to_string(),
                            format!("greater than low_freq_factor ({lo})"),
                        ));
                    }
                }
            }
            _ => {}
        }
        Ok(Some(RopeScaling {
            rope_type,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }))
    }
}

fn value_text(v: Option<&Value>) -> String {
    v.map_or_else(|| "nothing".to_string(), Value::to_string)
}

/// Splits `model.layers.N.<rest>` into `(N, rest)`.
fn split_layer(hf_name: &str) -> Option<(usize, &str)> {
    let tail = hf_name.strip_prefix("model.layers.")?;
    let (n, rest) = tail.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    Some((n.parse().ok()?, rest))
}

/// Per-layer HF suffix <-> GGUF suffix (without the `.weight`/`.bias` end).
const LAYER_MAP: [(&str, &str); 9] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// Whole-model HF name <-> GGUF name.
const GLOBAL_MAP: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

fn split_kind(name: &str) -> Option<(&str, &str)> {
    name.strip_suffix(".weight")
        .map(|b| (b, "weight"))
        .or_else(|| name.strip_suffix(".bias").map(|b| (b, "bias")))
}

/// Maps an HF llama/qwen2 tensor name to its GGUF name, e.g.
/// `model.layers.3.self_attn.o_proj.weight` -> `blk.3.attn_output.weight`.
/// Returns `None` for names with no GGUF counterpart (such as
/// `model.layers.N.self_attn.rotary_emb.inv_freq`, which converters drop).
pub fn hf_to_gguf_name(hf_name: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL_MAP.iter().find(|(h, _)| *h == hf_name) {
        return Some((*g).to_string());
    }
    let (layer, rest) = split_layer(hf_name)?;
    let (base, kind) = split_kind(rest)?;
    let (_, g) = LAYER_MAP.iter().find(|(h, _)| *h == base)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The inverse of [`hf_to_gguf_name`].
pub fn gguf_to_hf_name(gguf_name: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL_MAP.iter().find(|(_, g)| *g == gguf_name) {
        return Some((*h).to_string());
    }
    let tail = gguf_name.strip_prefix("blk.")?;
    let (n, rest) = tail.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    let layer: usize = n.parse().ok()?;
    let (base, kind) = split_kind(rest)?;
    let (h, _) = LAYER_MAP.iter().find(|(_, g)| *g == base)?;
    Some(format!("model.layers.{layer}.{h}.{kind}"))
}

/// Errors from [`permute_qk_rows`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermuteError {
    #[error("Q/K permutation: found {found} values, expected a nonzero multiple of row length {row_len}")]
    BadLength { found: usize, row_len: usize },
    #[error(
        "Q/K permutation: {rows} rows, expected a multiple of 2 * n_head ({n_head} heads, even head_dim)"
    )]
    BadRows { rows: usize, n_head: usize },
}

/// Reorders the rows of an HF q/k projection (weight `[n_head * head_dim,
/// row_len]` row-major, or a bias with `row_len == 1`) into GGUF `llama`
/// order, as llama.cpp's converter does: within each head, GGUF row `2i` is
/// HF row `i` and GGUF row `2i + 1` is HF row `i + head_dim / 2`. Use
/// `n_head = num_attention_heads` for q and `num_key_value_heads` for k
/// (see [`HfConfig::qk_permute_heads`]). Works on any element type, e.g. f32
/// values or raw bytes with `row_len` counted in bytes.
pub fn permute_qk_rows<T: Copy>(
    data: &[T],
    n_head: usize,
    row_len: usize,
) -> std::result::Result<Vec<T>, PermuteError> {
    let head_dim = permute_head_dim(data.len(), n_head, row_len)?;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for i in 0..half {
            for src in [h * head_dim + i, h * head_dim + half + i] {
                let start = src * row_len;
                if let Some(row) = data.get(start..start + row_len) {
                    out.extend_from_slice(row);
                }
            }
        }
    }
    Ok(out)
}

/// The inverse of [`permute_qk_rows`] (GGUF `llama` order back to HF order),
/// e.g. for exporting or for comparing against HF weights.
pub fn unpermute_qk_rows<T: Copy>(
    data: &[T],
    n_head: usize,
    row_len: usize,
) -> std::result::Result<Vec<T>, PermuteError> {
    let head_dim = permute_head_dim(data.len(), n_head, row_len)?;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for parity in 0..2 {
            for i in 0..half {
                let src = h * head_dim + 2 * i + parity;
                let start = src * row_len;
                if let Some(row) = data.get(start..start + row_len) {
                    out.extend_from_slice(row);
                }
            }
        }
    }
    Ok(out)
}

/// Checks a permutation's arguments and returns the head dimension.
fn permute_head_dim(
    len: usize,
    n_head: usize,
    row_len: usize,
) -> std::result::Result<usize, PermuteError> {
    if row_len == 0 || len == 0 || !len.is_multiple_of(row_len) {
        return Err(PermuteError::BadLength {
            found: len,
            row_len,
        });
    }
    let rows = len / row_len;
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(PermuteError::BadRows { rows, n_head });
    }
    Ok(rows / n_head)
}
