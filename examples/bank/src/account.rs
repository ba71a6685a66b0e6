//! `account`: a balance in minor units that never goes negative.
//!
//! The invariant is the point of the example: two withdrawals racing for the same money are
//! serialized by the single writer, so the second one sees the first one's balance and is
//! rejected instead of overdrawing.

use serde::{Deserialize, Serialize};

use commands::{Aggregate, Context, Decision, Rejection};

/// The account aggregate (type `account`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Account;

/// What an account accepts. Amounts are in minor units (cents) and must be positive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Mirrors `additionalProperties: false` in the schemas, so the handler is as strict as the
// contract even when called without schema validation.
#[serde(deny_unknown_fields)]
pub enum AccountCommand {
    /// Opens the account for `owner`; every other command needs an open account.
    Open {
        /// The account holder's name.
        owner: String,
    },
    /// Adds `amount` to the balance.
    Deposit {
        /// Minor units, at least 1.
        amount: i64,
    },
    /// Takes `amount` from the balance, if the balance covers it.
    Withdraw {
        /// Minor units, at least 1.
        amount: i64,
    },
}

/// What happened to an account. Deposits and withdrawals carry the balance after them, so
/// an event consumer needs no running total of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// The account was opened.
    Opened {
        /// The account holder's name.
        owner: String,
    },
    /// Money was paid in.
    Deposited {
        /// Minor units paid in.
        amount: i64,
        /// Balance after the deposit.
        balance: i64,
    },
    /// Money was taken out.
    Withdrawn {
        /// Minor units taken out.
        amount: i64,
        /// Balance after the withdrawal, never negative.
        balance: i64,
    },
}

/// An account's state; the default is an account that was never opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountState {
    /// Whether `Open` has been applied.
    pub opened: bool,
    /// The holder, once opened.
    pub owner: Option<String>,
    /// Current balance in minor units; the handler keeps it at zero or above.
    pub balance: i64,
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type State = AccountState;
    type Command = AccountCommand;
    type Event = AccountEvent;

    fn handle(
        state: &AccountState,
        command: &AccountCommand,
        _context: &Context<'_>,
    ) -> Result<Decision<AccountEvent>, Rejection> {
        match command {
            AccountCommand::Open { owner } => {
                if state.opened {
                    return Err(Rejection::new("already_open", "account is already open"));
                }
                if owner.trim().is_empty() {
                    return Err(Rejection::new("empty_owner", "owner must not be empty"));
                }
                Ok(Decision::event(AccountEvent::Opened {
                    owner: owner.clone(),
                }))
            }
            AccountCommand::Deposit { amount } => {
                let amount = open_and_positive(state, *amount)?;
                let balance = state.balance.checked_add(amount).ok_or_else(|| {
                    Rejection::new(
                        "overflow",
                        format!(
                            "deposit of {amount} would overflow balance {}",
                            state.balance
                        ),
                    )
                })?;
                Ok(Decision::event(AccountEvent::Deposited { amount, balance }))
            }
            AccountCommand::Withdraw { amount } => {
                let amount = open_and_positive(state, *amount)?;
                // The balance is never negative and the amount is positive, so this cannot
                // overflow; `checked_sub` keeps it panic-free should a state ever be corrupt.
                match state.balance.checked_sub(amount) {
                    Some(balance) if balance >= 0 => {
                        Ok(Decision::event(AccountEvent::Withdrawn { amount, balance }))
                    }
                    _ => Err(Rejection::new(
                        "insufficient_funds",
                        format!(
                            "insufficient funds: balance {}, withdrawal {amount}",
                            state.balance
                        ),
                    )),
                }
            }
        }
    }

    fn apply(state: &mut AccountState, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => {
                state.opened = true;
                state.owner = Some(owner.clone());
            }
            // Taking the balance from the event, rather than re-adding the amount, keeps
            // `apply` total (no arithmetic that could overflow) and makes the event the
            // single source of truth.
            AccountEvent::Deposited { balance, .. } | AccountEvent::Withdrawn { balance, .. } => {
                state.balance = *balance;
            }
        }
    }
}

