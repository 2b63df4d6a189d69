//! What the HTTP providers share: the client with its connect timeout, the POST of a JSON body
//! with the answer's status mapped to a [`ProviderError`], and error text that never carries
//! the API key or the URL.

use std::error::Error as _;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::RequestBuilder;
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::DeploymentConfig;
use crate::error::ProviderError;

/// Connecting never waits longer than this, so an unreachable provider fails fast even with a
/// long call timeout. The whole call is bounded by the deployment (see `Deployment::complete`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Provider error text kept for the caller, in characters.
const MESSAGE_LIMIT: usize = 300;

/// One provider endpoint: `{base_url}{path}`.
#[derive(Debug)]
pub(super) struct Upstream {
    client: reqwest::Client,
    url: String,
    api_key: Option<SecretString>,
    connect_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &DeploymentConfig, path: &str) -> anyhow::Result<Self> {
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
            url: format!("{}{path}", base_url.trim_end_matches('/')),
            api_key: config.api_key.clone(),
            connect_timeout,
        })
    }

    /// POSTs `body` with the headers `headers` adds (given the API key, when the deployment
    /// has one), and answers the response body of a success; a failure status becomes the
    /// matching [`ProviderError`].
    pub async fn post_json<B: Serialize>(
        &self,
        body: &B,
        headers: impl FnOnce(RequestBuilder, Option<&str>) -> RequestBuilder,
    ) -> Result<String, ProviderError> {
        let key = self.api_key.as_ref().map(|key| key.expose_secret());
        let http = headers(self.client.post(&self.url).json(body), key);
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
        Ok(body)
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

    /// The provider's error text (`{"error": {"message", "code"?}}`, which OpenAI-compatible
    /// servers and Anthropic both send), shortened and with the key blotted out should it be
    /// quoted.
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
