//! The `hookbus` binary's command output on stdout.

/// Writes a line of command output to stdout.
#[allow(clippy::print_stdout)]
pub(crate) fn println_out(line: &str) {
    println!("{line}");
}
