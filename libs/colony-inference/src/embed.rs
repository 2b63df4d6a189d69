//! Sentence embeddings with all-MiniLM-L6-v2, run in process on candle tensors.
//!
//! [`MiniLm`] is the synchronous model: tokenise, run the BERT encoder (`embed/bert.rs`: candle's
//! maths with the passes between the multiplies fused), mean-pool the token vectors
//! over the attention mask and L2-normalise — the same recipe as the sentence-transformers
//! library, so vectors from it and from Python are interchangeable. [`Embedder`] puts one
//! `MiniLm` on its own thread behind a bounded queue and batches concurrent requests into one
//! forward pass, which is where most of the throughput comes from on a small CPU.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use serde::{Deserialize, Serialize};
use tokenizers::{Tokenizer, TruncationParams};
use tokio::sync::{mpsc, oneshot};

use crate::worker::{Job, ModelQueue};

mod bert;
use crate::{InferenceError, Loading, ModelError, metrics, require_file};

/// The `kind` label of this engine in errors, metrics and thread names.
const KIND: &str = "embedding";

/// all-MiniLM-L6-v2's width, assumed when a lazily loaded model's config.json cannot be read yet.
const DEFAULT_DIMENSIONS: usize = 384;

const WEIGHTS_FILE: &str = "model.safetensors";
const TOKENIZER_FILE: &str = "tokenizer.json";
const CONFIG_FILE: &str = "config.json";

/// Where the embedding model lives and how it is served.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedConfig {
    /// The directory holding `model.safetensors`, `tokenizer.json` and `config.json`.
    pub model_dir: PathBuf,
    /// Most texts run through the encoder in one forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longer inputs are truncated to this many tokens (sentence-transformers uses 256 for this
    /// model; the model itself stops at its 512 positions).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Requests that may wait for the model before new ones are refused.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Load the model at start (the default) or on the first request.
    #[serde(default)]
    pub loading: Loading,
}

fn default_batch_size() -> usize {
    32
}

fn default_max_tokens() -> usize {
    256
}

fn default_queue_capacity() -> usize {
    256
}

impl EmbedConfig {
    /// The defaults for the model in `model_dir`.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            batch_size: default_batch_size(),
            max_tokens: default_max_tokens(),
            queue_capacity: default_queue_capacity(),
            loading: Loading::default(),
        }
    }

    /// The name the model is reported under: its directory's name.
    fn model_name(&self) -> String {
        self.model_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| KIND.to_owned())
    }
}

/// One text after tokenisation: what the encoder needs of it.
struct Tokens {
    ids: Vec<u32>,
}

/// all-MiniLM-L6-v2 in memory: the synchronous model. A call runs on the caller's thread (and
/// rayon's pool, for the matrix multiplies) until the vectors are ready; [`Embedder`] gives the
/// model a thread of its own so that async callers never block a runtime worker on it.
pub struct MiniLm {
    encoder: bert::Encoder,
    tokenizer: Tokenizer,
    device: Device,
    dimensions: usize,
    batch_size: usize,
}

