//! ONNX Runtime loads from ORT_DYLIB_PATH and runs small hand-built graphs written by
//! graft's ONNX encoder; Q4_0/Q8_0 weights repacked for MatMulNBits give the products
//! of the dequantized GGML weights. Fails (never skips) without ORT_DYLIB_PATH.

use graft_ort::graph::{repack_q4_0, repack_q8_0};
use graft_ort::onnx::{Attr, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use graft_ort::{ensure_runtime, Provider};
use graft_quant::{quantize_matrix, GgmlType};
use graft_runtime::model::Weight;
use ort::session::Session;

fn env() -> &'static ort::environment::Environment {
    ensure_runtime(None).unwrap_or_else(|e| {
        panic!("ONNX Runtime is required for these tests (run scripts/ort-env.sh): {e}")
    })
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 1013) as f32 / 1013.0 - 0.5) * 2.0)
        .collect()
}

fn info(name: &str, dims: &[i64]) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        dtype: DataType::Float,
        shape: dims.iter().map(|&d| Dim::Fixed(d)).collect(),
    }
}

fn model(graph: Graph) -> Vec<u8> {
    Model {
        ir_version: 8,
        opsets: vec![("".into(), 18), ("com.microsoft".into(), 1)],
        producer: "graft test".into(),
        graph,
        metadata: vec![],
    }
    .encode()
}

fn run(bytes: &[u8], x: Vec<f32>, x_dims: [usize; 2]) -> Vec<f32> {
    let mut session = Session::builder(env())
        .unwrap()
        .commit_from_memory(bytes)
        .unwrap();
    let x = ort::value::Tensor::from_array((x_dims, x)).unwrap();
    let out = session.run(ort::inputs!["x" => x]).unwrap();
    let (_, y) = out["y"].try_extract_tensor::<f32>().unwrap();
    y.to_vec()
}

/// `x [n, cols] * w^T` in f64 on the dequantized weights.
fn reference(w: &Weight, x: &[f32], n: usize) -> Vec<f32> {
    let wf = w.to_f32().unwrap();
    let mut y = vec![0f32; n * w.rows];
    for t in 0..n {
        for r in 0..w.rows {
            let dot: f64 = (0..w.cols)
                .map(|c| f64::from(x[t * w.cols + c]) * f64::from(wf[r * w.cols + c]))
                .sum();
            y[t * w.rows + r] = dot as f32;
        }
    }
    y
}

#[test]
fn runtime_loads_and_lists_cpu() {
    env();
    let available = graft_ort::available_providers(None);
    assert!(available.contains(&Provider::OrtCpu), "{available:?}");
    assert!(available.contains(&Provider::Native));
}

#[test]
fn add_graph_runs() {
    let graph = Graph {
        name: "add".into(),
        nodes: vec![Node {
            name: "add".into(),
            op_type: "Add".into(),
            domain: String::new(),
            inputs: vec!["x".into(), "b".into()],
            outputs: vec!["y".into()],
            attrs: vec![],
        }],
        initializers: vec![Tensor::f32s("b", &[3], &[1.0, 2.0, 3.0])],
        inputs: vec![info("x", &[2, 3])],
        outputs: vec![info("y", &[2, 3])],
    };
    let y = run(&model(graph), vec![0.5; 6], [2, 3]);
    assert_eq!(y, vec![1.5, 2.5, 3.5, 1.5, 2.5, 3.5]);
}

#[test]
fn matmul_nbits_matches_ggml_q4_0_and_q8_0() {
    let (rows, cols, n) = (24, 96, 3);
    let wv = values(rows * cols, 1);
    let x = values(n * cols, 2);
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
        let w = Weight::owned(ty, rows, cols, quantize_matrix(ty, &wv, cols).unwrap()).unwrap();
        let (packed, scales, bits, blob) = match ty {
            GgmlType::Q4_0 => {
                let (p, s) = repack_q4_0(&w).unwrap();
                (p, s, 4, 16)
            }
            _ => {
                let (p, s) = repack_q8_0(&w).unwrap();
                (p, s, 8, 32)
            }
        };
        let blocks = (cols / 32) as i64;
        let graph = Graph {
            name: "nbits".into(),
            nodes: vec![Node {
                name: "mm".into(),
                op_type: "MatMulNBits".into(),
                domain: "com.microsoft".into(),
                inputs: vec!["x".into(), "w".into(), "s".into()],
                outputs: vec!["y".into()],
                attrs: vec![
                    ("K".into(), Attr::Int(cols as i64)),
                    ("N".into(), Attr::Int(rows as i64)),
                    ("bits".into(), Attr::Int(bits)),
                    ("block_size".into(), Attr::Int(32)),
                ],
            }],
            initializers: vec![
                Tensor::raw("w", DataType::Uint8, &[rows as i64, blocks, blob], packed),
                Tensor::f32s("s", &[rows as i64 * blocks], &scales),
            ],
            inputs: vec![info("x", &[n as i64, cols as i64])],
            outputs: vec![info("y", &[n as i64, rows as i64])],
        };
        let y = run(&model(graph), x.clone(), [n, cols]);
        let want = reference(&w, &x, n);
        let max_ref = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * max_ref,
                "{ty} output {i}: onnxruntime {a}, dequantized reference {b}"
            );
        }
    }
}
