//! `coalescectl`'s output, for readers that stop early (`coalescectl tail | head -1`).
//!
//! Rust ignores SIGPIPE, so `println!` to a closed pipe panics ("failed printing to stdout:
//! Broken pipe"). [`outln!`](crate::outln) instead unwinds quietly to [`run`] — destructors
//! run, so `coalescectl demo | head` still stops its nodes — and the process exits with status
//! 0, as ripgrep does: the reader asked for no more. (Restoring SIGPIPE's default action would
//! kill the process without stopping them, and needs unsafe code.) Any other failure to write
//! panics, as `println!` does.

use std::io::Write;

/// The unwind payload of a write to a closed stdout.
#[derive(Debug)]
pub struct Closed;

fn written(r: std::io::Result<()>) {
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::panic::resume_unwind(Box::new(Closed)),
        Err(e) => panic!("failed printing to stdout: {e}"),
    }
}

/// Writes one line (what [`outln!`](crate::outln) expands to).
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    written(out.write_fmt(args).and_then(|()| out.write_all(b"\n")));
}

/// Writes `bytes` as they are, and flushes them.
pub fn bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    written(out.write_all(bytes).and_then(|()| out.flush()));
}

/// Runs `f` (the whole command); if it wrote to a closed stdout, exits 0 without a word.
pub fn run<T>(f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(t) => t,
        Err(payload) if payload.is::<Closed>() => std::process::exit(0),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// `println!` for `coalescectl`'s output: see [the module](crate::stdout).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stdout::line(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_closed_stdout_ends_the_command_quietly_after_its_destructors() {
        struct Cleanup<'a>(&'a std::cell::Cell<bool>);
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let cleaned = std::cell::Cell::new(false);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _c = Cleanup(&cleaned);
            super::written(Err(std::io::ErrorKind::BrokenPipe.into()));
        }));
        assert!(caught.unwrap_err().is::<super::Closed>());
        assert!(cleaned.get(), "destructors ran");
    }
}
