//! `conflicts_<block>.png/.svg`: layers × query heads of the head rows' cross-task mean
//! cosine on a diverging scale centred on 0, drawn by the heatmap's own
//! [`draw`](crate::picture::draw); cells whose q-value is at most [`Q_MARK`] carry its dot.

use std::path::Path;

use gradshard_core::Block;
use gradshard_score::{Granularity, ScoreResult};
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::picture::{draw, picture_size, Labels, Mark, Scale};

/// Cells with a q-value at or below this are marked.
pub const Q_MARK: f64 = 0.05;

/// `grid[layer][query head]` of cross_mean (K/V: the kv head's row for each query head
/// that reads it), and the cells to mark.
type Grid = (Vec<Vec<Option<f64>>>, Vec<Vec<Mark>>);

fn grid(result: &ScoreResult, block: Block) -> Grid {
    let g = &result.geometry;
    let mut grid = vec![vec![None; g.heads]; g.layers];
    let mut marks = vec![vec![Mark::None; g.heads]; g.layers];
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
                marks[r.layer][h] = Mark::Above;
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
        ],
        not_scored: "not scored".into(),
        marks: format!(
            "dot: q ≤ {Q_MARK} (label-permutation test of delta = mean within − cross, BH over all head rows)"
        ),
    }
}

/// Writes `<dir>/conflicts_<block>.png` and `.svg`; returns the file names.
pub fn write_pictures(result: &ScoreResult, block: Block, dir: &Path) -> Result<Vec<String>> {
    let (grid, marks) = grid(result, block);
    let labels = labels(result, block);
    let (layers, heads) = (grid.len(), grid.first().map_or(0, Vec::len));
    let vals: Vec<f64> = grid.iter().flatten().flatten().copied().collect();
    let scale = Scale::for_values(&vals, true);
    let size = picture_size(layers, heads);
    let png = format!("conflicts_{block}.png");
    let path = dir.join(&png);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |message| Error::Picture { path, message }
    };
    {
        let root = BitMapBackend::new(&path, size).into_drawing_area();
        draw(root, &labels, &grid, &marks, scale).map_err(err(&path))?;
    }
    let svg = format!("conflicts_{block}.svg");
    let path = dir.join(&svg);
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        draw(root, &labels, &grid, &marks, scale).map_err(err(&path))?;
    }
    std::fs::write(&path, text).map_err(crate::error::io(&path))?;
    Ok(vec![png, svg])
}
