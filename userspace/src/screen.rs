//! The full-screen live view of `top` and `calls` when their output is a
//! terminal (ratatui over crossterm): the terminal's alternate screen,
//! redrawn in place, a header, a table and a line of keys. When the view
//! ends (`q`, Ctrl-C, the end of the run, an error or a panic) the terminal
//! is given back as it was: main screen, cooked mode, cursor shown.
//!
//! The jobs own the content: they build a [`View`] and react to
//! [`Input`]s; this module only draws and reads keys.

use std::{
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context;
use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Cell, Paragraph, Row, Table},
};

/// Whether a live command shows the full-screen view: its output is a
/// terminal and no JSON was asked for.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stdout().is_terminal()
}

/// What the user did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `q`, Esc or Ctrl-C.
    Quit,
    /// Another key, lower case.
    Key(char),
    /// The terminal changed size: draw again.
    Resize,
}

/// The keys pressed, in order, as they come.
pub type Inputs = tokio::sync::mpsc::UnboundedReceiver<Input>;

/// One column of a [`View`]'s table.
#[derive(Debug, Clone)]
pub struct Column {
    /// Its title.
    pub title: String,
    /// Numbers are right-aligned.
    pub right: bool,
}

impl Column {
    /// A right-aligned column of numbers.
    pub fn number(title: &str) -> Self {
        Self {
            title: title.to_owned(),
            right: true,
        }
    }

    /// A left-aligned column of text.
    pub fn text(title: &str) -> Self {
        Self {
            title: title.to_owned(),
            right: false,
        }
    }
}

/// What one frame shows.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Lines above the table (the first one in bold).
    pub header: Vec<String>,
    /// The table's columns; the last one takes the width left.
    pub columns: Vec<Column>,
    /// The table's rows, one cell per column.
    pub rows: Vec<Vec<String>>,
    /// The line of keys at the bottom.
    pub keys: String,
}

/// The terminal, taken over for the view.
pub struct Screen {
    terminal: DefaultTerminal,
    /// Tells the key reader to end.
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Screen {
    /// Takes over the terminal (alternate screen, raw mode) and starts
    /// reading keys.
    pub fn open() -> anyhow::Result<(Self, Inputs)> {
        let terminal = ratatui::try_init()
            .context("cannot take over the terminal for the live view (--json, or a redirected output, gives plain output)")?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_reader = Arc::clone(&stop);
        let mut screen = Self {
            terminal,
            stop,
            reader: None,
        };
        // On an error the screen is dropped, which gives the terminal back.
        screen.reader = Some(
            std::thread::Builder::new()
                .name("pyprobe-keys".to_owned())
                .spawn(move || read_keys(&tx, &stop_reader))
                .context("cannot start reading keys")?,
        );
        Ok((screen, rx))
    }

    /// Rows of the table that fit on the screen under `header_lines`.
    pub fn table_rows(&self, header_lines: usize) -> usize {
        let height = self.terminal.size().map(|s| s.height).unwrap_or(24) as usize;
        // Header, a blank line, the column titles, the keys line.
        height.saturating_sub(header_lines + 3)
    }

    /// Draws `view` in place of the previous frame.
    pub fn draw(&mut self, view: &View) -> anyhow::Result<()> {
        let widths = column_widths(view);
        self.terminal
            .draw(|frame| {
                let [head, _, body, keys] = Layout::vertical([
                    Constraint::Length(view.header.len() as u16),
                    Constraint::Length(1),
                    Constraint::Min(1),
                    Constraint::Length(1),
                ])
                .areas(frame.area());
                let header: Vec<Line> = view
                    .header
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        if i == 0 {
                            Line::styled(l.as_str(), Style::new().add_modifier(Modifier::BOLD))
                        } else {
                            Line::raw(l.as_str())
                        }
                    })
                    .collect();
                frame.render_widget(Paragraph::new(header), head);
                let cell = |text: &str, right: bool| {
                    let line = Line::raw(text.to_owned());
                    Cell::new(if right { line.right_aligned() } else { line })
                };
                let titles = Row::new(view.columns.iter().map(|c| cell(&c.title, c.right)))
                    .style(Style::new().add_modifier(Modifier::REVERSED));
                let rows = view.rows.iter().map(|r| {
                    Row::new(
                        r.iter()
                            .zip(&view.columns)
                            .map(|(text, c)| cell(text, c.right)),
                    )
                });
                frame.render_widget(Table::new(rows, widths.clone()).header(titles), body);
                frame.render_widget(
                    Paragraph::new(Line::raw(view.keys.as_str()))
                        .style(Style::new().add_modifier(Modifier::REVERSED)),
                    keys,
                );
            })
            .context("cannot draw the live view")?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let _ = self.terminal.show_cursor();
        ratatui::restore();
    }
}

/// Each column as wide as its widest cell; the last takes what is left.
fn column_widths(view: &View) -> Vec<Constraint> {
    let n = view.columns.len();
    view.columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i + 1 == n {
                return Constraint::Fill(1);
            }
            let widest = view
                .rows
                .iter()
                .filter_map(|r| r.get(i))
                .map(|s| s.chars().count())
                .chain([c.title.chars().count()])
                .max()
                .unwrap_or(0);
            Constraint::Length(widest as u16)
        })
        .collect()
}

/// How often the key reader looks whether it should end.
const KEY_POLL: Duration = Duration::from_millis(50);

/// Reads keys until told to stop or the view is gone.
fn read_keys(tx: &tokio::sync::mpsc::UnboundedSender<Input>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let input = match event::poll(KEY_POLL) {
            Ok(false) => continue,
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => match k.code {
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        Input::Quit
                    }
                    KeyCode::Char('q') | KeyCode::Esc => Input::Quit,
                    KeyCode::Char(c) => Input::Key(c.to_ascii_lowercase()),
                    _ => continue,
                },
                Ok(Event::Resize(..)) => Input::Resize,
                Ok(_) => continue,
                Err(_) => return,
            },
            Err(_) => return,
        };
        if tx.send(input).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell_and_the_last_fills() {
        let view = View {
            columns: vec![
                Column::number("%Own"),
                Column::number("n"),
                Column::text("Function"),
            ],
            rows: vec![vec!["100.0".into(), "7".into(), "main (a.py:1)".into()]],
            ..View::default()
        };
        assert_eq!(
            column_widths(&view),
            vec![
                Constraint::Length(5),
                Constraint::Length(1),
                Constraint::Fill(1)
            ]
        );
    }
}
