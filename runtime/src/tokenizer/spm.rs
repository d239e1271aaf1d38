//! SentencePiece BPE as llama.cpp's `llm_tokenizer_spm_session`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{Fragment, Tokenizer, SPM_SPACE};

const NONE: usize = usize::MAX;

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

/// A mergeable adjacent pair. The heap pops the highest score first, then the
/// leftmost pair (llama.cpp's `llm_bigram_spm::comparator`).
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        // Scores compare as C++ `<` does (NaN and -0.0 equal to everything / 0.0),
        // then the smaller left index wins.
        match self.score.partial_cmp(&other.score) {
            Some(Ordering::Less) => Ordering::Less,
            Some(Ordering::Greater) => Ordering::Greater,
            _ => other.left.cmp(&self.left),
        }
    }
}

impl Tokenizer {
    /// The SentencePiece branch of llama.cpp's `tokenize`: BOS, then each text
    /// fragment with a space prefix when it follows BOS/a special token (or starts
    /// the text) and spaces escaped to `▁`, special-token fragments as their ids.
    pub(super) fn spm_encode(
        &self,
        text: &str,
        fragments: &[Fragment],
        add_special: bool,
        out: &mut Vec<u32>,
    ) {
        let mut is_prev_special = true;
        if add_special && self.add_bos {
            out.extend(self.ids.bos);
        }
        let mut buf = String::new();
        for frag in fragments {
            match *frag {
                Fragment::Text(s, e) => {
                    buf.clear();
                    if self.add_space_prefix && is_prev_special {
                        buf.push_str(SPM_SPACE);
                    }
                    for c in text.get(s..e).unwrap_or("").chars() {
                        if c == ' ' {
                            buf.push_str(SPM_SPACE);
                        } else {
                            buf.push(c);
                        }
                    }
                    self.spm_encode_escaped(&buf, out);
                    is_prev_special = false;
                }
                Fragment::Token(id) => {
                    out.push(id);
                    is_prev_special = true;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.ids.eos);
        }
    }

    /// Merges characters of one escaped fragment by piece score.
    fn spm_encode_escaped(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let idx = syms.len();
            let len = c.len_utf8();
            syms.push(Symbol {
                start,
                len,
                prev: if idx == 0 { NONE } else { idx - 1 },
                next: if start + len == text.len() {
                    NONE
                } else {
                    idx + 1
                },
            });
        }
        if syms.is_empty() {
            return;
        }

        let mut heap = BinaryHeap::with_capacity(syms.len());
        for i in 1..syms.len() {
            self.spm_try_add_bigram(text, &syms, i - 1, i, &mut heap);
        }

        while let Some(bg) = heap.pop() {
            let (Some(&l), Some(&r)) = (syms.get(bg.left), syms.get(bg.right)) else {
                continue;
            };
            // Stale: one side was merged away or grew since the pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            if let Some(ls) = syms.get_mut(bg.left) {
                ls.len += r.len;
                ls.next = r.next;
            }
            if let Some(rs) = syms.get_mut(bg.right) {
                rs.len = 0;
            }
            if let Some(n) = syms.get_mut(r.next) {
                n.prev = bg.left;
            }
            self.spm_try_add_bigram(text, &syms, l.prev, bg.left, &mut heap);
            self.spm_try_add_bigram(text, &syms, bg.left, r.next, &mut heap);
        }

        // Every merged symbol is a vocabulary piece; single characters that are not
        // fall back to byte tokens (llama.cpp's `resegment`).
        let mut i = 0;
        while let Some(&s) = syms.get(i) {
            let piece = text.get(s.start..s.start + s.len).unwrap_or("");
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        // llama.cpp throws when neither `<0xNN>` nor the byte itself is
                        // in the vocabulary; the unknown token is the graceful answer.
                        if let Some(id) = self.byte_tokens[b as usize].or(self.ids.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    fn spm_try_add_bigram(
        &self,
        text: &str,
        syms: &[Symbol],
        left: usize,
        right: usize,
        heap: &mut BinaryHeap<Bigram>,
    ) {
        let (Some(l), Some(r)) = (syms.get(left), syms.get(right)) else {
            return;
        };
        let size = l.len + r.len;
        let Some(piece) = text.get(l.start..l.start + size) else {
            return;
        };
        let Some(&id) = self.token_to_id.get(piece) else {
            return;
        };
        let Some(tok) = self.tokens.get(id as usize) else {
            return;
        };
        heap.push(Bigram {
            score: tok.score,
            left,
            right,
            size,
        });
    }
}
