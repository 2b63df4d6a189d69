//! The local chat model: a GGUF file run in process by llama.cpp.
//!
//! [`ChatModel`] is the synchronous engine (prompt template, tokenizer, sampling, stop
//! sequences, exact token counts); [`LocalChat`] puts it on its own thread behind a bounded
//! queue and streams its text to async callers. Dropping a [`ChatStream`] cancels the request:
//! the model thread notices before its next token and moves on to the next request.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::worker::{Job, ModelQueue};
use crate::{InferenceError, Loading, ModelError, check_gguf, metrics};

const KIND: &str = "chat";

/// How the local chat model is run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    /// The GGUF file (`make models` fetches SmolLM2-135M-Instruct).
    pub model_path: PathBuf,
    /// CPU threads for prompt processing and generation; 0 means one per core.
    #[serde(default)]
    pub threads: usize,
    /// Tokens the context holds: prompt and answer together.
    #[serde(default = "default_context_tokens")]
    pub context_tokens: u32,
    /// Answer length when a request sets none.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// Requests that may wait for the model; one more is refused at once.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    #[serde(default)]
    pub loading: Loading,
    /// Divides the score of tokens already written among the last `repeat_last_n` (1.0: off).
    /// A small model decoding greedily otherwise falls into loops ("a tapestry of threads, a
    /// tapestry of threads, ..."); it applies to greedy and sampled answers alike and keeps
    /// greedy answers deterministic.
    #[serde(default = "default_repeat_penalty")]
    pub repeat_penalty: f32,
    #[serde(default = "default_repeat_last_n")]
    pub repeat_last_n: u32,
}

fn default_context_tokens() -> u32 {
    4096
}

fn default_max_tokens() -> u32 {
    512
}

fn default_queue_capacity() -> usize {
    16
}

fn default_repeat_penalty() -> f32 {
    1.1
}

fn default_repeat_last_n() -> u32 {
    64
}

impl ChatConfig {
    /// The defaults for the model at `model_path`.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            threads: 0,
            context_tokens: default_context_tokens(),
            default_max_tokens: default_max_tokens(),
            queue_capacity: default_queue_capacity(),
            loading: Loading::Eager,
            repeat_penalty: default_repeat_penalty(),
            repeat_last_n: default_repeat_last_n(),
        }
    }

    fn thread_count(&self) -> i32 {
        let threads = match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        i32::try_from(threads).unwrap_or(1)
    }
}

/// One message of a conversation. The role is rendered by the model's own chat template
/// (`system`, `user`, `assistant`; other roles are passed through as the template allows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// At most this many answer tokens (the config's default when `None`); clipped to the room
    /// left in the context.
    pub max_tokens: Option<u32>,
    /// The answer ends before the first of these strings; the string itself is not returned.
    pub stop: Vec<String>,
    /// 0 (or `None`) picks the most likely token every time: greedy and deterministic.
    pub temperature: Option<f32>,
    /// Nucleus sampling: only the smallest set of tokens whose probability adds up to this.
    pub top_p: Option<f32>,
    /// Makes sampling with a temperature repeatable.
    pub seed: Option<u64>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn or a stop sequence appeared.
    Stop,
    /// `max_tokens` (or the context) ran out.
    Length,
    /// The caller went away.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Exact token counts of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatUsage {
    /// Tokens of the rendered prompt, as the model read them.
    pub prompt_tokens: u32,
    /// Tokens the model generated for the answer (the end-of-turn token is not counted; tokens
    /// that formed a stop sequence are, since the model produced them).
    pub completion_tokens: u32,
    pub finish: FinishReason,
}

/// Where the time of the last answer went: reading the prompt, then writing the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChatTimings {
    pub prompt: Duration,
    pub generation: Duration,
}

/// A streamed piece of an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// More answer text (always whole UTF-8 characters).
    Text(String),
    /// The answer is complete.
    Done(ChatUsage),
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatCompletion {
    pub text: String,
    pub usage: ChatUsage,
}

/// llama.cpp's process-wide state: it may be initialised once per process.
fn backend() -> Result<&'static LlamaBackend, ModelError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|err| err.to_string())
        })
        .as_ref()
        .map_err(|reason| ModelError::Load {
            what: KIND,
            reason: reason.clone(),
        })
}

