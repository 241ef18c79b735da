//! Forming factored slices Pᵀ S as the scorer visits them (slice by slice, every sample
//! of a task per slice, each sample with its own S) against one product per sample for
//! all the heads that share its S (same flops, same bits): min seconds per layer.
//!
//!   cargo run --release -p gradshard-core --example pts_micro [SAMPLES] [TOKENS]
use gradshard_core::factor::pt_s;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let samples = *args.first().unwrap_or(&32);
    let n = *args.get(1).unwrap_or(&127);
    let (d, heads, c) = (64usize, 16usize, 512usize);
    let mut x = 1u32;
    let mut rnd = || {
        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
        (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    // Per sample: P of every head (n × d each), the heads side by side (n × heads·d), S.
    let per: Vec<Vec<Vec<f32>>> = (0..samples)
        .map(|_| {
            (0..heads)
                .map(|_| (0..n * d).map(|_| rnd()).collect())
                .collect()
        })
        .collect();
    let side: Vec<Vec<f32>> = per
        .iter()
        .map(|ps| {
            let mut all = Vec::with_capacity(n * d * heads);
            for t in 0..n {
                for p in ps {
                    all.extend_from_slice(&p[t * d..(t + 1) * d]);
                }
            }
            all
        })
        .collect();
    let s: Vec<Vec<f32>> = (0..samples)
        .map(|_| (0..n * c).map(|_| rnd()).collect())
        .collect();
    let mut tile = vec![0f32; samples * d * c];
    let mut group = vec![0f32; samples * heads * d * c];
    let (mut b1, mut b2) = (f64::MAX, f64::MAX);
    let mut same = true;
    for _ in 0..10 {
        let t = std::time::Instant::now();
        for h in 0..heads {
            for ((ps, si), out) in per.iter().zip(&s).zip(tile.chunks_exact_mut(d * c)) {
                pt_s(&ps[h], si, n, d, c, out);
            }
        }
        b1 = b1.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let hd = heads * d * c;
        for i in 0..samples {
            pt_s(
                &side[i],
                &s[i],
                n,
                d * heads,
                c,
                &mut group[i * hd..(i + 1) * hd],
            );
        }
        b2 = b2.min(t.elapsed().as_secs_f64());
        // The last head's tile is the group products' last head, bit for bit.
        for i in 0..samples {
            let g = &group[i * hd + (heads - 1) * d * c..(i + 1) * hd];
            same &= g
                .iter()
                .zip(&tile[i * d * c..(i + 1) * d * c])
                .all(|(a, b)| a.to_bits() == b.to_bits());
        }
    }
    let gf = 2.0 * (samples * n * d * heads * c) as f64 / 1e9;
    println!(
        "{samples} samples × {heads} heads: per slice {:.1} ms ({:.1} GFLOP/s); per sample {:.1} ms ({:.1} GFLOP/s); bit-identical: {same}",
        b1 * 1e3,
        gf / b1,
        b2 * 1e3,
        gf / b2
    );
}
