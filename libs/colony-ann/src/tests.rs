use crate::synthetic::{Mixture, clustered_unit_vectors, uniform_unit_vectors};
use crate::{AnnError, Hit, Hnsw, HnswParams, Index, IndexParams, recall_at_k};

const DIMENSIONS: usize = 384;

fn everything(_: u64) -> bool {
    true
}

fn graph_with(vectors: &[Vec<f32>]) -> Hnsw {
    let mut graph = Hnsw::new(DIMENSIONS, HnswParams::default());
    for (key, vector) in vectors.iter().enumerate() {
        graph.insert(key as u64, vector).expect("insert");
    }
    graph
}

/// Mean recall@k of the graph search against exact search over `queries`.
fn mean_recall(graph: &Hnsw, queries: &[Vec<f32>], k: usize) -> f64 {
    let total: f64 = queries
        .iter()
        .map(|query| {
            let approx = graph.search(query, k, everything).expect("search");
            let exact = graph.exact_search(query, k, everything).expect("exact");
            assert_eq!(approx.len(), exact.len());
            recall_at_k(&approx, &exact)
        })
        .sum();
    total / queries.len() as f64
}

fn keys(hits: &[Hit]) -> Vec<u64> {
    hits.iter().map(|hit| hit.key).collect()
}

#[test]
fn exact_search_returns_the_true_top_k_in_order() {
    let vectors = uniform_unit_vectors(500, DIMENSIONS, 1);
    let graph = graph_with(&vectors);
    let query = &uniform_unit_vectors(1, DIMENSIONS, 2)[0];

    let mut truth: Vec<(u64, f32)> = vectors
        .iter()
        .enumerate()
        .map(|(key, vector)| {
            let score = vector.iter().zip(query).map(|(a, b)| a * b).sum::<f32>();
            (key as u64, score)
        })
        .collect();
    truth.sort_by(|a, b| b.1.total_cmp(&a.1));

    let hits = graph.exact_search(query, 10, everything).expect("exact");
    assert_eq!(
        keys(&hits),
        truth[..10].iter().map(|(key, _)| *key).collect::<Vec<_>>()
    );
    for (hit, (_, score)) in hits.iter().zip(&truth) {
        assert!((hit.score - score).abs() < 1e-5);
    }
    assert!(hits.windows(2).all(|pair| pair[0].score >= pair[1].score));

    // Asking for more than there are gives them all.
    assert_eq!(
        graph
            .exact_search(query, 10_000, everything)
            .expect("exact")
            .len(),
        500
    );
}

#[test]
fn malformed_vectors_are_refused() {
    let mut graph = Hnsw::new(4, HnswParams::default());
    assert_eq!(
        graph.insert(1, &[1.0, 0.0, 0.0]),
        Err(AnnError::Dimension {
            expected: 4,
            got: 3
        })
    );
    assert_eq!(
        graph.insert(1, &[1.0, f32::NAN, 0.0, 0.0]),
        Err(AnnError::NonFinite { position: 1 })
    );
    assert_eq!(
        graph.insert(1, &[1.0, 0.0, 0.0, f32::INFINITY]),
        Err(AnnError::NonFinite { position: 3 })
    );
    assert!(graph.is_empty());

    graph.insert(1, &[1.0, 0.0, 0.0, 0.0]).expect("insert");
    assert!(matches!(
        graph.search(&[1.0; 5], 1, everything),
        Err(AnnError::Dimension {
            expected: 4,
            got: 5
        })
    ));
    assert!(matches!(
        graph.exact_search(&[f32::NAN, 0.0, 0.0, 0.0], 1, everything),
        Err(AnnError::NonFinite { position: 0 })
    ));
}

#[test]
fn an_empty_index_returns_nothing() {
    let graph = Hnsw::new(DIMENSIONS, HnswParams::default());
    let query = &uniform_unit_vectors(1, DIMENSIONS, 1)[0];
    assert!(
        graph
            .search(query, 10, everything)
            .expect("search")
            .is_empty()
    );
    assert!(
        graph
            .exact_search(query, 10, everything)
            .expect("exact")
            .is_empty()
    );
    assert!(graph.is_empty());
    assert_eq!(graph.len(), 0);
    assert_eq!(graph.get(0), None);

    let index = Index::new(DIMENSIONS, IndexParams::default());
    assert!(
        index
            .search(query, 10, everything)
            .expect("search")
            .is_empty()
    );

    // Nor does asking for no results.
    let graph = graph_with(&uniform_unit_vectors(10, DIMENSIONS, 2));
    assert!(
        graph
            .search(query, 0, everything)
            .expect("search")
            .is_empty()
    );
}