/// The synchronous engine: one model, one context, one request at a time.
pub struct ChatModel {
    // The weights stay loaded until the process exits: the context borrows them for as long as
    // the model thread lives, and a model is loaded once per process in practice.
    model: &'static LlamaModel,
    context: LlamaContext<'static>,
    template: LlamaChatTemplate,
    name: String,
    context_tokens: u32,
    batch_tokens: usize,
    default_max_tokens: u32,
    repeat_penalty: f32,
    repeat_last_n: i32,
    last_timings: ChatTimings,
}

impl ChatModel {
    /// Loads the GGUF file and prepares a context. A missing or corrupt file gives an error
    /// that names `make models`.
    pub fn load(config: &ChatConfig) -> Result<Self, ModelError> {
        let path = &config.model_path;
        check_gguf(path, KIND)?;
        let backend = backend()?;
        let corrupt = |reason: String| ModelError::Corrupt {
            what: KIND,
            path: path.clone(),
            reason,
        };
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|err| corrupt(format!("llama.cpp could not load it: {err}")))?;
        let model: &'static LlamaModel = Box::leak(Box::new(model));
        let template = model
            .chat_template(None)
            .map_err(|err| corrupt(format!("it has no usable chat template: {err}")))?;
        let threads = config.thread_count();
        let batch_tokens = 512;
        let context_tokens = config.context_tokens.max(64);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(context_tokens))
            .with_n_batch(batch_tokens)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let context = model
            .new_context(backend, params)
            .map_err(|err| ModelError::Load {
                what: KIND,
                reason: format!("cannot create a context of {context_tokens} tokens: {err}"),
            })?;
        let name = path.file_stem().map_or_else(
            || "local".to_owned(),
            |stem| stem.to_string_lossy().into_owned(),
        );
        metrics::record_model_loaded(KIND, &name, model.size());
        tracing::info!(model = %name, threads, context_tokens, "local chat model loaded");
        Ok(Self {
            model,
            context,
            template,
            name,
            context_tokens,
            batch_tokens: batch_tokens as usize,
            default_max_tokens: config.default_max_tokens.max(1),
            repeat_penalty: config.repeat_penalty,
            repeat_last_n: i32::try_from(config.repeat_last_n).unwrap_or(i32::MAX),
            last_timings: ChatTimings::default(),
        })
    }

    /// The model's name: its file name without the extension.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long the last answer took to read its prompt and to generate.
    pub fn last_timings(&self) -> ChatTimings {
        self.last_timings
    }

    /// Tokens the context holds.
    pub fn context_tokens(&self) -> u32 {
        self.context_tokens
    }

    /// Token ids of `text`. With `special`, marker strings such as `<|im_start|>` become their
    /// single special tokens; without, they are read as plain text.
    pub fn tokenize(&self, text: &str, special: bool) -> Vec<i32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, special)
            .into_iter()
            .map(|token| token.0)
            .collect()
    }

    /// The text of token ids, special tokens written out.
    pub fn detokenize(&self, tokens: &[i32]) -> String {
        let tokens: Vec<LlamaToken> = tokens.iter().map(|&id| LlamaToken(id)).collect();
        let bytes = self.model.vocab().detokenize(&tokens, false, true);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The prompt for `messages` in the model's own chat template, ending where the assistant's
    /// answer begins.
    pub fn render_prompt(&self, messages: &[ChatMessage]) -> Result<String, InferenceError> {
        if messages.is_empty() {
            return Err(InferenceError::InvalidRequest(
                "a chat request needs at least one message".into(),
            ));
        }
        let chat = messages
            .iter()
            .map(|message| LlamaChatMessage::new(message.role.clone(), message.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| InferenceError::InvalidRequest(format!("unusable message: {err}")))?;
        self.model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|err| engine(format!("chat template failed: {err}")))
    }

    /// Answers `request`, handing each piece of text to `emit` as soon as it is certain not to
    /// be part of a stop sequence. `emit` returns `false` when the caller has gone away, which
    /// ends generation with [`FinishReason::Cancelled`]; so does `cancelled` returning `true`
    /// (checked before every model step).
    pub fn generate(
        &mut self,
        request: &ChatRequest,
        mut emit: impl FnMut(&str) -> bool,
        cancelled: impl Fn() -> bool,
    ) -> Result<ChatUsage, InferenceError> {
        let prompt = self.render_prompt(&request.messages)?;
        let vocab = self.model.vocab();
        let prompt_tokens = vocab.tokenize(prompt.as_bytes(), vocab.should_add_bos(), true);
        let capacity = self.context_tokens as usize;
        if prompt_tokens.len() >= capacity {
            return Err(InferenceError::ContextOverflow {
                prompt_tokens: prompt_tokens.len(),
                context_tokens: capacity,
            });
        }
        let room = capacity - prompt_tokens.len();
        let max_tokens = request.max_tokens.unwrap_or(self.default_max_tokens).max(1) as usize;
        let max_tokens = max_tokens.min(room);
        let mut sampler = self.sampler(request);

        self.last_timings = ChatTimings::default();
        let prompt_started = Instant::now();
        self.context.clear_kv_cache();
        let mut batch = LlamaBatch::new(self.batch_tokens, 1);
        let last = prompt_tokens.len() - 1;
        for (chunk_index, chunk) in prompt_tokens.chunks(self.batch_tokens).enumerate() {
            if cancelled() {
                return Ok(usage(&prompt_tokens, 0, FinishReason::Cancelled));
            }
            batch.clear();
            for (offset, &token) in chunk.iter().enumerate() {
                let position = chunk_index * self.batch_tokens + offset;
                batch
                    .add(token, to_pos(position), &[0], position == last)
                    .map_err(|err| engine(format!("batch: {err}")))?;
            }
            self.context
                .decode(&mut batch)
                .map_err(|err| engine(format!("prompt decode failed: {err}")))?;
        }
        ::metrics::counter!(metrics::TOKENS, "kind" => KIND, "phase" => "prompt")
            .increment(prompt_tokens.len() as u64);

        self.last_timings.prompt = prompt_started.elapsed();
        let generation_started = Instant::now();
        let mut text = StopScanner::new(&request.stop);
        let mut generated = 0usize;
        let mut position = prompt_tokens.len();
        let finish = loop {
            if cancelled() {
                break FinishReason::Cancelled;
            }
            let token = sampler.sample(&self.context, batch.n_tokens() - 1);
            if vocab.is_eog(token) {
                break FinishReason::Stop;
            }
            generated += 1;
            let piece = vocab.token_to_piece(token, false, None);
            match text.push(&piece) {
                Scan::Emit(ready) => {
                    if !ready.is_empty() && !emit(&ready) {
                        break FinishReason::Cancelled;
                    }
                }
                Scan::Stopped(ready) => {
                    if !ready.is_empty() {
                        emit(&ready);
                    }
                    break FinishReason::Stop;
                }
            }
            if generated >= max_tokens {
                break FinishReason::Length;
            }
            batch.clear();
            batch
                .add(token, to_pos(position), &[0], true)
                .map_err(|err| engine(format!("batch: {err}")))?;
            position += 1;
            self.context
                .decode(&mut batch)
                .map_err(|err| engine(format!("decode failed: {err}")))?;
        };
        self.last_timings.generation = generation_started.elapsed();
        if finish != FinishReason::Cancelled {
            let rest = text.finish();
            if !rest.is_empty() {
                emit(&rest);
            }
        }
        ::metrics::counter!(metrics::TOKENS, "kind" => KIND, "phase" => "generated")
            .increment(generated as u64);
        Ok(usage(&prompt_tokens, generated, finish))
    }

    /// The repetition penalty, then greedy without a temperature; otherwise top-p,
    /// temperature, then a seeded draw.
    fn sampler(&self, request: &ChatRequest) -> LlamaSampler {
        let mut chain = Vec::new();
        if self.repeat_penalty != 1.0 && self.repeat_last_n != 0 {
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab(),
                self.repeat_last_n,
                self.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        let temperature = request.temperature.unwrap_or(0.0);
        if temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            // llama.cpp draws a fresh random seed for this value.
            const RANDOM_SEED: u32 = u32::MAX;
            let seed = request.seed.map_or(RANDOM_SEED, |seed| {
                // Fold the 64-bit seed so distinct seeds stay distinct in the common small range.
                (seed ^ (seed >> 32)) as u32
            });
            let top_p = request.top_p.unwrap_or(1.0).clamp(0.0, 1.0);
            chain.push(LlamaSampler::top_p(top_p, 1));
            chain.push(LlamaSampler::temp(temperature));
            chain.push(LlamaSampler::dist(seed));
        }
        LlamaSampler::chain_simple(chain)
    }

    /// Answers `request` as a whole (the same text [`ChatModel::generate`] streams).
    pub fn complete(&mut self, request: &ChatRequest) -> Result<ChatCompletion, InferenceError> {
        let mut text = String::new();
        let usage = self.generate(
            request,
            |piece| {
                text.push_str(piece);
                true
            },
            || false,
        )?;
        Ok(ChatCompletion { text, usage })
    }
}

