//! Heatmap pictures (PNG and SVG) of one block: layers × query heads, colour
//! bar, labelled axes, a title naming the block and the tasks, and a footer
//! saying what the colour is. Cells that were not scored are drawn grey (and a
//! legend says so) — never as a zero colour.
//!
//! Colour scales: the signed variant (values of either sign) uses a diverging
//! blue–white–red scale centred on zero with symmetric limits ±max|v|; the
//! unsigned and symmetric variants (non-negative values) use a sequential
//! viridis-like scale from 0 to the largest value. By default the four block
//! pictures of a run share one range (from every block's cells), so a colour means
//! the same number in each; `per_block_range` gives each block its own.
//!
//! Marks: a dot on a cell whose bootstrap interval lies above the median cell of the
//! run (the lower median of every scored cell, K/V counted once per kv head), a ring
//! on one whose interval lies below it: the cell is distinguishably above (below) a
//! typical cell. Without intervals
//! (`n_boot = 0`) nothing is marked and the footer says so. The footer states the
//! rule and the median.

use std::path::Path;

use gradshard_core::Block;
use gradshard_score::{Aggregate, ScoreResult, Variant};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// Width of the colour-bar panel, pixels.
const BAR_PANEL: u32 = 140;
/// Height of the footer (what the colour means, the range, the marks, the "not
/// scored" legend), pixels.
const FOOTER: u32 = 96;
/// Grey of the cells that were not scored.
const NOT_SCORED: RGBColor = RGBColor(170, 170, 170);

/// Pixel size `(width, height)` of the picture of an `layers × heads` heatmap.
pub fn picture_size(layers: usize, heads: usize) -> (u32, u32) {
    let cell = (560 / layers.max(heads).max(1)).clamp(8, 48) as u32;
    let w = 90 + heads as u32 * cell + 40 + BAR_PANEL;
    let h = 80 + layers as u32 * cell + 70 + FOOTER;
    (w.max(600), h.max(360 + FOOTER))
}

/// Piecewise-linear colour ramp through equally spaced stops, t ∈ [0, 1].
fn ramp(stops: &[(f64, f64, f64)], t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = t * (stops.len() - 1) as f64;
    let i = (pos.floor() as usize).min(stops.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Viridis-like sequential stops (dark purple → yellow).
const SEQUENTIAL: [(f64, f64, f64); 5] = [
    (68.0, 1.0, 84.0),
    (59.0, 82.0, 139.0),
    (33.0, 145.0, 140.0),
    (94.0, 201.0, 98.0),
    (253.0, 231.0, 37.0),
];

/// Diverging stops (ColorBrewer RdBu): blue → white (the middle, t = 0.5) → red.
const DIVERGING: [(f64, f64, f64); 7] = [
    (33.0, 102.0, 172.0),
    (103.0, 169.0, 207.0),
    (209.0, 229.0, 240.0),
    (255.0, 255.0, 255.0),
    (253.0, 219.0, 199.0),
    (239.0, 138.0, 98.0),
    (178.0, 24.0, 43.0),
];

/// How cell values map to colours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scale {
    /// Viridis-like from `lo` (start) to `hi` (end).
    Sequential { lo: f64, hi: f64 },
    /// Blue at `-lim`, white at 0, red at `+lim`.
    Diverging { lim: f64 },
}

impl Scale {
    /// The scale of these values: diverging when `signed` (or when any value is
    /// negative), sequential from 0 to the largest value otherwise. Non-finite values
    /// are ignored.
    pub(crate) fn for_values(vals: &[f64], signed: bool) -> Scale {
        let finite = || vals.iter().copied().filter(|v| v.is_finite());
        if signed || finite().any(|v| v < 0.0) {
            let lim = finite().fold(0.0_f64, |m, v| m.max(v.abs()));
            return Scale::Diverging {
                lim: if lim > 0.0 { lim } else { 1.0 },
            };
        }
        let hi = finite().fold(0.0_f64, f64::max);
        Scale::Sequential {
            lo: 0.0,
            hi: if hi > 0.0 { hi } else { 1.0 },
        }
    }

    /// The value range the colour bar spans.
    fn range(&self) -> (f64, f64) {
        match *self {
            Scale::Sequential { lo, hi } => (lo, hi),
            Scale::Diverging { lim } => (-lim, lim),
        }
    }

    /// Position of `v` along the colour map, in [0, 1] (clamped).
    fn position(&self, v: f64) -> f64 {
        let (lo, hi) = self.range();
        ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
    }

    fn colour(&self, v: f64) -> RGBColor {
        let t = self.position(v);
        match self {
            Scale::Sequential { .. } => ramp(&SEQUENTIAL, t),
            Scale::Diverging { .. } => ramp(&DIVERGING, t),
        }
    }
}

/// About `target` evenly spaced "nice" values (steps of 1, 2, 2.5 or 5 × 10^k)
/// inside `[lo, hi]`; always at least two when `lo < hi`.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return vec![lo];
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    let mut ticks: Vec<f64> = (first..=last)
        .map(|k| if k == 0 { 0.0 } else { k as f64 * step })
        .collect();
    if ticks.len() < 2 {
        ticks = vec![lo, hi];
    }
    ticks
}

