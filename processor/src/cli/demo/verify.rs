//! Waiting for the workers, reading back what they did (from Postgres and from the topics),
//! the summary, and the invariants.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::harness::model::{Model, ModelEvent, Modeled, Outcome};
use crate::harness::topic;
use crate::harness::workload::{Expect, Workload};
use crate::producer::Delivery;
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::workers::Workers;

/// How often the database is polled while waiting.
const POLL: Duration = Duration::from_millis(250);
/// How often a progress line is printed while waiting.
const REPORT: Duration = Duration::from_secs(1);

/// Waits until `partitions` partitions of `topic` are owned and `expected` distinct
/// workers own some, so that produced commands meet a settled group. Returns the number of
/// partitions each worker took.
pub(in crate::cli) async fn wait_ready(
    pool: &PgPool,
    topic: &str,
    partitions: i32,
    expected: usize,
    workers: &mut Workers,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let deadline = Instant::now() + timeout;
    loop {
        workers.check_alive()?;
        // `owner` is the last worker that took the partition: after a rebalance, the new one.
        let owners: BTreeMap<String, i64> = sqlx::query(
            "SELECT owner, count(*) FROM partitions WHERE topic = $1 AND owner IS NOT NULL GROUP BY owner",
        )
        .bind(topic)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        let owned: i64 = owners.values().sum();
        if owned == i64::from(partitions) && owners.len() == expected {
            return Ok(owners);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "workers did not join within {}s: {owned} of {partitions} partitions owned by {} of {expected} workers",
                timeout.as_secs(),
                owners.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Where processing stands.
#[derive(Debug, Clone, Copy)]
pub(in crate::cli) struct Progress {
    /// Messages whose offset the workers stored, of `produced`.
    pub(in crate::cli) processed: i64,
    /// Messages produced.
    pub(in crate::cli) produced: i64,
    /// Outbox rows the relay published, of `outbox`.
    pub(in crate::cli) published: i64,
    /// Outbox rows written.
    pub(in crate::cli) outbox: i64,
    /// Everything processed and published.
    pub(in crate::cli) done: bool,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "processed {} / {} messages, published {} / {} outbox rows",
            self.processed, self.produced, self.published, self.outbox
        )
    }
}

pub(in crate::cli) async fn progress(
    pool: &PgPool,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
) -> anyhow::Result<Progress> {
    let rows = sqlx::query(
        "SELECT p.partition, p.next_offset, p.outbox_seq, COALESCE(r.published_seq, 0)
         FROM partitions p LEFT JOIN relay_positions r ON r.topic = p.topic AND r.partition = p.partition
         WHERE p.topic = $1",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?;
    let mut next: HashMap<i32, i64> = HashMap::new();
    let (mut published, mut outbox) = (0, 0);
    for r in rows {
        next.insert(r.get(0), r.get(1));
        outbox += r.get::<i64, _>(2);
        published += r.get::<i64, _>(3).min(r.get(2));
    }
    let processed = ends
        .iter()
        .map(|(p, end)| next.get(p).copied().unwrap_or(0).min(*end))
        .sum();
    let produced = ends.values().sum();
    Ok(Progress {
        processed,
        produced,
        published,
        outbox,
        done: processed == produced && published == outbox,
    })
}

/// Waits until every partition's stored next offset reaches the end of what was produced
/// (`ends`: partition to the offset after its last message) and the relay has published
/// every outbox row, printing progress every second.
pub(in crate::cli) async fn wait_processed(
    pool: &PgPool,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
    workers: &mut Workers,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        workers.check_alive()?;
        let p = progress(pool, topic, ends).await?;
        if p.done {
            println!("      {p}");
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!("timed out after {}s: {p}", timeout.as_secs());
        }
        if last_report.elapsed() >= REPORT {
            last_report = Instant::now();
            println!("      {p}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A row of `processed_commands`.
#[derive(Debug, Clone)]
struct Processed {
    applied: bool,
    reason: Option<String>,
}

/// A row of `events`.
#[derive(Debug, Clone)]
struct StoredEvent {
    id: Uuid,
    aggregate: (String, String),
    version: i64,
    event_type: String,
    data: Value,
}

/// What the workers did, read back from Postgres and the topics.
#[derive(Debug, Clone)]
pub(in crate::cli) struct Observed {
    /// `processed_commands` by `(source, id)`.
    processed: HashMap<(String, String), Processed>,
    /// `duplicate_deliveries` as `(partition, offset)`.
    duplicates: Vec<(i32, i64)>,
    /// `dead_letters` as `(partition, offset)` to kind.
    dead_letters: BTreeMap<(i32, i64), String>,
    /// `events`, by aggregate and version.
    events: Vec<StoredEvent>,
    /// `aggregates`: version and state.
    aggregates: BTreeMap<(String, String), Modeled>,
    /// Event ids as read from the events topic, repeats included.
    published_events: Vec<Uuid>,
    /// Messages on the events topic without a readable id.
    unreadable_events: usize,
    /// Messages on the dead-letter topic, as the `(partition, offset)` of the original.
    published_dead_letters: Vec<(i32, i64)>,
}

/// Reads the demo's tables and its events and dead-letter topics.
pub(in crate::cli) async fn observe(
    pool: &PgPool,
    brokers: &str,
    commands_topic: &str,
    events_topic: &str,
    dead_letter_topic: &str,
) -> anyhow::Result<Observed> {
    let processed = sqlx::query(
        "SELECT source, command_id, outcome = 'applied', reason FROM processed_commands WHERE topic = $1",
    )
    .bind(commands_topic)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| {
        (
            (r.get(0), r.get(1)),
            Processed {
                applied: r.get(2),
                reason: r.get(3),
            },
        )
    })
    .collect();
    let duplicates =
        sqlx::query("SELECT partition, \"offset\" FROM duplicate_deliveries WHERE topic = $1")
            .bind(commands_topic)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let dead_letters =
        sqlx::query("SELECT partition, \"offset\", kind FROM dead_letters WHERE topic = $1")
            .bind(commands_topic)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
    let events = sqlx::query(
        "SELECT event_id, aggregate_type, aggregate_id, version, event_type, data FROM events
         ORDER BY aggregate_type, aggregate_id, version",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| StoredEvent {
        id: r.get(0),
        aggregate: (r.get(1), r.get(2)),
        version: r.get(3),
        event_type: r.get(4),
        data: r.get(5),
    })
    .collect();
    let aggregates =
        sqlx::query("SELECT aggregate_type, aggregate_id, version, state FROM aggregates")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| {
                (
                    (r.get(0), r.get(1)),
                    Modeled {
                        version: r.get(2),
                        state: r.get(3),
                    },
                )
            })
            .collect();

    let timeout = Duration::from_secs(30);
    let mut published_events = Vec::new();
    let mut unreadable_events = 0;
    for record in topic::read(brokers, events_topic, timeout).await? {
        let id = record
            .value
            .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
            .and_then(|id| Uuid::parse_str(&id).ok());
        match id {
            Some(id) => published_events.push(id),
            None => unreadable_events += 1,
        }
    }
    let mut published_dead_letters = Vec::new();
    for record in topic::read(brokers, dead_letter_topic, timeout).await? {
        let header = |name: &str| -> Option<i64> {
            let (_, v) = record.headers.iter().find(|(k, _)| k == name)?;
            std::str::from_utf8(v.as_deref()?).ok()?.parse().ok()
        };
        let partition = header("cmdproc-original-partition").unwrap_or(-1);
        let offset = header("cmdproc-original-offset").unwrap_or(-1);
        published_dead_letters.push((partition as i32, offset));
    }
    Ok(Observed {
        processed,
        duplicates,
        dead_letters,
        events,
        aggregates,
        published_events,
        unreadable_events,
        published_dead_letters,
    })
}

/// How long the phases took.
#[derive(Debug, Clone, Copy)]
pub(in crate::cli) struct Timings {
    /// From the first produce to the last acknowledgement.
    pub(in crate::cli) produce: Duration,
    /// From the first produce until everything was processed and published.
    pub(in crate::cli) process: Duration,
}

/// Prints what was produced, what the workers made of it, and how fast.
pub(in crate::cli) fn print_summary(
    workload: &Workload,
    model: &Model,
    observed: &Observed,
    timings: Timings,
) {
    let total = workload.messages.len();
    let valid = workload.valid.len();
    let applied = observed.processed.values().filter(|p| p.applied).count();
    let rejected = observed.processed.len() - applied;
    let model_applied = model.applied();
    println!(
        "  produced       {total} messages: {valid} commands, {} duplicates, {} invalid",
        workload.duplicates(),
        workload.invalid()
    );
    println!("  applied        {applied} (model: {model_applied})");
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for p in observed.processed.values().filter(|p| !p.applied) {
        *reasons
            .entry(reason_kind(p.reason.as_deref().unwrap_or("no reason")))
            .or_default() += 1;
    }
    let mut reasons: Vec<(String, usize)> = reasons.into_iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    println!(
        "  rejected       {rejected} (model: {}): {}",
        valid - model_applied,
        join(reasons.iter().map(|(r, n)| format!("{r} {n}")))
    );
    println!("  duplicates     {} detected", observed.duplicates.len());
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for kind in observed.dead_letters.values() {
        *kinds.entry(kind).or_default() += 1;
    }
    println!(
        "  dead letters   {}: {}",
        observed.dead_letters.len(),
        join(kinds.iter().map(|(k, n)| format!("{k} {n}")))
    );
    let distinct: HashSet<&Uuid> = observed.published_events.iter().collect();
    println!(
        "  events         {} stored, {} published ({} distinct ids); {} dead letters published",
        observed.events.len(),
        observed.published_events.len(),
        distinct.len(),
        observed.published_dead_letters.len()
    );
    let secs = timings.process.as_secs_f64().max(0.001);
    println!(
        "  time           produced in {:.1}s; processed and published in {:.1}s: {:.0} messages/s",
        timings.produce.as_secs_f64(),
        secs,
        total as f64 / secs
    );
}

/// A rejection reason without its numbers and dates, so like reasons group together:
/// `insufficient funds: balance 10, withdrawal 25` becomes `insufficient funds`, and
/// `night 2026-12-24 is already booked` becomes `night … is already booked`.
fn reason_kind(reason: &str) -> String {
    let head = reason.split(':').next().unwrap_or(reason);
    head.split_whitespace()
        .map(|w| {
            if w.chars().any(|c| c.is_ascii_digit()) {
                "…"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn join(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// One invariant and whether it holds.
#[derive(Debug, Clone)]
pub(in crate::cli) struct Check {
    /// `a`, `b`, …
    pub(in crate::cli) label: char,
    /// What must hold.
    pub(in crate::cli) title: &'static str,
    /// Whether it does.
    pub(in crate::cli) pass: bool,
    /// Numbers behind the verdict, or the first counterexamples.
    pub(in crate::cli) detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        write!(
            f,
            "{verdict} ({}) {}: {}",
            self.label, self.title, self.detail
        )
    }
}

/// How many counterexamples a failed check lists.
const EXAMPLES: usize = 5;

pub(in crate::cli) fn check(
    label: char,
    title: &'static str,
    problems: Vec<String>,
    ok: String,
) -> Check {
    let pass = problems.is_empty();
    let detail = if pass {
        ok
    } else {
        let more = problems.len().saturating_sub(EXAMPLES);
        let mut d = format!("{} problem(s): {}", problems.len(), {
            problems[..problems.len().min(EXAMPLES)].join("; ")
        });
        if more > 0 {
            d.push_str(&format!("; and {more} more"));
        }
        d
    };
    Check {
        label,
        title,
        pass,
        detail,
    }
}

/// Checks the invariants. `deliveries` is where each of `workload.messages` landed.
pub(in crate::cli) fn checks(
    workload: &Workload,
    model: &Model,
    deliveries: &[Delivery],
    observed: &Observed,
) -> Vec<Check> {
    let stored = |key: &(String, String)| {
        observed.aggregates.get(key).cloned().unwrap_or(Modeled {
            version: 0,
            state: Value::Null,
        })
    };
    let mut out = Vec::new();

    // (a) Accounts: state and version equal the serial model's.
    let mut problems = Vec::new();
    let (mut accounts, mut total) = (0, 0i64);
    for (key, want) in model.aggregates.iter().filter(|(k, _)| k.0 == "account") {
        accounts += 1;
        let got = stored(key);
        let balance = |m: &Modeled| m.state.get("balance").and_then(Value::as_i64);
        total += balance(&got).unwrap_or(0);
        if got != *want {
            problems.push(format!(
                "{}: balance {:?} at version {}, model {:?} at version {}",
                key.1,
                balance(&got),
                got.version,
                balance(want),
                want.version
            ));
        }
    }
    out.push(check(
        'a',
        "account balances equal the serial model",
        problems,
        format!("{accounts} accounts, total balance {total}, each as the model computes it"),
    ));

    // (b) No balance is negative: neither now nor after any event.
    let mut problems = Vec::new();
    for (key, got) in observed.aggregates.iter().filter(|(k, _)| k.0 == "account") {
        if let Some(b) = got.state.get("balance").and_then(Value::as_i64) {
            if b < 0 {
                problems.push(format!("{} has balance {b}", key.1));
            }
        }
    }
    let mut balance_events = 0;
    for e in observed
        .events
        .iter()
        .filter(|e| e.aggregate.0 == "account")
    {
        if let Some(b) = e.data.get("balance").and_then(Value::as_i64) {
            balance_events += 1;
            if b < 0 {
                problems.push(format!(
                    "{} version {} left balance {b}",
                    e.aggregate.1, e.version
                ));
            }
        }
    }
    out.push(check(
        'b',
        "no balance is negative",
        problems,
        format!("none of the final balances or the {balance_events} balances after a deposit or withdrawal"),
    ));

    // (c) Rooms: replaying the stored events never books a night twice, and the state
    // equals the model's.
    let mut problems = Vec::new();
    let mut booked: HashMap<(&str, &str), &str> = HashMap::new();
    for e in observed.events.iter().filter(|e| e.aggregate.0 == "room") {
        let night = e.data.get("night").and_then(Value::as_str).unwrap_or("?");
        let guest = e.data.get("guest").and_then(Value::as_str).unwrap_or("?");
        let slot = (e.aggregate.1.as_str(), night);
        match e.event_type.as_str() {
            "room.Booked" => {
                if let Some(first) = booked.insert(slot, guest) {
                    problems.push(format!(
                        "{} night {night} booked for {first} and again for {guest}",
                        e.aggregate.1
                    ));
                }
            }
            "room.Cancelled" => {
                if booked.remove(&slot).is_none() {
                    problems.push(format!(
                        "{} night {night} cancelled but not booked",
                        e.aggregate.1
                    ));
                }
            }
            other => problems.push(format!("unexpected event {other}")),
        }
    }
    let mut rooms = 0;
    for (key, want) in model.aggregates.iter().filter(|(k, _)| k.0 == "room") {
        rooms += 1;
        let got = stored(key);
        if got != *want {
            problems.push(format!(
                "{}: state {} at version {}, model {} at version {}",
                key.1, got.state, got.version, want.state, want.version
            ));
        }
    }
    let refused = workload
        .valid
        .iter()
        .zip(&model.outcomes)
        .filter(|(c, outcome)| {
            c.command_type.as_str() == "room.Book" && **outcome != Outcome::Applied
        })
        .count();
    out.push(check(
        'c',
        "no room night is booked twice; rooms equal the serial model",
        problems,
        format!(
            "{} nights booked across {rooms} rooms, {refused} bookings of taken nights refused",
            booked.len()
        ),
    ));

    // (d) Each aggregate's events carry versions 1..=version, no gaps, no repeats.
    let mut problems = Vec::new();
    let mut versions: BTreeMap<&(String, String), Vec<i64>> = BTreeMap::new();
    for e in &observed.events {
        versions.entry(&e.aggregate).or_default().push(e.version);
    }
    for (key, vs) in &versions {
        let want: Vec<i64> = (1..=vs.len() as i64).collect();
        if **vs != want {
            problems.push(format!("{}/{} has versions {vs:?}", key.0, key.1));
        }
        let at = stored(key).version;
        if at != vs.len() as i64 {
            problems.push(format!(
                "{}/{} is at version {at} with {} events",
                key.0,
                key.1,
                vs.len()
            ));
        }
    }
    for (key, got) in &observed.aggregates {
        if !versions.contains_key(key) {
            problems.push(format!(
                "{}/{} is at version {} without events",
                key.0, key.1, got.version
            ));
        }
    }
    // And they are the very events the serial model emits, version for version.
    let mut modeled: HashMap<(&(String, String), i64), &ModelEvent> = model
        .events
        .iter()
        .map(|e| ((&e.aggregate, e.version), e))
        .collect();
    for e in &observed.events {
        match modeled.remove(&(&e.aggregate, e.version)) {
            Some(m) if m.event_type == e.event_type && m.data == e.data => {}
            Some(m) => problems.push(format!(
                "{}/{} version {} is {} {}, the model's is {} {}",
                e.aggregate.0, e.aggregate.1, e.version, e.event_type, e.data, m.event_type, m.data
            )),
            None => problems.push(format!(
                "{}/{} version {} ({}) is not in the model",
                e.aggregate.0, e.aggregate.1, e.version, e.event_type
            )),
        }
    }
    if !modeled.is_empty() {
        problems.push(format!(
            "{} of the model's events are not stored",
            modeled.len()
        ));
    }
    out.push(check(
        'd',
        "every aggregate's events have versions 1..=version without gaps, as the model's",
        problems,
        format!(
            "{} aggregates, {} events",
            versions.len(),
            observed.events.len()
        ),
    ));

    // (e) Exactly-once publication: the topic holds each stored event once, and nothing else.
    let mut problems = Vec::new();
    let table: HashSet<Uuid> = observed.events.iter().map(|e| e.id).collect();
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut repeated = 0;
    for id in &observed.published_events {
        if !seen.insert(*id) {
            repeated += 1;
        }
    }
    if repeated > 0 {
        problems.push(format!("{repeated} event(s) published more than once"));
    }
    let missing = table.difference(&seen).count();
    if missing > 0 {
        problems.push(format!("{missing} stored event(s) not published"));
    }
    let extra = seen.difference(&table).count();
    if extra > 0 {
        problems.push(format!("{extra} published event(s) not in the table"));
    }
    if observed.unreadable_events > 0 {
        problems.push(format!(
            "{} message(s) on the events topic without an id",
            observed.unreadable_events
        ));
    }
    out.push(check(
        'e',
        "events on the topic = events in the table",
        problems,
        format!("{} events, each published once", table.len()),
    ));

    // (f) and (g) look each message up where it landed: without a delivery for every
    // message they would check nothing, and pass.
    let landed = (deliveries.len() != workload.messages.len()).then(|| {
        format!(
            "{} deliveries for {} messages: cannot tell where the messages landed",
            deliveries.len(),
            workload.messages.len()
        )
    });

    // (f) Every invalid message is a dead letter of the expected kind, and nothing else is.
    let mut problems: Vec<String> = landed.iter().cloned().collect();
    let mut expected = 0;
    for (m, d) in workload.messages.iter().zip(deliveries) {
        let Expect::DeadLetter { kind, what } = &m.expect else {
            continue;
        };
        expected += 1;
        match observed.dead_letters.get(&(d.partition, d.offset)) {
            Some(got) if got == kind.as_str() => {}
            Some(got) => problems.push(format!("{what}: dead-lettered as {got}, not {kind}")),
            None => problems.push(format!(
                "{what} (partition {}, offset {}): no dead letter",
                d.partition, d.offset
            )),
        }
    }
    if observed.dead_letters.len() != expected {
        problems.push(format!(
            "{} dead letters for {expected} invalid messages",
            observed.dead_letters.len()
        ));
    }
    out.push(check(
        'f',
        "every invalid message is dead-lettered with the expected kind",
        problems,
        format!("{expected} invalid messages, each dead-lettered as expected"),
    ));

    // (g) Each re-sent command is detected as a duplicate, at the offset it was re-sent to.
    let mut problems: Vec<String> = landed.into_iter().collect();
    let want: HashSet<(i32, i64)> = workload
        .messages
        .iter()
        .zip(deliveries)
        .filter(|(m, _)| matches!(m.expect, Expect::Duplicate(_)))
        .map(|(_, d)| (d.partition, d.offset))
        .collect();
    let got: HashSet<(i32, i64)> = observed.duplicates.iter().copied().collect();
    let undetected = want.difference(&got).count();
    if undetected > 0 {
        problems.push(format!("{undetected} re-sent command(s) not detected"));
    }
    let spurious = got.difference(&want).count();
    if spurious > 0 {
        problems.push(format!("{spurious} first deliveries taken for duplicates"));
    }
    out.push(check(
        'g',
        "duplicates detected = duplicates produced",
        problems,
        format!("{} produced, {} detected", want.len(), got.len()),
    ));

    // (h) Each valid command was processed once, with the model's outcome.
    let mut problems = Vec::new();
    for (c, outcome) in workload.valid.iter().zip(&model.outcomes) {
        let applied = &(*outcome == Outcome::Applied);
        let key = (c.source.to_string(), c.id.to_string());
        match observed.processed.get(&key) {
            None => problems.push(format!("{} ({}) was not processed", c.id, c.command_type)),
            Some(p) if p.applied != *applied => problems.push(format!(
                "{} ({} {}) was {}, the model says {}",
                c.id,
                c.command_type,
                c.subject,
                if p.applied { "applied" } else { "rejected" },
                if *applied { "applied" } else { "rejected" },
            )),
            Some(_) => {}
        }
    }
    if observed.processed.len() != workload.valid.len() {
        problems.push(format!(
            "{} commands recorded as processed, {} produced",
            observed.processed.len(),
            workload.valid.len()
        ));
    }
    out.push(check(
        'h',
        "every command was processed once, with the serial model's outcome",
        problems,
        format!("{} commands", workload.valid.len()),
    ));

    // (i) The dead-letter topic holds each dead letter once.
    let mut problems = Vec::new();
    let table: HashSet<(i32, i64)> = observed.dead_letters.keys().copied().collect();
    let mut seen = HashSet::new();
    for k in &observed.published_dead_letters {
        if !seen.insert(*k) {
            problems.push(format!("partition {} offset {} published twice", k.0, k.1));
        }
    }
    for k in table.symmetric_difference(&seen) {
        problems.push(format!(
            "partition {} offset {} is only in the {}",
            k.0,
            k.1,
            if table.contains(k) { "table" } else { "topic" }
        ));
    }
    out.push(check(
        'i',
        "the dead-letter topic holds each dead letter once",
        problems,
        format!("{} dead letters published", seen.len()),
    ));

    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use commands::partitioner::partition_for_key;

    use crate::cli::demo::SOURCE;
    use crate::harness::workload::Send;

    const PARTITIONS: i32 = 6;

    /// Where a broker would put each message: by key, misrouted ones where they were sent.
    fn deliveries(w: &Workload) -> Vec<Delivery> {
        let mut next: HashMap<i32, i64> = HashMap::new();
        w.messages
            .iter()
            .map(|m| {
                let partition = match &m.send {
                    Send::Command(i) => {
                        partition_for_key(w.valid[*i].subject.as_str().as_bytes(), PARTITIONS)
                            .unwrap()
                    }
                    Send::Raw { key: Some(k), .. } => partition_for_key(k, PARTITIONS).unwrap(),
                    Send::Raw { key: None, .. } => 0,
                    Send::Misrouted { partition, .. } => *partition,
                };
                let offset = next.entry(partition).or_default();
                *offset += 1;
                Delivery {
                    partition,
                    offset: *offset - 1,
                }
            })
            .collect()
    }

    /// What a correct engine leaves behind.
    fn faithful(w: &Workload, model: &Model, deliveries: &[Delivery]) -> Observed {
        let of = |f: fn(&Expect) -> bool| {
            w.messages
                .iter()
                .zip(deliveries)
                .filter(move |(m, _)| f(&m.expect))
        };
        let events: Vec<StoredEvent> = model
            .events
            .iter()
            .map(|e| StoredEvent {
                id: Uuid::new_v4(),
                aggregate: e.aggregate.clone(),
                version: e.version,
                event_type: e.event_type.clone(),
                data: e.data.clone(),
            })
            .collect();
        let dead_letters: BTreeMap<(i32, i64), String> =
            of(|e| matches!(e, Expect::DeadLetter { .. }))
                .map(|(m, d)| match &m.expect {
                    Expect::DeadLetter { kind, .. } => ((d.partition, d.offset), kind.to_string()),
                    _ => unreachable!(),
                })
                .collect();
        Observed {
            processed: w
                .valid
                .iter()
                .zip(&model.outcomes)
                .map(|(c, outcome)| {
                    let applied = &(*outcome == Outcome::Applied);
                    (
                        (SOURCE.to_owned(), c.id.to_string()),
                        Processed {
                            applied: *applied,
                            reason: (!applied).then(|| "no".to_owned()),
                        },
                    )
                })
                .collect(),
            duplicates: of(|e| matches!(e, Expect::Duplicate(_)))
                .map(|(_, d)| (d.partition, d.offset))
                .collect(),
            published_dead_letters: dead_letters.keys().copied().collect(),
            dead_letters,
            published_events: events.iter().map(|e| e.id).collect(),
            events,
            aggregates: model
                .aggregates
                .iter()
                .filter(|(_, m)| m.version > 0)
                .map(|(k, m)| (k.clone(), m.clone()))
                .collect(),
            unreadable_events: 0,
        }
    }

    fn failing(checks: &[Check]) -> Vec<char> {
        checks.iter().filter(|c| !c.pass).map(|c| c.label).collect()
    }

    #[test]
    fn a_faithful_run_passes_and_each_kind_of_damage_is_caught() {
        let w = crate::cli::demo::demo_workload(5, 600, PARTITIONS).unwrap();
        let model = Model::run(&bank::registry(), &w.valid).unwrap();
        let d = deliveries(&w);
        let good = faithful(&w, &model, &d);
        assert_eq!(failing(&checks(&w, &model, &d, &good)), Vec::<char>::new());

        let damaged = |f: &dyn Fn(&mut Observed)| {
            let mut o = good.clone();
            f(&mut o);
            failing(&checks(&w, &model, &d, &o))
        };
        let account = ("account".to_owned(), "acc-1".to_owned());
        assert_eq!(
            damaged(&|o| o.aggregates.get_mut(&account).unwrap().state["balance"] = (-1).into()),
            ['a', 'b']
        );
        assert!(damaged(&|o| {
            let booked = o
                .events
                .iter()
                .find(|e| e.event_type == "room.Booked")
                .unwrap();
            let mut again = booked.clone();
            again.id = Uuid::new_v4();
            again.version = 1_000;
            o.events.push(again);
        })
        .contains(&'c'));
        assert_eq!(damaged(&|o| o.events[7].version += 1), ['d']);
        assert_eq!(
            damaged(&|o| {
                let id = o.published_events[3];
                o.published_events.push(id);
            }),
            ['e']
        );
        assert_eq!(
            damaged(&|o| *o.dead_letters.values_mut().next().unwrap() = "schema".into()),
            ['f']
        );
        assert_eq!(
            damaged(&|o| {
                o.duplicates.pop();
            }),
            ['g']
        );
        assert_eq!(
            damaged(&|o| {
                let p = o.processed.values_mut().next().unwrap();
                p.applied = !p.applied;
            }),
            ['h']
        );
        assert_eq!(
            damaged(&|o| {
                o.published_dead_letters.pop();
            }),
            ['i']
        );
    }

    #[test]
    fn checks_without_deliveries_fail_instead_of_passing_vacuously() {
        let w = crate::cli::demo::demo_workload(6, 300, PARTITIONS).unwrap();
        let model = Model::run(&bank::registry(), &w.valid).unwrap();
        let d = deliveries(&w);
        let good = faithful(&w, &model, &d);
        assert_eq!(failing(&checks(&w, &model, &[], &good)), ['f', 'g']);
        // Also for a workload of valid commands only, as the bench's.
        let only = Workload::of_commands(w.valid.clone());
        let d = deliveries(&only);
        let good = faithful(&only, &model, &d);
        assert_eq!(
            failing(&checks(&only, &model, &d, &good)),
            Vec::<char>::new()
        );
        assert_eq!(failing(&checks(&only, &model, &[], &good)), ['f', 'g']);
    }

    #[test]
    fn reasons_group_without_their_numbers() {
        assert_eq!(
            reason_kind("insufficient funds: balance 10, withdrawal 25"),
            "insufficient funds"
        );
        assert_eq!(
            reason_kind("night 2026-12-24 is already booked"),
            "night … is already booked"
        );
    }
}
