//! Training data: JSONL `{"prompt", "completion"}` records (loss on the completion
//! only) or plain text (loss everywhere, cut into context-sized pieces), a seeded
//! train/eval split, and deterministic batches.

use std::path::Path;

use graft_runtime::tokenizer::Tokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::net::Example;
use super::TrainError;

/// A prompt and the completion the model should learn to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub prompt: String,
    pub completion: String,
}

/// What a data file holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Pairs(Vec<Record>),
    Text(String),
}

/// Reads `path`: `.jsonl` (one `{"prompt": .., "completion": ..}` or `{"text": ..}`
/// object per line; blank lines skipped) or any other file as plain UTF-8 text.
pub fn load(path: &Path) -> Result<Data, TrainError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        file: file.clone(),
        source,
    })?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        parse_jsonl(&text, &file).map(Data::Pairs)
    } else {
        Ok(Data::Text(text))
    }
}

pub fn parse_jsonl(text: &str, file: &str) -> Result<Vec<Record>, TrainError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| TrainError::Data(format!("{file}:{}: not JSON: {e}", i + 1)))?;
        let field = |k: &str| -> Result<String, TrainError> {
            match v.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(TrainError::Data(format!(
                    "{file}:{}: field {k:?} is {other}, expected a string",
                    i + 1
                ))),
                None => Err(TrainError::Data(format!(
                    "{file}:{}: field {k:?} is missing (expected {{\"prompt\": .., \"completion\": ..}} or {{\"text\": ..}})",
                    i + 1
                ))),
            }
        };
        // {"text": ..} is plain text inside JSONL: loss on every token.
        if v.get("text").is_some() && v.get("prompt").is_none() {
            out.push(Record {
                prompt: String::new(),
                completion: field("text")?,
            });
            continue;
        }
        out.push(Record {
            prompt: field("prompt")?,
            completion: field("completion")?,
        });
    }
    if out.is_empty() {
        return Err(TrainError::Data(format!("{file}: no records")));
    }
    Ok(out)
}

/// Token ids of a record: `[BOS] prompt` and `completion [EOS]` (a text record has
/// an empty prompt: `[BOS]` only).
pub fn encode_record(tok: &Tokenizer, r: &Record) -> (Vec<u32>, Vec<u32>) {
    let prompt = tok.encode(&r.prompt, true, false);
    let mut completion = tok.encode(&r.completion, false, false);
    if let Some(eos) = tok.eos() {
        completion.push(eos);
    }
    (prompt, completion)
}

/// Examples of records, cut to `max_len` tokens (records whose prompt alone does not
/// fit are dropped, with a count returned).
pub fn pair_examples(tok: &Tokenizer, records: &[Record], max_len: usize) -> (Vec<Example>, usize) {
    let mut dropped = 0;
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let (p, c) = encode_record(tok, r);
        if p.is_empty() || p.len() + 1 > max_len {
            dropped += 1;
            continue;
        }
        let mut tokens = p.clone();
        tokens.extend_from_slice(&c);
        tokens.truncate(max_len);
        out.push(Example {
            tokens,
            n_prompt: p.len(),
        });
    }
    (out, dropped)
}

/// Plain text as back-to-back pieces of `max_len` tokens (BOS first).
pub fn text_examples(tok: &Tokenizer, text: &str, max_len: usize) -> Vec<Example> {
    let ids = tok.encode(text, true, false);
    ids.chunks(max_len.max(2))
        .filter(|c| c.len() >= 2)
        .map(|c| Example {
            tokens: c.to_vec(),
            n_prompt: 1,
        })
        .collect()
}

/// Indices `0..n` split into (train, eval) with `eval_frac` of them (at least one when
/// `eval_frac > 0` and `n > 1`) held out, shuffled by `seed`.
pub fn split(n: usize, eval_frac: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut k = (n as f64 * eval_frac.clamp(0.0, 1.0)).round() as usize;
    if eval_frac > 0.0 && n > 1 {
        k = k.clamp(1, n - 1);
    }
    let eval = idx.split_off(n - k);
    (idx, eval)
}

/// The examples of optimizer step `step` (micro-batch `micro` of `accum`): epochs walk
/// the training set in an order reshuffled per epoch from `seed`, so a resumed run
/// sees exactly the batches the uninterrupted one would.
pub fn batch_indices(
    n: usize,
    batch: usize,
    accum: usize,
    step: usize,
    micro: usize,
    seed: u64,
) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let start = (step * accum + micro) * batch;
    (start..start + batch)
        .map(|pos| {
            let (epoch, at) = (pos / n, pos % n);
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            order[at]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_errors_name_line_and_field() {
        let ok = "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"c\", \"completion\": \"d\"}\n";
        assert_eq!(parse_jsonl(ok, "f").unwrap().len(), 2);
        let e = parse_jsonl("{\"prompt\": \"a\"}", "f.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.jsonl:1") && e.contains("completion"), "{e}");
        let e = parse_jsonl("{\"prompt\": 3, \"completion\": \"x\"}", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a string"), "{e}");
        assert!(parse_jsonl("nope", "f").is_err());
        assert!(parse_jsonl("\n", "f").is_err());
    }

    #[test]
    fn split_is_a_seeded_partition() {
        let (t, e) = split(10, 0.2, 3);
        assert_eq!((t.len(), e.len()), (8, 2));
        let mut all: Vec<usize> = t.iter().chain(&e).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(split(10, 0.2, 3), (t, e));
        assert_eq!(split(5, 0.01, 1).1.len(), 1);
    }

    #[test]
    fn batches_cover_each_epoch_once() {
        let n = 7;
        let mut seen: Vec<usize> = (0..7)
            .flat_map(|s| batch_indices(n, 1, 1, s, 0, 9))
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        assert_eq!(
            batch_indices(n, 3, 2, 5, 1, 9),
            batch_indices(n, 3, 2, 5, 1, 9)
        );
    }
}
