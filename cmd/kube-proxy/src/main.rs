//! `kube-proxy`: upstream's flags and config, our backends.

use std::process::ExitCode;

use kube_proxy::{app, backends, logging, options};

fn main() -> ExitCode {
    let cmd = match options::parse_command_line(std::env::args_os()) {
        Ok(c) => c,
        Err(exit) => {
            print!("{}", exit.stdout);
            eprint!("{}", exit.stderr);
            return ExitCode::from(exit.code.clamp(0, 255) as u8);
        }
    };
    // Logging is not up yet: deprecation notices go straight to stderr, as pflag prints them.
    for w in &cmd.warnings {
        eprintln!("{w}");
    }
    let run = match options::resolve(cmd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    logging::init(run.verbosity, &run.logging_format);
    if let Some(err) = &run.lenient_decoding_error {
        tracing::warn!(error = %err, "Using lenient decoding as strict decoding failed");
    }
    for gate in run.unknown_feature_gates() {
        tracing::warn!(gate, "Unrecognized feature gate");
    }
    if !run.vmodule.is_empty() {
        tracing::warn!("--vmodule is accepted but per-file verbosity is not supported; using -v for all");
    }

    if let Some(path) = &run.write_config_to {
        return match run.config.write_yaml_file(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "Wrote configuration");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("Error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if run.cleanup {
        return match backends::cleanup(&run) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if run.init_only {
        // The ebpf backend needs no privileged set-up beyond what it does when it starts.
        tracing::info!("--init-only: nothing to initialise for this mode; exiting");
        return ExitCode::SUCCESS;
    }

    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(app::run(run)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Error running ProxyServer");
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
