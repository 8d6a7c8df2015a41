//! A whole consumer service around a processor (feature `service`): flags and `KCL_*`
//! environment variables, logging, the AWS backends, graceful SIGINT/SIGTERM, exit codes.
//!
//! With the `macros` feature, `#[kcl::handler]` turns an `async fn` of a decoded record into
//! a processor and `kcl::service!` writes `main`; a service takes a dozen lines:
//!
#![cfg_attr(all(feature = "macros", feature = "aws"), doc = "```no_run")]
#![cfg_attr(not(all(feature = "macros", feature = "aws")), doc = "```ignore")]
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64, item: String }
//!
//! #[kcl::handler]
//! async fn handle(order: Order) -> Result<(), std::io::Error> {
//!     println!("order {}: {}", order.id, order.item);
//!     Ok(())
//! }
//!
//! kcl::service!(handle);
//! ```
//!
//! That `main` is `Service::run` (feature `aws` too, a default feature):
//!
//! 1. installs a `tracing` subscriber on stderr ([`init_logging`]: `RUST_LOG`, default
//!    `info`; no colours unless stderr is a terminal);
//! 2. parses the [flags](flags) `--stream`, `--app`, `--table`, `--worker-id`, `--position`
//!    (or `KCL_STREAM`, `KCL_APP`, …);
//! 3. loads the standard AWS configuration (`aws_config::load_defaults`: endpoints, region,
//!    credentials from the environment, profiles, IMDS…) and builds the [`Worker`] on
//!    `kcl::Aws`;
//! 4. runs it on a multi-thread tokio runtime until SIGINT or SIGTERM
//!    ([`Worker::run_until_signal`]), then stops gracefully: processors checkpoint, leases
//!    are released;
//! 5. exits with 0 after a graceful stop; 2 for a flag error (naming the flag or variable);
//!    1 if the worker failed or a second signal abandoned the graceful stop.
//!
//! Without the macros, any processor works; [`Service::configure`] reaches every
//! [`WorkerBuilder`] setting:
//!
#![cfg_attr(feature = "aws", doc = "```no_run")]
#![cfg_attr(not(feature = "aws"), doc = "```ignore")]
//! use std::time::Duration;
//! use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
//!
//! struct Count;
//! #[async_trait]
//! impl RecordProcessor for Count {
//!     async fn process_records(&mut self, batch: &RecordBatch, cp: &mut Checkpointer)
//!         -> Result<(), ProcessorError> {
//!         println!("{} records", batch.len());
//!         Ok(cp.checkpoint().await?)
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     kcl::service::Service::new(|| Count)
//!         .default_app("counter")
//!         .configure(|b| b.lease_duration(Duration::from_secs(20)))
//!         .run()
//! }
//! ```

pub mod codec;
pub mod flags;
pub mod handler;
pub mod logging;
#[cfg(feature = "aws")]
mod run;

pub use flags::{parse_position, FlagError, Flags, InvalidPosition};
pub use handler::{
    DecodeError, Delivery, Handler, HandlerError, HandlerFactory, HandlerFuture, HandlerOutput,
    HandlerProcessor,
};
pub use logging::{init_logging, init_logging_as, LogFormat};

use crate::config::InitialPosition;
use crate::processor::ProcessorFactory;
use crate::worker::signal::{SignalOutcome, StopSignal};
use crate::worker::{Backends, Worker, WorkerBuilder};

type Step = Box<dyn FnOnce(WorkerBuilder) -> WorkerBuilder + Send>;

