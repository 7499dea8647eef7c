//! Coalescing many small writes into few large ones without adding latency.
//!
//! A [`Batcher`] runs one task that owns up to `concurrency` flush slots. It waits for a free
//! slot, then takes every job already queued (up to `max_items` items) and flushes them
//! together. When the system is idle a job is flushed alone and at once; under load jobs pile up
//! while the slots are busy and leave in large batches — no timer, no added delay.
//!
//! Jobs of different callers share a flush, so one caller's bad item must not fail the others:
//! when a shared flush fails with an error `split` says may be about the content, each job is
//! flushed again on its own.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

struct Job<T, R, E> {
    items: Vec<T>,
    reply: oneshot::Sender<Result<Vec<R>, E>>,
}

/// Submits items to a flush function shared by many callers; each caller gets back the
/// results of its own items.
pub struct Batcher<T, R, E> {
    tx: mpsc::Sender<Job<T, R, E>>,
}

impl<T, R, E> Clone for Batcher<T, R, E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

/// The batcher's task is gone (the node is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("batcher stopped")]
pub struct Stopped;

impl<T, R, E> Batcher<T, R, E>
where
    T: Clone + Send + 'static,
    R: Send + 'static,
    E: Clone + Send + 'static,
{
    /// `flush` gets a batch and returns one result per item, in order (or one error for all).
    /// `split` says whether an error of a shared flush may be one job's fault (then each job is
    /// flushed again alone); items are cloned only for flushes shared by several jobs.
    pub fn spawn<F, Fut>(
        max_items: usize,
        concurrency: usize,
        queue: usize,
        split: fn(&E) -> bool,
        flush: F,
    ) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, E>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let (max_items, concurrency) = (max_items.max(1), concurrency.max(1));
        tokio::spawn(run(rx, max_items, concurrency, split, Arc::new(flush)));
        Self { tx }
    }

    pub async fn submit(&self, items: Vec<T>) -> Result<Result<Vec<R>, E>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { items, reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}

async fn run<T, R, E, F, Fut>(
    mut rx: mpsc::Receiver<Job<T, R, E>>,
    max_items: usize,
    concurrency: usize,
    split: fn(&E) -> bool,
    flush: Arc<F>,
) where
    T: Clone + Send + 'static,
    R: Send + 'static,
    E: Clone + Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<R>, E>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut carry: Option<Job<T, R, E>> = None;
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let mut count = first.items.len();
        let mut jobs = vec![first];
        while count < max_items {
            match rx.try_recv() {
                Ok(j) if count + j.items.len() > max_items => {
                    carry = Some(j);
                    break;
                }
                Ok(j) => {
                    count += j.items.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let flush = flush.clone();
        tokio::spawn(async move {
            flush_jobs(jobs, count, split, flush.as_ref()).await;
            drop(permit);
        });
    }
}

/// Flushes the jobs together, answering each caller with its own results.
async fn flush_jobs<T, R, E, F, Fut>(
    mut jobs: Vec<Job<T, R, E>>,
    count: usize,
    split: fn(&E) -> bool,
    flush: &F,
) where
    T: Clone,
    E: Clone,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Result<Vec<R>, E>>,
{
    if jobs.len() == 1 {
        if let Some(job) = jobs.pop() {
            let _ = job.reply.send(flush(job.items).await);
        }
        return;
    }
    let mut items = Vec::with_capacity(count);
    for j in &jobs {
        items.extend(j.items.iter().cloned());
    }
    match flush(items).await {
        Ok(results) => {
            let mut results = results.into_iter();
            for j in jobs {
                let n = j.items.len();
                let _ = j.reply.send(Ok(results.by_ref().take(n).collect()));
            }
        }
        Err(e) if split(&e) => {
            for j in jobs {
                let _ = j.reply.send(flush(j.items).await);
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn callers_get_their_own_results_and_batches_form_under_load() -> Result<(), Stopped> {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Notify::new());
        let (s, g) = (sizes.clone(), gate.clone());
        let b: Batcher<u32, u32, String> = Batcher::spawn(
            100,
            1,
            1000,
            |_| false,
            move |items: Vec<u32>| {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    let first = s
                        .lock()
                        .map(|mut v| {
                            v.push(items.len());
                            v.len() == 1
                        })
                        .unwrap_or(false);
                    if first {
                        // Hold the only slot so the next callers queue up.
                        g.notified().await;
                    }
                    Ok(items.iter().map(|i| i * 10).collect())
                }
            },
        );
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.submit(vec![1]).await }
        });
        // Wait until the first flush holds the slot.
        while sizes.lock().map(|v| v.is_empty()).unwrap_or(false) {
            tokio::task::yield_now().await;
        }
        let mut rest = Vec::new();
        for i in 0..5u32 {
            let b = b.clone();
            rest.push(tokio::spawn(async move {
                b.submit(vec![i * 2, i * 2 + 1]).await
            }));
        }
        // Let the five submissions reach the queue, then open the gate.
        while b.tx.capacity() > 1000 - 5 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(
            first.await.ok().and_then(|r| r.ok()).and_then(|r| r.ok()),
            Some(vec![10])
        );
        for (i, h) in rest.into_iter().enumerate() {
            let got = h.await.ok().and_then(|r| r.ok()).and_then(|r| r.ok());
            let i = i as u32;
            assert_eq!(got, Some(vec![i * 20, i * 20 + 10]));
        }
        let sizes = sizes.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(sizes, vec![1, 10], "the five queued jobs left as one batch");
        Ok(())
    }

    #[tokio::test]
    async fn one_jobs_bad_item_does_not_fail_the_others() -> Result<(), Stopped> {
        let gate = Arc::new(tokio::sync::Notify::new());
        let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, h) = (gate.clone(), held.clone());
        // Fails the whole flush when it holds a 0; the first flush waits at the gate so the
        // next three jobs share one flush.
        let b: Batcher<u32, u32, String> = Batcher::spawn(
            100,
            1,
            100,
            |_| true,
            move |items: Vec<u32>| {
                let (g, h) = (g.clone(), h.clone());
                async move {
                    if !h.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        g.notified().await;
                    }
                    if items.contains(&0) {
                        Err("bad item".to_string())
                    } else {
                        Ok(items)
                    }
                }
            },
        );
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.submit(vec![9]).await }
        });
        while !held.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        let jobs: Vec<_> = [vec![1, 2], vec![0], vec![3]]
            .into_iter()
            .map(|items| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(items).await })
            })
            .collect();
        while b.tx.capacity() > 100 - 3 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(
            first.await.ok().and_then(|r| r.ok()).and_then(|r| r.ok()),
            Some(vec![9])
        );
        let mut got = Vec::new();
        for j in jobs {
            got.push(j.await.ok().and_then(|r| r.ok()));
        }
        assert_eq!(
            got,
            vec![
                Some(Ok(vec![1, 2])),
                Some(Err("bad item".to_string())),
                Some(Ok(vec![3]))
            ]
        );
        Ok(())
    }
}
