//! The procedurally generated corpus graft pretrains its default model on, and the
//! tasks its demo adapters learn. Deterministic for a seed: the same call always
//! gives the same records, so the whole default model can be regenerated.
//!
//! The base learns a toy English (sentences from a small grammar) and one task,
//! `copy`; the adapters learn tasks the base never saw: `reverse`, `upper`, `recall`
//! and `add`. Retention of a trained adapter is measured on `copy`.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::data::Record;

const NOUNS: &[&str] = &[
    "cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "apple", "book", "lamp",
    "chair", "cloud", "star", "moon", "sun", "road", "boat", "horse", "mouse", "door", "cake",
    "bell", "coat", "hill", "lake", "ship", "king", "rose", "wolf", "bear", "frog",
];
const ADJS: &[&str] = &[
    "red", "blue", "green", "small", "big", "old", "young", "happy", "quiet", "bright", "dark",
    "warm", "cold", "soft", "fast", "slow",
];
const VERBS: &[&str] = &[
    "sees", "likes", "finds", "takes", "holds", "paints", "follows", "helps", "carries", "watches",
    "calls", "wants",
];
const NAMES: &[&str] = &[
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas",
];
const PLACES: &[&str] = &["garden", "forest", "village", "market", "kitchen", "harbor"];

/// The tasks of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sentences of the toy language (a text record: loss on every token).
    Text,
    /// `copy: a b c =` -> `a b c` (the base's own task).
    Copy,
    /// `reverse: a b c =` -> `c b a`.
    Reverse,
    /// `upper: a b =` -> `A B`.
    Upper,
    /// `recall: a 3 b 7 c 1 ; b ?` -> `7`.
    Recall,
    /// `add: 3 + 4 =` -> `7`.
    Add,
}

impl Task {
    pub const ALL: [Task; 6] = [
        Task::Text,
        Task::Copy,
        Task::Reverse,
        Task::Upper,
        Task::Recall,
        Task::Add,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Text => "text",
            Task::Copy => "copy",
            Task::Reverse => "reverse",
            Task::Upper => "upper",
            Task::Recall => "recall",
            Task::Add => "add",
        }
    }

    pub fn from_name(s: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == s)
    }
}

fn pick<'a>(rng: &mut StdRng, words: &[&'a str]) -> &'a str {
    words[rng.gen_range(0..words.len())]
}

fn word_list(rng: &mut StdRng, min: usize, max: usize) -> Vec<&'static str> {
    let n = rng.gen_range(min..=max);
    let pool: Vec<&str> = NOUNS.iter().chain(ADJS).copied().collect();
    pool.choose_multiple(rng, n).copied().collect()
}

fn sentence(rng: &mut StdRng) -> String {
    let det = |rng: &mut StdRng| if rng.gen_bool(0.5) { "the" } else { "a" };
    match rng.gen_range(0..6) {
        0 => format!(
            "The {} {} {} {} {} {} .",
            pick(rng, ADJS),
            pick(rng, NOUNS),
            pick(rng, VERBS),
            det(rng),
            pick(rng, ADJS),
            pick(rng, NOUNS)
        ),
        1 => format!(
            "{} has {} {} {}s .",
            pick(rng, NAMES),
            rng.gen_range(2..20),
            pick(rng, ADJS),
            pick(rng, NOUNS)
        ),
        2 => format!(
            "{} {} {} {} in the {} .",
            pick(rng, NAMES),
            pick(rng, VERBS),
            det(rng),
            pick(rng, NOUNS),
            pick(rng, PLACES)
        ),
        3 => {
            // Shouted words teach the base the upper-case tokens the `upper` task uses.
            let w = pick(rng, NOUNS);
            format!(
                "{} shouts {} and the {} hears it .",
                pick(rng, NAMES),
                w.to_uppercase(),
                w
            )
        }
        4 => format!(
            "In the {} , {} {} with {} .",
            pick(rng, PLACES),
            pick(rng, NAMES),
            if rng.gen_bool(0.5) { "walks" } else { "sings" },
            pick(rng, NAMES)
        ),
        _ => {
            let a = rng.gen_range(0..10);
            let b = rng.gen_range(0..10);
            format!(
                "{} counts {} {}s and {} {}s .",
                pick(rng, NAMES),
                a,
                pick(rng, NOUNS),
                b,
                pick(rng, NOUNS)
            )
        }
    }
}

