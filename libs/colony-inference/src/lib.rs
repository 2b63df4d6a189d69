//! Embedded local inference: a GGUF chat model run in process through llama.cpp, and sentence
//! embeddings (all-MiniLM-L6-v2) through candle's BERT — no Python, no model hub, no server.
//!
//! Both engines run on their own OS threads behind bounded queues, so an async caller never
//! blocks a runtime worker on a matrix multiply, and a full queue is refused at once rather than
//! left to grow. The router serves the chat model as a deployment and the embeddings on
//! `/v1/embeddings`; the memory service embeds with the same code.

pub mod chat;
pub mod embed;
mod error;
mod files;
pub mod metrics;
mod worker;

pub use error::InferenceError;
pub use files::{ModelError, check_gguf, require_file, workspace_models_dir};
pub use worker::Loading;

/// The default chat model's file, relative to the models directory (`make models`).
pub const DEFAULT_CHAT_MODEL: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default embedding model's directory, relative to the models directory.
pub const DEFAULT_EMBEDDING_MODEL: &str = "all-minilm-l6-v2";
