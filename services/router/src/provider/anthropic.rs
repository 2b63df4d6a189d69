//! Anthropic's Messages API: `POST {base_url}/messages` (for example
//! `https://api.anthropic.com/v1`), authenticated with `x-api-key`.
//!
//! System messages go into the top-level `system` field; a tool result (role `tool`) is sent as
//! user text, since the router does not carry tool-call ids yet, and consecutive turns of one
//! side are joined (the API wants them to alternate). Anthropic requires
//! `max_tokens`, so a request without one gets [`DEFAULT_MAX_TOKENS`]. Usage is Anthropic's own
//! (`input_tokens`, `output_tokens`).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::upstream::Upstream;
use super::{ChatRequest, ChatResponse, Provider, Role, TokenUsage};
use crate::config::DeploymentConfig;
use crate::error::ProviderError;

/// The API version this provider speaks (`anthropic-version`).
const API_VERSION: &str = "2023-06-01";
/// Output bound of a request that sets none (the API requires one).
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

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
}

#[derive(Debug, PartialEq, Serialize)]
struct Message {
    role: &'static str,
    content: String,
}

#[derive(Deserialize)]
struct Answer {
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: Usage,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
}

/// Anthropic's `stop_reason` in OpenAI's `finish_reason` terms.
fn finish_reason(stop_reason: Option<&str>) -> String {
    match stop_reason {
        Some("end_turn" | "stop_sequence") | None => "stop",
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some(other) => other,
    }
    .to_owned()
}

fn body<'a>(model: &'a str, request: &'a ChatRequest) -> Body<'a> {
    let system: Vec<&str> = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    Body {
        model,
        max_tokens: request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        system: system.join("\n\n"),
        messages: alternating(request),
        temperature: request.temperature,
    }
}

/// The conversation without system messages, with consecutive messages of one side joined:
/// the Messages API wants user and assistant turns to alternate.
fn alternating(request: &ChatRequest) -> Vec<Message> {
    let mut messages: Vec<Message> = Vec::with_capacity(request.messages.len());
    for message in &request.messages {
        let role = match message.role {
            Role::System => continue,
            Role::User | Role::Tool => "user",
            Role::Assistant => "assistant",
        };
        match messages.last_mut() {
            Some(last) if last.role == role => {
                last.content.push_str("\n\n");
                last.content.push_str(&message.content);
            }
            _ => messages.push(Message {
                role,
                content: message.content.clone(),
            }),
        }
    }
    messages
}

#[async_trait]
impl Provider for Anthropic {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let answer = self
            .upstream
            .post_json(&body(&self.model, request), |http, key| {
                let http = http.header("anthropic-version", API_VERSION);
                match key {
                    Some(key) => http.header("x-api-key", key),
                    None => http,
                }
            })
            .await?;
        let answer: Answer = serde_json::from_str(&answer)
            .map_err(|e| ProviderError::Malformed(format!("not a Messages API answer: {e}")))?;
        let content: String = answer
            .content
            .iter()
            .filter(|block| block.kind == "text")
            .map(|block| block.text.as_str())
            .collect();
        Ok(ChatResponse {
            content,
            tool_calls: Vec::new(),
            finish_reason: finish_reason(answer.stop_reason.as_deref()),
            usage: TokenUsage {
                prompt: answer.usage.input_tokens,
                completion: answer.usage.output_tokens,
            },
        })
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
            content: content.into(),
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
}
