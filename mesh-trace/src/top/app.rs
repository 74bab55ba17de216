//! The live view's state and what each key does. No terminal here: the
//! draw loop feeds samples and keys in, `ui` draws what is here.
use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::{
    source::Sample,
    stats::{
        any_upstream, counter_rate, is_row, row_key, visible_rows, AgentStats, History, RowKey,
        SortKey, HISTORY_SAMPLES,
    },
};
use crate::spans::live::Row;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Table,
    /// One row: its hops over time and its slowest requests.
    Detail(RowKey),
}

pub struct App {
    /// Where the data comes from, for the header.
    pub source: String,
    pub interval: Duration,
    /// The last statistics received; kept while the agent is unreachable so
    /// the screen does not go blank.
    pub stats: Option<AgentStats>,
    pub last_good: Option<Instant>,
    /// Why the latest fetch failed; None once one succeeds again.
    pub error: Option<String>,
    pub events_per_s: Option<f64>,
    previous_events: Option<(u64, Instant)>,
    pub history: History,
    pub filter: String,
    /// Typing into the filter: keys go to the text.
    pub editing_filter: bool,
    pub sort: SortKey,
    pub reversed: bool,
    /// Followed by key, not position, so the selection stays on its row
    /// when rows are re-sorted by a refresh.
    pub selected: Option<RowKey>,
    pub mode: Mode,
    pub paused: bool,
    pub help: bool,
    pub quit: bool,
    /// The last sample applied.
    pub seq: u64,
}

impl App {
    pub fn new(source: String, interval: Duration) -> App {
        App {
            source,
            interval,
            stats: None,
            last_good: None,
            error: None,
            events_per_s: None,
            previous_events: None,
            history: History::new(HISTORY_SAMPLES),
            filter: String::new(),
            editing_filter: false,
            sort: SortKey::Rate,
            reversed: false,
            selected: None,
            mode: Mode::Table,
            paused: false,
            help: false,
            quit: false,
            seq: 0,
        }
    }

    /// Takes in a sample, unless paused: pausing freezes what is shown,
    /// and the draw loop applies the latest sample when it resumes.
    pub fn on_sample(&mut self, sample: &Sample) {
        if self.paused || sample.seq == self.seq {
            return;
        }
        self.seq = sample.seq;
        match &sample.result {
            Ok(stats) => {
                let total = stats.agent.events_total;
                if let Some((previous, at)) = self.previous_events {
                    self.events_per_s =
                        counter_rate(previous, total, sample.at.saturating_duration_since(at));
                }
                self.previous_events = Some((total, sample.at));
                self.history.record(&stats.rows);
                self.stats = Some(stats.clone());
                self.last_good = Some(sample.at);
                self.error = None;
            }
            Err(reason) => self.error = Some(reason.clone()),
        }
        self.keep_selection_valid();
    }

    /// The rows of the table, filtered and sorted.
    pub fn rows(&self) -> Vec<&Row> {
        match &self.stats {
            Some(s) => visible_rows(&s.rows, &self.filter, self.sort, self.reversed),
            None => Vec::new(),
        }
    }

    /// Whether the upstream column is shown.
    pub fn upstream(&self) -> bool {
        any_upstream(&self.rows())
    }

    pub fn selected_index(&self) -> Option<usize> {
        let key = self.selected.as_ref()?;
        self.rows().iter().position(|r| is_row(r, key))
    }

    /// The row the detail view shows, when it is still in the window.
    pub fn detail_row(&self) -> Option<&Row> {
        let Mode::Detail(key) = &self.mode else {
            return None;
        };
        self.stats.as_ref()?.rows.iter().find(|r| is_row(r, key))
    }

    /// When the selected row is gone (filtered out, expired), select the
    /// first one; with no rows, nothing.
    fn keep_selection_valid(&mut self) {
        if self.selected_index().is_none() {
            self.selected = self.rows().first().map(|r| row_key(r));
        }
    }

    fn move_selection(&mut self, delta: isize) {
        let rows = self.rows();
        if rows.is_empty() {
            self.selected = None;
            return;
        }
        let current = self.selected_index().unwrap_or(0) as isize;
        let next = (current + delta).clamp(0, rows.len() as isize - 1) as usize;
        let key = row_key(rows[next]);
        if let Mode::Detail(_) = self.mode {
            self.mode = Mode::Detail(key.clone());
        }
        self.selected = Some(key);
    }

