//! Domain types of long-term memories: scopes, what a write must satisfy, and how search
//! results are ranked. No prost types and no SQL here.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::Error;
use crate::session::check_id;

/// What a memory belongs to inside its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKind {
    Tenant,
    Role,
    Run,
    Session,
}

impl ScopeKind {
    pub const ALL: [ScopeKind; 4] = [
        ScopeKind::Tenant,
        ScopeKind::Role,
        ScopeKind::Run,
        ScopeKind::Session,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Tenant => "tenant",
            ScopeKind::Role => "role",
            ScopeKind::Run => "run",
            ScopeKind::Session => "session",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == value)
    }
}

/// A scope: the tenant as a whole (empty id), or one role, run or session of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub kind: ScopeKind,
    pub id: String,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ScopeKind::Tenant => f.write_str("tenant"),
            kind => write!(f, "{}:{}", kind.as_str(), self.id),
        }
    }
}

impl Scope {
    /// Checks a scope given as a kind (`None` when the wire value is unknown or unset) and id.
    pub fn new(field: &str, kind: Option<ScopeKind>, id: String) -> Result<Self, Error> {
        let Some(kind) = kind else {
            return Err(Error::invalid(
                format!("{field}.kind"),
                "unknown or missing scope kind; expected tenant, role, run or session",
            ));
        };
        match kind {
            ScopeKind::Tenant if !id.is_empty() => Err(Error::invalid(
                format!("{field}.id"),
                "must be empty for the tenant scope",
            )),
            ScopeKind::Tenant => Ok(Scope { kind, id }),
            _ => {
                check_id(&format!("{field}.id"), &id)?;
                Ok(Scope { kind, id })
            }
        }
    }
}

/// A memory about to be written, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMemory {
    pub scope: Scope,
    pub text: String,
    pub metadata: BTreeMap<String, String>,
    pub importance: f32,
    /// Its own time to live; `None` takes the scope's default.
    pub ttl: Option<Duration>,
    /// The caller's embedding, already normalised; `None` to embed `text`.
    pub embedding: Option<Vec<f32>>,
}

/// The importance of a memory written without one.
pub const DEFAULT_IMPORTANCE: f32 = 0.5;
/// Longest metadata key and value, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 128;
pub const MAX_METADATA_VALUE_BYTES: usize = 1024;
pub const DEFAULT_SEARCH_LIMIT: usize = 10;
pub const MAX_SEARCH_LIMIT: usize = 100;

/// Limits on what a request may carry, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SemanticLimits {
    pub max_text_bytes: usize,
    pub max_memories_per_write: usize,
    pub max_metadata_pairs: usize,
    /// The embedding model's dimensions; caller-supplied vectors must match.
    pub dimensions: usize,
}

/// Checks a memory's text: not blank, bounded, storable.
pub fn check_text(field: &str, text: &str, max_bytes: usize) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if text.len() > max_bytes {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; the limit is {max_bytes}", text.len()),
        ));
    }
    if text.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// Checks an importance: finite and between 0 and 1.
pub fn check_importance(field: &str, value: f32) -> Result<f32, Error> {
    if !(0.0..=1.0).contains(&value) {
        return Err(Error::invalid(field, "must be between 0 and 1"));
    }
    Ok(value)
}