/// One number format shared by every tick of a colour bar: scientific
/// notation with 3 significant digits (`{:.2e}`) when the largest |tick| is
/// < 1e-2 or ≥ 1e4, otherwise fixed-point with the decimals the tick step
/// needs (so each nice tick prints exactly); in both cases the same number of
/// decimals on every tick, more only when needed to tell ticks apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TickFormat {
    scientific: bool,
    decimals: usize,
}

impl TickFormat {
    fn for_ticks(ticks: &[f64]) -> TickFormat {
        let m = ticks
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0_f64, |m, v| m.max(v.abs()));
        let scientific = m != 0.0 && !(1e-2..1e4).contains(&m);
        let step = ticks
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .filter(|d| d.is_finite() && *d > 0.0)
            .fold(f64::INFINITY, f64::min);
        let mut decimals = if scientific {
            2
        } else if step.is_finite() {
            // Decimals of the step: 0.25 → 2, 5 → 0, 0.002 → 3.
            (0..12)
                .find(|d| {
                    let q = step * 10f64.powi(*d);
                    (q - q.round()).abs() <= 1e-6 * q.max(1.0)
                })
                .unwrap_or(12) as usize
        } else {
            0
        };
        loop {
            let f = TickFormat {
                scientific,
                decimals,
            };
            let mut labels: Vec<String> = ticks.iter().map(|v| f.format(*v)).collect();
            labels.sort();
            labels.dedup();
            if labels.len() == ticks.len() || decimals >= 12 {
                return f;
            }
            decimals += 1;
        }
    }

    fn format(&self, v: f64) -> String {
        let d = self.decimals;
        // Never print "-0".
        let v = if v == 0.0 { 0.0 } else { v };
        if self.scientific {
            format!("{v:.d$e}")
        } else {
            format!("{v:.d$}")
        }
    }
}

/// The colour bar's value axis: linear over the scale's range, ticks exactly at
/// the given values (so one [`TickFormat`] labels them all).
struct BarAxis {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ranged for BarAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.linear.range()
    }
}

/// Key points at the centres (odd half-cell coordinates) of every `step`-th
/// index, `step` the smallest of 1, 2, 5, 10, 20, 50, … that leaves at least
/// `min_px` pixels between labels.
fn index_ticks(n: usize, px: u32, min_px: f64) -> Vec<i32> {
    let cell = px as f64 / n.max(1) as f64;
    let step = [1usize, 2, 5]
        .iter()
        .copied()
        .chain((1..).flat_map(|e| [1usize, 2, 5].map(|m| m * 10usize.pow(e))))
        .find(|s| *s as f64 * cell >= min_px || *s >= n.max(1))
        .unwrap_or(1);
    (0..n).step_by(step).map(|i| 2 * i as i32 + 1).collect()
}

