//! `xlb`: the agent (`xlb run`) and the commands that talk to it (see `cli`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
