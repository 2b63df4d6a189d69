//! Canned replies for tests and demos, chosen by rules in the deployment's config. Used only
//! where a deployment declares `provider = "scripted"`.
//!
//! Streaming yields the reply in word-sized pieces (each word with the whitespace after it,
//! so the pieces join to exactly the reply), the first after the rule's `delay` and each next
//! after its `piece_delay`, then the rule's tool calls whole, then `Done`.

use std::time::Duration;

use async_trait::async_trait;

use futures::StreamExt as _;

use super::{ChatRequest, ChatResponse, ChatStream, Provider, StreamEvent, TokenUsage, ToolCall};
use crate::config::ScriptRule;
use crate::error::ProviderError;

#[derive(Debug)]
pub struct Scripted {
    rules: Vec<ScriptRule>,
}

impl Scripted {
    pub fn new(rules: Vec<ScriptRule>) -> Self {
        Self { rules }
    }

    /// The first rule whose `contains` occurs in the last user or tool message (or that has none).
    fn rule(&self, request: &ChatRequest) -> Result<&ScriptRule, ProviderError> {
        let last = request.last_input();
        self.rules
            .iter()
            .find(|rule| {
                rule.contains
                    .as_deref()
                    .is_none_or(|text| last.contains(text))
            })
            .ok_or(ProviderError::NoScriptRule)
    }
}

/// The answer of `rule`, once its delay has passed. Usage is an estimate (see
/// [`TokenUsage::estimate`]) of the reply and the tool arguments.
fn answer(rule: &ScriptRule, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
    if let Some(class) = rule.fail {
        return Err(ProviderError::Scripted(class));
    }
    let tool_calls: Vec<ToolCall> = rule
        .tool_calls
        .iter()
        .enumerate()
        .map(|(index, call)| ToolCall {
            id: format!("call_{index}"),
            name: call.name.clone(),
            arguments: call.arguments.clone(),
        })
        .collect();
    let mut written = rule.reply.clone();
    for call in &tool_calls {
        written.push(' ');
        written.push_str(&call.arguments);
    }
    Ok(ChatResponse {
        content: rule.reply.clone(),
        finish_reason: if tool_calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        }
        .into(),
        tool_calls,
        usage: TokenUsage::estimate(request, &written),
    })
}

/// `text` cut after the whitespace that follows each word: `"a  b c"` is `"a  "`, `"b "`,
/// `"c"`. Leading whitespace stays with the first word.
fn pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut has_word = false;
    // Whitespace after a word: the next word starts a new piece.
    let mut after_word = false;
    for (at, c) in text.char_indices() {
        if c.is_whitespace() {
            after_word = has_word;
        } else {
            if after_word {
                pieces.push(text[start..at].to_owned());
                start = at;
                after_word = false;
            }
            has_word = true;
        }
    }
    if start < text.len() {
        pieces.push(text[start..].to_owned());
    }
    pieces
}

