//! Tokenizer conformance and behaviour.
//!
//! * Every case of `shared/conformance/tokenizer-{spm-512,llama2-32k}.json` (ids from
//!   llama.cpp) is reproduced exactly, and `detokenized` matches.
//! * Streaming decode equals one-shot decode for every case.
//! * The byte-level BPE tokenizer agrees with HF `tokenizers` on a trained vocabulary
//!   for the GPT-2, Llama-3 and Qwen2 pre-tokenizers.
//! * llama2.c `tokenizer.bin` round trip.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use graft_runtime::gguf::{GgufFile, GgufWriter};
use graft_runtime::tokenizer::{
    PreTokenizer, StreamDecoder, TokenAttr, TokenType, Tokenizer, TokenizerError, TokenizerKind,
};
use serde_json::Value;

fn conformance_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance"
    ));
    assert!(
        dir.is_dir(),
        "conformance suite not found at {}: shared/ must sit next to the repository (tests never skip)",
        dir.display()
    );
    dir
}

struct Case {
    text: String,
    add_bos: bool,
    parse_special: bool,
    ids: Vec<u32>,
    detokenized: Option<String>,
}

fn load_cases(file: &str) -> (String, Vec<Case>) {
    let path = conformance_dir().join(file);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value =
        serde_json::from_slice(&data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let model = v["model"].as_str().expect("model").to_owned();
    let cases = v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_owned(),
            add_bos: c["add_bos"].as_bool().expect("add_bos"),
            parse_special: c["parse_special"].as_bool().expect("parse_special"),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect(),
            detokenized: c
                .get("detokenized")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
        .collect();
    (model, cases)
}

fn load_model_tokenizer(model: &str) -> Tokenizer {
    let path = conformance_dir().join("models").join(model);
    Tokenizer::open_gguf(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs every case; returns (id matches, detokenized matches, detokenized present).
fn check_conformance(tok: &Tokenizer, cases: &[Case], label: &str) -> (usize, usize, usize) {
    let mut failures = Vec::new();
    let mut ids_ok = 0;
    for c in cases {
        let got = tok.encode(&c.text, c.add_bos, c.parse_special);
        if got == c.ids {
            ids_ok += 1;
        } else {
            failures.push(format!(
                "{:?} add_bos={} parse_special={}:\n   want {:?}\n    got {:?}",
                c.text, c.add_bos, c.parse_special, c.ids, got
            ));
        }
    }
    // `detokenized` is the concatenation of llama.cpp's pieces for the plain-text
    // tokenization of the text (add_bos and parse_special false): for
    // "<s>not special</s>" it is " <s>not special</s>", the pieces of "▁<", "s", ">", ...
    let mut det_ok = 0;
    let mut det_n = 0;
    for c in cases {
        let Some(want) = &c.detokenized else { continue };
        det_n += 1;
        let plain = cases
            .iter()
            .find(|p| p.text == c.text && !p.add_bos && !p.parse_special)
            .unwrap_or_else(|| panic!("{label}: no plain case for {:?}", c.text));
        let got = tok.decode(&plain.ids);
        if &got == want {
            det_ok += 1;
        } else {
            failures.push(format!(
                "detokenized {:?}: want {want:?}, got {got:?}",
                c.text
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{label}: {} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len() + det_n,
        failures.join("\n")
    );
    (ids_ok, det_ok, det_n)
}

#[test]
fn conformance_spm_512() {
    let (model, cases) = load_cases("tokenizer-spm-512.json");
    assert_eq!(cases.len(), 108);
    let tok = load_model_tokenizer(&model);
    assert_eq!(tok.kind(), TokenizerKind::Spm);
    assert_eq!(tok.n_vocab(), 512);
    let (ids, det, n_det) = check_conformance(&tok, &cases, &model);
    eprintln!(
        "{model}: ids {ids}/{} , detokenized {det}/{n_det}",
        cases.len()
    );
    // The other suite models carry the same vocabulary.
    for other in [
        "llama-tied-F32.gguf",
        "qwen2-F32.gguf",
        "llama-gqa-Q4_K_M.gguf",
    ] {
        let t = load_model_tokenizer(other);
        check_conformance(&t, &cases, other);
    }
}

#[test]
fn conformance_llama2_32k() {
    let (model, cases) = load_cases("tokenizer-llama2-32k.json");
    assert_eq!(cases.len(), 108);
    let tok = load_model_tokenizer(&model);
    assert_eq!(tok.n_vocab(), 32000);
    let (ids, det, n_det) = check_conformance(&tok, &cases, &model);
    eprintln!(
        "{model}: ids {ids}/{} , detokenized {det}/{n_det}",
        cases.len()
    );
}

#[test]
fn special_ids_and_types() {
    let tok = load_model_tokenizer("llama-2-tiny-random.gguf");
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert_eq!(tok.unk(), Some(0));
    assert!(tok.add_bos() && !tok.add_eos() && tok.add_space_prefix());
    assert!(tok.is_eog(2) && !tok.is_eog(1) && !tok.is_eog(13));
    assert_eq!(tok.token_type(0), Some(TokenType::Unknown));
    assert_eq!(tok.token_type(1), Some(TokenType::Control));
    assert_eq!(tok.token_type(3), Some(TokenType::Byte));
    assert_eq!(tok.token_type(15043), Some(TokenType::Normal));
    assert_eq!(tok.token_type(32000), None);
    assert!(tok.token_attr(2).unwrap().intersects(TokenAttr::CONTROL));
    assert_eq!(tok.token_text(15043), Some("▁Hello"));
    assert_eq!(tok.token_id("▁Hello"), Some(15043));
    // Pieces: ▁ -> space, byte tokens -> the byte, control tokens only when asked.
    assert_eq!(tok.token_to_piece(15043), b" Hello");
    assert_eq!(tok.token_to_piece(13), b"\n");
    assert_eq!(tok.token_to_piece(3 + 0xE2), [0xE2]);
    assert_eq!(tok.token_to_piece(1), b"");
    assert_eq!(tok.token_to_piece_with(1, true), b"<s>");
    assert_eq!(tok.token_to_piece(0), b"");
    // Out-of-range ids render as nothing.
    assert_eq!(tok.token_to_piece(u32::MAX), b"");
    assert_eq!(tok.decode(&[15043, 99_999, u32::MAX, 3186]), " Hello world");
    // llama_detokenize drops the first piece's space, except after a removed BOS.
    let ids = tok.encode("Hello world", true, false);
    assert_eq!(tok.detokenize(&ids, true, false), " Hello world");
    assert_eq!(tok.detokenize(&ids, false, true), "<s> Hello world");
    assert_eq!(tok.detokenize(&ids[1..], false, false), "Hello world");
}

/// Streaming decode of every case equals the one-shot decode, with and without
/// special tokens, and never emits a replacement character the one-shot does not.
#[test]
fn streaming_decode_matches_one_shot() {
    for (file, _) in [
        ("tokenizer-spm-512.json", 0),
        ("tokenizer-llama2-32k.json", 1),
    ] {
        let (model, cases) = load_cases(file);
        let tok = load_model_tokenizer(&model);
        for c in &cases {
            for special in [false, true] {
                let want = tok.decode_with(&c.ids, special);
                let mut dec = StreamDecoder::new(&tok).with_special(special);
                let mut got = String::new();
                for &id in &c.ids {
                    let part = dec.push(id);
                    assert!(
                        !part.contains('\u{FFFD}'),
                        "{model} {:?}: streaming emitted U+FFFD at token {id}",
                        c.text
                    );
                    got.push_str(&part);
                }
                got.push_str(&dec.flush());
                assert_eq!(got, want, "{model} {:?} special={special}", c.text);
                assert!(!want.contains('\u{FFFD}'), "{model} {:?}", c.text);
            }
        }
    }
}

/// Characters split across byte-fallback tokens are held back until complete.
#[test]
fn streaming_holds_back_partial_characters() {
    let tok = load_model_tokenizer("llama-gqa-F32.gguf");
    // "🦙" is F0 9F A6 99: four byte tokens (byte + 3) in the 512-piece vocabulary.
    let ids = tok.encode("🦙!", false, false);
    assert_eq!(&ids[..4], &[229, 153, 132, 243]); // ▁ as bytes E2 96 81, then F0
    let mut dec = StreamDecoder::new(&tok);
    assert_eq!(dec.push(229), "");
    assert_eq!(dec.push(153), "");
    assert_eq!(dec.push(132), "▁");
    assert_eq!(dec.push(243), "");
    assert_eq!(dec.push(162), "");
    assert_eq!(dec.pending_bytes(), 2);
    assert_eq!(dec.push(169), "");
    assert_eq!(dec.push(156), "🦙");
    assert_eq!(dec.pending_bytes(), 0);

    // Invalid sequences become U+FFFD where the one-shot decode puts them, and an
    // unfinished character at the end is flushed as one U+FFFD.
    let bad = [
        3 + 0xE2,
        3 + 0x41,
        3 + 0xF0,
        3 + 0x9F,
        3 + 0xFF,
        3 + 0x42,
        3 + 0xE2,
        3 + 0x96,
    ];
    let mut dec = StreamDecoder::new(&tok);
    let mut got = String::new();
    for &id in &bad {
        got.push_str(&dec.push(id));
    }
    got.push_str(&dec.flush());
    assert_eq!(got, tok.decode(&bad));
    assert_eq!(got, "\u{FFFD}A\u{FFFD}\u{FFFD}B\u{FFFD}");

    // llama_detokenize-style: the first piece's space is dropped.
    let ids = tok.encode("Hello world", false, false);
    let mut dec = StreamDecoder::new(&tok).strip_leading_space(true);
    let text: String = ids.iter().map(|&id| dec.push(id)).collect();
    assert_eq!(text, "Hello world");
}

/// 100 KB of text encodes in linear-ish time (priority-queue merges).
#[test]
fn encoding_is_fast() {
    let tok = load_model_tokenizer("llama-2-tiny-random.gguf");
    let para = "The quick brown fox jumps over the lazy dog. Ünïcödé text, 日本語, emoji 🦙🚀, \
                numbers 1234567890 and code: fn main() { println!(\"hi\"); }\n";
    let mut text = String::new();
    while text.len() < 100_000 {
        text.push_str(para);
    }
    // One long word stresses the merge loop.
    text.push_str(&"x".repeat(5000));
    let mut best = std::time::Duration::MAX;
    let mut n = 0;
    for _ in 0..3 {
        let t0 = Instant::now();
        n = tok.encode(&text, true, true).len();
        best = best.min(t0.elapsed());
    }
    let limit_ms = if cfg!(debug_assertions) { 4000 } else { 100 };
    eprintln!("encoded {} bytes into {n} tokens in {best:?}", text.len());
    assert!(best.as_millis() < limit_ms, "too slow: {best:?}");
    assert_eq!(
        tok.decode(&tok.encode(&text, true, false)),
        format!(" {text}")
    );
}

// ---------------------------------------------------------------------------------
// Byte-level BPE against HF tokenizers.

/// GPT-2's byte -> char map (written out independently of the crate's).
fn gpt2_byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (0x21..=0x7E)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(&cs) {
        map[*b as usize] = char::from_u32(*c).unwrap();
    }
    map
}

const CORPUS: &str = "The quick brown fox jumps over the lazy dog. I don't think it's there; we'll see, \
    they're here and you've been told. DON'T SHOUT! I'M HERE. 1234567890 12 345 6789 00 007.\n\
    Hello, world!  Multiple   spaces\tand\ttabs.\r\nWindows line\r\nendings.\n\n\nThree newlines.\n\
    Café naïve résumé fiancée über Straße Ærøskøbing. Ελληνικά κείμενα. Русский текст тоже.\n\
    日本語のテキストと中文文本，还有한국어 텍스트。 Emoji: 🦙🚀🎉 👍🏽 ❤️.\n\
    fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x); } // code_with_underscores\n\
    <html><body class=\"x\">text &amp; more</body></html> $100 + 50% = $150 ^_^ ~tilde~ `tick` |pipe|\n\
    The the THE tHe. running runner runs ran. 3.14159 2.71828 1e10 -42 +7 x^2 a*b a/b.\n";

/// A small BPE trained on `CORPUS` (split with the GPT-2 pre-tokenizer): the byte
/// alphabet in byte order, then `n_merges` merges of the most frequent pair.
fn train_bpe(n_merges: usize) -> (Vec<String>, Vec<String>) {
    let byte_chars = gpt2_byte_chars();
    let mut vocab: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
    let mut freq: HashMap<String, usize> = HashMap::new();
    for w in PreTokenizer::Gpt2.split(CORPUS) {
        *freq.entry(w).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = freq
        .into_iter()
        .map(|(w, f)| (w.chars().map(|c| c.to_string()).collect(), f))
        .collect();
    words.sort();
    let mut merges = Vec::new();
    for _ in 0..n_merges {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for (syms, f) in &words {
            for p in syms.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += f;
            }
        }
        let Some((best, count)) = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
        else {
            break;
        };
        if count == 0 {
            break;
        }
        let merged = format!("{}{}", best.0, best.1);
        merges.push(format!("{} {}", best.0, best.1));
        if !vocab.contains(&merged) {
            vocab.push(merged.clone());
        }
        for (syms, _) in &mut words {
            let mut i = 0;
            while i + 1 < syms.len() {
                if syms[i] == best.0 && syms[i + 1] == best.1 {
                    syms[i] = merged.clone();
                    syms.remove(i + 1);
                }
                i += 1;
            }
        }
    }
    (vocab, merges)
}

/// Added tokens: (text, special). Special ones are control tokens in GGUF terms,
/// the other one user-defined (always split out of the text).
const ADDED: &[(&str, bool)] = &[
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<tool>", false),
];

#[cfg(feature = "hf-tokenizers")]
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
#[cfg(feature = "hf-tokenizers")]
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The vocabulary plus `ADDED` as GGUF `gpt2` metadata.
fn bpe_gguf(pre: &str, vocab: &[String], merges: &[String]) -> Tokenizer {
    let mut tokens = vocab.to_vec();
    let mut types = vec![1i32; vocab.len()];
    for (text, special) in ADDED {
        tokens.push(text.to_string());
        types.push(if *special { 3 } else { 4 });
    }
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "llama").unwrap();
    w.add_kv("tokenizer.ggml.model", "gpt2").unwrap();
    w.add_kv("tokenizer.ggml.pre", pre).unwrap();
    w.add_kv("tokenizer.ggml.tokens", tokens.clone()).unwrap();
    w.add_kv("tokenizer.ggml.token_type", types).unwrap();
    w.add_kv("tokenizer.ggml.merges", merges.to_vec()).unwrap();
    let eot = vocab.len() as u32;
    w.add_kv("tokenizer.ggml.bos_token_id", eot).unwrap();
    w.add_kv("tokenizer.ggml.eos_token_id", eot).unwrap();
    w.add_kv("tokenizer.ggml.add_bos_token", false).unwrap();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap(), format!("{pre}.gguf")).unwrap();
    Tokenizer::from_gguf(&f).unwrap()
}

/// The same vocabulary as an HF tokenizer.json with the matching pre-tokenizer.
#[cfg(feature = "hf-tokenizers")]
fn bpe_hf(pre: &str, vocab: &[String], merges: &[String]) -> Tokenizer {
    let tokens: Vec<String> = vocab
        .iter()
        .cloned()
        .chain(ADDED.iter().map(|(t, _)| t.to_string()))
        .collect();
    let split = |regex: &str| {
        serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]
        })
    };
    let (pre_tokenizer, ignore_merges) = match pre {
        "gpt-2" => (
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
            false,
        ),
        "llama-bpe" => (split(LLAMA3_REGEX), true),
        "qwen2" => (split(QWEN2_REGEX), false),
        other => panic!("no HF equivalent for {other}"),
    };
    let vocab_map: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), Value::from(i)))
        .collect();
    let added: Vec<Value> = ADDED
        .iter()
        .enumerate()
        .map(|(k, (text, special))| {
            serde_json::json!({"id": vocab.len() + k, "content": text, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": special})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab_map, "merges": merges}
    });
    Tokenizer::from_hf_json(json.to_string().as_bytes(), None, &format!("{pre}.json")).unwrap()
}

const BPE_TEXTS: &[&str] = &[
    "",
    "Hello world",
    " Hello world",
    "Hello  world",
    "   leading and trailing   ",
    "don't can't won't it's I'm we'll they're you've I'd",
    "DON'T CAN'T IT'S WE'LL THEY'RE",
    "1 12 123 1234 12345 1234567890 3.14159 -42",
    "line1\nline2\r\nline3\n\n\nend\n",
    " \n \n  x\t\ty \r\n",
    "Café naïve résumé Ærøskøbing Straße",
    "日本語のテキスト 中文文本，标点。한국어",
    "emoji 🦙🚀🎉 👍🏽 ❤️ ok",
    "\u{a0}nbsp\u{2003}em space\u{3000}ideographic",
    "combining a\u{301} e\u{308}\u{301}",
    "fn main() { let x = vec![1, 2, 3]; }",
    "<html><body>text &amp; more</body></html>",
    "$100 + 50% = $150 ^_^ ~tilde~ `tick` |pipe|",
    "....,,,;;;!!!???",
    "<|endoftext|>after<|im_start|>user\nhi<tool>call</tool>",
    "text<|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "a<tool>b <tool> c",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "Ελληνικά κείμενα. Русский текст.",
    "'s 'S 'x 'll 'LL ' '",
    "\t\t\ttabs",
    "trailing space ",
];

/// Random strings over an alphabet of the characters that matter to the splitters.
fn random_texts(n: usize, seed: u64) -> Vec<String> {
    let alphabet: Vec<&str> = vec![
        "a",
        "b",
        "Z",
        "é",
        "ß",
        "日",
        "本",
        "한",
        "ё",
        "Ω",
        "0",
        "1",
        "9",
        "٣",
        " ",
        " ",
        " ",
        "  ",
        "\n",
        "\r",
        "\r\n",
        "\t",
        "\u{a0}",
        "\u{3000}",
        "'",
        "'s",
        "'T",
        "'ll",
        "'RE",
        "!",
        ".",
        ",",
        "?",
        "$",
        "+",
        "<",
        "=",
        "~",
        "`",
        "|",
        "_",
        "-",
        "(",
        ")",
        "{",
        "}",
        "🦙",
        "👍🏽",
        "\u{301}",
        "\u{200b}",
        "€",
        "©",
        "½",
        "<|endoftext|>",
        "<|im_start|>",
        "<tool>",
        "<|",
        "|>",
        "<tool",
        "the",
        " the",
        "ing",
        "don't",
    ];
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let len = (next() % 24) as usize;
            (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect()
        })
        .collect()
}

