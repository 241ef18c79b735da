//! Heatmap pictures (PNG and SVG) of one block: layers × query heads, colour
//! bar, labelled axes, a title naming the block and the tasks. Cells that were
//! not scored are drawn grey and listed as missing — never as a zero colour.

use std::path::Path;

use gradshard_core::Block;
use gradshard_score::ScoreResult;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// Width of the colour-bar panel, pixels.
const BAR_PANEL: u32 = 140;

/// Pixel size `(width, height)` of the picture of an `layers × heads` heatmap.
pub fn picture_size(layers: usize, heads: usize) -> (u32, u32) {
    let cell = (560 / layers.max(heads).max(1)).clamp(8, 48) as u32;
    let w = 90 + heads as u32 * cell + 40 + BAR_PANEL;
    let h = 80 + layers as u32 * cell + 70;
    (w.max(480), h.max(360))
}

/// Viridis-like colour map on t ∈ [0, 1] (piecewise linear through 5 stops).
fn colour(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = t * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A compact tick label: plain decimals in [1e-2, 1e4), scientific otherwise.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (1e-2..1e4).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.2e}")
    }
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

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    grid: &[Vec<Option<f64>>],
    unit: &str,
) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let layers = grid.len();
    let heads = grid.first().map_or(0, Vec::len);
    let vals: Vec<f64> = grid.iter().flatten().flatten().copied().collect();
    let (mut lo, mut hi) = vals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    if vals.is_empty() {
        (lo, hi) = (0.0, 1.0);
    } else if hi <= lo {
        let pad = (lo.abs() * 1e-6).max(1e-12);
        (lo, hi) = (lo - pad, hi + pad);
    }
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (head, sub) = title.split_once('\n').unwrap_or((title, ""));
    let root = root.titled(head, ("sans-serif", 18)).map_err(|x| e(&x))?;
    let root = if sub.is_empty() {
        root
    } else {
        root.titled(sub, ("sans-serif", 13)).map_err(|x| e(&x))?
    };
    let (w, _) = root.dim_in_pixel();
    let (main, bar) = root.split_horizontally(w - BAR_PANEL);
    // Half-cell integer coordinates: cell (h, l) occupies [2h, 2h+2] × [2l, 2l+2];
    // tick labels sit at the odd coordinates, the cell centres.
    let centres = |n: usize| (0..n as i32).map(|i| 2 * i + 1).collect::<Vec<i32>>();
    let mut chart = ChartBuilder::on(&main)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(
            (0..2 * heads.max(1) as i32).with_key_points(centres(heads)),
            (0..2 * layers.max(1) as i32).with_key_points(centres(layers)),
        )
        .map_err(|x| e(&x))?;
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
    let grey = RGBColor(200, 200, 200);
    chart
        .draw_series(grid.iter().enumerate().flat_map(|(l, row)| {
            row.iter().enumerate().map(move |(h, v)| {
                let fill = match v {
                    Some(v) => colour((v - lo) / (hi - lo)),
                    None => grey,
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

    let mut cb = ChartBuilder::on(&bar)
        .margin_top(30)
        .margin_bottom(75)
        .margin_right(10)
        .y_label_area_size(80)
        .caption(unit, ("sans-serif", 13))
        .build_cartesian_2d(0.0..1.0, lo..hi)
        .map_err(|x| e(&x))?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&tick)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|x| e(&x))?;
    const STEPS: usize = 128;
    cb.draw_series((0..STEPS).map(|k| {
        let a = lo + (hi - lo) * k as f64 / STEPS as f64;
        let b = lo + (hi - lo) * (k + 1) as f64 / STEPS as f64;
        Rectangle::new(
            [(0.0, a), (1.0, b)],
            colour((k as f64 + 0.5) / STEPS as f64).filled(),
        )
    }))
    .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Writes `<dir>/heatmap_<block>.png` and `.svg`; returns the file names.
pub fn write_pictures(result: &ScoreResult, block: Block, dir: &Path) -> Result<Vec<String>> {
    let grid = grid(result, block);
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
    let unit = "mean M";
    let size = picture_size(grid.len(), grid.first().map_or(0, Vec::len));
    let mut names = Vec::new();
    let png = format!("heatmap_{block}.png");
    let path = dir.join(&png);
    draw(
        BitMapBackend::new(&path, size).into_drawing_area(),
        &title,
        &grid,
        unit,
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
        &title,
        &grid,
        unit,
    )
    .map_err(|message| Error::Picture {
        path: path.clone(),
        message,
    })?;
    names.push(svg);
    Ok(names)
}
