//! HF config.json parsing, HF -> GGUF tensor-name mapping and the llama Q/K
//! row permutation, checked against the conformance suite: every tensor of
//! each `<family>-hf` checkpoint, mapped and permuted, must equal the F32
//! tensor of `<family>-F32.gguf` bit for bit.

use std::path::{Path, PathBuf};

use graft_quant::GgmlType;
use graft_runtime::gguf::GgufFile;
use graft_runtime::hf_config::{
    gguf_to_hf_name, hf_to_gguf_name, permute_qk_rows, unpermute_qk_rows, HfConfig, HfConfigError,
    ModelType, PermuteError, RopeScalingType,
};
use graft_runtime::safetensors::SafetensorsModel;

const CONFORMANCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/conformance");

/// The conformance suite's models dir; fails (never skips) when missing.
fn models_dir() -> PathBuf {
    let dir = Path::new(CONFORMANCE).join("models");
    assert!(
        dir.is_dir(),
        "conformance suite not found at {} (expected ../shared/conformance next to the repo)",
        dir.display()
    );
    dir
}

fn parse(json: &str) -> Result<HfConfig, HfConfigError> {
    HfConfig::parse(json, Path::new("test/config.json"))
}

fn parse_err(json: &str) -> HfConfigError {
    match parse(json) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            assert!(msg.contains("test/config.json"), "no file name: {msg}");
            e
        }
    }
}

/// A minimal valid llama config with `extra` fields merged in (later keys
/// win, as serde_json maps keep the last duplicate).
fn llama_with(extra: &str) -> String {
    let base = r#""model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "vocab_size": 100"#;
    if extra.is_empty() {
        format!("{{{base}}}")
    } else {
        format!("{{{base}, {extra}}}")
    }
}

#[test]
fn conformance_configs() {
    let models = models_dir();
    let gqa = HfConfig::load(&models.join("llama-gqa-hf")).unwrap();
    assert_eq!(gqa.model_type, ModelType::Llama);
    assert_eq!(
        (
            gqa.hidden_size,
            gqa.intermediate_size,
            gqa.num_hidden_layers
        ),
        (256, 512, 2)
    );
    assert_eq!((gqa.num_attention_heads, gqa.num_key_value_heads), (4, 2));
    assert_eq!((gqa.head_dim, gqa.q_dim(), gqa.kv_dim()), (64, 256, 128));
    assert_eq!(gqa.max_position_embeddings, 256);
    assert_eq!(gqa.rms_norm_eps, 1e-5);
    assert_eq!(gqa.rope_theta, 10000.0);
    assert_eq!(gqa.rope_scaling, None);
    assert_eq!(gqa.vocab_size, 512);
    assert!(!gqa.tie_word_embeddings);
    assert!(!gqa.qkv_bias && !gqa.o_bias && !gqa.mlp_bias);
    assert_eq!((gqa.bos_token_id(), gqa.eos_token_id()), (Some(1), Some(2)));
    assert_eq!(gqa.torch_dtype.as_deref(), Some("float32"));

    let tied = HfConfig::load(&models.join("llama-tied-hf/config.json")).unwrap();
    assert_eq!(tied.model_type, ModelType::Llama);
    assert_eq!((tied.num_attention_heads, tied.num_key_value_heads), (8, 8));
    assert_eq!((tied.head_dim, tied.intermediate_size), (32, 768));
    assert_eq!(tied.rope_theta, 500000.0);
    assert!(tied.tie_word_embeddings);

    let qwen = HfConfig::load(&models.join("qwen2-hf")).unwrap();
    assert_eq!(qwen.model_type, ModelType::Qwen2);
    assert_eq!((qwen.num_attention_heads, qwen.num_key_value_heads), (4, 1));
    assert_eq!(qwen.head_dim, 64);
    assert_eq!(qwen.rms_norm_eps, 1e-6);
    assert_eq!(qwen.rope_theta, 1e6);
    assert!(qwen.tie_word_embeddings);
    assert!(qwen.qkv_bias && !qwen.o_bias);
}

