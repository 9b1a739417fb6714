//! Command-line parsing shared by the `xlb` and `xlb-bench` binaries: clap's errors as one
//! line and exit codes as every xlb command reports them.

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, error::ErrorKind};

/// Parses `args` (program name first), or says why not and returns the exit code: help and
/// version print and succeed; a verb without its subcommand prints that verb's help (the
/// useful answer) but exits 2; anything else is one line, `NAME: what is wrong (see
/// --help)`, and exit 2.
///
/// # Errors
/// The exit code to end with, when `args` do not parse.
pub fn parse_args<C: Parser>(name: &str, args: Vec<OsString>) -> Result<C, ExitCode> {
    C::try_parse_from(args).map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(2)
        }
        _ => {
            eprintln!("{name}: {} (see --help)", one_line(&e.to_string()));
            ExitCode::from(2)
        }
    })
}

/// clap's error as one line, like every other xlb error: its first paragraph, which names
/// the missing arguments or lists the accepted values on lines of their own.
#[must_use]
pub fn one_line(clap_error: &str) -> String {
    let words: Vec<&str> = clap_error
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(|line| line.trim().trim_start_matches("error: "))
        .collect();
    if words.is_empty() {
        "invalid arguments".to_owned()
    } else {
        words.join(" ")
    }
}
