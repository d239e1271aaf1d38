//! Hugging Face PEFT LoRA / DoRA checkpoints (`shared/specs/formats.md` §4): a
//! directory with `adapter_config.json` and `adapter_model.safetensors`.
//!
//! Which modules get a delta, and each one's rank and alpha, follow PEFT's own rules
//! (`check_target_module_exists`, `get_pattern_key`): target_modules as a list
//! (exact name or dotted suffix, then `layers_to_transform`), as a regex (full match)
//! or `"all-linear"`; `exclude_modules` first; `rank_pattern` / `alpha_pattern` keys
//! tried in order as `(.*\.)?(KEY)$`. Tensors of modules the config does not select
//! are ignored with a warning, as PEFT ignores unexpected keys.
//!
//! Tensors are used zero-copy over the file's memory map where nothing has to be
//! rewritten (F32/F16/BF16, not permuted, not transposed). For `llama` bases the
//! lora_B rows (and DoRA magnitudes) of q_proj/k_proj are permuted from HF order to
//! the GGUF order the base's q/k weights are in, whichever format the base came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use graft_quant::GgmlType;
use graft_runtime::hf_config::permute_qk_rows;
use graft_runtime::model::{Arch, Model, Proj, Weight};
use graft_runtime::safetensors::SafetensorsModel;
use rayon::prelude::*;
use regex::Regex;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::delta::{projection_shape, Adapter, AdapterFormat, LoraDelta, TensorDelta};
use crate::error::{AdapterError, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Larger configs are surely not PEFT configs (real ones are a few hundred bytes).
pub const MAX_CONFIG_LEN: u64 = 16 << 20;

/// PEFT's defaults for a LoraConfig without these fields.
const DEFAULT_R: usize = 8;
const DEFAULT_ALPHA: f32 = 8.0;
/// PEFT's target modules for llama and qwen2 when the config names none.
const DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

/// Which modules a LoRA config selects (`target_modules`, `exclude_modules`).
#[derive(Debug, Clone)]
pub enum ModuleSet {
    /// Module names, matched exactly or as a dotted suffix of the full name.
    Names(Vec<String>),
    /// A regex the whole module name must match (Python `re.fullmatch`).
    Regex(String, Regex),
}

impl ModuleSet {
    fn contains_exact(&self, module: &str) -> bool {
        matches!(self, ModuleSet::Names(n) if n.iter().any(|k| k == module))
    }

    fn suffix_match(&self, module: &str) -> bool {
        match self {
            ModuleSet::Names(names) => names.iter().any(|k| {
                module == k
                    || module
                        .strip_suffix(k.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            }),
            ModuleSet::Regex(_, re) => re.is_match(module),
        }
    }
}

/// One `rank_pattern` / `alpha_pattern` entry.
#[derive(Debug, Clone)]
pub struct Pattern<T> {
    pub key: String,
    re: Regex,
    pub value: T,
}

/// The parts of `adapter_config.json` graft uses, validated.
#[derive(Debug, Clone)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f32,
    pub target_modules: ModuleSet,
    pub exclude_modules: Option<ModuleSet>,
    pub fan_in_fan_out: bool,
    pub bias: String,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules_to_save: Vec<String>,
    /// None when absent or empty (PEFT then adapts every layer).
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Vec<String>,
    pub rank_pattern: Vec<Pattern<usize>>,
    pub alpha_pattern: Vec<Pattern<f32>>,
    /// Regexes finding a module's layer index (from `layers_pattern`).
    layer_index_res: Vec<Regex>,
}

impl PeftConfig {
    /// Reads and validates `path` (an `adapter_config.json`).
    pub fn load(path: &Path) -> Result<PeftConfig> {
        let fname = path.display().to_string();
        let io = |source| AdapterError::Io {
            file: fname.clone(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_CONFIG_LEN {
            return Err(AdapterError::invalid(
                &fname,
                format!("{len} bytes, expected at most {MAX_CONFIG_LEN} for an adapter config"),
            ));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Self::parse(&bytes, &fname)
    }

    /// Parses the bytes of an `adapter_config.json`; `file` names it in errors.
    pub fn parse(bytes: &[u8], file: &str) -> Result<PeftConfig> {
        let invalid = |what: String| AdapterError::invalid(file, what);
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| invalid(format!("expected a JSON object, found {}", kind(&value))))?;
        let f = Fields { obj, file };

        match f.get("peft_type") {
            Some(Value::String(s)) if s == "LORA" => {}
            Some(v) => {
                return Err(f.bad(
                    "peft_type",
                    v,
                    "\"LORA\" (only LoRA/DoRA adapters are supported)",
                ))
            }
            None => {
                return Err(invalid(
                    "peft_type is missing, expected \"LORA\"".to_owned(),
                ))
            }
        }
        let r = f.rank("r", f.get("r"))?.unwrap_or(DEFAULT_R);
        let lora_alpha = f
            .number("lora_alpha", f.get("lora_alpha"))?
            .unwrap_or(DEFAULT_ALPHA);
        let (target_modules, target_is_str) = match f.get("target_modules") {
            None => (
                ModuleSet::Names(DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect()),
                false,
            ),
            Some(Value::String(s)) if s == "all-linear" => (
                // For llama/qwen2 PEFT expands this to every linear layer but lm_head.
                ModuleSet::Names(Proj::ALL.iter().map(|p| p.hf_module().to_owned()).collect()),
                true,
            ),
            Some(v) => (f.module_set("target_modules", v)?, v.is_string()),
        };
        let exclude_modules = match f.get("exclude_modules") {
            None => None,
            Some(v) => Some(f.module_set("exclude_modules", v)?),
        };
        let fan_in_fan_out = f.boolean("fan_in_fan_out")?;
        let bias = match f.get("bias") {
            None => "none".to_owned(),
            Some(Value::String(s)) if ["none", "all", "lora_only"].contains(&s.as_str()) => {
                s.clone()
            }
            Some(v) => return Err(f.bad("bias", v, "\"none\", \"all\" or \"lora_only\"")),
        };
        let use_rslora = f.boolean("use_rslora")?;
        let use_dora = f.boolean("use_dora")?;
        let modules_to_save = match f.get("modules_to_save") {
            None => Vec::new(),
            Some(v) => f.strings("modules_to_save", v)?,
        };
        let layers_to_transform = match f.get("layers_to_transform") {
            None => None,
            Some(Value::Array(items)) => {
                let mut layers = Vec::with_capacity(items.len());
                for v in items {
                    layers.push(f.index("layers_to_transform", v)?);
                }
                (!layers.is_empty()).then_some(layers)
            }
            Some(v) => Some(vec![f.index("layers_to_transform", v)?]),
        };
        let layers_pattern = match f.get("layers_pattern") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(v) => f.strings("layers_pattern", v)?,
        };
        // PEFT's LoraConfig refuses these combinations.
        if target_is_str && layers_to_transform.is_some() {
            return Err(invalid(
                "layers_to_transform cannot be used when target_modules is a string".to_owned(),
            ));
        }
        if target_is_str && !layers_pattern.is_empty() {
            return Err(invalid(
                "layers_pattern cannot be used when target_modules is a string".to_owned(),
            ));
        }
        for (field, ok) in [
            ("layer_replication", f.get("layer_replication").is_none()),
            ("lora_bias", !f.boolean("lora_bias")?),
            ("use_qalora", !f.boolean("use_qalora")?),
            (
                "target_parameters",
                f.get("target_parameters")
                    .is_none_or(|v| v.as_array().is_some_and(Vec::is_empty)),
            ),
        ] {
            if !ok {
                return Err(invalid(format!(
                    "{field} is set; this PEFT feature is not supported"
                )));
            }
        }

        let layer_index_res = if layers_pattern.is_empty() {
            vec![f.regex("layers_pattern", r"^.*\.[^.]*\.(\d+)\.")?]
        } else {
            layers_pattern
                .iter()
                .map(|p| f.regex("layers_pattern", &format!(r"^.*\.(?:{p})\.(\d+)\.")))
                .collect::<Result<_>>()?
        };
        let patterns = OrderedPatterns::parse(bytes, file)?;
        let mut rank_pattern = Vec::new();
        for (key, v) in patterns.rank {
            let field = format!("rank_pattern[{key:?}]");
            let value = f.rank(&field, Some(&v))?.ok_or_else(|| {
                invalid(format!("{field}: found null, expected a positive integer"))
            })?;
            rank_pattern.push(Pattern {
                re: f.pattern_regex(&field, &key)?,
                key,
                value,
            });
        }
        let mut alpha_pattern = Vec::new();
        for (key, v) in patterns.alpha {
            let field = format!("alpha_pattern[{key:?}]");
            let value = f
                .number(&field, Some(&v))?
                .ok_or_else(|| invalid(format!("{field}: found null, expected a number")))?;
            alpha_pattern.push(Pattern {
                re: f.pattern_regex(&field, &key)?,
                key,
                value,
            });
        }

        Ok(PeftConfig {
            r,
            lora_alpha,
            target_modules,
            exclude_modules,
            fan_in_fan_out,
            bias,
            use_rslora,
            use_dora,
            modules_to_save,
            layers_to_transform,
            layers_pattern,
            rank_pattern,
            alpha_pattern,
            layer_index_res,
        })
    }

    /// Whether PEFT puts a LoRA layer on `module` (a full module name such as
    /// `model.layers.0.self_attn.q_proj`).
    pub fn targets(&self, module: &str) -> bool {
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|ex| ex.suffix_match(module))
        {
            return false;
        }
        if self.target_modules.contains_exact(module) {
            return true;
        }
        if !self.target_modules.suffix_match(module) {
            return false;
        }
        match (&self.target_modules, &self.layers_to_transform) {
            (ModuleSet::Names(_), Some(layers)) => self
                .layer_index(module)
                .is_some_and(|i| layers.contains(&i)),
            _ => true,
        }
    }

    /// The layer index PEFT reads from a module name (for `layers_to_transform`).
    pub fn layer_index(&self, module: &str) -> Option<usize> {
        self.layer_index_res.iter().find_map(|re| {
            re.captures(module)
                .and_then(|c| c.get(1))
                .and_then(|m| m.as_str().parse().ok())
        })
    }

    /// (rank, scale) of `module`: `rank_pattern` / `alpha_pattern` first match, else
    /// `r` / `lora_alpha`; scale `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn rank_scale(&self, module: &str) -> (usize, f32) {
        let r = self
            .rank_pattern
            .iter()
            .find(|p| p.re.is_match(module))
            .map_or(self.r, |p| p.value);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|p| p.re.is_match(module))
            .map_or(self.lora_alpha, |p| p.value);
        let denom = if self.use_rslora {
            (r as f64).sqrt()
        } else {
            r as f64
        };
        (r, (alpha as f64 / denom) as f32)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Field readers with errors naming the file, field, found and expected value.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a str,
}

