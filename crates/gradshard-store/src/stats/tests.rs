use std::fs::OpenOptions;
use std::io::Write;

use gradshard_core::SampleId;

use super::*;
use gradshard_core::{bf16_bits_to_f32, f32_to_bf16_bits};

#[test]
fn round_bf16_is_the_bf16_conversion_and_sum_sq_the_plain_sum() {
    let mut bits: Vec<u32> = vec![
        0,
        0x8000_0000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f80_0000,
        0xff80_0000,
        0x0000_0001,
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_7fff,
        0x3f80_8001,
        0x007f_ffff,
    ];
    let mut x = 0x9e37_79b9u32;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        bits.push(x);
    }
    for &b in &bits {
        let v = f32::from_bits(b);
        let want = bf16_bits_to_f32(f32_to_bf16_bits(v));
        let got = round_bf16(v);
        if v.is_nan() {
            assert!(got.is_nan());
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{b:#010x}");
        }
    }
    let vals: Vec<f32> = bits
        .iter()
        .map(|&b| f32::from_bits((b & 0x807f_ffff) | 0x3f00_0000))
        .collect();
    for len in [0, 1, 7, 8, 9, 63, 1000, vals.len()] {
        let v = &vals[..len];
        for bf16 in [false, true] {
            let plain: f64 = v
                .iter()
                .map(|&x| {
                    let x = if bf16 { round_bf16(x) } else { x } as f64;
                    x * x
                })
                .sum();
            let got = sum_sq(v, bf16);
            assert!((got - plain).abs() <= 1e-12 * plain, "{len} {bf16}");
            assert_eq!(got.to_bits(), sum_sq(v, bf16).to_bits());
        }
    }
    // bf16 rounding is applied: 1 + 2⁻⁹ rounds to 1.
    assert_eq!(sum_sq(&[1.0 + 1.0 / 512.0], true), 1.0);
}

#[test]
fn chan_merge_equals_one_pass_and_m2_is_the_spread_not_the_squared_mean() {
    let xs: Vec<Vec<f64>> = (0..11)
        .map(|i| vec![(i as f64 * 0.37).sin() + 2.0, 1e-6 * (i * i) as f64])
        .collect();
    let mut all = Welford::new(2);
    xs.iter().for_each(|x| all.push(x));
    let (mut a, mut b) = (Welford::new(2), Welford::new(2));
    xs.iter().step_by(2).for_each(|x| a.push(x));
    xs.iter().skip(1).step_by(2).for_each(|x| b.push(x));
    a.merge(&b);
    assert_eq!(a.n, 11);
    for j in 0..2 {
        let mean = xs.iter().map(|x| x[j]).sum::<f64>() / 11.0;
        let m2: f64 = xs.iter().map(|x| (x[j] - mean).powi(2)).sum();
        assert!((all.mean[j] - mean).abs() <= 1e-14 * mean.abs());
        assert!((a.mean[j] - mean).abs() <= 1e-14 * mean.abs());
        assert!((all.m2[j] - m2).abs() <= 1e-12 * m2);
        assert!((a.m2[j] - m2).abs() <= 1e-12 * m2);
    }
    let mut e = Welford::new(2);
    e.merge(&all);
    assert_eq!(e, all);
}