impl SemanticLimits {
    /// Checks metadata: bounded pairs, non-empty keys, no NUL characters.
    pub fn metadata(
        &self,
        field: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, Error> {
        if metadata.len() > self.max_metadata_pairs {
            return Err(Error::invalid(
                field,
                format!(
                    "{} pairs; the limit is {}",
                    metadata.len(),
                    self.max_metadata_pairs
                ),
            ));
        }
        for (key, value) in &metadata {
            if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES || key.contains('\0') {
                return Err(Error::invalid(
                    field,
                    format!("key {key:?} must be 1 to {MAX_METADATA_KEY_BYTES} bytes without NUL"),
                ));
            }
            if value.len() > MAX_METADATA_VALUE_BYTES || value.contains('\0') {
                return Err(Error::invalid(
                    format!("{field}[{key}]"),
                    format!("must be at most {MAX_METADATA_VALUE_BYTES} bytes without NUL"),
                ));
            }
        }
        Ok(metadata)
    }

    /// Checks a caller's vector against the model's dimensions and returns it normalised;
    /// an empty vector means "none given".
    pub fn embedding(&self, field: &str, values: Vec<f32>) -> Result<Option<Vec<f32>>, Error> {
        if values.is_empty() {
            return Ok(None);
        }
        if values.len() != self.dimensions {
            return Err(Error::invalid(
                field,
                format!(
                    "has {} dimensions; the embedding model has {}",
                    values.len(),
                    self.dimensions
                ),
            ));
        }
        normalised(values)
            .map(Some)
            .ok_or_else(|| Error::invalid(field, "must be finite and not all zero"))
    }

    /// Checks the number of memories in one write.
    pub fn write_count(&self, count: usize) -> Result<(), Error> {
        if count == 0 || count > self.max_memories_per_write {
            return Err(Error::invalid(
                "memories",
                format!(
                    "between 1 and {} memories per call",
                    self.max_memories_per_write
                ),
            ));
        }
        Ok(())
    }
}

/// `values` scaled to unit length; `None` when a value is not finite or all are zero.
pub fn normalised(mut values: Vec<f32>) -> Option<Vec<f32>> {
    if values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return None;
    }
    for value in &mut values {
        *value /= norm;
    }
    Some(values)
}

/// The dot product of two vectors of equal length (the cosine when both are unit length).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// How search results are ranked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranking {
    pub recency_weight: f32,
    pub recency_half_life: Duration,
    pub importance_weight: f32,
}

impl Ranking {
    /// `similarity + recency_weight × 0.5^(age / half_life) + importance_weight × importance`,
    /// where age counts from the memory's last update (a merged duplicate refreshes it).
    pub fn score(
        &self,
        similarity: f32,
        updated_at: DateTime<Utc>,
        importance: f32,
        now: DateTime<Utc>,
    ) -> f32 {
        let age = (now - updated_at).to_std().unwrap_or_default();
        let half_lives = age.as_secs_f64() / self.recency_half_life.as_secs_f64().max(1e-9);
        let recency = 0.5f64.powf(half_lives) as f32;
        similarity + self.recency_weight * recency + self.importance_weight * importance
    }
}

/// What a search asks for beyond the query vector.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SearchFilter {
    /// Any of these; empty means every scope.
    pub scopes: Vec<Scope>,
    /// Every pair must be present with this value.
    pub metadata: BTreeMap<String, String>,
    pub min_similarity: f32,
}

impl SearchFilter {
    pub fn matches_scope(&self, kind: ScopeKind, id: &str) -> bool {
        self.scopes.is_empty()
            || self
                .scopes
                .iter()
                .any(|scope| scope.kind == kind && scope.id == id)
    }

    pub fn matches_metadata(&self, metadata: &BTreeMap<String, String>) -> bool {
        self.metadata
            .iter()
            .all(|(key, value)| metadata.get(key) == Some(value))
    }
}

/// The search result limit: the default when 0, at most the maximum.
pub fn search_limit(limit: u32) -> usize {
    match usize::try_from(limit).unwrap_or(usize::MAX) {
        0 => DEFAULT_SEARCH_LIMIT,
        n => n.min(MAX_SEARCH_LIMIT),
    }
}

/// A memory as stored, without its vector.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRecord {
    pub id: i64,
    pub scope: Scope,
    pub text: String,
    pub metadata: BTreeMap<String, String>,
    pub importance: f32,
    pub duplicate_count: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// What a write did for one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    pub id: i64,
    pub merged: bool,
    pub duplicate_count: u32,
}

