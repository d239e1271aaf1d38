//! HF `tokenizer.json` through the `tokenizers` crate (feature `hf-tokenizers`).
//!
//! Encoding is the crate's; the vocabulary, token types, pieces and special ids are
//! derived here so that pieces, streaming decode and EOG detection behave as for a
//! GGUF converted from the same files.

use std::path::Path;

use serde_json::Value;

use super::vocab::Builder;
use super::{
    is_byte_token_text, Engine, PieceStyle, SpecialIds, TokenType, Tokenizer, TokenizerError,
};

pub(crate) struct HfModel {
    /// Splits special tokens out of the text (`parse_special = true`).
    parse: tokenizers::Tokenizer,
    /// Treats special tokens as text (`encode_special_tokens`), user-defined added
    /// tokens are still split, as in llama.cpp.
    literal: tokenizers::Tokenizer,
}

impl HfModel {
    pub(crate) fn encode(
        &self,
        file: &str,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let t = if parse_special {
            &self.parse
        } else {
            &self.literal
        };
        t.encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Hf {
                file: file.to_owned(),
                msg: format!("encode: {e}"),
            })
    }
}

// Used when tokenizer_config.json does not name BOS / EOS.
const BOS_TEXTS: &[&str] = &["<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"];
const EOS_TEXTS: &[&str] = &[
    "</s>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|im_end|>",
    "<eos>",
];

impl Tokenizer {
    /// Loads an HF `tokenizer.json`; BOS/EOS/pad and `add_bos_token` come from a
    /// `tokenizer_config.json` next to it when there is one.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TokenizerError::Io {
                file: p.display().to_string(),
                op: "read",
                source,
            })
        };
        let json = read(path)?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read(&config_path)?)
        } else {
            None
        };
        Tokenizer::from_hf_json(&json, config.as_deref(), &name)
    }

    /// [`from_hf_file`](Self::from_hf_file) from bytes; `name` labels errors.
    pub fn from_hf_json(
        json: &[u8],
        config: Option<&[u8]>,
        name: &str,
    ) -> Result<Tokenizer, TokenizerError> {
        let hf_err = |what: &str, e: &dyn std::fmt::Display| TokenizerError::Hf {
            file: name.to_owned(),
            msg: format!("{what}: {e}"),
        };
        let mut parse =
            tokenizers::Tokenizer::from_bytes(json).map_err(|e| hf_err("tokenizer.json", &e))?;
        parse
            .with_truncation(None)
            .map_err(|e| hf_err("disabling truncation", &e))?;
        parse.with_padding(None);
        let mut literal = parse.clone();
        literal.set_encode_special_tokens(true);

        let root: Value = serde_json::from_slice(json).map_err(|e| hf_err("tokenizer.json", &e))?;
        let config: Option<Value> = match config {
            Some(c) => {
                Some(serde_json::from_slice(c).map_err(|e| hf_err("tokenizer_config.json", &e))?)
            }
            None => None,
        };

        let mut decoders = Vec::new();
        collect_types(root.get("decoder"), &mut decoders);
        let has = |t: &str| decoders.iter().any(|d| d == t);
        let style = if has("ByteLevel") {
            PieceStyle::ByteLevel
        } else if has("Metaspace") || has("Replace") || has("ByteFallback") {
            PieceStyle::Spm
        } else {
            PieceStyle::Raw
        };
        let byte_fallback = has("ByteFallback")
            || root
                .pointer("/model/byte_fallback")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let unk_text = root.pointer("/model/unk_token").and_then(Value::as_str);

        let vocab = parse.get_vocab(true);
        let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        // Ids index a dense table: refuse absurdly sparse ones instead of allocating.
        if n > vocab.len().saturating_add(1 << 20) {
            return Err(hf_err(
                "vocab",
                &format!("{} tokens with ids up to {}", vocab.len(), n - 1),
            ));
        }
        let mut tokens: Vec<(String, f32, TokenType)> =
            vec![(String::new(), 0.0, TokenType::Undefined); n];
        for (text, id) in vocab {
            let ty = if Some(text.as_str()) == unk_text {
                TokenType::Unknown
            } else if byte_fallback && is_byte_token_text(&text) {
                TokenType::Byte
            } else {
                TokenType::Normal
            };
            if let Some(slot) = tokens.get_mut(id as usize) {
                *slot = (text, 0.0, ty);
            }
        }
        for (id, added) in parse.get_added_tokens_decoder() {
            if let Some(slot) = tokens.get_mut(id as usize) {
                slot.2 = if Some(added.content.as_str()) == unk_text {
                    TokenType::Unknown
                } else if added.special {
                    TokenType::Control
                } else {
                    TokenType::UserDefined
                };
            }
        }

        let find = |texts: &[&str]| {
            texts
                .iter()
                .find_map(|t| tokens.iter().position(|(x, _, _)| x == t))
                .map(|i| i as u32)
        };
        let named = |key: &str| {
            let v = config.as_ref()?.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            tokens
                .iter()
                .position(|(x, _, _)| x == text)
                .map(|i| i as u32)
        };
        let flag = |key: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(Value::as_bool)
        };
        let ids = SpecialIds {
            bos: named("bos_token").or_else(|| find(BOS_TEXTS)),
            eos: named("eos_token").or_else(|| find(EOS_TEXTS)),
            unk: named("unk_token").or_else(|| unk_text.and_then(|u| find(&[u]))),
            pad: named("pad_token"),
            ..SpecialIds::default()
        };
        let add_bos = flag("add_bos_token").unwrap_or(false) && ids.bos.is_some();
        let add_eos = flag("add_eos_token").unwrap_or(false) && ids.eos.is_some();

        Builder {
            name: name.to_owned(),
            engine: Engine::Hf(Box::new(HfModel { parse, literal })),
            piece_style: style,
            tokens,
            ids,
            add_bos,
            add_eos,
            add_space_prefix: style == PieceStyle::Spm,
            clean_spaces: flag("clean_up_tokenization_spaces").unwrap_or(false),
            model_name: String::new(),
            pre_name: String::new(),
            arch: String::new(),
            add_bos_key: "add_bos_token",
            bos_key: "bos_token",
            add_eos_key: "add_eos_token",
            eos_key: "eos_token",
        }
        .finish()
    }
}

/// The `type` of a component and of its nested `decoders` (HF `Sequence`).
fn collect_types(v: Option<&Value>, out: &mut Vec<String>) {
    let Some(v) = v else { return };
    if let Some(t) = v.get("type").and_then(Value::as_str) {
        out.push(t.to_owned());
    }
    if let Some(list) = v.get("decoders").and_then(Value::as_array) {
        for d in list {
            collect_types(Some(d), out);
        }
    }
}
