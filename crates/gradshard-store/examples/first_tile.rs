//! Time to the first tile of a store: `Store::open`, then one (layer, block, head) tile
//! of every sample of a task — what a reader pays before its first slice. Run it with
//! the store out of the page cache to see the cold cost (as root: `sync; echo 3 >
//! /proc/sys/vm/drop_caches`; otherwise `posix_fadvise(DONTNEED)` on every file of the
//! store, e.g. `python3 -c 'import os,sys; [os.posix_fadvise(os.open(os.path.join(d,f),
//! os.O_RDONLY),0,0,4) for d,_,fs in os.walk(sys.argv[1]) for f in fs]' STORE`).
//!
//!   cargo run --release -p gradshard-store --example first_tile STORE TASK [LAYER BLOCK HEAD]
use gradshard_core::Block;
use gradshard_store::Store;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: first_tile STORE TASK [LAYER BLOCK HEAD]");
        std::process::exit(2);
    }
    let layer: usize = args.get(2).map_or(7, |s| s.parse().expect("LAYER"));
    let block: Block = args.get(3).map_or(Block::O, |s| s.parse().expect("BLOCK"));
    let head: usize = args.get(4).map_or(5, |s| s.parse().expect("HEAD"));
    let t0 = std::time::Instant::now();
    let store = Store::open(std::path::Path::new(&args[0])).unwrap();
    let t1 = std::time::Instant::now();
    let n = store.samples(&args[1]).unwrap().len();
    let pos: Vec<usize> = (0..n).collect();
    let mut buf = vec![0f32; n * store.order().geometry().slice_numel()];
    store
        .read_tile(&args[1], &pos, layer, block, head, &mut buf)
        .unwrap();
    let t2 = std::time::Instant::now();
    println!(
        "open {:.3} s, first tile ({n} samples, layer {layer} {block} head {head}) {:.3} s",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64()
    );
}