/// One record of `task`.
pub fn record(task: Task, rng: &mut StdRng) -> Record {
    let (prompt, completion) = match task {
        Task::Text => {
            let n = rng.gen_range(2..=4);
            let text: Vec<String> = (0..n).map(|_| sentence(rng)).collect();
            (String::new(), text.join(" "))
        }
        Task::Copy => {
            let w = word_list(rng, 2, 5);
            (format!("copy: {} =", w.join(" ")), w.join(" "))
        }
        Task::Reverse => {
            let w = word_list(rng, 2, 4);
            let r: Vec<&str> = w.iter().rev().copied().collect();
            (format!("reverse: {} =", w.join(" ")), r.join(" "))
        }
        Task::Upper => {
            let n = rng.gen_range(1..=3);
            let w: Vec<&str> = NOUNS.choose_multiple(rng, n).copied().collect();
            let u: Vec<String> = w.iter().map(|s| s.to_uppercase()).collect();
            (format!("upper: {} =", w.join(" ")), u.join(" "))
        }
        Task::Recall => {
            let n = rng.gen_range(2..=4);
            let keys: Vec<&str> = NOUNS.choose_multiple(rng, n).copied().collect();
            let vals: Vec<u32> = (0..n).map(|_| rng.gen_range(0..10)).collect();
            let q = rng.gen_range(0..n);
            // Spaces, not `k=v`: the value must be its own token, as in the answer.
            let pairs: Vec<String> = keys
                .iter()
                .zip(&vals)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            (
                format!("recall: {} ; {} ?", pairs.join(" "), keys[q]),
                vals[q].to_string(),
            )
        }
        Task::Add => {
            let a = rng.gen_range(0..10);
            let b = rng.gen_range(0..10);
            (format!("add: {a} + {b} ="), (a + b).to_string())
        }
    };
    Record { prompt, completion }
}

/// `n` records of `task` from `seed`.
pub fn generate(task: Task, n: usize, seed: u64) -> Vec<Record> {
    // Each task draws from its own stream, so adding a task never changes another's data.
    let mut rng =
        StdRng::seed_from_u64(seed ^ (task as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..n).map(|_| record(task, &mut rng)).collect()
}

/// The base model's pretraining mix: text and the `copy` task, shuffled.
pub fn base_corpus(n_text: usize, n_copy: usize, seed: u64) -> Vec<Record> {
    let mut all = generate(Task::Text, n_text, seed);
    all.extend(generate(Task::Copy, n_copy, seed));
    all.shuffle(&mut StdRng::seed_from_u64(seed));
    all
}

/// Every string the tokenizer should know: a sample of every task.
pub fn tokenizer_corpus(seed: u64) -> Vec<String> {
    Task::ALL
        .into_iter()
        .flat_map(|t| generate(t, 2000, seed.wrapping_add(1)))
        .flat_map(|r| [r.prompt, r.completion])
        .collect()
}

/// A record as one JSONL line (`{"text"}` for text records).
pub fn to_jsonl(r: &Record) -> String {
    if r.prompt.is_empty() {
        serde_json::json!({ "text": r.completion }).to_string()
    } else {
        serde_json::json!({ "prompt": r.prompt, "completion": r.completion }).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_correct() {
        assert_eq!(generate(Task::Reverse, 5, 1), generate(Task::Reverse, 5, 1));
        assert_ne!(generate(Task::Reverse, 5, 1), generate(Task::Reverse, 5, 2));
        for r in generate(Task::Reverse, 20, 3) {
            let words: Vec<&str> = r
                .prompt
                .trim_start_matches("reverse: ")
                .trim_end_matches(" =")
                .split(' ')
                .collect();
            let back: Vec<&str> = r.completion.split(' ').rev().collect();
            assert_eq!(words, back);
        }
        for r in generate(Task::Add, 20, 3) {
            let p: Vec<&str> = r.prompt.split(' ').collect();
            let (a, b): (u32, u32) = (p[1].parse().unwrap(), p[3].parse().unwrap());
            assert_eq!(r.completion, (a + b).to_string());
        }
        for r in generate(Task::Recall, 20, 3) {
            let (pairs, q) = r
                .prompt
                .trim_start_matches("recall: ")
                .split_once(" ; ")
                .unwrap();
            let key = q.trim_end_matches(" ?");
            let words: Vec<&str> = pairs.split(' ').collect();
            let at = words.iter().position(|w| *w == key).unwrap();
            let val = words[at + 1];
            assert_eq!(val, r.completion);
        }
    }
}
