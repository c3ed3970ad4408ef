//! The `keygate` binary: parse the command line, build the runtime, run the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match keygate::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as usual; a usage error is printed without anything
        // shaped like a key that it might repeat.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprint!("{}", keygate::cli::redact_keys(&e.render().to_string()));
            std::process::exit(e.exit_code());
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(keygate::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {}", keygate::cli::report(&e));
            ExitCode::FAILURE
        }
    }
}
