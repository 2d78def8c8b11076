//! Logging through `tracing`, with klog-like verbosity: `-v` 0–1 logs info, 2–4 debug, 5 and up trace.

use tracing_subscriber::EnvFilter;

/// Maps klog verbosity to a tracing level filter.
pub fn level_for_verbosity(v: u32) -> &'static str {
    match v {
        0 | 1 => "info",
        2..=4 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber; `format` is `text` or `json`. `RUST_LOG` overrides the level when set.
pub fn init(verbosity: u32, format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{},h2=info,hyper=info,tower=info,rustls=info", level_for_verbosity(verbosity)))
    });
    // Colour only on a terminal: logs in files and pipes stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let result = if format == "json" { builder.json().try_init() } else { builder.try_init() };
    if result.is_err() {
        eprintln!("warning: logging was already initialised");
    }
}
