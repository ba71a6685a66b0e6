//! Creating the commands, events, dead-letter and reply topics through the admin API.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientContext;

/// What happened to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicStatus {
    /// Created now.
    Created {
        /// Its partitions.
        partitions: i32,
    },
    /// It was there already.
    Exists {
        /// Its partitions.
        partitions: i32,
    },
}

/// Errors while talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The broker cannot be reached.
    #[error("cannot reach the Kafka broker at {brokers}: {reason}")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// Why.
        reason: String,
    },
    /// A Kafka client call failed.
    #[error("{what}: {source}")]
    Kafka {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A Kafka client could not be made or used.
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// The request does not fit the topic (a partition it lacks, a topic that does not
    /// exist); the message says what to do.
    #[error("{0}")]
    Refused(String),
    /// The broker refused.
    #[error("creating topic `{topic}` failed: {reason}")]
    Failed {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
}

/// Fails within `timeout` when no broker answers, instead of hanging.
pub fn check_reachable(brokers: &str, timeout: Duration) -> Result<(), TopicError> {
    let admin = admin(brokers, timeout)?;
    admin
        .inner()
        .fetch_metadata(None, timeout)
        .map(|_| ())
        .map_err(|e| TopicError::Unreachable {
            brokers: brokers.to_owned(),
            reason: e.to_string(),
        })
}

fn admin(
    brokers: &str,
    timeout: Duration,
) -> Result<AdminClient<DefaultClientContext>, TopicError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "socket.connection.setup.timeout.ms",
            timeout.as_millis().max(1000).to_string(),
        )
        .create()
        .map_err(|e| TopicError::Unreachable {
            brokers: brokers.to_owned(),
            reason: e.to_string(),
        })
}

/// The partition count of `topic` as seen through any client (a worker's consumer, a
/// reader, an admin client), or a clear error when it does not exist.
pub fn partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<i32, TopicError> {
    let md = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| TopicError::Kafka {
            what: format!("cannot read metadata of topic `{topic}`"),
            source,
        })?;
    match md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    {
        Some(t) => Ok(t.partitions().len() as i32),
        None => Err(TopicError::Refused(format!(
            "topic `{topic}` does not exist; create it with `cmdproc topics create`"
        ))),
    }
}

/// The partition count of a topic, `None` when it does not exist.
pub fn partitions_of(
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, TopicError> {
    let admin = admin(brokers, timeout)?;
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| TopicError::Unreachable {
            brokers: brokers.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as i32))
}

/// Creates each `(topic, partitions)` that does not exist; idempotent.
pub async fn create(
    brokers: &str,
    topics: &[(String, i32)],
    replication: i32,
    timeout: Duration,
) -> Result<Vec<(String, TopicStatus)>, TopicError> {
    check_reachable(brokers, timeout)?;
    let admin = admin(brokers, timeout)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(replication)))
        .collect();
    let results = admin
        .create_topics(&new, &admin_options(timeout))
        .await
        .map_err(unreachable(brokers))?;
    let mut out = Vec::new();
    for (r, (topic, partitions)) in results.into_iter().zip(topics) {
        match r {
            Ok(_) => out.push((
                topic.clone(),
                TopicStatus::Created {
                    partitions: *partitions,
                },
            )),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                let existing = partitions_of(brokers, topic, timeout)?.unwrap_or(*partitions);
                out.push((
                    topic.clone(),
                    TopicStatus::Exists {
                        partitions: existing,
                    },
                ));
            }
            Err((_, code)) => {
                return Err(TopicError::Failed {
                    topic: topic.clone(),
                    reason: code.to_string(),
                })
            }
        }
    }
    // The broker answers before every listener sees the new topics in its metadata; a
    // worker started right away would find no such topic. Return once they are visible.
    let deadline = std::time::Instant::now() + timeout;
    for (topic, status) in &out {
        let TopicStatus::Created { partitions } = status else {
            continue;
        };
        while partitions_of(brokers, topic, timeout)? != Some(*partitions) {
            if std::time::Instant::now() > deadline {
                return Err(TopicError::Failed {
                    topic: topic.clone(),
                    reason: format!(
                        "created, but not visible with {partitions} partitions after {} ms",
                        timeout.as_millis()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(out)
}

/// Deletes `topics`; those that do not exist are skipped.
pub async fn delete(brokers: &str, topics: &[&str], timeout: Duration) -> Result<(), TopicError> {
    let admin = admin(brokers, timeout)?;
    let results = admin
        .delete_topics(topics, &admin_options(timeout))
        .await
        .map_err(unreachable(brokers))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => {
                return Err(TopicError::Failed {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

fn admin_options(timeout: Duration) -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout))
}

fn unreachable(brokers: &str) -> impl Fn(rdkafka::error::KafkaError) -> TopicError + '_ {
    move |e| TopicError::Unreachable {
        brokers: brokers.to_owned(),
        reason: e.to_string(),
    }
}

/// The log start and end offsets (low and high watermarks) of `partitions` of `topic`, or of
/// every partition when `None`. Blocking: call it off the async runtime's threads.
pub fn watermarks(
    brokers: &str,
    topic: &str,
    partitions: Option<&[i32]>,
    timeout: Duration,
) -> Result<Vec<(i32, i64, i64)>, TopicError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", "cmdproc-watermarks")
        .create()?;
    let count = partition_count(consumer.client(), topic, timeout)?;
    let all: Vec<i32>;
    let chosen = match partitions {
        Some(p) => {
            if let Some(bad) = p.iter().find(|p| **p < 0 || **p >= count) {
                return Err(TopicError::Refused(format!(
                    "partition {bad} does not exist: `{topic}` has {count} partitions (0 to {})",
                    count - 1
                )));
            }
            p
        }
        None => {
            all = (0..count).collect();
            &all
        }
    };
    chosen
        .iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, *p, timeout)
                .map_err(|source| TopicError::Kafka {
                    what: format!("cannot read the offsets of {topic} [{p}]"),
                    source,
                })?;
            Ok((*p, low, high))
        })
        .collect()
}

/// The first message of `topic` partition `partition` at or after `offset` that a read_committed
/// consumer sees: its offset and Kafka timestamp (milliseconds), or `None` when none comes
/// within `timeout`. Blocking: call it off the async runtime's threads.
pub fn first_message_at(
    brokers: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    timeout: Duration,
) -> Result<Option<(i64, Option<i64>)>, TopicError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "cmdproc-log-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            return Ok(Some((m.offset(), m.timestamp().to_millis())));
        }
    }
    Ok(None)
}
