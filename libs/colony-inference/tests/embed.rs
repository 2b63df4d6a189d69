//! The embedding model against vectors from the Python sentence-transformers recipe, and the
//! queue in front of it. Uses the real model from `make models`; nothing is mocked.

use std::path::PathBuf;
use std::sync::OnceLock;

use colony_inference::embed::{EmbedConfig, Embedder, MiniLm};
use colony_inference::{InferenceError, Loading, ModelError, workspace_models_dir};
use serde::Deserialize;

fn model_dir() -> PathBuf {
    workspace_models_dir().join("all-minilm-l6-v2")
}

/// Loaded once for the whole file: every test reads it through `&self`.
fn model() -> &'static MiniLm {
    static MODEL: OnceLock<MiniLm> = OnceLock::new();
    MODEL.get_or_init(|| {
        MiniLm::load(&EmbedConfig::new(model_dir()))
            .unwrap_or_else(|err| panic!("the embedding model must load: {err}"))
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A scratch directory of this test process, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("colony-embed-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a scratch dir");
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Deserialize)]
struct Reference {
    model: String,
    sentences: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

#[test]
fn vectors_match_the_sentence_transformers_reference() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/minilm_reference.json");
    let text = std::fs::read_to_string(&path).expect("the committed reference vectors");
    let reference: Reference = serde_json::from_str(&text).expect("reference JSON");
    assert_eq!(reference.model, "all-minilm-l6-v2");
    assert_eq!(reference.sentences.len(), reference.vectors.len());

    let sentences: Vec<&str> = reference.sentences.iter().map(String::as_str).collect();
    let ours = model()
        .embed(&sentences)
        .expect("embed the reference sentences");
    let mut lowest = f32::MAX;
    for ((sentence, expected), got) in sentences.iter().zip(&reference.vectors).zip(&ours) {
        let similarity = cosine(expected, got);
        println!(
            "cosine {similarity:.7}, max |difference| {:.2e}: {sentence:.50}",
            max_difference(expected, got)
        );
        assert!(similarity >= 0.99, "cosine {similarity} for {sentence:?}");
        lowest = lowest.min(similarity);
    }
    println!("minimum cosine against the reference: {lowest:.7}");
}

#[test]
fn vectors_have_384_dimensions_and_unit_length() {
    assert_eq!(model().dimensions(), 384);
    let vectors = model()
        .embed(&[
            "hello",
            "",
            "A somewhat longer sentence about queues and workers.",
        ])
        .expect("embed");
    assert_eq!(vectors.len(), 3);
    for vector in &vectors {
        assert_eq!(vector.len(), 384);
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
}

#[test]
fn a_batch_gives_the_vectors_of_one_at_a_time() {
    let texts = [
        "short",
        "The orchestrator hands tasks to agent workers over the bus.",
        "Les élèves ont réussi l'examen 🎉",
        "Padding to the longest text in a batch must not change any vector, however short.",
        "a b",
    ];
    let batched = model().embed(&texts).expect("embed as a batch");
    for (text, in_batch) in texts.iter().zip(&batched) {
        let alone = model().embed(&[text]).expect("embed alone");
        let difference = max_difference(&alone[0], in_batch);
        assert!(
            difference < 1e-4,
            "{text:?} differs by {difference} in a batch"
        );
    }
}

#[test]
fn texts_longer_than_the_limit_are_truncated() {
    let long = "word ".repeat(2000);
    let vectors = model()
        .embed(&[&long, "x"])
        .expect("a long text is truncated, not refused");
    assert_eq!(vectors[0].len(), 384);
}

#[test]
fn an_empty_request_is_invalid() {
    let err = model().embed(&[]).expect_err("no texts");
    assert!(matches!(err, InferenceError::InvalidRequest(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedder_answers_concurrent_callers_with_their_own_vectors_in_order() {
    let embedder = Embedder::start(EmbedConfig::new(model_dir())).expect("start the embedder");
    assert_eq!(embedder.dimensions(), 384);
    assert_eq!(embedder.model_name(), "all-minilm-l6-v2");

    let requests: Vec<Vec<String>> = (0..12)
        .map(|caller| {
            (0..=caller % 4)
                .map(|item| format!("caller {caller} asks about item {item} of the colony"))
                .collect()
        })
        .collect();
    let mut callers = tokio::task::JoinSet::new();
    for (caller, texts) in requests.iter().cloned().enumerate() {
        let embedder = embedder.clone();
        callers.spawn(async move { (caller, embedder.embed(texts).await) });
    }
    let mut answered = 0;
    while let Some(joined) = callers.join_next().await {
        let (caller, result) = joined.expect("caller task");
        let vectors = result.expect("embed through the queue");
        let texts: Vec<&str> = requests[caller].iter().map(String::as_str).collect();
        let expected = model().embed(&texts).expect("embed directly");
        assert_eq!(vectors.len(), expected.len(), "caller {caller}");
        for (got, want) in vectors.iter().zip(&expected) {
            let difference = max_difference(got, want);
            assert!(
                difference < 1e-4,
                "caller {caller} got another vector ({difference})"
            );
        }
        answered += 1;
    }
    assert_eq!(answered, requests.len());

    let err = embedder.embed(Vec::new()).await.expect_err("no texts");
    assert!(matches!(err, InferenceError::InvalidRequest(_)), "{err}");
}

#[test]
fn a_missing_model_names_make_models() {
    let config = EmbedConfig::new("/nonexistent/all-minilm-l6-v2");
    let err = MiniLm::load(&config).err().expect("no model there");
    assert!(matches!(err, ModelError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("make models"), "{err}");

    let err = Embedder::start(config)
        .err()
        .expect("an eager start loads the model");
    assert!(err.to_string().contains("make models"), "{err}");
}

#[tokio::test]
async fn a_lazy_embedder_reports_a_missing_model_on_the_first_request() {
    let mut config = EmbedConfig::new("/nonexistent/all-minilm-l6-v2");
    config.loading = Loading::Lazy;
    let embedder = Embedder::start(config).expect("a lazy start does not load");
    assert_eq!(embedder.dimensions(), 384);
    let err = embedder
        .embed(vec!["hello".into()])
        .await
        .expect_err("no model there");
    assert!(
        matches!(err, InferenceError::Model(ModelError::Missing { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("make models"), "{err}");
}

#[test]
fn corrupt_weights_are_reported_as_corrupt() {
    let scratch = ScratchDir::new("corrupt");
    let dir = scratch.0.join("all-minilm-l6-v2");
    std::fs::create_dir_all(&dir).expect("model dir");
    for file in ["tokenizer.json", "config.json"] {
        std::fs::copy(model_dir().join(file), dir.join(file)).expect("copy a model file");
    }
    std::fs::write(dir.join("model.safetensors"), b"<html>404 not found</html>").expect("write");
    let err = MiniLm::load(&EmbedConfig::new(&dir))
        .err()
        .expect("garbage weights");
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("make models"), "{text}");
    assert!(text.contains("model.safetensors"), "{text}");
}
