//! Where sentence embeddings come from: the model in this process (the default), or an
//! embedding model served by the router's OpenAI-compatible `/v1/embeddings`.

use std::time::Duration;

use colony_inference::embed::Embedder;
use serde::Deserialize;

use crate::Error;
use crate::config::RouterEmbeddingsConfig;
use crate::semantic::normalised;

pub enum Embeddings {
    Local(Embedder),
    Router(RouterEmbeddings),
}

pub struct RouterEmbeddings {
    http: reqwest::Client,
    url: String,
    model: String,
    dimensions: usize,
}

#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingData>,
}

#[derive(Deserialize)]
struct EmbeddingData {
    index: usize,
    embedding: Vec<f32>,
}

impl RouterEmbeddings {
    pub fn new(config: &RouterEmbeddingsConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            http,
            url: format!("{}/v1/embeddings", config.url.trim_end_matches('/')),
            model: config.model.clone(),
            dimensions: config.dimensions,
        })
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, Error> {
        let unavailable = |what: String| Error::Unavailable(format!("router embeddings: {what}"));
        let response = self
            .http
            .post(&self.url)
            .json(&serde_json::json!({ "model": self.model, "input": texts }))
            .send()
            .await
            .map_err(|error| unavailable(error.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return Err(unavailable(format!("{status}: {body}")));
        }
        let mut parsed: EmbeddingsResponse = response
            .json()
            .await
            .map_err(|error| unavailable(format!("unreadable answer: {error}")))?;
        if parsed.data.len() != texts.len() {
            return Err(unavailable(format!(
                "{} embeddings for {} texts",
                parsed.data.len(),
                texts.len()
            )));
        }
        parsed.data.sort_by_key(|data| data.index);
        parsed
            .data
            .into_iter()
            .map(|data| {
                if data.embedding.len() != self.dimensions {
                    return Err(unavailable(format!(
                        "a vector of {} dimensions; configured for {}",
                        data.embedding.len(),
                        self.dimensions
                    )));
                }
                normalised(data.embedding)
                    .ok_or_else(|| unavailable("a vector that is not finite".into()))
            })
            .collect()
    }
}

impl Embeddings {
    /// One unit-length vector per text, in order.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, Error> {
        match self {
            Embeddings::Local(embedder) => embedder.embed(texts).await.map_err(Error::Embedding),
            Embeddings::Router(router) => router.embed(texts).await,
        }
    }

    /// The embedding of one text.
    pub async fn embed_one(&self, text: &str) -> Result<Vec<f32>, Error> {
        self.embed(vec![text.to_owned()])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Unavailable("the embedding model returned nothing".into()))
    }

    pub fn dimensions(&self) -> usize {
        match self {
            Embeddings::Local(embedder) => embedder.dimensions(),
            Embeddings::Router(router) => router.dimensions,
        }
    }

    pub fn model_name(&self) -> &str {
        match self {
            Embeddings::Local(embedder) => embedder.model_name(),
            Embeddings::Router(router) => &router.model,
        }
    }
}
