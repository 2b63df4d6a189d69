//! Any server speaking OpenAI's chat completions API: `POST {base_url}/chat/completions`,
//! whole or streamed (`stream: true`, server-sent `data:` chunks ending in `[DONE]`).
//!
//! Tools go out as `{type: "function", function: {name, description, parameters}}`; a
//! `tool_choice` is sent only with tools (the API rejects one without). JSON mode is
//! `response_format: {type: "json_object"}`. Usage is the server's own; a server that sends
//! none (in a stream: no final usage chunk despite `stream_options.include_usage`) gets
//! [`TokenUsage::estimate`] of the text and tool arguments it wrote.

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

#[derive(Debug)]
pub struct OpenAi {
    upstream: Upstream,
    model: String,
}

impl OpenAi {
    pub fn new(config: &DeploymentConfig) -> anyhow::Result<Self> {
        Ok(Self {
            upstream: Upstream::new(config, "/chat/completions")?,
            model: config.model.clone(),
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<Value>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: Role,
    /// `null` on an assistant message that only calls tools, as the API writes it itself.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

fn body<'a>(model: &'a str, request: &'a ChatRequest, stream: bool) -> Body<'a> {
    let messages = request
        .messages
        .iter()
        .map(|m| WireMessage {
            role: m.role,
            content: (m.role != Role::Assistant
                || m.tool_calls.is_empty()
                || !m.content.is_empty())
            .then_some(m.content.as_str()),
            tool_calls: tool_calls_json(&m.tool_calls),
            tool_call_id: match m.role {
                Role::Tool => m.tool_call_id.as_deref(),
                _ => None,
            },
        })
        .collect();
    let tools: Vec<Value> = request
        .tools
        .iter()
        .map(|tool| {
            json!({
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            })
        })
        .collect();
    let tool_choice = request
        .tool_choice
        .as_ref()
        .filter(|_| !tools.is_empty())
        .map(|choice| match choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
        });
    Body {
        model,
        messages,
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        seed: request.seed,
        stop: &request.stop,
        tools,
        tool_choice,
        response_format: request.json_mode.then(|| json!({"type": "json_object"})),
        stream,
        stream_options: stream.then(|| json!({"include_usage": true})),
    }
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    id: String,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl From<Usage> for TokenUsage {
    fn from(usage: Usage) -> Self {
        TokenUsage {
            prompt: usage.prompt_tokens,
            completion: usage.completion_tokens,
        }
    }
}

/// The estimate for a server that reports no usage: the text and the tool arguments written.
fn estimate(request: &ChatRequest, content: &str, tool_calls: &[ToolCall]) -> TokenUsage {
    let mut written = content.to_owned();
    for call in tool_calls {
        written.push(' ');
        written.push_str(&call.arguments);
    }
    TokenUsage::estimate(request, &written)
}

fn authorize(http: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    match key {
        Some(key) => http.bearer_auth(key),
        None => http,
    }
}

#[async_trait]
impl Provider for OpenAi {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = self
            .upstream
            .post_json(&body(&self.model, request, false), authorize)
            .await?;
        let completion: Completion = serde_json::from_str(&body)
            .map_err(|e| ProviderError::Malformed(format!("not a chat completion: {e}")))?;
        let choice = completion
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| ProviderError::Malformed("no choices".into()))?;
        let content = choice.message.content.unwrap_or_default();
        let tool_calls: Vec<ToolCall> = choice
            .message
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(|call| ToolCall {
                id: call.id,
                name: call.function.name,
                arguments: call.function.arguments,
            })
            .collect();
        let usage = match completion.usage {
            Some(usage) => usage.into(),
            None => estimate(request, &content, &tool_calls),
        };
        Ok(ChatResponse {
            content,
            tool_calls,
            finish_reason: choice.finish_reason.unwrap_or_default(),
            usage,
        })
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let body = self
            .upstream
            .post_stream(&body(&self.model, request, true), authorize)
            .await?;
        Ok(sse::decode(
            body,
            Chunks {
                request: request.clone(),
                redactor: self.upstream.redactor(),
                finish_reason: None,
                usage: None,
                written: String::new(),
                last_tool: None,
            },
        ))
    }
}

/// One `data:` chunk of a streamed completion.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Deserialize)]
struct DeltaToolCall {
    /// Some servers leave it out; see [`Chunks::tool_index`].
    index: Option<u32>,
    id: Option<String>,
    function: Option<DeltaFunction>,
}

#[derive(Deserialize)]
struct DeltaFunction {
    name: Option<String>,
    arguments: Option<String>,
}

/// The reading of a completion stream. `Done` waits for `[DONE]` because the usage chunk
/// comes after the chunk with the finish reason.
struct Chunks {
    request: ChatRequest,
    redactor: Redactor,
    finish_reason: Option<String>,
    usage: Option<TokenUsage>,
    /// The text and tool arguments streamed so far, for the usage estimate.
    written: String,
    /// The index of the last tool call delta.
    last_tool: Option<u32>,
}

impl Chunks {
    /// The delta's call index; without one, a delta with an id starts the next call and
    /// one without continues the last.
    fn tool_index(&mut self, index: Option<u32>, starts: bool) -> u32 {
        let index = index.unwrap_or(match (self.last_tool, starts) {
            (None, _) => 0,
            (Some(last), true) => last + 1,
            (Some(last), false) => last,
        });
        self.last_tool = Some(index);
        index
    }

    fn done(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        let finish_reason = self.finish_reason.take().ok_or_else(|| {
            ProviderError::Malformed("the stream ended without a finish reason".into())
        })?;
        let usage = self
            .usage
            .unwrap_or_else(|| TokenUsage::estimate(&self.request, &self.written));
        Ok(vec![StreamEvent::Done {
            finish_reason,
            usage,
        }])
    }
}

impl Decoder for Chunks {
    fn event(&mut self, event: SseEvent) -> Result<Vec<StreamEvent>, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return self.done();
        }
        if data.is_empty() {
            // Keep-alives some servers send as data rather than as comments.
            return Ok(Vec::new());
        }
        if let Ok(error) = serde_json::from_str::<ErrorBody>(data) {
            return Err(self.redactor.stream_error(&error.error));
        }
        let chunk: Chunk = sse::json(data, "a chat completion chunk")?;
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        let mut events = Vec::new();
        // Only the first choice: the router never asks for more (`n` is not sent).
        let Some(choice) = chunk.choices.into_iter().next() else {
            return Ok(events);
        };
        if let Some(delta) = choice.delta {
            if let Some(text) = delta.content.filter(|text| !text.is_empty()) {
                self.written.push_str(&text);
                events.push(StreamEvent::Text(text));
            }
            for call in delta.tool_calls.unwrap_or_default() {
                let (name, arguments) = call
                    .function
                    .map_or((None, None), |f| (f.name, f.arguments));
                let arguments = arguments.unwrap_or_default();
                let index = self.tool_index(call.index, call.id.is_some());
                if call.id.is_some() {
                    // A new call: its arguments are not glued to the previous words.
                    self.written.push(' ');
                }
                self.written.push_str(&arguments);
                events.push(StreamEvent::ToolCall {
                    index,
                    id: call.id,
                    name,
                    arguments,
                });
            }
        }
        if let Some(reason) = choice.finish_reason {
            self.finish_reason = Some(reason);
        }
        Ok(events)
    }

