//! Arbitrary bytes parsed as a llama2.c `tokenizer.bin` must give a tokenizer or a
//! typed error, never a panic; a tokenizer that loads must encode, decode and
//! stream-decode without panicking, with ids in range and streaming equal to the
//! one-shot decode.
//!
//! Run: `cargo +nightly fuzz run tokenizer_bin` from the repository root.

#![no_main]

use graft_runtime::tokenizer::{StreamDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses how the vocabulary size is given (it is not in the file).
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let vocab_size = match mode % 3 {
        0 => None,
        1 => Some(rest.len() / 12),
        _ => Some(mode as usize),
    };
    let Ok(tok) = Tokenizer::from_llama2c_bin(rest, vocab_size, "fuzz.bin") else {
        return;
    };
    let n = tok.n_vocab();
    let own_text = String::from_utf8_lossy(rest);
    for text in ["", " ", "Hello wörld 🦙 <s>x</s> \n\t<unk>", &own_text] {
        for (add_special, special) in [(false, false), (true, true)] {
            let ids = tok.encode(text, add_special, special);
            assert!(ids.iter().all(|&id| (id as usize) < n));
            let one_shot = tok.decode_with(&ids, special);
            let mut dec = StreamDecoder::new(&tok).with_special(special);
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&dec.push(id));
            }
            streamed.push_str(&dec.flush());
            assert_eq!(streamed, one_shot);
            let _ = tok.detokenize(&ids, true, special);
        }
    }
    let _ = tok.decode(&[0, 1, 2, u32::MAX, n as u32]);
    if let Ok(bin) = tok.to_llama2c_bin() {
        let _ = Tokenizer::from_llama2c_bin(&bin, Some(n), "again.bin");
    }
});
