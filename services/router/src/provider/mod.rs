//! Model providers behind one trait. Providers work on the domain types here, never on prost
//! types; the gRPC adapter converts at the edge.

pub mod anthropic;
pub mod openai;
pub mod scripted;
mod upstream;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::config::{DeploymentConfig, ProviderKind};
use crate::error::ProviderError;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

impl ChatRequest {
    /// The content of the last message with role `user`, or `""` when there is none.
    pub fn last_user_message(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
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

#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    /// `stop`, `length`, ... as the provider reported it.
    pub finish_reason: String,
    pub usage: TokenUsage,
}

/// A model behind a deployment. Implementations classify every failure.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError>;
}

/// The provider a deployment declares. Scripted replies are used only when a deployment says
/// `provider = "scripted"`; nothing falls back to them.
pub fn build(config: &DeploymentConfig) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match config.provider {
        ProviderKind::OpenAi => Arc::new(openai::OpenAi::new(config)?),
        ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(config)?),
        ProviderKind::Scripted => Arc::new(scripted::Scripted::new(config.script.clone())),
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
            max_tokens: None,
            temperature: None,
        };
        assert_eq!(
            TokenUsage::estimate(&request, ""),
            TokenUsage {
                prompt: 5,
                completion: 1
            }
        );
        assert_eq!(request.last_user_message(), "say  hi\nplease");
    }
}