#[cfg(feature = "hf-tokenizers")]
#[test]
fn bpe_agrees_with_hf_tokenizers() {
    let (vocab, merges) = train_bpe(400);
    assert!(merges.len() >= 300, "trained only {} merges", merges.len());
    let mut texts: Vec<String> = BPE_TEXTS.iter().map(|s| s.to_string()).collect();
    texts.push(CORPUS.to_owned());
    texts.extend(random_texts(400, 0x9E37_79B9_7F4A_7C15));
    for pre in ["gpt-2", "llama-bpe", "qwen2"] {
        let (ours, hf) = (bpe_gguf(pre, &vocab, &merges), bpe_hf(pre, &vocab, &merges));
        assert_eq!(ours.kind(), TokenizerKind::Bpe);
        assert_eq!(hf.kind(), TokenizerKind::HuggingFace);
        let mut n = 0;
        for text in &texts {
            for parse_special in [false, true] {
                let a = ours.encode(text, false, parse_special);
                let b = hf.try_encode(text, false, parse_special).unwrap();
                assert_eq!(a, b, "{pre}: {text:?} parse_special={parse_special}");
                // Byte-level pieces decode back to the text (specials as text).
                assert_eq!(ours.decode_with(&a, true), *text, "{pre}: {text:?}");
                assert_eq!(hf.decode_with(&b, true), *text, "{pre}: {text:?}");
                n += 1;
            }
        }
        eprintln!("{pre}: {n} encodings identical to HF tokenizers");
    }
}