/// The values to draw: `grid[layer][head]`, None where not scored.
pub(crate) fn grid(result: &ScoreResult, block: Block) -> Vec<Vec<Option<f64>>> {
    let g = &result.geometry;
    let mut grid = vec![vec![None; g.heads]; g.layers];
    for r in result.heatmap_rows() {
        if r.block == block {
            grid[r.layer][r.head] = Some(r.score_mean);
        }
    }
    grid
}

/// The lower median of every scored cell of the run (stored resolution: a K/V cell
/// once per kv head), the reference of the marks; None when nothing was scored.
pub(crate) fn median_cell(result: &ScoreResult) -> Option<f64> {
    let mut v: Vec<f64> = result
        .cells
        .iter()
        .map(|c| c.score_mean)
        .filter(|x| x.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[(v.len() - 1) / 2])
}

/// A cell's bootstrap interval against the median cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    None,
    /// The whole interval lies above the median cell (a dot).
    Above,
    /// The whole interval lies below it (a ring).
    Below,
}

/// `marks[layer][head]`: where the cell's bootstrap interval lies against `median`.
pub(crate) fn marks(result: &ScoreResult, block: Block, median: f64) -> Vec<Vec<Mark>> {
    let g = &result.geometry;
    let mut m = vec![vec![Mark::None; g.heads]; g.layers];
    for r in result.heatmap_rows() {
        if r.block == block {
            if let (Some(lo), Some(hi)) = (r.ci_low, r.ci_high) {
                m[r.layer][r.head] = if lo > median {
                    Mark::Above
                } else if hi < median {
                    Mark::Below
                } else {
                    Mark::None
                };
            }
        }
    }
    m
}

/// The words of a picture besides the numbers.
pub(crate) struct Labels {
    /// Title; a `\n` starts a smaller second line.
    pub(crate) title: String,
    /// Caption above the colour bar.
    pub(crate) bar: String,
    /// Footer lines explaining the colour.
    pub(crate) notes: Vec<String>,
    /// Legend text of the grey "not scored" swatch (drawn only when a cell is None).
    pub(crate) not_scored: String,
    /// Legend of the dot marks (with a swatch when any cell is marked), or the note
    /// that nothing could be marked.
    pub(crate) marks: String,
}

/// The formula of M for a variant and aggregate, in the notation of
/// docs/design.md §4 (A: the first task, B: the second).
fn formula(variant: Variant, aggregate: Aggregate) -> String {
    let term = match variant {
        Variant::Unsigned => "C_A/den · |g_B|",
        Variant::Signed => "g_A/den · g_B",
        Variant::Symmetric => "√C_A/den · √C_B",
    };
    let (sum, how) = match aggregate {
        Aggregate::Sum => ("Σ_S", "summed"),
        Aggregate::Mean => ("(1/|S|) Σ_S", "averaged"),
    };
    format!(
        "M = {sum} {term}  ({} variant, {how} over the slice S)",
        variant.as_str()
    )
}

fn labels(result: &ScoreResult, block: Block, range: &str, median: Option<f64>) -> Labels {
    let o = &result.options;
    let g = &result.geometry;
    let shared = if block.is_kv() && g.kv_heads != g.heads {
        format!(
            "; each kv head shown for its {} query heads",
            g.heads / g.kv_heads
        )
    } else {
        String::new()
    };
    // Two lines, so long task names and settings never run off the picture.
    let title = format!(
        "{block} interference: {} vs {}\n{}, {}{shared}",
        o.task_a,
        o.task_b,
        o.variant.as_str(),
        o.aggregate.as_str()
    );
    let notes = vec![
        format!(
            "mean M: mean over all {} × {} sample pairs (A, B) of the interference",
            result.samples_a.len(),
            result.samples_b.len()
        ),
        formula(o.variant, o.aggregate),
        range.to_string(),
    ];
    let any_ci = result.cells.iter().any(|c| c.ci_low.is_some());
    let marks = match median {
        Some(m) if any_ci => format!(
            "dot (ring): the cell's {:.0}% bootstrap CI lies above (below) the median cell of the run, M = {m:.3e}",
            100.0 * o.ci_level
        ),
        _ => "no cell marked: no bootstrap intervals (--n-boot 0)".to_string(),
    };
    let not_scored = if o.layers.is_some() || o.heads.is_some() {
        "not scored (outside --layers/--heads)"
    } else {
        "not scored"
    };
    Labels {
        title,
        bar: "mean M".into(),
        notes,
        not_scored: not_scored.into(),
        marks,
    }
}

