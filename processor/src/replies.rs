//! The client side of replies: waiting for the [`Reply`] to a command one produced.
//!
//! A [`ReplyWaiter`] reads every partition of a reply topic from the positions it has when
//! the waiter starts, with no consumer group and no commits, and hands each reply to the
//! callers that said they [`expect`](ReplyWaiter::expect) it. Replies nobody waits for are
//! dropped: that filter is what lets any number of waiters (gateways, `produce --wait`
//! runs) share one reply topic while keeping no state but their pending keys.
//!
//! ```no_run
//! # async fn f(producer: processor::producer::CommandProducer, command: commands::Command)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use processor::replies::ReplyWaiter;
//!
//! let replies = producer.topic().replies();
//! let waiter = ReplyWaiter::start("127.0.0.1:9092", &replies).await?;
//! // Say what you wait for before producing, so a fast reply is not missed.
//! let pending = waiter.expect(command.source.as_str(), command.id.as_str());
//! producer.send(&command.with_reply_to(replies)).await?;
//! match pending.wait(Duration::from_secs(10)).await {
//!     Some(reply) => println!("{}", reply.outcome.name()),
//!     None => println!("no reply within 10s"),
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use commands::reply::{Reply, ReplyCommand};
use commands::Topic;

/// How long starting a waiter waits for the broker's metadata and watermarks.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a [`ReplyWaiter`] cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The reply topic does not exist.
    #[error("the reply topic {topic} does not exist at {brokers}; create it with `cmdproc topics create`")]
    TopicMissing {
        /// The topic.
        topic: String,
        /// The bootstrap servers.
        brokers: String,
    },
    /// The broker could not be reached or refused a request.
    #[error("cannot read the reply topic {topic} at {brokers}: {what}: {source}")]
    Kafka {
        /// The topic.
        topic: String,
        /// The bootstrap servers.
        brokers: String,
        /// The step that failed.
        what: &'static str,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

/// The callers waiting for a reply, by the command's idempotency key, each under a number of
/// its own so that dropping one forgets only it.
type Pending = HashMap<ReplyCommand, HashMap<u64, oneshot::Sender<Reply>>>;

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    next_waiter: AtomicU64,
    running: AtomicBool,
}

impl Shared {
    fn deliver(&self, reply: Reply) {
        let waiters = self
            .pending
            .lock()
            .expect("pending replies")
            .remove(&reply.command);
        for (_, sender) in waiters.into_iter().flatten() {
            // A caller that stopped waiting dropped its receiver: nothing to do.
            let _ = sender.send(reply.clone());
        }
    }

    fn forget(&self, key: &ReplyCommand, waiter: u64) {
        let mut pending = self.pending.lock().expect("pending replies");
        if let Some(waiters) = pending.get_mut(key) {
            waiters.remove(&waiter);
            if waiters.is_empty() {
                pending.remove(key);
            }
        }
    }
}

/// Reads a reply topic and hands each reply to whoever waits for it. Cheap to clone; the
/// reading task stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct ReplyWaiter {
    shared: Arc<Shared>,
    topic: Topic,
    _stop: Arc<DropGuard>,
}

