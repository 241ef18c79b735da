//! Every decoder of the format on random and mutated bytes: it returns an error or a
//! value, never panics, and never asks the allocator for more than a bounded amount
//! (a length field cannot make it allocate what the bytes do not hold).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gradshard_core::{DType, SampleId, TaskName};
use gradshard_format::{
    decode_frame, decode_log, decode_log_record, encode_footer, encode_frame, encode_log_record,
    encode_sample_table, parse_footer, parse_frame_header, Codec, LogRecord, ShardHeader,
    TableEntry, TableView, LOG_HEADER,
};
use proptest::prelude::*;

/// Records the largest single allocation request of this test binary.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` above with the same layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Ordering::Relaxed);
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// No decoder may allocate more than this for inputs of at most a few KiB.
const BOUND: usize = 16 << 20;

/// Valid encodings of every structure, the seeds that mutations start from.
fn seeds() -> Vec<Vec<u8>> {
    let raw: Vec<u8> = (0..512u32)
        .flat_map(|i| (i as f32).sin().to_le_bytes())
        .collect();
    let mut out = vec![
        encode_frame(Codec::Zstd(1), true, DType::F32, &raw).unwrap(),
        encode_frame(Codec::ZstdExp(1), true, DType::F32, &raw).unwrap(),
        encode_frame(Codec::ZstdExp(1), true, DType::Bf16, &raw).unwrap(),
        encode_frame(Codec::None, false, DType::F32, &raw).unwrap(),
        ShardHeader::new(3, [7; 16]).encode().to_vec(),
    ];
    let e = TableEntry {
        offset: 64,
        frame_len: 100,
        raw_len: 2048,
        checksum: 99,
    };
    out.push(encode_sample_table(5, &[e, e, e], &[]));
    out.push(encode_sample_table(6, &[e, e], &[e]));
    let mut shard = ShardHeader::new(0, [1; 16]).encode().to_vec();
    shard.extend(vec![0u8; 200]);
    let off = shard.len() as u64;
    shard.extend(encode_footer(off, &[(64, 56), (120, 80)]));
    out.push(shard);
    let r = LogRecord {
        seq: 1,
        shard: 2,
        table_offset: 64,
        table_len: 80,
        tokens: 9,
        loss_sum: 3.5,
        task: TaskName::new("math").unwrap(),
        id: SampleId::Str("q-17".into()),
    };
    out.push(encode_log_record(&r));
    let mut log = LOG_HEADER.to_vec();
    log.extend(encode_log_record(&r));
    log.extend(encode_log_record(&LogRecord {
        id: SampleId::Int(-4),
        seq: 2,
        ..r
    }));
    out.push(log);
    out
}

/// Runs every decoder on `b`; any panic fails the property.
fn decode_all(b: &[u8]) {
    let mut scratch = Vec::new();
    let _ = parse_frame_header(b);
    let _ = decode_frame(b, None, &mut scratch);
    let _ = decode_frame(b, Some(12345), &mut scratch);
    let _ = ShardHeader::parse(b);
    let _ = parse_footer(b);
    for parse in [TableView::parse, TableView::parse_unverified] {
        if let Ok(v) = parse(b) {
            let n = v.all_entries().count();
            assert_eq!(n, (v.n_frames + v.n_shared) as usize);
        }
    }
    let _ = decode_log_record(b);
    let _ = decode_log(b);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set32(usize, u32),
    Set64(usize, u64),
    Truncate(usize),
    Extend(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (
            any::<usize>(),
            prop_oneof![any::<u32>(), Just(u32::MAX), Just(0), Just(1 << 30)]
        )
            .prop_map(|(i, x)| Mutation::Set32(i, x)),
        (any::<usize>(), prop_oneof![any::<u64>(), Just(u64::MAX)])
            .prop_map(|(i, x)| Mutation::Set64(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
    ]
}

fn apply(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = b.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if !b.is_empty() {
                    b[i % n] ^= x;
                }
            }
            Mutation::Set32(i, x) => {
                if b.len() >= 4 {
                    let at = i % (b.len() - 3);
                    b[at..at + 4].copy_from_slice(&x.to_le_bytes());
                }
            }
            Mutation::Set64(i, x) => {
                if b.len() >= 8 {
                    let at = i % (b.len() - 7);
                    b[at..at + 8].copy_from_slice(&x.to_le_bytes());
                }
            }
            Mutation::Truncate(i) => b.truncate(i % n),
            Mutation::Extend(x) => b.extend_from_slice(x),
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn decoders_survive_mutated_encodings(
        which in 0usize..16,
        muts in proptest::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        let b = apply(seeds[which % seeds.len()].clone(), &muts);
        decode_all(&b);
        prop_assert!(LARGEST.load(Ordering::Relaxed) <= BOUND,
            "an allocation of {} bytes", LARGEST.load(Ordering::Relaxed));
    }

    #[test]
    fn decoders_survive_random_bytes(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        decode_all(&b);
        // Random bytes behind each structure's magic, so that parsing goes past it.
        // (a zstd frame header's first bytes: codec 1, shuffled, dtype 0, kind 0).
        for magic in [&[1u8, 1, 0, 0][..], b"GRADSHRD", b"GSSAMPLE", b"GSLOG001"] {
            let mut m = magic.to_vec();
            m.extend_from_slice(&b);
            decode_all(&m);
        }
        // And the footer's trailer magic at the end.
        let mut m = b.clone();
        m.extend_from_slice(b"GSFOOTER");
        decode_all(&m);
        prop_assert!(LARGEST.load(Ordering::Relaxed) <= BOUND);
    }
}

/// A crafted frame whose checksum is right but whose header claims 1 GiB behind a tiny
/// payload is refused before the 1 GiB is allocated.
#[test]
fn a_consistent_header_claiming_a_huge_size_is_refused_without_allocating_it() {
    let raw = vec![0u8; 4096];
    let mut f = encode_frame(Codec::Zstd(1), false, DType::F32, &raw).unwrap();
    let h = parse_frame_header(&f).unwrap();
    // raw_len is a u32 in the header; find it by value and replace it.
    let at = (0..f.len() - 4)
        .find(|&i| u32::from_le_bytes(f[i..i + 4].try_into().unwrap()) == h.raw_len)
        .unwrap();
    f[at..at + 4].copy_from_slice(&(1u32 << 30).to_le_bytes());
    // Re-checksum as a careful forger would: XXH3 over header bytes 0..16 and the payload.
    let payload = f[gradshard_format::FRAME_HEADER_LEN..].to_vec();
    let sum = gradshard_format::checksum(&[&f[..16], &payload]);
    let cks_at = (0..f.len() - 8)
        .find(|&i| u64::from_le_bytes(f[i..i + 8].try_into().unwrap()) == h.checksum)
        .unwrap();
    f[cks_at..cks_at + 8].copy_from_slice(&sum.to_le_bytes());
    let e = decode_frame(&f, None, &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("zstd frame states 4096 bytes, header says 1073741824"),
        "{e}"
    );
    assert!(LARGEST.load(Ordering::Relaxed) <= BOUND);
}
