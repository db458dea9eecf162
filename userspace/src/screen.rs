//! The full-screen live view of `top` and `calls` when their output is a
//! terminal (ratatui over crossterm): the terminal's alternate screen,
//! redrawn in place, a header, a table and a line of keys. When the view
//! ends (`q`, Ctrl-C, the end of the run, an error or a panic) the terminal
//! is given back as it was: main screen, cooked mode, cursor shown.
//!
//! While the view is up, what pyprobe writes to stderr (a process picked
//! up, a warning) would land on top of it: stderr goes into a pipe
//! instead, its newest line is shown above the keys, and every line is
//! written to the real stderr once the terminal is given back.
//!
//! The jobs own the content: they build a [`View`] and react to
//! [`Input`]s; this module only draws and reads keys.

use std::{
    collections::VecDeque,
    io::{BufRead as _, IsTerminal, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
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
    /// stderr, held while the view is up.
    messages: Option<Messages>,
}

/// Most stderr lines kept while the view is up (older ones are counted).
const MAX_MESSAGES: usize = 1000;

/// stderr sent into a pipe while the view is up: the lines written, for
/// the view's message line and for the real stderr afterwards.
struct Messages {
    /// The real stderr, put back by [`Self::restore`].
    saved: OwnedFd,
    /// The lines read from the pipe, and how many were dropped.
    lines: Arc<Mutex<(VecDeque<String>, usize)>>,
    reader: Option<JoinHandle<()>>,
}

impl Messages {
    /// Points stderr (fd 2) at a pipe read by a thread.
    fn capture() -> std::io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both are new descriptors owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: duplicating fd 2, which the process has open.
        let saved = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
        if saved < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nothing else.
        let saved = unsafe { OwnedFd::from_raw_fd(saved) };
        let _ = std::io::stderr().flush();
        // SAFETY: both descriptors are open; fd 2 now names the pipe.
        if unsafe { libc::dup2(write.as_raw_fd(), 2) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        drop(write);
        let lines = Arc::new(Mutex::new((VecDeque::new(), 0)));
        let keep = Arc::clone(&lines);
        let reader = std::thread::Builder::new()
            .name("pyprobe-stderr".to_owned())
            .spawn(move || {
                let pipe = std::io::BufReader::new(std::fs::File::from(read));
                for line in pipe.lines().map_while(Result::ok) {
                    let mut kept = keep.lock().unwrap_or_else(|e| e.into_inner());
                    if kept.0.len() == MAX_MESSAGES {
                        kept.0.pop_front();
                        kept.1 += 1;
                    }
                    kept.0.push_back(line);
                }
            })?;
        Ok(Self {
            saved,
            lines,
            reader: Some(reader),
        })
    }

    /// The newest line, if any.
    fn newest(&self) -> Option<String> {
        let kept = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        kept.0.back().cloned()
    }

    /// Puts the real stderr back and writes every line kept to it.
    fn restore(mut self) {
        let _ = std::io::stderr().flush();
        // SAFETY: both descriptors are open; closing the pipe's last write
        // end lets the reader see its end.
        unsafe { libc::dup2(self.saved.as_raw_fd(), 2) };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let kept = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut stderr = std::io::stderr().lock();
        if kept.1 > 0 {
            let _ = writeln!(stderr, "pyprobe: ({} earlier messages not kept)", kept.1);
        }
        for line in &kept.0 {
            let _ = writeln!(stderr, "{line}");
        }
    }
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
            messages: None,
        };
        // Without the pipe, messages still come, over the view.
        screen.messages = Messages::capture().ok();
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
        // Header, a blank line, the column titles, the message line, the
        // keys line.
        height.saturating_sub(header_lines + 4)
    }

    /// Draws `view` in place of the previous frame.
    pub fn draw(&mut self, view: &View) -> anyhow::Result<()> {
        let widths = column_widths(view);
        let message = self
            .messages
            .as_ref()
            .and_then(Messages::newest)
            .unwrap_or_default();
        self.terminal
            .draw(|frame| {
                let [head, _, body, said, keys] = Layout::vertical([
                    Constraint::Length(view.header.len() as u16),
                    Constraint::Length(1),
                    Constraint::Min(1),
                    Constraint::Length(1),
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
                frame.render_widget(Paragraph::new(Line::raw(message.as_str())), said);
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
        if let Some(messages) = self.messages.take() {
            messages.restore();
        }
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
