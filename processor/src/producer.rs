//! The command producer client.
//!
//! Commands are produced with the idempotent producer, `acks=all`, and the murmur2
//! partitioner, so a command lands on the same partition as from the Java client.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use commands::envelope::{Command, CLOUDEVENTS_JSON};
use commands::Topic;

/// What went wrong while producing.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The client could not be created from its configuration.
    #[error("cannot create the Kafka producer: {0}")]
    Config(String),
    /// The broker did not acknowledge the message.
    #[error("the broker at {brokers} did not acknowledge the message: {reason}")]
    Delivery {
        /// The bootstrap servers.
        brokers: String,
        /// librdkafka's reason.
        reason: String,
    },
}

/// Where a produced message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

/// Produces commands to the commands topic.
pub struct CommandProducer {
    producer: FutureProducer,
    topic: Topic,
    brokers: String,
    timeout: Duration,
}

impl std::fmt::Debug for CommandProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandProducer")
            .field("topic", &self.topic)
            .field("brokers", &self.brokers)
            .finish_non_exhaustive()
    }
}

impl CommandProducer {
    /// Creates a producer for `topic` on `brokers`. A message not acknowledged within
    /// `timeout` fails instead of waiting forever for an unreachable broker.
    pub fn new(brokers: &str, topic: Topic, timeout: Duration) -> Result<Self, ProduceError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // The Java client's default for keyed messages; librdkafka's own differs.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create::<FutureProducer>()
            .map_err(|e| ProduceError::Config(e.to_string()))?;
        Ok(Self {
            producer,
            topic,
            brokers: brokers.to_owned(),
            timeout,
        })
    }

    /// The topic this producer writes to.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Produces one command in structured mode, keyed by its subject.
    pub async fn send(&self, command: &Command) -> Result<Delivery, ProduceError> {
        let value = command.encode();
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(CLOUDEVENTS_JSON),
        });
        self.send_raw(
            Some(command.subject.as_str().as_bytes()),
            Some(&value),
            Some(headers),
        )
        .await
    }

    /// Produces arbitrary bytes: for binary-mode clients, tests and the demo's bad input.
    pub async fn send_raw(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<Delivery, ProduceError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(self.topic.as_str());
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        match self.producer.send(record, self.timeout).await {
            Ok(d) => Ok(Delivery {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _)) => Err(ProduceError::Delivery {
                brokers: self.brokers.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Waits until every message sent so far is acknowledged or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), ProduceError> {
        self.producer
            .flush(timeout)
            .map_err(|e| ProduceError::Delivery {
                brokers: self.brokers.clone(),
                reason: e.to_string(),
            })
    }
}