/// Every pre-tokenizer: byte-level pieces give back the text exactly, and the
/// special tokens are split out as asked.
#[test]
fn bpe_round_trips_for_every_pre_tokenizer() {
    let (vocab, merges) = train_bpe(300);
    let mut texts: Vec<String> = BPE_TEXTS.iter().map(|s| s.to_string()).collect();
    texts.extend(random_texts(200, 7));
    let pres = [
        ("default", PreTokenizer::Default),
        ("gpt-2", PreTokenizer::Gpt2),
        ("llama-bpe", PreTokenizer::Llama3),
        ("qwen2", PreTokenizer::Qwen2),
        ("starcoder", PreTokenizer::StarCoder),
        ("falcon", PreTokenizer::Falcon),
    ];
    let byte_of: HashMap<char, u8> = gpt2_byte_chars()
        .into_iter()
        .enumerate()
        .map(|(b, c)| (c, b as u8))
        .collect();
    for (name, pre) in pres {
        let tok = bpe_gguf(name, &vocab, &merges);
        assert_eq!(tok.pre_tokenizer(), Some(pre));
        for text in &texts {
            let ids = tok.encode(text, false, true);
            assert_eq!(tok.decode_with(&ids, true), *text, "{name}: {text:?}");
            let words: String = pre.split(text).concat();
            let bytes: Vec<u8> = words.chars().map(|c| byte_of[&c]).collect();
            assert_eq!(bytes, text.as_bytes(), "{name}: words of {text:?}");
        }
    }
}

