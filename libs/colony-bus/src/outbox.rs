//! The transactional outbox: a service writes the event into its outbox table in the same
//! transaction as the state change; the relay publishes the rows and deletes them once
//! JetStream has acknowledged them.
//!
//! Nothing is lost on a crash between commit and publish (the row stays and the next relay
//! pass, on any replica, publishes it), and nothing is published twice in a way that matters:
//! `FOR UPDATE SKIP LOCKED` keeps two relays off the same row, and the row's `msg_id` travels
//! as `Nats-Msg-Id`, so JetStream drops a repeat after a crash between publish and delete
//! (within the stream's duplicate window). Sent rows are deleted rather than marked: marking
//! wrote a new version of every row and of its index entries, which under load cost
//! PostgreSQL more than the rest of a task's work (see docs/benchmarks.md).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::{Bus, Error, Outgoing, metrics};

/// One service's outbox table. `table` and `channel` are compile-time constants of the owning
/// service (they are formatted into SQL, never taken from input).
#[derive(Debug, Clone, Copy)]
pub struct Outbox {
    table: &'static str,
    channel: &'static str,
}

/// One message for [`Outbox::enqueue_many`]: the logical subject, the `Nats-Msg-Id` that
/// makes a repeat harmless, and the encoded protobuf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub subject: String,
    pub msg_id: String,
    pub payload: Vec<u8>,
    /// The trace the message continues; `None` takes the enqueuing span's. Set for rows
    /// written away from the request they belong to (a batch writer's task has no span of
    /// its own worth continuing).
    pub traceparent: Option<String>,
}

impl OutboxRow {
    pub fn new<M: prost::Message>(subject: &str, msg_id: &str, message: &M) -> Self {
        Self {
            subject: subject.to_owned(),
            msg_id: msg_id.to_owned(),
            payload: message.encode_to_vec(),
            traceparent: None,
        }
    }

    /// The row carrying `traceparent` instead of the enqueuing span's trace context.
    pub fn with_traceparent(self, traceparent: Option<String>) -> Self {
        Self {
            traceparent,
            ..self
        }
    }
}

#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Rows published per pass.
    pub batch: i64,
    /// Pass interval when no notification arrives (notifications make it near-instant).
    pub poll_interval: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch: 256,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Whether `table` names an outbox table as `schema.table`, each part a plain lower-case SQL
/// identifier (letters, digits, `_`, not starting with a digit).
pub fn is_table_name(table: &str) -> bool {
    let plain = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|first| first.is_ascii_lowercase() || first == '_')
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    table
        .split_once('.')
        .is_some_and(|(schema, name)| plain(schema) && plain(name))
}

/// How long the oldest row of the outbox `table` (`schema.table`) has waited, in seconds; 0
/// when the table is empty. Sent rows are deleted, so every row waits. For observers that know
/// a service's outbox by name only (the monitor): the owning service's relay reports its own
/// lag as `colony_outbox_lag_seconds`, but a relay that stopped reports nothing.
pub async fn oldest_age_seconds(pool: &PgPool, table: &str) -> Result<f64, sqlx::Error> {
    // Quoted part by part, so no name can be more than an identifier.
    let quoted: Vec<String> = table
        .split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect();
    let age: Option<f64> = sqlx::query_scalar(&format!(
        "SELECT EXTRACT(EPOCH FROM (now() - created_at))::float8 FROM {} ORDER BY id LIMIT 1",
        quoted.join(".")
    ))
    .fetch_optional(pool)
    .await?;
    Ok(age.unwrap_or(0.0).max(0.0))
}

/// The in-process wake-up of each table's relay (see [`Outbox::quiet`]).
static WAKERS: LazyLock<Mutex<HashMap<&'static str, Arc<tokio::sync::Notify>>>> =
    LazyLock::new(Mutex::default);

impl Outbox {
    /// `table` as `schema.outbox`; `channel` is the `LISTEN` channel that wakes the relay.
    pub const fn new(table: &'static str, channel: &'static str) -> Self {
        Self { table, channel }
    }

