//! Kernel benchmarks: dequantize and matvec per type at real shapes with 1 and 2
//! threads, a "streamed" matvec that rotates through 1 GiB of weight copies so
//! every pass reads DRAM, the machine's read bandwidth, per-level matvec, and the
//! int8-vs-f32 activation comparison. Throughput is weight bytes per second.
//!
//! cargo bench -p graft-benches --bench kernels -- --warm-up-time 1 --measurement-time 3
//! (filter with a trailing pattern, e.g. `-- matvec_streamed`)

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use graft_benches::{matvec_f32_act, random_f32, random_weights, sum_bytes, sum_bytes_par};
use graft_quant::kernels::{self, Level};
use graft_quant::GgmlType;
use rayon::prelude::*;

const ALL: [GgmlType; 13] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F32,
];
/// Types also measured at 1536x576, streamed, and per level.
const MAIN: [GgmlType; 4] = [
    GgmlType::Q4_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];
const THREADS: [usize; 2] = [1, 2];
const BIG: (usize, usize) = (2048, 8192);
/// Weight bytes the streamed variant rotates through: 32x the 32 MiB L3 (with 256 MiB
/// some lines still survived a full rotation and inflated the rate by ~10%).
const STREAM_BYTES: usize = 1 << 30;

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .expect("rayon pool")
}

/// Shapes (rows, cols) measured for `t`; 1536x576 only for the main types whose
/// block size divides 576 (not the k-quants' 256).
fn shapes(t: GgmlType) -> Vec<(usize, usize)> {
    let mut v = vec![(576, 1536), BIG];
    if MAIN.contains(&t) && t.row_size(576).is_ok() {
        v.insert(1, (1536, 576));
    }
    v
}

fn bench_dequantize(c: &mut Criterion) {
    let mut g = c.benchmark_group("dequantize");
    for t in ALL.into_iter().filter(|t| *t != GgmlType::F32) {
        for (rows, cols) in [(576, 1536), BIG] {
            let w = random_weights(t, rows, cols, 1);
            let rb = t.row_size(cols).expect("shape");
            let mut out = vec![0f32; rows * cols];
            g.throughput(Throughput::Bytes(w.len() as u64));
            for threads in THREADS {
                let p = pool(threads);
                let id = BenchmarkId::new(format!("{t}/{rows}x{cols}"), format!("t{threads}"));
                g.bench_function(id, |b| {
                    p.install(|| {
                        b.iter(|| {
                            out.par_chunks_mut(cols * 64)
                                .zip(w.par_chunks(rb * 64))
                                .for_each(|(o, wc)| {
                                    for (orow, wrow) in o.chunks_mut(cols).zip(wc.chunks(rb)) {
                                        graft_quant::dequantize_row(t, wrow, orow)
                                            .expect("dequantize");
                                    }
                                });
                            black_box(&out);
                        })
                    })
                });
            }
        }
    }
    g.finish();
}

fn bench_matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    for t in ALL {
        for (rows, cols) in shapes(t) {
            let w = random_weights(t, rows, cols, 2);
            let x = random_f32(cols, 3);
            let mut y = vec![0f32; rows];
            g.throughput(Throughput::Bytes(w.len() as u64));
            for threads in THREADS {
                let p = pool(threads);
                let id = BenchmarkId::new(format!("{t}/{rows}x{cols}"), format!("t{threads}"));
                g.bench_function(id, |b| {
                    p.install(|| {
                        b.iter(|| {
                            kernels::matvec(t, &w, rows, cols, black_box(&x), &mut y)
                                .expect("matvec")
                        })
                    })
                });
            }
        }
    }
    g.finish();
}

/// Copies of the matrix, > STREAM_BYTES in all, so each pass misses every cache.
fn copies(t: GgmlType, rows: usize, cols: usize) -> Vec<Vec<u8>> {
    let one = random_weights(t, rows, cols, 4);
    let n = STREAM_BYTES / one.len() + 2;
    (0..n).map(|_| one.clone()).collect()
}

fn bench_matvec_streamed(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec_streamed");
    let (rows, cols) = BIG;
    for t in MAIN.into_iter().chain([GgmlType::F16]) {
        let ws = copies(t, rows, cols);
        let x = random_f32(cols, 5);
        let mut y = vec![0f32; rows];
        g.throughput(Throughput::Bytes(ws[0].len() as u64));
        for threads in THREADS {
            let p = pool(threads);
            let id = BenchmarkId::new(format!("{t}/{rows}x{cols}"), format!("t{threads}"));
            let mut i = 0;
            g.bench_function(id, |b| {
                p.install(|| {
                    b.iter(|| {
                        i = (i + 1) % ws.len();
                        kernels::matvec(t, &ws[i], rows, cols, black_box(&x), &mut y)
                            .expect("matvec")
                    })
                })
            });
        }
    }
    g.finish();
}

fn bench_bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("bandwidth");
    // 1 GiB of non-zero bytes (written, so every page is really backed)
    let buf = vec![1u8; 1 << 30];
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.sample_size(10);
    for threads in THREADS {
        let p = pool(threads);
        g.bench_function(BenchmarkId::new("read_1GiB", format!("t{threads}")), |b| {
            p.install(|| {
                b.iter(|| {
                    if threads == 1 {
                        sum_bytes(black_box(&buf))
                    } else {
                        sum_bytes_par(black_box(&buf))
                    }
                })
            })
        });
    }
    g.finish();
}

