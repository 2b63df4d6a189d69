//! One OS thread per loaded model, fed by a bounded queue.
//!
//! Inference is long, CPU-bound work: it runs on a thread of its own so it never occupies an
//! async runtime worker, and the queue in front of it has a fixed bound so a burst is refused at
//! once (the caller sees [`InferenceError::QueueFull`]) instead of piling up unbounded latency.

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::metrics;
use crate::{InferenceError, ModelError};

/// When a model is read into memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loading {
    /// At start: a missing or corrupt model stops the service with a clear error.
    #[default]
    Eager,
    /// On the first request: start-up stays fast; a failed load is retried on the next request.
    Lazy,
}

/// A request a model thread works on; it can be refused with an error instead.
pub(crate) trait Job: Send + 'static {
    fn refuse(self, error: InferenceError);
}

/// The sending side of a model thread's queue.
pub(crate) struct ModelQueue<J> {
    kind: &'static str,
    capacity: usize,
    tx: mpsc::Sender<J>,
}

impl<J: Job> ModelQueue<J> {
    /// Starts the thread. `load` runs on it (models need not be `Send`): at once with
    /// [`Loading::Eager`], where this call waits for it and returns its error, or before the
    /// first job with [`Loading::Lazy`]. `serve` answers one job and may take more from the
    /// receiver (to batch them).
    pub(crate) fn start<M, L, S>(
        kind: &'static str,
        capacity: usize,
        loading: Loading,
        load: L,
        mut serve: S,
    ) -> Result<Self, ModelError>
    where
        M: 'static,
        L: Fn() -> Result<M, ModelError> + Send + 'static,
        S: FnMut(&mut M, J, &mut mpsc::Receiver<J>) + Send + 'static,
    {
        let capacity = capacity.max(1);
        let (tx, mut rx) = mpsc::channel::<J>(capacity);
        let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel::<Result<(), ModelError>>(1);
        std::thread::Builder::new()
            .name(format!("colony-{kind}-model"))
            .spawn(move || {
                let mut model = None;
                if loading == Loading::Eager {
                    match load() {
                        Ok(loaded) => {
                            model = Some(loaded);
                            let _ = loaded_tx.send(Ok(()));
                        }
                        Err(err) => {
                            let _ = loaded_tx.send(Err(err));
                            return;
                        }
                    }
                }
                while let Some(job) = rx.blocking_recv() {
                    metrics::gauge_queue_depth(kind, rx.len());
                    if model.is_none() {
                        match load() {
                            Ok(loaded) => model = Some(loaded),
                            Err(err) => {
                                tracing::error!(kind, error = %err, "local model failed to load");
                                job.refuse(err.into());
                                continue;
                            }
                        }
                    }
                    if let Some(model) = model.as_mut() {
                        serve(model, job, &mut rx);
                    }
                }
            })
            .map_err(|err| ModelError::Load {
                what: kind,
                reason: format!("cannot start its thread: {err}"),
            })?;
        if loading == Loading::Eager {
            loaded_rx.recv().map_err(|_| ModelError::Load {
                what: kind,
                reason: "its thread stopped while loading".into(),
            })??;
        }
        Ok(Self { kind, capacity, tx })
    }

    /// Queues a job, or refuses it at once when the queue is full or the thread has stopped.
    pub(crate) fn submit(&self, job: J) -> Result<(), InferenceError> {
        match self.tx.try_send(job) {
            Ok(()) => {
                metrics::gauge_queue_depth(self.kind, self.capacity - self.tx.capacity());
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                ::metrics::counter!(metrics::QUEUE_REFUSED, "kind" => self.kind).increment(1);
                Err(InferenceError::QueueFull {
                    kind: self.kind,
                    capacity: self.capacity,
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(InferenceError::Stopped { kind: self.kind })
            }
        }
    }
}
