//! In-process service tests: the real gRPC server on port 0 against a fresh database.

mod common;

use std::time::Duration;

use colony_proto::v1;
use common::{Service, with_workspace_models};
use tonic::Code;

fn seqs(messages: &[v1::StoredMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn contents(messages: &[v1::StoredMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m.message.clone().unwrap_or_default().content)
        .collect()
}

#[tokio::test]
async fn append_then_list_round_trips_with_paging() {
    let mut service = Service::start(|_| {}).await;
    let appended = service
        .append(
            "acme",
            "s1",
            &[
                ("system", "be brief"),
                ("user", "hello there"),
                ("assistant", ""),
                ("tool", "{\"ok\":true}"),
                ("user", "thanks"),
            ],
        )
        .await
        .expect("append succeeds");
    assert_eq!(appended.message_count, 5);
    // 8/4=2, 11/4→3, 0→1 (floor of one), 11/4→3, 6/4→2.
    assert_eq!(appended.token_count, 2 + 3 + 1 + 3 + 2);

    let first = service
        .list("acme", "s1", 0, 2)
        .await
        .expect("list succeeds");
    assert_eq!(seqs(&first.messages), [1, 2]);
    assert_eq!(first.next_after_seq, 2);
    let stored = &first.messages[1];
    let message = stored
        .message
        .clone()
        .expect("a stored message has its message");
    assert_eq!(
        (message.role.as_str(), message.content.as_str()),
        ("user", "hello there")
    );
    assert_eq!(stored.token_count, 3);
    assert!(stored.created_at.is_some());

    let second = service
        .list("acme", "s1", 2, 2)
        .await
        .expect("list succeeds");
    assert_eq!(seqs(&second.messages), [3, 4]);
    assert_eq!(second.next_after_seq, 4);
    let last = service
        .list("acme", "s1", 4, 2)
        .await
        .expect("list succeeds");
    assert_eq!(seqs(&last.messages), [5]);
    assert_eq!(last.next_after_seq, 0, "no page after the last one");

    // An exact fit ends without an extra empty page.
    let exact = service
        .list("acme", "s1", 3, 2)
        .await
        .expect("list succeeds");
    assert_eq!(seqs(&exact.messages), [4, 5]);
    assert_eq!(exact.next_after_seq, 0);

    // page_size 0 means the default page (100): everything at once.
    let all = service
        .list("acme", "s1", 0, 0)
        .await
        .expect("list succeeds");
    assert_eq!(
        contents(&all.messages),
        ["be brief", "hello there", "", "{\"ok\":true}", "thanks"]
    );
    assert_eq!(all.next_after_seq, 0);

    let none = service
        .list("acme", "never-written", 0, 10)
        .await
        .expect("list succeeds");
    assert!(none.messages.is_empty());
    assert_eq!(none.next_after_seq, 0);

    let metrics = service.metrics().await;
    assert!(
        metrics
            .contains("colony_memory_operations_total{method=\"AppendMessages\",outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("colony_memory_messages_appended_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("colony_memory_operation_duration_seconds"),
        "{metrics}"
    );
    service.stop().await;
}

#[tokio::test]
async fn sequence_numbers_continue_across_appends() {
    let mut service = Service::start(|_| {}).await;
    let first = service
        .append("acme", "s1", &[("user", "one"), ("assistant", "two")])
        .await
        .expect("append succeeds");
    assert_eq!(first.message_count, 2);
    let second = service
        .append(
            "acme",
            "s1",
            &[("user", "three"), ("assistant", "four"), ("user", "five")],
        )
        .await
        .expect("append succeeds");
    assert_eq!(second.message_count, 5);
    // "three" is two tokens, "four" and "five" one each.
    assert_eq!(second.token_count, first.token_count + 2 + 1 + 1);
    let all = service.list_all("acme", "s1", 2).await;
    assert_eq!(seqs(&all), [1, 2, 3, 4, 5]);
    assert_eq!(contents(&all), ["one", "two", "three", "four", "five"]);
    service.stop().await;
}

#[tokio::test]
async fn concurrent_appends_get_gap_free_sequences() {
    let mut service = Service::start(|_| {}).await;
    let appends = (0..8).map(|i| {
        let mut client = service.client.clone();
        async move {
            client
                .append_messages(v1::AppendMessagesRequest {
                    tenant: "acme".into(),
                    session_id: "busy".into(),
                    messages: vec![
                        v1::ChatMessage {
                            role: "user".into(),
                            content: format!("{i}-a"),
                            ..Default::default()
                        },
                        v1::ChatMessage {
                            role: "assistant".into(),
                            content: format!("{i}-b"),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                })
                .await
                .expect("append succeeds");
        }
    });
    futures::future::join_all(appends).await;
    let all = service.list_all("acme", "busy", 1000).await;
    assert_eq!(seqs(&all), (1..=16).collect::<Vec<_>>());
    // Each append's two messages are adjacent: appends do not interleave.
    for pair in all.chunks(2) {
        let texts = contents(pair);
        assert_eq!(
            texts[0].trim_end_matches("-a"),
            texts[1].trim_end_matches("-b")
        );
    }
    service.stop().await;
}

#[tokio::test]
async fn tenants_never_see_each_others_sessions() {
    let mut service = Service::start(|_| {}).await;
    service
        .append("acme", "shared", &[("user", "acme secret")])
        .await
        .expect("append succeeds");
    let globex = service
        .append(
            "globex",
            "shared",
            &[("user", "globex one"), ("user", "globex two")],
        )
        .await
        .expect("append succeeds");
    // Same session id, separate sessions: globex's counts start from zero.
    assert_eq!(globex.message_count, 2);
    let acme = service
        .append("acme", "shared", &[("assistant", "acme reply")])
        .await
        .expect("append succeeds");
    assert_eq!(acme.message_count, 2);

    let acme_messages = service.list_all("acme", "shared", 10).await;
    assert_eq!(contents(&acme_messages), ["acme secret", "acme reply"]);
    assert_eq!(seqs(&acme_messages), [1, 2]);
    let globex_messages = service.list_all("globex", "shared", 10).await;
    assert_eq!(contents(&globex_messages), ["globex one", "globex two"]);
    assert_eq!(seqs(&globex_messages), [1, 2]);
    let initech = service
        .list("initech", "shared", 0, 10)
        .await
        .expect("list succeeds");
    assert!(initech.messages.is_empty());
    service.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_rejected_with_clear_messages() {
    let mut service = Service::start(|config| {
        config.max_message_bytes = 16;
        config.max_messages_per_append = 3;
    })
    .await;
    // (tenant, session_id, messages, start of the expected message)
    type Case = (
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        &'static str,
    );
    let cases: [Case; 7] = [
        ("", "s", vec![("user", "x")], "tenant: is required"),
        ("acme", "", vec![("user", "x")], "session_id: is required"),
        (
            "acme",
            "s",
            vec![],
            "messages: at least one message is required",
        ),
        (
            "acme",
            "s",
            vec![("user", "x"), ("robot", "x")],
            "messages[1].role: unknown role \"robot\"",
        ),
        (
            "acme",
            "s",
            vec![("user", "seventeen bytes!!")],
            "messages[0].content: is 17 bytes; the limit is 16 bytes",
        ),
        (
            "acme",
            "s",
            vec![("user", "x"); 4],
            "messages: 4 messages exceed the limit of 3 per append",
        ),
        (
            "acme",
            "s",
            vec![("user", "nul\0byte")],
            "messages[0].content: must not contain NUL",
        ),
    ];
    for (tenant, session, messages, expected) in cases {
        let status = service
            .append(tenant, session, &messages)
            .await
            .expect_err("the append is rejected");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{expected}: {status:?}"
        );
        assert!(
            status.message().starts_with(expected),
            "expected {expected:?}, got {:?}",
            status.message()
        );
    }
    // Nothing was stored by the rejected appends.
    let listed = service
        .list("acme", "s", 0, 10)
        .await
        .expect("list succeeds");
    assert!(listed.messages.is_empty());

    let status = service
        .list("", "s", 0, 10)
        .await
        .expect_err("the list is rejected");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "tenant: is required");
    let status = service
        .list("acme", "", 0, 10)
        .await
        .expect_err("the list is rejected");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "session_id: is required");

    let metrics = service.metrics().await;
    assert!(
        metrics.contains(
            "colony_memory_operations_total{method=\"AppendMessages\",outcome=\"invalid_argument\"}"
        ),
        "{metrics}"
    );
    service.stop().await;
}

#[tokio::test]
async fn pages_stop_at_the_byte_budget() {
    let mut service = Service::start(|config| {
        config.max_message_bytes = 100;
        config.max_page_bytes = 250;
    })
    .await;
    let big = "x".repeat(100);
    service
        .append(
            "acme",
            "s",
            &[
                ("user", &big),
                ("user", &big),
                ("user", &big),
                ("user", &big),
            ],
        )
        .await
        .expect("append succeeds");
    let page = service
        .list("acme", "s", 0, 1000)
        .await
        .expect("list succeeds");
    assert_eq!(
        seqs(&page.messages),
        [1, 2],
        "two messages fit 250 bytes, three do not"
    );
    assert_eq!(page.next_after_seq, 2);
    let all = service.list_all("acme", "s", 1000).await;
    assert_eq!(seqs(&all), [1, 2, 3, 4]);
    service.stop().await;
}

#[tokio::test]
async fn readiness_turns_off_at_shutdown() {
    let service = Service::start(|_| {}).await;
    let readyz = format!("{}/readyz", service.http);
    colony_testkit::wait_http_ok(&readyz, Duration::from_secs(5)).await;
    service.runtime.shutdown.cancel();
    assert!(!service.runtime.is_ready());
    service.stop().await;
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_gives_unit_vectors_that_rank_meaning() {
    let mut service = Service::start(with_workspace_models).await;
    let response = service
        .client
        .embed(v1::EmbedRequest {
            tenant: "acme".into(),
            texts: vec![
                "The cat sits on the mat.".into(),
                "A kitten is lying on a rug.".into(),
                "Quarterly revenue grew by four percent.".into(),
            ],
        })
        .await
        .expect("embedded")
        .into_inner();
    assert_eq!(response.dimensions, 384);
    assert_eq!(response.model, "all-minilm-l6-v2");
    let vectors: Vec<&[f32]> = response
        .embeddings
        .iter()
        .map(|e| e.values.as_slice())
        .collect();
    assert_eq!(vectors.len(), 3);
    for vector in &vectors {
        assert_eq!(vector.len(), 384);
        assert!((dot(vector, vector) - 1.0).abs() < 1e-4, "unit length");
    }
    let similar = dot(vectors[0], vectors[1]);
    let unrelated = dot(vectors[0], vectors[2]);
    assert!(
        similar > unrelated + 0.2,
        "cat/kitten {similar} vs cat/revenue {unrelated}"
    );

    for (texts, field) in [
        (vec![], "texts"),
        (vec!["fine".to_owned(), "  ".to_owned()], "texts[1]"),
    ] {
        let status = service
            .client
            .embed(v1::EmbedRequest {
                tenant: "acme".into(),
                texts,
            })
            .await
            .expect_err("bad input");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_without_the_model_says_to_run_make_models() {
    let mut service = Service::start(|config| {
        config.embedding.model_dir = "/nonexistent/all-minilm-l6-v2".into();
    })
    .await;
    // Sessions work without the model (it loads on first use) ...
    service
        .append("acme", "s1", &[("user", "hello")])
        .await
        .expect("append works");
    // ... and Embed says what to do.
    let status = service
        .client
        .embed(v1::EmbedRequest {
            tenant: "acme".into(),
            texts: vec!["hello".into()],
        })
        .await
        .expect_err("no model");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("make models"),
        "{}",
        status.message()
    );
    service.stop().await;
}
