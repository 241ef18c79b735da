use super::*;

fn rgb(s: (f64, f64, f64)) -> RGBColor {
    RGBColor(s.0 as u8, s.1 as u8, s.2 as u8)
}

#[test]
fn signed_scale_is_diverging_and_centred_on_zero() {
    let s = Scale::for_values(&[-0.5, 0.25, 2.0, f64::NAN], true);
    assert_eq!(s, Scale::Diverging { lim: 2.0 });
    assert_eq!(s.range(), (-2.0, 2.0));
    assert_eq!(s.colour(0.0), RGBColor(255, 255, 255), "0 is white");
    assert_eq!(s.colour(-2.0), rgb(DIVERGING[0]), "-max is the blue end");
    assert_eq!(s.colour(2.0), rgb(DIVERGING[6]), "+max is the red end");
    // Blue below zero, red above.
    let (n, p) = (s.colour(-1.0), s.colour(1.0));
    assert!(n.2 > n.0 && p.0 > p.2, "{n:?} {p:?}");
    // Symmetric limits: ±v sit equally far from the white middle.
    assert_eq!(s.position(-1.0) + s.position(1.0), 1.0);
    // Signed results keep zero at white even when every value is positive.
    let s = Scale::for_values(&[1.0, 3.0], true);
    assert_eq!(s.range(), (-3.0, 3.0));
    assert_eq!(s.colour(0.0), RGBColor(255, 255, 255));
    // A negative value forces the diverging scale whatever the variant.
    assert!(matches!(
        Scale::for_values(&[-1.0, 3.0], false),
        Scale::Diverging { lim } if lim == 3.0
    ));
    // All zeros: still a usable, symmetric scale.
    assert_eq!(Scale::for_values(&[0.0, 0.0], true).range(), (-1.0, 1.0));
}

#[test]
fn unsigned_scale_is_sequential_from_zero_to_max() {
    let s = Scale::for_values(&[2.0, 5.0, 3.5], false);
    assert_eq!(s, Scale::Sequential { lo: 0.0, hi: 5.0 });
    assert_eq!(s.colour(0.0), rgb(SEQUENTIAL[0]), "0 is the start");
    assert_eq!(s.colour(5.0), rgb(SEQUENTIAL[4]), "max is the end");
    assert_eq!(
        s.colour(2.5),
        rgb(SEQUENTIAL[2]),
        "half the max is the middle stop"
    );
    // Out-of-range values clamp to the ends.
    assert_eq!(s.colour(-10.0), rgb(SEQUENTIAL[0]));
    assert_eq!(s.colour(10.0), rgb(SEQUENTIAL[4]));
    // One value: 0 to it, the value at the end.
    let one = Scale::for_values(&[7.0], false);
    assert_eq!(one.range(), (0.0, 7.0));
    assert_eq!(one.position(7.0), 1.0);
    assert_eq!(
        Scale::for_values(&[], false),
        Scale::Sequential { lo: 0.0, hi: 1.0 }
    );
    assert_eq!(
        Scale::for_values(&[0.0, 0.0], false),
        Scale::Sequential { lo: 0.0, hi: 1.0 }
    );
}

/// `(scientific, digits after the point of the mantissa)` of a label.
fn shape(s: &str) -> (bool, usize) {
    let sci = s.contains('e');
    let mantissa = s.split('e').next().unwrap();
    (sci, mantissa.split_once('.').map_or(0, |(_, f)| f.len()))
}

fn labels_of(lo: f64, hi: f64) -> Vec<String> {
    let ticks = nice_ticks(lo, hi, 8);
    assert!(ticks.len() >= 2, "{lo}..{hi}: {ticks:?}");
    assert!(ticks
        .iter()
        .all(|t| *t >= lo - 1e-12 * hi.abs() && *t <= hi * (1.0 + 1e-12) + 1e-300));
    let f = TickFormat::for_ticks(&ticks);
    let labels: Vec<String> = ticks.iter().map(|t| f.format(*t)).collect();
    // One format for every tick, and every label distinct and faithful.
    let first = shape(&labels[0]);
    for (l, t) in labels.iter().zip(&ticks) {
        assert_eq!(shape(l), first, "{labels:?}");
        assert!(
            !l.starts_with("-0") || l.parse::<f64>().unwrap() != 0.0,
            "{l}"
        );
        let back: f64 = l.parse().unwrap();
        let step = ticks[1] - ticks[0];
        assert!((back - t).abs() <= step * 0.01, "{l} vs {t}");
    }
    let mut d = labels.clone();
    d.dedup();
    assert_eq!(d.len(), labels.len(), "{labels:?}");
    labels
}

#[test]
fn colour_bar_ticks_share_one_format() {
    // Previously 0, 5.00e-3, 0.01, 0.015 in three formats.
    let l = labels_of(0.0, 0.015);
    assert!(l.iter().all(|s| !s.contains('e')), "{l:?}");
    assert_eq!(l[..3], ["0.000", "0.002", "0.004"]);
    // Small values: all scientific, 3 significant digits.
    let l = labels_of(-0.004, 0.004);
    assert!(l.iter().all(|s| s.contains('e')), "{l:?}");
    assert!(l.contains(&"0.00e0".to_string()), "{l:?}");
    assert_eq!(shape(&l[0]), (true, 2));
    // Large values: scientific too.
    let l = labels_of(0.0, 52_000.0);
    assert!(l.iter().all(|s| s.contains('e')), "{l:?}");
    // Ordinary values: fixed point, the same decimals everywhere.
    let l = labels_of(12.3, 191.8);
    assert!(l.iter().all(|s| !s.contains('e')), "{l:?}");
    assert!(l.iter().all(|s| !s.contains('.')), "{l:?}");
    let l = labels_of(-2.0, 2.0);
    assert_eq!(
        l,
        ["-2.0", "-1.5", "-1.0", "-0.5", "0.0", "0.5", "1.0", "1.5", "2.0"]
    );
    let l = labels_of(0.0, 2.0);
    assert_eq!(l[..3], ["0.00", "0.25", "0.50"]);
    // A narrow band needs more digits to keep labels apart.
    labels_of(1.000_01, 1.000_02);
    labels_of(7.0e-7, 7.1e-7);
}