fn usage(prompt: &[LlamaToken], generated: usize, finish: FinishReason) -> ChatUsage {
    ChatUsage {
        prompt_tokens: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
        completion_tokens: u32::try_from(generated).unwrap_or(u32::MAX),
        finish,
    }
}

fn to_pos(position: usize) -> i32 {
    i32::try_from(position).unwrap_or(i32::MAX)
}

fn engine(reason: String) -> InferenceError {
    InferenceError::Engine { kind: KIND, reason }
}

/// Turns token bytes into text that is safe to hand out: whole UTF-8 characters only, and
/// nothing that might turn out to be the start of a stop sequence.
struct StopScanner<'a> {
    stops: &'a [String],
    /// Bytes of a character split across tokens.
    pending: Vec<u8>,
    /// Text not yet handed out, because it might begin a stop sequence.
    held: String,
}

enum Scan {
    /// This text may be handed out; generation goes on.
    Emit(String),
    /// A stop sequence appeared: this text precedes it, and generation ends.
    Stopped(String),
}

impl<'a> StopScanner<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            pending: Vec::new(),
            held: String::new(),
        }
    }

    fn push(&mut self, bytes: &[u8]) -> Scan {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(text) => text.len(),
            // An incomplete character at the end waits for the next token; invalid bytes in the
            // middle are replaced, as they can never become valid.
            Err(err) if err.error_len().is_none() => err.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let complete: Vec<u8> = self.pending.drain(..valid).collect();
        self.held.push_str(&String::from_utf8_lossy(&complete));

        let first_stop = self
            .stops
            .iter()
            .filter(|stop| !stop.is_empty())
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            let before = self.held[..at].to_owned();
            self.held.clear();
            self.pending.clear();
            return Scan::Stopped(before);
        }
        let keep = self.partial_stop_suffix();
        let ready_len = self.held.len() - keep;
        let rest = self.held.split_off(ready_len);
        Scan::Emit(std::mem::replace(&mut self.held, rest))
    }

    /// Length of the longest end of `held` that is the beginning of some stop sequence.
    fn partial_stop_suffix(&self) -> usize {
        let mut longest = 0;
        for stop in self.stops {
            for (boundary, _) in stop.char_indices().skip(1) {
                let prefix = &stop[..boundary];
                if boundary > longest && self.held.ends_with(prefix) {
                    longest = boundary;
                }
            }
        }
        longest
    }

    /// Everything still held, at the end of generation.
    fn finish(&mut self) -> String {
        let mut rest = std::mem::take(&mut self.held);
        rest.push_str(&String::from_utf8_lossy(&self.pending));
        self.pending.clear();
        rest
    }
}

