//! Incremental detokenization: complete UTF-8 text out as tokens come in.

use super::Tokenizer;

/// Turns token ids into text one at a time, holding back the bytes of a character
/// that is not complete yet (byte-fallback tokens split characters). Invalid byte
/// sequences become U+FFFD exactly where [`Tokenizer::decode`] would put them, so the
/// concatenated output of [`push`](Self::push) and [`flush`](Self::flush) equals the
/// one-shot decode of the same ids.
///
/// Pieces follow `llama_token_to_piece`: the space SentencePiece puts before the first
/// word is kept unless [`strip_leading_space`](Self::strip_leading_space) is set.
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    pending: Vec<u8>,
    special: bool,
    strip_leading_space: bool,
    first: bool,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t Tokenizer) -> StreamDecoder<'t> {
        StreamDecoder {
            tok,
            pending: Vec::new(),
            special: false,
            strip_leading_space: false,
            first: true,
        }
    }

    /// Render control tokens as their text (`special` of `llama_token_to_piece`).
    pub fn with_special(mut self, special: bool) -> Self {
        self.special = special;
        self
    }

    /// Drop one leading space of the first token's piece when the vocabulary adds a
    /// space prefix, as `llama_detokenize` does.
    pub fn strip_leading_space(mut self, strip: bool) -> Self {
        self.strip_leading_space = strip;
        self
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let mut out = String::new();
        self.push_into(id, &mut out);
        out
    }

    /// [`push`](Self::push), appending to `out`.
    pub fn push_into(&mut self, id: u32, out: &mut String) {
        let mut piece = self.tok.token_to_piece_with(id, self.special);
        if self.first && self.strip_leading_space && self.tok.add_space_prefix {
            piece = piece.strip_prefix(b" ").unwrap_or(piece);
        }
        self.first = false;
        self.pending.extend_from_slice(piece);
        self.drain_complete(out);
    }

    /// Emits what is left; an incomplete final character becomes U+FFFD.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Moves every complete character (and every definitely invalid sequence, as
    /// U+FFFD) from `pending` to `out`; keeps a trailing incomplete sequence.
    fn drain_complete(&mut self, out: &mut String) {
        let mut start = 0;
        loop {
            let rest = self.pending.get(start..).unwrap_or(&[]);
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    if let Some(s) = rest.get(..valid).and_then(|b| std::str::from_utf8(b).ok()) {
                        out.push_str(s);
                    }
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += valid + bad;
                        }
                        None => {
                            start += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start.min(self.pending.len()));
    }
}
