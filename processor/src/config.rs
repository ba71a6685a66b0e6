//! The engine's policies and plain options: how misrouted commands and poison commands are
//! treated, and how a batch plans. Plain types with no command-line concerns: the CLI
//! (`cli/run.rs`, `cli/verify.rs`) has clap mirrors of them that convert with `From`.

/// What to do with a command found on a partition its key does not map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MisroutedPolicy {
    /// Dead-letter it: it breaks the single-writer guarantee.
    #[default]
    DeadLetter,
    /// Apply it anyway (only for topics whose producers use another partitioner knowingly).
    Accept,
}

/// What to do with a command whose handler keeps failing (panics) after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoisonPolicy {
    /// Park the aggregate: set aside this command and every later one for the aggregate,
    /// in order, while other aggregates go on.
    #[default]
    Park,
    /// Dead-letter only this command and apply the aggregate's later commands. This breaks
    /// the aggregate's order; choose it only when commands are independent.
    DeadLetter,
    /// Stop the partition at this command until an operator intervenes.
    Halt,
}

/// How a batch treats failing handlers.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// What to do after the retries.
    pub poison: PoisonPolicy,
    /// How many times a panicking handler is tried before the command counts as poison.
    pub attempts: u32,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            poison: PoisonPolicy::Park,
            attempts: 3,
        }
    }
}
