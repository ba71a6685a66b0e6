//! The error of the operator commands' library functions (`verify`, `replay`, `dlq`): what
//! went wrong, with the underlying error kept as its `source()`.

use rdkafka::error::KafkaError;

use crate::store::StoreError;
use crate::topics::TopicError;

/// Why an operator command could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The database failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A topic could not be read or does not exist.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// A Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A command could not be produced.
    #[error(transparent)]
    Produce(#[from] crate::producer::ProduceError),
    /// The request cannot be carried out as asked; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
}

/// The result of an operator command's library function.
pub type Result<T, E = OperatorError> = std::result::Result<T, E>;