#[test]
fn bpe_special_tokens_and_pieces() {
    let (vocab, merges) = train_bpe(200);
    let tok = bpe_gguf("llama-bpe", &vocab, &merges);
    let eot = vocab.len() as u32;
    let tool = eot + 2;
    assert_eq!(tok.pre_tokenizer(), Some(PreTokenizer::Llama3));
    assert!(tok.is_eog(eot));
    assert_eq!(tok.token_type(tool), Some(TokenType::UserDefined));
    // Control tokens split out only with parse_special; user-defined always.
    let with = tok.encode("a<|endoftext|>b", false, true);
    assert!(with.contains(&eot));
    assert!(!tok.encode("a<|endoftext|>b", false, false).contains(&eot));
    assert!(tok.encode("a<tool>b", false, false).contains(&tool));
    assert_eq!(tok.token_to_piece(eot), b"");
    assert_eq!(tok.token_to_piece_with(eot, true), b"<|endoftext|>");
    assert_eq!(tok.token_to_piece(tool), b"<tool>");
    // "Ġ" is a space, "Ċ" a newline.
    let sp = tok.token_id("Ġ").unwrap();
    assert_eq!(tok.token_to_piece(sp), b" ");
    assert_eq!(tok.decode(&tok.encode(" \n", false, false)), " \n");
    // add_bos follows the metadata (false here), even with add_special.
    assert_eq!(
        tok.encode("hi", true, false),
        tok.encode("hi", false, false)
    );
}

