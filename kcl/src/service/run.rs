//! `Service::run`: the whole `main` (feature `aws`).

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use tracing::info;

use super::{init_logging, FlagError, Flags, Service, ServiceError};

impl Service {
    /// The whole service, as `main`: logging, flags, AWS configuration, the worker until
    /// SIGINT/SIGTERM (see the [module docs](super)). Returns the exit code: 0 after a graceful
    /// stop (or for `--help`), 2 for a flag error, 1 otherwise; errors are written to stderr.
    /// Feature `aws`.
    pub fn run(self) -> ExitCode {
        init_logging();
        let flags = match Flags::parse_with(
            std::env::args_os(),
            |name| std::env::var(name).ok(),
            self.program,
            &self.defaults,
        ) {
            Ok(flags) => flags,
            Err(FlagError::Help(text)) => {
                let _ = write!(std::io::stdout(), "{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => return report(&ServiceError::Flags(e)),
        };
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return report(&ServiceError::Runtime(e)),
        };
        let result = runtime.block_on(async move {
            let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            self.serve(&flags, crate::Aws::from_conf(&sdk)).await
        });
        // Tasks stuck in user code must not keep the process alive.
        runtime.shutdown_timeout(Duration::from_secs(1));
        match result {
            Ok(outcome) => {
                info!(?outcome, "stopped");
                ExitCode::SUCCESS
            }
            Err(e) => report(&e),
        }
    }
}

/// Writes `e` and its sources to stderr; the exit code for it.
fn report(e: &ServiceError) -> ExitCode {
    let mut text = match e {
        // clap's message has its own `error:` prefix, usage and hint.
        ServiceError::Flags(FlagError::Usage(usage)) => usage.clone(),
        ServiceError::Flags(f) => format!("error: {f}\n\nFor more information, try '--help'.\n"),
        other => {
            let mut s = format!("Error: {other}");
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                s.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            s.push('\n');
            s
        }
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    // Not eprintln!: a closed stderr must not turn the error into a panic.
    let _ = std::io::stderr().write_all(text.as_bytes());
    ExitCode::from(e.exit_code())
}
