//! Drawing the live view from the state in `app`. Everything is laid out
//! from the frame's size on every draw, so resizing needs nothing special;
//! ratatui only sends the cells that changed, so redraws do not flicker.
use std::time::{Duration, Instant};

use ratatui::{
    layout::{Alignment, Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Clear, Paragraph, Row as TableRow, Sparkline, Table, TableState, Wrap},
    Frame,
};

use super::{
    app::{App, Mode},
    stats::{
        cell, columns_for_width, dominant_hop, fmt_ms, fmt_rate, fmt_share, hop_p50, truncate,
        Column, RowKey, HOPS, UPSTREAM,
    },
};
use crate::spans::live::{Row, SlowRequest};

const DOMINANT: Style = Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD);
const KEY: Style = Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD);
const DIM: Style = Style::new().fg(Color::DarkGray);
const ALERT: Style = Style::new().fg(Color::Red).add_modifier(Modifier::BOLD);
const HEADER: Style = Style::new().add_modifier(Modifier::BOLD);
const SORTED: Style = Style::new()
    .fg(Color::Cyan)
    .add_modifier(Modifier::BOLD)
    .add_modifier(Modifier::UNDERLINED);

pub fn draw(frame: &mut Frame, app: &App) {
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_lines(app, Instant::now())), header);
    match &app.mode {
        Mode::Table => draw_table(frame, app, body),
        Mode::Detail(key) => draw_detail(frame, app, key, body),
    }
    frame.render_widget(Paragraph::new(footer_line(app)), footer);
    if app.help {
        draw_help(frame, app);
    }
}

pub fn fmt_interval(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

fn header_lines(app: &App, now: Instant) -> Vec<Line<'static>> {
    let info = app.stats.as_ref().map(|s| &s.agent);
    let mut title = vec![
        Span::styled("mesh-trace top", HEADER),
        Span::raw(match info {
            Some(i) => format!("  agent {} at {}", i.version, app.source),
            None => format!("  agent at {}", app.source),
        }),
        Span::raw(format!("  every {}", fmt_interval(app.interval))),
    ];
    if let Some(s) = &app.stats {
        title.push(Span::raw(format!("  window {:.0}s", s.window_s)));
    }
    if app.paused {
        title.push(Span::raw("  "));
        title.push(Span::styled(
            " PAUSED ",
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ));
    }

    let counters = match info {
        Some(i) => {
            let lost = if i.events_lost > 0 {
                ALERT
            } else {
                Style::new()
            };
            Line::from(vec![
                Span::raw(format!(
                    "events {}/s  ",
                    app.events_per_s
                        .map(|r| format!("{r:.0}"))
                        .unwrap_or_else(|| "-".into())
                )),
                Span::styled(format!("lost {}", i.events_lost), lost),
                Span::raw(format!(
                    "  flows {}  in flight {}  programs {}  netns {}",
                    i.flows_tracked,
                    i.requests_in_flight,
                    i.programs.len(),
                    i.netns_watched
                )),
            ])
        }
        None => Line::styled("events -/s", DIM),
    };

    let status = if let Some(reason) = &app.error {
        let age = app
            .last_good
            .map(|t| {
                format!(
                    " (data shown is {}s old)",
                    now.saturating_duration_since(t).as_secs()
                )
            })
            .unwrap_or_default();
        Line::styled(
            format!(
                "agent unreachable: {reason}, retrying every {}{age}",
                fmt_interval(app.interval)
            ),
            ALERT,
        )
    } else if let Some(i) = info {
        if i.fallbacks.is_empty() {
            Line::styled("fallbacks: none (every optional probe attached)", DIM)
        } else {
            // Program names only; the help overlay has what each costs.
            let names: Vec<&str> = i
                .fallbacks
                .iter()
                .map(|f| f.split(':').next().unwrap_or(f).trim())
                .collect();
            Line::styled(
                format!("fallbacks: {} (? for what they cost)", names.join(", ")),
                Style::new().fg(Color::Yellow),
            )
        }
    } else {
        Line::styled(format!("connecting to {}…", app.source), DIM)
    };
    vec![Line::from(title), counters, status]
}