#[test]
fn the_graph_finds_the_true_neighbours_of_clustered_vectors() {
    let mixture = Mixture::new(DIMENSIONS, 50, 11);
    let vectors = mixture.sample(5_000, 12);
    let queries = mixture.sample(100, 13);
    let mut index = Index::new(
        DIMENSIONS,
        IndexParams {
            exact_below: 0,
            ..IndexParams::default()
        },
    );
    for (key, vector) in vectors.iter().enumerate() {
        index.insert(key as u64, vector).expect("insert");
    }
    assert!(!index.answers_exactly());

    let mut total = 0.0;
    for query in &queries {
        let approx = index.search(query, 10, everything).expect("search");
        let exact = index.exact_search(query, 10, everything).expect("exact");
        total += recall_at_k(&approx, &exact);
    }
    let recall = total / queries.len() as f64;
    assert!(recall >= 0.95, "recall@10 {recall}");
}

#[test]
fn a_graph_loaded_at_once_finds_the_true_neighbours() {
    let mixture = Mixture::new(DIMENSIONS, 50, 14);
    let vectors = mixture.sample(5_000, 15);
    let queries = mixture.sample(100, 16);
    let mut graph = Hnsw::new(DIMENSIONS, HnswParams::default());
    graph
        .insert_many(
            vectors
                .iter()
                .enumerate()
                .map(|(key, vector)| (key as u64, vector.as_slice())),
        )
        .expect("insert_many");
    assert_eq!(graph.len(), 5_000);
    let recall = mean_recall(&graph, &queries, 10);
    assert!(recall >= 0.95, "recall@10 {recall}");
}

#[test]
fn insert_many_keeps_the_last_vector_per_key_and_checks_first() {
    let vectors = clustered_unit_vectors(400, DIMENSIONS, 4, 17);
    let mut index = Index::new(DIMENSIONS, IndexParams::default());
    index
        .insert_many((0..200u64).map(|key| (key, vectors[key as usize].as_slice())))
        .expect("first load");

    // Keys 100..300, key 250 twice: 100..200 are replaced, 200..300 are new.
    let mut items: Vec<(u64, &[f32])> = (100..300u64)
        .map(|key| (key, vectors[key as usize + 100].as_slice()))
        .collect();
    items.push((250, vectors[0].as_slice()));
    index.insert_many(items).expect("second load");
    assert_eq!(index.len(), 300);
    assert_eq!(index.get(150), Some(vectors[250].as_slice()));
    assert_eq!(index.get(250), Some(vectors[0].as_slice()));
    assert_eq!(index.get(50), Some(vectors[50].as_slice()));
    let hits = index.search(&vectors[0], 2, everything).expect("search");
    let mut found = keys(&hits);
    found.sort_unstable();
    assert_eq!(found, vec![0, 250]);

    // One bad vector and nothing is stored.
    let bad = vec![f32::NAN; DIMENSIONS];
    let result = index.insert_many([(1_000, vectors[1].as_slice()), (1_001, bad.as_slice())]);
    assert_eq!(result, Err(AnnError::NonFinite { position: 0 }));
    assert!(!index.contains(1_000));
    assert_eq!(index.len(), 300);
}

#[test]
fn the_same_inserts_build_the_same_graph() {
    let vectors = clustered_unit_vectors(1_000, DIMENSIONS, 20, 5);
    let first = graph_with(&vectors);
    let second = graph_with(&vectors);
    for query in &vectors[..20] {
        assert_eq!(
            first
                .search_with_ef(query, 10, 10, everything)
                .expect("search"),
            second
                .search_with_ef(query, 10, 10, everything)
                .expect("search")
        );
    }
}

#[test]
fn small_indexes_answer_exactly() {
    let vectors = uniform_unit_vectors(300, DIMENSIONS, 8);
    let mut index = Index::new(DIMENSIONS, IndexParams::default());
    for (key, vector) in vectors.iter().enumerate() {
        index.insert(key as u64, vector).expect("insert");
    }
    assert!(index.answers_exactly());
    for query in &uniform_unit_vectors(10, DIMENSIONS, 9) {
        assert_eq!(
            index.search(query, 10, everything).expect("search"),
            index.exact_search(query, 10, everything).expect("exact")
        );
    }
}