/// Hyperparameters from config.json agree with the GGUF metadata llama.cpp
/// wrote for the same model.
#[test]
fn conformance_configs_match_gguf_metadata() {
    let models = models_dir();
    for family in ["llama-gqa", "llama-tied", "qwen2"] {
        let cfg = HfConfig::load(&models.join(format!("{family}-hf"))).unwrap();
        let g = GgufFile::open(models.join(format!("{family}-F32.gguf"))).unwrap();
        let arch = g.architecture().unwrap().to_string();
        assert_eq!(arch, cfg.model_type.name(), "{family}");
        let u = |k: &str| g.get_u64(&format!("{arch}.{k}")).unwrap() as usize;
        assert_eq!(u("embedding_length"), cfg.hidden_size, "{family}");
        assert_eq!(u("feed_forward_length"), cfg.intermediate_size, "{family}");
        assert_eq!(u("block_count"), cfg.num_hidden_layers, "{family}");
        assert_eq!(
            u("attention.head_count"),
            cfg.num_attention_heads,
            "{family}"
        );
        assert_eq!(
            u("attention.head_count_kv"),
            cfg.num_key_value_heads,
            "{family}"
        );
        assert_eq!(u("context_length"), cfg.max_position_embeddings, "{family}");
        let f = |k: &str| g.get_f32(&format!("{arch}.{k}")).unwrap();
        assert_eq!(f("rope.freq_base"), cfg.rope_theta as f32, "{family}");
        assert_eq!(
            f("attention.layer_norm_rms_epsilon"),
            cfg.rms_norm_eps as f32,
            "{family}"
        );
        assert_eq!(g.tensor("output.weight").is_none(), cfg.tie_word_embeddings);
    }
}

/// The core check: mapping every HF tensor name and applying the Q/K
/// permutation (llama only) reproduces llama.cpp's F32 GGUF exactly, and the
/// mapping covers every GGUF tensor.
#[test]
fn conformance_mapping_and_permutation_match_gguf() {
    let models = models_dir();
    for family in ["llama-gqa", "llama-tied", "qwen2"] {
        let cfg = HfConfig::load(&models.join(format!("{family}-hf"))).unwrap();
        let st = SafetensorsModel::open(&models.join(format!("{family}-hf"))).unwrap();
        let g = GgufFile::open(models.join(format!("{family}-F32.gguf"))).unwrap();

        let mut mapped = Vec::new();
        let mut permuted = 0;
        for hf in st.tensor_names() {
            let gname =
                hf_to_gguf_name(hf).unwrap_or_else(|| panic!("{family}: no GGUF name for {hf}"));
            assert_eq!(gguf_to_hf_name(&gname).as_deref(), Some(hf.as_str()));
            let info = g
                .tensor(&gname)
                .unwrap_or_else(|| panic!("{family}: {gname} (from {hf}) not in GGUF"));
            assert_eq!(info.ty, GgmlType::F32, "{family}/{gname}");

            let view = st.tensor(hf).unwrap();
            // GGUF ne is the HF shape reversed.
            let ne: Vec<u64> = view.shape.iter().rev().map(|&d| d as u64).collect();
            assert_eq!(info.dims, ne, "{family}/{gname} shape");

            let row_len = if view.shape.len() == 2 {
                view.shape[1]
            } else {
                1
            };
            let expected = g.tensor_data(info);
            let got: Vec<u8> = match cfg.qk_permute_heads(hf) {
                Some(n_head) => {
                    permuted += 1;
                    // Permute whole rows of bytes (4 bytes per f32).
                    let p = permute_qk_rows(view.data, n_head, row_len * 4).unwrap();
                    // And the same through f32 values.
                    let pf = permute_qk_rows(&view.to_f32(), n_head, row_len).unwrap();
                    let pf_bytes: Vec<u8> = pf.iter().flat_map(|x| x.to_le_bytes()).collect();
                    assert_eq!(p, pf_bytes);
                    // The unpermuted GGUF tensor is the HF tensor.
                    assert_eq!(
                        unpermute_qk_rows(expected, n_head, row_len * 4).unwrap(),
                        view.data,
                        "{family}/{gname} inverse"
                    );
                    // Without the permutation the tensors differ (guards
                    // against a vacuous check).
                    assert_ne!(view.data, expected, "{family}/{gname}");
                    p
                }
                None => view.data.to_vec(),
            };
            assert!(got == expected, "{family}: {hf} -> {gname} differs");
            mapped.push(gname);
        }
        let expected_permuted = if cfg.model_type == ModelType::Llama {
            2 * cfg.num_hidden_layers
        } else {
            0
        };
        assert_eq!(permuted, expected_permuted, "{family}");

        mapped.sort();
        let mut gguf_names: Vec<String> = g.tensors().iter().map(|t| t.name.clone()).collect();
        gguf_names.sort();
        assert_eq!(mapped, gguf_names, "{family}: tensor sets differ");
    }
}

