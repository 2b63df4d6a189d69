//! Natural batching: requests that arrive while the previous batch is being handled go out
//! together in the next one. An idle system handles a request at once (a batch of one); a
//! busy one shares one round trip or one transaction among many requests, without a timer.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

struct Pending<T, R> {
    item: T,
    answer: oneshot::Sender<R>,
}

/// Where requests are queued; cheap to clone.
pub struct BatchQueue<T, R> {
    sender: mpsc::Sender<Pending<T, R>>,
}

impl<T, R> Clone for BatchQueue<T, R> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
        }
    }
}

/// Hands queued requests to the handler in batches; run it on the service's runtime.
pub struct BatchLoop<T, R> {
    receiver: mpsc::Receiver<Pending<T, R>>,
    max: usize,
}

/// Why a request got no answer: the loop stopped (shutdown) before handling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the batch loop stopped")]
pub struct Stopped;

/// A queue of at most `capacity` waiting requests (more wait for room) whose loop hands the
/// handler at most `max` at once.
pub fn batch_queue<T, R>(capacity: usize, max: usize) -> (BatchQueue<T, R>, BatchLoop<T, R>) {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    (
        BatchQueue { sender },
        BatchLoop {
            receiver,
            max: max.max(1),
        },
    )
}

impl<T, R> BatchQueue<T, R> {
    /// Queues `item` and waits for its answer.
    pub async fn call(&self, item: T) -> Result<R, Stopped> {
        let (answer, answered) = oneshot::channel();
        self.sender
            .send(Pending { item, answer })
            .await
            .map_err(|_| Stopped)?;
        answered.await.map_err(|_| Stopped)
    }
}

impl<T, R> BatchLoop<T, R> {
    /// Until `shutdown` or until every queue handle is gone: takes what waits (at least one
    /// request), calls `handle` with it, and answers each request with the handler's answer
    /// at the same position. Answers the handler did not give leave their callers with
    /// [`Stopped`].
    pub async fn run<F, Fut>(mut self, shutdown: CancellationToken, mut handle: F)
    where
        F: FnMut(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                first = self.receiver.recv() => match first {
                    Some(first) => first,
                    None => return,
                },
            };
            let mut batch = vec![first];
            while batch.len() < self.max {
                match self.receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let (items, answers): (Vec<T>, Vec<oneshot::Sender<R>>) = batch
                .into_iter()
                .map(|pending| (pending.item, pending.answer))
                .unzip();
            let results = handle(items).await;
            for (answer, result) in answers.into_iter().zip(results) {
                // A caller that went away no longer needs its answer.
                let _ = answer.send(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn requests_waiting_together_are_handled_together_and_answered_in_place() {
        let (queue, batches) = batch_queue::<u32, u32>(16, 3);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let shutdown = CancellationToken::new();
        let runner = batches.run(shutdown.clone(), move |items: Vec<u32>| {
            recorded.lock().unwrap().push(items.len());
            async move { items.into_iter().map(|n| n * 10).collect() }
        });
        // The five are queued before the loop first runs: they go out as 3 + 2.
        let callers = async {
            let answers = futures::future::join_all((1..=5).map(|n| queue.call(n))).await;
            shutdown.cancel();
            answers
        };
        let (answers, ()) = tokio::join!(callers, runner);
        let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, [10, 20, 30, 40, 50]);
        assert_eq!(*seen.lock().unwrap(), [3, 2]);
        assert_eq!(queue.call(6).await, Err(Stopped));
    }
}