#[async_trait]
impl Provider for Scripted {
    /// The matching rule answers after its delay, or fails with its class.
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let rule = self.rule(request)?;
        // Cancel-safe: dropping this future (a timeout, a cancelled call) ends the wait.
        tokio::time::sleep(rule.delay).await;
        answer(rule, request)
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let rule = self.rule(request)?;
        tokio::time::sleep(rule.delay).await;
        let response = answer(rule, request)?;
        let mut events: Vec<(Duration, StreamEvent)> = Vec::new();
        for (index, piece) in pieces(&response.content).into_iter().enumerate() {
            let wait = if index == 0 {
                Duration::ZERO
            } else {
                rule.piece_delay
            };
            events.push((wait, StreamEvent::Text(piece)));
        }
        let rest = super::events_of(ChatResponse {
            content: String::new(),
            ..response
        });
        events.extend(rest.into_iter().map(|event| (Duration::ZERO, event)));
        // Each wait is inside the stream, so dropping the stream ends it.
        Ok(Box::pin(futures::stream::iter(events).then(
            |(wait, event)| async move {
                tokio::time::sleep(wait).await;
                Ok(event)
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ScriptToolCall;
    use crate::error::ErrorClass;
    use crate::provider::{ChatMessage, Role, StreamAccumulator};

    fn rule(contains: Option<&str>, reply: &str) -> ScriptRule {
        ScriptRule {
            contains: contains.map(str::to_owned),
            reply: reply.into(),
            ..ScriptRule::default()
        }
    }

    fn ask(text: &str) -> ChatRequest {
        ChatRequest {
            messages: vec![
                ChatMessage::new(Role::User, "weather please"),
                ChatMessage::new(Role::Assistant, "which city?"),
                ChatMessage::new(Role::User, text),
            ],
            ..ChatRequest::default()
        }
    }

    #[tokio::test]
    async fn first_matching_rule_on_the_last_user_message_answers() {
        let scripted = Scripted::new(vec![
            rule(Some("weather"), "sunny"),
            rule(Some("Paris"), "rainy in Paris"),
            rule(None, "I do not know"),
        ]);
        let reply = scripted.complete(&ask("in Paris")).await.unwrap();
        assert_eq!(reply.content, "rainy in Paris");
        assert_eq!(reply.finish_reason, "stop");
        assert_eq!(
            reply.usage,
            TokenUsage {
                prompt: 6,
                completion: 3
            }
        );
        let fallback = scripted.complete(&ask("in Oslo")).await.unwrap();
        assert_eq!(fallback.content, "I do not know");
    }

    #[tokio::test]
    async fn no_matching_rule_is_permanent() {
        let scripted = Scripted::new(vec![rule(Some("x"), "y")]);
        let error = scripted.complete(&ask("z")).await.unwrap_err();
        assert_eq!(error, ProviderError::NoScriptRule);
        assert_eq!(error.class(), ErrorClass::Permanent);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_injected_after_the_delay() {
        let scripted = Scripted::new(vec![ScriptRule {
            delay: Duration::from_secs(2),
            fail: Some(ErrorClass::ExternalRateLimit),
            ..rule(Some("slow"), "")
        }]);
        let started = tokio::time::Instant::now();
        let error = scripted.complete(&ask("slow down")).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(error.class(), ErrorClass::ExternalRateLimit);

        let request = ask("slow");
        let cut = tokio::time::timeout(Duration::from_secs(1), scripted.complete(&request));
        assert!(cut.await.is_err(), "a timeout cancels the delay");
    }

    #[test]
    fn pieces_are_words_with_their_whitespace() {
        assert_eq!(pieces("a  b c"), vec!["a  ", "b ", "c"]);
        assert_eq!(pieces(" lead\ttab\n"), vec![" lead\t", "tab\n"]);
        assert_eq!(pieces(""), Vec::<String>::new());
        assert_eq!(pieces("   "), vec!["   "]);
        assert_eq!(pieces("caf\u{e9} ol\u{e9}"), vec!["caf\u{e9} ", "ol\u{e9}"]);
    }

    #[tokio::test(start_paused = true)]
    async fn streams_word_pieces_after_the_delay_then_the_tool_calls() {
        let scripted = Scripted::new(vec![ScriptRule {
            delay: Duration::from_secs(1),
            piece_delay: Duration::from_millis(100),
            tool_calls: vec![
                ScriptToolCall {
                    name: "search".into(),
                    arguments: r#"{"q":"x"}"#.into(),
                },
                ScriptToolCall {
                    name: "read".into(),
                    arguments: "{}".into(),
                },
            ],
            ..rule(None, "let me  look it up")
        }]);
        let whole = scripted.complete(&ask("hi")).await.unwrap();
        assert_eq!(whole.finish_reason, "tool_calls");
        assert_eq!(whole.tool_calls[1].id, "call_1");

        let started = tokio::time::Instant::now();
        let mut stream = scripted.stream(&ask("hi")).await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "delay to the first piece"
        );
        let mut texts = Vec::new();
        let mut accumulated = StreamAccumulator::default();
        while let Some(event) = stream.next().await {
            let event = event.unwrap();
            if let StreamEvent::Text(text) = &event {
                texts.push(text.clone());
            }
            accumulated.push(&event);
        }
        assert_eq!(texts, vec!["let ", "me  ", "look ", "it ", "up"]);
        assert_eq!(started.elapsed(), Duration::from_millis(1400));
        assert_eq!(accumulated.finish(), Some(whole));
    }

    #[tokio::test]
    async fn streamed_failures_come_before_any_event() {
        let scripted = Scripted::new(vec![ScriptRule {
            fail: Some(ErrorClass::Transient),
            ..rule(None, "")
        }]);
        let error = scripted.stream(&ask("x")).await.err().unwrap();
        assert_eq!(error, ProviderError::Scripted(ErrorClass::Transient));
    }
}
