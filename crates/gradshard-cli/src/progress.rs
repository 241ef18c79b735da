//! Progress display (only the binary draws it; libraries report through callbacks).
//!
//! On a terminal: indicatif bars on stderr. Without one (`nohup`, `sbatch`, a pipe):
//! plain lines on stderr, one at each tenth of the work and at least every
//! [`PLAIN_INTERVAL`] (`GRADSHARD_PROGRESS_SECS` overrides it), with rate and ETA, so a
//! long job's log shows it is alive.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gradshard_store::LiveCounters;
use indicatif::{ProgressBar, ProgressStyle};

/// Longest gap between two plain progress lines.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(30);

/// Plain-line state: what, total, when the last line was written and at which tenth.
struct Plain {
    what: String,
    unit: &'static str,
    total: u64,
    started: Instant,
    last: Instant,
    last_tenth: u64,
    interval: Duration,
}

impl Plain {
    fn new(what: &str, unit: &'static str, total: u64) -> Plain {
        let interval = std::env::var("GRADSHARD_PROGRESS_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s >= 0.0)
            .map_or(PLAIN_INTERVAL, Duration::from_secs_f64);
        let now = Instant::now();
        Plain {
            what: what.to_string(),
            unit,
            total,
            started: now,
            last: now,
            last_tenth: 0,
            interval,
        }
    }

    /// Writes a line when a new tenth is reached or the interval has passed.
    fn update(&mut self, done: u64, msg: &str) {
        let tenth = (done * 10).checked_div(self.total).unwrap_or(0);
        if tenth <= self.last_tenth && self.last.elapsed() < self.interval {
            return;
        }
        self.last_tenth = self.last_tenth.max(tenth);
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        let eta = if self.total > done && rate > 0.0 {
            format!(", ETA {}", hms((self.total - done) as f64 / rate))
        } else {
            String::new()
        };
        let of = if self.total > 0 {
            format!(
                "/{} {} ({:.0}%)",
                self.total,
                self.unit,
                100.0 * done as f64 / self.total as f64
            )
        } else {
            format!(" {}", self.unit)
        };
        let msg = if msg.is_empty() {
            String::new()
        } else {
            format!(", {msg}")
        };
        eprintln!(
            "{}: {done}{of}, {rate:.2} {}/s{eta}, elapsed {}{msg}",
            self.what,
            self.unit,
            hms(secs)
        );
    }
}

fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

/// A bar of samples with GB/s and compression ratio from the writer's live counters.
pub struct WriteBar {
    bar: ProgressBar,
    plain: Option<Mutex<Plain>>,
    started: Instant,
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
        let plain = (!std::io::stderr().is_terminal())
            .then(|| Mutex::new(Plain::new(what, "samples", total)));
        WriteBar {
            bar,
            plain,
            started: Instant::now(),
        }
    }

    pub fn update(&self, done: u64, live: Option<&Arc<LiveCounters>>) {
        self.bar.set_position(done);
        let mut msg = String::new();
        if let Some(l) = live {
            let raw = l.raw_bytes.load(Ordering::Relaxed) as f64;
            let stored = l.stored_bytes.load(Ordering::Relaxed) as f64;
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            if stored > 0.0 {
                msg = format!(
                    "{:.2} GB/s in, {:.2} GB/s to disk, ratio {:.2}x",
                    raw / secs / 1e9,
                    stored / secs / 1e9,
                    raw / stored
                );
                self.bar.set_message(msg.clone());
            }
        }
        if let Some(p) = &self.plain {
            p.lock().expect("progress lock").update(done, &msg);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A plain counting bar (slices, samples): an indicatif bar on a terminal, plain
/// lines otherwise.
pub struct Counter {
    bar: ProgressBar,
    plain: Option<Mutex<Plain>>,
}

pub fn counter(total: u64, what: &str) -> Counter {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}}  {{per_sec}}  ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    let plain =
        (!std::io::stderr().is_terminal()).then(|| Mutex::new(Plain::new(what, "items", total)));
    Counter { bar, plain }
}

impl Counter {
    pub fn set_length(&self, total: u64) {
        self.bar.set_length(total);
        if let Some(p) = &self.plain {
            p.lock().expect("progress lock").total = total;
        }
    }

    pub fn set_position(&self, done: u64) {
        self.bar.set_position(done);
        if let Some(p) = &self.plain {
            p.lock().expect("progress lock").update(done, "");
        }
    }

    pub fn println(&self, line: String) {
        self.bar.println(line);
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_at_each_tenth_and_never_twice_for_one() {
        let mut p = Plain::new("t", "samples", 100);
        p.interval = Duration::from_secs(3600);
        let mut lines = 0;
        for done in 1..=100 {
            let before = p.last_tenth;
            p.update(done, "");
            if p.last_tenth != before {
                lines += 1;
            }
        }
        assert_eq!(lines, 10);
        assert_eq!(hms(3725.0), "1h02m05s");
        assert_eq!(hms(65.0), "1m05s");
    }
}
