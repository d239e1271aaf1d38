//! Byte-level BPE as llama.cpp's `llm_tokenizer_bpe_session`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::{PreTokenizer, Tokenizer};

const NONE: usize = usize::MAX;

/// Merge ranks, keyed by interned merge halves so that a lookup needs no allocation.
pub(crate) struct BpeModel {
    pub(crate) pre: PreTokenizer,
    /// Llama-3-style vocabularies emit a whole word that is itself a token without
    /// merging (llama.cpp's `ignore_merges`).
    pub(crate) ignore_merges: bool,
    part_ids: HashMap<String, u32>,
    ranks: HashMap<(u32, u32), u32>,
}

impl BpeModel {
    /// `merges` are `"left right"` strings in rank order. As llama.cpp, the separator
    /// is the first space after the first byte, and the first of duplicate merges wins.
    pub(crate) fn new(merges: &[String], pre: PreTokenizer, ignore_merges: bool) -> BpeModel {
        let mut part_ids: HashMap<String, u32> = HashMap::new();
        let mut ranks = HashMap::with_capacity(merges.len());
        let intern = |s: &str, part_ids: &mut HashMap<String, u32>| -> u32 {
            if let Some(&id) = part_ids.get(s) {
                return id;
            }
            let id = part_ids.len() as u32;
            part_ids.insert(s.to_owned(), id);
            id
        };
        for (rank, m) in merges.iter().enumerate() {
            let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                // llama.cpp records ("", "") for these; no symbol is ever empty.
                continue;
            };
            let (Some(a), Some(b)) = (m.get(..pos), m.get(pos + 1..)) else {
                continue;
            };
            let (a, b) = (intern(a, &mut part_ids), intern(b, &mut part_ids));
            ranks.entry((a, b)).or_insert(rank as u32);
        }
        BpeModel {
            pre,
            ignore_merges,
            part_ids,
            ranks,
        }
    }

    fn rank(&self, left: &str, right: &str) -> Option<u32> {
        let a = *self.part_ids.get(left)?;
        let b = *self.part_ids.get(right)?;
        self.ranks.get(&(a, b)).copied()
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

/// The heap pops the lowest rank first, then the leftmost pair
/// (llama.cpp's `llm_bigram_bpe::comparator`).
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    left_len: usize,
    right_len: usize,
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
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Buffers reused across the words of one `encode` call.
#[derive(Default)]
pub(crate) struct Scratch {
    syms: Vec<Symbol>,
    heap: BinaryHeap<Bigram>,
}

impl Tokenizer {
    /// Pre-tokenizes one text fragment and merges each word.
    pub(super) fn bpe_encode_text(
        &self,
        model: &BpeModel,
        text: &str,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        model
            .pre
            .for_each_word(text, |word| self.bpe_encode_word(model, word, scratch, out));
    }

    fn bpe_encode_word(
        &self,
        model: &BpeModel,
        word: &str,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        if model.ignore_merges {
            if let Some(&id) = self.token_to_id.get(word) {
                out.push(id);
                return;
            }
        }
        let syms = &mut scratch.syms;
        let heap = &mut scratch.heap;
        syms.clear();
        heap.clear();
        for (start, c) in word.char_indices() {
            let idx = syms.len();
            let len = c.len_utf8();
            syms.push(Symbol {
                start,
                len,
                prev: if idx == 0 { NONE } else { idx - 1 },
                next: if start + len == word.len() {
                    NONE
                } else {
                    idx + 1
                },
            });
        }
        for i in 1..syms.len() {
            add_bigram(model, word, syms, i - 1, i, heap);
        }

        while let Some(bg) = heap.pop() {
            let (Some(&l), Some(&r)) = (syms.get(bg.left), syms.get(bg.right)) else {
                continue;
            };
            // llama.cpp compares the pair's current text with the queued one; as a
            // symbol only grows to the right, equal lengths mean equal text.
            if l.len == 0 || r.len == 0 || l.len != bg.left_len || r.len != bg.right_len {
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
            add_bigram(model, word, syms, l.prev, bg.left, heap);
            add_bigram(model, word, syms, bg.left, r.next, heap);
        }

        for s in syms.iter().filter(|s| s.len > 0) {
            let piece = word.get(s.start..s.start + s.len).unwrap_or("");
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    // llama.cpp looks each byte up as a one-byte string; only ASCII bytes
                    // can be such strings (vocabulary texts are valid UTF-8).
                    for i in 0..piece.len() {
                        if let Some(&id) = piece.get(i..i + 1).and_then(|b| self.token_to_id.get(b))
                        {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }
}

fn add_bigram(
    model: &BpeModel,
    word: &str,
    syms: &[Symbol],
    left: usize,
    right: usize,
    heap: &mut BinaryHeap<Bigram>,
) {
    let (Some(l), Some(r)) = (syms.get(left), syms.get(right)) else {
        return;
    };
    let (Some(lt), Some(rt)) = (
        word.get(l.start..l.start + l.len),
        word.get(r.start..r.start + r.len),
    ) else {
        return;
    };
    if let Some(rank) = model.rank(lt, rt) {
        heap.push(Bigram {
            rank,
            left,
            right,
            left_len: l.len,
            right_len: r.len,
        });
    }
}