impl Fields<'_> {
    /// The value of `key`; JSON null counts as absent (PEFT writes null for unset).
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, field: &str, found: &Value, expected: &str) -> AdapterError {
        AdapterError::invalid(
            self.file,
            format!("{field}: found {}, expected {expected}", show(found)),
        )
    }

    fn boolean(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(key, v, "true or false")),
        }
    }

    fn rank(&self, field: &str, v: Option<&Value>) -> Result<Option<usize>> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        v.as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.bad(field, v, "a positive integer"))
    }

    fn index(&self, field: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(field, v, "a layer index (non-negative integer)"))
    }

    fn number(&self, field: &str, v: Option<&Value>) -> Result<Option<f32>> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        v.as_f64()
            .map(|x| x as f32)
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| self.bad(field, v, "a finite number"))
    }

    fn strings(&self, field: &str, v: &Value) -> Result<Vec<String>> {
        let items = v
            .as_array()
            .ok_or_else(|| self.bad(field, v, "a list of strings"))?;
        items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.bad(field, v, "a list of strings"))
            })
            .collect()
    }

    fn module_set(&self, field: &str, v: &Value) -> Result<ModuleSet> {
        match v {
            Value::String(s) => Ok(ModuleSet::Regex(
                s.clone(),
                self.regex(field, &format!("^(?:{s})$"))?,
            )),
            _ => self
                .strings(field, v)
                .map_err(|_| self.bad(field, v, "a list of module names or a regex string"))
                .map(ModuleSet::Names),
        }
    }

    fn pattern_regex(&self, field: &str, key: &str) -> Result<Regex> {
        self.regex(field, &format!(r"^(?:.*\.)?(?:{key})$"))
    }

    fn regex(&self, field: &str, pattern: &str) -> Result<Regex> {
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                AdapterError::invalid(
                    self.file,
                    format!("{field}: invalid regex {pattern:?}: {e}"),
                )
            })
    }
}

