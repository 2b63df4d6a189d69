//! The local chat model against the real SmolLM2 GGUF (`make models` fetches it).

use std::path::PathBuf;

use colony_inference::chat::{
    ChatConfig, ChatEvent, ChatMessage, ChatModel, ChatRequest, FinishReason, LocalChat,
};
use colony_inference::{DEFAULT_CHAT_MODEL, InferenceError, ModelError, workspace_models_dir};

fn model_path() -> PathBuf {
    let path = workspace_models_dir().join(DEFAULT_CHAT_MODEL);
    assert!(
        path.is_file(),
        "{} is missing: run `make models` first",
        path.display()
    );
    path
}

fn config() -> ChatConfig {
    // One thread: tests run side by side on a small machine, and llama.cpp's threads spin.
    ChatConfig {
        threads: 1,
        context_tokens: 1024,
        ..ChatConfig::new(model_path())
    }
}

fn model() -> ChatModel {
    ChatModel::load(&config()).expect("the chat model loads")
}

fn ask(question: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::new("system", "You are a helpful assistant."),
            ChatMessage::new("user", question),
        ],
        max_tokens: Some(max_tokens),
        ..ChatRequest::default()
    }
}

#[test]
fn tokenizer_round_trips_unicode_and_special_tokens() {
    let model = model();
    let text = "Grüße aus Zürich — naïve café, 東京 🎉\n\tdigits 12345";
    let tokens = model.tokenize(text, false);
    assert!(!tokens.is_empty());
    assert_eq!(model.detokenize(&tokens), text);

    let marked = "<|im_start|>user\nhello<|im_end|>";
    let special = model.tokenize(marked, true);
    let plain = model.tokenize(marked, false);
    // Read as special, each marker is one token; read as text, it is several.
    assert!(special.len() < plain.len(), "{special:?} vs {plain:?}");
    assert_eq!(model.detokenize(&special), marked);
    let start = model.tokenize("<|im_start|>", true);
    assert_eq!(start.len(), 1, "<|im_start|> is a single special token");
    assert_eq!(special[0], start[0]);
}

#[test]
fn prompt_uses_the_models_chatml_template() {
    let model = model();
    let prompt = model
        .render_prompt(&[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi!"),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Name a colour."),
        ])
        .expect("template applies");
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let err = model.render_prompt(&[]).expect_err("no messages");
    assert!(matches!(err, InferenceError::InvalidRequest(_)), "{err}");
}

#[test]
fn greedy_and_seeded_generation_are_repeatable_and_usage_is_exact() {
    let mut model = model();
    let request = ask("Write one sentence about the sea.", 24);
    let first = model.complete(&request).expect("answer");
    let second = model.complete(&request).expect("answer");
    assert!(!first.text.trim().is_empty(), "real text: {:?}", first.text);
    assert_eq!(first, second, "greedy generation is deterministic");

    // Usage: the prompt as the model read it, the answer token by token.
    let prompt = model.render_prompt(&request.messages).expect("template");
    assert_eq!(
        first.usage.prompt_tokens as usize,
        model.tokenize(&prompt, true).len()
    );
    let long = model
        .complete(&ask("Tell me a long story about a dragon.", 8))
        .expect("answer");
    assert_eq!(long.usage.completion_tokens, 8);
    assert_eq!(long.usage.finish, FinishReason::Length);

    let sampled = ChatRequest {
        temperature: Some(0.9),
        top_p: Some(0.95),
        seed: Some(42),
        ..ask("Name three animals.", 16)
    };
    let a = model.complete(&sampled).expect("answer");
    let b = model.complete(&sampled).expect("answer");
    assert_eq!(a.text, b.text, "the same seed samples the same answer");
}

#[test]
fn stop_sequence_ends_the_answer_before_it() {
    let mut model = model();
    let request = ask("Count from one to ten in words, separated by commas.", 40);
    let full = model.complete(&request).expect("answer");
    // Stop at the third word of the free answer.
    let word = full
        .text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 3)
        .nth(2)
        .expect("an answer of several words")
        .to_owned();
    let cut = full.text.find(&word).expect("the word is in the answer");
    let stopped = model
        .complete(&ChatRequest {
            stop: vec![word.clone(), "never-appears".into()],
            ..request
        })
        .expect("answer");
    assert_eq!(stopped.text, full.text[..cut], "stop {word:?}");
    assert_eq!(stopped.usage.finish, FinishReason::Stop);
    assert!(stopped.usage.completion_tokens < full.usage.completion_tokens);
}

