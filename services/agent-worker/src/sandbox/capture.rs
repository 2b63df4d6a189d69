//! Bounded capture of one output stream, truncated to the lines a model needs: the first
//! lines, the last lines, and error-looking lines from the middle, with a marker where lines
//! were left out.
//!
//! The capture is built while the stream is read, so memory stays bounded however much a
//! command prints: the kept lines fit `max_bytes`, plus at most `max_bytes` of the line being
//! read.
//! [`truncate_output`] runs the same code over a whole text.

use std::collections::VecDeque;

/// Smallest budget the capture works with; smaller settings are raised to it.
const MIN_BUDGET: usize = 64;
/// Only the start of a long line is searched for error words.
const ERROR_SCAN_BYTES: usize = 1024;
/// Case-insensitive words that make a line from the middle worth keeping.
const ERROR_WORDS: &[&[u8]] = &[
    b"error",
    b"panic",
    b"fail",
    b"exception",
    b"traceback",
    b"fatal",
    b"assert",
    b"abort",
    b"segmentation fault",
    b"not found",
    b"no such file",
    b"denied",
];

/// One stream of a command's output, as kept for the model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Captured {
    /// What was kept, decoded as UTF-8 (invalid sequences become U+FFFD), with a
    /// `… [N lines, M bytes omitted] …` line in place of each run of lines left out. About
    /// `max_output_bytes` long, plus the markers.
    pub text: String,
    /// Whether anything was left out or cut short.
    pub truncated: bool,
    /// How many bytes the stream carried in all.
    pub total_bytes: u64,
}

/// `output` truncated to about `max_bytes`, keeping the head, the tail and error lines from
/// the middle (see [`Captured`]). Output of at most `max_bytes` is kept as it is.
pub fn truncate_output(output: &[u8], max_bytes: usize) -> Captured {
    let mut capture = OutputCapture::new(max_bytes);
    capture.push(output);
    capture.finish()
}

/// Whether a line looks like it reports a failure: it holds one of the error words, or starts
/// like pytest's failure lines (`E   …`).
pub fn is_error_line(line: &[u8]) -> bool {
    if line.starts_with(b"E   ") {
        return true;
    }
    let scanned = line[..line.len().min(ERROR_SCAN_BYTES)].to_ascii_lowercase();
    ERROR_WORDS
        .iter()
        .any(|word| scanned.windows(word.len()).any(|window| window == *word))
}

/// A line of the stream and where it was.
#[derive(Debug)]
struct Line {
    /// 1-based.
    number: u64,
    /// Byte offset of its start in the stream.
    offset: u64,
    /// Its length in the stream, newline included.
    len: u64,
    /// Its bytes without the newline, possibly only their start.
    kept: Vec<u8>,
    newline: bool,
}

impl Line {
    /// Bytes it takes of the budget.
    fn cost(&self) -> usize {
        self.kept.len() + usize::from(self.newline)
    }

    fn is_cut(&self) -> bool {
        (self.kept.len() + usize::from(self.newline)) as u64 != self.len
    }
}

/// The capture of one stream while it is read. Invariant: head + errors + tail fit the budget,
/// except that the newest line is always kept (it is cut to fit when rendered).
#[derive(Debug)]
pub(crate) struct OutputCapture {
    budget: usize,
    head_cap: usize,
    error_cap: usize,
    head: Vec<Line>,
    head_bytes: usize,
    /// Lines go to the head until one does not fit; the head is a prefix of the stream.
    head_open: bool,
    errors: Vec<Line>,
    error_bytes: usize,
    tail: VecDeque<Line>,
    tail_bytes: usize,
    /// The line being read; at most `budget` bytes of it are kept.
    partial: Vec<u8>,
    partial_len: u64,
    next_number: u64,
    line_offset: u64,
    total_bytes: u64,
}

