//! The `gateway` run: time to an outcome at a fixed offered rate, three ways, against the
//! same worker processes.
//!
//! - `gateway`: `POST /commands` to an in-process `cmdproc gateway`, over HTTP/1.1 with
//!   pooled connections; the answer carries the outcome.
//! - `produce-wait`: what `cmdproc produce --wait` does, in process: a [`ReplyWaiter`] on the
//!   reply topic, then produce with `replyto` and wait for the reply.
//! - `produce-poll`: produce without `replyto`, then poll `processed_commands` every 5 ms
//!   until the outcome is recorded: what a caller without replies has to do.
//!
//! Each way sends deposits at `--gateway-rate` for `--latency-duration`, open loop: request
//! `i` is due at `start + i / rate` and its time runs from when it was due, so a slow answer
//! delays no later request and queueing shows in the figures. Writes
//! `<out>/bench-gateway.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use commands::{AggregateId, Command, CommandId, CommandType, Registry, Source};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::demo::verify;
use super::demo::workers::Workers;
use super::demo::{self};
use super::{BenchArgs, Common, RunDatabase};
use crate::gateway::{Gateway, Settings};
use crate::producer::CommandProducer;
use crate::replies::ReplyWaiter;

/// Accounts the deposits are spread over.
const ACCOUNTS: usize = 200;
/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The interval of the produce-and-poll baseline.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// Nearest-rank percentiles of the time to an outcome, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
struct Percentiles {
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1000.0
        };
        Some(Self {
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

/// One way's figures.
#[derive(Debug, Clone, Serialize)]
struct WayResult {
    way: &'static str,
    offered_per_second: u32,
    sent: usize,
    /// Requests that got their outcome (applied) within the request timeout.
    answered: usize,
    failed: usize,
    /// Answered requests per second, from the first request due to the last answer.
    achieved_per_second: f64,
    #[serde(flatten)]
    time_to_outcome: Option<Percentiles>,
}

#[derive(Debug, Serialize)]
struct Report {
    workers: u32,
    partitions: i32,
    accounts: usize,
    seconds_per_way: f64,
    build: &'static str,
    ways: Vec<WayResult>,
}

/// Runs the three ways in a namespace of their own and writes `<out>/bench-gateway.json`.
pub(super) async fn run(
    common: &Common,
    registry: &Arc<Registry>,
    args: &BenchArgs,
) -> anyhow::Result<()> {
    let db = RunDatabase::create(common).await?;
    let replies = db.ns.commands.replies();
    let dir = std::env::temp_dir().join(format!("cmdproc-bench-{}", db.ns.id));
    let mut workers = Workers::new(dir.clone());
    let outcome = async {
        let topics: Vec<(String, i32)> = [
            &db.ns.commands,
            &db.ns.events,
            &db.ns.dead_letters,
            &replies,
        ]
        .iter()
        .map(|t| (t.to_string(), args.partitions))
        .collect();
        crate::topics::create(&common.brokers, &topics, 1, common.connect_timeout).await?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let batch = args.batch_size.to_string();
        demo::spawn_workers(
            common,
            &db.ns,
            &db.url,
            &mut workers,
            args.workers,
            &["--batch-size", batch.as_str()],
        )?;
        let expected = (args.workers as usize).min(args.partitions as usize);
        verify::wait_ready(
            &db.pool,
            db.ns.commands.as_str(),
            args.partitions,
            expected,
            &mut workers,
            demo::JOIN_TIMEOUT,
        )
        .await?;
        measure(common, registry, args, &db).await
    }
    .await;
    workers.stop(demo::STOP_GRACE).await;
    if outcome.is_err() {
        eprint!("{}", workers.log_tails(demo::LOG_TAIL));
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ =
        crate::topics::delete(&common.brokers, &[replies.as_str()], common.connect_timeout).await;
    db.drop(common).await;
    let ways = outcome?;
    let report = Report {
        workers: args.workers,
        partitions: args.partitions,
        accounts: ACCOUNTS,
        seconds_per_way: args.latency_duration.as_secs_f64(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        ways,
    };
    let path = args.out.join("bench-gateway.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("gateway  wrote {}", path.display());
    Ok(())
}

fn deposit(way: &str, i: usize) -> Command {
    Command::new(
        Source::parse("/bench").expect("a valid source"),
        CommandId::parse(format!("{way}-{i}")).expect("a valid id"),
        CommandType::parse("account.Deposit").expect("a valid type"),
        AggregateId::parse(format!("gw-{}", i % ACCOUNTS)).expect("a valid id"),
        json!({"amount": 1}),
    )
}

async fn measure(
    common: &Common,
    registry: &Arc<Registry>,
    args: &BenchArgs,
    db: &RunDatabase,
) -> anyhow::Result<Vec<WayResult>> {
    let commands_topic = db.ns.commands.clone();
    let replies = commands_topic.replies();
    let producer = Arc::new(CommandProducer::new(
        &common.brokers,
        commands_topic.clone(),
        REQUEST_TIMEOUT,
    )?);
    let waiter = ReplyWaiter::start(&common.brokers, &replies).await?;

    // Open the accounts, waiting for each reply.
    let opens = (0..ACCOUNTS).map(|i| {
        let (producer, waiter, replies) = (producer.clone(), waiter.clone(), replies.clone());
        async move {
            let open = Command::new(
                Source::parse("/bench").expect("a valid source"),
                CommandId::parse(format!("open-{i}")).expect("a valid id"),
                CommandType::parse("account.Open").expect("a valid type"),
                AggregateId::parse(format!("gw-{i}")).expect("a valid id"),
                json!({"owner": "bench"}),
            )
            .with_reply_to(replies);
            let pending = waiter.expect(open.source.as_str(), open.id.as_str());
            producer.send(&open).await?;
            pending
                .wait(Duration::from_secs(60))
                .await
                .context("an account was not opened within 60s")
        }
    });
    futures::future::try_join_all(opens).await?;

    let stop = CancellationToken::new();
    let gateway = Gateway::start(
        registry.clone(),
        db.pool.clone(),
        Settings {
            brokers: common.brokers.clone(),
            commands_topic: commands_topic.clone(),
            reply_topic: replies.clone(),
            default_source: Source::parse("/bench").expect("a valid source"),
            deadline: REQUEST_TIMEOUT,
            max_body_bytes: 1 << 20,
        },
        stop.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/commands", listener.local_addr()?);
    let server = tokio::spawn(crate::gateway::serve(listener, gateway, stop.clone()));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let poll_pool = crate::store::connect(&db.url, 16, common.connect_timeout).await?;

    let rate = args.gateway_rate;
    let n = ((f64::from(rate) * args.latency_duration.as_secs_f64()) as usize).max(1);
    let mut results = Vec::new();

    let gateway_way = offered(rate, n, "gateway", |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let command = deposit("gateway", i);
            let body = json!({"type": "account.Deposit", "subject": command.subject.as_str(), "data": command.data});
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .header("idempotency-key", command.id.as_str())
                .body(body.to_string())
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())
        }
    })
    .await;
    results.push(gateway_way);

    let wait_way = offered(rate, n, "produce-wait", |i| {
        let (producer, waiter, replies) = (producer.clone(), waiter.clone(), replies.clone());
        async move {
            let command = deposit("wait", i).with_reply_to(replies);
            let pending = waiter.expect(command.source.as_str(), command.id.as_str());
            producer.send(&command).await.ok()?;
            let reply = pending.wait(REQUEST_TIMEOUT).await?;
            (reply.outcome.name() == "applied").then_some(())
        }
    })
    .await;
    results.push(wait_way);

    let poll_way = offered(rate, n, "produce-poll", |i| {
        let (producer, pool) = (producer.clone(), poll_pool.clone());
        async move {
            let command = deposit("poll", i);
            producer.send(&command).await.ok()?;
            let give_up = Instant::now() + REQUEST_TIMEOUT;
            loop {
                let recorded = crate::store::recorded_command(
                    &pool,
                    command.source.as_str(),
                    command.id.as_str(),
                )
                .await
                .ok()?;
                if recorded.is_some() {
                    return Some(());
                }
                if Instant::now() > give_up {
                    return None;
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        }
    })
    .await;
    results.push(poll_way);

    stop.cancel();
    let _ = server.await;
    poll_pool.close().await;
    Ok(results)
}

/// Starts request `i` (of `n`) at `start + i / rate`, each in a task of its own, and times
/// each from when it was due to when `request` returned `Some`.
async fn offered<F, Fut>(rate: u32, n: usize, way: &'static str, request: F) -> WayResult
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Option<()>> + Send + 'static,
{
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        let future = request(i);
        tasks.spawn(async move {
            let answered = future.await;
            (answered, due.elapsed(), tokio::time::Instant::now())
        });
    }
    let (mut samples, mut failed, mut last) = (Vec::with_capacity(n), 0, start);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((Some(()), took, at)) => {
                samples.push(took);
                last = last.max(at);
            }
            _ => failed += 1,
        }
    }
    let answered = samples.len();
    let seconds = (last - start).as_secs_f64().max(f64::EPSILON);
    let result = WayResult {
        way,
        offered_per_second: rate,
        sent: n,
        answered,
        failed,
        achieved_per_second: answered as f64 / seconds,
        time_to_outcome: Percentiles::of(samples),
    };
    match &result.time_to_outcome {
        Some(p) => println!(
            "{way:<13} offered {rate}/s: {answered}/{n} answered ({failed} failed), {:.0}/s, \
             time to outcome p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            result.achieved_per_second, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
        ),
        None => println!("{way:<13} offered {rate}/s: nothing answered ({failed} failed)"),
    }
    result
}