/// `rank_pattern` / `alpha_pattern` entries in file order (PEFT tries them in order;
/// serde_json's map would sort them). A repeated key keeps its first position and
/// its last value, as a Python dict does.
#[derive(Default)]
struct OrderedPatterns {
    rank: Vec<(String, Value)>,
    alpha: Vec<(String, Value)>,
}

impl OrderedPatterns {
    fn parse(bytes: &[u8], file: &str) -> Result<OrderedPatterns> {
        serde_json::from_slice(bytes).map_err(|e| {
            AdapterError::invalid(
                file,
                format!("rank_pattern/alpha_pattern: expected objects of key: number ({e})"),
            )
        })
    }
}

struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut out: Vec<(String, Value)> = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    match out.iter_mut().find(|(key, _)| *key == k) {
                        Some(slot) => slot.1 = v,
                        None => out.push((k, v)),
                    }
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for OrderedPatterns {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedPatterns;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an adapter config object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<OrderedPatterns, A::Error> {
                let mut out = OrderedPatterns::default();
                while let Some(k) = m.next_key::<String>()? {
                    match k.as_str() {
                        "rank_pattern" => {
                            out.rank = m
                                .next_value::<Option<Ordered>>()?
                                .map_or(Vec::new(), |o| o.0)
                        }
                        "alpha_pattern" => {
                            out.alpha = m
                                .next_value::<Option<Ordered>>()?
                                .map_or(Vec::new(), |o| o.0)
                        }
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Loads the PEFT adapter in `dir` for `model`.
pub fn load(dir: &Path, model: &Model) -> Result<Adapter> {
    let dname = dir.display().to_string();
    if !dir.is_dir() {
        return Err(AdapterError::invalid(
            &dname,
            "not a directory (a PEFT adapter is a directory with adapter_config.json)",
        ));
    }
    let config = PeftConfig::load(&dir.join(CONFIG_FILE))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        let what = if dir.join("adapter_model.bin").is_file() {
            format!(
                "has adapter_model.bin (PyTorch pickle), which graft does not read; \
                 save the adapter with safe_serialization=True to get {WEIGHTS_FILE}"
            )
        } else {
            format!("{WEIGHTS_FILE} is missing")
        };
        return Err(AdapterError::invalid(&dname, what));
    }
    let weights = SafetensorsModel::open_file(&weights_path)?;
    from_parts(&config, &weights, dir, model)
}

/// What a tensor key of a PEFT state dict holds.
enum Part {
    A,
    B,
    Magnitude,
}

/// Splits a PEFT key into (module name, part); `Err` says why it is not usable.
fn classify(key: &str) -> std::result::Result<(String, Part), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let Some(i) = parts.iter().position(|p| {
        matches!(
            *p,
            "lora_A" | "lora_B" | "lora_magnitude_vector" | "lora_embedding_A" | "lora_embedding_B"
        )
    }) else {
        return Err(
            "is not a LoRA tensor: bias = \"all\"/\"lora_only\", modules_to_save and \
             trainable tokens are not supported (only lora_A/lora_B/lora_magnitude_vector)"
                .to_owned(),
        );
    };
    let module = parts[..i].join(".");
    let module = module
        .strip_prefix("base_model.model.")
        .unwrap_or(&module)
        .to_owned();
    // What follows the part: `weight`, or an adapter name then `weight`.
    let rest = &parts[i + 1..];
    let part = match parts[i] {
        "lora_A" | "lora_B" => {
            match rest {
                ["weight"] | [_, "weight"] => {}
                ["bias"] | [_, "bias"] => {
                    return Err("is a LoRA bias (lora_bias), which is not supported".to_owned())
                }
                _ => {
                    return Err("expected a name ending in lora_A.weight / lora_B.weight".to_owned())
                }
            }
            if parts[i] == "lora_A" {
                Part::A
            } else {
                Part::B
            }
        }
        "lora_magnitude_vector" => {
            if rest.len() > 2 || (rest.len() == 2 && rest[1] != "weight") {
                return Err("expected a name ending in lora_magnitude_vector[.weight]".to_owned());
            }
            Part::Magnitude
        }
        _ => {
            return Err(format!(
                "is an embedding LoRA ({module}); LoRA on embeddings is not supported"
            ))
        }
    };
    Ok((module, part))
}

/// (layer, projection) of an HF module name ending in `layers.N.<parent>.<module>`.
fn parse_module(module: &str) -> std::result::Result<(usize, Proj), String> {
    let parts: Vec<&str> = module.split('.').collect();
    let last = parts.last().copied().unwrap_or_default();
    if matches!(last, "embed_tokens" | "lm_head" | "wte" | "embed_out") {
        return Err(format!(
            "adapts {last}; LoRA on embeddings or the output layer is not supported"
        ));
    }
    if let [.., "layers", n, parent, name] = parts.as_slice() {
        if let (Ok(layer), Some(proj)) = (n.parse::<usize>(), Proj::from_hf_module(name)) {
            if proj.hf_parent() == *parent {
                return Ok((layer, proj));
            }
        }
    }
    Err(format!(
        "module {module} is not one graft can adapt (expected ...layers.N.self_attn.{{q,k,v,o}}_proj \
         or ...layers.N.mlp.{{gate,up,down}}_proj)"
    ))
}

#[derive(Default)]
struct Group {
    module: String,
    a: Option<String>,
    b: Option<String>,
    m: Option<String>,
}

/// The adapter of an opened PEFT checkpoint: `config`, tensors `weights`, for `model`;
/// `source` is the adapter's directory.
pub fn from_parts(
    config: &PeftConfig,
    weights: &SafetensorsModel,
    source: &Path,
    model: &Model,
) -> Result<Adapter> {
    let fname = weights.source().display().to_string();
    let mc = &model.config;
    let mut groups: BTreeMap<(usize, Proj), Group> = BTreeMap::new();
    for key in weights.tensor_names() {
        let (module, part) =
            classify(key).map_err(|what| AdapterError::tensor(&fname, key, what))?;
        let (layer, proj) =
            parse_module(&module).map_err(|what| AdapterError::tensor(&fname, key, what))?;
        if layer >= mc.n_layer {
            return Err(AdapterError::tensor(
                &fname,
                key,
                format!(
                    "layer {layer}, but the base model has {} layers",
                    mc.n_layer
                ),
            ));
        }
        let g = groups.entry((layer, proj)).or_default();
        if g.module.is_empty() {
            g.module = module;
        }
        let slot = match part {
            Part::A => &mut g.a,
            Part::B => &mut g.b,
            Part::Magnitude => &mut g.m,
        };
        if let Some(first) = slot {
            return Err(AdapterError::tensor(
                &fname,
                key,
                format!("a second tensor for the same module as {first} (several adapters in one file?)"),
            ));
        }
        *slot = Some(key.clone());
    }

    let mut adapter = Adapter::new(AdapterFormat::Peft, source.to_path_buf(), mc.n_layer);
    for ((layer, proj), g) in groups {
        if !config.targets(&g.module) {
            tracing::warn!(
                "{fname}: module {} is not selected by {CONFIG_FILE}; its tensors are ignored (as PEFT does)",
                g.module
            );
            continue;
        }
        let (a_name, b_name) = match (&g.a, &g.b) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => {
                return Err(AdapterError::tensor(&fname, a, "has no matching lora_B"))
            }
            (None, Some(b)) => {
                return Err(AdapterError::tensor(&fname, b, "has no matching lora_A"))
            }
            (None, None) => {
                let m = g.m.as_deref().unwrap_or_default();
                return Err(AdapterError::tensor(
                    &fname,
                    m,
                    "a DoRA magnitude without lora_A/lora_B",
                ));
            }
        };
        match (&g.m, config.use_dora) {
            (Some(m), false) => {
                return Err(AdapterError::tensor(
                    &fname,
                    m,
                    "is a DoRA magnitude, but use_dora is false in adapter_config.json",
                ))
            }
            (None, true) => {
                return Err(AdapterError::tensor(
                    &fname,
                    format!("base_model.model.{}.lora_magnitude_vector", g.module),
                    "is missing, but use_dora is true in adapter_config.json",
                ))
            }
            _ => {}
        }
        let (r, scale) = config.rank_scale(&g.module);
        let (out, inp) = projection_shape(mc, proj);
        // The converter's permutation of q/k rows, applied to B's rows (and DoRA's
        // per-row magnitudes) so the delta lines up with the base's GGUF-order rows.
        let heads = match (mc.arch, proj) {
            (Arch::Llama, Proj::Q) => Some(mc.n_head),
            (Arch::Llama, Proj::K) => Some(mc.n_head_kv),
            _ => None,
        };
        let tf = |name: &str, rows, cols, heads| {
            tensor_weight(
                weights,
                &fname,
                name,
                rows,
                cols,
                config.fan_in_fan_out,
                heads,
            )
        };
        let a = tf(a_name, r, inp, None)?;
        let b = tf(b_name, out, r, heads)?;
        let dora_factor = match &g.m {
            None => None,
            Some(m_name) => {
                let m = tensor_weight(weights, &fname, m_name, 1, out, false, None)?;
                let mut m = m.to_f32().map_err(|e| AdapterError::quant(m_name, e))?;
                if let Some(h) = heads {
                    m = permute_qk_rows(&m, h, 1)
                        .map_err(|e| AdapterError::tensor(&fname, m_name, e.to_string()))?;
                }
                let base = model
                    .layers
                    .get(layer)
                    .map(|l| l.proj(proj))
                    .ok_or_else(|| {
                        AdapterError::tensor(&fname, m_name, "the base has no such layer")
                    })?;
                Some(
                    dora_factor(base, &a, &b, scale, &m)
                        .map_err(|what| AdapterError::tensor(&fname, m_name, what))?,
                )
            }
        };
        let delta = LoraDelta {
            a,
            b,
            scale,
            dora_factor,
        };
        adapter.insert(mc, layer, proj, TensorDelta::Lora(delta))?;
    }
    if adapter.is_empty() {
        return Err(AdapterError::invalid(
            &fname,
            format!("no LoRA tensor for a module that {CONFIG_FILE} selects"),
        ));
    }
    Ok(adapter)
}

/// The `rows` x `cols` weight of tensor `name`: zero-copy when the file's bytes can be
/// used as they are, else converted to owned F32. `transposed_ok` accepts a `[cols,
/// rows]` tensor (fan_in_fan_out layouts) and transposes it; `heads` permutes rows
/// from HF to GGUF q/k order.
fn tensor_weight(
    st: &SafetensorsModel,
    file: &str,
    name: &str,
    rows: usize,
    cols: usize,
    transposed_ok: bool,
    heads: Option<usize>,
) -> Result<Weight> {
    let info = st.tensor_info(name)?;
    let shape = info.shape.to_vec();
    // A 1-row weight (DoRA magnitude) is stored as a vector.
    let normal = shape == [rows, cols] || (rows == 1 && shape == [cols]);
    let transposed = !normal && transposed_ok && shape == [cols, rows];
    if !normal && !transposed {
        return Err(AdapterError::Shape {
            file: file.to_owned(),
            tensor: name.to_owned(),
            found: shape,
            expected: if rows == 1 {
                vec![cols]
            } else {
                vec![rows, cols]
            },
        });
    }
    let quant = |e| AdapterError::quant(format!("{file}: tensor {name}"), e);
    let direct_ty = match info.dtype {
        "F32" => Some(GgmlType::F32),
        "F16" => Some(GgmlType::F16),
        "BF16" => Some(GgmlType::BF16),
        _ => None,
    };
    if let (Some(ty), false, None) = (direct_ty, transposed, heads) {
        let (buf, range) = st.tensor_shared(name)?;
        return Weight::shared(ty, rows, cols, buf, range.start, range.len()).map_err(quant);
    }
    let mut values = match info.dtype {
        "F32" | "F16" | "BF16" => st.tensor_f32(name)?,
        "F64" => {
            let (buf, range) = st.tensor_shared(name)?;
            let bytes = (*buf).as_ref().get(range).unwrap_or(&[]);
            bytes
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect()
        }
        other => {
            return Err(AdapterError::tensor(
                file,
                name,
                format!("dtype {other}, expected F32, F16, BF16 or F64"),
            ))
        }
    };
    if values.len() != rows * cols {
        return Err(AdapterError::tensor(
            file,
            name,
            format!("{} values, expected {}", values.len(), rows * cols),
        ));
    }
    if transposed {
        values = transpose(&values, cols, rows);
    }
    if let Some(h) = heads {
        values = permute_qk_rows(&values, h, cols)
            .map_err(|e| AdapterError::tensor(file, name, e.to_string()))?;
    }
    Weight::from_f32(rows, cols, &values).map_err(quant)
}

/// `[rows, cols]` row-major to `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for (i, row) in v.chunks_exact(cols).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            out[j * rows + i] = x;
        }
    }
    out
}

