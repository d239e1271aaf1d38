//! Loading a Q4_0 model maps its weights instead of copying them: resident memory
//! after loading and running it grows by at most the file size + 10% + the KV cache.
//! (Its own test binary, so no other test allocates concurrently.)

use graft_quant::{quantize_matrix, GgmlType};
use graft_runtime::gguf::{GgufValue, GgufWriter};
use graft_runtime::kv_cache::{KvCache, KvType};
use graft_runtime::model::{BatchToken, Model};

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let resident: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    resident * 4096
}

/// A random-weight llama model of ~40M parameters, Q4_0, written with graft's writer.
fn write_model(path: &std::path::Path) {
    let (d, ff, layers, heads, kv_heads, vocab) =
        (1024usize, 2816usize, 4usize, 16u32, 4u32, 8192usize);
    let hd = d / heads as usize;
    let mut seed = 0x1234_5678u64;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", GgufValue::from("llama"))
        .unwrap();
    for (k, v) in [
        ("llama.embedding_length", d as u32),
        ("llama.feed_forward_length", ff as u32),
        ("llama.block_count", layers as u32),
        ("llama.attention.head_count", heads),
        ("llama.attention.head_count_kv", kv_heads),
        ("llama.context_length", 2048),
        ("llama.vocab_size", vocab as u32),
    ] {
        w.add_kv(k, GgufValue::U32(v)).unwrap();
    }
    let mut add = |w: &mut GgufWriter, name: String, rows: usize, cols: usize, ty: GgmlType| {
        let values = if rows == 1 {
            vec![1.0; cols]
        } else {
            rand(rows * cols)
        };
        let bytes = quantize_matrix(ty, &values, cols).unwrap();
        let dims: Vec<u64> = if rows == 1 {
            vec![cols as u64]
        } else {
            vec![cols as u64, rows as u64]
        };
        w.add_tensor(name, ty, &dims, bytes).unwrap();
    };
    let kv = kv_heads as usize * hd;
    add(&mut w, "token_embd.weight".into(), vocab, d, GgmlType::Q4_0);
    add(&mut w, "output_norm.weight".into(), 1, d, GgmlType::F32);
    for i in 0..layers {
        add(
            &mut w,
            format!("blk.{i}.attn_norm.weight"),
            1,
            d,
            GgmlType::F32,
        );
        add(
            &mut w,
            format!("blk.{i}.ffn_norm.weight"),
            1,
            d,
            GgmlType::F32,
        );
        add(
            &mut w,
            format!("blk.{i}.attn_q.weight"),
            d,
            d,
            GgmlType::Q4_0,
        );
        add(
            &mut w,
            format!("blk.{i}.attn_k.weight"),
            kv,
            d,
            GgmlType::Q4_0,
        );
        add(
            &mut w,
            format!("blk.{i}.attn_v.weight"),
            kv,
            d,
            GgmlType::Q4_0,
        );
        add(
            &mut w,
            format!("blk.{i}.attn_output.weight"),
            d,
            d,
            GgmlType::Q4_0,
        );
        add(
            &mut w,
            format!("blk.{i}.ffn_gate.weight"),
            ff,
            d,
            GgmlType::Q4_0,
        );
        add(
            &mut w,
            format!("blk.{i}.ffn_up.weight"),
            ff,
            d,
            GgmlType::Q4_0,
        );
        add(
            &mut w,
            format!("blk.{i}.ffn_down.weight"),
            d,
            ff,
            GgmlType::Q4_0,
        );
    }
    w.write_file(path).unwrap();
}

#[test]
fn resident_memory_is_file_size_plus_kv_cache() {
    let path = std::env::temp_dir().join(format!("graft-mem-{}.gguf", std::process::id()));
    write_model(&path);
    let file_size = std::fs::metadata(&path).unwrap().len() as usize;
    // Warm the thread pool and allocator outside the measured span.
    rayon::broadcast(|_| ());

    let before = rss_bytes();
    let model = Model::load(&path, None).unwrap();
    let c = &model.config;
    let n_ctx = 256;
    let mut cache = KvCache::for_context(c.n_layer, c.kv_dim(), n_ctx, KvType::F16);
    let prompt: Vec<BatchToken> = (0..32)
        .map(|pos| BatchToken {
            token: (pos * 31 % 8192) as u32,
            pos,
            seq: 0,
            logits: pos == 31,
        })
        .collect();
    model.forward(&prompt, &mut cache).unwrap();
    // every weight byte has been touched (the whole file is resident now)
    let after = rss_bytes();
    let growth = after.saturating_sub(before);
    let budget = file_size + file_size / 10 + cache.bytes();
    eprintln!(
        "file {file_size} B, KV cache {} B, RSS growth {growth} B, budget {budget} B",
        cache.bytes()
    );
    let _ = std::fs::remove_file(&path);
    assert!(
        growth <= budget,
        "RSS grew by {growth} B, more than file + 10% + KV = {budget} B"
    );
    // and the weights really were read: at least the file size became resident
    assert!(
        growth >= file_size * 9 / 10,
        "RSS grew by only {growth} B: weights not touched?"
    );
}
