//! The inventory processor: `cmdproc` with the inventory aggregate only.

fn main() -> std::process::ExitCode {
    processor::cli::main(inventory::registry())
}
