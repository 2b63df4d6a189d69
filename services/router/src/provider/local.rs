//! The embedded chat model as a provider: a GGUF model run in this process by
//! colony-inference, declared with `provider = "local"` and a `[deployments.local]` table.
//!
//! Its tokens are counted exactly by the model's own tokenizer. A full queue is a rate limit
//! (RESOURCE_EXHAUSTED / HTTP 429, with fallbacks where configured); a caller that goes away
//! drops the stream, which stops generation before the next token.

use async_trait::async_trait;
use colony_inference::InferenceError;
use colony_inference::chat::{self as local, ChatEvent, LocalChat};

use super::{
    ChatRequest, ChatResponse, ChatStream, Provider, Role, StreamAccumulator, StreamEvent,
    TokenUsage,
};
use crate::config::DeploymentConfig;
use crate::error::ProviderError;

pub struct Local {
    chat: LocalChat,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("model", &self.chat.name())
            .finish()
    }
}

impl Local {
    /// Starts the model's thread (loading the model now unless the config says `lazy`).
    pub fn new(config: &DeploymentConfig) -> anyhow::Result<Self> {
        let Some(local) = config.local.clone() else {
            anyhow::bail!(
                "deployment {}: provider \"local\" needs a [deployments.local] table with model_path",
                config.name
            );
        };
        let chat = LocalChat::start(local)
            .map_err(|err| anyhow::anyhow!("deployment {}: {err}", config.name))?;
        Ok(Self { chat })
    }
}

/// The conversation as the model's template sees it. Tool calls and results (the local model
/// is not offered tools, but a conversation may carry them from another model) become text.
fn to_local(request: &ChatRequest) -> local::ChatRequest {
    let messages = request
        .messages
        .iter()
        .map(|message| {
            let role = match message.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            let mut content = message.content.clone();
            for call in &message.tool_calls {
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(&format!("[called {} with {}]", call.name, call.arguments));
            }
            local::ChatMessage::new(role, content)
        })
        .collect();
    local::ChatRequest {
        messages,
        max_tokens: request.max_tokens,
        stop: request.stop.clone(),
        temperature: request.temperature,
        top_p: request.top_p,
        seed: request.seed,
    }
}

fn provider_error(error: InferenceError) -> ProviderError {
    match error {
        InferenceError::ContextOverflow { .. } => ProviderError::ContextTooLong(error.to_string()),
        other => ProviderError::Local(other),
    }
}

fn stream_event(event: ChatEvent) -> StreamEvent {
    match event {
        ChatEvent::Text(text) => StreamEvent::Text(text),
        ChatEvent::Done(usage) => StreamEvent::Done {
            finish_reason: usage.finish.as_str().to_owned(),
            usage: TokenUsage {
                prompt: u64::from(usage.prompt_tokens),
                completion: u64::from(usage.completion_tokens),
            },
        },
    }
}

#[async_trait]
impl Provider for Local {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let mut stream = self.stream(request).await?;
        let mut answer = StreamAccumulator::default();
        while let Some(event) = futures::StreamExt::next(&mut stream).await {
            answer.push(&event?);
        }
        answer
            .finish()
            .ok_or(ProviderError::Local(InferenceError::Stopped {
                kind: "chat",
            }))
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let mut events = self
            .chat
            .stream(to_local(request))
            .map_err(provider_error)?;
        // The first event decides whether the call failed before producing anything (so the
        // router may still fall back): a load failure or an overflowing prompt arrives first.
        let first = match events.next().await {
            Some(Ok(event)) => stream_event(event),
            Some(Err(err)) => return Err(provider_error(err)),
            None => {
                return Err(ProviderError::Local(InferenceError::Stopped {
                    kind: "chat",
                }));
            }
        };
        let rest = futures::stream::unfold(events, |mut events| async move {
            let event = events.next().await?;
            Some((event.map(stream_event).map_err(provider_error), events))
        });
        Ok(Box::pin(futures::StreamExt::chain(
            futures::stream::iter([Ok(first)]),
            rest,
        )))
    }
}