/// A streamed answer: [`ChatEvent::Text`] pieces, then one [`ChatEvent::Done`] (or an error).
/// Dropping it cancels the request.
pub struct ChatStream {
    events: mpsc::Receiver<Result<ChatEvent, InferenceError>>,
}

impl ChatStream {
    /// The next event; `None` after `Done` or an error.
    pub async fn next(&mut self) -> Option<Result<ChatEvent, InferenceError>> {
        self.events.recv().await
    }

    /// Collects the whole answer.
    pub async fn collect(mut self) -> Result<ChatCompletion, InferenceError> {
        let mut text = String::new();
        while let Some(event) = self.next().await {
            match event? {
                ChatEvent::Text(piece) => text.push_str(&piece),
                ChatEvent::Done(usage) => return Ok(ChatCompletion { text, usage }),
            }
        }
        Err(InferenceError::Stopped { kind: KIND })
    }
}

struct ChatJob {
    request: ChatRequest,
    events: mpsc::Sender<Result<ChatEvent, InferenceError>>,
}

impl Job for ChatJob {
    fn refuse(self, error: InferenceError) {
        let _ = self.events.try_send(Err(error));
    }
}

/// The local chat model for async callers: one model thread, a bounded queue in front of it.
#[derive(Clone)]
pub struct LocalChat {
    queue: Arc<ModelQueue<ChatJob>>,
    name: String,
    context_tokens: u32,
    generated: Arc<AtomicU64>,
}