/// A consumer service: a processor factory, defaults for its flags, extra worker settings.
/// `Service::run` (feature `aws`) is a whole `main`; [`Service::serve`] runs it on backends
/// of your choice.
///
#[cfg_attr(feature = "aws", doc = "```no_run")]
#[cfg_attr(not(feature = "aws"), doc = "```ignore")]
/// # use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
/// # struct Count;
/// # #[async_trait]
/// # impl RecordProcessor for Count {
/// #     async fn process_records(&mut self, _: &RecordBatch, cp: &mut Checkpointer)
/// #         -> Result<(), ProcessorError> { Ok(cp.checkpoint().await?) }
/// # }
/// fn main() -> std::process::ExitCode {
///     kcl::service::Service::new(|| Count)
///         .program("counter", "1.0.0")
///         .default_app("counter")
///         .default_position(kcl::InitialPosition::Latest)
///         .run()
/// }
/// ```
#[must_use = "a service does nothing until `run()` is called"]
pub struct Service {
    processor: Step,
    configure: Vec<Step>,
    defaults: flags::Defaults,
    program: (&'static str, &'static str),
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("defaults", &self.defaults)
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

/// Why a service stopped other than gracefully.
///
/// ```
/// use kcl::service::{FlagError, ServiceError};
///
/// fn describe(e: &ServiceError) -> String {
///     match e {
///         ServiceError::Flags(FlagError::Missing { flag, .. }) => format!("give --{flag}"),
///         ServiceError::Abandoned(signal) => format!("stopped at once by {signal}"),
///         other => other.to_string(),
///     }
/// }
/// let e = ServiceError::from(FlagError::Missing { flag: "app", env: "KCL_APP" });
/// assert_eq!((describe(&e).as_str(), e.exit_code()), ("give --app", 2));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The flags or `KCL_*` variables are wrong (exit code 2).
    #[error(transparent)]
    Flags(#[from] FlagError),
    /// The tokio runtime could not be started.
    #[error("starting the async runtime failed")]
    Runtime(#[source] std::io::Error),
    /// The worker failed (e.g. the lease table or the stream could not be reached at start).
    #[error(transparent)]
    Worker(#[from] crate::Error),
    /// A second signal came during the graceful stop: stopped without waiting. Leases still
    /// held expire after the lease duration; nothing checkpointed is lost.
    #[error(
        "{0} received again during the graceful shutdown: stopped without waiting (the leases \
         still held expire after the lease duration)"
    )]
    Abandoned(StopSignal),
}

impl ServiceError {
    /// The process exit code for this error: 2 for [`ServiceError::Flags`], else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Flags(_) => 2,
            _ => 1,
        }
    }
}

impl Service {
    /// A service running the processors `factory` creates (any `Fn() -> impl
    /// RecordProcessor`, or a [`HandlerFactory`]).
    pub fn new(factory: impl ProcessorFactory) -> Self {
        Self {
            processor: Box::new(move |b: WorkerBuilder| b.processor(factory)),
            configure: Vec::new(),
            defaults: flags::Defaults::default(),
            program: ("kcl-service", ""),
        }
    }

    /// The program's name and version, for `--help` and `--version` (`kcl::service!` passes
    /// the crate's).
    pub fn program(mut self, name: &'static str, version: &'static str) -> Self {
        self.program = (name, version);
        self
    }

    /// The application name when neither `--app` nor `KCL_APP` is given.
    pub fn default_app(mut self, app: impl Into<String>) -> Self {
        self.defaults.app = Some(app.into());
        self
    }

    /// The stream when neither `--stream` nor `KCL_STREAM` is given.
    pub fn default_stream(mut self, stream: impl Into<String>) -> Self {
        self.defaults.stream = Some(stream.into());
        self
    }

    /// The lease table when neither `--table` nor `KCL_TABLE` is given (else the application
    /// name).
    pub fn default_table(mut self, table: impl Into<String>) -> Self {
        self.defaults.table = Some(table.into());
        self
    }

    /// The start position when neither `--position` nor `KCL_POSITION` is given (else
    /// `trim-horizon`).
    pub fn default_position(mut self, position: InitialPosition) -> Self {
        self.defaults.position = Some(position);
        self
    }

    /// Changes worker settings (lease duration, error policy, fan-out, …); applied after the
    /// flags, in the order given.
    pub fn configure(
        mut self,
        f: impl FnOnce(WorkerBuilder) -> WorkerBuilder + Send + 'static,
    ) -> Self {
        self.configure.push(Box::new(f));
        self
    }

    /// Parses `args` (the program name first) with `env` standing for the environment, with
    /// this service's defaults.
    ///
    /// # Errors
    /// As [`Flags::parse_from`].
    pub fn parse_flags_from<I, T>(
        &self,
        args: I,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Flags, FlagError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Flags::parse_with(args, env, self.program, &self.defaults)
    }

