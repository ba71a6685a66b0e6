//! Reading a whole topic back: every message from the beginning up to the high watermarks
//! as they are when the read starts, without joining a consumer group. Reads are
//! `read_committed`, so the relay's aborted transactions stay invisible.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};

/// Why a topic could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker refused or failed a call.
    #[error("{what} of {topic}")]
    Kafka {
        /// What was being done.
        what: &'static str,
        /// The topic.
        topic: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// Some partitions were not read to their end in time.
    #[error("reading {topic} timed out with {left} partition(s) not read to the end")]
    Timeout {
        /// The topic.
        topic: String,
        /// Partitions left.
        left: usize,
    },
    /// The blocking read's thread failed.
    #[error("the reader of {topic} stopped: {reason}")]
    Reader {
        /// The topic.
        topic: String,
        /// What happened to it.
        reason: String,
    },
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, if any.
    pub key: Option<Vec<u8>>,
    /// Its value, if any.
    pub value: Option<Vec<u8>>,
    /// Its headers, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// The first header called `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_ref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The value as JSON (an absent value is an empty one, which is not JSON).
    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default())
    }
}

/// Reads every message of `topic` up to its end, as [`read_blocking`] does, off the async
/// workers.
pub async fn read(brokers: &str, topic: &str, timeout: Duration) -> Result<Vec<Record>, Error> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    // librdkafka's calls here block.
    let name = topic.clone();
    tokio::task::spawn_blocking(move || read_blocking(&brokers, &topic, timeout))
        .await
        .map_err(|e| Error::Reader {
            topic: name,
            reason: e.to_string(),
        })?
}

/// Reads every message of `topic` from the beginning up to the high watermarks as they are
/// now, waiting at most `timeout` in all. A partition that was empty when the watermarks
/// were read may still receive messages; they are returned, but the read does not wait for
/// them.
pub fn read_blocking(brokers: &str, topic: &str, timeout: Duration) -> Result<Vec<Record>, Error> {
    let kafka = |what: &'static str| {
        let topic = topic.to_owned();
        move |source| Error::Kafka {
            what,
            topic,
            source,
        }
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("harness-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(kafka("creating a consumer"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(kafka("reading the metadata"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(kafka("reading the watermarks"))?;
        if high > low {
            ends.insert(p, high);
        }
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .map_err(kafka("assigning the partitions"))?;
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer
        .assign(&assignment)
        .map_err(kafka("assigning the partitions"))?;
    let deadline = Instant::now() + timeout;
    while !ends.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                topic: topic.to_owned(),
                left: ends.len(),
            });
        }
        if let Some(m) = consumer.poll(left.min(Duration::from_millis(200))) {
            let m = m.map_err(kafka("reading"))?;
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        // The relay publishes in Kafka transactions, whose commit markers take offsets too:
        // the last message's offset stops short of the high watermark, the position does not.
        let positions = consumer
            .position()
            .map_err(kafka("reading the positions"))?;
        for elem in positions.elements() {
            if let Offset::Offset(position) = elem.offset() {
                if ends
                    .get(&elem.partition())
                    .is_some_and(|end| position >= *end)
                {
                    ends.remove(&elem.partition());
                }
            }
        }
    }
    Ok(out)
}
