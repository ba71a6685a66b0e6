//! A processor binary whose registry breaks its contract, for the test that checks such a
//! binary refuses to start: `account` is registered twice, and `room` lacks the schema of
//! its `Book` command.

fn main() -> std::process::ExitCode {
    let without_book: Vec<(&str, &str)> = bank::ROOM_SCHEMAS
        .iter()
        .copied()
        .filter(|(path, _)| *path != "commands/Book.json")
        .collect();
    let registry = commands::Registry::new()
        .with::<bank::Account>(bank::account_schemas())
        .with::<bank::Account>(bank::account_schemas())
        .with::<bank::Room>(commands::Schemas::embedded("schemas/room", &without_book));
    processor::cli::main(registry)
}
