//! Anthropic's Messages API: `POST {base_url}/messages` (for example
//! `https://api.anthropic.com/v1`), authenticated with `x-api-key`, whole or streamed.
//!
//! System messages go into the top-level `system` field. An assistant's tool calls become
//! `tool_use` blocks and tool results (role `tool`) `tool_result` blocks of a user turn;
//! consecutive turns of one side are joined (the API wants them to alternate), so the results
//! of parallel calls form one user turn. A tool result without a call id cannot be a
//! `tool_result` and is sent as user text. Anthropic requires `max_tokens`, so a request
//! without one gets [`DEFAULT_MAX_TOKENS`]. Usage is Anthropic's own (`input_tokens`,
//! `output_tokens`).
//!
//! JSON mode has no switch in this API: the request gets [`JSON_INSTRUCTION`] appended to its
//! system prompt, which models follow well but not surely, so Anthropic deployments should
//! not declare the `json` capability.

use std::collections::HashMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::sse::{self, Decoder, SseEvent};
use super::upstream::{ErrorBody, Redactor, Upstream};
use super::{
    ChatRequest, ChatResponse, ChatStream, Provider, Role, StreamEvent, TokenUsage, ToolCall,
    ToolChoice,
};
use crate::config::DeploymentConfig;
use crate::error::ProviderError;

/// The API version this provider speaks (`anthropic-version`).
const API_VERSION: &str = "2023-06-01";
/// Output bound of a request that sets none (the API requires one).
pub const DEFAULT_MAX_TOKENS: u32 = 1024;
/// Appended to the system prompt of a JSON-mode request.
pub const JSON_INSTRUCTION: &str =
    "Answer with a single JSON object and nothing else: no prose, no code fences.";

#[derive(Debug)]
pub struct Anthropic {
    upstream: Upstream,
    model: String,
}

impl Anthropic {
    pub fn new(config: &DeploymentConfig) -> anyhow::Result<Self> {
        Ok(Self {
            upstream: Upstream::new(config, "/messages")?,
            model: config.model.clone(),
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    system: String,
    messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Debug, PartialEq, Serialize)]
struct Message {
    role: &'static str,
    content: Content,
}

/// A turn's content: plain text when that is all it has, as the API's own examples write it.
#[derive(Debug, PartialEq, Serialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
    },
}

/// A tool call's arguments as the JSON object APIs with structured arguments (Anthropic's
/// `input`, Gemini's `args`) require. Empty text is `{}`; text that is not a JSON object (a
/// model can write broken JSON, and the history may come from another provider) is kept as
/// `{"raw_arguments": text}` rather than failing the whole conversation with a rejection: the
/// model then sees what it wrote.
pub(super) fn arguments_object(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(value @ Value::Object(_)) => value,
        _ => json!({ "raw_arguments": arguments }),
    }
}

fn body<'a>(model: &'a str, request: &'a ChatRequest, stream: bool) -> Body<'a> {
    let mut system: Vec<&str> = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    if request.json_mode {
        system.push(JSON_INSTRUCTION);
    }
    let tools: Vec<Value> = request
        .tools
        .iter()
        .map(|tool| {
            json!({
                "name": tool.name,
                "description": tool.description,
                "input_schema": tool.parameters,
            })
        })
        .collect();
    let tool_choice = request
        .tool_choice
        .as_ref()
        .filter(|_| !tools.is_empty())
        .map(|choice| match choice {
            ToolChoice::Auto => json!({"type": "auto"}),
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Tool(name) => json!({"type": "tool", "name": name}),
        });
    Body {
        model,
        max_tokens: request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        system: system.join("\n\n"),
        messages: alternating(request),
        temperature: request.temperature,
        top_p: request.top_p,
        stop_sequences: request.stop.clone(),
        tools,
        tool_choice,
        stream,
    }
}

/// The conversation without system messages, with consecutive messages of one side joined:
/// the Messages API wants user and assistant turns to alternate. Adjacent text is joined with
/// a blank line, so a conversation without tools reads as before.
fn alternating(request: &ChatRequest) -> Vec<Message> {
    let mut turns: Vec<(&'static str, Vec<Block>)> = Vec::with_capacity(request.messages.len());
    for message in &request.messages {
        let (role, blocks) = match (message.role, &message.tool_call_id) {
            (Role::System, _) => continue,
            (Role::Tool, Some(id)) => (
                "user",
                vec![Block::ToolResult {
                    tool_use_id: id.clone(),
                    content: message.content.clone(),
                }],
            ),
            (Role::User | Role::Tool, _) => ("user", text_blocks(&message.content)),
            (Role::Assistant, _) => {
                let mut blocks = text_blocks(&message.content);
                blocks.extend(message.tool_calls.iter().map(|call| Block::ToolUse {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    input: arguments_object(&call.arguments),
                }));
                ("assistant", blocks)
            }
        };
        match turns.last_mut() {
            Some((last_role, last)) if *last_role == role => {
                for block in blocks {
                    match (last.last_mut(), block) {
                        (Some(Block::Text { text }), Block::Text { text: more }) => {
                            text.push_str("\n\n");
                            text.push_str(&more);
                        }
                        (_, block) => last.push(block),
                    }
                }
            }
            _ => turns.push((role, blocks)),
        }
    }
    turns
        .into_iter()
        .map(|(role, mut blocks)| {
            let content = match blocks.as_mut_slice() {
                [] => Content::Text(String::new()),
                [Block::Text { text }] => Content::Text(std::mem::take(text)),
                _ => Content::Blocks(blocks),
            };
            Message { role, content }
        })
        .collect()
}

/// Empty text is left out: the API rejects empty text blocks.
fn text_blocks(text: &str) -> Vec<Block> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Block::Text {
            text: text.to_owned(),
        }]
    }
}