    pub fn on_key(&mut self, key: KeyEvent) {
        // Key releases and repeats are reported by some terminals; only
        // presses act.
        if key.kind == KeyEventKind::Release {
            return;
        }
        // In raw mode Ctrl-C is a key, not a signal: it always quits.
        if key.modifiers.contains(KeyModifiers::CONTROL)
            && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('d'))
        {
            self.quit = true;
            return;
        }
        if self.editing_filter {
            self.filter_key(key);
            return;
        }
        if self.help {
            // Any key closes the help; q still quits.
            self.help = false;
            if key.code == KeyCode::Char('q') {
                self.quit = true;
            }
            return;
        }
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('?') | KeyCode::F(1) => self.help = true,
            KeyCode::Char('p') | KeyCode::Char(' ') => self.paused = !self.paused,
            KeyCode::Char('/') => {
                self.editing_filter = true;
                self.mode = Mode::Table;
            }
            KeyCode::Char('s') => {
                self.sort = self.sort.next(self.upstream());
                self.reversed = false;
            }
            KeyCode::Char('S') => self.reversed = !self.reversed,
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::PageDown => self.move_selection(10),
            KeyCode::PageUp => self.move_selection(-10),
            KeyCode::Home | KeyCode::Char('g') => self.move_selection(isize::MIN / 2),
            KeyCode::End | KeyCode::Char('G') => self.move_selection(isize::MAX / 2),
            KeyCode::Enter => {
                if let (Mode::Table, Some(key)) = (&self.mode, &self.selected) {
                    self.mode = Mode::Detail(key.clone());
                }
            }
            KeyCode::Esc | KeyCode::Backspace | KeyCode::Left => match self.mode {
                Mode::Detail(_) => self.mode = Mode::Table,
                Mode::Table if key.code == KeyCode::Esc => self.set_filter(String::new()),
                Mode::Table => {}
            },
            _ => {}
        }
    }

    fn filter_key(&mut self, key: KeyEvent) {
        match key.code {
            KeyCode::Enter => self.editing_filter = false,
            KeyCode::Esc => {
                self.editing_filter = false;
                self.set_filter(String::new());
            }
            KeyCode::Backspace => {
                let mut text = self.filter.clone();
                text.pop();
                self.set_filter(text);
            }
            KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                let mut text = self.filter.clone();
                text.push(c);
                self.set_filter(text);
            }
            _ => {}
        }
    }

    /// The filter applies as it is typed.
    fn set_filter(&mut self, text: String) {
        self.filter = text;
        self.keep_selection_valid();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{agent::http::AgentInfo, spans::live::Percentiles};

    fn row(src: &str, dst: &str, rate: f64) -> Row {
        Row {
            source_workload: src.into(),
            destination_service: dst.into(),
            requests: 1,
            rate,
            errors: 0,
            error_rate: 0.0,
            retries: 0,
            total: Percentiles::default(),
            hops: BTreeMap::new(),
            sidecar_share: None,
            slowest: Vec::new(),
            tcp: Default::default(),
        }
    }

    fn sample(seq: u64, at: Instant, events: u64, rows: Vec<Row>) -> Sample {
        Sample {
            seq,
            at,
            result: Ok(AgentStats {
                agent: AgentInfo {
                    events_total: events,
                    ..AgentInfo::default()
                },
                window_s: 60.0,
                rows,
            }),
        }
    }

    fn press(app: &mut App, code: KeyCode) {
        app.on_key(KeyEvent::new(code, KeyModifiers::NONE));
    }

    fn typed(app: &mut App, text: &str) {
        for c in text.chars() {
            press(app, KeyCode::Char(c));
        }
    }

    fn bookinfo() -> Vec<Row> {
        vec![
            row("loadgen", "productpage", 20.0),
            row("productpage", "reviews", 20.0),
            row("reviews", "ratings", 13.0),
            row("productpage", "details", 20.0),
        ]
    }

    fn app_with_rows() -> App {
        let mut app = App::new("test".into(), Duration::from_secs(1));
        app.on_sample(&sample(1, Instant::now(), 0, bookinfo()));
        app
    }

    #[test]
    fn events_per_second_from_successive_samples() {
        let mut app = App::new("test".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        app.on_sample(&sample(1, t0, 1_000, vec![]));
        assert_eq!(app.events_per_s, None);
        app.on_sample(&sample(2, t0 + Duration::from_secs(2), 3_000, vec![]));
        assert_eq!(app.events_per_s, Some(1_000.0));
        // The same sample again changes nothing.
        app.on_sample(&sample(2, t0 + Duration::from_secs(3), 9_000, vec![]));
        assert_eq!(app.events_per_s, Some(1_000.0));
    }

    #[test]
    fn a_failed_fetch_keeps_the_last_data_and_recovers() {
        let mut app = app_with_rows();
        app.on_sample(&Sample {
            seq: 2,
            at: Instant::now(),
            result: Err("Connection refused".into()),
        });
        assert_eq!(app.error.as_deref(), Some("Connection refused"));
        assert_eq!(app.rows().len(), 4);
        app.on_sample(&sample(3, Instant::now(), 0, bookinfo()));
        assert_eq!(app.error, None);
    }

    #[test]
    fn paused_ignores_samples_until_resumed() {
        let mut app = app_with_rows();
        press(&mut app, KeyCode::Char('p'));
        assert!(app.paused);
        app.on_sample(&sample(2, Instant::now(), 0, vec![]));
        assert_eq!(app.rows().len(), 4);
        press(&mut app, KeyCode::Char('p'));
        app.on_sample(&sample(2, Instant::now(), 0, vec![]));
        assert!(app.rows().is_empty());
    }

    #[test]
    fn filter_is_typed_applied_live_and_cleared_with_esc() {
        let mut app = app_with_rows();
        press(&mut app, KeyCode::Char('/'));
        assert!(app.editing_filter);
        // While typing, letters are text, not commands.
        typed(&mut app, "reviewsq");
        assert!(!app.quit);
        press(&mut app, KeyCode::Backspace);
        assert_eq!(app.filter, "reviews");
        press(&mut app, KeyCode::Enter);
        assert!(!app.editing_filter);
        let names: Vec<&str> = app
            .rows()
            .iter()
            .map(|r| r.destination_service.as_str())
            .collect();
        assert_eq!(names, ["reviews", "ratings"]);
        // The selection moved onto a visible row.
        assert_eq!(
            app.selected,
            Some(("productpage".to_string(), "reviews".to_string()))
        );
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.filter, "");
        assert_eq!(app.rows().len(), 4);
    }

    #[test]
    fn sort_keys_cycle_and_reverse() {
        let mut app = app_with_rows();
        assert_eq!(app.sort, SortKey::Rate);
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.sort, SortKey::Errors);
        press(&mut app, KeyCode::Char('S'));
        assert!(app.reversed);
        // A new column starts in its natural direction.
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.sort, SortKey::P50);
        assert!(!app.reversed);
    }

    #[test]
    fn selection_follows_its_row_and_stays_in_bounds() {
        let mut app = app_with_rows();
        // Busiest first, ties by name.
        let first = app.rows()[0].destination_service.clone();
        assert_eq!(first, "productpage");
        press(&mut app, KeyCode::Up);
        assert_eq!(app.selected_index(), Some(0));
        press(&mut app, KeyCode::Char('j'));
        press(&mut app, KeyCode::Down);
        assert_eq!(app.selected_index(), Some(2));
        let key = app.selected.clone().unwrap();
        for _ in 0..10 {
            press(&mut app, KeyCode::Down);
        }
        assert_eq!(app.selected_index(), Some(3));
        press(&mut app, KeyCode::Char('k'));
        assert_eq!(app.selected.as_ref(), Some(&key));
        // Sorted by name, the same row is selected at another place.
        for _ in 0..12 {
            press(&mut app, KeyCode::Char('s'));
        }
        assert_eq!(app.sort, SortKey::Name);
        assert_eq!(app.selected.as_ref(), Some(&key));
    }

    #[test]
    fn enter_opens_the_detail_and_esc_goes_back() {
        let mut app = app_with_rows();
        press(&mut app, KeyCode::Down);
        let key = app.selected.clone().unwrap();
        press(&mut app, KeyCode::Enter);
        assert_eq!(app.mode, Mode::Detail(key.clone()));
        assert!(app.detail_row().is_some());
        // Up and down move between rows in the detail view too.
        press(&mut app, KeyCode::Down);
        assert_ne!(app.mode, Mode::Detail(key));
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.mode, Mode::Table);
        assert!(!app.quit);
    }

    #[test]
    fn help_quit_and_ctrl_c() {
        let mut app = app_with_rows();
        press(&mut app, KeyCode::Char('?'));
        assert!(app.help);
        press(&mut app, KeyCode::Char('x'));
        assert!(!app.help);
        press(&mut app, KeyCode::Char('q'));
        assert!(app.quit);

        let mut app = app_with_rows();
        press(&mut app, KeyCode::Char('/'));
        app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(app.quit);

        // Releases do nothing.
        let mut app = app_with_rows();
        let mut release = KeyEvent::new(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        app.on_key(release);
        assert!(!app.quit);
    }
}
