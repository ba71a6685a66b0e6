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
use uuid::Uuid;

use crate::producer::Delivery;

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
type Pending = HashMap<ReplyCommand, HashMap<u64, Waiter>>;

/// One caller waiting, and which replies to the key it takes.
#[derive(Debug)]
struct Waiter {
    sender: oneshot::Sender<Reply>,
    takes: Takes,
}

/// Which replies to its key a waiter takes.
#[derive(Debug)]
enum Takes {
    /// The first one ([`ReplyWaiter::expect`]).
    Any,
    /// Only the reply to its own delivery, not yet known: replies are kept until
    /// [`PendingReply::for_delivery`] says which ([`ReplyWaiter::expect_delivery`]).
    Unsettled(Vec<(Reply, Option<Uuid>)>),
    /// Only a reply with one of these CloudEvent ids (the delivery's reply, or its dead
    /// letter's).
    Only([Uuid; 2]),
}

impl Takes {
    fn accepts(&self, reply_id: Option<Uuid>) -> bool {
        match self {
            Takes::Any => true,
            Takes::Unsettled(_) => false,
            Takes::Only(ids) => reply_id.is_some_and(|id| ids.contains(&id)),
        }
    }
}

/// The CloudEvent `id` of a reply, which names the delivery it answers.
#[derive(serde::Deserialize)]
struct ReplyId {
    id: Option<Uuid>,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    next_waiter: AtomicU64,
    running: AtomicBool,
}

impl Shared {
    fn deliver(&self, reply: Reply, reply_id: Option<Uuid>) {
        let mut pending = self.pending.lock().expect("pending replies");
        let Some(waiters) = pending.get_mut(&reply.command) else {
            return;
        };
        let taking: Vec<u64> = waiters
            .iter_mut()
            .filter_map(|(n, waiter)| {
                if let Takes::Unsettled(kept) = &mut waiter.takes {
                    kept.push((reply.clone(), reply_id));
                }
                waiter.takes.accepts(reply_id).then_some(*n)
            })
            .collect();
        for n in taking {
            if let Some(waiter) = waiters.remove(&n) {
                // A caller that stopped waiting dropped its receiver: nothing to do.
                let _ = waiter.sender.send(reply.clone());
            }
        }
        if waiters.is_empty() {
            pending.remove(&reply.command);
        }
    }

    fn settle(&self, key: &ReplyCommand, waiter: u64, ids: [Uuid; 2]) {
        let mut pending = self.pending.lock().expect("pending replies");
        let Some(waiters) = pending.get_mut(key) else {
            return;
        };
        let Some(entry) = waiters.get_mut(&waiter) else {
            return;
        };
        let kept = match std::mem::replace(&mut entry.takes, Takes::Only(ids)) {
            Takes::Unsettled(kept) => kept,
            _ => Vec::new(),
        };
        if let Some((reply, _)) = kept.into_iter().find(|(_, id)| entry.takes.accepts(*id)) {
            if let Some(entry) = waiters.remove(&waiter) {
                let _ = entry.sender.send(reply);
            }
            if waiters.is_empty() {
                pending.remove(key);
            }
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
        self.register(source, id, Takes::Any)
    }

    /// Like [`expect`](Self::expect), for the reply to one delivery only: after producing,
    /// say which with [`PendingReply::for_delivery`]; replies to the key that arrive before
    /// are kept until then. Replies to other deliveries of the same key (an earlier
    /// attempt's late reply, or another caller's command reusing the key) go to whoever
    /// waits for them, so each caller learns what became of its own delivery.
    pub fn expect_delivery(&self, source: &str, id: &str) -> PendingReply {
        self.register(source, id, Takes::Unsettled(Vec::new()))
    }

    fn register(&self, source: &str, id: &str, takes: Takes) -> PendingReply {
        register(&self.shared, source, id, takes)
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
    /// Takes only the reply to the delivery the producer reported at `delivery` on
    /// `commands_topic` (for a [`ReplyWaiter::expect_delivery`] interest; on an
    /// [`expect`](ReplyWaiter::expect) one it narrows what is taken from now on).
    pub fn for_delivery(&mut self, commands_topic: &Topic, delivery: Delivery) {
        let id = |dead_letter| {
            Reply::id_for(&crate::store::reply_message_id(
                commands_topic.as_str(),
                delivery.partition,
                delivery.offset,
                dead_letter,
            ))
        };
        self.shared
            .settle(&self.key, self.waiter, [id(false), id(true)]);
    }

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

fn register(shared: &Arc<Shared>, source: &str, id: &str, takes: Takes) -> PendingReply {
    let key = ReplyCommand {
        source: source.to_owned(),
        id: id.to_owned(),
    };
    let waiter = shared.next_waiter.fetch_add(1, Ordering::Relaxed);
    let (sender, receiver) = oneshot::channel();
    shared
        .pending
        .lock()
        .expect("pending replies")
        .entry(key.clone())
        .or_default()
        .insert(waiter, Waiter { sender, takes });
    PendingReply {
        shared: Arc::clone(shared),
        key,
        waiter,
        receiver: Some(receiver),
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
            Ok(m) => match m.payload().map(|p| (Reply::from_cloudevent(p), p)) {
                Some((Ok(reply), payload)) => {
                    let reply_id = serde_json::from_slice::<ReplyId>(payload)
                        .ok()
                        .and_then(|r| r.id);
                    shared.deliver(reply, reply_id);
                }
                // Not a reply: someone else's message on the topic; nobody waits for it.
                Some((Err(e), _)) => {
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
        let waiter = |id: &str| register(&shared, "/s", id, Takes::Any);
        let first = waiter("c-1");
        let retry = waiter("c-1");
        let other = waiter("c-2");
        let forgotten = waiter("c-3");
        drop(forgotten);
        shared.deliver(reply("c-1"), None);
        shared.deliver(reply("c-3"), None);
        let short = Duration::from_millis(50);
        assert_eq!(first.wait(short).await, Some(reply("c-1")));
        assert_eq!(retry.wait(short).await, Some(reply("c-1")));
        assert_eq!(other.wait(short).await, None);
        assert!(shared.pending.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_delivery_waiter_takes_only_the_reply_to_its_own_delivery() {
        let shared = Arc::new(Shared::default());
        let topic = Topic::parse("commands").unwrap();
        let at = |offset| Delivery {
            partition: 0,
            offset,
        };
        let reply_id = |offset| {
            Some(Reply::id_for(&crate::store::reply_message_id(
                "commands", 0, offset, false,
            )))
        };
        let mut late = reply("c-1");
        late.duplicate = false;
        let mut own = reply("c-1");
        own.duplicate = true;
        // The first attempt's reply arrives before the retry knows its offset: kept, not taken.
        let mut retry = register(&shared, "/s", "c-1", Takes::Unsettled(Vec::new()));
        shared.deliver(late.clone(), reply_id(7));
        retry.for_delivery(&topic, at(9));
        shared.deliver(own.clone(), reply_id(9));
        assert_eq!(
            retry.wait(Duration::from_millis(50)).await,
            Some(own.clone())
        );
        // A reply that came before the offset was known is handed over when it is.
        let mut early = register(&shared, "/s", "c-1", Takes::Unsettled(Vec::new()));
        shared.deliver(own.clone(), reply_id(9));
        early.for_delivery(&topic, at(9));
        assert_eq!(early.wait(Duration::from_millis(50)).await, Some(own));
        assert!(shared.pending.lock().unwrap().is_empty());
    }
}