impl MiniLm {
    /// Loads the model from `config.model_dir`. An absent file is [`ModelError::Missing`], one
    /// that cannot be parsed (or lacks the model's tensors) is [`ModelError::Corrupt`].
    pub fn load(config: &EmbedConfig) -> Result<Self, ModelError> {
        let weights_path = config.model_dir.join(WEIGHTS_FILE);
        let tokenizer_path = config.model_dir.join(TOKENIZER_FILE);
        let config_path = config.model_dir.join(CONFIG_FILE);
        for path in [&config_path, &tokenizer_path, &weights_path] {
            require_file(path, KIND)?;
        }

        let bert_config: BertConfig = read_config(&config_path)?;

        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|err| corrupt(&tokenizer_path, err.to_string()))?;
        // The shipped tokenizer pads every input to 128 tokens; padding is done here per batch
        // instead (to the longest text in it), so short sentences cost what they are.
        tokenizer.with_padding(None);
        // At least the two positions of [CLS] and [SEP] (the tokenizer subtracts them from the
        // limit), at most the positions the model has embeddings for.
        let max_tokens = config
            .max_tokens
            .clamp(2, bert_config.max_position_embeddings);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|err| corrupt(&tokenizer_path, format!("cannot truncate with it: {err}")))?;

        // Read into memory rather than memory-mapped: mapping a file is `unsafe` (another
        // process could change it underneath), and the tensors are copied out of the buffer, which
        // is dropped as soon as the model is built.
        let weights = std::fs::read(&weights_path)
            .map_err(|err| corrupt(&weights_path, format!("cannot read it: {err}")))?;
        let device = Device::Cpu;
        let vars = VarBuilder::from_slice_safetensors(&weights, DType::F32, &device)
            .map_err(|err| corrupt(&weights_path, err.to_string()))?;
        let encoder = bert::Encoder::load(vars, &bert_config)
            .map_err(|err| corrupt(&weights_path, format!("it does not hold this model: {err}")))?;

        let name = config.model_name();
        metrics::record_model_loaded(KIND, &name, weights.len() as u64);
        tracing::info!(
            model = %name,
            bytes = weights.len(),
            dimensions = bert_config.hidden_size,
            "embedding model loaded"
        );
        Ok(Self {
            encoder,
            tokenizer,
            device,
            dimensions: bert_config.hidden_size,
            batch_size: config.batch_size.max(1),
        })
    }

    /// The length of every vector this model returns (384).
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// One unit-length vector per text, in the order of `texts`: the mean of the token vectors
    /// over the attention mask, L2-normalised. Texts longer than `max_tokens` are truncated.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, InferenceError> {
        Ok(self.embed_counted(texts)?.vectors)
    }

    /// [`MiniLm::embed`], with the number of tokens the model read for each text.
    pub fn embed_counted(&self, texts: &[&str]) -> Result<Embedded, InferenceError> {
        if texts.is_empty() {
            return Err(InferenceError::InvalidRequest(
                "no input to embed: send at least one text".into(),
            ));
        }
        let tokens = texts
            .iter()
            .map(|text| {
                self.tokenizer
                    .encode_fast(*text, true)
                    .map(|encoding| Tokens {
                        ids: encoding.get_ids().to_vec(),
                    })
                    .map_err(|err| engine(format!("cannot tokenise the input: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let token_count: usize = tokens.iter().map(|text| text.ids.len()).sum();
        ::metrics::counter!(metrics::TOKENS, "kind" => KIND, "phase" => "prompt")
            .increment(token_count as u64);

        // Texts of similar length go in the same batch, so little of any batch is padding.
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&index| tokens[index].ids.len());
        let mut vectors = vec![Vec::new(); tokens.len()];
        for chunk in order.chunks(self.batch_size) {
            let batch: Vec<&Tokens> = chunk.iter().map(|&index| &tokens[index]).collect();
            let embedded = self
                .forward(&batch)
                .map_err(|err| engine(format!("the forward pass failed: {err}")))?;
            for (&index, vector) in chunk.iter().zip(embedded) {
                vectors[index] = vector;
            }
        }
        let tokens = tokens
            .iter()
            .map(|text| u32::try_from(text.ids.len()).unwrap_or(u32::MAX))
            .collect();
        Ok(Embedded { vectors, tokens })
    }

    /// Runs one batch through the encoder, padded to its longest text, and pools it.
    fn forward(&self, batch: &[&Tokens]) -> candle_core::Result<Vec<Vec<f32>>> {
        let rows = batch.len();
        let width = batch.iter().map(|text| text.ids.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; rows * width];
        // Added to the attention scores: padded keys get the lowest float, so their weight after
        // the softmax is exactly zero and a text's vector does not depend on its batch.
        let mut mask_bias = vec![f32::MIN; rows * width];
        for (row, text) in batch.iter().enumerate() {
            let start = row * width;
            ids[start..start + text.ids.len()].copy_from_slice(&text.ids);
            mask_bias[start..start + text.ids.len()].fill(0.0);
        }
        let ids = Tensor::from_vec(ids, (rows, width), &self.device)?;
        let mask_bias = Tensor::from_vec(mask_bias, (rows, width), &self.device)?;
        // One flat copy out of the tensor; pooling reads each text's rows from it in place.
        let hidden = self
            .encoder
            .forward(&ids, &mask_bias)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(batch
            .iter()
            .zip(hidden.chunks_exact(width * self.dimensions))
            .map(|(text, states)| {
                mean_pool_normalised(&states[..text.ids.len() * self.dimensions], self.dimensions)
            })
            .collect())
    }
}

/// The mean of the real tokens' vectors (padding excluded), scaled to unit length. The norm is
/// floored at 1e-12 as in PyTorch's `normalize`, so a zero vector stays zero instead of NaN.
fn mean_pool_normalised(states: &[f32], width: usize) -> Vec<f32> {
    let mut mean = vec![0f32; width];
    for state in states.chunks_exact(width) {
        for (sum, value) in mean.iter_mut().zip(state) {
            *sum += value;
        }
    }
    let count = (states.len() / width).max(1) as f32;
    mean.iter_mut().for_each(|value| *value /= count);
    let norm = mean.iter().map(|value| value * value).sum::<f32>().sqrt();
    let norm = norm.max(1e-12);
    mean.iter_mut().for_each(|value| *value /= norm);
    mean
}

fn read_config(path: &Path) -> Result<BertConfig, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| corrupt(path, format!("cannot read it: {err}")))?;
    serde_json::from_str(&text).map_err(|err| corrupt(path, format!("not a BERT config: {err}")))
}

fn corrupt(path: &Path, reason: String) -> ModelError {
    ModelError::Corrupt {
        what: KIND,
        path: path.to_path_buf(),
        reason,
    }
}

fn engine(reason: String) -> InferenceError {
    InferenceError::Engine { kind: KIND, reason }
}

/// Vectors and the token count behind each.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One unit-length vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model read for each text (after truncation), in order.
    pub tokens: Vec<u32>,
}