/// DoRA's per-output-row factor `m[o] / ||W[o,:] + scale (B A)[o,:]||` against the
/// base weight `w` (dequantized row by row), in f64.
fn dora_factor(
    w: &Weight,
    a: &Weight,
    b: &Weight,
    scale: f32,
    m: &[f32],
) -> std::result::Result<Vec<f32>, String> {
    let av = a.to_f32().map_err(|e| format!("lora_A: {e}"))?;
    let bv = b.to_f32().map_err(|e| format!("lora_B: {e}"))?;
    let (r, cols, rows) = (a.rows, a.cols, b.rows);
    if w.rows != rows
        || w.cols != cols
        || m.len() != rows
        || bv.len() != rows * r
        || av.len() != r * cols
    {
        return Err(format!(
            "base weight is {}x{}, delta {rows}x{cols}, magnitude {}",
            w.rows,
            w.cols,
            m.len()
        ));
    }
    let s = scale as f64;
    (0..rows)
        .into_par_iter()
        .map(|o| {
            let mut row = vec![0f32; cols];
            w.row_into(o, &mut row)
                .map_err(|e| format!("base row {o}: {e}"))?;
            let mut v: Vec<f64> = row.iter().map(|&x| x as f64).collect();
            for j in 0..r {
                let bj = s * bv[o * r + j] as f64;
                for (vi, &ai) in v.iter_mut().zip(&av[j * cols..(j + 1) * cols]) {
                    *vi += bj * ai as f64;
                }
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            if !(norm.is_finite() && norm > 0.0) {
                return Err(format!(
                    "row {o} of W + scale * B A has norm {norm}; the DoRA factor is undefined"
                ));
            }
            Ok((m[o] as f64 / norm) as f32)
        })
        .collect()
}

/// Writes `adapter`'s LoRA deltas as a PEFT checkpoint in `dir` (`adapter_config.json`
/// and `adapter_model.safetensors`, F32) for a base with `config`: every delta must
/// be plain LoRA of one rank with scale `alpha / rank` (`alpha / sqrt(rank)` with
/// `rslora`). For `llama` bases the q/k lora_B rows go back to Hugging Face order.
pub fn save(
    adapter: &Adapter,
    config: &graft_runtime::model::ModelConfig,
    alpha: f32,
    rslora: bool,
    dir: &Path,
) -> Result<()> {
    use crate::st_write::{self, StTensor};
    let dname = dir.display().to_string();
    let mut tensors = BTreeMap::new();
    let mut modules: Vec<&str> = Vec::new();
    let mut rank = None;
    for (layer, proj, d) in adapter.iter() {
        let name = proj.gguf_weight(layer);
        let l = match d {
            TensorDelta::Lora(l) if l.dora_factor.is_none() => l,
            _ => {
                return Err(AdapterError::tensor(
                    &dname,
                    name,
                    "only plain LoRA deltas can be written as PEFT LoRA",
                ))
            }
        };
        let r = l.rank();
        if *rank.get_or_insert(r) != r {
            return Err(AdapterError::tensor(
                &dname,
                name,
                format!("rank {r}, but another delta has rank {}", rank.unwrap_or(0)),
            ));
        }
        let want = if rslora {
            alpha / (r as f32).sqrt()
        } else {
            alpha / r as f32
        };
        if (l.scale - want).abs() > 1e-6 * want.abs().max(1.0) {
            return Err(AdapterError::tensor(
                &dname,
                name,
                format!("scale {}, expected {want} from alpha {alpha}", l.scale),
            ));
        }
        let a = l.a.to_f32().map_err(|e| AdapterError::quant(&name, e))?;
        let mut b = l.b.to_f32().map_err(|e| AdapterError::quant(&name, e))?;
        let heads = match (config.arch, proj) {
            (Arch::Llama, Proj::Q) => Some(config.n_head),
            (Arch::Llama, Proj::K) => Some(config.n_head_kv),
            _ => None,
        };
        if let Some(h) = heads {
            b = graft_runtime::hf_config::unpermute_qk_rows(&b, h, r)
                .map_err(|e| AdapterError::tensor(&dname, &name, e.to_string()))?;
        }
        let parent = match proj {
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
            _ => "self_attn",
        };
        let module = format!(
            "base_model.model.model.layers.{layer}.{parent}.{}",
            proj.hf_module()
        );
        tensors.insert(
            format!("{module}.lora_A.weight"),
            StTensor::f32(vec![r, l.a.cols], &a),
        );
        tensors.insert(
            format!("{module}.lora_B.weight"),
            StTensor::f32(vec![l.b.rows, r], &b),
        );
        if !modules.contains(&proj.hf_module()) {
            modules.push(proj.hf_module());
        }
    }
    let Some(rank) = rank else {
        return Err(AdapterError::invalid(&dname, "adapter has no LoRA deltas"));
    };
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "use_dora": false,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": modules,
        "base_model_name_or_path": null,
    });
    std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io {
        file: dname.clone(),
        source,
    })?;
    let weights = st_write::to_bytes(&BTreeMap::new(), &tensors, &dname)?;
    st_write::write_atomic(&dir.join(WEIGHTS_FILE), &weights)?;
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| AdapterError::invalid(&dname, e.to_string()))?;
    st_write::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> PeftConfig {
        let text = format!(r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8{extra}}}"#);
        PeftConfig::parse(text.as_bytes(), "test").unwrap()
    }

    #[test]
    fn target_list_matches_suffix_and_layers() {
        let c = cfg(r#", "target_modules": ["q_proj"], "layers_to_transform": [1]"#);
        assert!(c.targets("model.layers.1.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.1.self_attn.qq_proj"));
        assert!(!c.targets("model.layers.1.self_attn.k_proj"));
        // An exact full name bypasses layers_to_transform, as in PEFT.
        let c = cfg(
            r#", "target_modules": ["model.layers.0.self_attn.q_proj"], "layers_to_transform": 1"#,
        );
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn target_regex_and_exclude() {
        let c = cfg(
            r#", "target_modules": ".*\\.(q|v)_proj", "exclude_modules": ["model.layers.1.self_attn.v_proj"]"#,
        );
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(c.targets("model.layers.0.self_attn.v_proj"));
        assert!(!c.targets("model.layers.1.self_attn.v_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        let c = cfg(r#", "target_modules": "all-linear""#);
        assert!(c.targets("model.layers.3.mlp.down_proj"));
    }

    #[test]
    fn patterns_first_match_in_file_order() {
        let c = cfg(
            r#", "rank_pattern": {"q_proj": 2, "layers.0.self_attn.q_proj": 16, "a": 1}, "alpha_pattern": {"z_proj|q_proj": 3.0}, "use_rslora": true"#,
        );
        assert_eq!(c.rank_pattern[0].key, "q_proj");
        let (r, s) = c.rank_scale("model.layers.0.self_attn.q_proj");
        assert_eq!(r, 2);
        assert_eq!(s, (3.0f64 / 2f64.sqrt()) as f32);
        let (r, s) = c.rank_scale("model.layers.0.self_attn.k_proj");
        assert_eq!((r, s), (4, 4.0));
        // The pattern must match whole dotted components.
        assert_eq!(c.rank_scale("model.layers.0.self_attn.xq_proj").0, 4);
    }

    #[test]
    fn classify_keys() {
        let (m, p) =
            classify("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap();
        assert_eq!(m, "model.layers.0.self_attn.q_proj");
        assert!(matches!(p, Part::A));
        let (_, p) =
            classify("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight").unwrap();
        assert!(matches!(p, Part::B));
        for k in [
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector.weight",
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector.default.weight",
        ] {
            assert!(matches!(classify(k).unwrap().1, Part::Magnitude), "{k}");
        }
        assert!(classify("base_model.model.model.layers.0.self_attn.q_proj.bias").is_err());
        assert!(classify("base_model.model.model.embed_tokens.lora_embedding_A").is_err());
        assert!(parse_module("model.layers.0.self_attn.up_proj").is_err());
        assert!(parse_module("lm_head").unwrap_err().contains("lm_head"));
        assert_eq!(
            parse_module("model.layers.7.mlp.down_proj").unwrap(),
            (7, Proj::Down)
        );
    }
}
