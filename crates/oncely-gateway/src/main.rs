//! The `oncely` binary; everything lives in the library (see `lib.rs`).

fn main() -> std::process::ExitCode {
    oncely_gateway::cli::main()
}
