//! Pᵀ S per head (r = d) against one product for all heads of a layer (r = H·d), same
//! flops: min over repetitions.
use gradshard_core::factor::pt_s;

fn main() {
    let (n, d, heads, c) = (127usize, 64usize, 16usize, 512usize);
    let mut x = 1u32;
    let mut rnd = || {
        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
        (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let pall: Vec<f32> = (0..n * d * heads).map(|_| rnd()).collect();
    let s: Vec<f32> = (0..n * c).map(|_| rnd()).collect();
    let per: Vec<Vec<f32>> = (0..heads)
        .map(|h| {
            let mut p = Vec::with_capacity(n * d);
            for t in 0..n {
                p.extend_from_slice(&pall[t * d * heads + h * d..t * d * heads + (h + 1) * d]);
            }
            p
        })
        .collect();
    let mut out1 = vec![0f32; heads * d * c];
    let mut out2 = vec![0f32; heads * d * c];
    let (mut b1, mut b2) = (f64::MAX, f64::MAX);
    for _ in 0..200 {
        let t = std::time::Instant::now();
        for h in 0..heads {
            pt_s(&per[h], &s, n, d, c, &mut out1[h * d * c..(h + 1) * d * c]);
        }
        b1 = b1.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        pt_s(&pall, &s, n, d * heads, c, &mut out2);
        b2 = b2.min(t.elapsed().as_secs_f64());
    }
    let same = out1
        .iter()
        .zip(&out2)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    let gf = 2.0 * (n * d * heads * c) as f64 / 1e9;
    println!(
        "per head: {:.3} ms ({:.1} GFLOP/s); one product: {:.3} ms ({:.1} GFLOP/s); bit-identical: {same}",
        b1 * 1e3,
        gf / b1,
        b2 * 1e3,
        gf / b2
    );
}