impl ReplyWaiter {
    /// Reads every partition of `topic` from the positions it has now (the high watermarks,
    /// assigned at explicit offsets, `read_committed`, no consumer group, no commits), so
    /// any reply produced after `start` returns is seen. Must run inside a Tokio runtime.
    pub async fn start(brokers: &str, topic: &commands::Topic) -> Result<Self, ReplyError> {
        let kafka = |what: &'static str| {
            let topic = topic.to_string();
            let brokers = brokers.to_owned();
            move |source| ReplyError::Kafka {
                topic,
                brokers,
                what,
                source,
            }
        };
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // librdkafka wants a group id even for a consumer that only assigns; it joins
            // no group and commits nothing, so a unique one leaves no trace on the broker.
            .set(
                "group.id",
                format!("cmdproc-replies-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(kafka("creating the consumer"))?;
        // Metadata and watermarks are blocking calls of librdkafka.
        let name = topic.to_string();
        let (consumer, assignment) = tokio::task::spawn_blocking(move || {
            let assignment = positions_now(&consumer, &name);
            (consumer, assignment)
        })
        .await
        .expect("reading the reply topic's positions does not panic");
        let assignment = match assignment {
            Ok(Some(a)) => a,
            Ok(None) => {
                return Err(ReplyError::TopicMissing {
                    topic: topic.to_string(),
                    brokers: brokers.to_owned(),
                })
            }
            Err((what, source)) => return Err(kafka(what)(source)),
        };
        consumer
            .assign(&assignment)
            .map_err(kafka("assigning the partitions"))?;

        let shared = Arc::new(Shared::default());
        shared.running.store(true, Ordering::SeqCst);
        let stop = CancellationToken::new();
        tokio::spawn(read_replies(
            consumer,
            topic.clone(),
            Arc::clone(&shared),
            stop.clone(),
        ));
        Ok(Self {
            shared,
            topic: topic.clone(),
            _stop: Arc::new(stop.drop_guard()),
        })
    }

    /// Interest in the reply to the command `(source, id)`. Call it before producing the
    /// command. Several callers may wait on the same key (a retry in flight while the first
    /// attempt waits): each gets the reply. Dropping the returned value forgets the interest.
    pub fn expect(&self, source: &str, id: &str) -> PendingReply {
        let key = ReplyCommand {
            source: source.to_owned(),
            id: id.to_owned(),
        };
        let waiter = self.shared.next_waiter.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .expect("pending replies")
            .entry(key.clone())
            .or_default()
            .insert(waiter, sender);
        PendingReply {
            shared: Arc::clone(&self.shared),
            key,
            waiter,
            receiver: Some(receiver),
        }
    }

    /// The reply topic this waiter reads.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Whether the task reading the reply topic still runs (it stops only when every clone
    /// of the waiter is dropped, or on a fatal Kafka error).
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// How many callers wait for a reply now.
    pub fn waiting(&self) -> usize {
        self.shared
            .pending
            .lock()
            .expect("pending replies")
            .values()
            .map(HashMap::len)
            .sum()
    }
}

/// A caller's interest in one reply, from [`ReplyWaiter::expect`].
#[derive(Debug)]
pub struct PendingReply {
    shared: Arc<Shared>,
    key: ReplyCommand,
    waiter: u64,
    receiver: Option<oneshot::Receiver<Reply>>,
}

impl PendingReply {
    /// Waits for the reply up to `timeout`; `None` when none came in time.
    pub async fn wait(mut self, timeout: Duration) -> Option<commands::Reply> {
        let receiver = self.receiver.take()?;
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(reply)) => Some(reply),
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.shared.forget(&self.key, self.waiter);
    }
}

/// The assignment of every partition of `topic` at its high watermark, or `None` when the
/// topic does not exist.
fn positions_now(
    consumer: &StreamConsumer,
    topic: &str,
) -> Result<Option<TopicPartitionList>, (&'static str, rdkafka::error::KafkaError)> {
    let metadata = consumer
        .fetch_metadata(Some(topic), START_TIMEOUT)
        .map_err(|e| ("reading the metadata", e))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if found.error().is_some() || found.partitions().is_empty() {
        return Ok(None);
    }
    let mut assignment = TopicPartitionList::new();
    for partition in found.partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition.id(), START_TIMEOUT)
            .map_err(|e| ("reading the watermarks", e))?;
        assignment
            .add_partition_offset(topic, partition.id(), Offset::Offset(high))
            .map_err(|e| ("assigning the partitions", e))?;
    }
    Ok(Some(assignment))
}

async fn read_replies(
    consumer: StreamConsumer,
    topic: Topic,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            m = consumer.recv() => m,
        };
        match message {
            Ok(m) => match m.payload().map(Reply::from_cloudevent) {
                Some(Ok(reply)) => shared.deliver(reply),
                // Not a reply: someone else's message on the topic; nobody waits for it.
                Some(Err(e)) => {
                    tracing::debug!(%topic, partition = m.partition(), offset = m.offset(), error = %e, "ignoring a message that is not a reply");
                }
                None => {}
            },
            // librdkafka retries on its own; a transient broker error only delays replies.
            Err(e) => {
                tracing::warn!(%topic, error = %e, "reading the reply topic");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    shared.running.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use commands::reply::ReplyOutcome;

    fn reply(id: &str) -> Reply {
        Reply {
            command: ReplyCommand {
                source: "/s".into(),
                id: id.into(),
            },
            outcome: ReplyOutcome::KeyReused { reason: "r".into() },
            duplicate: false,
        }
    }

    #[tokio::test]
    async fn every_caller_waiting_on_a_key_gets_its_reply_and_only_it() {
        let shared = Arc::new(Shared::default());
        let waiter = |id: &str| {
            let key = ReplyCommand {
                source: "/s".into(),
                id: id.into(),
            };
            let (sender, receiver) = oneshot::channel();
            let n = shared.next_waiter.fetch_add(1, Ordering::Relaxed);
            shared
                .pending
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default()
                .insert(n, sender);
            PendingReply {
                shared: Arc::clone(&shared),
                key,
                waiter: n,
                receiver: Some(receiver),
            }
        };
        let first = waiter("c-1");
        let retry = waiter("c-1");
        let other = waiter("c-2");
        let forgotten = waiter("c-3");
        drop(forgotten);
        shared.deliver(reply("c-1"));
        shared.deliver(reply("c-3"));
        let short = Duration::from_millis(50);
        assert_eq!(first.wait(short).await, Some(reply("c-1")));
        assert_eq!(retry.wait(short).await, Some(reply("c-1")));
        assert_eq!(other.wait(short).await, None);
        assert!(shared.pending.lock().unwrap().is_empty());
    }
}
