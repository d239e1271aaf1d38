//! BPE pre-tokenizers: llama.cpp's `unicode_regex_split` for the regex sets selected
//! by `tokenizer.ggml.pre`, written out by hand.
//!
//! llama.cpp applies its regexes one after another, each one splitting every chunk
//! left by the previous one into its matches and the gaps between them. The GPT-2
//! and Llama-3 patterns run through hand-written matchers in llama.cpp
//! (`unicode_regex_split_custom_gpt2/llama3`), ported here statement by statement;
//! the simple category-run patterns (`[\p{P}...]+`, `\p{N}+`, `\p{N}`,
//! `[0-9][0-9][0-9]`) run through `std::regex` there and are plain scans here. The
//! Qwen2 pattern differs from Llama-3's only in `\p{N}` versus `\p{N}{1,3}`; llama.cpp
//! runs it through `std::regex` over a category-collapsed copy of the text, which has
//! the same leftmost-first semantics as the Llama-3 matcher with one-digit groups.

use super::unicode::{byte_to_char, flags, Flags};

/// The pre-tokenizer regex family (from `tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PreTokenizer {
    /// llama.cpp's fallback set (`default` or no `tokenizer.ggml.pre`):
    /// `[\p{P}\$\+<=>\^~\|]+`, then GPT-2's pattern, then `\p{N}+`, then `[0-9][0-9][0-9]`.
    Default,
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    Llama3,
    /// Qwen2: the Llama-3 pattern with single digits (`\p{N}`).
    Qwen2,
    /// StarCoder / Refact / Command-R / SmolLM: `\p{N}`, then GPT-2's pattern.
    StarCoder,
    /// Falcon: ``[\p{P}\$\+<=>\^~\|`]+``, then GPT-2's pattern, then `[0-9][0-9][0-9]`.
    Falcon,
}

#[derive(Clone, Copy)]
enum Stage {
    /// Runs of punctuation and `$+<=>^~|` (plus `` ` `` for Falcon).
    PunctRun {
        backtick: bool,
    },
    Gpt2,
    Llama3 {
        max_digits: usize,
    },
    /// Each number codepoint on its own.
    EachNumber,
    /// Runs of number codepoints.
    NumberRun,
    /// Three ASCII digits.
    Ascii3Digits,
}

impl PreTokenizer {
    fn stages(self) -> &'static [Stage] {
        match self {
            PreTokenizer::Default => &[
                Stage::PunctRun { backtick: false },
                Stage::Gpt2,
                Stage::NumberRun,
                Stage::Ascii3Digits,
            ],
            PreTokenizer::Gpt2 => &[Stage::Gpt2],
            PreTokenizer::Llama3 => &[Stage::Llama3 { max_digits: 3 }],
            PreTokenizer::Qwen2 => &[Stage::Llama3 { max_digits: 1 }],
            PreTokenizer::StarCoder => &[Stage::EachNumber, Stage::Gpt2],
            PreTokenizer::Falcon => &[
                Stage::PunctRun { backtick: true },
                Stage::Gpt2,
                Stage::Ascii3Digits,
            ],
        }
    }

    /// Splits `text` into words and calls `f` with each word, byte-encoded through
    /// the GPT-2 byte map (as llama.cpp's `unicode_byte_encoding_process`).
    pub(crate) fn for_each_word(self, text: &str, mut f: impl FnMut(&str)) {
        let cpts: Vec<char> = text.chars().collect();
        if cpts.is_empty() {
            return;
        }
        let fl: Vec<Flags> = cpts.iter().map(|&c| flags(c)).collect();
        let mut chunks = vec![(0usize, cpts.len())];
        let mut next = Vec::with_capacity(cpts.len() / 3 + 1);
        for stage in self.stages() {
            next.clear();
            for &(ini, end) in &chunks {
                apply(*stage, &cpts, &fl, ini, end, &mut next);
            }
            std::mem::swap(&mut chunks, &mut next);
        }
        let mut word = String::new();
        let mut buf = [0u8; 4];
        for (ini, end) in chunks {
            word.clear();
            for &c in cpts.get(ini..end).unwrap_or(&[]) {
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    word.push(byte_to_char(b));
                }
            }
            f(&word);
        }
    }

    /// The words of `text` (byte-encoded); for tests and debugging.
    pub fn split(self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.for_each_word(text, |w| out.push(w.to_owned()));
        out
    }
}

