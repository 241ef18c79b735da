//! Progress bars (only the binary draws them; libraries report through callbacks).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use gradshard_store::LiveCounters;
use indicatif::{ProgressBar, ProgressStyle};

/// A bar of samples with GB/s and compression ratio from the writer's live counters.
pub struct WriteBar {
    bar: ProgressBar,
    started: std::time::Instant,
}

impl WriteBar {
    pub fn new(total: u64, what: &str) -> WriteBar {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{what} {{bar:30}} {{pos}}/{{len}} samples  {{per_sec}}  {{msg}}  ETA {{eta}}"
            ))
            .expect("valid template"),
        );
        WriteBar {
            bar,
            started: std::time::Instant::now(),
        }
    }

    pub fn update(&self, done: u64, live: Option<&Arc<LiveCounters>>) {
        self.bar.set_position(done);
        if let Some(l) = live {
            let raw = l.raw_bytes.load(Ordering::Relaxed) as f64;
            let stored = l.stored_bytes.load(Ordering::Relaxed) as f64;
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            if stored > 0.0 {
                self.bar.set_message(format!(
                    "{:.2} GB/s in, {:.2} GB/s to disk, ratio {:.2}x",
                    raw / secs / 1e9,
                    stored / secs / 1e9,
                    raw / stored
                ));
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A plain counting bar.
pub fn counter(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}}  {{per_sec}}  ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    bar
}
