//! Logging setup shared by the binaries: slog to stderr through slog-async, with the
//! level chosen at run time (`debug`/`trace` are compiled in; see the workspace features).
//! Per-packet messages are only ever logged at trace level.

use slog::Drain;

/// Keep this alive until exit: dropping it flushes the async drain.
pub struct LogGuard(#[allow(dead_code)] slog_async::AsyncGuard);

/// Builds the root logger. `level` is one of error, warn, info, debug, trace (validated
/// by the config); anything else means info.
pub fn init(level: &str, program: &'static str) -> (slog::Logger, LogGuard) {
    let level = match level {
        "error" => slog::Level::Error,
        "warn" => slog::Level::Warning,
        "debug" => slog::Level::Debug,
        "trace" => slog::Level::Trace,
        _ => slog::Level::Info,
    };
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let drain = slog_term::FullFormat::new(decorator).build().fuse();
    let (drain, guard) = slog_async::Async::new(drain).chan_size(4096).build_with_guard();
    let drain = drain.filter_level(level).fuse();
    (slog::Logger::root(drain, slog::o!("prog" => program)), LogGuard(guard))
}
