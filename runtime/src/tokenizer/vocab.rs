//! The load-time steps shared by every source (GGUF, llama2.c, HF): token map,
//! special-token detection, EOG set, attribute fix-ups and the piece cache, in the
//! order of llama.cpp's `llama_vocab::impl::load`.

use std::collections::{BTreeSet, HashMap};

use super::unicode::char_to_byte;
use super::{
    byte_token_value, Engine, PieceStyle, SpecialIds, SpecialTrie, TokenAttr, TokenData, TokenType,
    Tokenizer, TokenizerError, SPM_SPACE,
};

/// Everything read from a tokenizer source, before llama.cpp's fix-ups.
pub(crate) struct Builder {
    pub(crate) name: String,
    pub(crate) engine: Engine,
    pub(crate) piece_style: PieceStyle,
    /// (text, score, type); empty texts are replaced as llama.cpp does.
    pub(crate) tokens: Vec<(String, f32, TokenType)>,
    pub(crate) ids: SpecialIds,
    pub(crate) add_bos: bool,
    pub(crate) add_eos: bool,
    pub(crate) add_space_prefix: bool,
    pub(crate) clean_spaces: bool,
    /// `general.name`, `tokenizer.ggml.pre`, `general.architecture`: llama.cpp sets
    /// strip attributes for a few models by name.
    pub(crate) model_name: String,
    pub(crate) pre_name: String,
    pub(crate) arch: String,
    /// Metadata keys, for error messages.
    pub(crate) add_bos_key: &'static str,
    pub(crate) bos_key: &'static str,
    pub(crate) add_eos_key: &'static str,
    pub(crate) eos_key: &'static str,
}

// Texts llama.cpp recognises when the metadata does not name the token.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// gpt-oss: always rendered (llama.cpp makes them user-defined).
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