fn footer_line(app: &App) -> Line<'static> {
    let mut spans = Vec::new();
    let mut key = |k: &str, what: &str| {
        spans.push(Span::styled(k.to_string(), KEY));
        spans.push(Span::raw(format!(" {what}  ")));
    };
    if app.editing_filter {
        return Line::from(vec![
            Span::styled("filter: ", KEY),
            Span::raw(app.filter.clone()),
            Span::styled("█", DIM),
            Span::raw("  "),
            Span::styled("Enter", KEY),
            Span::raw(" keep  "),
            Span::styled("Esc", KEY),
            Span::raw(" clear"),
        ]);
    }
    match app.mode {
        Mode::Table => {
            key("q", "quit");
            key("/", "filter");
            key("s/S", "sort");
            key("↑↓", "select");
            key("Enter", "detail");
            key("p", "pause");
            key("?", "help");
        }
        Mode::Detail(_) => {
            key("Esc", "back");
            key("↑↓", "other row");
            key("p", "pause");
            key("?", "help");
            key("q", "quit");
        }
    }
    Line::from(spans)
}

fn table_title(app: &App, shown: usize) -> String {
    let arrow = if app.sort.descending_by_default() != app.reversed {
        "▼"
    } else {
        "▲"
    };
    let plural = if shown == 1 { "" } else { "s" };
    let mut title = format!(" {shown} row{plural} · sort: {} {arrow} ", app.sort.label());
    if !app.filter.is_empty() {
        title.push_str(&format!("· filter: {} ", app.filter));
    }
    if app.error.is_some() && app.stats.is_some() {
        title.push_str("· stale ");
    }
    title
}

