//! Microbenchmark of whole-tile reads: every attention slice of two tasks of a store,
//! read as `Store::read_tile` does for the scorer (page cache warm after the first
//! pass); min and median seconds per pass.
//!
//!   cargo run --release -p gradshard-store --example read_micro STORE [TASK_A TASK_B] [PASSES]
use gradshard_core::Block;
use gradshard_store::Store;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let store = Store::open(std::path::Path::new(&args[0])).unwrap();
    let tasks = [
        args.get(1).map_or("a", |s| s.as_str()),
        args.get(2).map_or("b", |s| s.as_str()),
    ];
    let passes: usize = args.get(3).map_or(7, |s| s.parse().unwrap());
    let g = store.order().geometry().clone();
    let numel = g.slice_numel();
    let mut bufs: Vec<Vec<f32>> = Vec::new();
    let mut times = Vec::new();
    for _ in 0..passes {
        let t0 = std::time::Instant::now();
        let mut frames = 0;
        for block in [Block::Q, Block::K, Block::V, Block::O] {
            for layer in 0..g.layers {
                for head in 0..g.heads_of(block) {
                    for (i, t) in tasks.iter().enumerate() {
                        let n = store.samples(t).unwrap().len();
                        let pos: Vec<usize> = (0..n).collect();
                        if bufs.len() <= i {
                            bufs.push(vec![0f32; n * numel]);
                        }
                        store
                            .read_tile(t, &pos, layer, block, head, &mut bufs[i])
                            .unwrap();
                        frames += n;
                    }
                }
            }
        }
        times.push(t0.elapsed().as_secs_f64());
        if times.len() == 1 {
            println!("{frames} frames per pass");
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "read pass: min {:.3} s, median {:.3} s ({} threads)",
        times[0],
        times[times.len() / 2],
        rayon::current_num_threads()
    );
}