    pub fn table(&self) -> &'static str {
        self.table
    }

    /// Makes the rows the caller's transaction enqueues from now on wake no relay through
    /// PostgreSQL: the caller calls [`Outbox::wake`] once it has committed, which wakes this
    /// process's relay. For busy paths: every transaction that calls `pg_notify` takes
    /// PostgreSQL's notification-queue lock at commit and holds it across its WAL flush, so
    /// notifying transactions commit one at a time. Other replicas' relays still find the rows
    /// at their next poll.
    pub async fn quiet(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query("SELECT set_config('colony.outbox_quiet', 'on', true)")
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Wakes this process's relay (after a [`Outbox::quiet`] transaction committed).
    pub fn wake(&self) {
        self.waker().notify_one();
    }

    fn waker(&self) -> Arc<tokio::sync::Notify> {
        let mut wakers = match WAKERS.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        wakers.entry(self.table).or_default().clone()
    }

    /// Adds `message` for the logical `subject` inside the caller's transaction.
    pub async fn enqueue<M: prost::Message>(
        &self,
        conn: &mut PgConnection,
        subject: &str,
        msg_id: &str,
        message: &M,
    ) -> Result<(), Error> {
        self.enqueue_many(conn, &[OutboxRow::new(subject, msg_id, message)])
            .await
    }

    /// Adds `rows` inside the caller's transaction, in one statement. Each row's own trace
    /// context, or else the current span's, is stored with it so the trace continues across
    /// the relay; a row whose `msg_id` is still waiting to be sent is skipped.
    pub async fn enqueue_many(
        &self,
        conn: &mut PgConnection,
        rows: &[OutboxRow],
    ) -> Result<(), Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let traceparent = colony_telemetry::current_traceparent();
        let msg_ids: Vec<&str> = rows.iter().map(|row| row.msg_id.as_str()).collect();
        let subjects: Vec<&str> = rows.iter().map(|row| row.subject.as_str()).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|row| row.payload.as_slice()).collect();
        let traceparents: Vec<Option<&str>> =
            rows.iter().map(|row| row.traceparent.as_deref()).collect();
        // The notification is delivered at commit, so the relay wakes only for committed rows.
        // A quiet transaction (see `quiet`) sends none; the count keeps exactly one row to
        // join either way.
        sqlx::query(&format!(
            "INSERT INTO {} (msg_id, subject, payload, traceparent) \
             SELECT u.msg_id, u.subject, u.payload, coalesce(u.traceparent, $4) \
             FROM unnest($1::text[], $2::text[], $3::bytea[], $6::text[]) \
                      AS u(msg_id, subject, payload, traceparent), \
                  (SELECT count(*) FROM (SELECT pg_notify($5, '') \
                       WHERE current_setting('colony.outbox_quiet', true) \
                             IS DISTINCT FROM 'on') n) AS notified \
             ON CONFLICT (msg_id) DO NOTHING",
            self.table
        ))
        .bind(&msg_ids)
        .bind(&subjects)
        .bind(&payloads)
        .bind(traceparent)
        .bind(self.channel)
        .bind(&traceparents)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Publishes up to `batch` rows and deletes those JetStream acknowledged. Returns how many
    /// were sent.
    pub async fn relay_once(&self, pool: &PgPool, bus: &Bus, batch: i64) -> Result<usize, Error> {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT id, msg_id, subject, payload, traceparent, \
                    EXTRACT(EPOCH FROM (now() - created_at))::float8 AS age \
             FROM {} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            self.table
        ))
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let lag = rows
            .first()
            .map(|row| row.get::<f64, _>("age"))
            .unwrap_or(0.0);
        ::metrics::gauge!(metrics::OUTBOX_LAG_SECONDS, "table" => self.table).set(lag);
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let stored: Vec<(i64, String, String, Bytes, Option<String>)> = rows
            .iter()
            .map(|row| {
                (
                    row.get("id"),
                    row.get("subject"),
                    row.get("msg_id"),
                    Bytes::from(row.get::<Vec<u8>, _>("payload")),
                    row.get("traceparent"),
                )
            })
            .collect();
        let messages: Vec<Outgoing<'_>> = stored
            .iter()
            .map(|(_, subject, msg_id, payload, traceparent)| Outgoing {
                subject,
                msg_id,
                traceparent: traceparent.as_deref(),
                payload: payload.clone(),
            })
            .collect();
        let acks = bus.publish_all(&messages).await;
        let sent: Vec<i64> = stored
            .iter()
            .zip(acks)
            .filter_map(|((id, ..), ack)| match ack {
                Ok(()) => Some(*id),
                Err(error) => {
                    tracing::warn!(%error, table = self.table, "outbox publish failed");
                    None
                }
            })
            .collect();
        sqlx::query(&format!("DELETE FROM {} WHERE id = ANY($1)", self.table))
            .bind(&sent)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        ::metrics::counter!(metrics::OUTBOX_RELAYED, "table" => self.table)
            .increment(sent.len() as u64);
        Ok(sent.len())
    }

    /// Relays until `shutdown`: woken by `NOTIFY` on commit, by [`Outbox::wake`] in this
    /// process, and by a poll as a safety net.
    /// On start it publishes whatever an earlier process left unsent.
    pub async fn run_relay(
        self,
        pool: PgPool,
        bus: Bus,
        options: RelayOptions,
        shutdown: CancellationToken,
    ) {
        let mut listener = None;
        let waker = self.waker();
        let mut failures = 0u32;
        loop {
            if listener.is_none() {
                listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(mut l) => match l.listen(self.channel).await {
                        Ok(()) => Some(l),
                        Err(error) => {
                            tracing::warn!(%error, "outbox listen failed; polling");
                            None
                        }
                    },
                    Err(error) => {
                        tracing::warn!(%error, "outbox listener connect failed; polling");
                        None
                    }
                };
            }
            let sent = match self.relay_once(&pool, &bus, options.batch).await {
                Ok(sent) => {
                    failures = 0;
                    sent
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    ::metrics::counter!(metrics::OUTBOX_ERRORS, "table" => self.table).increment(1);
                    tracing::warn!(%error, table = self.table, failures, "outbox relay pass failed");
                    let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => continue,
                    }
                }
            };
            if sent as i64 >= options.batch {
                continue;
            }
            let wait = async {
                match listener.as_mut() {
                    Some(l) => match tokio::time::timeout(options.poll_interval, l.recv()).await {
                        Ok(Ok(_)) | Err(_) => {}
                        Ok(Err(error)) => {
                            tracing::warn!(%error, "outbox listener lost");
                            return false;
                        }
                    },
                    None => tokio::time::sleep(options.poll_interval).await,
                }
                true
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = waker.notified() => {}
                healthy = wait => if !healthy { listener = None },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_table_name;

    #[test]
    fn table_names_are_schema_dot_table_of_plain_identifiers() {
        for good in ["orchestrator.outbox", "router.outbox", "_a.b_2"] {
            assert!(is_table_name(good), "{good}");
        }
        for bad in [
            "outbox",
            "a.b.c",
            ".outbox",
            "router.",
            "Router.outbox",
            "2x.outbox",
            "router.outbox; DROP TABLE x",
            "router.\"outbox\"",
        ] {
            assert!(!is_table_name(bad), "{bad}");
        }
    }
}