/// The statistics decoders (task file, side log) on mutated bytes: an error naming
/// the file or a value, never a panic; and any edited number fails the checksum.
#[test]
fn stats_decoders_survive_mutations_and_edits_fail_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let t = TaskName::new("math").unwrap();
    let mut w = Welford::new(3);
    w.push(&[1.0, 2.5, 1e-7]);
    w.push(&[0.5, 2.0, 3e-7]);
    let s = TaskStats {
        format: "gradshard-task-stats".into(),
        version: STATS_VERSION,
        task: t.clone(),
        n_samples: w.n,
        tokens_total: 17,
        ids_xxh3: "0123456789abcdef".into(),
        method: "rebuilt".into(),
        quantity: QUANTITY.into(),
        groups: (0..3)
            .map(|i| GroupStat {
                layer: 0,
                block: "Q".into(),
                head: i,
                numel: 64,
                mean: w.mean[i],
                m2: w.m2[i],
            })
            .collect(),
        channels: vec![],
        checksum: String::new(),
    };
    let path = s.save(dir.path()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let back = TaskStats::load(&path).unwrap();
    assert_eq!(back.groups, s.groups);
    {
        let mut side = SideLog::open(dir.path(), 3, true).unwrap();
        for i in 0..5i64 {
            side.append(&t, &SampleId::Int(i), 3, &[i as f64, 1.0, 2.0])
                .unwrap();
        }
        side.sync().unwrap();
    }
    let side_path = dir.path().join(STATS_DIR).join(SIDE_LOG);
    let side_good = std::fs::read(&side_path).unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut detected = 0;
    for round in 0..600 {
        let (src, target) = if round % 2 == 0 {
            (&good, &path)
        } else {
            (&side_good, &side_path)
        };
        let mut b = src.clone();
        for _ in 0..1 + next() % 3 {
            let i = (next() as usize) % b.len();
            match next() % 3 {
                0 => b[i] ^= 1 + (next() % 255) as u8,
                1 if b[i].is_ascii_digit() => b[i] = b'0' + ((b[i] - b'0' + 1) % 10),
                _ => b.truncate(i.max(1)),
            }
        }
        std::fs::write(target, &b).unwrap();
        if round % 2 == 0 {
            match TaskStats::load(&path) {
                Ok(l) => assert_eq!(l.groups, s.groups, "an edit passed the checksum"),
                Err(e) => {
                    assert!(e.to_string().contains("math.json"), "{e}");
                    detected += 1;
                }
            }
        } else if let Ok(l) = SideLog::open(dir.path(), 3, false) {
            for i in 0..5i64 {
                let _ = l.get(&t, &SampleId::Int(i), 3);
            }
        }
        std::fs::write(target, src).unwrap();
    }
    assert!(
        detected > 250,
        "only {detected} of 300 mutated files refused"
    );
}

#[test]
fn side_log_keeps_the_last_record_and_cuts_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let t = TaskName::new("math").unwrap();
    {
        let mut s = SideLog::open(dir.path(), 3, true).unwrap();
        s.append(&t, &SampleId::Int(1), 5, &[1.0, 2.0, 3.0])
            .unwrap();
        s.append(&t, &SampleId::Str("a b".into()), 7, &[4.0, 5.0, 6.0])
            .unwrap();
        s.append(&t, &SampleId::Int(1), 5, &[7.0, 8.0, 9.0])
            .unwrap();
        s.sync().unwrap();
    }
    let path = dir.path().join(STATS_DIR).join(SIDE_LOG);
    let good = std::fs::metadata(&path).unwrap().len();
    // A torn record at the tail (as a SIGKILL mid-write leaves it).
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);
    let ro = SideLog::open(dir.path(), 3, false).unwrap();
    assert_eq!(ro.len(), 2);
    assert_eq!(
        ro.get(&t, &SampleId::Int(1), 5).unwrap(),
        Some(vec![7.0, 8.0, 9.0])
    );
    // A different T (the sample was recomputed with other settings) is not trusted.
    assert_eq!(ro.get(&t, &SampleId::Int(1), 6).unwrap(), None);
    drop(ro);
    let mut rw = SideLog::open(dir.path(), 3, true).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
    rw.append(&t, &SampleId::Int(2), 1, &[0.5, 0.5, 0.5])
        .unwrap();
    drop(rw);
    let ro = SideLog::open(dir.path(), 3, false).unwrap();
    assert_eq!(ro.len(), 3);
    assert_eq!(
        ro.get(&t, &SampleId::Str("a b".into()), 7).unwrap(),
        Some(vec![4.0, 5.0, 6.0])
    );
    // A layout of another size is an error naming the file.
    let e = SideLog::open(dir.path(), 4, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("samples.bin") && e.contains("3"), "{e}");
}
