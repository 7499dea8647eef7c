//! The node's metadata sink: every entry goes to the metadata log and to usage accounting,
//! both off the message path (a channel send each; their tasks batch the work).

use super::policy::Policy;
use super::policy::model::Side;
use super::usage::{DomainSides, UsageAggregator};
use session_actor::{MetadataEntry, MetadataSink};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Internal or external, as the live policy says.
pub struct PolicySides(pub Arc<Policy>);

impl DomainSides for PolicySides {
    fn is_internal(&self, domain: &str) -> bool {
        self.0.current().side_of(domain) == Some(Side::Internal)
    }
}

enum Item {
    Entry(MetadataEntry),
    /// Answered once every entry sent before it has been added.
    Settle(oneshot::Sender<()>),
}

/// The sink edges and sessions record into.
pub struct Metering<L> {
    log: L,
    usage: mpsc::UnboundedSender<Item>,
}

impl<L: MetadataSink> Metering<L> {
    /// The sink, and the task that adds entries to `usage` (it ends when the sink is gone).
    pub fn new(log: L, usage: UsageAggregator) -> (Self, UsageFeed) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        let task = tokio::spawn(async move {
            let mut items = Vec::with_capacity(512);
            while rx.recv_many(&mut items, 512).await > 0 {
                for item in items.drain(..) {
                    match item {
                        Item::Entry(e) => usage.add(&e),
                        Item::Settle(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            }
        });
        (
            Self {
                log,
                usage: tx.clone(),
            },
            UsageFeed { tx, task },
        )
    }
}

impl<L: MetadataSink> MetadataSink for Metering<L> {
    fn record(&self, entry: MetadataEntry) {
        let _ = self.usage.send(Item::Entry(entry.clone()));
        self.log.record(entry);
    }
}

/// The usage side of [`Metering`].
pub struct UsageFeed {
    tx: mpsc::UnboundedSender<Item>,
    task: tokio::task::JoinHandle<()>,
}

impl UsageFeed {
    /// Waits until every entry recorded so far is in the aggregator.
    pub async fn settle(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Item::Settle(done)).is_ok() {
            let _ = wait.await;
        }
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}