impl OutputCapture {
    pub(crate) fn new(max_bytes: usize) -> Self {
        let budget = max_bytes.max(MIN_BUDGET);
        Self {
            budget,
            // A quarter each for the head and the error lines; the rest, at least half, for
            // the tail, where test runners and compilers print their verdict.
            head_cap: budget / 4,
            error_cap: budget / 4,
            head: Vec::new(),
            head_bytes: 0,
            head_open: true,
            errors: Vec::new(),
            error_bytes: 0,
            tail: VecDeque::new(),
            tail_bytes: 0,
            partial: Vec::new(),
            partial_len: 0,
            next_number: 1,
            line_offset: 0,
            total_bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, mut chunk: &[u8]) {
        self.total_bytes += chunk.len() as u64;
        while !chunk.is_empty() {
            let (segment, newline) = match chunk.iter().position(|&byte| byte == b'\n') {
                Some(end) => (&chunk[..end], true),
                None => (chunk, false),
            };
            let room = self.budget.saturating_sub(self.partial.len());
            self.partial
                .extend_from_slice(&segment[..segment.len().min(room)]);
            self.partial_len += segment.len() as u64;
            chunk = &chunk[segment.len() + usize::from(newline)..];
            if newline {
                self.end_line(true);
            }
        }
    }

    fn end_line(&mut self, newline: bool) {
        let line = Line {
            number: self.next_number,
            offset: self.line_offset,
            len: self.partial_len + u64::from(newline),
            kept: std::mem::take(&mut self.partial),
            newline,
        };
        self.next_number += 1;
        self.line_offset += line.len;
        self.partial_len = 0;
        if self.head_open && self.head_bytes + line.cost() <= self.head_cap {
            self.head_bytes += line.cost();
            self.head.push(line);
            return;
        }
        self.head_open = false;
        self.tail_bytes += line.cost();
        self.tail.push_back(line);
        // The oldest tail lines move to the middle: kept if they look like errors and there
        // is room for them, left out otherwise.
        while self.head_bytes + self.error_bytes + self.tail_bytes > self.budget
            && self.tail.len() > 1
        {
            let Some(line) = self.tail.pop_front() else {
                break;
            };
            self.tail_bytes -= line.cost();
            if self.error_bytes + line.cost() <= self.error_cap && is_error_line(&line.kept) {
                self.error_bytes += line.cost();
                self.errors.push(line);
            }
        }
    }

    pub(crate) fn finish(mut self) -> Captured {
        if !self.partial.is_empty() || self.partial_len > 0 {
            self.end_line(false);
        }
        // Only the newest line can be over the budget: cut it to what is left.
        let over =
            (self.head_bytes + self.error_bytes + self.tail_bytes).saturating_sub(self.budget);
        if over > 0
            && let Some(last) = self.tail.back_mut()
        {
            let keep = last.kept.len().saturating_sub(over);
            last.kept
                .truncate(super::workspace::complete_utf8_len(&last.kept[..keep]));
        }

        let mut text = String::new();
        let mut truncated = false;
        let mut next_number = 1;
        let mut next_offset = 0;
        for line in self.head.iter().chain(&self.errors).chain(&self.tail) {
            if line.number > next_number {
                truncated = true;
                text.push_str(&format!(
                    "… [{} lines, {} bytes omitted] …\n",
                    line.number - next_number,
                    line.offset - next_offset
                ));
            }
            // A cut may have split a character; a whole line is decoded as it is.
            let kept = if line.is_cut() {
                &line.kept[..super::workspace::complete_utf8_len(&line.kept)]
            } else {
                &line.kept[..]
            };
            text.push_str(&String::from_utf8_lossy(kept));
            if line.is_cut() {
                truncated = true;
                let cut = line.len - kept.len() as u64 - u64::from(line.newline);
                text.push_str(&format!(" … [{cut} more bytes of this line omitted]"));
            }
            if line.newline {
                text.push('\n');
            }
            next_number = line.number + 1;
            next_offset = line.offset + line.len;
        }
        Captured {
            text,
            truncated,
            total_bytes: self.total_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn numbered(lines: std::ops::RangeInclusive<u32>) -> String {
        lines.map(|n| format!("line {n}\n")).collect()
    }

    #[test]
    fn output_within_the_budget_is_kept_as_it_is() {
        for text in [
            "",
            "one line",
            "a\nb\n",
            "\n\n\n",
            "no newline at the end\nx",
        ] {
            let captured = truncate_output(text.as_bytes(), 1024);
            assert_eq!(captured.text, text);
            assert!(!captured.truncated);
            assert_eq!(captured.total_bytes, text.len() as u64);
        }
        let text = "x".repeat(1000);
        assert_eq!(truncate_output(text.as_bytes(), 1000).text, text);
    }

    #[test]
    fn long_output_keeps_head_tail_and_error_lines_from_the_middle() {
        let mut text = numbered(1..=500);
        text.push_str("error[E0308]: mismatched types\n");
        text.push_str(&numbered(501..=1000));
        text.push_str("thread 'main' panicked at src/lib.rs:3:5\n");
        text.push_str("E       assert 1 == 2\n");
        text.push_str(&numbered(1001..=2000));
        let captured = truncate_output(text.as_bytes(), 1024);
        assert!(captured.truncated);
        assert_eq!(captured.total_bytes, text.len() as u64);
        let kept = &captured.text;
        assert!(kept.starts_with("line 1\nline 2\n"), "{kept}");
        assert!(kept.ends_with("line 1999\nline 2000\n"), "{kept}");
        for line in [
            "error[E0308]: mismatched types",
            "thread 'main' panicked at src/lib.rs:3:5",
            "E       assert 1 == 2",
        ] {
            assert!(kept.contains(line), "{line} missing from {kept}");
        }
        assert!(!kept.contains("line 700\n"), "{kept}");
        let markers = kept.matches(" omitted] …").count();
        assert_eq!(markers, 3, "{kept}");
        assert!(kept.len() < 1024 + markers * 40, "{} bytes", kept.len());
    }

    #[test]
    fn markers_count_what_was_left_out() {
        // 100 lines of 10 bytes, budget 256: the head takes 6 lines (60 of its 64 bytes), the
        // tail the last 19 (190 bytes, what is left of the 256).
        let text: String = (0..100).map(|n| format!("{n:09}\n")).collect();
        let captured = truncate_output(text.as_bytes(), 256);
        let lines: Vec<&str> = captured.text.lines().collect();
        assert_eq!(
            lines[..6],
            [
                "000000000",
                "000000001",
                "000000002",
                "000000003",
                "000000004",
                "000000005"
            ]
        );
        assert_eq!(lines[6], "… [75 lines, 750 bytes omitted] …");
        assert_eq!(lines[7], "000000081");
        assert_eq!(lines.last(), Some(&"000000099"));
        assert_eq!(lines.len(), 6 + 1 + 19);
    }

    #[test]
    fn a_huge_line_is_cut_and_says_so() {
        let mut text = "start\n".to_owned();
        text.push_str(&"é".repeat(10_000));
        let captured = truncate_output(text.as_bytes(), 512);
        assert!(captured.truncated);
        assert!(captured.text.starts_with("start\n"), "{}", captured.text);
        assert!(captured.text.contains("more bytes of this line omitted]"));
        assert!(!captured.text.contains('\u{FFFD}'), "a character was split");
        assert!(captured.text.len() < 600, "{} bytes", captured.text.len());
    }

    #[test]
    fn error_lines_take_at_most_a_quarter_of_the_budget() {
        let mut text = numbered(1..=50);
        for n in 0..1000 {
            text.push_str(&format!("error: number {n}\n"));
        }
        text.push_str(&numbered(51..=100));
        let captured = truncate_output(text.as_bytes(), 2048);
        assert!(captured.text.contains("error: number 0\n"));
        assert!(captured.text.ends_with("line 100\n"));
        assert!(
            captured.text.len() < 2048 + 200,
            "{} bytes",
            captured.text.len()
        );
    }

    #[test]
    fn error_words_are_found_in_any_case() {
        for line in [
            "ERROR: x",
            "Traceback (most recent call last):",
            "test foo ... FAILED",
            "sh: 1: nope: not found",
            "E   KeyError",
        ] {
            assert!(is_error_line(line.as_bytes()), "{line}");
        }
        for line in ["ok", "compiling foo v0.1.0", "test result: ok. 3 passed"] {
            assert!(!is_error_line(line.as_bytes()), "{line}");
        }
    }

    proptest! {
        #[test]
        fn chunks_do_not_change_the_result(
            text in "([a-z ]{0,30}(error)?\n){0,200}[a-z]{0,40}",
            max in 64usize..600,
            chunk in 1usize..50,
        ) {
            let whole = truncate_output(text.as_bytes(), max);
            let mut capture = OutputCapture::new(max);
            for piece in text.as_bytes().chunks(chunk) {
                capture.push(piece);
            }
            prop_assert_eq!(capture.finish(), whole.clone());
            prop_assert_eq!(whole.truncated, text.len() > max);
            if !whole.truncated {
                prop_assert_eq!(&whole.text, &text);
            }
            let markers = whole.text.matches("omitted]").count();
            prop_assert!(whole.text.len() <= max + markers * 60, "{} > {}", whole.text.len(), max);
        }
    }
}