    /// Builds the worker from `flags` on `backends`.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
    /// # struct Count;
    /// # #[async_trait]
    /// # impl RecordProcessor for Count {
    /// #     async fn process_records(&mut self, _: &RecordBatch, cp: &mut Checkpointer)
    /// #         -> Result<(), ProcessorError> { Ok(cp.checkpoint().await?) }
    /// # }
    /// use kcl::service::Service;
    ///
    /// let service = Service::new(|| Count).default_app("counter");
    /// let flags = service.parse_flags_from(["counter", "--stream", "orders"], |_| None)?;
    /// let worker = service.build(&flags, kcl::testkit::MemBackends::new())?;
    /// assert_eq!(worker.config().table_name, "counter");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ServiceError::Flags`] for an invalid stream, application, table name or worker id
    /// (naming the flag or variable it came from); [`ServiceError::Worker`] for other
    /// settings.
    pub fn build(
        self,
        flags: &Flags,
        backends: impl Backends + 'static,
    ) -> Result<Worker, ServiceError> {
        let mut builder = (self.processor)(flags.apply(Worker::builder()).backends(backends));
        for step in self.configure {
            builder = step(builder);
        }
        builder.build().map_err(|e| match flags.explain(&e) {
            Some(flag) => ServiceError::Flags(flag),
            None => ServiceError::Worker(e.into()),
        })
    }

    /// Builds the worker and runs it until SIGINT or SIGTERM, then stops it gracefully. Needs
    /// a tokio runtime with the signal driver.
    ///
    /// ```no_run
    /// # use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
    /// # struct Count;
    /// # #[async_trait]
    /// # impl RecordProcessor for Count {
    /// #     async fn process_records(&mut self, _: &RecordBatch, cp: &mut Checkpointer)
    /// #         -> Result<(), ProcessorError> { Ok(cp.checkpoint().await?) }
    /// # }
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use kcl::service::{Flags, Service};
    ///
    /// let flags = Flags::parse()?;
    /// let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// Service::new(|| Count).serve(&flags, kcl::Aws::from_conf(&sdk)).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Cancel safety
    /// Dropping the future abandons the leases held (they expire after the lease duration).
    ///
    /// # Errors
    /// As [`Service::build`]; [`ServiceError::Worker`] if the worker fails;
    /// [`ServiceError::Abandoned`] if a second signal cut the graceful stop short.
    pub async fn serve(
        self,
        flags: &Flags,
        backends: impl Backends + 'static,
    ) -> Result<SignalOutcome, ServiceError> {
        let worker = self.build(flags, backends)?;
        match worker.run_until_signal().await? {
            SignalOutcome::Abandoned(signal) => Err(ServiceError::Abandoned(signal)),
            outcome => Ok(outcome),
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testkit::MemBackends;
    use crate::{Checkpointer, ProcessorError, RecordBatch, RecordProcessor};

    struct Nop;
    #[async_trait::async_trait]
    impl RecordProcessor for Nop {
        async fn process_records(
            &mut self,
            _: &RecordBatch,
            _: &mut Checkpointer,
        ) -> Result<(), ProcessorError> {
            Ok(())
        }
    }

    fn service() -> Service {
        Service::new(|| Nop).program("svc", "0.0.1")
    }

    #[test]
    fn build_applies_flags_defaults_and_configure_steps() {
        let s = service()
            .default_app("default-app")
            .default_table("default-table")
            .configure(|b| b.lease_duration(Duration::from_secs(30)));
        let flags = s
            .parse_flags_from(["svc", "--stream", "orders", "--worker-id", "w-1"], |_| {
                None
            })
            .unwrap();
        let worker = s.build(&flags, MemBackends::new()).unwrap();
        let cfg = worker.config();
        assert_eq!(cfg.application_name, "default-app");
        assert_eq!(cfg.table_name, "default-table");
        assert_eq!(cfg.stream, "orders");
        assert_eq!(cfg.worker_id.as_str(), "w-1");
        assert_eq!(cfg.lease_duration, Duration::from_secs(30));
    }

    #[test]
    fn invalid_names_are_flag_errors_naming_their_origin() {
        let s = service();
        let env = |n: &str| (n == "KCL_APP").then(|| "bad app name!".to_string());
        let err = ServiceError::from(
            s.parse_flags_from(["svc", "--stream", "s"], env)
                .unwrap_err(),
        );
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().starts_with("invalid KCL_APP: "), "{err}");

        let s = service().configure(|b| b.lease_duration(Duration::ZERO));
        let flags = s
            .parse_flags_from(["svc", "--stream", "orders", "--app", "orders-app"], |_| {
                None
            })
            .unwrap();
        let err = s.build(&flags, MemBackends::new()).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert!(err.to_string().contains("lease_duration"), "{err}");
    }
}
