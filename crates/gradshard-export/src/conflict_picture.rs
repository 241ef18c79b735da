//! `conflicts_<block>.png/.svg`: layers × query heads of the head rows' cross-task mean
//! cosine on a diverging scale centred on 0, drawn by the heatmap's own
//! [`draw`](crate::picture::draw); cells whose q-value is at most [`Q_MARK`] get a black
//! dot on top.

use std::path::Path;

use gradshard_core::Block;
use gradshard_score::{Granularity, ScoreResult};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::picture::{draw, picture_size, Labels, BAR_PANEL, FOOTER};

/// Cells with a q-value at or below this are marked.
pub const Q_MARK: f64 = 0.05;

/// `grid[layer][query head]` of cross_mean (K/V: the kv head's row for each query head
/// that reads it), and the cells to mark.
type Grid = (Vec<Vec<Option<f64>>>, Vec<(usize, usize)>);

fn grid(result: &ScoreResult, block: Block) -> Grid {
    let g = &result.geometry;
    let mut grid = vec![vec![None; g.heads]; g.layers];
    let mut marks = Vec::new();
    let selected = |h: usize| {
        result
            .options
            .heads
            .as_ref()
            .is_none_or(|hs| hs.contains(&h))
    };
    let Some(c) = &result.conflicts else {
        return (grid, marks);
    };
    for r in c
        .rows
        .iter()
        .filter(|r| r.granularity == Granularity::Head && r.block == block)
    {
        let Some(stored) = r.head else { continue };
        let heads: Vec<usize> = if block.is_kv() {
            (0..g.heads)
                .filter(|&h| g.kv_head_of(h) == stored && selected(h))
                .collect()
        } else {
            vec![stored]
        };
        for h in heads {
            grid[r.layer][h] = Some(r.cross_mean);
            if r.q_value.is_some_and(|q| q <= Q_MARK) {
                marks.push((r.layer, h));
            }
        }
    }
    (grid, marks)
}

fn labels(result: &ScoreResult, block: Block) -> Labels {
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
    Labels {
        title: format!(
            "{block} sample conflicts: {} vs {}\nwhitened cosine of per-sample gradients{shared}",
            o.task_a, o.task_b
        ),
        bar: "cross mean cosine".into(),
        notes: vec![
            format!(
                "mean over all {} × {} pairs (A, B) of cos(u_A, u_B), u = g / sqrt(max(I_all, eps) + lam*); I_all over every stored sample of both tasks",
                result.samples_a.len(),
                result.samples_b.len()
            ),
            format!(
                "dot: q ≤ {Q_MARK} (label-permutation test of delta = mean within − cross, BH over all head rows)"
            ),
        ],
        not_scored: "not scored".into(),
        signed: true,
    }
}

/// The dots of the marked cells, in the heatmap's own coordinates: the same areas and
/// chart layout as [`draw`] (its title lines, footer, colour-bar panel and margins).
fn overlay<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    labels: &Labels,
    layers: usize,
    heads: usize,
    marks: &[(usize, usize)],
) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let (head, sub) = labels.title.split_once('\n').unwrap_or((&labels.title, ""));
    let root = root.titled(head, ("sans-serif", 18)).map_err(|x| e(&x))?;
    let root = if sub.is_empty() {
        root
    } else {
        root.titled(sub, ("sans-serif", 13)).map_err(|x| e(&x))?
    };
    let (w, h) = root.dim_in_pixel();
    let (body, _) = root.split_vertically(h.saturating_sub(FOOTER));
    let (main, _) = body.split_horizontally(w.saturating_sub(BAR_PANEL));
    // picture::draw's margins and label areas.
    let mut chart = ChartBuilder::on(&main)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0..2 * heads.max(1) as i32, 0..2 * layers.max(1) as i32)
        .map_err(|x| e(&x))?;
    let (pw, ph) = chart.plotting_area().dim_in_pixel();
    let cell = (pw as f64 / heads.max(1) as f64).min(ph as f64 / layers.max(1) as f64);
    let r = ((cell * 0.18).round() as i32).clamp(2, 8);
    chart
        .draw_series(
            marks.iter().map(|&(l, hd)| {
                Circle::new((2 * hd as i32 + 1, 2 * l as i32 + 1), r, BLACK.filled())
            }),
        )
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Writes `<dir>/conflicts_<block>.png` and `.svg`; returns the file names.
pub fn write_pictures(result: &ScoreResult, block: Block, dir: &Path) -> Result<Vec<String>> {
    let (grid, marks) = grid(result, block);
    let labels = labels(result, block);
    let (layers, heads) = (grid.len(), grid.first().map_or(0, Vec::len));
    let size = picture_size(layers, heads);
    let png = format!("conflicts_{block}.png");
    let path = dir.join(&png);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |message| Error::Picture { path, message }
    };
    {
        let root = BitMapBackend::new(&path, size).into_drawing_area();
        draw(root.clone(), &labels, &grid).map_err(err(&path))?;
        // The bitmap is written again with the dots on top.
        overlay(root, &labels, layers, heads, &marks).map_err(err(&path))?;
    }
    let svg = format!("conflicts_{block}.svg");
    let path = dir.join(&svg);
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        draw(root.clone(), &labels, &grid).map_err(err(&path))?;
        overlay(root, &labels, layers, heads, &marks).map_err(err(&path))?;
    }
    // `draw` closed the document; the dots went after it. Close it after them instead.
    let text = match text.find("</svg>") {
        Some(at) => format!(
            "{}{}</svg>\n",
            &text[..at],
            text[at + "</svg>".len()..].trim_start()
        ),
        None => text,
    };
    std::fs::write(&path, text).map_err(crate::error::io(&path))?;
    Ok(vec![png, svg])
}
