//! Errors from building a tokenizer (GGUF metadata, llama2.c `tokenizer.bin`,
//! HF `tokenizer.json`). Each names the file and the key or token concerned.

use crate::gguf::GgufError;

/// Why a tokenizer could not be built. Encoding and decoding never fail: unknown ids
/// render as nothing, text always encodes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A metadata key is missing or has the wrong type (the GGUF error names both).
    #[error(transparent)]
    Gguf(#[from] GgufError),

    #[error(
        "{file}: {key}: unsupported tokenizer model {model:?} (supported: \"llama\", \"gpt2\")"
    )]
    UnsupportedModel {
        file: String,
        key: &'static str,
        model: String,
    },

    #[error("{file}: {key}: unsupported BPE pre-tokenizer {pre:?}")]
    UnsupportedPreTokenizer {
        file: String,
        key: &'static str,
        pre: String,
    },

    /// A metadata value is present but unusable (wrong array type, too short, ...).
    #[error("{file}: {key}: {msg}")]
    BadMetadata {
        file: String,
        key: String,
        msg: String,
    },

    /// llama.cpp refuses vocabularies where two ids share a text.
    #[error("{file}: duplicate token {text:?} at ids {first} and {second}")]
    DuplicateToken {
        file: String,
        text: String,
        first: u32,
        second: u32,
    },

    /// `add_bos_token` / `add_eos_token` is set but the matching id is not.
    #[error("{file}: {add_key} is true, but {id_key} is not set (or out of range)")]
    MissingSpecialToken {
        file: String,
        add_key: &'static str,
        id_key: &'static str,
    },

    /// A field of a llama2.c `tokenizer.bin` runs past the end of the data.
    #[error("{file}: truncated at byte {offset}: {field} needs {needed} bytes, {available} left")]
    Truncated {
        file: String,
        field: String,
        offset: usize,
        needed: usize,
        available: usize,
    },

    /// A token record of a llama2.c `tokenizer.bin` is malformed.
    #[error("{file}: token {id} (at byte {offset}): {msg}")]
    BadToken {
        file: String,
        id: usize,
        offset: usize,
        msg: String,
    },

    #[error("{file}: {op}: {source}")]
    Io {
        file: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The HF `tokenizers` crate rejected the file.
    #[error("{file}: {msg}")]
    Hf { file: String, msg: String },

    /// The tokenizer is not of a kind this operation supports.
    #[error("{file}: {msg}")]
    Unsupported { file: String, msg: String },
}
