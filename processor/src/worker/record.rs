//! What a committed batch tells the metrics (and the logs): batch size and duration,
//! outcomes, dead-letter kinds, end-to-end latency; the worker's moved position.

use std::collections::HashMap;
use std::time::Duration;

use commands::envelope::DeadLetterKind;
use commands::Registry;

use super::Worker;
use crate::batch::Incoming;
use crate::metrics::{outcome, Metrics};
use crate::store::{self, BatchResult};

impl Worker {
    /// Feeds the per-partition metrics (outcomes, dead-letter kinds, end-to-end latency) from
    /// a committed batch, and moves the partition's known position.
    ///
    /// `BatchResult` carries counts, not per-message outcomes, so what needs the messages
    /// (dead-letter kinds, end-to-end latency) is derived from those the batch committed:
    /// offsets from the position before the batch up to `next_offset`.
    pub(super) fn record_batch(
        &self,
        registry: &Registry,
        partition: i32,
        messages: &[Incoming],
        r: &BatchResult,
    ) {
        // Only a partition still known as owned is tracked: one revoked meanwhile must not
        // come back into the lag monitor's set.
        let before = match self.owned.lock().expect("owned map").get_mut(&partition) {
            Some(owned) => std::mem::replace(&mut owned.next_offset, r.next_offset),
            None => i64::MIN,
        };
        if r.messages == 0 {
            // Every message was below the stored offset: nothing was committed.
            return;
        }
        let m = &self.metrics;
        m.count_commands(outcome::APPLIED, r.applied);
        m.count_commands(outcome::REJECTED, r.rejected);
        m.count_commands(outcome::DUPLICATE, r.duplicates);
        m.count_commands(outcome::KEY_REUSED, r.key_reused.len());
        m.commands_emitted.inc_by(r.emitted as u64);
        for (ty, n) in &r.event_types {
            m.events.with_label_values(&[ty]).inc_by(*n);
        }
        m.timers_scheduled.inc_by(r.timers.scheduled);
        m.timers_cancelled.inc_by(r.timers.cancelled);
        for refused in &r.key_reused {
            // Never the data: payloads may carry personal data, so logs name commands by key.
            tracing::info!(
                partition,
                offset = refused.offset,
                source = %refused.source,
                command_id = %refused.command_id,
                "idempotency key reused with another payload: refused (key_reused), no effect"
            );
        }
        // Every parked command is also a dead letter (kind `parked`, or `handler_panic` for
        // the poison one); counting it once keeps the outcomes a partition of the messages.
        m.count_commands(
            outcome::DEAD_LETTERED,
            r.dead_letters.saturating_sub(r.parked),
        );
        m.count_commands(outcome::PARKED, r.parked);

        let committed: Vec<&Incoming> = messages
            .iter()
            .filter(|msg| msg.offset >= before && msg.offset < r.next_offset)
            .collect();
        let now = chrono::Utc::now();
        for msg in &committed {
            if let Ok(c) = &msg.decoded {
                if let Some(time) = c.time {
                    let latency = (now - time).to_std().unwrap_or_default();
                    m.end_to_end_seconds.observe(latency.as_secs_f64());
                }
            }
        }
        for (kind, n) in dead_letter_kinds(registry, &committed, r) {
            if n > 0 {
                m.dead_letters.with_label_values(&[kind]).inc_by(n as u64);
            }
        }
    }
}

/// How many of a committed batch's dead letters are of each kind. The messages it
/// committed (`committed`) give the kinds known before planning: those that could not be
/// decoded, and those whose type the registry does not know. The rest were dead-lettered by
/// the plan: commands of an aggregate already parked (`parked`), and the poison ones, whose
/// handler panicked (`handler_panic`, which also covers the rare handler that refuses data
/// its schema accepted).
fn dead_letter_kinds(
    registry: &Registry,
    committed: &[&Incoming],
    r: &BatchResult,
) -> HashMap<&'static str, usize> {
    let mut kinds: HashMap<&'static str, usize> = HashMap::new();
    for msg in committed {
        match &msg.decoded {
            Err(e) => *kinds.entry(e.kind.as_str()).or_default() += 1,
            // A type the registry does not know is never recorded as processed, so it
            // cannot be a duplicate: the plan dead-letters it, always.
            Ok(c) if registry.get(c.command_type.aggregate_type()).is_none() => {
                *kinds
                    .entry(DeadLetterKind::UnknownType.as_str())
                    .or_default() += 1;
            }
            Ok(_) => {}
        }
    }
    let known: usize = kinds.values().sum();
    let parked = r.parked.saturating_sub(r.newly_parked.len());
    let rest = r.dead_letters.saturating_sub(known);
    *kinds.entry(DeadLetterKind::Parked.as_str()).or_default() += parked.min(rest);
    *kinds
        .entry(DeadLetterKind::HandlerPanic.as_str())
        .or_default() += rest.saturating_sub(parked);
    kinds
}