#[test]
fn overflowing_prompt_is_refused_with_token_counts() {
    let mut model = ChatModel::load(&ChatConfig {
        context_tokens: 64,
        ..config()
    })
    .expect("loads");
    let err = model
        .complete(&ask(&"word ".repeat(200), 8))
        .expect_err("too long");
    assert!(
        matches!(
            err,
            InferenceError::ContextOverflow {
                context_tokens: 64,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_gives_the_same_text_as_a_whole_answer() {
    let chat = LocalChat::start(config()).expect("starts");
    let request = ask("Why is the sky blue? Answer briefly.", 32);
    let mut stream = chat.stream(request.clone()).expect("queued");
    let mut pieces = Vec::new();
    let usage = loop {
        match stream.next().await.expect("an event").expect("no error") {
            ChatEvent::Text(piece) => pieces.push(piece),
            ChatEvent::Done(usage) => break usage,
        }
    };
    assert!(stream.next().await.is_none(), "nothing after Done");
    assert!(pieces.len() > 1, "streamed in pieces: {pieces:?}");
    let whole = chat.complete(request).await.expect("answer");
    assert_eq!(pieces.concat(), whole.text);
    assert_eq!(usage, whole.usage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_generation_and_a_full_queue_refuses() {
    let chat = LocalChat::start(ChatConfig {
        queue_capacity: 1,
        ..config()
    })
    .expect("starts");
    let mut long = chat
        // Counting to 1,000 takes far longer than this test.
        .stream(ask("Count from 1 to 1000, one number per line.", 600))
        .expect("queued");
    assert!(matches!(long.next().await, Some(Ok(ChatEvent::Text(_)))));

    // The long answer is being generated; one more request may wait, the next is refused.
    let waiting = chat
        .stream(ask("Say hello.", 4))
        .expect("one request may wait");
    let refused = chat
        .stream(ask("Say hello.", 4))
        .err()
        .expect("queue is full");
    assert!(
        matches!(refused, InferenceError::QueueFull { capacity: 1, .. }),
        "{refused}"
    );

    // Going away stops the long answer: the waiting request is answered next, and the model
    // generated only a few tokens of the 600 it was asked for.
    drop(long);
    let answer = waiting.collect().await.expect("answered after the cancel");
    assert!(answer.usage.completion_tokens <= 4);
    assert!(
        chat.generated_tokens() < 100,
        "generation stopped early: {} tokens",
        chat.generated_tokens()
    );
}

#[test]
fn missing_or_corrupt_model_file_names_make_models() {
    let missing = ChatModel::load(&ChatConfig::new("/nonexistent/SmolLM2.gguf"))
        .err()
        .expect("missing");
    assert!(matches!(missing, ModelError::Missing { .. }));
    assert!(missing.to_string().contains("make models"), "{missing}");

    let dir = std::env::temp_dir().join(format!("colony-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(model_path()).expect("model");
    std::fs::write(&truncated, &bytes[..4096]).expect("write");
    let corrupt = ChatModel::load(&ChatConfig::new(&truncated))
        .err()
        .expect("truncated file");
    assert!(matches!(corrupt, ModelError::Corrupt { .. }), "{corrupt}");
    assert!(corrupt.to_string().contains("make models"), "{corrupt}");
    std::fs::remove_dir_all(&dir).ok();

    let lazy = LocalChat::start(ChatConfig {
        loading: colony_inference::Loading::Lazy,
        ..ChatConfig::new("/nonexistent/SmolLM2.gguf")
    })
    .expect("a lazy model starts without its file");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let err = runtime
        .block_on(lazy.complete(ask("hi", 4)))
        .expect_err("the first request reports the missing file");
    assert!(err.to_string().contains("make models"), "{err}");
}