#[test]
fn a_removed_key_is_never_returned() {
    let vectors = clustered_unit_vectors(2_000, DIMENSIONS, 20, 21);
    let mut graph = graph_with(&vectors);

    // Removing a few keeps them below the compaction threshold: they are tombstones.
    for key in (0..2_000).step_by(50) {
        assert!(graph.remove(key));
        assert!(!graph.remove(key), "a second removal finds nothing");
    }
    assert!(graph.dead_nodes() > 0);
    for key in (0..2_000u64).step_by(50) {
        assert!(!graph.contains(key));
        assert_eq!(graph.get(key), None);
        // Its own vector would be its exact match.
        let query = &vectors[key as usize];
        for hits in [
            graph.search(query, 10, everything).expect("search"),
            graph.exact_search(query, 10, everything).expect("exact"),
        ] {
            assert_eq!(hits.len(), 10);
            assert!(!keys(&hits).contains(&key), "removed key {key} returned");
        }
    }
    assert_eq!(graph.len(), 2_000 - 40);
}

#[test]
fn removing_the_entry_point_keeps_search_working() {
    let vectors = clustered_unit_vectors(1_000, DIMENSIONS, 10, 31);
    let mut graph = graph_with(&vectors);
    for _ in 0..3 {
        let entry = graph.entry_key().expect("an entry point");
        assert!(graph.remove(entry), "the entry point is live");
        // It stays the entry point, dead, as a stepping stone.
        assert_eq!(graph.entry_key(), Some(entry));
        let query = &vectors[entry as usize];
        let hits = graph.search(query, 10, everything).expect("search");
        assert_eq!(hits.len(), 10);
        assert!(!keys(&hits).contains(&entry));
        // Inserts still link in around a dead entry point.
        graph.insert(10_000 + entry, query).expect("insert");
        let hits = graph.search(query, 1, everything).expect("search");
        assert_eq!(keys(&hits), vec![10_000 + entry]);
        // Compaction drops it and picks a live one.
        graph.compact();
        let new_entry = graph.entry_key().expect("an entry point");
        assert!(graph.contains(new_entry));
    }
    assert_eq!(graph.len(), 1_000);
    assert!(mean_recall(&graph, &vectors[..50], 10) >= 0.95);
}

#[test]
fn removing_everything_empties_the_index() {
    let vectors = clustered_unit_vectors(300, DIMENSIONS, 5, 41);
    let mut graph = graph_with(&vectors);
    for key in 0..300 {
        assert!(graph.remove(key));
        let hits = graph
            .search(&vectors[key as usize], 5, everything)
            .expect("search");
        assert!(!keys(&hits).contains(&key));
    }
    assert!(graph.is_empty());
    assert_eq!(graph.dead_nodes(), 0);
    assert!(
        graph
            .search(&vectors[0], 5, everything)
            .expect("search")
            .is_empty()
    );

    // And it fills again.
    graph.insert(7, &vectors[3]).expect("insert");
    let hits = graph.search(&vectors[3], 5, everything).expect("search");
    assert_eq!(keys(&hits), vec![7]);
}

#[test]
fn replacing_a_vector_moves_its_key() {
    let mixture = Mixture::new(DIMENSIONS, 2, 51);
    let vectors = mixture.sample(1_000, 52);
    let mut graph = graph_with(&vectors);
    let old = vectors[0].clone();
    // A vector far from the old one: the least similar of the set.
    let new = vectors
        .iter()
        .min_by(|a, b| {
            let score = |v: &Vec<f32>| v.iter().zip(&old).map(|(x, y)| x * y).sum::<f32>();
            score(a).total_cmp(&score(b))
        })
        .expect("vectors")
        .clone();

    graph.insert(0, &new).expect("replace");
    assert_eq!(graph.len(), 1_000);
    assert_eq!(graph.get(0), Some(new.as_slice()));

    let near_new = graph.search(&new, 10, everything).expect("search");
    assert!(keys(&near_new).contains(&0));
    assert_eq!(
        keys(&near_new),
        keys(&graph.exact_search(&new, 10, everything).expect("exact"))
    );
    let near_old = graph.search(&old, 10, everything).expect("search");
    assert!(
        !keys(&near_old).contains(&0),
        "the old vector still answers"
    );

    // Re-inserting the same vector changes nothing.
    let dead = graph.dead_nodes();
    graph.insert(0, &new).expect("same vector");
    assert_eq!(graph.dead_nodes(), dead);
}

