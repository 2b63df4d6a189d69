//! Server-sent events, as the streaming providers send them: an incremental parser fed with
//! the body's chunks as they arrive, and the driver that turns a provider's events into a
//! [`ChatStream`].
//!
//! The parser follows the WHATWG `text/event-stream` rules the providers rely on: lines end
//! in `\n`, `\r\n` or `\r` (a chunk may end between the `\r` and the `\n`); a line starting
//! with `:` is a comment (keep-alives); `data` lines of one event are joined with `\n`; a blank
//! line dispatches the event. Bytes are buffered until a line is complete, so a UTF-8
//! character split across chunks is decoded whole. `id` and `retry` are ignored: the router
//! never reconnects a stream (a retry is a new call).

use std::collections::VecDeque;

use futures::{Stream, StreamExt as _};

use super::{ChatStream, StreamEvent};
use crate::error::ProviderError;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event` field; `message` when the event had none.
    pub event: String,
    pub data: String,
}

/// Incremental `text/event-stream` parser.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The bytes of the line not yet ended.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` first in the next chunk ends nothing.
    skip_newline: bool,
    event: Option<String>,
    data: String,
    /// A `data` field was seen (an event may have empty data).
    has_data: bool,
}

impl SseParser {
    /// Feeds the next chunk of the body; answers the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, ProviderError> {
        let mut events = Vec::new();
        for &byte in chunk {
            if std::mem::take(&mut self.skip_newline) && byte == b'\n' {
                continue;
            }
            match byte {
                b'\n' | b'\r' => {
                    self.skip_newline = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_ended(&line)? {
                        events.push(event);
                    }
                }
                _ => self.line.push(byte),
            }
        }
        Ok(events)
    }

    /// The body ended. A last line or event without its terminating blank line is still
    /// taken: some servers close the connection right after the final `data` line, and a
    /// stream cut short is caught by the provider (no final event), not here.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, ProviderError> {
        let line = std::mem::take(&mut self.line);
        if let Some(event) = self.line_ended(&line)? {
            return Ok(Some(event));
        }
        Ok(self.dispatch())
    }

    fn line_ended(&mut self, line: &[u8]) -> Result<Option<SseEvent>, ProviderError> {
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| ProviderError::Malformed("an event stream line is not UTF-8".into()))?;
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event: event.unwrap_or_else(|| "message".into()),
            data: std::mem::take(&mut self.data),
        })
    }
}

/// A provider's reading of its event stream.
pub trait Decoder: Send + 'static {
    /// Handles one event; answers the stream events it yields. An `Err` ends the stream.
    fn event(&mut self, event: SseEvent) -> Result<Vec<StreamEvent>, ProviderError>;

    /// The body ended without a `Done` having been yielded: the final events (ending in
    /// `Done`) when the provider's stream may end this way, or why the stream is incomplete.
    fn end(&mut self) -> Result<Vec<StreamEvent>, ProviderError>;
}

struct State<S, D> {
    body: S,
    parser: SseParser,
    decoder: D,
    ready: VecDeque<StreamEvent>,
    /// What ends the stream once the events read before it are out.
    error: Option<ProviderError>,
    /// `Done` or an error was yielded, or the body and the decoder are exhausted.
    finished: bool,
}

impl<S, D: Decoder> State<S, D> {
    fn take(&mut self, events: Vec<StreamEvent>, error: Option<ProviderError>) {
        for event in events {
            if self.finished {
                break;
            }
            // Nothing after `Done` is read: the stream promises to end there.
            self.finished = matches!(event, StreamEvent::Done { .. });
            self.ready.push_back(event);
        }
        if !self.finished {
            self.error = error;
        }
    }
}

/// The [`ChatStream`] of a streaming response's body, as `decoder` reads its events. The
/// events read before a failure are yielded before it.
pub fn decode<S, B, D>(body: S, decoder: D) -> ChatStream
where
    S: Stream<Item = Result<B, ProviderError>> + Send + Unpin + 'static,
    B: AsRef<[u8]>,
    D: Decoder,
{
    let state = State {
        body,
        parser: SseParser::default(),
        decoder,
        ready: VecDeque::new(),
        error: None,
        finished: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.ready.pop_front() {
                return Some((Ok(event), state));
            }
            if let Some(error) = state.error.take() {
                state.finished = true;
                return Some((Err(error), state));
            }
            if state.finished {
                return None;
            }
            let mut events = Vec::new();
            let error = match state.body.next().await {
                Some(Ok(chunk)) => feed(
                    &mut state.parser,
                    &mut state.decoder,
                    chunk.as_ref(),
                    &mut events,
                )
                .err(),
                Some(Err(error)) => Some(error),
                // `end` yields `Done` or fails, so the loop ends once the body has.
                None => end(&mut state.parser, &mut state.decoder, &mut events).err(),
            };
            state.take(events, error);
        }
    }))
}