impl LocalChat {
    /// Starts the model thread. With [`Loading::Eager`] the model is loaded before this returns
    /// (and its error returned); with [`Loading::Lazy`] on the first request.
    pub fn start(config: ChatConfig) -> Result<Self, ModelError> {
        let name = config.model_path.file_stem().map_or_else(
            || "local".to_owned(),
            |stem| stem.to_string_lossy().into_owned(),
        );
        let context_tokens = config.context_tokens;
        let capacity = config.queue_capacity;
        let loading = config.loading;
        let generated = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&generated);
        let queue = ModelQueue::start(
            KIND,
            capacity,
            loading,
            move || ChatModel::load(&config),
            move |model: &mut ChatModel, job, _: &mut mpsc::Receiver<ChatJob>| {
                let tokens = serve(model, job);
                counter.fetch_add(tokens, Ordering::Relaxed);
            },
        )?;
        Ok(Self {
            queue: Arc::new(queue),
            name,
            context_tokens,
            generated,
        })
    }

    /// The model's name: its file name without the extension.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tokens the model's context holds (prompt and answer together).
    pub fn context_tokens(&self) -> u32 {
        self.context_tokens
    }

    /// Tokens generated so far by this model, cancelled answers included: shows how far a
    /// cancelled request got.
    pub fn generated_tokens(&self) -> u64 {
        self.generated.load(Ordering::Relaxed)
    }

    /// Queues `request` and streams its answer; a full queue is refused at once with
    /// [`InferenceError::QueueFull`].
    pub fn stream(&self, request: ChatRequest) -> Result<ChatStream, InferenceError> {
        let (events, receiver) = mpsc::channel(64);
        self.queue.submit(ChatJob { request, events })?;
        Ok(ChatStream { events: receiver })
    }

    /// Queues `request` and waits for the whole answer.
    pub async fn complete(&self, request: ChatRequest) -> Result<ChatCompletion, InferenceError> {
        self.stream(request)?.collect().await
    }
}

/// Answers one job; returns the tokens generated.
fn serve(model: &mut ChatModel, job: ChatJob) -> u64 {
    let ChatJob { request, events } = job;
    if events.is_closed() {
        return 0;
    }
    let result = model.generate(
        &request,
        |piece| {
            events
                .blocking_send(Ok(ChatEvent::Text(piece.to_owned())))
                .is_ok()
        },
        || events.is_closed(),
    );
    match result {
        Ok(usage) => {
            if usage.finish == FinishReason::Cancelled {
                tracing::debug!(
                    completion_tokens = usage.completion_tokens,
                    "local chat request cancelled"
                );
            } else {
                let _ = events.blocking_send(Ok(ChatEvent::Done(usage)));
            }
            u64::from(usage.completion_tokens)
        }
        Err(err) => {
            let _ = events.blocking_send(Err(err));
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        let mut scanner = StopScanner::new(&stops);
        let mut out = String::new();
        for piece in pieces {
            match scanner.push(piece.as_bytes()) {
                Scan::Emit(text) => out.push_str(&text),
                Scan::Stopped(text) => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        out.push_str(&scanner.finish());
        (out, false)
    }

    #[test]
    fn stop_sequence_split_across_tokens_is_cut() {
        assert_eq!(
            scan_all(&["END"], &["one two E", "N", "D three"]),
            ("one two ".to_owned(), true)
        );
    }

    #[test]
    fn partial_stop_that_does_not_complete_is_released() {
        assert_eq!(
            scan_all(&["END"], &["one E", "N", "o"]),
            ("one ENo".to_owned(), false)
        );
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(scan_all(&["b", "a"], &["xxab"]), ("xx".to_owned(), true));
    }

    #[test]
    fn characters_split_across_tokens_are_held_until_whole() {
        let bytes = "é".as_bytes();
        let stops: Vec<String> = Vec::new();
        let mut scanner = StopScanner::new(&stops);
        match scanner.push(&bytes[..1]) {
            Scan::Emit(text) => assert_eq!(text, ""),
            Scan::Stopped(_) => panic!("no stops"),
        }
        match scanner.push(&bytes[1..]) {
            Scan::Emit(text) => assert_eq!(text, "é"),
            Scan::Stopped(_) => panic!("no stops"),
        }
    }
}