/// `text` in `size` px, or smaller (down to 8 px) until it fits `width`.
fn fitted<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    size: u32,
    width: u32,
) -> u32 {
    let mut s = size;
    while s > 8 {
        match area.estimate_text_size(text, &("sans-serif", s).into_text_style(area)) {
            Ok((w, _)) if w <= width => break,
            Ok(_) => s -= 1,
            Err(_) => break,
        }
    }
    s
}

/// Black or white, whichever reads better on `c`.
fn contrast(c: RGBColor) -> RGBColor {
    let luma = 0.299 * c.0 as f64 + 0.587 * c.1 as f64 + 0.114 * c.2 as f64;
    if luma > 140.0 {
        BLACK
    } else {
        WHITE
    }
}

pub(crate) fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    labels: &Labels,
    grid: &[Vec<Option<f64>>],
    marks: &[Vec<Mark>],
    scale: Scale,
) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let layers = grid.len();
    let heads = grid.first().map_or(0, Vec::len);
    let any_missing = grid.iter().flatten().any(Option::is_none);
    let (lo, hi) = scale.range();

    root.fill(&WHITE).map_err(|x| e(&x))?;
    let title = labels.title.as_str();
    let (head, sub) = title.split_once('\n').unwrap_or((title, ""));
    let root = root.titled(head, ("sans-serif", 18)).map_err(|x| e(&x))?;
    let root = if sub.is_empty() {
        root
    } else {
        root.titled(sub, ("sans-serif", 13)).map_err(|x| e(&x))?
    };
    let (w, h) = root.dim_in_pixel();
    let (body, footer) = root.split_vertically(h.saturating_sub(FOOTER));
    let (main, bar) = body.split_horizontally(w.saturating_sub(BAR_PANEL));

    // Half-cell integer coordinates: cell (h, l) occupies [2h, 2h+2] × [2l, 2l+2];
    // tick labels sit at the odd coordinates, the cell centres.
    const MARGIN: u32 = 15;
    const X_AREA: u32 = 45;
    const Y_AREA: u32 = 55;
    let (mw, mh) = main.dim_in_pixel();
    let plot_w = mw.saturating_sub(2 * MARGIN + Y_AREA);
    let plot_h = mh.saturating_sub(2 * MARGIN + X_AREA);
    let mut chart = ChartBuilder::on(&main)
        .margin(MARGIN)
        .x_label_area_size(X_AREA)
        .y_label_area_size(Y_AREA)
        .build_cartesian_2d(
            (0..2 * heads.max(1) as i32).with_key_points(index_ticks(heads, plot_w, 26.0)),
            (0..2 * layers.max(1) as i32).with_key_points(index_ticks(layers, plot_h, 18.0)),
        )
        .map_err(|x| e(&x))?;
    // Integer indices: the key points are the odd cell centres 2i + 1.
    let index_label = |v: &i32| format!("{}", (v - 1) / 2);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("query head")
        .y_desc("layer")
        .x_label_formatter(&index_label)
        .y_label_formatter(&index_label)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(grid.iter().enumerate().flat_map(|(l, row)| {
            row.iter().enumerate().map(move |(h, v)| {
                let fill = match v {
                    Some(v) => scale.colour(*v),
                    None => NOT_SCORED,
                };
                Rectangle::new(
                    [
                        (2 * h as i32, 2 * l as i32),
                        (2 * h as i32 + 2, 2 * l as i32 + 2),
                    ],
                    fill.filled(),
                )
            })
        }))
        .map_err(|x| e(&x))?;
    // Dots on the marked cells, in black or white against the cell's colour.
    let cell_px = (plot_w as f64 / heads.max(1) as f64).min(plot_h as f64 / layers.max(1) as f64);
    let radius = (cell_px / 6.0).clamp(2.0, 6.0) as i32;
    let dot = |(l, h): (usize, usize)| -> Option<(i32, i32, RGBColor, bool)> {
        let v = grid.get(l)?.get(h).copied().flatten()?;
        let filled = match marks.get(l)?.get(h)? {
            Mark::None => return None,
            Mark::Above => true,
            Mark::Below => false,
        };
        Some((
            2 * h as i32 + 1,
            2 * l as i32 + 1,
            contrast(scale.colour(v)),
            filled,
        ))
    };
    let dots: Vec<(i32, i32, RGBColor, bool)> = (0..layers)
        .flat_map(|l| (0..heads).map(move |h| (l, h)))
        .filter_map(dot)
        .collect();
    chart
        .draw_series(dots.iter().map(|(x, y, c, filled)| {
            let style = if *filled {
                c.filled()
            } else {
                c.stroke_width(2)
            };
            Circle::new((*x, *y), radius, style)
        }))
        .map_err(|x| e(&x))?;
    // A frame, so white (zero) cells of the diverging scale keep their extent.
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(0, 0), (2 * heads as i32, 2 * layers as i32)],
            BLACK.stroke_width(1),
        )))
        .map_err(|x| e(&x))?;

    // Colour bar, aligned with the plotting area of the heatmap.
    let ticks = nice_ticks(lo, hi, 8);
    let fmt = TickFormat::for_ticks(&ticks);
    let tick_label = |v: &f64| fmt.format(*v);
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(MARGIN)
        .margin_bottom(MARGIN + X_AREA)
        .margin_right(10)
        .y_label_area_size(80)
        .caption(&labels.bar, ("sans-serif", 13))
        .build_cartesian_2d(
            0.0..1.0,
            BarAxis {
                linear: (lo..hi).into(),
                ticks,
            },
        )
        .map_err(|x| e(&x))?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_label_formatter(&tick_label)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|x| e(&x))?;
    const STEPS: usize = 128;
    cb.draw_series((0..STEPS).map(|k| {
        let a = lo + (hi - lo) * k as f64 / STEPS as f64;
        let b = lo + (hi - lo) * (k + 1) as f64 / STEPS as f64;
        Rectangle::new([(0.0, a), (1.0, b)], scale.colour((a + b) / 2.0).filled())
    }))
    .map_err(|x| e(&x))?;
    cb.draw_series(std::iter::once(Rectangle::new(
        [(0.0, lo), (1.0, hi)],
        BLACK.stroke_width(1),
    )))
    .map_err(|x| e(&x))?;

    // Footer: what the colour is, and the legend of the grey cells.
    let (fw, _) = footer.dim_in_pixel();
    let left = 12;
    let avail = fw.saturating_sub(2 * left as u32);
    let mut y = 4;
    for note in &labels.notes {
        let size = fitted(&footer, note, 12, avail);
        footer
            .draw(&Text::new(note.as_str(), (left, y), ("sans-serif", size)))
            .map_err(|x| e(&x))?;
        y += 17;
    }
    {
        let text = labels.marks.as_str();
        let mut x = left;
        if !dots.is_empty() {
            footer
                .draw(&Rectangle::new(
                    [(left, y + 1), (left + 22, y + 13)],
                    RGBColor(120, 120, 120).filled(),
                ))
                .map_err(|x| e(&x))?;
            footer
                .draw(&Circle::new((left + 11, y + 7), 4, WHITE.filled()))
                .map_err(|x| e(&x))?;
            x += 30;
        }
        let size = fitted(&footer, text, 12, avail.saturating_sub((x - left) as u32));
        footer
            .draw(&Text::new(text, (x, y), ("sans-serif", size)))
            .map_err(|x| e(&x))?;
        y += 17;
    }
    if any_missing {
        footer
            .draw(&Rectangle::new(
                [(left, y + 1), (left + 22, y + 13)],
                NOT_SCORED.filled(),
            ))
            .map_err(|x| e(&x))?;
        footer
            .draw(&Rectangle::new(
                [(left, y + 1), (left + 22, y + 13)],
                BLACK.stroke_width(1),
            ))
            .map_err(|x| e(&x))?;
        let size = fitted(&footer, &labels.not_scored, 12, avail.saturating_sub(30));
        footer
            .draw(&Text::new(
                labels.not_scored.as_str(),
                (left + 30, y),
                ("sans-serif", size),
            ))
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// The colour range of `block`'s picture: shared by every block of the run, or the
/// block's own with `per_block_range`; from 0 (unsigned, symmetric) or symmetric
/// around 0 (signed).
pub fn colour_range(result: &ScoreResult, block: Block, per_block_range: bool) -> (f64, f64) {
    block_scale(result, block, per_block_range).0.range()
}

/// The scale of `block`'s picture and the footer line saying which range it is.
fn block_scale(result: &ScoreResult, block: Block, per_block_range: bool) -> (Scale, String) {
    let signed = result.options.variant == Variant::Signed;
    let rows = result.heatmap_rows();
    if per_block_range {
        let vals: Vec<f64> = rows
            .iter()
            .filter(|r| r.block == block)
            .map(|r| r.score_mean)
            .collect();
        (
            Scale::for_values(&vals, signed),
            "colour range: this block's cells only (--per-block-colour-range): compare colours within this picture only".to_string(),
        )
    } else {
        let vals: Vec<f64> = rows.iter().map(|r| r.score_mean).collect();
        let mut blocks: Vec<Block> = rows.iter().map(|r| r.block).collect();
        blocks.sort();
        blocks.dedup();
        let names: Vec<&str> = blocks.iter().map(|b| b.as_str()).collect();
        (
            Scale::for_values(&vals, signed),
            format!(
                "colour range shared by the {} pictures of this run: one colour, one value",
                names.join(", ")
            ),
        )
    }
}

/// Writes `<dir>/heatmap_<block>.png` and `.svg` with the colour range shared by
/// every block of the run; returns the file names.
pub fn write_pictures(result: &ScoreResult, block: Block, dir: &Path) -> Result<Vec<String>> {
    write_pictures_with(result, block, dir, false)
}

/// [`write_pictures`], with each block's own colour range when `per_block_range`.
pub fn write_pictures_with(
    result: &ScoreResult,
    block: Block,
    dir: &Path,
    per_block_range: bool,
) -> Result<Vec<String>> {
    let grid = grid(result, block);
    let (scale, range) = block_scale(result, block, per_block_range);
    let median = median_cell(result);

    let marks = match median {
        Some(m) => marks(result, block, m),
        None => vec![vec![Mark::None; result.geometry.heads]; result.geometry.layers],
    };
    let labels = labels(result, block, &range, median);
    let size = picture_size(grid.len(), grid.first().map_or(0, Vec::len));
    let mut names = Vec::new();
    let png = format!("heatmap_{block}.png");
    let path = dir.join(&png);
    draw(
        BitMapBackend::new(&path, size).into_drawing_area(),
        &labels,
        &grid,
        &marks,
        scale,
    )
    .map_err(|message| Error::Picture {
        path: path.clone(),
        message,
    })?;
    names.push(png);
    let svg = format!("heatmap_{block}.svg");
    let path = dir.join(&svg);
    draw(
        SVGBackend::new(&path, size).into_drawing_area(),
        &labels,
        &grid,
        &marks,
        scale,
    )
    .map_err(|message| Error::Picture {
        path: path.clone(),
        message,
    })?;
    names.push(svg);
    Ok(names)
}

#[cfg(test)]
mod tests;
