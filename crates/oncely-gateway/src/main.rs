//! The `oncely` binary; everything lives in the library (see `lib.rs`).

/// mimalloc rather than the system allocator: a proxy allocates and frees small buffers,
/// headers and futures on every request, across worker threads; glibc's malloc and free
/// took about 10% of the gateway's CPU under load (docs/benchmarks.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    oncely_gateway::cli::main()
}