/// A search hit with its scores.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredMemory {
    pub memory: MemoryRecord,
    pub score: f32,
    pub similarity: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SemanticLimits = SemanticLimits {
        max_text_bytes: 10,
        max_memories_per_write: 2,
        max_metadata_pairs: 1,
        dimensions: 3,
    };

    fn field(result: Result<impl fmt::Debug, Error>) -> String {
        match result {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn scopes_check_kind_and_id() {
        assert_eq!(field(Scope::new("scope", None, "x".into())), "scope.kind");
        assert_eq!(
            field(Scope::new("scope", Some(ScopeKind::Tenant), "x".into())),
            "scope.id"
        );
        assert_eq!(
            field(Scope::new("scope", Some(ScopeKind::Run), String::new())),
            "scope.id"
        );
        let scope = Scope::new("scope", Some(ScopeKind::Role), "coder".into()).expect("valid");
        assert_eq!(scope.to_string(), "role:coder");
        for kind in ScopeKind::ALL {
            assert_eq!(ScopeKind::parse(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn texts_metadata_and_embeddings_are_checked() {
        assert_eq!(field(check_text("text", "  ", 10)), "text");
        assert_eq!(field(check_text("text", "01234567890", 10)), "text");
        assert!(check_text("text", "0123456789", 10).is_ok());
        assert_eq!(field(check_importance("importance", 1.5)), "importance");
        assert_eq!(
            field(check_importance("importance", f32::NAN)),
            "importance"
        );
        let two = BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert_eq!(field(LIMITS.metadata("metadata", two)), "metadata");
        assert_eq!(
            field(LIMITS.embedding("embedding", vec![1.0, 0.0])),
            "embedding"
        );
        assert_eq!(
            field(LIMITS.embedding("embedding", vec![0.0, 0.0, 0.0])),
            "embedding"
        );
        let unit = LIMITS
            .embedding("embedding", vec![3.0, 0.0, 4.0])
            .expect("valid")
            .expect("given");
        assert!((dot(&unit, &unit) - 1.0).abs() < 1e-6);
        assert_eq!(LIMITS.embedding("embedding", vec![]).expect("valid"), None);
        assert_eq!(field(LIMITS.write_count(0)), "memories");
        assert_eq!(field(LIMITS.write_count(3)), "memories");
    }

    #[test]
    fn ranking_prefers_similar_then_recent_then_important() {
        let ranking = Ranking {
            recency_weight: 0.1,
            recency_half_life: Duration::from_secs(100),
            importance_weight: 0.1,
        };
        let now = Utc::now();
        let old = now - chrono::TimeDelta::seconds(100);
        let fresh = ranking.score(0.8, now, 0.5, now);
        assert!((fresh - (0.8 + 0.1 + 0.05)).abs() < 1e-6);
        // One half-life later the recency term has halved.
        assert!((ranking.score(0.8, old, 0.5, now) - (0.8 + 0.05 + 0.05)).abs() < 1e-6);
        assert!(ranking.score(0.8, now, 1.0, now) > fresh);
        // A memory "from the future" (clock skew between replicas) counts as new, not more.
        assert!(
            (ranking.score(0.8, now + chrono::TimeDelta::seconds(50), 0.5, now) - fresh).abs()
                < 1e-6
        );
    }

    #[test]
    fn filters_match_scopes_and_metadata() {
        let filter = SearchFilter {
            scopes: vec![Scope {
                kind: ScopeKind::Run,
                id: "r1".into(),
            }],
            metadata: BTreeMap::from([("lang".into(), "rust".into())]),
            min_similarity: 0.0,
        };
        assert!(filter.matches_scope(ScopeKind::Run, "r1"));
        assert!(!filter.matches_scope(ScopeKind::Run, "r2"));
        assert!(!filter.matches_scope(ScopeKind::Session, "r1"));
        assert!(SearchFilter::default().matches_scope(ScopeKind::Tenant, ""));
        let mut metadata = BTreeMap::from([("lang".into(), "rust".into())]);
        assert!(filter.matches_metadata(&metadata));
        metadata.insert("lang".into(), "go".into());
        assert!(!filter.matches_metadata(&metadata));
        assert_eq!(search_limit(0), DEFAULT_SEARCH_LIMIT);
        assert_eq!(search_limit(1000), MAX_SEARCH_LIMIT);
    }
}
