//! Any server speaking OpenAI's chat completions API: `POST {base_url}/chat/completions`.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::upstream::Upstream;
use super::{ChatMessage, ChatRequest, ChatResponse, Provider, TokenUsage};
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
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: super::Role,
    content: &'a str,
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
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[async_trait]
impl Provider for OpenAi {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = Body {
            model: &self.model,
            messages: request
                .messages
                .iter()
                .map(|m: &ChatMessage| WireMessage {
                    role: m.role,
                    content: &m.content,
                })
                .collect(),
            max_tokens: request.max_tokens,
            temperature: request.temperature,
        };
        let body = self
            .upstream
            .post_json(&body, |http, key| match key {
                Some(key) => http.bearer_auth(key),
                None => http,
            })
            .await?;
        let completion: Completion = serde_json::from_str(&body)
            .map_err(|e| ProviderError::Malformed(format!("not a chat completion: {e}")))?;
        let choice = completion
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| ProviderError::Malformed("no choices".into()))?;
        let content = choice.message.content.unwrap_or_default();
        let usage = match completion.usage {
            Some(usage) => TokenUsage {
                prompt: usage.prompt_tokens,
                completion: usage.completion_tokens,
            },
            None => TokenUsage::estimate(request, &content),
        };
        Ok(ChatResponse {
            content,
            tool_calls: Vec::new(),
            finish_reason: choice.finish_reason.unwrap_or_default(),
            usage,
        })
    }
}
