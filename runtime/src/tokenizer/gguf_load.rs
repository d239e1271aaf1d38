//! [`Tokenizer::from_gguf`]: the `tokenizer.ggml.*` metadata, read as llama.cpp's
//! `llama_vocab::impl::load` does.

use crate::gguf::{GgufArray, GgufFile, GgufValue};

use super::bpe::BpeModel;
use super::vocab::Builder;
use super::{Engine, PieceStyle, PreTokenizer, SpecialIds, TokenType, Tokenizer, TokenizerError};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";

/// How llama.cpp configures a BPE vocabulary for a `tokenizer.ggml.pre` value.
struct PreConfig {
    pre: PreTokenizer,
    ignore_merges: bool,
    add_bos: bool,
    clean_spaces: bool,
    no_bos: bool,
}

fn bpe_pre_config(pre: Option<&str>) -> Option<PreConfig> {
    let cfg = |pre, clean_spaces| PreConfig {
        pre,
        ignore_merges: false,
        add_bos: false,
        clean_spaces,
        no_bos: false,
    };
    let name = match pre {
        None => {
            tracing::warn!(
                "missing pre-tokenizer type, using 'default': generation quality will be degraded"
            );
            return Some(cfg(PreTokenizer::Default, true));
        }
        Some(p) => p,
    };
    Some(match name {
        "default" => cfg(PreTokenizer::Default, true),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..cfg(PreTokenizer::Llama3, true)
        },
        "dbrx" | "smaug-bpe" => cfg(PreTokenizer::Llama3, true),
        "glm4" | "chatglm-bpe" => PreConfig {
            no_bos: true,
            ..cfg(PreTokenizer::Llama3, true)
        },
        "falcon" => cfg(PreTokenizer::Falcon, true),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" | "mpt" | "olmo" | "jais" => cfg(PreTokenizer::Gpt2, true),
        "trillion" | "granite-docling" => cfg(PreTokenizer::Gpt2, false),
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            cfg(PreTokenizer::StarCoder, true)
        }
        "command-r" | "smollm" => cfg(PreTokenizer::StarCoder, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open"
        | "grok-2" => cfg(PreTokenizer::Qwen2, false),
        "megrez" | "stablelm2" => cfg(PreTokenizer::Qwen2, true),
        _ => return None,
    })
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let file = f.name().to_owned();
        let model = f.get_str(KEY_MODEL)?;
        let pre_name = f.get_str_opt(KEY_PRE)?;
        let texts = f.get_str_array(KEY_TOKENS)?;
        let n = texts.len();

        let (
            engine,
            piece_style,
            mut ids,
            mut add_bos,
            mut add_eos,
            mut add_space_prefix,
            clean_spaces,
        ) = match model {
            "llama" => {
                let ids = SpecialIds {
                    bos: Some(1),
                    eos: Some(2),
                    unk: Some(0),
                    ..SpecialIds::default()
                };
                (Engine::Spm, PieceStyle::Spm, ids, true, false, true, false)
            }
            "gpt2" => {
                let merges = f.get_str_array(KEY_MERGES)?;
                let cfg = bpe_pre_config(pre_name).ok_or_else(|| {
                    TokenizerError::UnsupportedPreTokenizer {
                        file: file.clone(),
                        key: KEY_PRE,
                        pre: pre_name.unwrap_or_default().to_owned(),
                    }
                })?;
                let ids = SpecialIds {
                    bos: if cfg.no_bos { None } else { Some(11) },
                    eos: Some(11),
                    ..SpecialIds::default()
                };
                let engine = Engine::Bpe(BpeModel::new(merges, cfg.pre, cfg.ignore_merges));
                (
                    engine,
                    PieceStyle::ByteLevel,
                    ids,
                    cfg.add_bos,
                    false,
                    false,
                    cfg.clean_spaces,
                )
            }
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    file,
                    key: KEY_MODEL,
                    model: other.to_owned(),
                })
            }
        };
        if let Some(v) = f.get_bool_opt(KEY_ADD_PREFIX)? {
            add_space_prefix = v;
        }

        let scores = read_scores(f, n)?;
        let types = match f.get(KEY_TOKEN_TYPE) {
            None => None,
            Some(_) => {
                let t = f.get_int_array(KEY_TOKEN_TYPE)?;
                if t.len() < n {
                    return Err(too_short(&file, KEY_TOKEN_TYPE, t.len(), n));
                }
                Some(t)
            }
        };
        let tokens = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let score = scores
                    .as_ref()
                    .and_then(|s| s.get(i).copied())
                    .unwrap_or(0.0);
                let ty = types
                    .as_ref()
                    .and_then(|t| t.get(i).copied())
                    .map_or(TokenType::Normal, TokenType::from_gguf);
                (text.clone(), score, ty)
            })
            .collect();

        // Defaults outside the vocabulary are disabled; ids from the file replace them
        // when in range (llama.cpp warns and keeps the default otherwise).
        for slot in [&mut ids.bos, &mut ids.eos, &mut ids.unk] {
            if slot.is_some_and(|id| id as usize >= n) {
                *slot = None;
            }
        }
        type Slot = fn(&mut SpecialIds) -> &mut Option<u32>;
        let id_keys: [(&str, Slot); 17] = [
            (KEY_BOS, |s| &mut s.bos),
            (KEY_EOS, |s| &mut s.eos),
            ("tokenizer.ggml.eot_token_id", |s| &mut s.eot),
            ("tokenizer.ggml.eom_token_id", |s| &mut s.eom),
            ("tokenizer.ggml.unknown_token_id", |s| &mut s.unk),
            ("tokenizer.ggml.seperator_token_id", |s| &mut s.sep),
            ("tokenizer.ggml.padding_token_id", |s| &mut s.pad),
            ("tokenizer.ggml.mask_token_id", |s| &mut s.mask),
            ("tokenizer.ggml.fim_pre_token_id", |s| &mut s.fim_pre),
            ("tokenizer.ggml.fim_suf_token_id", |s| &mut s.fim_suf),
            ("tokenizer.ggml.fim_mid_token_id", |s| &mut s.fim_mid),
            ("tokenizer.ggml.fim_pad_token_id", |s| &mut s.fim_pad),
            ("tokenizer.ggml.fim_rep_token_id", |s| &mut s.fim_rep),
            ("tokenizer.ggml.fim_sep_token_id", |s| &mut s.fim_sep),
            // Deprecated names of the FIM ids.
            ("tokenizer.ggml.prefix_token_id", |s| &mut s.fim_pre),
            ("tokenizer.ggml.suffix_token_id", |s| &mut s.fim_suf),
            ("tokenizer.ggml.middle_token_id", |s| &mut s.fim_mid),
        ];
        for (key, field) in id_keys {
            let Some(v) = f.get(key) else { continue };
            let slot = field(&mut ids);
            let Some(id) = v.as_int() else {
                return Err(TokenizerError::BadMetadata {
                    file,
                    key: key.to_owned(),
                    msg: format!(
                        "found {}, expected an integer token id",
                        v.type_description()
                    ),
                });
            };
            match u32::try_from(id) {
                Ok(id) if (id as usize) < n => *slot = Some(id),
                _ => tracing::warn!(
                    "{file}: bad special token: {key} = {id}, using default {slot:?}"
                ),
            }
        }
        if let Some(v) = f.get_bool_opt(KEY_ADD_BOS)? {
            add_bos = v;
        }
        if let Some(v) = f.get_bool_opt(KEY_ADD_EOS)? {
            add_eos = v;
        }

        Builder {
            name: file,
            engine,
            piece_style,
            tokens,
            ids,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            model_name: f
                .get_str_opt("general.name")?
                .unwrap_or_default()
                .to_owned(),
            pre_name: pre_name.unwrap_or_default().to_owned(),
            arch: f
                .get_str_opt("general.architecture")?
                .unwrap_or_default()
                .to_owned(),
            add_bos_key: KEY_ADD_BOS,
            bos_key: KEY_BOS,
            add_eos_key: KEY_ADD_EOS,
            eos_key: KEY_EOS,
        }
        .finish()
    }

    /// Opens a GGUF file and builds its tokenizer.
    pub fn open_gguf(path: impl AsRef<std::path::Path>) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_gguf(&GgufFile::open(path)?)
    }
}

/// `tokenizer.ggml.scores`: f32 or i32 (llama.cpp accepts both), at least one per token.
fn read_scores(f: &GgufFile, n: usize) -> Result<Option<Vec<f32>>, TokenizerError> {
    let Some(v) = f.get(KEY_SCORES) else {
        return Ok(None);
    };
    let scores: Vec<f32> = match v {
        GgufValue::Array(GgufArray::F32(s)) => s.clone(),
        GgufValue::Array(GgufArray::I32(s)) => s.iter().map(|&x| x as f32).collect(),
        other => {
            return Err(TokenizerError::BadMetadata {
                file: f.name().to_owned(),
                key: KEY_SCORES.to_owned(),
                msg: format!(
                    "found {}, expected array<float32> or array<int32>",
                    other.type_description()
                ),
            })
        }
    };
    if scores.len() < n {
        return Err(too_short(f.name(), KEY_SCORES, scores.len(), n));
    }
    Ok(Some(scores))
}

fn too_short(file: &str, key: &str, len: usize, n: usize) -> TokenizerError {
    TokenizerError::BadMetadata {
        file: file.to_owned(),
        key: key.to_owned(),
        msg: format!("{len} entries for {n} tokens"),
    }
}
