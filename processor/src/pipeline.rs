//! The load-plan-write pipeline of a batch, above the store.
//!
//! A batch is one transaction: lock the partition rows and check their epochs (fencing) and
//! positions, load the recorded outcomes, parked aggregates and the aggregates the
//! [`AggregateCache`] lacks, [`plan`](crate::batch::plan) each partition, then write
//! aggregates (version-checked), processed commands, duplicates, events, dead letters,
//! parking, outbox rows and the next offsets with set-based statements. Every statement is
//! the [`store`]'s; this module decides what to load and write, and in which order.

use std::collections::{HashMap, HashSet};

use commands::{wire, Registry};
use sqlx::{PgPool, Postgres, Transaction};

use crate::batch::{
    self, AggregateKey, Answers, DeadLetterRow, DuplicateRow, EmittedRow, EventRow, Incoming,
    Loaded, Plan, PlanOptions, ProcessedRow, ReplyRow, TimerRow,
};
use crate::cache::AggregateCache;
use crate::store::{self, OutboxRow, Position, Result, StoreError};
use commands::ReplyOutcome;

/// What a committed batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResult {
    /// Messages in the batch, after dropping those below the stored offset.
    pub messages: usize,
    /// Commands applied.
    pub applied: usize,
    /// Commands rejected.
    pub rejected: usize,
    /// Duplicate deliveries.
    pub duplicates: usize,
    /// Deliveries refused for reusing a processed command's key with another payload
    /// (outcome `key_reused`, not counted in `duplicates`), in offset order.
    pub key_reused: Vec<KeyReused>,
    /// Dead letters.
    pub dead_letters: usize,
    /// Events stored.
    pub events: usize,
    /// Events stored, per CloudEvents type.
    pub event_types: Vec<(String, u64)>,
    /// Commands the handlers emitted.
    pub emitted: usize,
    /// Timers set (or replaced) and cancelled by the handlers.
    pub timers: store::TimerChanges,
    /// Commands set aside because their aggregate is parked (the poison one included).
    pub parked: usize,
    /// Aggregates this batch parked.
    pub newly_parked: Vec<AggregateKey>,
    /// With the halt policy, the offset of the poison command the partition stopped at.
    pub halted_at: Option<i64>,
    /// The stored next offset after the batch.
    pub next_offset: i64,
}

/// A delivery refused as `key_reused`: where it was and the key it reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReused {
    /// Its offset.
    pub offset: i64,
    /// The command's source.
    pub source: String,
    /// The command's id.
    pub command_id: String,
}

/// Where a batch goes.
#[derive(Debug, Clone)]
pub struct BatchTarget<'a> {
    /// Commands topic.
    pub topic: &'a str,
    /// Its dead-letter topic.
    pub dead_letter_topic: &'a str,
    /// Events topic.
    pub events_topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// The worker's epoch for it.
    pub epoch: i64,
    /// The position the worker last stored for it, when it knows one. A different stored
    /// position means the row was changed behind its back (a database restore, or a commit
    /// whose acknowledgement was lost), and the batch is refused as [`StoreError::Moved`].
    pub expected_next: Option<i64>,
}

/// One partition's share of a batch.
#[derive(Debug, Clone)]
pub struct PartitionBatch<'a> {
    /// Where it goes.
    pub target: BatchTarget<'a>,
    /// Its messages, in strictly increasing offset order.
    pub messages: &'a [Incoming],
}

/// Applies a batch spanning several partitions of one commands topic in one transaction:
/// every partition row is locked and its epoch and position checked, the outcomes and
/// aggregates of all messages are read with one statement each, each partition is planned
/// in offset order, and everything is written with one set-based statement per table.
/// Messages below a partition's stored next offset were applied before and are dropped.
///
/// A partition whose epoch is stale ([`StoreError::Fenced`]) or whose position moved
/// ([`StoreError::Moved`]) gets that error in its slot of the result and the others go
/// on. An error of the whole transaction (database, conflict) is the outer error; then
/// nothing was written, and the cache has forgotten the batch's partitions.
///
/// Partitions normally hold disjoint aggregates (keys map to one partition). When they do
/// not (misrouted commands accepted), they are applied one transaction each, in order.
pub async fn process_batches(
    pool: &PgPool,
    batches: &[PartitionBatch<'_>],
    registry: &Registry,
    options: &PlanOptions,
    mut cache: Option<&mut AggregateCache>,
) -> Result<Vec<(i32, Result<BatchResult>)>> {
    if batches.len() > 1 && share_aggregates(batches) {
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            let one = std::slice::from_ref(b);
            out.extend(process_deduped(pool, one, registry, options, cache.as_deref_mut()).await?);
        }
        return Ok(out);
    }
    process_deduped(pool, batches, registry, options, cache).await
}

