//! Logs for a consumer service: `tracing` on stderr, filtered by `RUST_LOG` (default `info`),
//! as plain text (colours only on a terminal, and never with `NO_COLOR`) or one JSON object
//! per line.
//!
//! **No record payload and no credential in a log line, at any level.** The library never logs
//! record data (a batch's span carries its shard, sequence range and record count) nor
//! credentials. The AWS SDK does, at `trace`: it dumps whole HTTP responses — `GetRecords`
//! bodies, with every record's data — from `aws_smithy_runtime`. Every setup here leaves those
//! dumps out ([`without_body_dumps`]), whatever `RUST_LOG` asks for. An application that
//! installs its own subscriber should add the same filter.
//!
//! ```
//! use kcl::service::{init_logging_as, LogFormat};
//!
//! let format: LogFormat = "json".parse().unwrap();
//! init_logging_as(format);
//! tracing::info!(shard = "shardId-000000000000", "logged on stderr as one JSON object");
//! ```

use std::io::IsTerminal as _;

use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::{EnvFilter, FilterFn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::Layer as _;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal without `NO_COLOR`).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`, `spans`),
    /// for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("expected `text` or `json`, got {other:?}")),
        }
    }
}

/// The SDK's trace-level dumps of whole HTTP requests and responses (record payloads in
/// `GetRecords` answers): never written, whatever `RUST_LOG` says.
///
/// ```
/// use tracing_subscriber::layer::SubscriberExt as _;
/// use tracing_subscriber::Layer as _;
///
/// let layer = tracing_subscriber::fmt::layer().with_filter(kcl::service::logging::without_body_dumps());
/// let _subscriber = tracing_subscriber::registry().with(layer);
/// ```
pub fn without_body_dumps() -> FilterFn<fn(&Metadata<'_>) -> bool> {
    fn keep(meta: &Metadata<'_>) -> bool {
        !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("aws_smithy"))
    }
    FilterFn::new(keep as fn(&Metadata<'_>) -> bool)
}

/// The subscriber every setup here installs: `directives` (`RUST_LOG` syntax; `None`: the
/// `RUST_LOG` variable, or `info`), [`without_body_dumps`], written by `writer` in `format`.
/// Colours only if `ansi`.
pub fn subscriber<W>(
    format: LogFormat,
    directives: Option<&str>,
    writer: W,
    ansi: bool,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = match directives {
        Some(d) => EnvFilter::new(d),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let layer = match format {
        LogFormat::Text => fmt.with_ansi(ansi).boxed(),
        LogFormat::Json => fmt.json().with_ansi(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer.with_filter(without_body_dumps()))
}

/// Installs [`subscriber`] on stderr as text. Returns false (and changes nothing) if a global
/// subscriber was already set.
///
/// ```
/// kcl::service::init_logging();
/// tracing::info!("logged on stderr");
/// assert!(!kcl::service::init_logging(), "installed once");
/// ```
pub fn init_logging() -> bool {
    init_logging_as(LogFormat::Text)
}

/// Installs [`subscriber`] on stderr in `format`. Returns false (and changes nothing) if a
/// global subscriber was already set.
pub fn init_logging_as(format: LogFormat) -> bool {
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing::subscriber::set_global_default(subscriber(format, None, std::io::stderr, ansi)).is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = subscriber(format, Some("trace"), move || out.clone(), false);
        tracing::subscriber::with_default(sub, f);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_sdks_body_dumps_are_left_out_at_any_level() {
        let text = logged(LogFormat::Text, || {
            tracing::trace!(target: "aws_smithy_runtime::client::orchestrator::http", "body: PAYLOAD");
            tracing::debug!(target: "aws_smithy_runtime::client::orchestrator", "attempt 1");
            tracing::trace!(target: "kcl::consumer", "kept");
        });
        assert!(!text.contains("PAYLOAD"), "{text}");
        assert!(
            text.contains("attempt 1") && text.contains("kept"),
            "{text}"
        );
    }

    #[test]
    fn json_lines_are_json_objects_with_their_span() {
        let text = logged(LogFormat::Json, || {
            let span = tracing::info_span!("consumer", shard_id = "shardId-1");
            let _in = span.enter();
            tracing::info!(records = 3, "batch");
        });
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["fields"]["message"], "batch");
        assert_eq!(line["fields"]["records"], 3);
        assert_eq!(line["span"]["shard_id"], "shardId-1");
        assert_eq!(line["level"], "INFO");
        assert!(!text.contains('\u{1b}'), "no colour codes in JSON");
    }

    #[test]
    fn a_log_format_is_text_or_json() {
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml"
            .parse::<LogFormat>()
            .unwrap_err()
            .contains("`text` or `json`"));
    }
}
