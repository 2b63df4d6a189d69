//! Any server speaking OpenAI's chat completions API: `POST {base_url}/chat/completions`.

use std::error::Error as _;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{ChatMessage, ChatRequest, ChatResponse, Provider, TokenUsage};
use crate::config::DeploymentConfig;
use crate::error::ProviderError;

/// Connecting never waits longer than this, so an unreachable provider fails fast even with a
/// long call timeout. The whole call is bounded by the deployment (see `Deployment::complete`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Provider error text kept for the caller, in characters.
const MESSAGE_LIMIT: usize = 300;

#[derive(Debug)]
pub struct OpenAi {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<SecretString>,
    connect_timeout: Duration,
}

impl OpenAi {
    pub fn new(config: &DeploymentConfig) -> anyhow::Result<Self> {
        let base_url = config
            .base_url
            .as_deref()
            .with_context(|| format!("deployment {}: base_url is required", config.name))?;
        let connect_timeout = config.timeout.min(CONNECT_TIMEOUT);
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .with_context(|| format!("deployment {}: cannot build the HTTP client", config.name))?;
        Ok(Self {
            client,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            model: config.model.clone(),
            api_key: config.api_key.clone(),
            connect_timeout,
        })
    }

    fn transport_error(&self, error: reqwest::Error) -> ProviderError {
        if error.is_timeout() {
            return ProviderError::Timeout(self.connect_timeout);
        }
        // The URL stays out of the message; the cause chain says what went wrong.
        let error = error.without_url();
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        ProviderError::Transport(message)
    }

    /// The provider's error text, shortened and with the key blotted out should it be quoted.
    fn error_message(&self, body: &str) -> String {
        let message = serde_json::from_str::<ErrorBody>(body)
            .map(|e| match e.error.code {
                Some(code) => format!("{} ({code})", e.error.message),
                None => e.error.message,
            })
            .unwrap_or_else(|_| body.trim().to_owned());
        let mut message: String = message.chars().take(MESSAGE_LIMIT).collect();
        if let Some(key) = self.api_key.as_ref().map(|k| k.expose_secret())
            && !key.is_empty()
        {
            message = message.replace(key, "[REDACTED]");
        }
        message
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
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

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    code: Option<serde_json::Value>,
}

/// `retry-after-ms` (sent by some OpenAI-compatible servers) or `retry-after` in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number =
        |name: &str| -> Option<f64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
    number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
}

#[async_trait]
impl Provider for OpenAi {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let mut http = self.client.post(&self.url).json(&Body {
            model: &self.model,
            messages: &request.messages,
            max_tokens: request.max_tokens,
            temperature: request.temperature,
        });
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key.expose_secret());
        }
        let response = http.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body = response.text().await.map_err(|e| self.transport_error(e))?;
        if !status.is_success() {
            return Err(ProviderError::from_http(
                status.as_u16(),
                retry_after,
                self.error_message(&body),
            ));
        }
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
            finish_reason: choice.finish_reason.unwrap_or_default(),
            usage,
        })
    }
}