fn bench_levels(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec_levels");
    let (rows, cols) = BIG;
    let p = pool(1);
    for t in MAIN {
        let w = random_weights(t, rows, cols, 6);
        let x = random_f32(cols, 7);
        let mut y = vec![0f32; rows];
        g.throughput(Throughput::Bytes(w.len() as u64));
        for &lvl in kernels::available_levels() {
            let id = BenchmarkId::new(format!("{t}/{rows}x{cols}/t1"), lvl.name());
            g.bench_function(id, |b| {
                p.install(|| {
                    b.iter(|| {
                        kernels::matmul_with(lvl, t, &w, rows, cols, black_box(&x), 1, &mut y)
                            .expect("matvec")
                    })
                })
            });
        }
    }
    g.finish();
}

/// The activation-format decision: 8-bit activations (graft, AVX2 level for a like-for-
/// like comparison) against f32 activations (AVX2 kernels in graft-benches).
fn bench_act_format(c: &mut Criterion) {
    let mut g = c.benchmark_group("act_format");
    let (rows, cols) = BIG;
    for t in [GgmlType::Q4_0, GgmlType::Q8_0] {
        let ws = copies(t, rows, cols);
        let x = random_f32(cols, 8);
        let mut y = vec![0f32; rows];
        g.throughput(Throughput::Bytes(ws[0].len() as u64));
        for threads in THREADS {
            let p = pool(threads);
            for streamed in [false, true] {
                let mode = if streamed { "streamed" } else { "hot" };
                let mut i = 0;
                let id = BenchmarkId::new(format!("{t}/{rows}x{cols}/t{threads}/{mode}"), "int8");
                g.bench_function(id, |b| {
                    p.install(|| {
                        b.iter(|| {
                            i = if streamed { (i + 1) % ws.len() } else { 0 };
                            kernels::matmul_with(
                                Level::Avx2,
                                t,
                                &ws[i],
                                rows,
                                cols,
                                black_box(&x),
                                1,
                                &mut y,
                            )
                            .expect("matvec")
                        })
                    })
                });
                let id = BenchmarkId::new(format!("{t}/{rows}x{cols}/t{threads}/{mode}"), "f32");
                g.bench_function(id, |b| {
                    p.install(|| {
                        b.iter(|| {
                            i = if streamed { (i + 1) % ws.len() } else { 0 };
                            matvec_f32_act(t, &ws[i], rows, cols, black_box(&x), &mut y)
                        })
                    })
                });
            }
        }
    }
    g.finish();
}

/// One `kernels::matmul` of `n_tokens` random tokens on pool `p`, named
/// `{t}/{rows}x{cols}/t2` / `n{n_tokens}`.
fn bench_matmul(
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    p: &rayon::ThreadPool,
    t: GgmlType,
    w: &[u8],
    (rows, cols): (usize, usize),
    n_tokens: usize,
) {
    let x = random_f32(n_tokens * cols, 11);
    let mut y = vec![0f32; n_tokens * rows];
    let id = BenchmarkId::new(format!("{t}/{rows}x{cols}/t2"), format!("n{n_tokens}"));
    g.bench_function(id, |b| {
        p.install(|| {
            b.iter(|| {
                kernels::matmul(t, w, rows, cols, black_box(&x), n_tokens, &mut y).expect("matmul")
            })
        })
    });
}

/// Several tokens per call (prefill / batched decode): weight chunks are reused from
/// L2 across tokens, so time per token falls well below one matvec. Throughput counts
/// the weight bytes once per call.
fn bench_matmul_tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_tokens");
    let (rows, cols) = BIG;
    let p = pool(2);
    for t in [GgmlType::Q4_0, GgmlType::Q8_0] {
        let w = random_weights(t, rows, cols, 10);
        g.throughput(Throughput::Bytes(w.len() as u64));
        for n_tokens in [1usize, 4, 16] {
            bench_matmul(&mut g, &p, t, &w, (rows, cols), n_tokens);
        }
    }
    g.finish();
}

/// Prefill-sized products at smollm2-135m's layer shapes (q/o 576x576, gate/up
/// 1536x576, down 576x1536) with 128 tokens on 2 threads, i.e. the multi-token
/// kernels. Throughput counts multiply-adds (tokens x rows x cols).
fn bench_matmul_prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_prefill");
    let p = pool(2);
    let n_tokens = 128;
    for t in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        for (rows, cols) in [(576usize, 576usize), (1536, 576), (576, 1536)] {
            if t.row_size(cols).is_err() {
                continue;
            }
            let w = random_weights(t, rows, cols, 12);
            g.throughput(Throughput::Elements((n_tokens * rows * cols) as u64));
            bench_matmul(&mut g, &p, t, &w, (rows, cols), n_tokens);
        }
    }
    g.finish();
}

/// Per-call activation quantization (part of every matvec): one token of `cols`.
fn bench_quantize_activations(c: &mut Criterion) {
    let mut g = c.benchmark_group("quantize_activations");
    for t in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q4_K] {
        for cols in [1536usize, 8192] {
            let x = random_f32(cols, 9);
            g.throughput(Throughput::Elements(cols as u64));
            let id = BenchmarkId::new(format!("{}", kernels::vec_dot_type(t)), cols);
            g.bench_function(id, |b| {
                b.iter(|| kernels::quantize_activations(t, black_box(&x)).expect("quantize"))
            });
        }
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_matmul_prefill, bench_matmul_tokens, bench_quantize_activations, bench_bandwidth, bench_matvec_streamed, bench_matvec, bench_levels, bench_act_format, bench_dequantize
}
criterion_main!(benches);