#[derive(Deserialize)]
struct Answer {
    content: Vec<AnswerBlock>,
    stop_reason: Option<String>,
    usage: Usage,
}

#[derive(Deserialize)]
struct AnswerBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    input: Value,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

/// Anthropic's `stop_reason` in OpenAI's `finish_reason` terms.
fn finish_reason(stop_reason: Option<&str>) -> String {
    match stop_reason {
        Some("end_turn" | "stop_sequence") | None => "stop",
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        Some(other) => other,
    }
    .to_owned()
}

fn headers(http: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    let http = http.header("anthropic-version", API_VERSION);
    match key {
        Some(key) => http.header("x-api-key", key),
        None => http,
    }
}

#[async_trait]
impl Provider for Anthropic {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let answer = self
            .upstream
            .post_json(&body(&self.model, request, false), headers)
            .await?;
        let answer: Answer = serde_json::from_str(&answer)
            .map_err(|e| ProviderError::Malformed(format!("not a Messages API answer: {e}")))?;
        let mut content = String::new();
        let mut tool_calls = Vec::new();
        for block in answer.content {
            match block.kind.as_str() {
                "text" => content.push_str(&block.text),
                "tool_use" => tool_calls.push(ToolCall {
                    id: block.id,
                    name: block.name,
                    arguments: block.input.to_string(),
                }),
                // Thinking and other blocks are not part of the answer.
                _ => {}
            }
        }
        Ok(ChatResponse {
            content,
            tool_calls,
            finish_reason: finish_reason(answer.stop_reason.as_deref()),
            usage: TokenUsage {
                prompt: answer.usage.input_tokens.unwrap_or_default(),
                completion: answer.usage.output_tokens.unwrap_or_default(),
            },
        })
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let body = self
            .upstream
            .post_stream(&body(&self.model, request, true), headers)
            .await?;
        Ok(sse::decode(
            body,
            Events {
                redactor: self.upstream.redactor(),
                tools: HashMap::new(),
                usage: TokenUsage::default(),
                stop_reason: None,
            },
        ))
    }
}