    /// Some servers close the stream without `[DONE]`; after a finish reason nothing is
    /// missing but the (estimated, then) usage.
    fn end(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        self.done()
    }
}

/// Tool calls in OpenAI's wire shape, for requests to OpenAI-compatible servers and for the
/// router's own OpenAI-compatible answers.
pub(crate) fn tool_calls_json(calls: &[ToolCall]) -> Vec<Value> {
    calls
        .iter()
        .map(|call| {
            json!({
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{ChatMessage, ToolSpec};

    #[test]
    fn assistant_tool_calls_have_null_content_and_tool_results_their_call_id() {
        let request = ChatRequest {
            messages: vec![
                ChatMessage {
                    tool_calls: vec![ToolCall {
                        id: "call_1".into(),
                        name: "search".into(),
                        arguments: "{\"q\":\"x\"}".into(),
                    }],
                    ..ChatMessage::new(Role::Assistant, "")
                },
                ChatMessage {
                    tool_call_id: Some("call_1".into()),
                    ..ChatMessage::new(Role::Tool, "found")
                },
            ],
            tool_choice: Some(ToolChoice::Auto),
            ..ChatRequest::default()
        };
        let sent = serde_json::to_value(body("m", &request, false)).unwrap();
        assert_eq!(sent["messages"][0]["content"], Value::Null);
        assert_eq!(sent["messages"][0]["tool_calls"][0]["type"], "function");
        assert_eq!(sent["messages"][1]["tool_call_id"], "call_1");
        assert!(sent.get("tool_choice").is_none(), "no tools, no choice");

        let request = ChatRequest {
            tools: vec![ToolSpec {
                name: "search".into(),
                description: String::new(),
                parameters: json!({"type": "object"}),
            }],
            tool_choice: Some(ToolChoice::Tool("search".into())),
            ..request
        };
        let sent = serde_json::to_value(body("m", &request, true)).unwrap();
        assert_eq!(
            sent["tool_choice"],
            json!({"type": "function", "function": {"name": "search"}})
        );
        assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn tool_call_deltas_without_index_follow_their_ids() {
        let mut chunks = Chunks {
            request: ChatRequest::default(),
            redactor: Upstream::new(
                &DeploymentConfig {
                    base_url: Some("http://localhost/v1".into()),
                    ..DeploymentConfig::new("d", crate::config::ProviderKind::OpenAi, "m")
                },
                "",
            )
            .unwrap()
            .redactor(),
            finish_reason: None,
            usage: None,
            written: String::new(),
            last_tool: None,
        };
        let mut indexes = Vec::new();
        for data in [
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"a","function":{"name":"f","arguments":"{"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"b","function":{"name":"g"}}]}}]}"#,
        ] {
            let events = chunks
                .event(SseEvent {
                    event: "message".into(),
                    data: data.into(),
                })
                .unwrap();
            for event in events {
                if let StreamEvent::ToolCall { index, .. } = event {
                    indexes.push(index);
                }
            }
        }
        assert_eq!(indexes, vec![0, 0, 1]);
    }
}