#[test]
fn name_mapping() {
    let cases = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        (
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
        ),
        ("model.layers.1.self_attn.k_proj.bias", "blk.1.attn_k.bias"),
        (
            "model.layers.12.self_attn.v_proj.weight",
            "blk.12.attn_v.weight",
        ),
        (
            "model.layers.3.self_attn.o_proj.weight",
            "blk.3.attn_output.weight",
        ),
        (
            "model.layers.3.self_attn.o_proj.bias",
            "blk.3.attn_output.bias",
        ),
        (
            "model.layers.7.mlp.gate_proj.weight",
            "blk.7.ffn_gate.weight",
        ),
        ("model.layers.7.mlp.up_proj.weight", "blk.7.ffn_up.weight"),
        (
            "model.layers.7.mlp.down_proj.weight",
            "blk.7.ffn_down.weight",
        ),
        (
            "model.layers.0.input_layernorm.weight",
            "blk.0.attn_norm.weight",
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.ffn_norm.weight",
        ),
    ];
    for (hf, gguf) in cases {
        assert_eq!(hf_to_gguf_name(hf).as_deref(), Some(gguf), "{hf}");
        assert_eq!(gguf_to_hf_name(gguf).as_deref(), Some(hf), "{gguf}");
    }
    for unknown in [
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "model.layers.x.mlp.up_proj.weight",
        "model.layers.01.mlp.up_proj.weight",
        "model.layers..mlp.up_proj.weight",
        "model.layers.0.mlp.up_proj",
        "model.embed_tokens.bias",
        "lm_head.bias",
        "",
    ] {
        assert_eq!(hf_to_gguf_name(unknown), None, "{unknown}");
    }
    assert_eq!(gguf_to_hf_name("blk.0.attn_qkv.weight"), None);
    assert_eq!(gguf_to_hf_name("rope_freqs.weight"), None);
}