/// Checks what deposits and withdrawals share: an open account and a positive amount.
///
/// The schema already demands `amount >= 1`; the handler defends anyway because it must
/// hold its invariant even for callers that skip validation.
fn open_and_positive(state: &AccountState, amount: i64) -> Result<i64, Rejection> {
    if !state.opened {
        return Err(Rejection::new("not_open", "account is not open"));
    }
    if amount <= 0 {
        return Err(Rejection::new(
            "invalid_amount",
            format!("amount must be positive, got {amount}"),
        ));
    }
    Ok(amount)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handles one command with a fixed context, as the engine would, returning its events.
    fn handle(
        state: &AccountState,
        command: &AccountCommand,
    ) -> Result<Vec<AccountEvent>, Rejection> {
        let id = commands::CommandId::parse("c-1").expect("id");
        let source = commands::Source::parse("/test").expect("source");
        Account::handle(state, command, &Context::new(&id, &source, 0))
            .map(|decision| decision.events)
    }

    /// Handles `commands` in order from a new account, applying accepted ones, and returns
    /// the final state with each command's outcome.
    fn run(
        commands: &[AccountCommand],
    ) -> (AccountState, Vec<Result<Vec<AccountEvent>, Rejection>>) {
        let mut state = AccountState::default();
        let mut outcomes = Vec::new();
        for command in commands {
            let outcome = handle(&state, command);
            if let Ok(events) = &outcome {
                for event in events {
                    Account::apply(&mut state, event);
                }
            }
            outcomes.push(outcome);
        }
        (state, outcomes)
    }

    fn open(owner: &str) -> AccountCommand {
        AccountCommand::Open {
            owner: owner.into(),
        }
    }

    fn deposit(amount: i64) -> AccountCommand {
        AccountCommand::Deposit { amount }
    }

    fn withdraw(amount: i64) -> AccountCommand {
        AccountCommand::Withdraw { amount }
    }

    #[test]
    fn open_deposit_withdraw() {
        let (state, outcomes) = run(&[open("alice"), deposit(100), withdraw(40)]);
        assert_eq!(
            outcomes,
            [
                Ok(vec![AccountEvent::Opened {
                    owner: "alice".into()
                }]),
                Ok(vec![AccountEvent::Deposited {
                    amount: 100,
                    balance: 100
                }]),
                Ok(vec![AccountEvent::Withdrawn {
                    amount: 40,
                    balance: 60
                }]),
            ]
        );
        assert_eq!(
            state,
            AccountState {
                opened: true,
                owner: Some("alice".into()),
                balance: 60
            }
        );
    }

    #[test]
    fn commands_before_open_are_rejected() {
        let (state, outcomes) = run(&[deposit(10), withdraw(10)]);
        let not_open = Err(Rejection::new("not_open", "account is not open"));
        assert_eq!(outcomes, [not_open.clone(), not_open]);
        assert_eq!(state, AccountState::default());
    }

    #[test]
    fn opening_twice_is_rejected() {
        let (state, outcomes) = run(&[open("alice"), open("bob")]);
        assert_eq!(
            outcomes[1],
            Err(Rejection::new("already_open", "account is already open"))
        );
        assert_eq!(state.owner.as_deref(), Some("alice"));
    }

    #[test]
    fn empty_owner_is_rejected() {
        let (_, outcomes) = run(&[open("  ")]);
        assert_eq!(
            outcomes[0],
            Err(Rejection::new("empty_owner", "owner must not be empty"))
        );
    }

    #[test]
    fn overdraft_is_rejected_and_leaves_the_balance() {
        let (state, outcomes) = run(&[open("alice"), deposit(10), withdraw(25), withdraw(10)]);
        assert_eq!(
            outcomes[2],
            Err(Rejection::new(
                "insufficient_funds",
                "insufficient funds: balance 10, withdrawal 25"
            ))
        );
        assert!(outcomes[3].is_ok(), "withdrawing the exact balance is fine");
        assert_eq!(state.balance, 0);
    }

    #[test]
    fn non_positive_amounts_are_rejected() {
        for command in [deposit(0), deposit(-5), withdraw(0), withdraw(i64::MIN)] {
            let (state, outcomes) = run(&[open("alice"), deposit(100), command.clone()]);
            assert!(
                matches!(&outcomes[2], Err(r) if r.reason.starts_with("amount must be positive")),
                "{command:?} gave {:?}",
                outcomes[2]
            );
            assert_eq!(state.balance, 100);
        }
    }

    #[test]
    fn deposit_overflow_is_rejected() {
        let (state, outcomes) = run(&[open("alice"), deposit(i64::MAX), deposit(1)]);
        assert_eq!(
            outcomes[2],
            Err(Rejection::new(
                "overflow",
                format!("deposit of 1 would overflow balance {}", i64::MAX)
            ))
        );
        assert_eq!(state.balance, i64::MAX);
    }

    /// A small deterministic generator, so the property tests need no extra dependency.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        *seed >> 33
    }

    fn random_commands(seed: u64, len: usize) -> Vec<AccountCommand> {
        let mut seed = seed;
        (0..len)
            .map(|_| {
                let amount = (lcg(&mut seed) % 200) as i64 - 20;
                match lcg(&mut seed) % 10 {
                    0 => open("alice"),
                    1..=4 => deposit(amount),
                    _ => withdraw(amount),
                }
            })
            .collect()
    }

    #[test]
    fn balance_is_never_negative() {
        for seed in 0..200 {
            let mut state = AccountState::default();
            for command in random_commands(seed, 60) {
                if let Ok(events) = handle(&state, &command) {
                    for event in &events {
                        Account::apply(&mut state, event);
                    }
                }
                assert!(state.balance >= 0, "seed {seed}: {state:?}");
            }
        }
    }

    #[test]
    fn same_commands_give_same_state_and_events() {
        for seed in 0..50 {
            let commands = random_commands(seed, 60);
            assert_eq!(run(&commands), run(&commands), "seed {seed}");
        }
    }

    #[test]
    fn state_serializes_with_an_integer_balance() {
        let (state, _) = run(&[open("alice"), deposit(1_234)]);
        assert_eq!(
            serde_json::to_value(&state).expect("json"),
            serde_json::json!({"opened": true, "owner": "alice", "balance": 1234})
        );
    }
}
