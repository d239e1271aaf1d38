//! Tokenizers that reproduce llama.cpp's `llama_tokenize` / `llama_token_to_piece`.
//!
//! * `tokenizer.ggml.model = "llama"`: SentencePiece BPE as llama.cpp's
//!   `llm_tokenizer_spm` (space prefix, `' '` -> `▁`, bigram merges by piece score,
//!   byte fallback to `<0xNN>`).
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE with ranked merges and the
//!   pre-tokenizer regexes selected by `tokenizer.ggml.pre` ([`PreTokenizer`]).
//! * llama2.c `tokenizer.bin` ([`Tokenizer::from_llama2c_bin`]) loads as SentencePiece.
//! * HF `tokenizer.json` ([`Tokenizer::from_hf_file`], feature `hf-tokenizers`) runs
//!   through the `tokenizers` crate.
//!
//! Special tokens in the text are split out first, as llama.cpp's
//! `tokenizer_st_partition`: user-defined tokens always, control and unknown tokens
//! only with `parse_special`.

mod bpe;
mod error;
mod gguf_load;
#[cfg(feature = "hf-tokenizers")]
mod hf;
mod llama2c;
mod pretok;
mod spm;
mod stream;
mod unicode;
mod vocab;

use std::collections::{BTreeSet, HashMap};

pub use error::TokenizerError;
pub use pretok::PreTokenizer;
pub use stream::StreamDecoder;

/// `▁` (U+2581), SentencePiece's escaped space.
const SPM_SPACE: &str = "\u{2581}";

/// Token type as stored in `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// From the GGUF value (llama.cpp's `llama_token_type`); unknown values are
    /// `Undefined`, as in llama.cpp.
    pub fn from_gguf(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    /// The GGUF value.
    pub fn gguf_id(self) -> i32 {
        match self {
            TokenType::Undefined => 0,
            TokenType::Normal => 1,
            TokenType::Unknown => 2,
            TokenType::Control => 3,
            TokenType::UserDefined => 4,
            TokenType::Unused => 5,
            TokenType::Byte => 6,
        }
    }
}

/// llama.cpp's `llama_token_attr` bit set: the token type plus flags that llama.cpp
/// adjusts at load time (EOG tokens forced to control, strip flags, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TokenAttr(u32);

impl TokenAttr {
    pub const UNDEFINED: TokenAttr = TokenAttr(0);
    pub const UNKNOWN: TokenAttr = TokenAttr(1 << 0);
    pub const UNUSED: TokenAttr = TokenAttr(1 << 1);
    pub const NORMAL: TokenAttr = TokenAttr(1 << 2);
    pub const CONTROL: TokenAttr = TokenAttr(1 << 3);
    pub const USER_DEFINED: TokenAttr = TokenAttr(1 << 4);
    pub const BYTE: TokenAttr = TokenAttr(1 << 5);
    pub const NORMALIZED: TokenAttr = TokenAttr(1 << 6);
    pub const LSTRIP: TokenAttr = TokenAttr(1 << 7);
    pub const RSTRIP: TokenAttr = TokenAttr(1 << 8);
    pub const SINGLE_WORD: TokenAttr = TokenAttr(1 << 9);

    pub const fn bits(self) -> u32 {
        self.0
    }

    /// True if any bit of `other` is set.
    pub const fn intersects(self, other: TokenAttr) -> bool {
        self.0 & other.0 != 0
    }

    fn from_type(t: TokenType) -> TokenAttr {
        match t {
            TokenType::Undefined => TokenAttr::UNDEFINED,
            TokenType::Normal => TokenAttr::NORMAL,
            TokenType::Unknown => TokenAttr::UNKNOWN,
            TokenType::Control => TokenAttr::CONTROL,
            TokenType::UserDefined => TokenAttr::USER_DEFINED,
            TokenType::Unused => TokenAttr::UNUSED,
            TokenType::Byte => TokenAttr::BYTE,
        }
    }

    fn set(&mut self, other: TokenAttr, on: bool) {
        if on {
            self.0 |= other.0;
        } else {
            self.0 &= !other.0;
        }
    }
}