impl Embedded {
    /// Tokens read for all the texts together.
    pub fn total_tokens(&self) -> u64 {
        self.tokens.iter().map(|&count| u64::from(count)).sum()
    }
}

type Reply = oneshot::Sender<Result<Embedded, InferenceError>>;

/// One request on the model thread's queue: its texts and where the vectors go.
pub(crate) struct EmbedJob {
    texts: Vec<String>,
    reply: Reply,
}

impl Job for EmbedJob {
    fn refuse(self, error: InferenceError) {
        // A caller that went away does not need the error either.
        let _ = self.reply.send(Err(error));
    }
}

/// The embedding model on its own thread, shared by cheap clones: async callers queue texts and
/// await their vectors; concurrent requests are batched into one forward pass.
#[derive(Clone)]
pub struct Embedder {
    queue: Arc<ModelQueue<EmbedJob>>,
    model: Arc<str>,
    dimensions: usize,
}

impl Embedder {
    /// Starts the model thread. With [`Loading::Eager`] the model is loaded now and a missing or
    /// corrupt file is returned here; with [`Loading::Lazy`] it is loaded on the first request.
    pub fn start(config: EmbedConfig) -> Result<Self, ModelError> {
        let model: Arc<str> = config.model_name().into();
        // Read now, so that a lazy embedder can report its width before it loads (callers size
        // storage by it); all-MiniLM-L6-v2's 384 when config.json cannot be read yet.
        let dimensions = read_config(&config.model_dir.join(CONFIG_FILE))
            .map_or(DEFAULT_DIMENSIONS, |bert| bert.hidden_size);
        let batch_size = config.batch_size.max(1);
        let loading = config.loading;
        let capacity = config.queue_capacity;
        let queue = ModelQueue::start(
            KIND,
            capacity,
            loading,
            move || MiniLm::load(&config),
            move |model: &mut MiniLm, job, queue| serve(model, job, queue, batch_size),
        )?;
        Ok(Self {
            queue: Arc::new(queue),
            model,
            dimensions,
        })
    }

    /// One unit-length vector per text, in order. Refused at once with
    /// [`InferenceError::QueueFull`] when too many requests are already waiting.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, InferenceError> {
        Ok(self.embed_counted(texts).await?.vectors)
    }

    /// [`Embedder::embed`], with the number of tokens the model read for each text.
    pub async fn embed_counted(&self, texts: Vec<String>) -> Result<Embedded, InferenceError> {
        if texts.is_empty() {
            return Err(InferenceError::InvalidRequest(
                "no input to embed: send at least one text".into(),
            ));
        }
        let (reply, answer) = oneshot::channel();
        self.queue.submit(EmbedJob { texts, reply })?;
        answer
            .await
            .map_err(|_| InferenceError::Stopped { kind: KIND })?
    }

    /// The length of every vector (384 for all-MiniLM-L6-v2).
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The model's name: its directory's name, e.g. `all-minilm-l6-v2`.
    pub fn model_name(&self) -> &str {
        &self.model
    }
}

/// Answers `first` together with whatever else is already waiting, up to `batch_size` texts, so
/// that concurrent small requests share forward passes instead of queueing one behind the other.
fn serve(
    model: &mut MiniLm,
    first: EmbedJob,
    queue: &mut mpsc::Receiver<EmbedJob>,
    batch_size: usize,
) {
    let mut texts = first.texts.len();
    let mut jobs = vec![first];
    while texts < batch_size {
        match queue.try_recv() {
            Ok(job) => {
                texts += job.texts.len();
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
    metrics::gauge_queue_depth(KIND, queue.len());
    // A caller that has gone away (timed out, disconnected) is not worth a forward pass.
    jobs.retain(|job| !job.reply.is_closed());
    if jobs.is_empty() {
        return;
    }
    let inputs: Vec<&str> = jobs
        .iter()
        .flat_map(|job| job.texts.iter().map(String::as_str))
        .collect();
    match model.embed_counted(&inputs) {
        Ok(embedded) => {
            let mut vectors = embedded.vectors.into_iter();
            let mut tokens = embedded.tokens.into_iter();
            for job in jobs {
                let count = job.texts.len();
                let own = Embedded {
                    vectors: vectors.by_ref().take(count).collect(),
                    tokens: tokens.by_ref().take(count).collect(),
                };
                let _ = job.reply.send(Ok(own));
            }
        }
        Err(err) => {
            for job in jobs {
                let _ = job.reply.send(Err(err.clone()));
            }
        }
    }
}