#[test]
fn index_ticks_are_integers_thinned_when_crowded() {
    // Every index when cells are wide; labels are the integers 0..n.
    let t = index_ticks(4, 400, 26.0);
    assert_eq!(t, vec![1, 3, 5, 7]);
    let label = |v: &i32| format!("{}", (v - 1) / 2);
    assert_eq!(
        t.iter().map(label).collect::<Vec<_>>(),
        ["0", "1", "2", "3"]
    );
    // 64 heads in 512 px: every 5th (8 px cells, ≥ 26 px apart).
    let t = index_ticks(64, 512, 26.0);
    assert_eq!(t[..3], [1, 11, 21]);
    assert_eq!(index_ticks(1, 10, 26.0), vec![1]);
    assert!(index_ticks(0, 10, 26.0).is_empty());
}

#[test]
fn formula_names_variant_and_aggregate() {
    let f = formula(Variant::Unsigned, Aggregate::Sum);
    assert!(f.contains("Σ_S C_A/den · |g_B|") && f.contains("unsigned") && f.contains("summed"));
    let f = formula(Variant::Signed, Aggregate::Mean);
    assert!(
        f.contains("(1/|S|) Σ_S g_A/den · g_B") && f.contains("signed"),
        "{f}"
    );
    assert!(formula(Variant::Symmetric, Aggregate::Sum).contains("√C_A/den · √C_B"));
}

fn signed_grid(layers: usize, heads: usize) -> Vec<Vec<Option<f64>>> {
    (0..layers)
        .map(|l| {
            (0..heads)
                .map(|h| {
                    (l % 3 != 2 && h < heads - 2)
                        .then(|| ((l * heads + h) as f64 * 0.7).sin() * 3e-3 * (1.0 + l as f64))
                })
                .collect()
        })
        .collect()
}

fn test_labels() -> Labels {
    Labels {
        title: "Q interference: math vs general\nsigned, sum".into(),
        bar: "mean M".into(),
        notes: vec![
            "mean M: mean over all 8 × 8 sample pairs (A, B) of the interference".into(),
            formula(Variant::Signed, Aggregate::Sum),
        ],
        not_scored: "not scored (outside --layers/--heads)".into(),
        marks: "dot (ring): the cell's 95% bootstrap CI lies above (below) the median cell of the run, M = 1.000e-3".into(),
    }
}

/// Draws a signed grid with unscored cells; `GRADSHARD_PICTURE_DIR` keeps the
/// PNG there for a look.
#[test]
fn signed_grid_with_unscored_cells_draws_legend_and_footer() {
    let dir = tempfile::tempdir().unwrap();
    let grid = signed_grid(12, 16);
    let vals: Vec<f64> = grid.iter().flatten().flatten().copied().collect();
    let scale = Scale::for_values(&vals, true);
    // Every fifth scored cell marked, above or below.
    let marks: Vec<Vec<Mark>> = grid
        .iter()
        .enumerate()
        .map(|(l, r)| {
            r.iter()
                .enumerate()
                .map(|(h, v)| match (v.is_some(), (l + h) % 5, l % 2) {
                    (true, 0, 0) => Mark::Above,
                    (true, 0, _) => Mark::Below,
                    _ => Mark::None,
                })
                .collect()
        })
        .collect();
    let no_marks = vec![vec![Mark::None; 16]; 12];
    let size = picture_size(12, 16);
    let png = dir.path().join("signed.png");
    draw(
        BitMapBackend::new(&png, size).into_drawing_area(),
        &test_labels(),
        &grid,
        &marks,
        scale,
    )
    .unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 2000);
    if let Some(keep) = std::env::var_os("GRADSHARD_PICTURE_DIR") {
        std::fs::copy(&png, Path::new(&keep).join("unit_signed_12x16.png")).unwrap();
    }
    let svg = dir.path().join("signed.svg");
    draw(
        SVGBackend::new(&svg, size).into_drawing_area(),
        &test_labels(),
        &grid,
        &marks,
        scale,
    )
    .unwrap();
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("not scored (outside --layers/--heads)"));
    assert!(s.contains("mean M: mean over all 8 × 8 sample pairs"));
    assert!(s.contains("g_A/den · g_B"));
    assert!(s.contains("#AAAAAA"), "grey swatch and cells");
    // Every scored cell: nothing else drawn grey where the grid is full.
    let full: Vec<Vec<Option<f64>>> = grid
        .iter()
        .map(|r| r.iter().map(|v| Some(v.unwrap_or(0.0))).collect())
        .collect();
    draw(
        SVGBackend::new(&svg, size).into_drawing_area(),
        &test_labels(),
        &full,
        &no_marks,
        scale,
    )
    .unwrap();
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(
        !s.contains("not scored"),
        "legend only when cells are missing"
    );
    assert!(!s.contains("#AAAAAA"));
    assert!(s.contains("#FFFFFF"), "zero cells white");
}