/// One event of a Messages stream; its `type` repeats the SSE event name.
#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    message: Option<EventMessage>,
    index: Option<u32>,
    content_block: Option<AnswerBlock>,
    delta: Option<EventDelta>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EventMessage {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EventDelta {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
    partial_json: Option<String>,
    stop_reason: Option<String>,
}

/// A tool call being streamed: its index among the calls and whether any arguments came.
struct StreamedTool {
    index: u32,
    has_arguments: bool,
}

/// The reading of a Messages stream.
struct Events {
    redactor: Redactor,
    /// Content block index → tool call; the call indexes count tool blocks only, from 0.
    tools: HashMap<u32, StreamedTool>,
    usage: TokenUsage,
    stop_reason: Option<String>,
}

impl Events {
    fn take_usage(&mut self, usage: Option<Usage>) {
        // Counts are cumulative: each replaces the last, never adds to it.
        if let Some(usage) = usage {
            if let Some(input) = usage.input_tokens {
                self.usage.prompt = input;
            }
            if let Some(output) = usage.output_tokens {
                self.usage.completion = output;
            }
        }
    }
}

impl Decoder for Events {
    fn event(&mut self, event: SseEvent) -> Result<Vec<StreamEvent>, ProviderError> {
        let data: Event = sse::json(&event.data, "a Messages API event")?;
        if event.event == "error" || data.kind == "error" {
            let error: ErrorBody = sse::json(&event.data, "a Messages API error")?;
            return Err(self.redactor.stream_error(&error.error));
        }
        let mut events = Vec::new();
        match data.kind.as_str() {
            "message_start" => self.take_usage(data.message.and_then(|m| m.usage)),
            "content_block_start" => {
                if let (Some(index), Some(block)) = (data.index, data.content_block) {
                    match block.kind.as_str() {
                        "tool_use" => {
                            let tool = u32::try_from(self.tools.len()).unwrap_or(u32::MAX);
                            self.tools.insert(
                                index,
                                StreamedTool {
                                    index: tool,
                                    has_arguments: false,
                                },
                            );
                            events.push(StreamEvent::ToolCall {
                                index: tool,
                                id: Some(block.id),
                                name: Some(block.name),
                                arguments: String::new(),
                            });
                        }
                        "text" if !block.text.is_empty() => {
                            events.push(StreamEvent::Text(block.text));
                        }
                        _ => {}
                    }
                }
            }
            "content_block_delta" => {
                let delta = data.delta.ok_or_else(|| {
                    ProviderError::Malformed("a content_block_delta without delta".into())
                })?;
                match delta.kind.as_deref() {
                    Some("text_delta") => {
                        if let Some(text) = delta.text.filter(|t| !t.is_empty()) {
                            events.push(StreamEvent::Text(text));
                        }
                    }
                    Some("input_json_delta") => {
                        let tool = data
                            .index
                            .and_then(|index| self.tools.get_mut(&index))
                            .ok_or_else(|| {
                                ProviderError::Malformed(
                                    "tool arguments for a block that is no tool call".into(),
                                )
                            })?;
                        let arguments = delta.partial_json.unwrap_or_default();
                        if !arguments.is_empty() {
                            tool.has_arguments = true;
                            events.push(StreamEvent::ToolCall {
                                index: tool.index,
                                id: None,
                                name: None,
                                arguments,
                            });
                        }
                    }
                    // Thinking and signature deltas are not part of the answer.
                    _ => {}
                }
            }
            "content_block_stop" => {
                // A call without arguments streams none; the whole answer says `{}`, so
                // the stream does too.
                if let Some(tool) = data.index.and_then(|index| self.tools.get_mut(&index))
                    && !tool.has_arguments
                {
                    tool.has_arguments = true;
                    events.push(StreamEvent::ToolCall {
                        index: tool.index,
                        id: None,
                        name: None,
                        arguments: "{}".into(),
                    });
                }
            }
            "message_delta" => {
                if let Some(reason) = data.delta.and_then(|d| d.stop_reason) {
                    self.stop_reason = Some(reason);
                }
                self.take_usage(data.usage);
            }
            "message_stop" => events.push(StreamEvent::Done {
                finish_reason: finish_reason(self.stop_reason.as_deref()),
                usage: self.usage,
            }),
            // `ping`, and event types added after this was written.
            _ => {}
        }
        Ok(events)
    }

    fn end(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        Err(ProviderError::Malformed(
            "the stream ended before message_stop".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ChatMessage;

    #[test]
    fn turns_alternate_and_system_messages_are_left_out() {
        let request = ChatRequest {
            messages: vec![
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "run it"),
                ChatMessage::new(Role::Assistant, "running"),
                ChatMessage::new(Role::Tool, "exit 0"),
                ChatMessage::new(Role::User, "and now?"),
            ],
            ..ChatRequest::default()
        };
        let turn = |role, content: &str| Message {
            role,
            content: Content::Text(content.into()),
        };
        assert_eq!(
            alternating(&request),
            vec![
                turn("user", "run it"),
                turn("assistant", "running"),
                turn("user", "exit 0\n\nand now?"),
            ]
        );
    }

    #[test]
    fn tool_results_of_parallel_calls_form_one_user_turn() {
        let call = |id: &str, arguments: &str| ToolCall {
            id: id.into(),
            name: "search".into(),
            arguments: arguments.into(),
        };
        let result = |id: &str, content: &str| ChatMessage {
            tool_call_id: Some(id.into()),
            ..ChatMessage::new(Role::Tool, content)
        };
        let request = ChatRequest {
            messages: vec![
                ChatMessage::new(Role::User, "find"),
                ChatMessage {
                    tool_calls: vec![call("a", r#"{"q":"x"}"#), call("b", "not json")],
                    ..ChatMessage::new(Role::Assistant, "")
                },
                result("a", "one"),
                result("b", "two"),
            ],
            ..ChatRequest::default()
        };
        let turns = serde_json::to_value(alternating(&request)).unwrap();
        assert_eq!(
            turns,
            json!([
                {"role": "user", "content": "find"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "a", "name": "search", "input": {"q": "x"}},
                    {"type": "tool_use", "id": "b", "name": "search",
                     "input": {"raw_arguments": "not json"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "a", "content": "one"},
                    {"type": "tool_result", "tool_use_id": "b", "content": "two"}
                ]}
            ])
        );
    }

    #[test]
    fn arguments_become_an_object() {
        assert_eq!(arguments_object(""), json!({}));
        assert_eq!(arguments_object(r#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(arguments_object("[1]"), json!({"raw_arguments": "[1]"}));
    }
}