fn apply(
    stage: Stage,
    cpts: &[char],
    fl: &[Flags],
    ini: usize,
    end: usize,
    out: &mut Vec<(usize, usize)>,
) {
    match stage {
        Stage::Gpt2 => split_gpt2(cpts, fl, ini, end, out),
        Stage::Llama3 { max_digits } => split_llama3(cpts, fl, ini, end, max_digits, out),
        Stage::PunctRun { backtick } => split_matches(ini, end, out, |p| {
            let is = |p: usize| {
                p < end
                    && match cpts.get(p) {
                        Some(&c) => {
                            fl.get(p).is_some_and(|f| f.punct())
                                || matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|')
                                || (backtick && c == '`')
                        }
                        None => false,
                    }
            };
            run_len(p, is)
        }),
        Stage::NumberRun => split_matches(ini, end, out, |p| {
            run_len(p, |p| p < end && fl.get(p).is_some_and(|f| f.number()))
        }),
        Stage::EachNumber => split_matches(ini, end, out, |p| {
            usize::from(fl.get(p).is_some_and(|f| f.number()))
        }),
        Stage::Ascii3Digits => split_matches(ini, end, out, |p| {
            let digit = |p: usize| p < end && cpts.get(p).is_some_and(|c| c.is_ascii_digit());
            if digit(p) && digit(p + 1) && digit(p + 2) {
                3
            } else {
                0
            }
        }),
    }
}

fn run_len(p: usize, is: impl Fn(usize) -> bool) -> usize {
    let mut q = p;
    while is(q) {
        q += 1;
    }
    q - p
}

/// `std::regex_iterator`-style split of `[ini, end)`: leftmost matches (`match_len`
/// returns 0 for no match at a position) and the gaps between them, in order.
fn split_matches(
    ini: usize,
    end: usize,
    out: &mut Vec<(usize, usize)>,
    match_len: impl Fn(usize) -> usize,
) {
    let mut gap_start = ini;
    let mut p = ini;
    while p < end {
        let n = match_len(p).min(end - p);
        if n == 0 {
            p += 1;
            continue;
        }
        if p > gap_start {
            out.push((gap_start, p));
        }
        out.push((p, p + n));
        p += n;
        gap_start = p;
    }
    if end > gap_start {
        out.push((gap_start, end));
    }
}

/// Cursor over one chunk with llama.cpp's out-of-range conventions.
struct Chunk<'a> {
    cpts: &'a [char],
    fl: &'a [Flags],
    end: usize,
    prev_end: usize,
    out: &'a mut Vec<(usize, usize)>,
}

impl Chunk<'_> {
    #[inline]
    fn cpt(&self, p: usize) -> Option<char> {
        if p < self.end {
            self.cpts.get(p).copied()
        } else {
            None
        }
    }
    #[inline]
    fn flags(&self, p: usize) -> Flags {
        if p < self.end {
            self.fl.get(p).copied().unwrap_or(Flags::NONE)
        } else {
            Flags::NONE
        }
    }
    /// llama.cpp's `_add_token`: emits `[prev_end, end)` if non-empty, returns its length.
    #[inline]
    fn add(&mut self, end: usize) -> usize {
        let len = end.saturating_sub(self.prev_end);
        if len > 0 {
            self.out.push((self.prev_end, end));
        }
        self.prev_end = end;
        len
    }
}

/// `'s|'t|'re|'ve|'m|'ll|'d` (case-sensitive for GPT-2; `lower` folds ASCII case for
/// Llama 3, whose `unicode_tolower` maps no non-ASCII codepoint onto these letters).
fn contraction_len(c: &Chunk, pos: usize, lower: bool) -> usize {
    let fold = |ch: Option<char>| ch.map(|ch| if lower { ch.to_ascii_lowercase() } else { ch });
    if c.cpt(pos) != Some('\'') || pos + 1 >= c.end {
        return 0;
    }
    let n = fold(c.cpt(pos + 1));
    if matches!(n, Some('s' | 't' | 'm' | 'd')) {
        return 2;
    }
    if pos + 2 < c.end {
        let nn = fold(c.cpt(pos + 2));
        if matches!(
            (n, nn),
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
        ) {
            return 3;
        }
    }
    0
}