impl std::ops::BitOr for TokenAttr {
    type Output = TokenAttr;
    fn bitor(self, rhs: TokenAttr) -> TokenAttr {
        TokenAttr(self.0 | rhs.0)
    }
}

/// Which algorithm encodes text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// SentencePiece BPE (GGUF `llama`, llama2.c `tokenizer.bin`).
    Spm,
    /// Byte-level BPE (GGUF `gpt2`).
    Bpe,
    /// An HF `tokenizer.json`, run by the `tokenizers` crate.
    HuggingFace,
}

/// How a token's text becomes its piece (llama.cpp's `token_to_piece` per vocab type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceStyle {
    /// `▁` -> space; byte tokens `<0xNN>` -> the byte.
    Spm,
    /// GPT-2 byte map reversed; byte tokens -> the byte.
    ByteLevel,
    /// The text as is (HF tokenizers with a decoder of unknown kind).
    #[cfg_attr(not(feature = "hf-tokenizers"), allow(dead_code))]
    Raw,
}

#[derive(Debug, Clone)]
struct TokenData {
    text: String,
    score: f32,
    ty: TokenType,
    attr: TokenAttr,
}

enum Engine {
    Spm,
    Bpe(bpe::BpeModel),
    #[cfg(feature = "hf-tokenizers")]
    Hf(Box<hf::HfModel>),
}

/// Special token ids (llama.cpp's `special_*_id`); `None` is `LLAMA_TOKEN_NULL`.
#[derive(Debug, Clone, Copy, Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    sep: Option<u32>,
    pad: Option<u32>,
    mask: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
}

