//! What the HTTP providers share: the client with its connect timeout, the POST of a JSON body
//! with the answer's status mapped to a [`ProviderError`] (whole, or as a byte stream for
//! streaming), and error text that never carries the API key or the URL.

use std::error::Error as _;
use std::time::Duration;

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
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

/// A response body as it arrives; an `Err` ends it.
pub(super) type ByteStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Vec<u8>, ProviderError>> + Send>>;

/// One provider endpoint: `{base_url}{path}`.
#[derive(Debug)]
pub(super) struct Upstream {
    client: reqwest::Client,
    base_url: String,
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
        let base_url = base_url.trim_end_matches('/').to_owned();
        Ok(Self {
            client,
            url: format!("{base_url}{path}"),
            base_url,
            api_key: config.api_key.clone(),
            connect_timeout,
        })
    }

    /// The same provider (client, key) at another path: for APIs with one endpoint per mode.
    pub fn with_path(&self, path: &str) -> Self {
        Self {
            client: self.client.clone(),
            url: format!("{}{path}", self.base_url),
            base_url: self.base_url.clone(),
            api_key: self.api_key.clone(),
            connect_timeout: self.connect_timeout,
        }
    }

    /// POSTs `body` with the headers `headers` adds (given the API key, when the deployment
    /// has one), and answers the response body of a success; a failure status becomes the
    /// matching [`ProviderError`].
    pub async fn post_json<B: Serialize>(
        &self,
        body: &B,
        headers: impl FnOnce(RequestBuilder, Option<&str>) -> RequestBuilder,
    ) -> Result<String, ProviderError> {
        let response = self.send(body, headers).await?;
        response
            .text()
            .await
            .map_err(|e| transport_error(e, self.connect_timeout))
    }

    /// POSTs `body` like [`Upstream::post_json`] and answers the body of a success as it
    /// arrives. The client has no whole-request timeout (a stream may rightly last minutes),
    /// so the caller bounds the time to the first event and the whole call; a failure status
    /// is mapped before any of the body is handed out.
    pub async fn post_stream<B: Serialize>(
        &self,
        body: &B,
        headers: impl FnOnce(RequestBuilder, Option<&str>) -> RequestBuilder,
    ) -> Result<ByteStream, ProviderError> {
        let response = self.send(body, headers).await?;
        let connect_timeout = self.connect_timeout;
        // Chunks are copied out of their buffers: they are small, and it keeps the `bytes`
        // crate out of this crate's dependencies.
        Ok(Box::pin(response.bytes_stream().map(move |chunk| {
            chunk
                .map(|bytes| bytes.to_vec())
                .map_err(|e| transport_error(e, connect_timeout))
        })))
    }

    async fn send<B: Serialize>(
        &self,
        body: &B,
        headers: impl FnOnce(RequestBuilder, Option<&str>) -> RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        let key = self.api_key.as_ref().map(|key| key.expose_secret());
        let http = headers(self.client.post(&self.url).json(body), key);
        let response = http
            .send()
            .await
            .map_err(|e| transport_error(e, self.connect_timeout))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after(response.headers());
        let body = response
            .text()
            .await
            .map_err(|e| transport_error(e, self.connect_timeout))?;
        Err(ProviderError::from_http(
            status.as_u16(),
            retry_after,
            self.error_message(&body),
        ))
    }

    /// What cleans provider text for error messages, for decoders of streams.
    pub fn redactor(&self) -> Redactor {
        Redactor {
            api_key: self.api_key.clone(),
        }
    }

    /// The provider's error text, shortened and with the key blotted out should it be quoted.
    /// OpenAI-compatible servers send `{"error": {"message", "code"?}}`, Anthropic
    /// `{"error": {"type", "message"}}`, Gemini `{"error": {"code", "message", "status"}}`;
    /// the most specific label (status, code, type) follows the message.
    fn error_message(&self, body: &str) -> String {
        let message = serde_json::from_str::<ErrorBody>(body)
            .map(|e| e.error.describe())
            .unwrap_or_else(|_| body.trim().to_owned());
        self.redactor().clean(&message)
    }
}

fn transport_error(error: reqwest::Error, connect_timeout: Duration) -> ProviderError {
    if error.is_timeout() {
        return ProviderError::Timeout(connect_timeout);
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

/// Shortens provider text and blots out the API key, should the provider quote it.
#[derive(Debug, Clone)]
pub(super) struct Redactor {
    api_key: Option<SecretString>,
}

impl Redactor {
    pub fn clean(&self, text: &str) -> String {
        let mut message: String = text.trim().chars().take(MESSAGE_LIMIT).collect();
        if let Some(key) = self.api_key.as_ref().map(|k| k.expose_secret())
            && !key.is_empty()
        {
            message = message.replace(key, "[REDACTED]");
        }
        message
    }

    /// An error a provider sent inside a stream, after its `200`: no HTTP status says what
    /// it is, so its type name does (OpenAI's `type`/`code`, Anthropic's `type`, Gemini's
    /// `status`), sorted as the status that type comes with would be.
    pub fn stream_error(&self, error: &ErrorDetail) -> ProviderError {
        let message = self.clean(&error.describe());
        let kinds = [&error.status, &error.kind, &error.code_text()];
        let kind = |names: &[&str]| {
            kinds
                .iter()
                .any(|k| k.as_deref().is_some_and(|k| names.contains(&k)))
        };
        if kind(&[
            "rate_limit_error",
            "rate_limit_exceeded",
            "RESOURCE_EXHAUSTED",
        ]) {
            ProviderError::RateLimited { retry_after: None }
        } else if kind(&["overloaded_error"]) {
            // A provider out of capacity is degrading, though Anthropic's 529 on the status
            // line counts as a plain server error: mid-stream it has already cost a call.
            ProviderError::Unavailable { status: 529 }
        } else if kind(&["UNAVAILABLE"]) {
            ProviderError::Unavailable { status: 503 }
        } else if kind(&["authentication_error", "invalid_api_key", "UNAUTHENTICATED"]) {
            ProviderError::Unauthorized { status: 401 }
        } else if kind(&["permission_error", "PERMISSION_DENIED"]) {
            ProviderError::Unauthorized { status: 403 }
        } else if kind(&[
            "invalid_request_error",
            "INVALID_ARGUMENT",
            "FAILED_PRECONDITION",
        ]) {
            ProviderError::from_http(400, None, message)
        } else if kind(&["not_found_error", "NOT_FOUND"]) {
            ProviderError::from_http(404, None, message)
        } else if kind(&["request_too_large"]) {
            ProviderError::from_http(413, None, message)
        } else {
            // `api_error`, `server_error`, `INTERNAL` and whatever else: the provider failed
            // mid-answer, which a retry may not meet again.
            ProviderError::Server { status: 500 }
        }
    }
}

#[derive(Deserialize)]
pub(super) struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
pub(super) struct ErrorDetail {
    #[serde(default)]
    message: String,
    code: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    status: Option<String>,
}

impl ErrorDetail {
    fn code_text(&self) -> Option<String> {
        match self.code.as_ref()? {
            serde_json::Value::String(code) => Some(code.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    fn describe(&self) -> String {
        match self
            .status
            .clone()
            .or_else(|| self.code_text())
            .or_else(|| self.kind.clone())
        {
            Some(label) => format!("{} ({label})", self.message),
            None => self.message.clone(),
        }
    }
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
