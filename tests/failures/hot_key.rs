//! A hot key keeps strict order: half the commands on one account, three workers.

use commands::Command;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{command, WAIT};
use crate::support::workload::{assert_events_published, assert_matches_model, serial_model};
use crate::support::{ends, produce_all, wait_processed, TestDb, TestTopics, WorkerProcess};

// ---------------------------------------------------------------------------------------
// 8. A hot key keeps strict order.

/// Half the commands go to `acc-hot` (deposits and larger withdrawals, so many are
/// rejected and any reordering would change which); the rest spread over 200 accounts.
fn hot_key_workload(seed: u64, count: usize) -> Vec<Command> {
    let mut rng = StdRng::seed_from_u64(seed);
    let source = format!("/hot/{seed}");
    let mut out = Vec::with_capacity(count);
    let push = |out: &mut Vec<Command>, ty: &str, subject: &str, data: Value| {
        let id = format!("c-{}", out.len());
        out.push(command(&source, id, ty, subject, data));
    };
    push(&mut out, "account.Open", "acc-hot", json!({"owner": "hot"}));
    for a in 0..200 {
        push(
            &mut out,
            "account.Open",
            &format!("acc-{a}"),
            json!({"owner": format!("o{a}")}),
        );
    }
    while out.len() < count {
        let subject = if rng.gen_bool(0.5) {
            "acc-hot".to_owned()
        } else {
            format!("acc-{}", rng.gen_range(0..200))
        };
        if rng.gen_bool(0.5) {
            let amount: i64 = rng.gen_range(1..=100);
            push(
                &mut out,
                "account.Deposit",
                &subject,
                json!({"amount": amount}),
            );
        } else {
            let amount: i64 = rng.gen_range(1..=300);
            push(
                &mut out,
                "account.Withdraw",
                &subject,
                json!({"amount": amount}),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hot_key_keeps_strict_order() {
    let _serial = crate::serial().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let workers: Vec<WorkerProcess> = (0..3)
        .map(|i| WorkerProcess::spawn(&db, &topics, &format!("w{i}"), &[]))
        .collect();
    let commands = hot_key_workload(808, 20_000);
    let model = serial_model(&commands);
    let hot = &model.aggregates[&("account".to_owned(), "acc-hot".to_owned())];
    let hot_rejections = {
        // The workload only means something if the hot key's outcomes depend on order.
        let registry = bank::registry();
        let account = registry.get("account").unwrap();
        let mut state = Value::Null;
        let mut rejected = 0;
        for c in commands.iter().filter(|c| c.subject.as_str() == "acc-hot") {
            let context = commands::Context::new(&c.id, &c.source, 0);
            match account.handle(&state, c.command_type.name(), &c.data, &context) {
                commands::Handled::Accepted(decision) => {
                    state = account.apply(&state, &decision.events)
                }
                commands::Handled::Rejected(_) => rejected += 1,
                commands::Handled::Invalid(error) => panic!("invalid workload command: {error}"),
            }
        }
        rejected
    };
    assert!(
        hot_rejections > 1_000,
        "{hot_rejections} rejections on acc-hot"
    );

    let deliveries = produce_all(&topics.producer(), &commands).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;

    // On the events topic, acc-hot's events carry versions 1, 2, ..., N in topic order.
    let versions: Vec<i64> = crate::support::read_topic(&topics.events)
        .iter()
        .map(|m| m.json().expect("JSON value"))
        .filter(|v| v["subject"] == "acc-hot")
        .map(|v| v["aggregateversion"].as_i64().expect("aggregateversion"))
        .collect();
    let want: Vec<i64> = (1..=hot.version).collect();
    assert_eq!(versions.len(), want.len(), "acc-hot's events on the topic");
    if let Some(i) = versions.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "acc-hot's events are out of order at position {i}: {:?}",
            &versions[i.saturating_sub(3)..(i + 3).min(versions.len())]
        );
    }
    eprintln!(
        "acc-hot: {} events in order, {hot_rejections} rejections",
        versions.len()
    );
    drop(workers);
    db.drop_db().await;
}
