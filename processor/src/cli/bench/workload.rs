//! The benchmark's commands: accounts opened first, then deposits and withdrawals spread
//! over them uniformly or Zipf-skewed (rank 1, `acc-000001`, is the hot key). Seeded, so a
//! rerun produces the same commands.

use chrono::{DateTime, TimeDelta, Utc};
use commands::{AggregateId, Command, CommandId, CommandType, Source};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::json;

use crate::cli::demo::workload::{Expect, Message, Send, Workload};

/// The `source` of every benchmark command.
pub(super) const SOURCE: &str = "/cmdproc-bench";

/// How the commands pick their aggregate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Skew {
    /// Every account equally likely.
    Uniform,
    /// Zipf with this exponent: account of rank k with probability proportional to 1/k^s.
    Zipf(f64),
}

/// What the commands after the opens do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mix {
    /// 80 % deposits, 20 % withdrawals (some refused for insufficient funds).
    DepositsAndWithdrawals,
    /// Deposits only: every command emits exactly one event.
    DepositsOnly,
}

/// `total` commands: one `account.Open` for each of `aggregates` accounts (fewer when
/// `total` is smaller), then deposits and withdrawals picked by `skew`.
pub(super) fn commands(
    seed: u64,
    total: usize,
    aggregates: usize,
    skew: Skew,
    mix: Mix,
) -> anyhow::Result<Vec<Command>> {
    anyhow::ensure!(aggregates >= 1, "--aggregates must be at least 1");
    let mut rng = StdRng::seed_from_u64(seed);
    let opened = aggregates.min(total);
    let zipf = match skew {
        Skew::Uniform => None,
        Skew::Zipf(s) => Some(
            Zipf::new(opened as u64, s)
                .map_err(|e| anyhow::anyhow!("invalid Zipf exponent {s}: {e}"))?,
        ),
    };
    let start: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time");
    let source = Source::parse(SOURCE).expect("a valid source");
    let mut out = Vec::with_capacity(total);
    let mut push = |ty: &str, account: usize, data| {
        let n = out.len();
        let mut c = Command::new(
            source.clone(),
            CommandId::parse(format!("b-{seed}-{n:08}")).expect("a valid id"),
            CommandType::parse(ty).expect("a valid type"),
            AggregateId::parse(account_id(account)).expect("a valid subject"),
            data,
        );
        c.time = Some(start + TimeDelta::milliseconds(n as i64));
        out.push(c);
    };
    for account in 1..=opened {
        push("account.Open", account, json!({ "owner": "bench" }));
    }
    for _ in opened..total {
        let account = match &zipf {
            None => rng.gen_range(1..=opened),
            Some(z) => (z.sample(&mut rng) as usize).clamp(1, opened),
        };
        if mix == Mix::DepositsOnly || rng.gen_bool(0.8) {
            let amount: i64 = rng.gen_range(1..=1_000);
            push("account.Deposit", account, json!({ "amount": amount }));
        } else {
            let amount: i64 = rng.gen_range(1..=2_000);
            push("account.Withdraw", account, json!({ "amount": amount }));
        }
    }
    Ok(out)
}

/// The id of the account of rank `k`.
pub(super) fn account_id(k: usize) -> String {
    format!("acc-{k:06}")
}

/// `valid` as a workload of the demo's checks: each command sent once, nothing else.
pub(super) fn as_workload(valid: Vec<Command>) -> Workload {
    let messages = (0..valid.len())
        .map(|i| Message {
            send: Send::Command(i),
            expect: Expect::Processed(i),
        })
        .collect();
    Workload { valid, messages }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn opens_every_account_first_and_is_reproducible() {
        let a = commands(1, 1_000, 50, Skew::Uniform, Mix::DepositsAndWithdrawals).unwrap();
        assert_eq!(a.len(), 1_000);
        assert!(a[..50]
            .iter()
            .all(|c| c.command_type.as_str() == "account.Open"));
        assert!(a[50..]
            .iter()
            .all(|c| c.command_type.as_str() != "account.Open"));
        let b = commands(1, 1_000, 50, Skew::Uniform, Mix::DepositsAndWithdrawals).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn zipf_makes_the_first_account_hot() {
        let c = commands(2, 20_000, 1_000, Skew::Zipf(1.1), Mix::DepositsOnly).unwrap();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for c in &c[1_000..] {
            *counts.entry(c.subject.as_str()).or_default() += 1;
        }
        let hot = counts[account_id(1).as_str()];
        let median = {
            let mut v: Vec<usize> = counts.values().copied().collect();
            v.sort_unstable();
            v[v.len() / 2]
        };
        assert!(hot > 2_000, "the hot key got {hot} of 19,000");
        assert!(hot > 50 * median, "hot {hot}, median {median}");
        assert!(c[1_000..]
            .iter()
            .all(|c| c.command_type.as_str() == "account.Deposit"));
    }
}
