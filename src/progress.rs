//! How `driftless apply` shows its steps: on a terminal, a live view of the steps running
//! (a spinner each, with its time so far) above the steps done; otherwise one line when a
//! step starts and one when it ends, with its duration (logs, CI, pipes).

use driftless::apply::{Progress, StepOutcome};
use driftless::plan::Step;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::time::Duration;

fn what(step: &Step) -> String {
    step.describe()
}

fn finished_line(place: &str, what: &str, outcome: &StepOutcome) -> String {
    let secs = Duration::from_millis(outcome.duration_ms).as_secs_f64();
    match &outcome.error {
        None if outcome.log.is_empty() => format!("{place} ok     {what} in {secs:.1} s"),
        None => format!("{place} ok     {what} in {secs:.1} s: {}", outcome.log.join(", ")),
        Some(e) => format!("{place} FAILED {what} in {secs:.1} s: {e}"),
    }
}

/// Progress on stderr, live on a terminal.
pub struct StderrProgress {
    live: Option<MultiProgress>,
    running: BTreeMap<usize, (String, Option<ProgressBar>)>,
    total: usize,
}

impl StderrProgress {
    pub fn new() -> StderrProgress {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        StderrProgress {
            live: terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            running: BTreeMap::new(),
            total: 0,
        }
    }

    fn place(&self, index: usize) -> String {
        format!("[{}/{}]", index + 1, self.total)
    }
}

impl Progress for StderrProgress {
    fn step_started(&mut self, index: usize, total: usize, step: &Step) {
        self.total = total;
        let what = what(step);
        let bar = match &self.live {
            Some(live) => {
                let bar = live.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix} {msg} {elapsed}").expect("a valid template"),
                );
                bar.set_prefix(self.place(index));
                bar.set_message(what.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                Some(bar)
            }
            None => {
                eprintln!("{} start  {what}", self.place(index));
                None
            }
        };
        self.running.insert(index, (what, bar));
    }

    fn step_finished(&mut self, outcome: &StepOutcome) {
        let (what, bar) = self
            .running
            .remove(&outcome.index)
            .unwrap_or_else(|| (format!("{} {}", outcome.action, outcome.node), None));
        let line = finished_line(&self.place(outcome.index), &what, outcome);
        match (&self.live, bar) {
            (Some(live), Some(bar)) => {
                bar.finish_and_clear();
                live.remove(&bar);
                let _ = live.println(line);
            }
            _ => eprintln!("{line}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_step_says_how_long_it_took_and_what_it_did() {
        let outcome = StepOutcome {
            index: 1,
            node: "k3s-2".into(),
            vmid: 101,
            action: "create",
            ok: true,
            duration_ms: 3800,
            error: None,
            failed_system: None,
            log: vec!["created (UPID:pve:1)".into(), "started".into()],
        };
        assert_eq!(
            finished_line("[2/9]", "create k3s-2 (vmid 101)", &outcome),
            "[2/9] ok     create k3s-2 (vmid 101) in 3.8 s: created (UPID:pve:1), started"
        );
        let failed = StepOutcome {
            ok: false,
            error: Some("task failed".into()),
            ..outcome
        };
        assert_eq!(
            finished_line("[2/9]", "create k3s-2 (vmid 101)", &failed),
            "[2/9] FAILED create k3s-2 (vmid 101) in 3.8 s: task failed"
        );
    }
}
