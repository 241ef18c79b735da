//! Progress display (only the binary draws it; libraries report through callbacks).
//!
//! On a terminal: indicatif bars on stderr. Without one (`nohup`, `sbatch`, a pipe):
//! plain lines on stderr with rate and ETA, so a long job's log shows it is alive
//! without filling it: nothing for work that ends within [`QUIET_START`], then a line
//! when a new tenth of the work is done but never sooner than [`PLAIN_GAP`] after the
//! previous one, at least every [`PLAIN_HEARTBEAT`], and one at the end.
//! `GRADSHARD_PROGRESS_SECS` replaces the gap (0: a line at every tenth, from the start).

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gradshard_store::LiveCounters;
use indicatif::{ProgressBar, ProgressStyle};

/// Shortest gap between two plain progress lines.
pub const PLAIN_GAP: Duration = Duration::from_secs(5);
/// Longest gap between two plain progress lines while work goes on.
pub const PLAIN_HEARTBEAT: Duration = Duration::from_secs(30);
/// Work that ends within this writes no plain progress line at all.
pub const QUIET_START: Duration = Duration::from_secs(1);

/// Plain-line state: what, total, when the last line was written and at which tenth.
struct Plain {
    what: String,
    unit: &'static str,
    total: u64,
    started: Instant,
    last: Instant,
    last_tenth: u64,
    /// Work done when the last line was written (None: no line yet).
    last_done: Option<u64>,
    /// Last position reported (for the line at the end).
    done: u64,
    gap: Duration,
    quiet: Duration,
}

impl Plain {
    fn new(what: &str, unit: &'static str, total: u64) -> Plain {
        let gap = std::env::var("GRADSHARD_PROGRESS_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(PLAIN_GAP, Duration::from_secs_f64);
        Plain::with(what, unit, total, gap, Instant::now())
    }

    fn with(what: &str, unit: &'static str, total: u64, gap: Duration, now: Instant) -> Plain {
        Plain {
            what: what.to_string(),
            unit,
            total,
            started: now,
            last: now,
            last_tenth: 0,
            last_done: None,
            done: 0,
            gap,
            quiet: QUIET_START.min(gap),
        }
    }

    /// Writes a line when one is due (see the module doc).
    fn update(&mut self, done: u64, msg: &str) {
        if let Some(line) = self.update_at(done, msg, Instant::now()) {
            eprintln!("{line}");
        }
    }

    /// The line due at `now` for `done` units, if any.
    fn update_at(&mut self, done: u64, msg: &str, now: Instant) -> Option<String> {
        self.done = done;
        let tenth = (done * 10).checked_div(self.total).unwrap_or(0);
        let since = now.saturating_duration_since(self.last);
        let due = (tenth > self.last_tenth && since >= self.gap) || since >= PLAIN_HEARTBEAT;
        if !due || now.saturating_duration_since(self.started) < self.quiet {
            return None;
        }
        Some(self.line_at(done, msg, now))
    }

    /// The line at the end: only when the work took longer than the quiet start and
    /// its last position was not written yet.
    fn finish_at(&mut self, now: Instant) -> Option<String> {
        let done = self.done;
        if now.saturating_duration_since(self.started) < self.quiet || self.last_done == Some(done)
        {
            return None;
        }
        Some(self.line_at(done, "", now))
    }

    fn finish(&mut self) {
        if let Some(line) = self.finish_at(Instant::now()) {
            eprintln!("{line}");
        }
    }

    fn line_at(&mut self, done: u64, msg: &str, now: Instant) -> String {
        let tenth = (done * 10).checked_div(self.total).unwrap_or(0);
        self.last_tenth = self.last_tenth.max(tenth);
        self.last = now;
        self.last_done = Some(done);
        let secs = now.saturating_duration_since(self.started).as_secs_f64();
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
        format!(
            "{}: {done}{of}, {rate:.2} {}/s{eta}, elapsed {}{msg}",
            self.what,
            self.unit,
            hms(secs)
        )
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
        if let Some(p) = &self.plain {
            p.lock().expect("progress lock").finish();
        }
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
        if let Some(p) = &self.plain {
            p.lock().expect("progress lock").finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines written for `n` equal steps spread over `secs` seconds, plus the end.
    fn lines_for(n: u64, secs: f64, gap: Duration) -> Vec<String> {
        let t0 = Instant::now();
        let mut p = Plain::with("t", "samples", n, gap, t0);
        let mut out = Vec::new();
        for done in 1..=n {
            let at = t0 + Duration::from_secs_f64(secs * done as f64 / n as f64);
            out.extend(p.update_at(done, "", at));
        }
        out.extend(p.finish_at(t0 + Duration::from_secs_f64(secs)));
        out
    }

    #[test]
    fn plain_lines_are_few_and_none_for_quick_work() {
        // Under a second: nothing at all.
        assert!(lines_for(1000, 0.5, PLAIN_GAP).is_empty());
        // 12 s at the default gap: at 5 s and 10 s, and the end (100%).
        let l = lines_for(100, 12.0, PLAIN_GAP);
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(l[2].contains("100/100 samples (100%)"), "{l:?}");
        // An hour: every tenth, plus a heartbeat at least every 30 s, nothing twice.
        let l = lines_for(10, 3600.0, PLAIN_GAP);
        assert_eq!(l.len(), 10, "{l:?}");
        let l = lines_for(3600, 3600.0, PLAIN_GAP);
        assert!((120..=125).contains(&l.len()), "{}", l.len());
        // A gap of 0: a line at every tenth from the start, the last one not repeated.
        let l = lines_for(100, 0.5, Duration::ZERO);
        assert_eq!(l.len(), 10, "{l:?}");
        assert_eq!(hms(3725.0), "1h02m05s");
        assert_eq!(hms(65.0), "1m05s");
    }
}