fn feed<D: Decoder>(
    parser: &mut SseParser,
    decoder: &mut D,
    chunk: &[u8],
    out: &mut Vec<StreamEvent>,
) -> Result<(), ProviderError> {
    for event in parser.push(chunk)? {
        out.extend(decoder.event(event)?);
    }
    Ok(())
}

fn end<D: Decoder>(
    parser: &mut SseParser,
    decoder: &mut D,
    out: &mut Vec<StreamEvent>,
) -> Result<(), ProviderError> {
    let done = |out: &[StreamEvent]| out.iter().any(|e| matches!(e, StreamEvent::Done { .. }));
    if let Some(event) = parser.finish()? {
        out.extend(decoder.event(event)?);
    }
    if !done(out) {
        out.extend(decoder.end()?);
    }
    if !done(out) {
        return Err(ProviderError::Malformed(
            "the event stream ended before the response was complete".into(),
        ));
    }
    Ok(())
}

/// Parses one event's JSON data, naming what was expected when it is not that.
pub fn json<T: serde::de::DeserializeOwned>(data: &str, what: &str) -> Result<T, ProviderError> {
    serde_json::from_str(data).map_err(|e| ProviderError::Malformed(format!("not {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: &str) -> SseEvent {
        SseEvent {
            event: name.into(),
            data: data.into(),
        }
    }

    /// Every event of `body` fed in pieces cut at each of `cuts`.
    fn parse_cut(body: &[u8], cuts: &[usize]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain([body.len()].iter()) {
            events.extend(parser.push(&body[start..cut]).unwrap());
            start = cut;
        }
        events.extend(parser.finish().unwrap());
        events
    }

    const BODY: &str = ": keep-alive\r\n\
        event: message_start\r\ndata: {\"a\":1}\r\n\r\n\
        data: first\ndata:second\n\n\
        id: 7\rretry: 10\rdata: caf\u{e9} \u{1F600}\r\r\
        event: ping\n\n\
        data\n\n\
        data: [DONE]\n\n";

    fn expected() -> Vec<SseEvent> {
        vec![
            event("message_start", "{\"a\":1}"),
            event("message", "first\nsecond"),
            event("message", "caf\u{e9} \u{1F600}"),
            event("message", ""),
            event("message", "[DONE]"),
        ]
    }

    #[test]
    fn parses_whole_body() {
        assert_eq!(parse_cut(BODY.as_bytes(), &[]), expected());
    }

    #[test]
    fn every_single_cut_gives_the_same_events() {
        // Cuts between `\r` and `\n`, inside field names, inside multi-byte characters.
        let body = BODY.as_bytes();
        for cut in 0..=body.len() {
            assert_eq!(parse_cut(body, &[cut]), expected(), "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte_gives_the_same_events() {
        let body = BODY.as_bytes();
        let cuts: Vec<usize> = (1..body.len()).collect();
        assert_eq!(parse_cut(body, &cuts), expected());
    }

    #[test]
    fn a_last_event_without_blank_line_is_taken_and_a_lone_event_name_is_not() {
        assert_eq!(parse_cut(b"data: x", &[3]), vec![event("message", "x")]);
        assert_eq!(parse_cut(b"event: ping\n\n", &[]), vec![]);
    }

    #[test]
    fn invalid_utf8_is_malformed() {
        let mut parser = SseParser::default();
        let error = parser.push(b"data: \xff\xfe\n\n").unwrap_err();
        assert!(matches!(error, ProviderError::Malformed(_)), "{error}");
    }

    /// `text:` data is text, `done` ends, `boom` fails.
    struct Lines;

    impl Decoder for Lines {
        fn event(&mut self, event: SseEvent) -> Result<Vec<StreamEvent>, ProviderError> {
            match event.data.as_str() {
                "done" => Ok(vec![StreamEvent::Done {
                    finish_reason: "stop".into(),
                    usage: crate::provider::TokenUsage::default(),
                }]),
                "boom" => Err(ProviderError::Server { status: 500 }),
                text => Ok(vec![StreamEvent::Text(text.to_owned())]),
            }
        }

        fn end(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
            Ok(Vec::new())
        }
    }

    async fn decoded(body: &'static str) -> Vec<Result<StreamEvent, ProviderError>> {
        let chunks = futures::stream::iter([Ok::<_, ProviderError>(body.as_bytes())]);
        decode(chunks, Lines).collect().await
    }

    #[tokio::test]
    async fn events_before_a_failure_come_first_and_nothing_after_done() {
        let text = |t: &str| Ok(StreamEvent::Text(t.into()));
        assert_eq!(
            decoded("data: a\n\ndata: b\n\ndata: boom\n\ndata: c\n\n").await,
            vec![
                text("a"),
                text("b"),
                Err(ProviderError::Server { status: 500 })
            ]
        );
        let events = decoded("data: a\n\ndata: done\n\ndata: boom\n\n").await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(events[1], Ok(StreamEvent::Done { .. })));
        let events = decoded("data: a\n\n").await;
        assert_eq!(events[0], text("a"));
        assert!(matches!(events[1], Err(ProviderError::Malformed(_))));
        assert_eq!(events.len(), 2);
    }
}
