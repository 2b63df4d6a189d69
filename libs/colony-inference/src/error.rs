//! What a caller of a local model can get back instead of an answer.

use crate::ModelError;

/// Why a request to a local model was not answered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferenceError {
    /// The model's queue is full: the caller should back off (RESOURCE_EXHAUSTED / HTTP 429).
    #[error("the local {kind} model is busy: {capacity} requests are already waiting")]
    QueueFull { kind: &'static str, capacity: usize },
    /// The model could not be loaded; the message says how to fix it.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The prompt leaves no room for an answer in the model's context.
    #[error(
        "the prompt is {prompt_tokens} tokens; the local model's context holds {context_tokens}"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        context_tokens: usize,
    },
    /// The request itself is unusable (empty input, prompt longer than the context, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// The engine failed while working on the request.
    #[error("local {kind} model failed: {reason}")]
    Engine { kind: &'static str, reason: String },
    /// The model's thread has stopped (the process is shutting down).
    #[error("the local {kind} model has stopped")]
    Stopped { kind: &'static str },
}
