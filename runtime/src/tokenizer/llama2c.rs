//! llama2.c `tokenizer.bin` (formats.md §6): `u32 max_token_length`, then per token
//! `f32 score`, `i32 len`, `len` bytes. It is SentencePiece data written by llama2.c's
//! `tokenizer.py export`: pieces with `▁` turned into spaces, BOS and EOS written as
//! `"\n<s>\n"` and `"\n</s>\n"`, byte tokens `<0xNN>` at ids 3..259.
//!
//! The loader undoes the export (spaces back to `▁`, `<s>`/`</s>` as control tokens,
//! id 0 unknown, `<0xNN>` byte tokens) and encodes with llama.cpp's SentencePiece
//! algorithm. llama2.c's own `encode` differs on vocabularies that lack a character
//! of a multi-character piece (it looks the dummy-prefix `" "` up as a token and merges
//! byte-fallback tokens by their `<0xNN>` text); on complete SentencePiece vocabularies
//! such as Llama 2's the two agree.

use std::path::Path;

use super::vocab::Builder;
use super::{
    is_byte_token_text, Engine, PieceStyle, SpecialIds, TokenType, Tokenizer, TokenizerError,
    TokenizerKind, SPM_SPACE,
};

const BOS: u32 = 1;
const EOS: u32 = 2;
const UNK: u32 = 0;

impl Tokenizer {
    /// Reads a llama2.c `tokenizer.bin`. The vocabulary size is not in the file (it is
    /// the checkpoint's `vocab_size`): with `Some(n)` exactly `n` records are read
    /// (trailing bytes are ignored, as llama2.c does), with `None` records are read to
    /// the end of the data.
    pub fn from_llama2c_bin(
        data: &[u8],
        vocab_size: Option<usize>,
        name: &str,
    ) -> Result<Tokenizer, TokenizerError> {
        let mut r = Reader { data, pos: 0, name };
        let _max_token_length = r.u32("max_token_length", None)?;
        // Capacity from the data actually present, not from a claimed size.
        let cap = vocab_size.unwrap_or(usize::MAX).min(data.len() / 8);
        let mut tokens = Vec::with_capacity(cap);
        loop {
            match vocab_size {
                Some(n) if tokens.len() >= n => break,
                None if r.pos >= data.len() => break,
                _ => {}
            }
            let id = tokens.len();
            let offset = r.pos;
            let score = f32::from_bits(r.u32("score", Some(id))?);
            let len = r.u32("length", Some(id))? as i32;
            let len = usize::try_from(len).map_err(|_| TokenizerError::BadToken {
                file: name.to_owned(),
                id,
                offset,
                msg: format!("negative length {len}"),
            })?;
            let bytes = r.take(len, "text", Some(id))?;
            let text = std::str::from_utf8(bytes).map_err(|e| TokenizerError::BadToken {
                file: name.to_owned(),
                id,
                offset,
                msg: format!("text is not UTF-8: {e}"),
            })?;
            tokens.push(import_token(id, text, score));
        }
        if tokens.len() <= EOS as usize {
            return Err(TokenizerError::BadToken {
                file: name.to_owned(),
                id: tokens.len(),
                offset: r.pos,
                msg: "llama2.c vocabularies need at least <unk>, <s> and </s> (ids 0..2)".into(),
            });
        }
        Builder {
            name: name.to_owned(),
            engine: Engine::Spm,
            piece_style: PieceStyle::Spm,
            tokens,
            ids: SpecialIds {
                bos: Some(BOS),
                eos: Some(EOS),
                unk: Some(UNK),
                ..SpecialIds::default()
            },
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
            clean_spaces: false,
            model_name: String::new(),
            pre_name: String::new(),
            arch: String::new(),
            add_bos_key: "add_bos",
            bos_key: "bos id 1",
            add_eos_key: "add_eos",
            eos_key: "eos id 2",
        }
        .finish()
    }

    /// Reads a llama2.c `tokenizer.bin` from disk (see [`from_llama2c_bin`](Self::from_llama2c_bin)).
    pub fn open_llama2c_bin(
        path: impl AsRef<Path>,
        vocab_size: Option<usize>,
    ) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let data = std::fs::read(path).map_err(|source| TokenizerError::Io {
            file: name.clone(),
            op: "read",
            source,
        })?;
        Tokenizer::from_llama2c_bin(&data, vocab_size, &name)
    }

    /// Writes the vocabulary as llama2.c's `tokenizer.py export` would (SentencePiece
    /// tokenizers only).
    pub fn to_llama2c_bin(&self) -> Result<Vec<u8>, TokenizerError> {
        if self.kind() != TokenizerKind::Spm {
            return Err(TokenizerError::Unsupported {
                file: self.name.clone(),
                msg: "only SentencePiece vocabularies can be written as a llama2.c tokenizer.bin"
                    .into(),
            });
        }
        let texts: Vec<String> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let i = Some(i as u32);
                if i == self.ids.bos {
                    "\n<s>\n".to_owned()
                } else if i == self.ids.eos {
                    "\n</s>\n".to_owned()
                } else {
                    t.text.replace(SPM_SPACE, " ")
                }
            })
            .collect();
        let max_len = texts.iter().map(String::len).max().unwrap_or(0);
        let mut out = Vec::with_capacity(4 + texts.iter().map(|t| 8 + t.len()).sum::<usize>());
        out.extend_from_slice(&u32_of(max_len, &self.name)?.to_le_bytes());
        for (t, text) in self.tokens.iter().zip(&texts) {
            out.extend_from_slice(&t.score.to_le_bytes());
            out.extend_from_slice(&u32_of(text.len(), &self.name)?.to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        Ok(out)
    }
}

fn u32_of(n: usize, file: &str) -> Result<u32, TokenizerError> {
    u32::try_from(n)
        .ok()
        .filter(|&v| v <= i32::MAX as u32)
        .ok_or_else(|| TokenizerError::Unsupported {
            file: file.to_owned(),
            msg: format!("length {n} does not fit tokenizer.bin's i32"),
        })
}

/// Undoes llama2.c's export of one SentencePiece piece.
fn import_token(id: usize, text: &str, score: f32) -> (String, f32, TokenType) {
    match id as u32 {
        UNK => (text.to_owned(), score, TokenType::Unknown),
        BOS | EOS => (
            text.trim_matches('\n').to_owned(),
            score,
            TokenType::Control,
        ),
        _ if is_byte_token_text(text) => (text.to_owned(), score, TokenType::Byte),
        _ => (text.replace(' ', SPM_SPACE), score, TokenType::Normal),
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    name: &'a str,
}

impl<'a> Reader<'a> {
    /// `what` (of token `id`, if any) names the field in errors.
    fn take(
        &mut self,
        n: usize,
        what: &str,
        id: Option<usize>,
    ) -> Result<&'a [u8], TokenizerError> {
        let available = self.data.len().saturating_sub(self.pos);
        let end = self.pos.checked_add(n).filter(|_| n <= available);
        match end.and_then(|end| self.data.get(self.pos..end)) {
            Some(b) => {
                self.pos += n;
                Ok(b)
            }
            None => Err(TokenizerError::Truncated {
                file: self.name.to_owned(),
                field: match id {
                    Some(id) => format!("token {id} {what}"),
                    None => what.to_owned(),
                },
                offset: self.pos,
                needed: n,
                available,
            }),
        }
    }

    fn u32(&mut self, what: &str, id: Option<usize>) -> Result<u32, TokenizerError> {
        let b = self.take(4, what, id)?;
        let a: [u8; 4] = b.try_into().unwrap_or_default();
        Ok(u32::from_le_bytes(a))
    }
}