#[test]
fn filtered_search_returns_only_passing_keys() {
    let vectors = clustered_unit_vectors(3_000, DIMENSIONS, 30, 61);
    let graph = graph_with(&vectors);
    let queries = clustered_unit_vectors(20, DIMENSIONS, 30, 62);

    // A loose filter is answered from the beam.
    let even = |key: u64| key.is_multiple_of(2);
    for query in &queries {
        let hits = graph.search(query, 10, even).expect("search");
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|hit| even(hit.key)));
    }

    // A selective one (31 of 3,000 keys) leaves the beam short, and the exact fallback still
    // finds k of them: the true top k.
    let rare = |key: u64| key.is_multiple_of(97);
    for query in &queries {
        let hits = graph.search(query, 10, rare).expect("search");
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|hit| rare(hit.key)));
        assert_eq!(hits, graph.exact_search(query, 10, rare).expect("exact"));
    }

    // Fewer passing keys than asked for: all of them.
    let three = |key: u64| key < 3;
    let hits = graph.search(&queries[0], 10, three).expect("search");
    let mut found = keys(&hits);
    found.sort_unstable();
    assert_eq!(found, vec![0, 1, 2]);
}

#[test]
fn compaction_under_churn_keeps_length_and_recall() {
    let mixture = Mixture::new(DIMENSIONS, 30, 71);
    let mut graph = Hnsw::new(DIMENSIONS, HnswParams::default());
    let mut live: Vec<u64> = Vec::new();
    let mut next_key = 0u64;
    let mut compactions = 0;
    for round in 0..6 {
        for vector in mixture.sample(600, 100 + round) {
            graph.insert(next_key, &vector).expect("insert");
            live.push(next_key);
            next_key += 1;
        }
        // Remove every other live key, oldest first.
        let mut kept = Vec::new();
        for (position, key) in live.drain(..).enumerate() {
            if position % 2 == 0 {
                let dead_before = graph.dead_nodes();
                assert!(graph.remove(key));
                if graph.dead_nodes() < dead_before {
                    compactions += 1;
                }
            } else {
                kept.push(key);
            }
        }
        live = kept;
        assert_eq!(graph.len(), live.len());
        assert!(
            graph.dead_nodes() as f64
                <= crate::COMPACT_AT_DEAD_FRACTION * (graph.len() + graph.dead_nodes()) as f64
        );
    }
    assert!(compactions > 0);
    assert!(live.iter().all(|&key| graph.contains(key)));
    assert_eq!(graph.len(), live.len());

    let queries = mixture.sample(50, 999);
    let recall = mean_recall(&graph, &queries, 10);
    assert!(recall >= 0.95, "recall@10 after churn {recall}");
}

#[test]
fn compact_keeps_every_live_vector() {
    let vectors = clustered_unit_vectors(500, DIMENSIONS, 5, 81);
    let mut graph = graph_with(&vectors);
    for key in 0..100 {
        graph.remove(key);
    }
    graph.compact();
    assert_eq!(graph.dead_nodes(), 0);
    assert_eq!(graph.len(), 400);
    for key in 100..500u64 {
        assert_eq!(graph.get(key), Some(vectors[key as usize].as_slice()));
        let hits = graph
            .search(&vectors[key as usize], 1, everything)
            .expect("search");
        assert_eq!(hits[0].key, key);
    }
}

#[test]
fn recall_counts_the_exact_keys_found() {
    let hit = |key| Hit { key, score: 0.0 };
    assert_eq!(recall_at_k(&[hit(1), hit(2)], &[hit(2), hit(3)]), 0.5);
    assert_eq!(recall_at_k(&[], &[]), 1.0);
    assert_eq!(recall_at_k(&[], &[hit(1)]), 0.0);
}

#[test]
fn indexes_can_be_searched_from_many_threads_at_once() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Hnsw>();
    shareable::<Index>();

    let vectors = clustered_unit_vectors(3_000, DIMENSIONS, 30, 91);
    let index = std::sync::RwLock::new(Index::new(
        DIMENSIONS,
        IndexParams {
            exact_below: 0,
            ..IndexParams::default()
        },
    ));
    index
        .write()
        .expect("lock")
        .insert_many(
            vectors
                .iter()
                .enumerate()
                .map(|(key, vector)| (key as u64, vector.as_slice())),
        )
        .expect("insert_many");
    let queries = &vectors[..40];
    let alone: Vec<Vec<Hit>> = queries
        .iter()
        .map(|query| {
            let index = index.read().expect("lock");
            index.search(query, 10, everything).expect("search")
        })
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for (query, expected) in queries.iter().zip(&alone) {
                    let index = index.read().expect("lock");
                    let hits = index.search(query, 10, everything).expect("search");
                    assert_eq!(&hits, expected);
                }
            });
        }
    });
}

#[test]
fn debug_output_is_a_summary() {
    let graph = graph_with(&uniform_unit_vectors(50, DIMENSIONS, 92));
    let shown = format!("{graph:?}");
    assert!(shown.contains("len: 50"), "{shown}");
    assert!(shown.len() < 300, "{shown}");
}
