//! The inventory processor: `cmdproc` with the inventory aggregate.

fn main() -> std::process::ExitCode {
    processor::cli::main(inventory::registry())
}
