//! Model providers behind one trait. Providers work on the domain types here, never on prost
//! types; the gRPC adapter converts at the edge.

pub mod anthropic;
pub mod gemini;
pub mod local;
pub mod openai;
pub mod scripted;
mod sse;
mod upstream;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::config::{DeploymentConfig, ProviderKind};
use crate::error::ProviderError;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    #[default]
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// The tools an assistant message called.
    pub tool_calls: Vec<ToolCall>,
    /// On a `tool` message: the id of the call it answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            ..Self::default()
        }
    }
}

/// A tool the model may call (OpenAI function calling).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// The arguments' JSON Schema (an object schema; `{"type":"object"}` when none was given).
    pub parameters: serde_json::Value,
}

/// One call of a tool by the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them.
    pub arguments: String,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    /// This tool, by name.
    Tool(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold.
    pub top_p: Option<f32>,
    /// Makes sampling repeatable where the provider supports it.
    pub seed: Option<u64>,
    /// The answer ends before the first of these strings.
    pub stop: Vec<String>,
    pub tools: Vec<ToolSpec>,
    /// `None` leaves it to the provider (auto when tools are given).
    pub tool_choice: Option<ToolChoice>,
    /// Ask for a JSON object as the answer.
    pub json_mode: bool,
}

impl ChatRequest {
    /// The content of the last message from outside the model (role `user`, or `tool` for a
    /// tool's result), or `""` when there is none.
    pub fn last_input(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| matches!(m.role, Role::User | Role::Tool))
            .map_or("", |m| m.content.as_str())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
}

impl TokenUsage {
    /// An ESTIMATE for providers that do not count tokens: one token per whitespace-separated
    /// word, at least one on each side. Real tokenizers count more (roughly 4/3 per English
    /// word), so costs built on it are indicative only.
    pub fn estimate(request: &ChatRequest, completion: &str) -> Self {
        let words = |text: &str| text.split_whitespace().count() as u64;
        Self {
            prompt: request
                .messages
                .iter()
                .map(|m| words(&m.content))
                .sum::<u64>()
                .max(1),
            completion: words(completion).max(1),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    /// The tools the model called; `finish_reason` is then `tool_calls`.
    pub tool_calls: Vec<ToolCall>,
    /// `stop`, `length`, `tool_calls`, ... in OpenAI's words, whatever the provider.
    pub finish_reason: String,
    pub usage: TokenUsage,
}

/// One event of a streamed completion. A stream yields any number of `Text` and `ToolCall`
/// events, then exactly one `Done`, then ends.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Text written since the previous event.
    Text(String),
    /// Part of tool call `index` (from 0): its first part carries `id` and `name`, later
    /// parts more `arguments` text.
    ToolCall {
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
    /// The end. `usage` is the provider's final count for the whole call (providers that
    /// report cumulative counts, like Anthropic, report the last value, not a sum).
    Done {
        finish_reason: String,
        usage: TokenUsage,
    },
}

/// A streamed completion. An `Err` item ends the stream.
pub type ChatStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// Builds the whole response from a stream's events, as they pass.
#[derive(Debug, Default)]
pub struct StreamAccumulator {
    response: ChatResponse,
    done: bool,
}

impl StreamAccumulator {
    pub fn push(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Text(text) => self.response.content.push_str(text),
            StreamEvent::ToolCall {
                index,
                id,
                name,
                arguments,
            } => {
                let index = *index as usize;
                if self.response.tool_calls.len() <= index {
                    self.response
                        .tool_calls
                        .resize_with(index + 1, ToolCall::default);
                }
                let call = &mut self.response.tool_calls[index];
                if let Some(id) = id {
                    call.id.clone_from(id);
                }
                if let Some(name) = name {
                    call.name.clone_from(name);
                }
                call.arguments.push_str(arguments);
            }
            StreamEvent::Done {
                finish_reason,
                usage,
            } => {
                self.response.finish_reason.clone_from(finish_reason);
                self.response.usage = *usage;
                self.done = true;
            }
        }
    }

    /// What has arrived so far, whether or not the stream finished.
    pub fn partial(&self) -> ChatResponse {
        self.response.clone()
    }

    /// The response once `Done` has passed; `None` for a stream that ended early.
    pub fn finish(self) -> Option<ChatResponse> {
        self.done.then_some(self.response)
    }
}

/// The events that stream `response` in one go: for providers (and paths) that do not stream.
pub fn events_of(response: ChatResponse) -> Vec<StreamEvent> {
    let mut events = Vec::with_capacity(response.tool_calls.len() + 2);
    if !response.content.is_empty() {
        events.push(StreamEvent::Text(response.content));
    }
    for (index, call) in response.tool_calls.into_iter().enumerate() {
        events.push(StreamEvent::ToolCall {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            id: Some(call.id),
            name: Some(call.name),
            arguments: call.arguments,
        });
    }
    events.push(StreamEvent::Done {
        finish_reason: response.finish_reason,
        usage: response.usage,
    });
    events
}

/// A model behind a deployment. Implementations classify every failure.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError>;

    /// Streams the completion. The default completes the call, then streams the whole answer
    /// at once; providers with a streaming wire format override it. An `Err` here (before any
    /// event) means nothing was produced, so the caller may fall back to another deployment.
    async fn stream(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let response = self.complete(request).await?;
        Ok(Box::pin(futures::stream::iter(
            events_of(response).into_iter().map(Ok),
        )))
    }
}

/// The provider a deployment declares. Scripted replies are used only when a deployment says
/// `provider = "scripted"`; nothing falls back to them.
pub fn build(config: &DeploymentConfig) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match config.provider {
        ProviderKind::OpenAi => Arc::new(openai::OpenAi::new(config)?),
        ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(config)?),
        ProviderKind::Gemini => Arc::new(gemini::Gemini::new(config)?),
        ProviderKind::Scripted => Arc::new(scripted::Scripted::new(config.script.clone())),
        ProviderKind::Local => Arc::new(local::Local::new(config)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_counts_words_with_a_floor_of_one() {
        let request = ChatRequest {
            messages: vec![
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "say  hi\nplease"),
            ],
            ..ChatRequest::default()
        };
        assert_eq!(
            TokenUsage::estimate(&request, ""),
            TokenUsage {
                prompt: 5,
                completion: 1
            }
        );
        assert_eq!(request.last_input(), "say  hi\nplease");
    }
}