/// A Llama-2-style tokenizer.json (SentencePiece BPE with byte fallback): token
/// types and pieces follow the decoder (`▁` -> space, `<0xNN>` -> byte).
#[cfg(feature = "hf-tokenizers")]
#[test]
fn hf_sentencepiece_style_json() {
    let vocab = [
        "<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "a", "b", "▁a", "ab",
    ];
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), Value::from(i)))
        .collect();
    let special = |id: usize, text: &str| {
        serde_json::json!({"id": id, "content": text, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_map, "merges": ["▁ a", "a b"]}
    });
    let tok = Tokenizer::from_hf_json(json.to_string().as_bytes(), None, "llama.json").unwrap();
    assert_eq!(tok.kind(), TokenizerKind::HuggingFace);
    assert_eq!(tok.n_vocab(), vocab.len());
    assert_eq!(tok.token_type(0), Some(TokenType::Unknown));
    assert_eq!(tok.token_type(1), Some(TokenType::Control));
    assert_eq!(tok.token_type(4), Some(TokenType::Byte));
    assert_eq!(tok.token_type(9), Some(TokenType::Normal));
    assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
    assert!(tok.is_eog(2));
    assert_eq!(tok.token_to_piece(9), b" a");
    assert_eq!(tok.token_to_piece(4), [0xC3]);
    let ids = tok.encode("a b é\n", true, true);
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(tok.decode(&ids), " a b é\n");
    assert_eq!(tok.detokenize(&ids, true, false), " a b é\n");
    // HF BPE merges by rank: "▁ a" (rank 0) before "a b".
    assert_eq!(tok.encode("ab", false, false), [9, 8]);
    // Streaming over byte-fallback pieces.
    let mut dec = StreamDecoder::new(&tok);
    let streamed: String = ids.iter().map(|&id| dec.push(id)).collect();
    assert_eq!(streamed + &dec.flush(), " a b é\n");
    // Broken JSON is a typed error naming the file.
    let e = Tokenizer::from_hf_json(b"{", None, "broken.json").unwrap_err();
    assert!(e.to_string().contains("broken.json"), "{e}");
    let e = Tokenizer::from_hf_file("/nonexistent/tokenizer.json").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/tokenizer.json"), "{e}");
}