/// Feeds the per-transaction metrics: one transaction, however many partitions it carried.
pub(super) fn record_transaction(
    metrics: &Metrics,
    results: &[(i32, store::Result<BatchResult>)],
    elapsed: Duration,
) {
    let messages: usize = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .map(|r| r.messages)
        .sum();
    if messages > 0 {
        metrics.batches.inc();
        metrics.batch_size.observe(messages as f64);
        metrics.batch_apply_seconds.observe(elapsed.as_secs_f64());
    }
}

/// The progress line the loop logs every 10 s.
pub(super) fn log_progress(m: &Metrics) {
    tracing::info!(
        applied = m.commands_with(outcome::APPLIED),
        rejected = m.commands_with(outcome::REJECTED),
        duplicates = m.commands_with(outcome::DUPLICATE),
        key_reused = m.commands_with(outcome::KEY_REUSED),
        dead_letters = m.commands_with(outcome::DEAD_LETTERED),
        parked = m.commands_with(outcome::PARKED),
        fenced = m.fenced_batches.get(),
        conflicts = m.version_conflicts.get(),
        "progress"
    );
}

/// One debug event per command of a batch, inside the batch's span, so that a command can be
/// followed by id or correlation id through the logs.
pub(super) fn trace_commands(partition: i32, messages: &[Incoming]) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    for m in messages {
        match &m.decoded {
            Ok(c) => tracing::debug!(
                partition,
                offset = m.offset,
                command_id = %c.id,
                source = %c.source,
                correlation_id = c.correlation_id.as_deref(),
                command_type = %c.command_type,
                aggregate = %c.subject,
                "command"
            ),
            Err(e) => tracing::debug!(
                partition,
                offset = m.offset,
                kind = e.kind.as_str(),
                "undecodable message"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use commands::envelope::DecodeError;

    use super::*;

    fn undecodable(offset: i64, kind: DeadLetterKind) -> Incoming {
        Incoming {
            offset,
            timestamp: None,
            key: None,
            value: None,
            headers: Vec::new(),
            decoded: Err(DecodeError {
                kind,
                message: "test".into(),
                aggregate: None,
            }),
        }
    }

    fn result(dead_letters: usize, parked: usize, newly_parked: usize) -> BatchResult {
        BatchResult {
            messages: 10,
            applied: 0,
            rejected: 0,
            duplicates: 0,
            key_reused: Vec::new(),
            dead_letters,
            events: 0,
            event_types: Vec::new(),
            emitted: 0,
            timers: Default::default(),
            parked,
            newly_parked: (0..newly_parked)
                .map(|i| ("account".to_owned(), format!("a-{i}")))
                .collect(),
            halted_at: None,
            next_offset: 10,
        }
    }

    #[test]
    fn dead_letters_known_before_planning_keep_their_kind() {
        let messages = [
            undecodable(1, DeadLetterKind::TooLarge),
            undecodable(2, DeadLetterKind::Malformed),
            undecodable(3, DeadLetterKind::TooLarge),
        ];
        let committed: Vec<&Incoming> = messages.iter().collect();
        let kinds = dead_letter_kinds(&Registry::new(), &committed, &result(3, 0, 0));
        assert_eq!(kinds[DeadLetterKind::TooLarge.as_str()], 2);
        assert_eq!(kinds[DeadLetterKind::Malformed.as_str()], 1);
        assert_eq!(kinds[DeadLetterKind::Parked.as_str()], 0);
        assert_eq!(kinds[DeadLetterKind::HandlerPanic.as_str()], 0);
    }

    #[test]
    fn the_plans_dead_letters_are_parked_or_poison() {
        // One undecodable message; the plan dead-lettered four more: two commands of
        // aggregates parked earlier, the poison command that parked its aggregate now, and
        // one more poison command (dead-lettered alone).
        let messages = [undecodable(1, DeadLetterKind::Malformed)];
        let committed: Vec<&Incoming> = messages.iter().collect();
        let kinds = dead_letter_kinds(&Registry::new(), &committed, &result(5, 3, 1));
        assert_eq!(kinds[DeadLetterKind::Malformed.as_str()], 1);
        assert_eq!(kinds[DeadLetterKind::Parked.as_str()], 2);
        assert_eq!(kinds[DeadLetterKind::HandlerPanic.as_str()], 2);
        assert_eq!(
            kinds.values().sum::<usize>(),
            5,
            "every dead letter has one kind"
        );
    }
}