fn draw_table(frame: &mut Frame, app: &App, area: Rect) {
    let rows = app.rows();
    let block = Block::bordered().title(table_title(app, rows.len()));
    let inner = block.inner(area);
    if rows.is_empty() {
        let text = match &app.stats {
            None if app.error.is_some() => "no data: the agent has not answered yet".to_string(),
            None => "waiting for the first sample…".to_string(),
            Some(_) if !app.filter.is_empty() => format!("no row matches \"{}\"", app.filter),
            Some(s) => format!("no requests in the last {:.0} s", s.window_s),
        };
        frame.render_widget(
            Paragraph::new(text)
                .style(DIM)
                .alignment(Alignment::Center)
                .block(block),
            area,
        );
        return;
    }
    let layout = columns_for_width(inner.width as usize, app.upstream());
    let sorted_column = app.sort.column();
    let header = TableRow::new(layout.columns.iter().map(|&c| {
        let style = if c == sorted_column { SORTED } else { HEADER };
        aligned(c.header().to_string(), c, style)
    }));
    let stale = app.error.is_some();
    let body = rows.iter().map(|row| {
        let dominant = dominant_hop(row);
        TableRow::new(layout.columns.iter().map(|&c| {
            let style = match c {
                _ if stale => DIM,
                Column::Hop(h) if Some(h) == dominant => DOMINANT,
                Column::Errors if row.errors > 0 => Style::new().fg(Color::Red),
                _ => Style::new(),
            };
            aligned(cell(row, c, layout.pair_width), c, style)
        }))
    });
    let widths: Vec<Constraint> = layout
        .columns
        .iter()
        .map(|&c| match c {
            Column::Pair => Constraint::Length(layout.pair_width as u16),
            c => Constraint::Length(c.width() as u16),
        })
        .collect();
    let table = Table::new(body, widths)
        .header(header)
        .block(block)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected(app.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

fn aligned(text: String, column: Column, style: Style) -> Cell<'static> {
    let line = Line::styled(text, style);
    Cell::from(if column.is_numeric() {
        line.alignment(Alignment::Right)
    } else {
        line
    })
}

fn draw_detail(frame: &mut Frame, app: &App, key: &RowKey, area: Rect) {
    let title = format!(" {} -> {} ", key.0, key.1);
    let Some(row) = app.detail_row() else {
        let text = format!(
            "no requests from {} to {} in the window; Esc goes back",
            key.0, key.1
        );
        frame.render_widget(
            Paragraph::new(text)
                .style(DIM)
                .alignment(Alignment::Center)
                .block(Block::bordered().title(title)),
            area,
        );
        return;
    };
    // Total, then every hop observed in the window.
    let hops: Vec<usize> = (0..HOPS.len())
        .filter(|&h| h != UPSTREAM || hop_p50(row, h).is_some())
        .collect();
    // Borders, the summary, TCP health, the column header, the total, the hops.
    let tcp_lines = usize::from(!row.tcp.is_empty());
    let chart_height = (2 + 2 + tcp_lines + 1 + hops.len()) as u16;
    let [chart, slowest] =
        Layout::vertical([Constraint::Length(chart_height), Constraint::Min(3)]).areas(area);
    draw_hops(frame, app, row, &hops, title, chart);
    draw_slowest(frame, row, &hops, slowest);
}

fn draw_hops(frame: &mut Frame, app: &App, row: &Row, hops: &[usize], title: String, area: Rect) {
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let summary = format!(
        "{} req/s  err {}%  retries {}  total p50 {} p90 {} p99 {} max {} ms  sidecars {}",
        fmt_rate(row.rate),
        fmt_share(row.error_rate, 1),
        row.retries,
        fmt_ms(row.total.p50_ms),
        fmt_ms(row.total.p90_ms),
        fmt_ms(row.total.p99_ms),
        fmt_ms(row.total.max_ms),
        row.sidecar_share
            .map(|s| format!("{}%", fmt_share(s, 0)))
            .unwrap_or_else(|| "-".into()),
    );
    let label_width = 30u16;
    let mut intro = vec![Line::raw(summary)];
    if let Some(tcp) = tcp_health(row) {
        intro.push(Line::styled(tcp, DIM));
    }
    intro.push(Line::styled(
        format!(
            "{:<19}{:>9}  p50 at each sample, every {}, newest on the right",
            "",
            "p50 now",
            fmt_interval(app.interval)
        ),
        DIM,
    ));
    let intro_height = intro.len() as u16;
    frame.render_widget(
        Paragraph::new(intro),
        Rect {
            height: inner.height.min(intro_height),
            ..inner
        },
    );
    let history = app
        .history
        .row(&(row.source_workload.clone(), row.destination_service.clone()));
    let dominant = dominant_hop(row);
    let width = inner.width.saturating_sub(label_width) as usize;
    // One line per series (the total, then each hop): its label and
    // current median, then its sparkline.
    let series = std::iter::once(None).chain(hops.iter().map(|&h| Some(h)));
    for (i, hop) in series.enumerate() {
        let y = inner.y + intro_height + i as u16;
        if y >= inner.y + inner.height {
            break;
        }
        let (name, now, style) = match hop {
            None => ("total", Some(row.total.p50_ms), HEADER),
            Some(h) if Some(h) == dominant => (HOPS[h].0, hop_p50(row, h), DOMINANT),
            Some(h) => (HOPS[h].0, hop_p50(row, h), Style::new()),
        };
        let points: Vec<Option<u64>> = history
            .map(|ring| {
                let skip = ring.len().saturating_sub(width);
                ring.iter()
                    .skip(skip)
                    .map(|p| match hop {
                        None => p.total_p50,
                        Some(h) => p.hops_p50[h],
                    })
                    // Microseconds: sparklines take integers.
                    .map(|v| v.map(|ms| (ms * 1000.0).round() as u64))
                    .collect()
            })
            .unwrap_or_default();
        let line_area = Rect::new(inner.x, y, inner.width, 1);
        let [label, spark] =
            Layout::horizontal([Constraint::Length(label_width), Constraint::Min(0)])
                .areas(line_area);
        let now = now.map(fmt_ms).unwrap_or_else(|| "-".into());
        frame.render_widget(
            Paragraph::new(Line::styled(format!("{name:<19}{now:>6} ms  "), style)),
            label,
        );
        let spark_style = if style == DOMINANT {
            DOMINANT
        } else {
            Style::new().fg(Color::Green)
        };
        frame.render_widget(Sparkline::default().data(points).style(spark_style), spark);
    }
}

/// One line of TCP health for the legs towards the row's destination, in
/// data-path order: smoothed RTT p50 (the kernel's minimum in brackets),
/// retransmitted segments and resets over the window.
fn tcp_health(row: &Row) -> Option<String> {
    const ORDER: [&str; 7] = [
        "redirect",
        "mesh",
        "delivery",
        "inbound_redirect",
        "passthrough",
        "bypass",
        "blackhole",
    ];
    if row.tcp.is_empty() {
        return None;
    }
    let legs: Vec<String> = ORDER
        .iter()
        .filter_map(|leg| Some((leg, row.tcp.get(*leg)?)))
        .map(|(leg, h)| {
            let rtt = if h.rtt_samples == 0 {
                "-".to_string()
            } else {
                format!("{} ({})", fmt_ms(h.rtt_p50_ms), fmt_ms(h.min_rtt_p50_ms))
            };
            format!("{leg} rtt {rtt} ms retx {} rst {}", h.retransmits, h.resets)
        })
        .collect();
    Some(format!(
        "tcp to {}: {}",
        row.destination_service,
        legs.join("  ")
    ))
}

fn draw_slowest(frame: &mut Frame, row: &Row, hops: &[usize], area: Rect) {
    let block = Block::bordered().title(format!(
        " slowest requests in the window: {} (ms) ",
        row.slowest.len()
    ));
    if row.slowest.is_empty() {
        frame.render_widget(
            Paragraph::new("none with a complete span")
                .style(DIM)
                .block(block),
            area,
        );
        return;
    }
    let inner_width = block.inner(area).width as usize;
    // Fixed columns: status, retries, total, the hops; the id takes what is
    // left up to its full length, the path anything beyond.
    let fixed = 7 + 1 + 4 + 1 + 6 + 1 + hops.len() * 7;
    let id_width = inner_width.saturating_sub(fixed + 1).clamp(8, 36);
    let mut header = vec![
        Cell::from(Line::styled("request id", HEADER)),
        Cell::from(Line::styled("status", HEADER).alignment(Alignment::Right)),
        Cell::from(Line::styled("retr", HEADER).alignment(Alignment::Right)),
        Cell::from(Line::styled("total", HEADER).alignment(Alignment::Right)),
    ];
    header.extend(
        hops.iter()
            .map(|&h| Cell::from(Line::styled(HOPS[h].1, HEADER).alignment(Alignment::Right))),
    );
    header.push(Cell::from(Line::styled("request", HEADER)));
    let rows = row.slowest.iter().map(|s| slow_row(s, hops, id_width));
    let mut widths = vec![
        Constraint::Length(id_width as u16),
        Constraint::Length(7),
        Constraint::Length(4),
        Constraint::Length(6),
    ];
    widths.extend(hops.iter().map(|_| Constraint::Length(6)));
    widths.push(Constraint::Min(0));
    let table = Table::new(rows, widths)
        .header(TableRow::new(header))
        .block(block)
        .column_spacing(1);
    frame.render_widget(table, area);
}

fn slow_row(s: &SlowRequest, hops: &[usize], id_width: usize) -> TableRow<'static> {
    let right = |text: String, style: Style| {
        Cell::from(Line::styled(text, style).alignment(Alignment::Right))
    };
    // The request's own dominant hop.
    let dominant = hops
        .iter()
        .filter_map(|&h| Some((h, *s.hops_ms.get(HOPS[h].0)?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(h, _)| h);
    let status_style = if s.error || s.status >= 500 || s.status == 0 {
        ALERT
    } else {
        Style::new()
    };
    // A gRPC call's own status next to its HTTP one, which is 200 whatever
    // the call's outcome.
    let status = match s.grpc_status {
        Some(code) => format!("grpc {code}"),
        None => s.status.to_string(),
    };
    let mut cells = vec![
        Cell::from(truncate(s.request_id.as_deref().unwrap_or("-"), id_width)),
        right(status, status_style),
        right(s.retries.to_string(), Style::new()),
        right(fmt_ms(s.total_ms), HEADER),
    ];
    cells.extend(hops.iter().map(|&h| {
        let style = if Some(h) == dominant {
            DOMINANT
        } else {
            Style::new()
        };
        right(
            s.hops_ms
                .get(HOPS[h].0)
                .map(|&v| fmt_ms(v))
                .unwrap_or_else(|| "-".into()),
            style,
        )
    }));
    cells.push(Cell::from(format!("{} {}", s.method, s.path)));
    TableRow::new(cells)
}

fn draw_help(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let width = area.width.saturating_sub(4).min(76);
    let height = area.height.saturating_sub(2).min(26);
    let popup = Rect::new(
        area.x + (area.width - width) / 2,
        area.y + (area.height - height) / 2,
        width,
        height,
    );
    let mut lines = vec![
        Line::styled("keys", HEADER),
        Line::raw("  q / Ctrl-C quit       / filter (Enter keeps, Esc clears)"),
        Line::raw("  s / S  sort column / reverse    ↑↓ j k  select a row"),
        Line::raw("  Enter  detail of the row        Esc  back"),
        Line::raw("  p      pause / resume           ?    this help"),
        Line::styled(
            "columns (ms, medians unless named; window in header)",
            HEADER,
        ),
        Line::raw("  req/s err% (5xx or no response)  p50 p90 p99 of the whole request"),
        Line::raw("  app>sc  client app to its sidecar and back"),
        Line::raw("  out-sc  inside the outbound sidecar   net  sidecar to sidecar"),
        Line::raw("  in-sc   inside the inbound sidecar    sc>app  sidecar to the app"),
        Line::raw("  app     the server app    upstrm  past the sidecar (other node)"),
        Line::raw("  side%   share of the total spent in and around the sidecars"),
        Line::styled("  the largest hop of each row is highlighted", DOMINANT),
    ];
    if let Some(s) = &app.stats {
        lines.push(Line::styled(
            "fallbacks (optional probes not attached)",
            HEADER,
        ));
        if s.agent.fallbacks.is_empty() {
            lines.push(Line::raw("  none"));
        }
        for f in &s.agent.fallbacks {
            lines.push(Line::raw(format!("  {f}")));
        }
    }
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(" help: any key closes ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::{
        agent::http::AgentInfo,
        spans::live::{LegHealth, Percentiles},
        top::{source::Sample, stats::AgentStats},
    };

    fn p(v: f64) -> Percentiles {
        Percentiles {
            count: 10,
            p50_ms: v,
            p90_ms: v,
            p99_ms: v,
            max_ms: v,
        }
    }

    fn app() -> App {
        let hops = [
            ("client_to_outbound", 0.1),
            ("outbound_proxy", 4.2),
            ("network", 0.2),
            ("inbound_proxy", 6.1),
            ("inbound_to_app", 0.1),
            ("app", 20.4),
        ];
        let row = Row {
            source_workload: "loadgen".into(),
            destination_service: "reviews".into(),
            requests: 600,
            rate: 50.0,
            errors: 0,
            error_rate: 0.0,
            retries: 0,
            total: p(31.1),
            hops: hops
                .iter()
                .map(|(h, v)| (h.to_string(), p(*v)))
                .collect::<BTreeMap<_, _>>(),
            sidecar_share: Some(0.33),
            slowest: vec![
                SlowRequest {
                    request_id: Some("0b7e1c9a-5a57-4c2e-9a53-2f0f7c1d0e11".into()),
                    method: "GET".into(),
                    path: "/reviews/{id}".into(),
                    status: 200,
                    grpc_status: None,
                    error: false,
                    total_ms: 48.0,
                    hops_ms: hops.iter().map(|(h, v)| (h.to_string(), *v)).collect(),
                    retries: 1,
                },
                SlowRequest {
                    request_id: Some("7c0de9f1-0000-4c2e-9a53-2f0f7c1d0e12".into()),
                    method: "POST".into(),
                    path: "/lab.Reviews/Get".into(),
                    status: 200,
                    grpc_status: Some(14),
                    error: true,
                    total_ms: 45.0,
                    hops_ms: hops.iter().map(|(h, v)| (h.to_string(), *v)).collect(),
                    retries: 0,
                },
            ],
            tcp: BTreeMap::from([(
                "mesh".to_string(),
                LegHealth {
                    rtt_samples: 40,
                    rtt_p50_ms: 5.8,
                    rtt_p99_ms: 9.1,
                    min_rtt_p50_ms: 5.3,
                    retransmits: 7,
                    resets: 1,
                },
            )]),
        };
        let mut app = App::new("http://127.0.0.1:9464".into(), Duration::from_secs(1));
        for seq in 1..5 {
            app.on_sample(&Sample {
                seq,
                at: Instant::now(),
                result: Ok(AgentStats {
                    agent: AgentInfo {
                        version: "0.1.0".into(),
                        fallbacks: vec!["tcp_retransmit: retransmits not counted".into()],
                        ..AgentInfo::default()
                    },
                    window_s: 60.0,
                    rows: vec![row.clone()],
                }),
            });
        }
        app
    }

    fn render(app: &App, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, app)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn table_at_80_by_24_keeps_the_hops() {
        let text = render(&app(), 80, 24);
        assert!(text.contains("loadgen -> reviews"), "{text}");
        assert!(text.contains("out-sc") && text.contains("in-sc"), "{text}");
        assert!(text.contains("20.4") && text.contains("4.20"), "{text}");
        assert!(text.contains("sort: req/s ▼"), "{text}");
        assert!(text.contains("fallbacks: tcp_retransmit"), "{text}");
        assert!(text.contains("q quit"), "{text}");
    }

    #[test]
    fn table_at_120_has_every_column() {
        let text = render(&app(), 120, 30);
        for h in ["p90", "p99", "app>sc", "sc>app", "side%", "33"] {
            assert!(text.contains(h), "{h} missing:\n{text}");
        }
    }

    #[test]
    fn detail_shows_sparklines_and_the_slowest() {
        let mut app = app();
        app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        for (w, h) in [(80, 24), (120, 30)] {
            let text = render(&app, w, h);
            assert!(text.contains("slowest"), "{text}");
            assert!(text.contains("0b7e1c9a"), "{text}");
            assert!(text.contains("outbound_proxy"), "{text}");
            // A gRPC call shows its own status, not the HTTP 200 it rode.
            assert!(text.contains("grpc 14"), "{text}");
            assert!(
                text.contains("mesh rtt 5.80 (5.30) ms retx 7 rst 1"),
                "{text}"
            );
        }
        assert!(render(&app, 120, 30).contains("0b7e1c9a-5a57-4c2e-9a53-2f0f7c1d0e11"));
    }

    #[test]
    fn unreachable_and_help_and_tiny_terminals() {
        let mut app = app();
        app.on_sample(&Sample {
            seq: 99,
            at: Instant::now(),
            result: Err("connecting to 127.0.0.1:9464: Connection refused".into()),
        });
        let text = render(&app, 100, 24);
        assert!(text.contains("agent unreachable: connecting"), "{text}");
        assert!(text.contains("stale"), "{text}");
        app.on_key(KeyEvent::new(KeyCode::Char('?'), KeyModifiers::NONE));
        let text = render(&app, 80, 24);
        assert!(text.contains("help"), "{text}");
        // Nothing panics however small the terminal.
        for (w, h) in [(1, 1), (10, 3), (20, 5), (40, 10)] {
            render(&app, w, h);
            app.help = false;
            app.mode = Mode::Detail(("loadgen".into(), "reviews".into()));
            render(&app, w, h);
            app.help = true;
        }
    }
}