#[test]
fn default_pre_tokenizer_splits_like_llama_cpp() {
    // Punctuation runs first, then GPT-2's pattern, then digit runs cut in threes.
    let words: Vec<String> = PreTokenizer::Default
        .split("x=1234567, (ok) don't")
        .into_iter()
        .map(|w| w.replace('Ġ', " "))
        .collect();
    assert_eq!(
        words,
        ["x", "=", "123", "456", "7", ",", " ", "(", "ok", ")", " don", "'", "t"]
    );
}

// ---------------------------------------------------------------------------------
// Special-token partitioning on a small SentencePiece vocabulary.

/// `<unk> <s> </s>`, the 256 byte tokens, then `pieces` (text, score, type).
fn spm_tokenizer(pieces: &[(&str, f32, i32)], extra: impl FnOnce(&mut GgufWriter)) -> Tokenizer {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut scores = vec![0f32; 3];
    let mut types = vec![2i32, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(6);
    }
    for (t, s, ty) in pieces {
        tokens.push(t.to_string());
        scores.push(*s);
        types.push(*ty);
    }
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", "llama").unwrap();
    w.add_kv("tokenizer.ggml.tokens", tokens).unwrap();
    w.add_kv("tokenizer.ggml.scores", scores).unwrap();
    w.add_kv("tokenizer.ggml.token_type", types).unwrap();
    extra(&mut w);
    Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes().unwrap(), "spm.gguf").unwrap()).unwrap()
}

const SPM_PIECES: &[(&str, f32, i32)] = &[
    ("▁", -1.0, 1),       // 259
    ("a", -2.0, 1),       // 260
    ("b", -2.0, 1),       // 261
    ("▁a", -0.5, 1),      // 262
    ("▁b", -0.5, 1),      // 263
    ("ab", -0.1, 1),      // 264
    ("<tool>", 0.0, 4),   // 265 user-defined
    ("<|end|>", 0.0, 3),  // 266 control
    ("<|end|>x", 0.0, 3), // 267 control, longer
];

#[test]
fn spm_special_token_partition() {
    let tok = spm_tokenizer(SPM_PIECES, |_| {});
    let (ua, ub, ab, tool, end, endx) = (262, 263, 264, 265, 266, 267);
    // "ab" outscores "▁a": the pair (a, b) merges first.
    assert_eq!(tok.encode("ab", false, false), [259, ab]);
    // User-defined tokens split out even without parse_special; the text after a
    // special token gets the space prefix again.
    assert_eq!(tok.encode("a<tool>b", false, false), [ua, tool, ub]);
    assert_eq!(tok.encode("<tool>", true, false), [1, tool]);
    // Control tokens only with parse_special; otherwise their text is encoded.
    assert_eq!(tok.encode("a<|end|>", false, true), [ua, end]);
    let plain = tok.encode("a<|end|>", false, false);
    assert!(!plain.contains(&end) && plain.len() > 3, "{plain:?}");
    // Longest special token first.
    assert_eq!(tok.encode("<|end|>x<|end|>", false, true), [endx, end]);
    // <s> and <unk> written in the text.
    assert_eq!(tok.encode("<s>a<unk>", false, true), [1, ua, 0]);
    assert!(tok.is_eog(end) && tok.is_eog(2));
    assert_eq!(tok.eot(), Some(end));
    // Pieces: user-defined render as text, control only with special.
    assert_eq!(tok.decode(&[ua, tool, ub, end]), " a<tool> b");
    assert_eq!(
        tok.decode_with(&[ua, tool, ub, end], true),
        " a<tool> b<|end|>"
    );

    // Without add_space_prefix.
    let tok = spm_tokenizer(SPM_PIECES, |w| {
        w.add_kv("tokenizer.ggml.add_space_prefix", false).unwrap();
    });
    assert_eq!(tok.encode("a<tool>b", false, false), [260, tool, 261]);
}

#[test]
fn spm_phi3_special_tokens_strip_right() {
    // llama.cpp sets RSTRIP on every special token of models named like Phi-3
    // (except <unk>, <s>, <|endoftext|>).
    let tok = spm_tokenizer(SPM_PIECES, |w| {
        w.add_kv("general.name", "Phi-3-mini-4k-instruct").unwrap();
    });
    assert!(tok.token_attr(266).unwrap().intersects(TokenAttr::RSTRIP));
    assert!(!tok.token_attr(1).unwrap().intersects(TokenAttr::RSTRIP));
    assert_eq!(tok.encode("<|end|>  \n a", false, true), [266, 262]);
    assert_eq!(tok.encode("<s> a", false, true), [1, 259, 262]);
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
}

// ---------------------------------------------------------------------------------
// Metadata errors.

