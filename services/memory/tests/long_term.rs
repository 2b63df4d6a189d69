//! Long-term memory against the real PostgreSQL and NATS: isolation of tenants across every
//! method, merging of near-duplicates, search ranking and filters, TTL expiry on a controlled
//! clock, the index after a restart, two replicas converging, session compression, strategy
//! pruning, the replay log and bad input.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use colony_memory::Config;
use colony_proto::v1;
use colony_runtime::clock::{ManualClock, SystemClock};
use colony_testkit::eventually;
use common::{Backing, Service, with_workspace_models};
use sqlx::Row;
use tonic::Code;

const DIMENSIONS: usize = 384;

/// A deterministic unit vector for `seed` (xorshift), far from every other seed's.
fn unit(seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut values: Vec<f32> = (0..DIMENSIONS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    values.iter_mut().for_each(|v| *v /= norm);
    values
}

/// `base` nudged towards `towards` so that their cosine is about `1 - amount`-ish.
fn blend(base: &[f32], towards: &[f32], amount: f32) -> Vec<f32> {
    let mut values: Vec<f32> = base
        .iter()
        .zip(towards)
        .map(|(a, b)| a * (1.0 - amount) + b * amount)
        .collect();
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    values.iter_mut().for_each(|v| *v /= norm);
    values
}

fn scope(kind: v1::ScopeKind, id: &str) -> Option<v1::Scope> {
    Some(v1::Scope {
        kind: kind.into(),
        id: id.into(),
    })
}

fn tenant_scope() -> Option<v1::Scope> {
    scope(v1::ScopeKind::Tenant, "")
}

fn input(text: &str, embedding: Vec<f32>) -> v1::MemoryInput {
    v1::MemoryInput {
        scope: tenant_scope(),
        text: text.into(),
        embedding,
        ..Default::default()
    }
}

async fn write(
    service: &mut Service,
    tenant: &str,
    memories: Vec<v1::MemoryInput>,
) -> Result<Vec<v1::WriteResult>, tonic::Status> {
    service
        .client
        .write_memories(v1::WriteMemoriesRequest {
            tenant: tenant.into(),
            memories,
        })
        .await
        .map(|response| response.into_inner().results)
}

async fn search_vector(
    service: &mut Service,
    tenant: &str,
    query: Vec<f32>,
    limit: u32,
) -> Vec<v1::ScoredMemory> {
    service
        .client
        .search_memories(v1::SearchMemoriesRequest {
            tenant: tenant.into(),
            query_embedding: query,
            limit,
            ..Default::default()
        })
        .await
        .expect("search succeeds")
        .into_inner()
        .results
}

async fn context(
    service: &mut Service,
    tenant: &str,
    session_id: &str,
    token_budget: u64,
) -> v1::GetContextResponse {
    service
        .client
        .get_context(v1::GetContextRequest {
            tenant: tenant.into(),
            session_id: session_id.into(),
            token_budget,
            ..Default::default()
        })
        .await
        .expect("context answers")
        .into_inner()
}

fn ids(results: &[v1::ScoredMemory]) -> Vec<i64> {
    results
        .iter()
        .map(|r| r.memory.as_ref().map_or(0, |m| m.id))
        .collect()
}

#[tokio::test]
async fn tenants_are_isolated_in_every_method() {
    let mut service = Service::start(|_| {}).await;
    // Tenant acme owns a memory, a session, a strategy-free role and a trajectory.
    let acme = write(
        &mut service,
        "acme",
        vec![input("acme's secret plan", unit(1))],
    )
    .await
    .expect("acme writes");
    let acme_id = acme[0].id;
    service
        .append("acme", "shared-name", &[("user", "acme's conversation")])
        .await
        .expect("acme appends");

    // globex uses the same session id and the same text: both are its own.
    let globex = write(
        &mut service,
        "globex",
        vec![input("acme's secret plan", unit(1))],
    )
    .await
    .expect("globex writes");
    assert!(
        !globex[0].merged,
        "never merged into another tenant's memory"
    );
    assert_ne!(globex[0].id, acme_id);
    service
        .append("globex", "shared-name", &[("user", "globex talk")])
        .await
        .expect("globex appends");

    // Search: only its own.
    let found = search_vector(&mut service, "globex", unit(1), 10).await;
    assert_eq!(ids(&found), [globex[0].id]);
    assert!(
        search_vector(&mut service, "initech", unit(1), 10)
            .await
            .is_empty()
    );

    // Get, update, delete by another tenant's id: as if it did not exist.
    let get = service
        .client
        .get_memory(v1::GetMemoryRequest {
            tenant: "globex".into(),
            id: acme_id,
        })
        .await
        .expect_err("not globex's");
    assert_eq!(get.code(), Code::NotFound);
    let update = service
        .client
        .update_memory(v1::UpdateMemoryRequest {
            tenant: "globex".into(),
            id: acme_id,
            importance: Some(1.0),
            ..Default::default()
        })
        .await
        .expect_err("not globex's");
    assert_eq!(update.code(), Code::NotFound);
    let delete = service
        .client
        .delete_memory(v1::DeleteMemoryRequest {
            tenant: "globex".into(),
            id: acme_id,
        })
        .await
        .expect("delete answers")
        .into_inner();
    assert!(!delete.deleted);
    let still = service
        .client
        .get_memory(v1::GetMemoryRequest {
            tenant: "acme".into(),
            id: acme_id,
        })
        .await
        .expect("acme's memory is untouched")
        .into_inner();
    assert_eq!(still.importance, 0.5);

    // Sessions: the same id is two sessions.
    let messages = service.list_all("globex", "shared-name", 10).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].message.as_ref().map(|m| m.content.as_str()),
        Some("globex talk")
    );
    let context = context(&mut service, "initech", "shared-name", 1000).await;
    assert!(context.messages.is_empty() && context.full_context);
    let compress = service
        .client
        .compress_session(v1::CompressSessionRequest {
            tenant: "initech".into(),
            session_id: "shared-name".into(),
            keep_recent: Some(1),
        })
        .await
        .expect_err("no such session for initech");
    assert_eq!(compress.code(), Code::NotFound);

    // Strategies and the replay log: nothing of acme's is visible to globex.
    let strategies = service
        .client
        .list_strategies(v1::ListStrategiesRequest {
            tenant: "globex".into(),
            include_pruned: true,
            ..Default::default()
        })
        .await
        .expect("list answers")
        .into_inner();
    assert!(strategies.strategies.is_empty());
    let outcome = service
        .client
        .record_strategy_outcome(v1::RecordStrategyOutcomeRequest {
            tenant: "globex".into(),
            strategy_id: 1,
            success: true,
            ..Default::default()
        })
        .await
        .expect_err("no strategy of globex");
    assert_eq!(outcome.code(), Code::NotFound);
    let mut export = service
        .client
        .export_trajectories(v1::ExportTrajectoriesRequest {
            tenant: "initech".into(),
            run_id: String::new(),
        })
        .await
        .expect("export answers")
        .into_inner();
    assert!(export.message().await.expect("a stream").is_none());
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_duplicates_are_merged_and_counted() {
    let mut service = Service::start(with_workspace_models).await;
    let text = |t: &str| v1::MemoryInput {
        scope: scope(v1::ScopeKind::Role, "coder"),
        text: t.into(),
        ..Default::default()
    };
    let first = write(
        &mut service,
        "acme",
        vec![text("The build uses cargo nextest.")],
    )
    .await
    .expect("write succeeds");
    assert!(!first[0].merged);
    // The model is uncased, and a full stop moves the vector very little.
    let again = write(
        &mut service,
        "acme",
        vec![text("the build uses cargo nextest")],
    )
    .await
    .expect("write succeeds");
    assert!(again[0].merged, "a near-duplicate is merged");
    assert_eq!(again[0].id, first[0].id);
    assert_eq!(again[0].duplicate_count, 2);
    // The exact text, twice in one write: one memory, counted three more times.
    let batch = write(
        &mut service,
        "acme",
        vec![
            text("The build uses cargo nextest."),
            text("The build uses cargo nextest."),
            text("Deployments go out on Tuesdays after the freeze."),
        ],
    )
    .await
    .expect("write succeeds");
    assert_eq!(batch[0].id, first[0].id);
    assert_eq!(batch[1].id, first[0].id);
    assert!(batch[1].merged);
    assert_eq!(batch[1].duplicate_count, 4);
    assert!(!batch[2].merged);
    // Another scope keeps its own copy.
    let elsewhere = write(
        &mut service,
        "acme",
        vec![v1::MemoryInput {
            scope: scope(v1::ScopeKind::Role, "reviewer"),
            ..text("The build uses cargo nextest.")
        }],
    )
    .await
    .expect("write succeeds");
    assert!(!elsewhere[0].merged);
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM memory.memories WHERE tenant = 'acme' AND deleted_at IS NULL",
    )
    .fetch_one(&service.backing.db.pool)
    .await
    .expect("count");
    assert_eq!(stored, 3, "two memories for coder and one for reviewer");
    let metrics = service.metrics().await;
    assert!(
        metrics.contains("colony_memory_memories_written_total{result=\"merged\"} 3"),
        "{metrics}"
    );

    // A text query finds it by meaning.
    let found = service
        .client
        .search_memories(v1::SearchMemoriesRequest {
            tenant: "acme".into(),
            query: "which test runner does the build use?".into(),
            scopes: vec![v1::Scope {
                kind: v1::ScopeKind::Role.into(),
                id: "coder".into(),
            }],
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("search succeeds")
        .into_inner()
        .results;
    assert_eq!(ids(&found), [first[0].id]);
    service.stop().await;
}

#[tokio::test]
async fn search_ranks_by_similarity_recency_and_importance_and_filters() {
    let mut service = Service::start(|config| {
        // Off unless a test turns it on, so the expected order is pure similarity first.
        config.semantic.recency_weight = 0.0;
    })
    .await;
    let query = unit(100);
    let near = blend(&unit(1), &query, 0.9);
    let middle = blend(&unit(2), &query, 0.6);
    let far = unit(3);
    let mut tagged = input("near, about rust", near.clone());
    tagged.metadata = HashMap::from([("lang".to_owned(), "rust".to_owned())]);
    let mut run_scoped = input("middle, in run r1", middle.clone());
    run_scoped.scope = scope(v1::ScopeKind::Run, "r1");
    let written = write(
        &mut service,
        "acme",
        vec![tagged, run_scoped, input("far away", far)],
    )
    .await
    .expect("write succeeds");
    let (near_id, middle_id, far_id) = (written[0].id, written[1].id, written[2].id);

    let all = search_vector(&mut service, "acme", query.clone(), 10).await;
    assert_eq!(ids(&all), [near_id, middle_id, far_id]);
    assert!(all[0].similarity > all[1].similarity && all[1].similarity > all[2].similarity);
    let top = search_vector(&mut service, "acme", query.clone(), 1).await;
    assert_eq!(ids(&top), [near_id]);

    let filtered =
        |scopes: Vec<v1::Scope>, metadata: &[(&str, &str)], min: f32| v1::SearchMemoriesRequest {
            tenant: "acme".into(),
            query_embedding: query.clone(),
            scopes,
            metadata: metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            min_similarity: min,
            ..Default::default()
        };
    let by_metadata = service
        .client
        .search_memories(filtered(vec![], &[("lang", "rust")], 0.0))
        .await
        .expect("search")
        .into_inner()
        .results;
    assert_eq!(ids(&by_metadata), [near_id]);
    let by_scope = service
        .client
        .search_memories(filtered(
            vec![v1::Scope {
                kind: v1::ScopeKind::Run.into(),
                id: "r1".into(),
            }],
            &[],
            0.0,
        ))
        .await
        .expect("search")
        .into_inner()
        .results;
    assert_eq!(ids(&by_scope), [middle_id]);
    let similar_only = service
        .client
        .search_memories(filtered(vec![], &[], 0.5))
        .await
        .expect("search")
        .into_inner()
        .results;
    assert_eq!(ids(&similar_only), [near_id, middle_id]);

    // Importance lifts a slightly less similar memory above a more similar one.
    service
        .client
        .update_memory(v1::UpdateMemoryRequest {
            tenant: "acme".into(),
            id: middle_id,
            importance: Some(1.0),
            ..Default::default()
        })
        .await
        .expect("update succeeds");
    let mut service_importance = search_vector(&mut service, "acme", query.clone(), 3).await;
    let gap = service_importance[0].similarity - service_importance[1].similarity;
    service_importance.truncate(2);
    if gap < 0.05 {
        assert_eq!(ids(&service_importance), [middle_id, near_id]);
    } else {
        // The vectors are too far apart for importance (weight 0.1 × 0.5) to reorder them:
        // the score still carries the importance term.
        let middle = service_importance
            .iter()
            .find(|r| r.memory.as_ref().is_some_and(|m| m.id == middle_id))
            .expect("middle is found");
        assert!((middle.score - (middle.similarity + 0.1)).abs() < 1e-4);
    }

    // Deleted: gone from search at once.
    let deleted = service
        .client
        .delete_memory(v1::DeleteMemoryRequest {
            tenant: "acme".into(),
            id: near_id,
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(deleted.deleted);
    let after = search_vector(&mut service, "acme", query.clone(), 10).await;
    assert!(!ids(&after).contains(&near_id));
    service.stop().await;
}

#[tokio::test]
async fn memories_and_sessions_expire_on_a_controlled_clock() {
    let backing = Backing::new().await;
    let start = Utc::now();
    let clock = ManualClock::new(start);
    let mut service = Service::start_on(&backing, Arc::new(clock.clone()), |config| {
        config.retention.sweep_interval = Duration::from_millis(100);
        config.retention.run_ttl = Some(Duration::from_secs(24 * 3600));
        config.retention.session_history_ttl = Some(Duration::from_secs(7 * 24 * 3600));
    })
    .await;
    let mut short = input("lives an hour", unit(1));
    short.ttl = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    let mut run = input("lives a day (the run scope's default)", unit(2));
    run.scope = scope(v1::ScopeKind::Run, "r1");
    let forever = input("tenant memories do not expire by default", unit(3));
    let written = write(&mut service, "acme", vec![short, run, forever])
        .await
        .expect("write succeeds");
    let record = |id| v1::GetMemoryRequest {
        tenant: "acme".into(),
        id,
    };
    let run_memory = service
        .client
        .get_memory(record(written[1].id))
        .await
        .expect("get")
        .into_inner();
    let expires = run_memory.expires_at.expect("a run memory expires");
    assert_eq!(expires.seconds, (start + TimeDelta::hours(24)).timestamp());
    service
        .append("acme", "old-session", &[("user", "hello")])
        .await
        .expect("append succeeds");

    clock.advance(TimeDelta::hours(2));
    // Expired memories stop answering at once, before the sweeper has run.
    let found = search_vector(&mut service, "acme", unit(1), 10).await;
    assert!(!ids(&found).contains(&written[0].id));
    let pool = backing.db.pool.clone();
    let expired_id = written[0].id;
    eventually(
        Duration::from_secs(10),
        "the sweeper tombstones the expired memory",
        || {
            let pool = pool.clone();
            async move {
                let deleted: bool = sqlx::query_scalar(
                    "SELECT deleted_at IS NOT NULL FROM memory.memories WHERE id = $1",
                )
                .bind(expired_id)
                .fetch_one(&pool)
                .await
                .ok()?;
                deleted.then_some(())
            }
        },
    )
    .await;
    assert!(
        service
            .client
            .get_memory(record(written[1].id))
            .await
            .is_ok()
    );

    clock.advance(TimeDelta::days(8));
    eventually(
        Duration::from_secs(10),
        "the run memory and the session expire",
        || {
            let pool = pool.clone();
            let run_id = written[1].id;
            async move {
                let live: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM memory.memories WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(run_id)
                .fetch_one(&pool)
                .await
                .ok()?;
                let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM memory.sessions")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                (live == 0 && sessions == 0).then_some(())
            }
        },
    )
    .await;
    let live = service
        .client
        .get_memory(record(written[2].id))
        .await
        .expect("the tenant memory lives on")
        .into_inner();
    assert!(live.expires_at.is_none());
    assert!(
        service
            .metrics()
            .await
            .contains("colony_memory_memories_expired_total 2")
    );
    service.stop().await;
}

/// Every live memory of `tenant` with its vector, as stored.
async fn stored_vectors(pool: &sqlx::PgPool, tenant: &str) -> BTreeMap<i64, Vec<f32>> {
    let rows = sqlx::query(
        "SELECT id, embedding FROM memory.memories WHERE tenant = $1 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
    .expect("read memories");
    rows.iter()
        .map(|row| {
            let bytes: Vec<u8> = row.get("embedding");
            let vector = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (row.get::<i64, _>("id"), vector)
        })
        .collect()
}

#[tokio::test]
async fn the_index_rebuilt_after_a_restart_equals_the_stored_memories() {
    let backing = Backing::new().await;
    let mut first = Service::start_on(&backing, Arc::new(SystemClock), |_| {}).await;
    let inputs = (0..60)
        .map(|i| input(&format!("memory {i}"), unit(i)))
        .collect();
    let written = write(&mut first, "acme", inputs)
        .await
        .expect("write succeeds");
    for result in written.iter().step_by(7) {
        first
            .client
            .delete_memory(v1::DeleteMemoryRequest {
                tenant: "acme".into(),
                id: result.id,
            })
            .await
            .expect("delete succeeds");
    }
    first
        .client
        .update_memory(v1::UpdateMemoryRequest {
            tenant: "acme".into(),
            id: written[1].id,
            importance: Some(0.9),
            ..Default::default()
        })
        .await
        .expect("update succeeds");
    let stored = stored_vectors(&backing.db.pool, "acme").await;
    assert_eq!(stored.len(), 60 - 9);
    let before = first.handle.as_ref().expect("running").indexed("acme");
    assert_eq!(before, stored);
    first.stop().await;

    let mut second = Service::start_on(&backing, Arc::new(SystemClock), |_| {}).await;
    let rebuilt = second.handle.as_ref().expect("running").indexed("acme");
    assert_eq!(
        rebuilt, stored,
        "the rebuilt index holds exactly the stored memories"
    );
    let found = search_vector(&mut second, "acme", unit(5), 1).await;
    assert_eq!(ids(&found), [written[5].id]);
    second.stop().await;
}

#[tokio::test]
async fn two_replicas_converge() {
    let backing = Backing::new().await;
    let mut one = Service::start_on(&backing, Arc::new(SystemClock), |_| {}).await;
    let mut two = Service::start_on(&backing, Arc::new(SystemClock), |config| {
        // Events must do the work: the catch-up pass would take far longer than the test.
        config.semantic.sync_interval = Duration::from_secs(3600);
        config.retention.tombstone_retention = Duration::from_secs(7200);
    })
    .await;
    let written = write(
        &mut one,
        "acme",
        (0..20)
            .map(|i| input(&format!("fact {i}"), unit(i)))
            .collect(),
    )
    .await
    .expect("write succeeds");
    let stored = stored_vectors(&backing.db.pool, "acme").await;
    eventually(
        Duration::from_secs(10),
        "replica two indexes replica one's writes",
        || {
            let indexed = two
                .handle
                .as_ref()
                .map(|h| h.indexed("acme"))
                .unwrap_or_default();
            let expected = stored.clone();
            async move { (indexed == expected).then_some(()) }
        },
    )
    .await;
    let found = search_vector(&mut two, "acme", unit(3), 1).await;
    assert_eq!(ids(&found), [written[3].id]);

    // A delete on one is at once invisible on two (PostgreSQL decides what is live), and
    // two's index lets go of it.
    one.client
        .delete_memory(v1::DeleteMemoryRequest {
            tenant: "acme".into(),
            id: written[3].id,
        })
        .await
        .expect("delete succeeds");
    let found = search_vector(&mut two, "acme", unit(3), 1).await;
    assert_ne!(ids(&found), [written[3].id]);
    let gone = written[3].id;
    eventually(
        Duration::from_secs(10),
        "replica two drops the deleted memory",
        || {
            let indexed = two
                .handle
                .as_ref()
                .map(|h| h.indexed("acme"))
                .unwrap_or_default();
            async move { (!indexed.contains_key(&gone)).then_some(()) }
        },
    )
    .await;
    // And writes on two reach one.
    let more = write(&mut two, "acme", vec![input("from two", unit(99))])
        .await
        .expect("write succeeds");
    let id = more[0].id;
    eventually(
        Duration::from_secs(10),
        "replica one indexes replica two's write",
        || {
            let indexed = one
                .handle
                .as_ref()
                .map(|h| h.indexed("acme"))
                .unwrap_or_default();
            async move { indexed.contains_key(&id).then_some(()) }
        },
    )
    .await;
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn a_replica_catches_up_on_changes_it_was_not_told_of() {
    let backing = Backing::new().await;
    let mut service = Service::start_on(&backing, Arc::new(SystemClock), |config| {
        config.semantic.sync_interval = Duration::from_millis(300);
    })
    .await;
    let written = write(
        &mut service,
        "acme",
        (0..10)
            .map(|i| input(&format!("fact {i}"), unit(i)))
            .collect(),
    )
    .await
    .expect("write succeeds");
    // Changed behind the service's back, with no event: a new vector for one memory, a
    // deletion of another. Only the periodic pass can bring the index up to date.
    let moved: Vec<u8> = unit(42).iter().flat_map(|x| x.to_le_bytes()).collect();
    sqlx::query(
        "UPDATE memory.memories SET embedding = $2, \
             revision = nextval('memory.memory_revision'), changed_at = now() WHERE id = $1",
    )
    .bind(written[0].id)
    .bind(&moved)
    .execute(&backing.db.pool)
    .await
    .expect("update a row");
    sqlx::query(
        "UPDATE memory.memories SET deleted_at = now(), \
             revision = nextval('memory.memory_revision'), changed_at = now() WHERE id = $1",
    )
    .bind(written[1].id)
    .execute(&backing.db.pool)
    .await
    .expect("delete a row");
    let stored = stored_vectors(&backing.db.pool, "acme").await;
    assert_eq!(stored.len(), 9);
    eventually(
        Duration::from_secs(10),
        "the index matches PostgreSQL after a catch-up pass",
        || {
            let indexed = service
                .handle
                .as_ref()
                .map(|h| h.indexed("acme"))
                .unwrap_or_default();
            let expected = stored.clone();
            async move { (indexed == expected).then_some(()) }
        },
    )
    .await;
    let found = search_vector(&mut service, "acme", unit(42), 1).await;
    assert_eq!(ids(&found), [written[0].id]);
    service.stop().await;
}

#[tokio::test]
async fn tenant_limits_refuse_writes_clearly() {
    let mut service = Service::start(|config| {
        config.limits.max_memories = 3;
        config.limits.tenants.insert(
            "big".into(),
            colony_memory::config::TenantLimit {
                max_memories: 10,
                max_bytes: 1_000_000,
            },
        );
    })
    .await;
    write(
        &mut service,
        "acme",
        (0..3).map(|i| input(&format!("m{i}"), unit(i))).collect(),
    )
    .await
    .expect("within the limit");
    let refused = write(&mut service, "acme", vec![input("one more", unit(10))])
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("limit is 3"),
        "{}",
        refused.message()
    );
    // Nothing of the refused write is stored; a merge still fits.
    let merged = write(&mut service, "acme", vec![input("m0", unit(0))])
        .await
        .expect("a merge adds nothing");
    assert!(merged[0].merged);
    write(
        &mut service,
        "big",
        (0..5).map(|i| input(&format!("m{i}"), unit(i))).collect(),
    )
    .await
    .expect("big has its own limit");
    // Deleting frees room.
    service
        .client
        .delete_memory(v1::DeleteMemoryRequest {
            tenant: "acme".into(),
            id: merged[0].id,
        })
        .await
        .expect("delete");
    write(&mut service, "acme", vec![input("one more", unit(10))])
        .await
        .expect("room again");
    service.stop().await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let mut service = Service::start(|config| {
        config.semantic.max_text_bytes = 100;
    })
    .await;
    let cases: Vec<(v1::MemoryInput, &str)> = vec![
        (input("   ", unit(1)), "memories[0].text: must not be empty"),
        (
            input(&"x".repeat(101), unit(1)),
            "memories[0].text: is 101 bytes long",
        ),
        (
            v1::MemoryInput {
                scope: Some(v1::Scope {
                    kind: 42,
                    id: "x".into(),
                }),
                ..input("text", unit(1))
            },
            "memories[0].scope.kind: unknown or missing scope kind",
        ),
        (
            v1::MemoryInput {
                scope: None,
                ..input("text", unit(1))
            },
            "memories[0].scope: is required",
        ),
        (
            v1::MemoryInput {
                scope: scope(v1::ScopeKind::Session, ""),
                ..input("text", unit(1))
            },
            "memories[0].scope.id: is required",
        ),
        (
            input("text", vec![0.5; 12]),
            "memories[0].embedding: has 12 dimensions; the embedding model has 384",
        ),
        (
            input("text", vec![f32::NAN; DIMENSIONS]),
            "memories[0].embedding: must be finite",
        ),
        (
            v1::MemoryInput {
                importance: Some(2.0),
                ..input("text", unit(1))
            },
            "memories[0].importance: must be between 0 and 1",
        ),
        (
            v1::MemoryInput {
                ttl: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
                ..input("text", unit(1))
            },
            "memories[0].ttl: must be positive",
        ),
    ];
    for (bad, expected) in cases {
        let status = write(&mut service, "acme", vec![bad])
            .await
            .expect_err("bad input is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{expected}");
        assert!(
            status.message().starts_with(expected),
            "{}",
            status.message()
        );
    }
    let empty = write(&mut service, "acme", vec![])
        .await
        .expect_err("empty write");
    assert_eq!(empty.code(), Code::InvalidArgument);
    let no_tenant = write(&mut service, "", vec![input("text", unit(1))])
        .await
        .expect_err("tenant is required");
    assert!(no_tenant.message().starts_with("tenant: is required"));

    let search = |query: &str, vector: Vec<f32>| v1::SearchMemoriesRequest {
        tenant: "acme".into(),
        query: query.into(),
        query_embedding: vector,
        ..Default::default()
    };
    for (request, expected) in [
        (
            search("", vec![]),
            "query: give a query text or a query_embedding",
        ),
        (
            search("both", unit(1)),
            "query: give a query text or a query_embedding, not both",
        ),
        (
            search("", vec![1.0; 3]),
            "query_embedding: has 3 dimensions",
        ),
    ] {
        let status = service
            .client
            .search_memories(request)
            .await
            .expect_err("bad search is refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with(expected),
            "{}",
            status.message()
        );
    }
    let zero_id = service
        .client
        .get_memory(v1::GetMemoryRequest {
            tenant: "acme".into(),
            id: 0,
        })
        .await
        .expect_err("id 0");
    assert_eq!(zero_id.code(), Code::InvalidArgument);
    // Nothing was stored by any of it, and each refusal was counted.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM memory.memories")
        .fetch_one(&service.backing.db.pool)
        .await
        .expect("count");
    assert_eq!(stored, 0);
    let metrics = service.metrics().await;
    assert!(
        metrics.contains(
            "colony_memory_operations_total{method=\"WriteMemories\",outcome=\"invalid_argument\"} 11"
        ),
        "{metrics}"
    );
    service.stop().await;
}

/// A router whose model summarises by counting: enough to prove what compression sent and
/// kept, with the real gRPC API in between.
mod fake_router {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use colony_proto::v1;
    use colony_proto::v1::router_server::{Router, RouterServer};
    use tokio_util::sync::CancellationToken;
    use tonic::{Request, Response, Status};

    /// Calls answered, and whether to fail the next ones.
    #[derive(Default)]
    pub struct Calls(pub AtomicUsize, pub std::sync::atomic::AtomicBool);

    struct Summariser(Arc<Calls>);

    #[tonic::async_trait]
    impl Router for Summariser {
        type CompleteStreamStream = futures::stream::Empty<Result<v1::CompleteChunk, Status>>;

        async fn complete(
            &self,
            request: Request<v1::CompleteRequest>,
        ) -> Result<Response<v1::CompleteResponse>, Status> {
            if self.0.1.load(Ordering::SeqCst) {
                return Err(Status::unavailable("every provider is down"));
            }
            self.0.0.fetch_add(1, Ordering::SeqCst);
            let request = request.into_inner();
            let transcript = request
                .messages
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default();
            let lines = transcript.lines().count();
            let first = transcript.lines().next().unwrap_or_default().to_owned();
            Ok(Response::new(v1::CompleteResponse {
                content: format!("Summary of {lines} messages, starting with {first}"),
                ..Default::default()
            }))
        }

        async fn complete_stream(
            &self,
            _request: Request<v1::CompleteRequest>,
        ) -> Result<Response<Self::CompleteStreamStream>, Status> {
            Err(Status::unimplemented("not used"))
        }
    }

    /// Serves until the token is cancelled; returns its address and call counter.
    pub async fn start(stop: CancellationToken) -> (SocketAddr, Arc<Calls>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let calls = Arc::new(Calls::default());
        let server = tonic::transport::Server::builder()
            .add_service(RouterServer::new(Summariser(calls.clone())))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        colony_runtime::Runtime::new(stop).spawn(server);
        (addr, calls)
    }
}

#[tokio::test]
async fn compression_keeps_the_originals_and_context_fits_the_budget() {
    let stop = tokio_util::sync::CancellationToken::new();
    let (router, calls) = fake_router::start(stop.clone()).await;
    let mut service = Service::start(with_models_and(|config| {
        config.compression.router_url = format!("http://{router}");
        config.compression.max_messages_per_summary = 10;
    }))
    .await;
    let turns: Vec<(String, String)> = (1..=30)
        .map(|i| {
            let role = if i % 2 == 1 { "user" } else { "assistant" };
            (role.to_owned(), format!("turn number {i} says something"))
        })
        .collect();
    let borrowed: Vec<(&str, &str)> = turns
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    let appended = service
        .append("acme", "long", &borrowed)
        .await
        .expect("append succeeds");

    // Everything fits: the whole history, nothing summarised, no router call.
    let full = context(&mut service, "acme", "long", appended.token_count).await;
    assert!(full.full_context);
    assert_eq!(full.messages.len(), 30);
    assert_eq!(full.token_count, appended.token_count);
    assert_eq!(calls.0.load(std::sync::atomic::Ordering::SeqCst), 0);

    let compressed = service
        .client
        .compress_session(v1::CompressSessionRequest {
            tenant: "acme".into(),
            session_id: "long".into(),
            keep_recent: Some(5),
        })
        .await
        .expect("compress")
        .into_inner();
    assert_eq!(compressed.summarized_through_seq, 25);
    // Ten messages per summary at most: 1-10, 11-20, 21-25.
    let last = compressed.summary.expect("a summary was made");
    assert_eq!((last.first_seq, last.last_seq), (21, 25));
    assert!(
        last.text
            .starts_with("Summary of 5 messages, starting with [21] user: turn number 21")
    );
    assert_eq!(calls.0.load(std::sync::atomic::Ordering::SeqCst), 3);
    // The originals are all still there.
    let all = service.list_all("acme", "long", 100).await;
    assert_eq!(all.len(), 30);

    // A tight budget: summaries and the newest turns, the rest accounted for.
    let tight = context(&mut service, "acme", "long", 60).await;
    assert!(!tight.full_context);
    assert!(tight.token_count <= 60, "{}", tight.token_count);
    let covered: u64 = tight
        .summaries
        .iter()
        .map(|s| s.last_seq - s.first_seq + 1)
        .sum::<u64>()
        + tight.messages.len() as u64
        + tight.omitted_messages;
    assert_eq!(
        covered, 30,
        "every message is summarised, given or counted as omitted"
    );
    assert_eq!(
        tight.messages.last().map(|m| m.seq),
        Some(30),
        "the newest message is given verbatim"
    );
    assert!(tight.memories.is_empty(), "no query, no retrieval");

    // With a query, relevant memories of the named scope come along.
    let session_scope = scope(v1::ScopeKind::Session, "long");
    write(
        &mut service,
        "acme",
        vec![v1::MemoryInput {
            scope: session_scope.clone(),
            text: "The customer wants every invoice in euros.".into(),
            ..Default::default()
        }],
    )
    .await
    .expect("write succeeds");
    let retrieved = service
        .client
        .get_context(v1::GetContextRequest {
            tenant: "acme".into(),
            session_id: "long".into(),
            token_budget: 120,
            query: "which currency should the invoice use?".into(),
            scopes: session_scope.into_iter().collect(),
            memory_limit: 3,
        })
        .await
        .expect("context")
        .into_inner();
    assert!(!retrieved.full_context);
    assert_eq!(retrieved.memories.len(), 1);
    assert!(retrieved.token_count <= 120, "{}", retrieved.token_count);

    // The router failing: a clear, retryable error, and nothing changes.
    calls.1.store(true, std::sync::atomic::Ordering::SeqCst);
    let pool = service.backing.db.pool.clone();
    let summarized_through = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT summarized_through_seq FROM memory.sessions WHERE session_id = 'long'",
        )
        .fetch_one(&pool)
        .await
        .expect("session")
    };
    let before = summarized_through().await;
    assert!(before >= 25, "the tight context summarised more: {before}");
    service
        .append("acme", "long", &borrowed[..10])
        .await
        .expect("append succeeds");
    let failed = service
        .client
        .compress_session(v1::CompressSessionRequest {
            tenant: "acme".into(),
            session_id: "long".into(),
            keep_recent: Some(1),
        })
        .await
        .expect_err("the router is down");
    assert_eq!(failed.code(), Code::Unavailable);
    assert!(
        failed.message().contains("through the router failed"),
        "{}",
        failed.message()
    );
    assert_eq!(summarized_through().await, before);
    service.stop().await;
    stop.cancel();
}

fn with_models_and(tweak: impl FnOnce(&mut Config)) -> impl FnOnce(&mut Config) {
    move |config| {
        with_workspace_models(config);
        tweak(config);
    }
}

/// The coder role's strategies for a task about flaky tests.
async fn suggest_for_flaky_tests(
    service: &mut Service,
    tenant: &str,
    limit: u32,
) -> Vec<v1::StrategySuggestion> {
    service
        .client
        .suggest_strategies(v1::SuggestStrategiesRequest {
            tenant: tenant.into(),
            role: "coder".into(),
            task: "the integration test suite is flaky and fails at random".into(),
            limit,
        })
        .await
        .expect("suggest")
        .into_inner()
        .suggestions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_rank_count_and_prune_at_the_threshold() {
    let mut service = Service::start(with_models_and(|_| {})).await;
    let add = |title: &str, when: &str| v1::AddStrategyRequest {
        tenant: "acme".into(),
        role: "coder".into(),
        title: title.into(),
        when_to_use: when.into(),
        strategy: "Run the failing test alone first, then bisect the change.".into(),
        from_success: true,
        source_run_id: "r1".into(),
        source_task_id: "t1".into(),
    };
    let weak = service
        .client
        .add_strategy(add(
            "Isolate flaky tests",
            "A test fails only sometimes in continuous integration",
        ))
        .await
        .expect("add")
        .into_inner();
    let steady = service
        .client
        .add_strategy(add(
            "Read the migration before the code",
            "A database schema change breaks a query",
        ))
        .await
        .expect("add")
        .into_inner();
    let merged = service
        .client
        .add_strategy(add(
            "Isolate flaky tests",
            "A test fails only sometimes in continuous integration.",
        ))
        .await
        .expect("add")
        .into_inner();
    assert_eq!(merged.id, weak.id, "an equivalent strategy is merged");
    assert_eq!(merged.duplicate_count, 2);
    // Another tenant's equal strategy is its own, and it is never suggested acme's.
    let other = service
        .client
        .add_strategy(v1::AddStrategyRequest {
            tenant: "globex".into(),
            ..add(
                "Isolate flaky tests",
                "A test fails only sometimes in continuous integration",
            )
        })
        .await
        .expect("add")
        .into_inner();
    assert_ne!(other.id, weak.id);
    assert_eq!(other.duplicate_count, 1);
    let initech = suggest_for_flaky_tests(&mut service, "initech", 5).await;
    assert!(initech.is_empty());

    let suggested = suggest_for_flaky_tests(&mut service, "acme", 2).await;
    let first = suggested[0].strategy.as_ref().expect("a strategy");
    assert_eq!(first.id, weak.id, "the relevant strategy ranks first");
    assert_eq!(first.uses, 1);

    let outcome = |id: i64, success: bool| v1::RecordStrategyOutcomeRequest {
        tenant: "acme".into(),
        strategy_id: id,
        success,
        run_id: "r2".into(),
        task_id: "t2".into(),
    };
    // 3 wins and 6 losses: nine outcomes are fewer than the ten pruning waits for.
    for success in [true, true, true, false, false, false, false, false, false] {
        let response = service
            .client
            .record_strategy_outcome(outcome(weak.id, success))
            .await
            .expect("record")
            .into_inner();
        assert!(!response.pruned);
    }
    // The tenth: 30 % < 40 %.
    let pruned = service
        .client
        .record_strategy_outcome(outcome(weak.id, false))
        .await
        .expect("record")
        .into_inner();
    assert!(pruned.pruned);
    let record = pruned.strategy.expect("the strategy");
    assert_eq!((record.wins, record.losses), (3, 7));
    assert!(
        record.pruned_reason.contains("30 %"),
        "{}",
        record.pruned_reason
    );
    // 4 of 10 is exactly the floor: kept.
    for success in [
        true, true, true, true, false, false, false, false, false, false,
    ] {
        let response = service
            .client
            .record_strategy_outcome(outcome(steady.id, success))
            .await
            .expect("record")
            .into_inner();
        assert!(!response.pruned);
    }
    let after = suggest_for_flaky_tests(&mut service, "acme", 5).await;
    assert!(
        after
            .iter()
            .all(|s| s.strategy.as_ref().is_some_and(|s| s.id != weak.id)),
        "a pruned strategy is no longer suggested"
    );
    let gone = service
        .client
        .record_strategy_outcome(outcome(weak.id, true))
        .await
        .expect_err("pruned strategies take no outcomes");
    assert_eq!(gone.code(), Code::NotFound);
    let listed = service
        .client
        .list_strategies(v1::ListStrategiesRequest {
            tenant: "acme".into(),
            role: "coder".into(),
            include_pruned: true,
        })
        .await
        .expect("list")
        .into_inner()
        .strategies;
    assert_eq!(listed.len(), 2);
    // The audit trail tells the whole story.
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT event FROM memory.strategy_audit WHERE strategy_id = $1 ORDER BY id",
    )
    .bind(weak.id)
    .fetch_all(&service.backing.db.pool)
    .await
    .expect("audit");
    let count = |name: &str| events.iter().filter(|e| *e == name).count();
    assert_eq!(events.first().map(String::as_str), Some("created"));
    assert_eq!(events.last().map(String::as_str), Some("pruned"));
    assert_eq!(
        (
            count("merged"),
            count("suggested"),
            count("win"),
            count("loss")
        ),
        (1, 1, 3, 7)
    );
    service.stop().await;
}

#[tokio::test]
async fn the_replay_log_records_attempts_from_the_bus_and_exports_json_lines() {
    let mut service = Service::start(|_| {}).await;
    let bus = service.backing.bus.connect().await;
    let at = |seconds: i64| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let event = |kind: v1::TaskEventKind, seconds: i64| v1::TaskEvent {
        tenant: "acme".into(),
        run_id: "r1".into(),
        task_id: "t1".into(),
        attempt: 1,
        role: "coder".into(),
        kind: kind.into(),
        occurred_at: at(seconds),
        usage: Some(v1::Usage {
            prompt_tokens: 12,
            completion_tokens: 5,
            cost_micros_usd: 0,
        }),
        ..Default::default()
    };
    let step = |n: u32, role: &str, content: &str| v1::TrajectoryStep {
        tenant: "acme".into(),
        run_id: "r1".into(),
        task_id: "t1".into(),
        attempt: 1,
        role: "coder".into(),
        step: n,
        message: Some(v1::ChatMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }),
        occurred_at: at(1_700_000_001),
    };
    let task_subject = |kind: &str| colony_bus::subjects::task_event(kind);
    bus.publish(
        &task_subject("started"),
        "e1",
        &event(v1::TaskEventKind::Started, 1_700_000_000),
    )
    .await
    .expect("publish");
    bus.publish(
        colony_bus::subjects::TRAJECTORY_STEP,
        "s1",
        &step(1, "user", "write a haiku"),
    )
    .await
    .expect("publish");
    bus.publish(
        colony_bus::subjects::TRAJECTORY_STEP,
        "s2",
        &step(2, "assistant", "queues hum"),
    )
    .await
    .expect("publish");
    bus.publish(
        &task_subject("succeeded"),
        "e2",
        &event(v1::TaskEventKind::Succeeded, 1_700_000_002),
    )
    .await
    .expect("publish");
    // Another tenant's attempt and a malformed message change nothing of acme's export.
    bus.publish(
        &task_subject("started"),
        "e3",
        &v1::TaskEvent {
            tenant: "globex".into(),
            ..event(v1::TaskEventKind::Started, 1_700_000_000)
        },
    )
    .await
    .expect("publish");
    bus.publish_bytes(
        colony_bus::subjects::TRAJECTORY_STEP,
        "bad",
        None,
        vec![0xff, 0xff].into(),
    )
    .await
    .expect("publish");

    let client = service.client.clone();
    let line = eventually(Duration::from_secs(10), "the attempt is exported", || {
        let mut client = client.clone();
        async move {
            let mut stream = client
                .export_trajectories(v1::ExportTrajectoriesRequest {
                    tenant: "acme".into(),
                    run_id: String::new(),
                })
                .await
                .ok()?
                .into_inner();
            let mut text = String::new();
            while let Some(chunk) = stream.message().await.ok()? {
                text.push_str(std::str::from_utf8(&chunk.jsonl).ok()?);
            }
            let line: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
            (text.lines().count() == 1
                && line["outcome"] == "succeeded"
                && line["steps"].as_array().is_some_and(|s| s.len() == 2))
            .then_some(line)
        }
    })
    .await;
    assert_eq!(line["tenant"], "acme");
    assert_eq!(line["role"], "coder");
    assert_eq!(line["usage"]["prompt_tokens"], 12);
    assert_eq!(line["steps"][0]["message"]["content"], "write a haiku");
    assert_eq!(line["steps"][1]["message"]["role"], "assistant");
    // The malformed message was terminated and counted, not retried forever.
    let metrics = service.metrics().await;
    assert!(
        metrics.contains("consumer=\"memory-replay-steps\",outcome=\"term\""),
        "{metrics}"
    );
    let mut other = service
        .client
        .export_trajectories(v1::ExportTrajectoriesRequest {
            tenant: "acme".into(),
            run_id: "another-run".into(),
        })
        .await
        .expect("export")
        .into_inner();
    assert!(other.message().await.expect("stream").is_none());
    service.stop().await;
}

/// An OpenAI-style `/v1/embeddings` that answers `unit(text length)` vectors of `dimensions`.
async fn fake_embeddings(dimensions: usize, stop: tokio_util::sync::CancellationToken) -> String {
    use axum::Json;
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/embeddings",
        post(move |Json(body): Json<serde_json::Value>| async move {
            let inputs = body["input"].as_array().cloned().unwrap_or_default();
            let data: Vec<serde_json::Value> = inputs
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    let length = text.as_str().map_or(0, str::len) as u64;
                    let mut vector = unit(length);
                    vector.resize(dimensions, 0.0);
                    serde_json::json!({ "object": "embedding", "index": index, "embedding": vector })
                })
                .collect();
            Json(serde_json::json!({ "object": "list", "data": data, "model": body["model"] }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
    colony_runtime::Runtime::new(stop).spawn(async move { server.await });
    format!("http://{addr}")
}

#[tokio::test]
async fn embeddings_can_come_from_the_router() {
    let stop = tokio_util::sync::CancellationToken::new();
    let good = fake_embeddings(DIMENSIONS, stop.clone()).await;
    let mut service = Service::start(|config| {
        config.embedding_provider = colony_memory::config::EmbeddingProvider::Router;
        config.router_embeddings.url = good;
    })
    .await;
    let text = v1::MemoryInput {
        scope: tenant_scope(),
        text: "twelve chars".into(),
        ..Default::default()
    };
    let written = write(&mut service, "acme", vec![text])
        .await
        .expect("write succeeds");
    // The fake embeds by length: a query of the same length finds it with similarity 1.
    let found = service
        .client
        .search_memories(v1::SearchMemoriesRequest {
            tenant: "acme".into(),
            query: "same length!".into(),
            ..Default::default()
        })
        .await
        .expect("search succeeds")
        .into_inner()
        .results;
    assert_eq!(ids(&found), [written[0].id]);
    assert!((found[0].similarity - 1.0).abs() < 1e-5);
    service.stop().await;

    // A router model of other dimensions than configured: a clear error, nothing stored.
    let wrong = fake_embeddings(12, stop.clone()).await;
    let mut service = Service::start(|config| {
        config.embedding_provider = colony_memory::config::EmbeddingProvider::Router;
        config.router_embeddings.url = wrong;
    })
    .await;
    let refused = write(&mut service, "acme", vec![input("any", vec![])])
        .await
        .expect_err("wrong dimensions");
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused
            .message()
            .contains("a vector of 12 dimensions; configured for 384"),
        "{}",
        refused.message()
    );
    service.stop().await;
    stop.cancel();
}
