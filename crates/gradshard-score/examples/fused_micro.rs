//! Microbenchmark of the CPU backend's fused slice step on random tiles of one slice
//! (16 + 16 samples, d 64 × D 512 by default): min and median over repetitions.
//!
//!   cargo run --release -p gradshard-score --example fused_micro [ROWS] [WIDTH] [REPS]
use gradshard_score::{Backend, CpuBackend, FisherPool, FusedSlice, Tile, Variant};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let rows = *args.first().unwrap_or(&16);
    let w = *args.get(1).unwrap_or(&32768);
    let reps = *args.get(2).unwrap_or(&200);
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 1e-3
    };
    // Several slices' tiles, cycled, so that each call reads from L3 or memory as in a
    // score pass, not from the previous call's L2.
    let sets: usize = std::env::var("SETS").ok().map_or(8, |v| v.parse().unwrap());
    let tiles: Vec<(Vec<f32>, Vec<f32>)> = (0..sets)
        .map(|_| {
            (
                (0..rows * w).map(|_| rnd()).collect(),
                (0..rows * w).map(|_| rnd()).collect(),
            )
        })
        .collect();
    // PLANES=1: the tiles as bf16 byte planes (what a bf16 store's slices are read as).
    let planes: Vec<(Vec<u8>, Vec<u8>)> = tiles
        .iter()
        .map(|(a, b)| {
            let pl = |t: &[f32]| -> Vec<u8> {
                let mut out = vec![0u8; 2 * t.len()];
                for (r, row) in t.chunks_exact(w).enumerate() {
                    for (k, v) in row.iter().enumerate() {
                        let bits = (v.to_bits() >> 16) as u16;
                        out[2 * r * w + k] = bits as u8;
                        out[2 * r * w + w + k] = (bits >> 8) as u8;
                    }
                }
                out
            };
            (pl(a), pl(b))
        })
        .collect();
    let use_planes = std::env::var("PLANES").is_ok_and(|v| v == "1");
    let inv_t = vec![1.0 / 127.0; rows];
    let sel: Vec<usize> = (0..rows).collect();
    let be = CpuBackend::default();
    let mut times = Vec::with_capacity(reps);
    let mut sink = 0.0;
    for r in 0..reps {
        let (ta, tb) = if use_planes {
            let (a, b) = &planes[r % sets];
            (Tile::Bf16Planes(a), Tile::Bf16Planes(b))
        } else {
            let (a, b) = &tiles[r % sets];
            (Tile::F32(a), Tile::F32(b))
        };
        let t0 = std::time::Instant::now();
        let out = be
            .fused_slice(&FusedSlice {
                a: ta,
                a_inv_t: &inv_t,
                a_sel: &sel,
                a_sel_inv_t: &inv_t,
                b: tb,
                b_inv_t: &inv_t,
                b_sel: &sel,
                b_sel_inv_t: &inv_t,
                width: w,
                variant: Variant::Unsigned,
                pool: FisherPool::A,
                eps: 1e-10,
                lam: 1e-8,
            })
            .unwrap();
        times.push(t0.elapsed().as_secs_f64());
        sink += out.m[0];
    }
    times.sort_by(f64::total_cmp);
    println!(
        "fused_slice {rows}+{rows} rows × {w}: min {:.3} ms, median {:.3} ms ({} threads; {sink:.3e})",
        times[0] * 1e3,
        times[reps / 2] * 1e3,
        rayon::current_num_threads()
    );
}