/// Port of llama.cpp's `unicode_regex_split_custom_gpt2`.
fn split_gpt2(cpts: &[char], fl: &[Flags], ini: usize, end: usize, out: &mut Vec<(usize, usize)>) {
    let mut c = Chunk {
        cpts,
        fl,
        end,
        prev_end: ini,
        out,
    };
    let mut pos = ini;
    while pos < end {
        let cpt = c.cpt(pos);
        let f = c.flags(pos);

        let n = contraction_len(&c, pos, false);
        if n > 0 {
            pos += c.add(pos + n);
            continue;
        }

        let space = cpt == Some(' ');
        let mut f2 = if space { c.flags(pos + 1) } else { f };
        // <space>?\p{L}+
        if f2.letter() {
            pos += usize::from(space);
            while f2.letter() {
                pos += 1;
                f2 = c.flags(pos);
            }
            c.add(pos);
            continue;
        }
        // <space>?\p{N}+
        if f2.number() {
            pos += usize::from(space);
            while f2.number() {
                pos += 1;
                f2 = c.flags(pos);
            }
            c.add(pos);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+
        if !(f2.ws() || f2.letter() || f2.number()) && f2.any() {
            pos += usize::from(space);
            while !(f2.ws() || f2.letter() || f2.number()) && f2.any() {
                pos += 1;
                f2 = c.flags(pos);
            }
            c.add(pos);
            continue;
        }

        let mut nws = 0;
        while c.flags(pos + nws).ws() {
            nws += 1;
        }
        // \s+(?!\S)
        if nws > 1 && pos + nws < end {
            pos += nws - 1;
            c.add(pos);
            continue;
        }
        // \s+
        if nws > 0 {
            pos += nws;
            c.add(pos);
            continue;
        }
        // no match
        pos += 1;
        c.add(pos);
    }
}

/// Port of llama.cpp's `unicode_regex_split_custom_llama3`, with the digit group size
/// as a parameter (3 for Llama 3, 1 for Qwen2).
fn split_llama3(
    cpts: &[char],
    fl: &[Flags],
    ini: usize,
    end: usize,
    max_digits: usize,
    out: &mut Vec<(usize, usize)>,
) {
    let mut c = Chunk {
        cpts,
        fl,
        end,
        prev_end: ini,
        out,
    };
    let max_digits = max_digits.max(1);
    let mut pos = ini;
    while pos < end {
        let cpt = c.cpt(pos);
        let f = c.flags(pos);

        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        let n = contraction_len(&c, pos, true);
        if n > 0 {
            pos += c.add(pos + n);
            continue;
        }

        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(cpt == Some('\r') || cpt == Some('\n') || f.number())
            && (f.letter() || c.flags(pos + 1).letter())
        {
            pos += 1;
            while c.flags(pos).letter() {
                pos += 1;
            }
            c.add(pos);
            continue;
        }

        // \p{N}{1,max_digits}
        if f.number() {
            let mut first = pos;
            while c.flags(pos).number() {
                pos += 1;
                if pos - first >= max_digits {
                    c.add(pos);
                    first = pos;
                }
            }
            c.add(pos);
            continue;
        }

        // <space>?[^\s\p{L}\p{N}]+[\r\n]*
        let space = cpt == Some(' ');
        let mut f2 = if space { c.flags(pos + 1) } else { f };
        if !(f2.ws() || f2.letter() || f2.number()) && f.any() {
            pos += usize::from(space);
            while !(f2.ws() || f2.letter() || f2.number()) && f2.any() {
                pos += 1;
                f2 = c.flags(pos);
            }
            while matches!(c.cpt(pos), Some('\r' | '\n')) {
                pos += 1;
            }
            c.add(pos);
            continue;
        }

        let mut nws = 0;
        let mut last_end_r_or_n = 0;
        while c.flags(pos + nws).ws() {
            if matches!(c.cpt(pos + nws), Some('\r' | '\n')) {
                last_end_r_or_n = pos + nws + 1;
            }
            nws += 1;
        }
        // \s*[\r\n]+
        if last_end_r_or_n > 0 {
            pos = last_end_r_or_n;
            c.add(pos);
            continue;
        }
        // \s+(?!\S)
        if nws > 1 && pos + nws < end {
            pos += nws - 1;
            c.add(pos);
            continue;
        }
        // \s+
        if nws > 0 {
            pos += nws;
            c.add(pos);
            continue;
        }
        // no match
        pos += 1;
        c.add(pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words decoded back to text, for readable expectations.
    fn words(pre: PreTokenizer, text: &str) -> Vec<String> {
        pre.split(text)
            .iter()
            .map(|w| {
                let bytes: Vec<u8> = w
                    .chars()
                    .filter_map(super::super::unicode::char_to_byte)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .collect()
    }

    #[test]
    fn gpt2_splits() {
        assert_eq!(
            words(PreTokenizer::Gpt2, "Hello world's  end 123abc\n\n x"),
            ["Hello", " world", "'s", " ", " end", " 123", "abc", "\n\n", " x"]
        );
        assert_eq!(words(PreTokenizer::Gpt2, "a  "), ["a", "  "]);
        assert_eq!(words(PreTokenizer::Gpt2, "DON'T"), ["DON", "'", "T"]);
    }

    #[test]
    fn llama3_splits() {
        assert_eq!(
            words(PreTokenizer::Llama3, "DON'T 12345 hi!!\r\n\n  x"),
            ["DON", "'T", " ", "123", "45", " hi", "!!\r\n\n", " ", " x"]
        );
        assert_eq!(words(PreTokenizer::Qwen2, "a123"), ["a", "1", "2", "3"]);
        assert_eq!(
            words(PreTokenizer::Llama3, " \n \n  y"),
            [" \n \n", " ", " y"]
        );
    }

    #[test]
    fn default_stages() {
        assert_eq!(
            words(PreTokenizer::Default, "x=1234567, (ok)"),
            ["x", "=", "123", "456", "7", ",", " ", "(", "ok", ")"]
        );
    }
}