#[test]
fn qk_permute_heads_by_arch() {
    let llama = parse(&llama_with(r#""num_key_value_heads": 2"#)).unwrap();
    assert_eq!(
        llama.qk_permute_heads("model.layers.0.self_attn.q_proj.weight"),
        Some(4)
    );
    assert_eq!(
        llama.qk_permute_heads("model.layers.5.self_attn.q_proj.bias"),
        Some(4)
    );
    assert_eq!(
        llama.qk_permute_heads("model.layers.1.self_attn.k_proj.weight"),
        Some(2)
    );
    assert_eq!(
        llama.qk_permute_heads("model.layers.1.self_attn.v_proj.weight"),
        None
    );
    assert_eq!(llama.qk_permute_heads("model.embed_tokens.weight"), None);
    let qwen = parse(&llama_with(r#""model_type": "qwen2""#)).unwrap();
    assert_eq!(qwen.model_type, ModelType::Qwen2);
    assert_eq!(
        qwen.qk_permute_heads("model.layers.0.self_attn.q_proj.weight"),
        None
    );
}

#[test]
fn permutation_small_example() {
    // One head of dim 4, rows of 2: GGUF rows = HF rows [0, 2, 1, 3].
    let hf = [0, 1, 10, 11, 20, 21, 30, 31];
    let g = permute_qk_rows(&hf, 1, 2).unwrap();
    assert_eq!(g, [0, 1, 20, 21, 10, 11, 30, 31]);
    // Two heads of dim 4, bias (row_len 1).
    let hf: Vec<u32> = (0..8).collect();
    let g = permute_qk_rows(&hf, 2, 1).unwrap();
    assert_eq!(g, [0, 2, 1, 3, 4, 6, 5, 7]);
    assert_eq!(unpermute_qk_rows(&g, 2, 1).unwrap(), hf);
    // Head dim 8: GGUF row 2i = HF row i, 2i+1 = HF row i + 4.
    let hf: Vec<u32> = (0..8).collect();
    assert_eq!(
        permute_qk_rows(&hf, 1, 1).unwrap(),
        [0, 4, 1, 5, 2, 6, 3, 7]
    );
    // Round trip on something bigger.
    let hf: Vec<u16> = (0..(6 * 16 * 3)).collect();
    let g = permute_qk_rows(&hf, 6, 3).unwrap();
    assert_ne!(g, hf);
    assert_eq!(unpermute_qk_rows(&g, 6, 3).unwrap(), hf);
}

#[test]
fn permutation_errors() {
    let v = [0f32; 12];
    assert_eq!(
        permute_qk_rows(&v, 1, 5),
        Err(PermuteError::BadLength {
            found: 12,
            row_len: 5
        })
    );
    assert!(matches!(
        permute_qk_rows(&v, 1, 0),
        Err(PermuteError::BadLength { .. })
    ));
    assert!(matches!(
        permute_qk_rows::<f32>(&[], 1, 1),
        Err(PermuteError::BadLength { .. })
    ));
    // 12 rows, 5 heads: not a multiple.
    assert_eq!(
        permute_qk_rows(&v, 5, 1),
        Err(PermuteError::BadRows {
            rows: 12,
            n_head: 5
        })
    );
    // 12 rows, 4 heads: odd head dim 3.
    assert!(matches!(
        permute_qk_rows(&v, 4, 1),
        Err(PermuteError::BadRows { .. })
    ));
    assert!(matches!(
        unpermute_qk_rows(&v, 0, 1),
        Err(PermuteError::BadRows { .. })
    ));
}

#[test]
fn optional_fields_and_defaults() {
    let c = parse(&llama_with("")).unwrap();
    assert_eq!(c.num_key_value_heads, 4);
    assert_eq!(c.head_dim, 16);
    assert_eq!(c.rope_theta, 10000.0);
    assert!(!c.tie_word_embeddings);
    assert!(c.bos_token_ids.is_empty() && c.eos_token_ids.is_empty());
    assert_eq!(c.torch_dtype, None);

    // eos as a list (Llama 3 instruct), bos null, explicit head_dim that does
    // not divide hidden_size, attention/mlp bias.
    let c = parse(&llama_with(
        r#""eos_token_id": [128001, 128008, 128009], "bos_token_id": null, "head_dim": 24,
           "num_attention_heads": 5, "attention_bias": true, "mlp_bias": true,
           "rope_scaling": null, "torch_dtype": "bfloat16""#,
    ))
    .unwrap();
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.eos_token_id(), Some(128001));
    assert_eq!(c.bos_token_id(), None);
    assert_eq!((c.head_dim, c.q_dim()), (24, 120));
    assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));

    // qwen2 extras are ignored.
    let c = parse(&llama_with(
        r#""model_type": "qwen2", "use_sliding_window": false, "sliding_window": 4096,
           "max_window_layers": 21, "hidden_act": "silu", "architectures": ["Qwen2ForCausalLM"],
           "use_cache": true, "attention_dropout": 0.0"#,
    ))
    .unwrap();
    assert_eq!(c.model_type, ModelType::Qwen2);
}

#[test]
fn rope_scaling_variants() {
    let c = parse(&llama_with(
        r#""rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
    ))
    .unwrap();
    let rs = c.rope_scaling.unwrap();
    assert_eq!(rs.rope_type, RopeScalingType::Llama3);
    assert_eq!(rs.factor, Some(8.0));
    assert_eq!(rs.low_freq_factor, Some(1.0));
    assert_eq!(rs.high_freq_factor, Some(4.0));
    assert_eq!(rs.original_max_position_embeddings, Some(8192));

    // The older `type` key.
    let c = parse(&llama_with(
        r#""rope_scaling": {"type": "linear", "factor": 2}"#,
    ))
    .unwrap();
    let rs = c.rope_scaling.unwrap();
    assert_eq!(
        (rs.rope_type, rs.factor),
        (RopeScalingType::Linear, Some(2.0))
    );

    // Unknown types are kept for the runtime to judge.
    let c = parse(&llama_with(r#""rope_scaling": {"rope_type": "mrope"}"#)).unwrap();
    assert_eq!(
        c.rope_scaling.unwrap().rope_type,
        RopeScalingType::Other("mrope".into())
    );

    let e = parse_err(&llama_with(
        r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}"#,
    ));
    assert!(
        matches!(
            e,
            HfConfigError::Missing {
                field: "rope_scaling.low_freq_factor",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""rope_scaling": {"rope_type": "linear"}"#));
    assert!(
        matches!(
            e,
            HfConfigError::Missing {
                field: "rope_scaling.factor",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""rope_scaling": {"factor": 2.0}"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "rope_scaling.rope_type",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(
        r#""rope_scaling": {"rope_type": "linear", "factor": -1}"#,
    ));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "rope_scaling.factor",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""rope_scaling": "linear""#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "rope_scaling",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_config_values() {
    let e = parse_err(&llama_with(r#""model_type": "mistral""#));
    assert!(
        matches!(&e, HfConfigError::UnsupportedModelType { found, .. } if found == "\"mistral\""),
        "{e}"
    );
    let e = parse_err(r#"{"hidden_size": 64}"#);
    assert!(
        matches!(
            e,
            HfConfigError::Missing {
                field: "model_type",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with("").replace(r#""hidden_size": 64,"#, ""));
    assert!(
        matches!(
            e,
            HfConfigError::Missing {
                field: "hidden_size",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""num_hidden_layers": 0"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "num_hidden_layers",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""vocab_size": -5"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "vocab_size",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""hidden_size": 64.5"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "hidden_size",
                ..
            }
        ),
        "{e}"
    );
    // 64 / 5 heads, no head_dim.
    let e = parse_err(&llama_with(r#""num_attention_heads": 5"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "num_attention_heads",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("divisor of hidden_size (64)"), "{e}");
    // 4 heads, 3 kv heads.
    let e = parse_err(&llama_with(r#""num_key_value_heads": 3"#));
    assert!(
        matches!(&e, HfConfigError::Invalid { field: "num_key_value_heads", found, .. } if found == "3"),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""head_dim": 15"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "head_dim",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""rms_norm_eps": 0"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "rms_norm_eps",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""rope_theta": "big""#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "rope_theta",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""tie_word_embeddings": 1"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "tie_word_embeddings",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""eos_token_id": [2, -1]"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "eos_token_id",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err(&llama_with(r#""bos_token_id": 4294967296"#));
    assert!(
        matches!(
            e,
            HfConfigError::Invalid {
                field: "bos_token_id",
                ..
            }
        ),
        "{e}"
    );
    let e = parse_err("{\"model_type\": ");
    assert!(matches!(e, HfConfigError::Json { .. }), "{e}");
    let e = parse_err("[]");
    assert!(matches!(e, HfConfigError::Json { .. }), "{e}");
    let e = HfConfig::load(Path::new("/nonexistent/graft/config.json")).unwrap_err();
    assert!(matches!(e, HfConfigError::Io { .. }), "{e}");
}