fn spm_writer(tokens: Vec<String>) -> GgufWriter<'static> {
    let n = tokens.len();
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", "llama").unwrap();
    w.add_kv("tokenizer.ggml.tokens", tokens).unwrap();
    w.add_kv("tokenizer.ggml.scores", vec![0f32; n]).unwrap();
    w
}

fn build(w: &GgufWriter) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes().unwrap(), "t.gguf").unwrap())
}

#[test]
fn metadata_errors_name_file_and_key() {
    let toks = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let base = toks(&["<unk>", "<s>", "</s>", "a", "b", "ab"]);

    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", "llama").unwrap();
    let e = build(&w).unwrap_err().to_string();
    assert!(
        e.contains("t.gguf") && e.contains("tokenizer.ggml.tokens"),
        "{e}"
    );

    let mut w = spm_writer(base.clone());
    w.add_kv("tokenizer.ggml.token_type", vec![1i32; 3])
        .unwrap();
    let e = build(&w).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.ggml.token_type") && e.contains("3 entries"),
        "{e}"
    );

    let w = spm_writer(toks(&["<unk>", "<s>", "</s>", "a", "a"]));
    let e = build(&w).unwrap_err();
    assert!(
        matches!(
            e,
            TokenizerError::DuplicateToken {
                first: 3,
                second: 4,
                ..
            }
        ),
        "{e}"
    );

    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", "t5").unwrap();
    w.add_kv("tokenizer.ggml.tokens", base.clone()).unwrap();
    assert!(matches!(
        build(&w),
        Err(TokenizerError::UnsupportedModel { .. })
    ));

    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", "gpt2").unwrap();
    w.add_kv("tokenizer.ggml.pre", "tekken").unwrap();
    w.add_kv("tokenizer.ggml.tokens", base.clone()).unwrap();
    w.add_kv("tokenizer.ggml.merges", vec!["a b".to_string()])
        .unwrap();
    let e = build(&w).unwrap_err().to_string();
    assert!(
        e.contains("tekken") && e.contains("tokenizer.ggml.pre"),
        "{e}"
    );

    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", "gpt2").unwrap();
    w.add_kv("tokenizer.ggml.tokens", base.clone()).unwrap();
    let e = build(&w).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.merges"), "{e}");

    // add_bos_token with no usable BOS id.
    let mut w = spm_writer(toks(&["<unk>"]));
    w.add_kv("tokenizer.ggml.add_bos_token", true).unwrap();
    let e = build(&w).unwrap_err().to_string();
    assert!(
        e.contains("add_bos_token") && e.contains("bos_token_id"),
        "{e}"
    );

    let mut w = spm_writer(base.clone());
    w.add_kv("tokenizer.ggml.bos_token_id", "one").unwrap();
    let e = build(&w).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");

    // Out-of-range ids keep the default; empty tokens get llama.cpp's placeholder.
    let mut w = spm_writer(toks(&["<unk>", "<s>", "</s>", "", "▁a"]));
    w.add_kv("tokenizer.ggml.eos_token_id", 1000u32).unwrap();
    let t = build(&w).unwrap();
    assert_eq!(t.eos(), Some(2));
    assert_eq!(t.token_text(3), Some("[EMPTY_3]"));
    // No byte tokens and unknown characters: the unknown token.
    assert_eq!(t.encode("a", false, false), [4]);
    assert_eq!(t.encode("z", false, false), [0; 4]);
}

// ---------------------------------------------------------------------------------
// llama2.c tokenizer.bin.

/// llama2.c's `encode` (run.c), as a reference: dummy prefix `" "` looked up as a
/// token, per-character lookup with byte fallback (byte + 3), then repeated global
/// best-score merges of adjacent token texts.
fn llama2c_encode(vocab: &[String], scores: &[f32], text: &str, bos: bool) -> Vec<i64> {
    let lookup = |s: &str| vocab.iter().position(|v| v == s).map_or(-1, |i| i as i64);
    let mut tokens: Vec<i64> = Vec::new();
    if bos {
        tokens.push(1);
    }
    if !text.is_empty() {
        tokens.push(lookup(" "));
    }
    for c in text.chars() {
        let s = c.to_string();
        match lookup(&s) {
            -1 => tokens.extend(s.bytes().map(|b| b as i64 + 3)),
            id => tokens.push(id),
        }
    }
    loop {
        let mut best = (-1e10f32, -1i64, usize::MAX);
        for i in 0..tokens.len().saturating_sub(1) {
            let (a, b) = (tokens[i], tokens[i + 1]);
            if a < 0 || b < 0 {
                continue;
            }
            let id = lookup(&format!("{}{}", vocab[a as usize], vocab[b as usize]));
            if id != -1 && scores[id as usize] > best.0 {
                best = (scores[id as usize], id, i);
            }
        }
        if best.1 == -1 {
            break;
        }
        tokens[best.2] = best.1;
        tokens.remove(best.2 + 1);
    }
    tokens
}

