//! Training-data JSONL reader on arbitrary text: it must never panic, and what it
//! accepts must survive a write/read round trip unchanged.

#![no_main]

use graft_adapters::train::data::parse_jsonl;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(records) = parse_jsonl(text, "fuzz-input") else {
        return;
    };
    let again: String = records
        .iter()
        .map(|r| {
            serde_json::json!({"prompt": r.prompt, "completion": r.completion}).to_string() + "\n"
        })
        .collect();
    assert_eq!(
        parse_jsonl(&again, "fuzz-output").expect("re-read"),
        records
    );
});