/// Runs [`process_group`]; when that fails because an event id it derived is stored
/// already, runs it once more at once, this time also looking up the stored events of the
/// commands without a recorded outcome.
///
/// That happens when a command is delivered again after its recorded outcome was pruned
/// (a client retry older than the dedupe window, `replay --force`, a dead letter redriven
/// again much later): the plan applies it again and its deterministic first event id hits
/// the primary key of `events`. Its events say what it did, so the second pass rebuilds
/// its outcome from them and the delivery is a duplicate, without a second effect. The
/// lookup is only made after such a failure, so ordinary batches pay nothing for it.
async fn process_deduped(
    pool: &PgPool,
    batches: &[PartitionBatch<'_>],
    registry: &Registry,
    options: &PlanOptions,
    mut cache: Option<&mut AggregateCache>,
) -> Result<Vec<(i32, Result<BatchResult>)>> {
    match process_group(
        pool,
        batches,
        registry,
        options,
        cache.as_deref_mut(),
        false,
    )
    .await
    {
        Err(StoreError::EventExists(reason)) => {
            tracing::warn!(
                %reason,
                partitions = ?batches.iter().map(|b| b.target.partition).collect::<Vec<_>>(),
                "a command's events are stored but its outcome is not (delivered again after \
                 its outcome was pruned); applying the batch again with its commands' events \
                 looked up"
            );
            process_group(pool, batches, registry, options, cache, true).await
        }
        other => other,
    }
}

fn share_aggregates(batches: &[PartitionBatch<'_>]) -> bool {
    let mut owner: HashMap<(&str, &str), i32> = HashMap::new();
    for b in batches {
        for c in b.messages.iter().filter_map(|m| m.decoded.as_ref().ok()) {
            let key = (c.command_type.aggregate_type(), c.subject.as_str());
            if *owner.entry(key).or_insert(b.target.partition) != b.target.partition {
                return true;
            }
        }
    }
    false
}

/// A partition of a batch that passed the fencing checks.
struct Work<'b, 'a> {
    batch: &'b PartitionBatch<'a>,
    fresh: &'a [Incoming],
    outbox_seq: i64,
}

/// One transaction over `batches`. With `look_up_events`, commands without a recorded
/// outcome whose events are stored count as duplicates (see [`process_deduped`]).
async fn process_group(
    pool: &PgPool,
    batches: &[PartitionBatch<'_>],
    registry: &Registry,
    options: &PlanOptions,
    cache: Option<&mut AggregateCache>,
    look_up_events: bool,
) -> Result<Vec<(i32, Result<BatchResult>)>> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let topic = first.target.topic;
    debug_assert!(batches.iter().all(|b| b.target.topic == topic));
    let mut tx = pool.begin().await?;
    let partitions: Vec<i32> = batches.iter().map(|b| b.target.partition).collect();
    let stored = store::lock_partitions(&mut tx, topic, &partitions).await?;

    let mut out: Vec<(i32, Result<BatchResult>)> = Vec::with_capacity(batches.len());
    let mut work: Vec<Work<'_, '_>> = Vec::with_capacity(batches.len());
    for b in batches {
        let t = &b.target;
        let Some(locked) = stored.get(&t.partition) else {
            out.push((
                t.partition,
                Err(StoreError::Fenced {
                    partition: t.partition,
                    mine: t.epoch,
                    current: 0,
                }),
            ));
            continue;
        };
        if locked.epoch != t.epoch {
            out.push((
                t.partition,
                Err(StoreError::Fenced {
                    partition: t.partition,
                    mine: t.epoch,
                    current: locked.epoch,
                }),
            ));
            continue;
        }
        let stored_next = locked.next_offset;
        if let Some(expected) = t.expected_next.filter(|e| *e != stored_next) {
            out.push((
                t.partition,
                Err(StoreError::Moved {
                    partition: t.partition,
                    expected,
                    stored: stored_next,
                }),
            ));
            continue;
        }
        // Messages come in offset order, so those below the stored offset (applied before)
        // are a prefix; the rest is planned in place, without copying.
        debug_assert!(b.messages.windows(2).all(|w| w[0].offset < w[1].offset));
        let fresh = &b.messages[b.messages.partition_point(|m| m.offset < stored_next)..];
        if fresh.is_empty() {
            out.push((
                t.partition,
                Ok(BatchResult {
                    next_offset: stored_next,
                    ..Default::default()
                }),
            ));
        } else {
            work.push(Work {
                batch: b,
                fresh,
                outbox_seq: locked.outbox_seq,
            });
        }
    }
    if work.is_empty() {
        tx.rollback().await?;
        return Ok(out);
    }

    // Nothing of the batch is kept if any of this fails (the transaction rolls back when
    // dropped): the offsets stay, the caller retries, and the cache forgets the partitions,
    // whose entries may hold states this transaction computed.
    let written = async {
        let commands: usize = work.iter().map(|w| w.fresh.len()).sum();
        if crate::failpoint::slow_batch(commands) {
            store::stall(&mut tx).await?;
        }
        let plans = write_group(
            &mut tx,
            &work,
            registry,
            options,
            cache.as_deref(),
            look_up_events,
        )
        .await?;
        let positions: Vec<Position> = work
            .iter()
            .zip(&plans)
            .map(|(w, (plan, outbox_end))| Position {
                partition: w.batch.target.partition,
                epoch: w.batch.target.epoch,
                next_offset: plan.next_offset,
                outbox_seq: *outbox_end,
                last_timestamp: timestamp_before(w.fresh, plan.next_offset),
            })
            .collect();
        store::store_positions(&mut tx, topic, &positions).await?;
        tx.commit().await?;
        Ok(plans)
    }
    .await;
    let mut cache = cache;
    let plans = match written {
        Ok(plans) => plans,
        Err(e) => {
            if let Some(cache) = cache {
                for w in &work {
                    cache.forget(w.batch.target.partition);
                }
            }
            return Err(e);
        }
    };
    for (w, (plan, _)) in work.iter().zip(&plans) {
        if let Some(cache) = cache.as_deref_mut() {
            cache.store(w.batch.target.partition, w.batch.target.epoch, &plan.writes);
        }
        out.push((
            w.batch.target.partition,
            Ok(BatchResult {
                messages: plan.processed.len() + plan.duplicates.len() + plan.dead_letters.len(),
                applied: plan.applied(),
                rejected: plan.rejected(),
                duplicates: plan.duplicates.len() - plan.key_reused(),
                key_reused: plan
                    .duplicates
                    .iter()
                    .filter(|d| d.key_reused())
                    .map(|d| KeyReused {
                        offset: d.offset,
                        source: d.source.clone(),
                        command_id: d.command_id.clone(),
                    })
                    .collect(),
                dead_letters: plan.dead_letters.len(),
                events: plan.events.len(),
                event_types: count_types(&plan.events),
                emitted: plan.emitted.len(),
                timers: store::TimerChanges {
                    scheduled: plan
                        .timers
                        .iter()
                        .filter(|t| matches!(t, TimerRow::Schedule { .. }))
                        .count() as u64,
                    cancelled: plan
                        .timers
                        .iter()
                        .filter(|t| matches!(t, TimerRow::Cancel { .. }))
                        .count() as u64,
                },
                parked: plan.parked.len(),
                newly_parked: plan
                    .newly_parked
                    .iter()
                    .map(|(a, _, _)| a.clone())
                    .collect(),
                halted_at: plan.halted_at,
                next_offset: plan.next_offset,
            }),
        ));
    }
    Ok(out)
}

/// How many of `events` have each type.
fn count_types(events: &[EventRow]) -> Vec<(String, u64)> {
    let mut counts: Vec<(String, u64)> = Vec::new();
    for e in events {
        let ty = &e.envelope.event_type;
        match counts.iter_mut().find(|(t, _)| t == ty) {
            Some((_, n)) => *n += 1,
            None => counts.push((ty.clone(), 1)),
        }
    }
    counts
}

/// The Kafka timestamp of the message at `next_offset - 1` among `messages` (in offset
/// order), if it is there.
fn timestamp_before(messages: &[Incoming], next_offset: i64) -> Option<i64> {
    let i = messages.partition_point(|m| m.offset < next_offset - 1);
    messages
        .get(i)
        .filter(|m| m.offset == next_offset - 1)
        .and_then(|m| m.timestamp)
}

/// Loads what the partitions' fresh messages need (aggregates from `cache` where it has
/// them), plans each partition in turn, and writes all plans. A command planned in an
/// earlier partition of the group counts as known in the later ones. Returns each plan with
/// its partition's last outbox sequence. With `look_up_events`, the outcome of a command
/// that has none recorded but whose events are stored is rebuilt from those events.
async fn write_group(
    tx: &mut Transaction<'_, Postgres>,
    work: &[Work<'_, '_>],
    registry: &Registry,
    options: &PlanOptions,
    cache: Option<&AggregateCache>,
    look_up_events: bool,
) -> Result<Vec<(Plan, i64)>> {
    let mut known = store::load_outcomes(
        tx,
        work.iter()
            .flat_map(|w| w.fresh.iter())
            .filter_map(|m| m.decoded.as_ref().ok())
            .map(|c| (c.source.as_str(), c.id.as_str())),
    )
    .await?;
    if look_up_events {
        let without: Vec<&commands::Command> = work
            .iter()
            .flat_map(|w| w.fresh.iter())
            .filter_map(|m| m.decoded.as_ref().ok())
            .filter(|c| !known.contains_key(&(c.source.to_string(), c.id.to_string())))
            .collect();
        let found = store::load_outcomes_from_events(tx, &without).await?;
        if !found.is_empty() {
            tracing::warn!(
                commands = found.len(),
                "commands delivered again after their outcome was pruned: their events are \
                 stored, so they are duplicates"
            );
        }
        known.extend(found);
    }
    // A command with a recorded outcome is a duplicate whatever its aggregate's state, so
    // only the others need their aggregates and parking (a replay needs neither).
    // Looked up without allocating a key per command.
    let recorded: HashSet<(&str, &str)> = known
        .keys()
        .map(|(s, i)| (s.as_str(), i.as_str()))
        .collect();
    let unknown: Vec<(&BatchTarget<'_>, &Incoming)> = work
        .iter()
        .flat_map(|w| w.fresh.iter().map(|m| (&w.batch.target, m)))
        .filter(|(_, m)| {
            m.decoded
                .as_ref()
                .is_ok_and(|c| !recorded.contains(&(c.source.as_str(), c.id.as_str())))
        })
        .collect();
    drop(recorded);
    let mut aggregates: HashMap<AggregateKey, Loaded> = HashMap::new();
    let mut missing: Vec<(&str, &str)> = Vec::new();
    for (t, m) in &unknown {
        if let Ok(c) = &m.decoded {
            let key = (c.command_type.aggregate_type(), c.subject.as_str());
            let owned = (key.0.to_owned(), key.1.to_owned());
            if aggregates.contains_key(&owned) {
                continue;
            }
            match cache.and_then(|cache| cache.get(t.partition, t.epoch, &owned)) {
                Some(loaded) => {
                    aggregates.insert(owned, loaded.clone());
                }
                None => missing.push(key),
            }
        }
    }
    aggregates.extend(store::load_aggregates(tx, missing).await?);
    let parked = store::load_parked(
        tx,
        unknown
            .iter()
            .filter_map(|(_, m)| m.decoded.as_ref().ok())
            .map(|c| (c.command_type.aggregate_type(), c.subject.as_str())),
    )
    .await?;
    let mut plans = Vec::with_capacity(work.len());
    for w in work {
        let plan = batch::plan(registry, options, w.fresh, &known, &aggregates, &parked);
        for r in &plan.processed {
            known.insert((r.source.clone(), r.command_id.clone()), r.outcome.clone());
        }
        plans.push(plan);
    }
    let targets: Vec<(&BatchTarget<'_>, &Plan, i64)> = work
        .iter()
        .zip(&plans)
        .map(|(w, p)| (&w.batch.target, p, w.outbox_seq))
        .collect();
    let ends = write_plans(tx, &targets).await?;
    for (target, plan, _) in &targets {
        store::write_parked(
            tx,
            target.topic,
            target.partition,
            &plan.newly_parked,
            &plan.parked,
        )
        .await?;
    }
    Ok(plans.into_iter().zip(ends).collect())
}

/// Writes the plans of a group's partitions, each with the last outbox sequence its
/// partition used before, with one set-based statement per table. Returns each partition's
/// last outbox sequence after its rows.
async fn write_plans(
    tx: &mut Transaction<'_, Postgres>,
    plans: &[(&BatchTarget<'_>, &Plan, i64)],
) -> Result<Vec<i64>> {
    let Some((first, _, _)) = plans.first() else {
        return Ok(Vec::new());
    };
    let topic = first.topic;
    // Aggregates first: a version conflict aborts before anything else is written.
    store::write_aggregates(tx, plans.iter().flat_map(|(_, p, _)| &p.writes)).await?;

    // Rows of every table carry their partition, so all partitions go in one statement.
    let processed: Vec<(i32, &ProcessedRow)> = plans
        .iter()
        .flat_map(|(t, p, _)| p.processed.iter().map(|r| (t.partition, r)))
        .collect();
    store::write_processed(tx, topic, &processed).await?;

    let duplicates: Vec<(i32, &DuplicateRow)> = plans
        .iter()
        .flat_map(|(t, p, _)| p.duplicates.iter().map(|r| (t.partition, r)))
        .collect();
    // A reply to a duplicate answers a delivery recorded now for the first time: a replay
    // (or a restore) meeting it again answered it already.
    let answer_duplicates = plans.iter().any(|(_, p, _)| {
        p.replies
            .iter()
            .any(|r| matches!(r.answers, Answers::Duplicate { .. }))
    });
    let new_duplicates = store::write_duplicates(tx, topic, &duplicates, answer_duplicates).await?;

    let events: Vec<&EventRow> = plans.iter().flat_map(|(_, p, _)| &p.events).collect();
    store::write_events(tx, &events).await?;

    let dead_letters: Vec<(i32, &DeadLetterRow)> = plans
        .iter()
        .flat_map(|(t, p, _)| p.dead_letters.iter().map(|r| (t.partition, r)))
        .collect();
    // Only the dead letters recorded now are published: one a replay (or a restore) meets
    // again was published when it was first recorded.
    let new_dead_letters = store::write_dead_letters(tx, topic, &dead_letters).await?;

    // Each partition's outbox rows, numbered in offset order (a command's events keep their
    // own order), so the sequence depends only on the partition's messages, not on where
    // batches happened to split them: after a database restore the re-derived rows get the
    // same numbers, and the relay's recovered position skips exactly what was published.
    let mut ends = Vec::with_capacity(plans.len());
    let mut outbox: Vec<OutboxRow<'_>> = Vec::new();
    for (target, plan, outbox_seq) in plans {
        let mut pending: Vec<(i64, Pending<'_>)> = Vec::with_capacity(
            plan.events.len() + plan.dead_letters.len() + plan.replies.len() + plan.emitted.len(),
        );
        pending.extend(
            plan.events
                .iter()
                .map(|e| (e.offset, Pending::Event(&e.envelope))),
        );
        pending.extend(
            plan.dead_letters
                .iter()
                .filter(|d| new_dead_letters.contains(&(target.partition, d.offset)))
                .map(|d| (d.offset, Pending::DeadLetter(d))),
        );
        pending.extend(plan.emitted.iter().map(|e| (e.offset, Pending::Emitted(e))));
        pending.extend(
            plan.replies
                .iter()
                .filter(|r| answered(r, target, &new_dead_letters, &new_duplicates))
                .flat_map(|r| {
                    let to_topic =
                        r.to.topic
                            .is_some()
                            .then_some((r.offset, Pending::Reply(r)));
                    // An outcome goes back for what the command came to, not for a reuse
                    // of its key (whose payload differs, and would be refused as such).
                    let to_emitter = (r.to.outcome_to.is_some()
                        && !matches!(r.reply.outcome, ReplyOutcome::KeyReused { .. }))
                    .then_some((r.offset, Pending::Outcome(r)));
                    to_topic.into_iter().chain(to_emitter)
                }),
        );
        pending.sort_by_key(|(offset, _)| *offset);
        let mut seq = *outbox_seq;
        for (_, p) in pending {
            seq += 1;
            outbox.push(outbox_row(target, p, seq));
        }
        ends.push(seq);
    }
    store::write_outbox(tx, topic, &outbox).await?;
    let timers: Vec<(i32, &TimerRow)> = plans
        .iter()
        .flat_map(|(t, p, _)| p.timers.iter().map(|r| (t.partition, r)))
        .collect();
    store::write_timers(tx, topic, &timers).await?;
    Ok(ends)
}

/// Whether the delivery `reply` answers is recorded by this batch for the first time, and
/// so gets its reply (and its emitter its outcome): a processed command always; a dead
/// letter whose `dead_letters` row is new; a duplicate whose `duplicate_deliveries` row is
/// new and that is not the very message whose outcome was recorded (a replay re-reading it).
fn answered(
    reply: &ReplyRow,
    target: &BatchTarget<'_>,
    new_dead_letters: &HashSet<(i32, i64)>,
    new_duplicates: &HashSet<(i32, i64)>,
) -> bool {
    let delivery = (target.partition, reply.offset);
    match &reply.answers {
        Answers::Processed => true,
        Answers::DeadLetter => new_dead_letters.contains(&delivery),
        Answers::Duplicate { recorded_at } => {
            new_duplicates.contains(&delivery)
                && recorded_at.as_ref().is_none_or(|at| {
                    (at.topic.as_str(), at.partition, at.offset)
                        != (target.topic, target.partition, reply.offset)
                })
        }
    }
}

/// Inside `tx`, which holds the partition's row lock: loads the outcomes, aggregates and
/// parked aggregates `messages` name, plans them, and writes the plan (outcomes,
/// aggregates, events, dead letters, parking, and outbox rows numbered after
/// `outbox_seq`). Returns the plan and the last outbox sequence; the caller stores that.
pub(crate) async fn plan_and_write(
    tx: &mut Transaction<'_, Postgres>,
    target: &BatchTarget<'_>,
    registry: &Registry,
    options: &PlanOptions,
    messages: &[Incoming],
    outbox_seq: i64,
) -> Result<(Plan, i64)> {
    let batch = PartitionBatch {
        target: target.clone(),
        messages,
    };
    let work = [Work {
        batch: &batch,
        fresh: messages,
        outbox_seq,
    }];
    // An operator's release is rare and small: it always looks events up, so a command
    // whose outcome was pruned is never applied twice through it.
    let mut written = write_group(tx, &work, registry, options, None, true).await?;
    Ok(written.pop().expect("one plan"))
}

/// What an outbox row is made from, before it is numbered.
enum Pending<'p> {
    Event(&'p commands::EventEnvelope),
    DeadLetter(&'p DeadLetterRow),
    Reply(&'p ReplyRow),
    Outcome(&'p ReplyRow),
    Emitted(&'p EmittedRow),
}

/// The outbox row numbered `seq` of an event (on the events topic, keyed by its
/// aggregate) or of a dead letter (on the dead-letter topic, the original bytes and headers
/// plus the `cmdproc-error-*` and `cmdproc-original-*` headers) or of a reply (on the
/// command's `replyto` topic, keyed by the command's id).
fn outbox_row<'t>(target: &BatchTarget<'t>, pending: Pending<'t>, seq: i64) -> OutboxRow<'t> {
    match pending {
        Pending::Event(envelope) => OutboxRow {
            partition: target.partition,
            seq,
            topic: target.events_topic,
            message_id: envelope.id.to_string(),
            message: wire::event_message(envelope, seq as u64),
        },
        Pending::DeadLetter(dl) => OutboxRow {
            partition: target.partition,
            seq,
            topic: target.dead_letter_topic,
            message_id: store::dead_letter_message_id(target.topic, target.partition, dl.offset),
            message: wire::dead_letter_message(
                dl.key.as_deref(),
                dl.value.as_deref(),
                &dl.headers,
                dl.kind,
                &dl.message,
                wire::Origin {
                    topic: target.topic,
                    partition: target.partition,
                    offset: dl.offset,
                },
            ),
        },
        Pending::Reply(r) => {
            let message_id = store::reply_message_id(
                target.topic,
                target.partition,
                r.offset,
                matches!(r.answers, Answers::DeadLetter),
            );
            OutboxRow {
                partition: target.partition,
                seq,
                topic: r.to.topic.as_ref().map_or(target.topic, |t| t.as_str()),
                message: wire::reply_message(&r.reply, &message_id, r.to.correlation_id.as_deref()),
                message_id,
            }
        }
        Pending::Outcome(r) => {
            let message_id = format!(
                "outcome/{}/{}/{}{}",
                target.topic,
                target.partition,
                r.offset,
                if matches!(r.answers, Answers::DeadLetter) {
                    "/dead-letter"
                } else {
                    ""
                }
            );
            OutboxRow {
                partition: target.partition,
                seq,
                topic: target.topic,
                message: wire::outcome_message(&r.to, &r.reply.outcome),
                message_id,
            }
        }
        Pending::Emitted(e) => OutboxRow {
            partition: target.partition,
            seq,
            topic: target.topic,
            message_id: e.message_id.clone(),
            message: wire::command_message(&e.key, e.payload.clone()),
        },
    }
}