/// Vocabulary and scores as stored in a tokenizer.bin.
fn read_bin(bin: &[u8]) -> (Vec<String>, Vec<f32>) {
    let mut pos = 4;
    let (mut vocab, mut scores) = (Vec::new(), Vec::new());
    while pos < bin.len() {
        scores.push(f32::from_le_bytes(bin[pos..pos + 4].try_into().unwrap()));
        let len = u32::from_le_bytes(bin[pos + 4..pos + 8].try_into().unwrap()) as usize;
        vocab.push(String::from_utf8(bin[pos + 8..pos + 8 + len].to_vec()).unwrap());
        pos += 8 + len;
    }
    (vocab, scores)
}

const BIN_TEXTS: &[&str] = &[
    "Hello world",
    "hello\nworld\n\n",
    "don't can't won't",
    "mixed123numbers4567",
    "ÄÖÜ äöü ß",
    "emoji 🦙🚀 ok",
    "  leading",
    "trailing space ",
    "The quick brown fox jumps over the lazy dog.",
];

#[test]
fn llama2c_tokenizer_bin_round_trip() {
    for model in ["llama-gqa-F32.gguf", "llama-2-tiny-random.gguf"] {
        let gguf_tok = load_model_tokenizer(model);
        let bin = gguf_tok.to_llama2c_bin().unwrap();
        let n = gguf_tok.n_vocab();
        let tok = Tokenizer::from_llama2c_bin(&bin, Some(n), "tokenizer.bin").unwrap();
        let tok_eof = Tokenizer::from_llama2c_bin(&bin, None, "tokenizer.bin").unwrap();
        assert_eq!(tok.n_vocab(), n);
        assert_eq!(tok_eof.n_vocab(), n);
        for id in 0..n as u32 {
            assert_eq!(
                tok.token_text(id),
                gguf_tok.token_text(id),
                "{model} token {id}"
            );
            assert_eq!(
                tok.token_type(id),
                gguf_tok.token_type(id),
                "{model} token {id}"
            );
            assert_eq!(
                tok.token_score(id).map(f32::to_bits),
                gguf_tok.token_score(id).map(f32::to_bits)
            );
        }
        assert_eq!(tok.to_llama2c_bin().unwrap(), bin);
        for text in BIN_TEXTS {
            for bos in [false, true] {
                assert_eq!(
                    tok.encode(text, bos, false),
                    gguf_tok.encode(text, bos, false),
                    "{model}: {text:?}"
                );
            }
        }
        // The file as llama2.c's export writes it: spaces, "\n<s>\n".
        let (vocab, scores) = read_bin(&bin);
        assert_eq!(vocab[1], "\n<s>\n");
        assert_eq!(vocab[2], "\n</s>\n");
        let agree = BIN_TEXTS
            .iter()
            .filter(|t| {
                let ours: Vec<i64> = tok
                    .encode(t, true, false)
                    .iter()
                    .map(|&i| i as i64)
                    .collect();
                ours == llama2c_encode(&vocab, &scores, t, true)
            })
            .count();
        eprintln!(
            "{model}: llama2.c's own encode agrees on {agree}/{} texts",
            BIN_TEXTS.len()
        );
        if n == 32000 {
            // Full SentencePiece vocabulary: the two algorithms agree.
            assert_eq!(agree, BIN_TEXTS.len());
        } else {
            // The 512-piece vocabulary has no "▁": llama2.c's dummy prefix lookup fails
            // (-1 in run.c) and byte-fallback tokens never merge; llama.cpp's algorithm
            // merges characters before falling back to bytes.
            assert!(vocab.iter().all(|v| v != " "));
            assert!(agree < BIN_TEXTS.len());
        }
    }
}

#[test]
fn llama2c_tokenizer_bin_errors() {
    let tok = load_model_tokenizer("llama-gqa-F32.gguf");
    let bin = tok.to_llama2c_bin().unwrap();
    // Every truncation is an error or a shorter vocabulary, never a panic.
    for cut in 0..bin.len() {
        match Tokenizer::from_llama2c_bin(&bin[..cut], None, "cut.bin") {
            Ok(t) => assert!(t.n_vocab() < 512),
            Err(e) => assert!(e.to_string().contains("cut.bin"), "{e}"),
        }
    }
    let e = Tokenizer::from_llama2c_bin(&bin[..100], Some(512), "short.bin").unwrap_err();
    assert!(matches!(e, TokenizerError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("short.bin"), "{e}");
    // Negative length.
    let mut bad = bin.clone();
    bad[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    let e = Tokenizer::from_llama2c_bin(&bad, None, "neg.bin").unwrap_err();
    assert!(
        e.to_string().contains("token 0") && e.to_string().contains("negative"),
        "{e}"
    );
    // A huge claimed vocabulary does not allocate up front.
    assert!(Tokenizer::from_llama2c_bin(&bin, Some(usize::MAX), "big.bin").is_err());
    // Extra records beyond vocab_size are ignored, as llama2.c does.
    let t = Tokenizer::from_llama2c_bin(&bin, Some(300), "part.bin").unwrap();
    assert_eq!(t.n_vocab(), 300);
    let e = Tokenizer::open_llama2c_bin("/nonexistent/tokenizer.bin", None).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/tokenizer.bin"), "{e}");
}
