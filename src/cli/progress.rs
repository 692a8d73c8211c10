//! Progress that never freezes: a bar redrawn every half second on a terminal, with an ETA that counts
//! down during a step; elsewhere, log lines, and a heartbeat line every few seconds while one unit of
//! work (a training step, an evaluated example) runs long.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds between heartbeat lines while a unit of work runs (`NIBBLE_PROGRESS_SECONDS` overrides it).
const HEARTBEAT_SECONDS: f64 = 5.0;

fn heartbeat_interval() -> Duration {
    let seconds = std::env::var("NIBBLE_PROGRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(HEARTBEAT_SECONDS);
    Duration::from_secs_f64(seconds)
}

/// When the units of work of this process ran: what the ETA and the heartbeat read.
struct Timing {
    /// What a unit of work is called ("step").
    unit: String,
    /// Units done before this process started (a resumed run's steps).
    done_before: usize,
    done: usize,
    total: usize,
    /// When this process's first unit started, and when the last one ended.
    first_started: Instant,
    last_ended: Instant,
    /// What the heartbeat says is under way ("step 4/10", "validating").
    doing: String,
    last_beat: Instant,
}

impl Timing {
    /// Seconds left: the mean time of this process's units times those left, less the time the current
    /// one has run; None before the first unit ends.
    fn eta(&self) -> Option<f64> {
        let done_here = self.done.checked_sub(self.done_before).filter(|&n| n > 0)?;
        let per_unit = (self.last_ended - self.first_started).as_secs_f64() / done_here as f64;
        let left = self.total.saturating_sub(self.done) as f64 * per_unit;
        Some((left - self.last_ended.elapsed().as_secs_f64()).max(0.0))
    }
}

/// "1h02m", "3m05s", "42s".
pub fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// What runs after the units done: the next one, or the work after the last ("finishing").
fn next_unit(t: &Timing) -> String {
    match t.done < t.total {
        true => format!("{} {}/{}", t.unit, t.done + 1, t.total),
        false => "finishing".to_string(),
    }
}

/// Progress over `total` units of work, `done_before` of them already done.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// The bar's text after the last unit (shown again after `doing` something else).
    message: String,
    /// Without a bar: a log line per unit (training steps), or one every heartbeat interval at most
    /// (evaluated examples, which are many and quick).
    line_per_unit: bool,
    interval: Duration,
    timing: Arc<Mutex<Timing>>,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// `unit` names a unit of work in the bar ("step", "example").
    pub fn start(unit: &str, done_before: usize, total: usize, line_per_unit: bool) -> Self {
        use std::io::IsTerminal;
        let now = Instant::now();
        let timing = Arc::new(Mutex::new(Timing {
            unit: unit.to_string(),
            done_before,
            done: done_before,
            total,
            first_started: now,
            last_ended: now,
            doing: format!("{unit} {}/{total}", done_before + 1),
            last_beat: now,
        }));
        let bar = std::io::stderr().is_terminal().then(|| {
            let eta_timing = timing.clone();
            let style = indicatif::ProgressStyle::with_template(&format!(
                "{{bar:30}} {unit} {{pos}}/{{len}}  {{msg}}  {{elapsed}} elapsed, eta {{moving_eta}}"
            ))
            .expect("valid template")
            .with_key(
                "moving_eta",
                move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let eta = eta_timing.lock().ok().and_then(|t| t.eta());
                    let _ = match eta {
                        Some(s) => write!(w, "{}", duration(s)),
                        None => write!(w, "-"),
                    };
                },
            );
            let bar = indicatif::ProgressBar::new(total as u64).with_style(style);
            bar.set_position(done_before as u64);
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        let interval = heartbeat_interval();
        let stop = Arc::new(AtomicBool::new(false));
        // Without a bar, a line every few seconds while a unit runs long.
        let heartbeat = bar.is_none().then(|| {
            let (timing, stop) = (timing.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100).min(interval));
                    let Ok(mut t) = timing.lock() else { return };
                    let running = t.last_ended.elapsed();
                    if running >= interval && t.last_beat.elapsed() >= interval {
                        t.last_beat = Instant::now();
                        let eta = t
                            .eta()
                            .map_or(String::new(), |s| format!(", eta {}", duration(s)));
                        log::info!(
                            "{}: running for {}{eta}",
                            t.doing,
                            duration(running.as_secs_f64())
                        );
                    }
                }
            })
        });
        Progress {
            bar,
            message: String::new(),
            line_per_unit,
            interval,
            timing,
            stop,
            heartbeat,
        }
    }

    /// A unit ended: `done` are done; `message` is the bar's text, `line` the log line without a bar.
    pub fn advanced(&mut self, done: usize, message: String, line: impl FnOnce() -> String) {
        let mut due = self.line_per_unit;
        if let Ok(mut t) = self.timing.lock() {
            let now = Instant::now();
            due |= t.last_beat.elapsed() >= self.interval || done == t.total;
            t.done = done;
            t.last_ended = now;
            if due {
                t.last_beat = now;
            }
            t.doing = next_unit(&t);
        }
        self.message = message.clone();
        match &self.bar {
            Some(bar) => {
                bar.set_message(message);
                bar.set_position(done as u64);
            }
            None if due => log::info!("{}", line()),
            None => {}
        }
    }

    /// Seconds left, once a unit has ended.
    pub fn eta(&self) -> Option<f64> {
        self.timing.lock().ok().and_then(|t| t.eta())
    }

    /// What runs now, for the bar's text and the heartbeat ("validating 40 examples").
    pub fn doing(&mut self, what: &str) {
        if let Ok(mut t) = self.timing.lock() {
            t.doing = what.to_string();
            t.last_beat = Instant::now();
        }
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_string());
        }
    }

    /// Back to the units of work after `doing` something else.
    pub fn resume_units(&mut self) {
        if let Ok(mut t) = self.timing.lock() {
            t.doing = next_unit(&t);
        }
        if let Some(bar) = &self.bar {
            bar.set_message(self.message.clone());
        }
    }

    /// A line above the bar, or a log line.
    pub fn println(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => log::info!("{line}"),
        }
    }

    pub fn on_terminal(&self) -> bool {
        self.bar.is_some()
    }

    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.heartbeat.take() {
            let _ = thread.join();
        }
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