impl Builder {
    pub(crate) fn finish(self) -> Result<Tokenizer, TokenizerError> {
        let Builder {
            name,
            engine,
            piece_style,
            tokens: raw,
            mut ids,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            model_name,
            pre_name,
            arch,
            add_bos_key,
            bos_key,
            add_eos_key,
            eos_key,
        } = self;

        let n = raw.len();
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::BadMetadata {
                file: name,
                key: "tokenizer.ggml.tokens".into(),
                msg: format!("{n} tokens do not fit 32-bit ids"),
            });
        }
        let mut tokens = Vec::with_capacity(n);
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, (text, score, ty)) in raw.into_iter().enumerate() {
            let text = if text.is_empty() {
                tracing::warn!("{name}: empty token at index {i}");
                format!("[EMPTY_{i}]")
            } else {
                text
            };
            if let Some(&first) = token_to_id.get(&text) {
                return Err(TokenizerError::DuplicateToken {
                    file: name,
                    text,
                    first,
                    second: i as u32,
                });
            }
            token_to_id.insert(text.clone(), i as u32);
            tokens.push(TokenData {
                text,
                score,
                ty,
                attr: TokenAttr::from_type(ty),
            });
        }

        if add_bos && ids.bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                file: name,
                add_key: add_bos_key,
                id_key: bos_key,
            });
        }
        if add_eos && ids.eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                file: name,
                add_key: add_eos_key,
                id_key: eos_key,
            });
        }

        // llama.cpp walks an unordered map here; ids in ascending order make the
        // choice deterministic when several texts of one list are present.
        let force_control = |tokens: &mut Vec<TokenData>, id: u32| {
            if let Some(t) = tokens.get_mut(id as usize) {
                if !t.attr.intersects(TokenAttr::CONTROL) {
                    tracing::warn!(
                        "{name}: control-looking token {id} {:?} was not control-type; overriding",
                        t.text
                    );
                    t.attr = t.attr | TokenAttr::CONTROL;
                }
            }
        };
        let detect = |tokens: &mut Vec<TokenData>, slot: &mut Option<u32>, texts: &[&str]| {
            if slot.is_some() {
                return;
            }
            let found = tokens
                .iter()
                .position(|t| texts.contains(&t.text.as_str()))
                .map(|i| i as u32);
            if let Some(id) = found {
                *slot = Some(id);
                force_control(tokens, id);
            }
        };
        detect(&mut tokens, &mut ids.eot, EOT_TEXTS);
        detect(&mut tokens, &mut ids.eom, EOM_TEXTS);
        detect(&mut tokens, &mut ids.fim_pre, FIM_PRE_TEXTS);
        detect(&mut tokens, &mut ids.fim_suf, FIM_SUF_TEXTS);
        detect(&mut tokens, &mut ids.fim_mid, FIM_MID_TEXTS);
        detect(&mut tokens, &mut ids.fim_pad, FIM_PAD_TEXTS);
        detect(&mut tokens, &mut ids.fim_rep, FIM_REP_TEXTS);
        detect(&mut tokens, &mut ids.fim_sep, FIM_SEP_TEXTS);

        // Control tokens named "...unused..." are unused.
        for t in tokens.iter_mut() {
            if t.attr.intersects(TokenAttr::CONTROL) && t.text.contains("unused") {
                t.attr = t.attr | TokenAttr::UNUSED;
            }
        }

        let mut eog = BTreeSet::new();
        eog.extend(ids.fim_pad);
        eog.extend(ids.fim_rep);
        eog.extend(ids.fim_sep);
        for i in 0..tokens.len() {
            if tokens
                .get(i)
                .is_some_and(|t| EOG_TEXTS.contains(&t.text.as_str()))
            {
                eog.insert(i as u32);
                force_control(&mut tokens, i as u32);
            }
        }
        for t in tokens.iter_mut() {
            if ALWAYS_RENDERED.contains(&t.text.as_str()) {
                t.attr = TokenAttr::USER_DEFINED;
            }
        }
        eog.extend(ids.eos);
        eog.extend(ids.eot);
        eog.extend(ids.eom);

        // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
        let eog_with = |tokens: &Vec<TokenData>, eog: &BTreeSet<u32>, texts: &[&str]| {
            eog.iter().copied().find(|&id| {
                tokens
                    .get(id as usize)
                    .is_some_and(|t| texts.contains(&t.text.as_str()))
            })
        };
        let has_return = eog_with(&tokens, &eog, &["<|return|>"]).is_some();
        let has_call = eog_with(&tokens, &eog, &["<|call|>", "<|calls|>"]).is_some();
        let has_flush = eog_with(&tokens, &eog, &["<|flush|>"]).is_some();
        if let Some(end_id) = eog_with(&tokens, &eog, &["<|end|>"]) {
            if has_call && (has_return || has_flush) {
                eog.remove(&end_id);
                if let Some(t) = tokens.get_mut(end_id as usize) {
                    t.attr = TokenAttr::USER_DEFINED;
                }
            }
        }
        // gemma4 / paddleocr: "</s>" is not an end-of-generation token there.
        if eog_with(&tokens, &eog, &["<|tool_response>"]).is_some() {
            if let Some(s_id) = eog_with(&tokens, &eog, &["</s>"]) {
                eog.remove(&s_id);
                if let Some(t) = tokens.get_mut(s_id as usize) {
                    t.attr = TokenAttr::NORMAL;
                }
            }
        }

        // Special tokens, longest first. llama.cpp's `std::sort` leaves ties in an
        // unspecified order; ties here stay in id order.
        let special_mask = TokenAttr::CONTROL | TokenAttr::USER_DEFINED | TokenAttr::UNKNOWN;
        let mut special_tokens: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                tokens
                    .get(i as usize)
                    .is_some_and(|t| t.attr.intersects(special_mask))
            })
            .collect();
        special_tokens.sort_by_key(|&i| {
            std::cmp::Reverse(tokens.get(i as usize).map_or(0, |t| t.text.len()))
        });

        // Piece cache (`token_to_piece(special = true)`), built before the strip
        // attributes below, as in llama.cpp.
        let mut piece_bytes = Vec::new();
        let mut piece_ofs = Vec::with_capacity(tokens.len() + 1);
        piece_ofs.push(0);
        for t in &tokens {
            append_piece(piece_style, t, &mut piece_bytes);
            piece_ofs.push(piece_bytes.len());
        }

        // Per-model strip attributes (llama.cpp "Handle per token attributes").
        let set_attr = |tokens: &mut Vec<TokenData>, text: &str, attr: TokenAttr, on: bool| {
            if let Some(&id) = token_to_id.get(text) {
                if let Some(t) = tokens.get_mut(id as usize) {
                    t.attr.set(attr, on);
                }
            }
        };
        let model_name = model_name.to_lowercase();
        let contains_any = |s: &str, subs: &[&str]| subs.iter().any(|x| s.contains(x));
        if contains_any(&pre_name, &["jina-v2-de", "jina-v2-es", "jina-v2-code"])
            || contains_any(&arch, &["nomic-bert-moe", "jina-bert-v3"])
        {
            set_attr(&mut tokens, "<mask>", TokenAttr::LSTRIP, true);
        } else if contains_any(&model_name, &["phi-3", "phi3"]) {
            for &id in &special_tokens {
                if let Some(t) = tokens.get_mut(id as usize) {
                    t.attr.set(TokenAttr::RSTRIP, true);
                }
            }
            set_attr(&mut tokens, "</s>", TokenAttr::RSTRIP, true);
            for text in ["<unk>", "<s>", "<|endoftext|>"] {
                set_attr(&mut tokens, text, TokenAttr::RSTRIP, false);
            }
        } else if contains_any(&model_name, &["modern-bert"]) {
            set_attr(&mut tokens, "[MASK]", TokenAttr::LSTRIP, true);
        }

        // SentencePiece byte fallback: `<0xNN>`, else the byte as a one-byte text.
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = token_to_id
                .get(&format!("<0x{b:02X}>"))
                .copied()
                .or_else(|| {
                    char::from_u32(b as u32)
                        .filter(char::is_ascii)
                        .and_then(|c| token_to_id.get(c.encode_utf8(&mut [0; 4]) as &str))
                        .copied()
                });
        }

        let special_trie = SpecialTrie::new(
            special_tokens
                .iter()
                .map(|&i| tokens.get(i as usize).map_or("", |t| t.text.as_str())),
        );

        Ok(Tokenizer {
            name,
            engine,
            tokens,
            token_to_id,
            piece_bytes,
            piece_ofs,
            special_tokens,
            special_trie,
            byte_tokens,
            ids,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
        })
    }
}

/// llama.cpp's `token_to_piece(special = true)` for one token.
fn append_piece(style: PieceStyle, t: &TokenData, out: &mut Vec<u8>) {
    let text = t.text.as_str();
    if t.attr
        .intersects(TokenAttr::UNKNOWN | TokenAttr::CONTROL | TokenAttr::USER_DEFINED)
    {
        out.extend_from_slice(text.as_bytes());
    } else if t.attr.intersects(TokenAttr::NORMAL) {
        match style {
            PieceStyle::Spm => out.extend_from_slice(text.replace(SPM_SPACE, " ").as_bytes()),
            PieceStyle::ByteLevel => decode_byte_level(text, out),
            PieceStyle::Raw => out.extend_from_slice(text.as_bytes()),
        }
    } else if t.attr.intersects(TokenAttr::BYTE) {
        out.push(byte_token_value(text));
    }
    // Unused and undefined tokens render as nothing.
}

/// llama.cpp's `llama_decode_text`: each character back through the GPT-2 byte map;
/// characters outside it become `[UNK_BYTE_0x<utf8 hex><token text>]`.
fn decode_byte_level(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).as_bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
}
