//! The stock `cmdproc` binary: the command line of [`processor::cli::main`] with the example
//! domains `account` and `room`.

/// Workers allocate for every message (decoded JSON, rows, outbox payloads); mimalloc does
/// that with less CPU than the system allocator (measured with `cmdproc bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    processor::cli::main(bank::registry())
}