/// A text or special-token fragment of the input (llama.cpp's
/// `fragment_buffer_variant`); text fragments are byte ranges of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// A tokenizer: vocabulary, special tokens and the encoding algorithm.
pub struct Tokenizer {
    name: String,
    engine: Engine,
    tokens: Vec<TokenData>,
    token_to_id: HashMap<String, u32>,
    /// Pieces as `llama_token_to_piece(special = true)`, concatenated.
    piece_bytes: Vec<u8>,
    piece_ofs: Vec<usize>,
    /// Control, user-defined and unknown tokens, longest first (`cache_special_tokens`).
    special_tokens: Vec<u32>,
    special_trie: SpecialTrie,
    /// SentencePiece byte fallback: `<0xNN>` (or the single-byte text) per byte.
    byte_tokens: [Option<u32>; 256],
    ids: SpecialIds,
    eog: BTreeSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("kind", &self.kind())
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.ids.bos)
            .field("eos", &self.ids.eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// The file (or name) the tokenizer came from.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> TokenizerKind {
        match self.engine {
            Engine::Spm => TokenizerKind::Spm,
            Engine::Bpe(_) => TokenizerKind::Bpe,
            #[cfg(feature = "hf-tokenizers")]
            Engine::Hf(_) => TokenizerKind::HuggingFace,
        }
    }

    /// The BPE pre-tokenizer (GGUF `gpt2` vocabularies only).
    pub fn pre_tokenizer(&self) -> Option<PreTokenizer> {
        match &self.engine {
            Engine::Bpe(m) => Some(m.pre),
            _ => None,
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.ids.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.ids.eos
    }

    /// End of turn (`<|eot_id|>`, `<|im_end|>`, ...), from metadata or by text.
    pub fn eot(&self) -> Option<u32> {
        self.ids.eot
    }

    pub fn unk(&self) -> Option<u32> {
        self.ids.unk
    }

    pub fn pad(&self) -> Option<u32> {
        self.ids.pad
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether SentencePiece encoding prefixes a space (`tokenizer.ggml.add_space_prefix`).
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// End-of-generation tokens (EOS, EOT, EOM, FIM pad/repo/sep and llama.cpp's
    /// list of end-looking texts).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn eog_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// The token type from the file; `None` for out-of-range ids.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.token(id).map(|t| t.ty)
    }

    /// llama.cpp's attributes (type plus load-time adjustments).
    pub fn token_attr(&self, id: u32) -> Option<TokenAttr> {
        self.token(id).map(|t| t.attr)
    }

    /// The vocabulary text of a token (`▁`-escaped or byte-encoded as stored).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.token(id).map(|t| t.text.as_str())
    }

    pub fn token_score(&self, id: u32) -> Option<f32> {
        self.token(id).map(|t| t.score)
    }

    /// The id of a vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Is the token control-like (rendered only when special tokens are asked for)?
    pub fn is_control(&self, id: u32) -> bool {
        self.token(id)
            .is_some_and(|t| t.attr.intersects(TokenAttr::CONTROL))
    }

    fn token(&self, id: u32) -> Option<&TokenData> {
        self.tokens.get(id as usize)
    }

    /// Encodes `text` as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.
    ///
    /// `add_special` adds BOS (and EOS) only when the model asks for them
    /// (`tokenizer.ggml.add_bos_token` / `add_eos_token`; SentencePiece vocabularies
    /// add BOS by default). With `parse_special`, control and unknown tokens written in
    /// the text become their ids; user-defined tokens always do.
    ///
    /// Never fails for GGUF and llama2.c tokenizers. For an HF `tokenizer.json` an
    /// error of the `tokenizers` crate is logged and yields an empty vector; use
    /// [`try_encode`](Self::try_encode) to see it.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        match self.try_encode(text, add_special, parse_special) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!("{e}");
                Vec::new()
            }
        }
    }

    /// [`encode`](Self::encode), reporting errors of the HF backend.
    pub fn try_encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let fragments = if text.is_empty() {
            Vec::new()
        } else {
            self.partition(text, parse_special)
        };
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        match &self.engine {
            Engine::Spm => self.spm_encode(text, &fragments, add_special, &mut out),
            Engine::Bpe(model) => {
                if add_special && self.add_bos {
                    out.extend(self.ids.bos);
                }
                let mut scratch = bpe::Scratch::default();
                for frag in &fragments {
                    match *frag {
                        Fragment::Text(s, e) => {
                            if let Some(t) = text.get(s..e) {
                                self.bpe_encode_text(model, t, &mut scratch, &mut out);
                            }
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.ids.eos);
                }
            }
            #[cfg(feature = "hf-tokenizers")]
            Engine::Hf(model) => {
                return model.encode(&self.name, text, add_special, parse_special);
            }
        }
        Ok(out)
    }

    /// llama.cpp's `tokenizer_st_partition`: for each special token, longest first,
    /// split every remaining text fragment at each occurrence.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Text(0, text.len())];
        if self.special_tokens.is_empty() {
            return frags;
        }
        // Tokens absent from the whole text cannot split any fragment: skip them
        // without scanning (vocabularies can have thousands of special tokens).
        let present = self.special_trie.present(text.as_bytes());
        let bytes = text.as_bytes();
        let mut next = Vec::new();
        for (k, &id) in self.special_tokens.iter().enumerate() {
            if !present.get(k).copied().unwrap_or(false) {
                continue;
            }
            let Some(tok) = self.token(id) else { continue };
            if !parse_special && tok.attr.intersects(TokenAttr::CONTROL | TokenAttr::UNKNOWN) {
                continue;
            }
            let needle = tok.text.as_str();
            let lstrip = tok.attr.intersects(TokenAttr::LSTRIP);
            let rstrip = tok.attr.intersects(TokenAttr::RSTRIP);
            next.clear();
            for frag in &frags {
                let Fragment::Text(mut s, e) = *frag else {
                    next.push(*frag);
                    continue;
                };
                loop {
                    let Some(rel) = text.get(s..e).and_then(|t| t.find(needle)) else {
                        next.push(Fragment::Text(s, e));
                        break;
                    };
                    let m = s + rel;
                    let mut left_end = m;
                    if lstrip {
                        while left_end > s && bytes.get(left_end - 1).is_some_and(|&b| c_isspace(b))
                        {
                            left_end -= 1;
                        }
                    }
                    if left_end > s {
                        next.push(Fragment::Text(s, left_end));
                    }
                    next.push(Fragment::Token(id));
                    let mut r = m + needle.len();
                    if r >= e {
                        break;
                    }
                    if rstrip {
                        while r < e && bytes.get(r).is_some_and(|&b| c_isspace(b)) {
                            r += 1;
                        }
                    }
                    if r >= e {
                        break;
                    }
                    s = r;
                }
            }
            std::mem::swap(&mut frags, &mut next);
        }
        frags
    }

    /// The piece of a token as `llama_token_to_piece(id, special = false)`: SentencePiece
    /// `▁` becomes a space, byte tokens their raw byte, byte-level BPE text its bytes;
    /// control and unknown tokens render as nothing. Out-of-range ids render as nothing.
    pub fn token_to_piece(&self, id: u32) -> &[u8] {
        self.token_to_piece_with(id, false)
    }

    /// [`token_to_piece`](Self::token_to_piece); with `special`, control and unknown
    /// tokens render as their text.
    pub fn token_to_piece_with(&self, id: u32, special: bool) -> &[u8] {
        let Some(tok) = self.token(id) else {
            return &[];
        };
        if !special && tok.attr.intersects(TokenAttr::CONTROL | TokenAttr::UNKNOWN) {
            return &[];
        }
        let i = id as usize;
        match (self.piece_ofs.get(i), self.piece_ofs.get(i + 1)) {
            (Some(&a), Some(&b)) => self.piece_bytes.get(a..b).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Concatenated pieces (special tokens render as nothing), then one lossy UTF-8
    /// conversion: a character split across byte tokens decodes whole.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with(ids, false)
    }

    /// [`decode`](Self::decode); with `special`, control tokens render as their text.
    pub fn decode_with(&self, ids: &[u32], special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, special)).into_owned()
    }

    /// Concatenated pieces as bytes (may end inside a UTF-8 sequence).
    pub fn decode_bytes(&self, ids: &[u32], special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_to_piece_with(id, special));
        }
        out
    }

    /// llama.cpp's `llama_detokenize`: drops the first piece's leading space when the
    /// vocabulary adds a space prefix, optionally drops the BOS/EOS it would add
    /// (`remove_special`), renders control tokens with `unparse_special`, and applies
    /// the BPE `clean_spaces` rules.
    pub fn detokenize(&self, ids: &[u32], remove_special: bool, unparse_special: bool) -> String {
        let mut ids = ids;
        let mut remove_space = self.add_space_prefix;
        if remove_special && self.add_bos {
            if let (Some(&first), Some(bos)) = (ids.first(), self.ids.bos) {
                if first == bos {
                    remove_space = false;
                    ids = &ids[1..];
                }
            }
        }
        if remove_special && self.add_eos {
            if let (Some((&last, rest)), Some(eos)) = (ids.split_last(), self.ids.eos) {
                if last == eos {
                    ids = rest;
                }
            }
        }
        let mut text = Vec::new();
        for &id in ids {
            let mut piece = self.token_to_piece_with(id, unparse_special);
            if remove_space {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            remove_space = false;
            text.extend_from_slice(piece);
        }
        if self.clean_spaces {
            clean_spaces(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// C `isspace` in the "C" locale.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// The three `clean_spaces` passes of llama.cpp's `detokenize`, ported in place
/// (including their reads of already-rewritten bytes).
fn clean_spaces(text: &mut Vec<u8>) {
    let at = |t: &Vec<u8>, i: usize| t.get(i).copied().unwrap_or(0);

    // " ?", " !", " .", " ," lose the space.
    let total1 = text.len();
    let mut total = usize::from(total1 > 0);
    for i in 1..total1 {
        let x = at(text, i);
        if at(text, i - 1) == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        if let Some(slot) = text.get_mut(total) {
            *slot = x;
        }
        total += 1;
    }
    text.truncate(total);

    // " ' " becomes "'".
    let total2 = text.len();
    let mut total = usize::from(total2 > 0);
    let mut i = 1;
    while i < total2 {
        let x = at(text, i);
        if x == b'\'' && i + 1 < total2 && at(text, i - 1) == b' ' && at(text, i + 1) == b' ' {
            total -= 1;
            i += 1;
            if let Some(slot) = text.get_mut(i) {
                *slot = 0;
            }
        }
        if let Some(slot) = text.get_mut(total) {
            *slot = x;
        }
        total += 1;
        i += 1;
    }
    text.truncate(total);

    // " 's", " 'm", " 're", " 've" lose the space.
    let total3 = text.len();
    let mut total = usize::from(total3 > 0);
    for i in 1..total3 {
        let x = at(text, i);
        if at(text, i - 1) == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = at(text, i + 1);
            if matches!(x1, b's' | b'm') {
                total -= 1;
            } else if x1 != b't' && x1 != b'd' && i + 2 < total3 {
                let x2 = at(text, i + 2);
                if x2 == b'e' && matches!(x1, b'r' | b'v') {
                    total -= 1;
                }
            }
        }
        if let Some(slot) = text.get_mut(total) {
            *slot = x;
        }
        total += 1;
    }
    text.truncate(total);
}

/// A byte trie over the special token texts, used to find which of them occur in a
/// text in one pass.
#[derive(Default)]
struct SpecialTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    /// Sorted by byte.
    edges: Vec<(u8, u32)>,
    /// Index (in `special_tokens`) of the token ending here.
    terminal: Option<usize>,
}

impl SpecialTrie {
    fn new<'a>(texts: impl Iterator<Item = &'a str>) -> SpecialTrie {
        let mut nodes = vec![TrieNode::default()];
        for (k, text) in texts.enumerate() {
            let mut node = 0usize;
            for &b in text.as_bytes() {
                let Some(n) = nodes.get(node) else { break };
                node = match n.edges.binary_search_by_key(&b, |e| e.0) {
                    Ok(j) => n.edges.get(j).map_or(0, |e| e.1 as usize),
                    Err(j) => {
                        let child = nodes.len();
                        nodes.push(TrieNode::default());
                        if let Some(n) = nodes.get_mut(node) {
                            n.edges.insert(j, (b, child as u32));
                        }
                        child
                    }
                };
            }
            if node != 0 {
                if let Some(n) = nodes.get_mut(node) {
                    n.terminal = Some(k);
                }
            }
        }
        SpecialTrie { nodes }
    }

    /// `present[k]`: special token `k` occurs somewhere in `text`.
    fn present(&self, text: &[u8]) -> Vec<bool> {
        let mut present = Vec::new();
        for start in 0..text.len() {
            let mut node = 0usize;
            for &b in text.get(start..).unwrap_or(&[]) {
                let Some(n) = self.nodes.get(node) else { break };
                match n.edges.binary_search_by_key(&b, |e| e.0) {
                    Ok(j) => node = n.edges.get(j).map_or(0, |e| e.1 as usize),
                    Err(_) => break,
                }
                if let Some(k) = self.nodes.get(node).and_then(|n| n.terminal) {
                    if present.len() <= k {
                        present.resize(k + 1, false);
                    }
                    if let Some(p) = present.get_mut(k) {
                        *p = true;
                    }
                }
            }
        }
        present
    }
}

/// Parses the two hex digits of a byte token `<0xNN>` as llama.cpp's
/// `strtol(text.substr(3, 2), NULL, 16)`: leading blanks and a sign are accepted,
/// parsing stops at the first non-hex digit.
fn byte_token_value(text: &str) -> u8 {
    let b = text.as_bytes();
    let digits = b.get(3..b.len().min(5)).unwrap_or(&[]);
    let mut i = 0;
    while digits.get(i).is_some_and(|&c| c_isspace(c)) {
        i += 1;
    }
    let neg = digits.get(i) == Some(&b'-');
    if matches!(digits.get(i), Some(b'-' | b'+')) {
        i += 1;
    }
    let mut v: i64 = 0;
    while let Some(d) = digits.get(i).and_then(|&c| (c as char).to_digit(16)) {
        v = v * 16 + i64::from(d);
        i += 1;
    }
    if neg {
        v = -v;
    }
    v as u8
}

/// Is `text` a SentencePiece byte token `<0xNN>` (upper-case hex, as llama.cpp writes)?
fn is_byte_token_text(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 6
        && b.starts_with(b"<0x")
        && b.get(5) == Some(&b'>')
        && b.get(3..5)
            .is_some_and(|h| h.iter().all(|c| c.is_ascii_hexdigit()))
}
